"""The config refuses, at construction, every field the model cannot run with: one line naming each bad field and
what it expects (a bad window or ratio would otherwise fail at first use, or worse, compress nothing silently)."""

import json

import pytest
from transformers import AutoConfig

from scripts.local_import import REPO_ROOT, VideoXLConfig
from tests.conftest import tiny_config


def problems_of(**fields) -> list[str]:
    with pytest.raises(ValueError) as caught:
        tiny_config(**fields)
    head, *lines = str(caught.value).split("\n")
    assert head == "invalid VideoXLConfig:"
    return lines


# The tiny config: 112 px / 14 px patches = 8x8 grid, 2x2 pool -> 16 tokens a frame, windows of 64 tokens: ratios must
# divide gcd(64, 16) = 16.
ALLOWED = "one of [1, 2, 4, 8, 16]"


@pytest.mark.parametrize("window", [-160, 0])
def test_a_window_that_is_not_positive_is_refused(window):
    assert problems_of(beacon_window=window) == [
        f"- beacon_window must be a positive number of visual tokens per compression window (1440 = 10 frames of "
        f"144), got {window}"]


@pytest.mark.parametrize("ratio", [0, -1, 3, 32])
def test_a_default_ratio_that_does_not_divide_window_and_frame_is_refused(ratio):
    assert problems_of(beacon_ratio=ratio) == [
        f"- beacon_ratio must divide both the window of 64 tokens and a frame of 16 tokens: {ALLOWED}, got {ratio}"]


def test_training_ratios_must_be_listed_and_each_divide_window_and_frame():
    assert problems_of(beacon_train_ratios=[]) == [
        "- beacon_train_ratios must list at least one ratio to draw in training (each must divide both the window of "
        f"64 tokens and a frame of 16 tokens: {ALLOWED}), got []"]
    assert problems_of(beacon_train_ratios=[2, 0, 3]) == [
        "- beacon_train_ratios: each ratio must divide both the window of 64 tokens and a frame of 16 tokens: "
        f"{ALLOWED}; [0, 3] do not"]


@pytest.mark.parametrize("stride", [0, 9])
def test_a_pool_stride_outside_the_patch_grid_is_refused(stride):
    assert problems_of(spatial_pool_stride=stride) == [
        f"- spatial_pool_stride must be an integer from 1 to the patch grid's side 8 (image_size 112 / patch_size 14), "
        f"got {stride}"]


def test_other_fields_are_checked_too():
    assert problems_of(vision_feature_layer=-4) == [
        "- vision_feature_layer must index the vision tower's 3 hidden states (from -3 to 2), got -4"]
    assert problems_of(projector_hidden_act="nope") == [
        "- projector_hidden_act must be one of transformers' activations (e.g. 'gelu'), got 'nope'"]
    assert problems_of(beacon_param=["q", "o"]) == ["- beacon_param may only name 'q', 'k' and 'v', got ['o']"]
    assert problems_of(video_token_id=301) == [
        "- image_token_id and video_token_id must differ (images and videos are told apart by their tokens), both "
        "are 301"]


def test_every_bad_field_is_named_in_one_error():
    lines = problems_of(beacon_window=0, spatial_pool_stride=0, projector_hidden_act="nope", image_token_id=-1)
    assert [line.split(" ")[1] for line in lines] == [
        "spatial_pool_stride", "beacon_window", "projector_hidden_act", "image_token_id"]


def test_a_window_that_cuts_frames_is_valid_and_narrows_the_ratios():
    """Windows need not hold whole frames (the model cuts a frame across two windows); the ratios must then divide
    the gcd of window and frame."""
    assert tiny_config(beacon_window=40, beacon_ratio=8, beacon_train_ratios=[2, 8]).beacon_window == 40
    assert problems_of(beacon_window=40, beacon_ratio=8, beacon_train_ratios=[4, 16]) == [
        "- beacon_train_ratios: each ratio must divide both the window of 40 tokens and a frame of 16 tokens: one of "
        "[1, 2, 4, 8]; [16] do not"]


def test_a_bad_config_json_is_refused_when_loaded(tmp_path):
    config = json.loads((REPO_ROOT / "config.json").read_text())
    for name in ("configuration_videoxl.py", "compat_videoxl.py"):
        (tmp_path / name).write_text((REPO_ROOT / name).read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "beacon_window": -160}))
    with pytest.raises(ValueError, match=r"- beacon_window must be a positive number .* got -160$"):
        AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)


def test_the_released_and_the_parity_configs_load(converted_parity):
    released = AutoConfig.from_pretrained(REPO_ROOT, trust_remote_code=True)
    assert (released.beacon_window, released.beacon_ratio, released.tokens_per_frame) == (1440, 8, 144)
    assert VideoXLConfig().to_dict()["beacon_train_ratios"] == [2, 4, 8]
    converted = AutoConfig.from_pretrained(converted_parity, trust_remote_code=True)
    assert converted.beacon_window == 1440 and converted.beacon_train_ratios
