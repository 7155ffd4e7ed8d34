"""Build the tiny demo model's word-level tokenizer.

The vocabulary is every piece the synthetic questions, options and answers can produce
(enumerated by ``demo.synth.corpus_texts``, not sampled) plus the ChatML scaffolding, so the
prompt ``<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n<video>\\n
{question}<|im_end|>\\n<|im_start|>assistant\\n`` never yields ``<unk>``.

Pre-tokenisation keeps newlines and ``? . , !`` as tokens of their own and marks a word that
follows a space with ``▁`` (Metaspace), so decoding reproduces the text exactly and every
answer letter ``A``-``D`` is one token (the same token that starts its option line).

Usage: ``python -m demo.build_tiny_tokenizer --out DIR`` (or ``python demo/build_tiny_tokenizer.py``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

if __package__ in (None, ""):  # run as a file: make the repo root importable for `demo.synth`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo.synth import corpus_texts  # noqa: E402
from scripts.cli import HelpFormatter  # noqa: E402

PAD, IM_START, IM_END, IMAGE, VIDEO, UNK = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>", "<unk>",
)
#: Fixed ids 0..5, in this order.
SPECIAL_TOKENS: tuple[str, ...] = (PAD, IM_START, IM_END, IMAGE, VIDEO, UNK)
SYSTEM_PROMPT = "You are a helpful assistant."
SPACE_MARK = "▁"

#: The repo's one chat template (ChatML, media placeholders, `{% generation %}` around answers).
CHAT_TEMPLATE = (Path(__file__).resolve().parent.parent / "chat_template.jinja").read_text()


def make_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Split off newlines and sentence punctuation, then words with a ``▁`` space marker."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\n"), behavior="isolated"),
            pre_tokenizers.Split(Regex(r"[?.,!]"), behavior="isolated"),
            pre_tokenizers.Metaspace(replacement=SPACE_MARK, prepend_scheme="never", split=True),
        ]
    )


def collect_pieces(texts: Iterable[str]) -> list[str]:
    """Sorted distinct pre-tokenised pieces of ``texts``, each word with and without ``▁``.

    Both variants are added because a word's marker depends on whether it follows a space or
    starts a line, and a template change should not create unknown tokens.
    """
    pre = make_pre_tokenizer()
    pieces: set[str] = {"\n", SPACE_MARK}
    for text in texts:
        for piece, _ in pre.pre_tokenize_str(text):
            bare = piece.removeprefix(SPACE_MARK)
            if bare:
                pieces.update({bare, SPACE_MARK + bare})
    return sorted(pieces)


def chat_scaffold_texts() -> list[str]:
    """The non-special text of the ChatML prompt: role names and the system prompt."""
    return ["system", "user", "assistant", SYSTEM_PROMPT]


def build_tokenizer() -> Tokenizer:
    """The ``tokenizers.Tokenizer``: WordLevel over the task's pieces, specials at ids 0..5."""
    pieces = collect_pieces([*corpus_texts(), *chat_scaffold_texts()])
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *pieces])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = make_pre_tokenizer()
    tok.decoder = decoders.Metaspace(replacement=SPACE_MARK, prepend_scheme="never", split=True)
    # Registering them as special makes each match whole in raw text, before pre-tokenisation.
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def build_tiny_tokenizer(out_dir: str | Path):
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` to ``out_dir``; return the
    loaded ``PreTrainedTokenizerFast``."""
    from transformers import PreTrainedTokenizerFast

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(),
        pad_token=PAD,
        eos_token=IM_END,
        unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE, "video_token": VIDEO},
        clean_up_tokenization_spaces=False,
        model_max_length=131072,  # a long video expands <video> into thousands of positions
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_tok.save_pretrained(str(out))
    return PreTrainedTokenizerFast.from_pretrained(str(out))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Build the tiny demo tokenizer.", formatter_class=HelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output directory")
    return p


def main(argv: list[str] | None = None) -> None:
    a = build_parser().parse_args(argv)
    tok = build_tiny_tokenizer(a.out)
    print(f"wrote {a.out}: vocab {len(tok)} tokens")


if __name__ == "__main__":
    main()
