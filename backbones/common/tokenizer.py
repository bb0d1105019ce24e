"""Loading the Llama-2 SentencePiece tokenizer of an OpenVLA checkpoint (and the tiny packaged one)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from types import SimpleNamespace

from transformers import PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from .checkpoint import CheckpointError, read_json

__all__ = [
    "TOKENIZER_FILES",
    "REQUIRED_TOKENIZER_FILES",
    "load_tokenizer",
    "SentencePieceTokenizer",
    "tiny_tokenizer_dir",
    "copy_tokenizer_files",
]

TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
REQUIRED_TOKENIZER_FILES = ("tokenizer_config.json",)
_VOCAB_FILES = ("tokenizer.model", "tokenizer.json")


def _check_files(ckpt_dir: Path) -> None:
    if not ckpt_dir.is_dir():
        raise CheckpointError(
            f"tokenizer directory {ckpt_dir} does not exist; point to the checkpoint folder holding "
            "tokenizer.json (or tokenizer.model) and tokenizer_config.json"
        )
    for name in REQUIRED_TOKENIZER_FILES:
        if not (ckpt_dir / name).is_file():
            raise CheckpointError(
                f"missing tokenizer file {ckpt_dir / name}; copy it from the released checkpoint together with "
                "tokenizer.json, tokenizer.model, special_tokens_map.json and added_tokens.json (or use copy_tokenizer_files)"
            )
    if not any((ckpt_dir / name).is_file() for name in _VOCAB_FILES):
        raise CheckpointError(
            f"missing tokenizer file {ckpt_dir / 'tokenizer.json'} (nor is there a tokenizer.model); "
            "copy tokenizer.json and tokenizer.model from the released checkpoint"
        )


def load_tokenizer(ckpt_dir: str | os.PathLike[str]):
    """The tokenizer of a checkpoint directory, offline, giving Llama-2's pieces for every string.

    With ``tokenizer.json`` (released OpenVLA / OFT checkpoints ship one) the file is used exactly as written, as
    the official code's fast tokenizer does. Without it, SentencePiece itself runs ``tokenizer.model``. Not
    ``LlamaTokenizer``: transformers 5.x rebuilds its normaliser and then splits leading and repeated spaces
    differently from Llama-2's SentencePiece.
    """
    ckpt_dir = Path(ckpt_dir)
    _check_files(ckpt_dir)
    if not (ckpt_dir / "tokenizer.json").is_file():
        return SentencePieceTokenizer(ckpt_dir)
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # warns that config.json's model_type 'openvla' is unknown
    try:
        return PreTrainedTokenizerFast.from_pretrained(str(ckpt_dir), local_files_only=True)
    finally:
        hf_logging.set_verbosity(previous)


class SentencePieceTokenizer:
    """Llama-2's tokenizer as SentencePiece runs it (BOS + ``sp.encode``), for checkpoint folders that ship only
    ``tokenizer.model``; the part of the transformers tokenizer API vlacache uses. Special-token text inside a
    string (e.g. a literal ``</s>``) is encoded as plain characters, as SentencePiece does."""

    def __init__(self, folder: Path) -> None:
        import sentencepiece

        self.name_or_path = str(folder)
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        config = read_json(folder / "tokenizer_config.json")
        self.add_bos_token = bool(config.get("add_bos_token", True))
        self.add_eos_token = bool(config.get("add_eos_token", False))
        added = folder / "added_tokens.json"
        self.added_tokens: dict[str, int] = read_json(added) if added.is_file() else {}
        specials = {**config, **(read_json(folder / "special_tokens_map.json")
                                 if (folder / "special_tokens_map.json").is_file() else {})}
        for role in ("bos", "eos", "unk", "pad"):
            value = specials.get(f"{role}_token")
            setattr(self, f"{role}_token", value.get("content") if isinstance(value, dict) else value)

    def __len__(self) -> int:
        return self.sp.get_piece_size() + len(self.added_tokens)

    def __call__(self, text: str) -> SimpleNamespace:
        return SimpleNamespace(input_ids=self.encode(text))

    def encode(self, text: str) -> list[int]:
        ids = list(self.sp.encode(text))
        return [self.sp.bos_id()] * self.add_bos_token + ids + [self.sp.eos_id()] * self.add_eos_token

    def convert_tokens_to_ids(self, token: str) -> int | None:
        if token is None:
            return None
        if token in self.added_tokens:
            return self.added_tokens[token]
        return self.sp.piece_to_id(token)

    def convert_ids_to_tokens(self, ids):
        names = {i: t for t, i in self.added_tokens.items()}
        one = lambda i: names.get(i) or self.sp.id_to_piece(i)  # noqa: E731
        return one(ids) if isinstance(ids, int) else [one(i) for i in ids]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        special = {self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id(), *self.added_tokens.values()}
        if skip_special_tokens:
            ids = [i for i in ids if i not in special]
        return self.sp.decode(ids)

    bos_token_id = property(lambda self: self.convert_tokens_to_ids(self.bos_token))
    eos_token_id = property(lambda self: self.convert_tokens_to_ids(self.eos_token))
    unk_token_id = property(lambda self: self.convert_tokens_to_ids(self.unk_token))
    pad_token_id = property(lambda self: self.convert_tokens_to_ids(self.pad_token))


def tiny_tokenizer_dir() -> Path:
    """Folder of the tiny Llama-format tokenizer shipped with the package (512 pieces + ``<PAD>``)."""
    return Path(__file__).resolve().parent / "assets" / "tiny_tokenizer"


def copy_tokenizer_files(src_dir: str | os.PathLike[str], dst_dir: str | os.PathLike[str]) -> list[Path]:
    """Copy the tokenizer files present in ``src_dir`` into ``dst_dir``; returns the copied paths."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    _check_files(src_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            copied.append(Path(shutil.copyfile(src_dir / name, dst_dir / name)))
    return copied
