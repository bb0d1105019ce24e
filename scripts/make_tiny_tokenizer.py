"""Train the tiny Llama-style SentencePiece tokenizer shipped in backbones/common/assets/tiny_tokenizer.

The files mirror a released OpenVLA checkpoint's tokenizer (tokenizer.model, tokenizer.json in Llama-2's
format, tokenizer_config.json, special_tokens_map.json, added_tokens.json with "<PAD>" appended after the
SentencePiece vocabulary), so tests load it through the same code path as the real Llama-2 tokenizer. Offline and
deterministic: the corpus is embedded below and training runs on one thread.

Usage: python scripts/make_tiny_tokenizer.py [--out DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import sentencepiece as spm

VOCAB_SIZE = 512
PAD_TOKEN = "<PAD>"
SPACE_PIECE = "\u2581"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "backbones" / "common" / "assets" / "tiny_tokenizer"
PROMPT = "In: What action should the robot take to {instruction}?\nOut:"

INSTRUCTIONS = [
    "pick up the black bowl between the plate and the ramekin and place it on the plate",
    "pick up the black bowl next to the ramekin and place it on the plate",
    "pick up the black bowl from table center and place it on the plate",
    "pick up the black bowl on the cookie box and place it on the plate",
    "pick up the black bowl in the top drawer of the wooden cabinet and place it on the plate",
    "pick up the black bowl on the ramekin and place it on the plate",
    "pick up the black bowl next to the cookie box and place it on the plate",
    "pick up the black bowl on the stove and place it on the plate",
    "pick up the black bowl next to the plate and place it on the plate",
    "pick up the black bowl on the wooden cabinet and place it on the plate",
    "pick up the alphabet soup and place it in the basket",
    "pick up the cream cheese and place it in the basket",
    "pick up the salad dressing and place it in the basket",
    "pick up the bbq sauce and place it in the basket",
    "pick up the ketchup and place it in the basket",
    "pick up the tomato sauce and place it in the basket",
    "pick up the butter and place it in the basket",
    "pick up the milk and place it in the basket",
    "pick up the chocolate pudding and place it in the basket",
    "pick up the orange juice and place it in the basket",
    "open the middle drawer of the cabinet",
    "put the bowl on the stove",
    "put the wine bottle on top of the cabinet",
    "open the top drawer and put the bowl inside",
    "put the bowl on top of the cabinet",
    "push the plate to the front of the stove",
    "put the cream cheese in the bowl",
    "turn on the stove",
    "put the bowl on the plate",
    "put the wine bottle on the rack",
    "put both the alphabet soup and the tomato sauce in the basket",
    "put both the cream cheese box and the butter in the basket",
    "turn on the stove and put the moka pot on it",
    "put the black bowl in the bottom drawer of the cabinet and close it",
    "put the white mug on the left plate and put the yellow and white mug on the right plate",
    "pick up the book and place it in the back compartment of the caddy",
    "put the white mug on the plate and put the chocolate pudding to the right of the plate",
    "put both the alphabet soup and the cream cheese box in the basket",
    "put both moka pots on the stove",
    "put the yellow and white mug in the microwave and close it",
    "close the top drawer of the cabinet",
    "open the bottom drawer of the cabinet",
    "put the black bowl on top of the cabinet",
    "turn off the stove",
    "put the frying pan on the stove",
    "pick up the red mug and place it to the right of the caddy",
    "close the microwave",
    "open the microwave",
    "put the ketchup in the top drawer of the cabinet",
    "stack the black bowl at the front on the black bowl in the middle",
    "stack the left bowl on the right bowl and place them in the tray",
    "pick up the book and place it in the front compartment of the caddy",
    "put the white bowl on the plate",
    "put the chocolate pudding in the tray",
    "pick up the alphabet soup and put it in the tray",
    "turn on the stove and put the frying pan on it",
    "put the red mug on the left plate",
    "pick up the orange juice and put it in the basket",
    "close the top drawer of the cabinet and put the black bowl on top of it",
    "put the yellow and white mug to the front of the white mug",
    "pick up the salad dressing and put it in the tray",
    "put the moka pot on the stove",
]

ENGLISH = [
    "The robot arm moves slowly toward the table.",
    "A camera on the wrist records 20 frames per second.",
    "Vision-language-action models map images and text to motor commands.",
    "Each action has 7 dimensions: 3 for position, 3 for rotation and 1 for the gripper.",
    "The policy was trained on 970,000 robot episodes.",
    "Please open the door, then close it again.",
    "She said that the kitchen was clean and the cups were in the sink.",
    "How many objects are on the shelf?",
    "We measure the success rate over 50 trials for each of the 10 tasks.",
    "The quick brown fox jumps over the lazy dog.",
    "Tokens that did not change between frames can reuse their cached keys and values.",
    "Move the gripper 2.5 centimeters to the left and rotate it by 90 degrees.",
    "It is a sunny day in the lab; the lights are off.",
    "Out of 500 attempts, 412 succeeded and 88 failed.",
    "What should I do next? Put the object down gently!",
]


def corpus() -> list[str]:
    """Training sentences: each prompt split at its newline (as Llama, '\\n' stays a byte-fallback piece)."""
    lines: list[str] = []
    for instruction in INSTRUCTIONS:
        lines.extend(PROMPT.format(instruction=instruction).split("\n"))
    lines.extend(ENGLISH)
    return lines


def train_model(out_file: Path) -> None:
    """Train the SentencePiece BPE model with Llama-2's normalisation settings and write it to ``out_file``."""
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_writer=buffer,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        split_by_unicode_script=True,
        split_by_number=True,
        allow_whitespace_only_pieces=True,
        max_sentencepiece_length=16,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    out_file.write_bytes(buffer.getvalue())


def check_model(model_file: Path) -> None:
    """Fail loudly unless the model has the ids and pieces the OpenVLA prompt code relies on."""
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    problems = []
    if sp.get_piece_size() != VOCAB_SIZE:
        problems.append(f"vocab size {sp.get_piece_size()} != {VOCAB_SIZE}")
    for name, got, want in (("unk", sp.unk_id(), 0), ("bos", sp.bos_id(), 1), ("eos", sp.eos_id(), 2)):
        if got != want:
            problems.append(f"{name}_id {got} != {want}")
    if sp.piece_to_id(SPACE_PIECE) == sp.unk_id():
        problems.append(f"the lone {SPACE_PIECE!r} piece is missing (OpenVLA appends it to every prompt)")
    if problems:
        sys.exit(f"tiny tokenizer is unusable: {'; '.join(problems)}; adjust the corpus or trainer options")


def special_token(content: str, normalized: bool = False) -> dict[str, object]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": normalized,
        "rstrip": False,
        "single_word": False,
    }


def write_configs(out_dir: Path) -> None:
    """Write the transformers side files in the layout of openvla/openvla-7b."""
    pad_id = VOCAB_SIZE
    specials = {0: special_token("<unk>"), 1: special_token("<s>"), 2: special_token("</s>")}
    specials[pad_id] = special_token(PAD_TOKEN, normalized=True)
    tokenizer_config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": {str(i): {**tok, "special": True} for i, tok in specials.items()},
        "bos_token": "<s>",
        "clean_up_tokenization_spaces": False,
        "eos_token": "</s>",
        "legacy": False,
        "model_max_length": 2048,
        "pad_token": PAD_TOKEN,
        "padding_side": "right",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>",
        "use_default_system_prompt": False,
    }
    special_tokens_map = {
        "bos_token": specials[1],
        "eos_token": specials[2],
        "pad_token": PAD_TOKEN,
        "unk_token": specials[0],
    }
    files = {
        "tokenizer_config.json": tokenizer_config,
        "special_tokens_map.json": special_tokens_map,
        "added_tokens.json": {PAD_TOKEN: pad_id},
    }
    for name, payload in files.items():
        (out_dir / name).write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def write_tokenizer_json(model_file: Path, out_file: Path) -> None:
    """tokenizer.json in the format of Llama-2's (and so OpenVLA's): byte-fallback BPE over the SentencePiece
    pieces, normaliser "prepend ▁, spaces -> ▁" with no pre-tokenizer (so repeated, leading and trailing
    spaces become the pieces SentencePiece gives), BOS added by the post-processor."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    pieces = SentencePieceExtractor(str(model_file)).extract(models.BPE)
    tok = Tokenizer(models.BPE(pieces["vocab"], pieces["merges"], unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
    tok.add_tokens([AddedToken(PAD_TOKEN, normalized=True, special=True)])
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE_PIECE), normalizers.Replace(" ", SPACE_PIECE)])
    tok.decoder = decoders.Sequence(
        [decoders.Replace(SPACE_PIECE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok.save(str(out_file))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    model_file = args.out / "tokenizer.model"
    train_model(model_file)
    check_model(model_file)
    write_tokenizer_json(model_file, args.out / "tokenizer.json")
    write_configs(args.out)
    print(f"wrote tiny tokenizer ({VOCAB_SIZE} pieces + {PAD_TOKEN}) to {args.out}")


if __name__ == "__main__":
    main()
