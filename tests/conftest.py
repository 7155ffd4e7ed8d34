"""Shared helpers: tiny random Video-XL configs built in the test, and the parity fixture's location."""

import os
from pathlib import Path

import pytest
import torch

from scripts.local_import import REPO_ROOT, VideoXLConfig, VideoXLForCausalLM


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


@pytest.fixture(scope="session")
def parity_dir() -> Path:
    if not (PARITY_DIR / "model" / "config.json").is_file():
        pytest.fail(f"parity fixtures not found at {PARITY_DIR} (set VIDEOXL_PARITY_DIR)")
    return PARITY_DIR
