"""Shared helpers: tiny random Video-XL configs built in the test, and the parity fixtures (location, converted)."""

import os
from pathlib import Path

import pytest
import torch

from scripts.local_import import REPO_ROOT, VideoXLConfig, VideoXLForCausalLM


# Written by the original implementation; CI always has them, a bare checkout may not (then those tests skip).
PARITY_DIR = Path(os.environ.get("VIDEOXL_PARITY_DIR", REPO_ROOT.parent / "shared" / "parity"))

# A tiny model: 112 px frames, 14 px patches -> 8x8 patches -> 2x2 pool -> 16 tokens per frame; windows of 4 frames.
VIDEO_ID, IMAGE_ID, EOS_ID = 302, 301, 5
TOKENS_PER_FRAME = 16


def tiny_config(**overrides) -> VideoXLConfig:
    text = dict(
        model_type="qwen2",
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        bos_token_id=4,
        eos_token_id=EOS_ID,
    )
    vision = dict(
        model_type="clip_vision_model",
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=112,
        patch_size=14,
    )
    kwargs = dict(
        text_config=text,
        vision_config=vision,
        image_token_id=IMAGE_ID,
        video_token_id=VIDEO_ID,
        beacon_window=4 * TOKENS_PER_FRAME,
        beacon_ratio=4,
        beacon_train_ratios=[2, 4, 8],
    )
    kwargs.update(overrides)
    return VideoXLConfig(**kwargs)


def tiny_model(seed: int = 0, attn_implementation: str = "eager", **overrides) -> VideoXLForCausalLM:
    """A random tiny model whose VST weights differ from q/k/v (so ignoring them changes the output)."""
    torch.manual_seed(seed)
    config = tiny_config(**overrides)
    config._attn_implementation = attn_implementation
    model = VideoXLForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    return model


def video_prompt(num_frames: int, prefix=(4, 10, 11, 12), suffix=(13, 14, 15, 16, 17)) -> torch.Tensor:
    """`[1, seq]`: prefix text, num_frames x 16 video tokens, question text."""
    return torch.tensor([list(prefix) + [VIDEO_ID] * (num_frames * TOKENS_PER_FRAME) + list(suffix)])


def random_frames(num_frames: int, seed: int = 0) -> torch.Tensor:
    """`[1, frames, 3, 112, 112]` normalised-looking pixels."""
    return torch.randn(1, num_frames, 3, 112, 112, generator=torch.Generator().manual_seed(seed))


def parity_path() -> Path:
    """The parity fixtures' folder; skips the calling test, saying where it looked, when this checkout has none."""
    if not (PARITY_DIR / "model" / "config.json").is_file():
        pytest.skip(
            f"parity fixtures not found: {PARITY_DIR} has no model/config.json "
            "(set VIDEOXL_PARITY_DIR to the folder written by the original Video-XL, ../shared/parity by default)"
        )
    return PARITY_DIR


@pytest.fixture(scope="module")
def tokenizer():
    """The released 7B's tokenizer (the real Qwen2 vocabulary, from the repo root)."""
    from transformers import Qwen2Tokenizer

    return Qwen2Tokenizer.from_pretrained(REPO_ROOT)


@pytest.fixture(scope="module")
def processor(tokenizer):
    """The released 7B's processor with its chat template, built from the repo's code. Test files that need another
    processor or tokenizer define their own fixture of the same name."""
    from scripts.local_import import processing

    return processing().VideoXLProcessor(tokenizer, chat_template=(REPO_ROOT / "chat_template.jinja").read_text())


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    return parity_path()


@pytest.fixture(scope="session")
def tiny_processor_dir(tmp_path_factory) -> Path:
    """The released 7B's processor (CLIP-336, 144 tokens a tile, ChatML) with the demo's word-level tokenizer.

    The parity checkpoint has 1,000 vocabulary rows and no tokenizer of its own; the Qwen2 tokenizer's ids would
    run past its embedding, the demo tokenizer's stay inside it.
    """
    from transformers import AutoProcessor, AutoTokenizer

    processor = AutoProcessor.from_pretrained(REPO_ROOT, trust_remote_code=True)
    processor.tokenizer = AutoTokenizer.from_pretrained(REPO_ROOT / "demo" / "model", trust_remote_code=True)
    out = tmp_path_factory.mktemp("tiny_processor")
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def converted_parity(parity_dir, tiny_processor_dir, tmp_path_factory) -> Path:
    """The parity checkpoint through scripts/convert_original_checkpoint.py: a complete repo."""
    from scripts.convert_original_checkpoint import convert

    return convert(parity_dir / "model", tmp_path_factory.mktemp("converted"), processor_source=tiny_processor_dir)
