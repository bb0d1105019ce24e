"""Loading the Llama-2 SentencePiece tokenizer of an OpenVLA checkpoint (and the tiny packaged one)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import transformers
from transformers import AutoTokenizer
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from .checkpoint import CheckpointError, read_json

__all__ = [
    "TOKENIZER_FILES",
    "REQUIRED_TOKENIZER_FILES",
    "load_tokenizer",
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
            "tokenizer.model and tokenizer_config.json"
        )
    for name in REQUIRED_TOKENIZER_FILES:
        if not (ckpt_dir / name).is_file():
            raise CheckpointError(
                f"missing tokenizer file {ckpt_dir / name}; copy it from the released checkpoint "
                "(or use copy_tokenizer_files)"
            )
    if not any((ckpt_dir / name).is_file() for name in _VOCAB_FILES):
        raise CheckpointError(
            f"missing tokenizer file {ckpt_dir / 'tokenizer.model'} (nor is there a tokenizer.json); "
            "copy the SentencePiece model from the released checkpoint"
        )


def load_tokenizer(ckpt_dir: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a checkpoint directory offline via ``AutoTokenizer``.

    Converting ``tokenizer.model`` (when there is no ``tokenizer.json``) needs the ``protobuf`` package.
    """
    ckpt_dir = Path(ckpt_dir)
    _check_files(ckpt_dir)
    needs_conversion = not (ckpt_dir / "tokenizer.json").is_file()
    if needs_conversion:
        try:
            import google.protobuf  # noqa: F401
        except ImportError as err:
            raise CheckpointError(
                f"{ckpt_dir} has only tokenizer.model, and converting it requires protobuf; "
                "run `pip install protobuf`"
            ) from err
    # The class named in tokenizer_config.json (LlamaTokenizer for OpenVLA), not AutoTokenizer's guess: next to
    # a config.json whose model_type ('openvla') transformers does not know, some 5.x versions fall back to a
    # generic backend that tokenizes the prompt differently.
    name = read_json(ckpt_dir / "tokenizer_config.json").get("tokenizer_class") or ""
    cls = getattr(transformers, name, None) or getattr(transformers, name.removesuffix("Fast"), None) or AutoTokenizer
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # AutoTokenizer warns that config.json's model_type 'openvla' is unknown
    try:
        return cls.from_pretrained(str(ckpt_dir), local_files_only=True)
    finally:
        hf_logging.set_verbosity(previous)


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
