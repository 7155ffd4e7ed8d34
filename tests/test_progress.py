"""Progress of long work, the transformers way: video decoding and the windowed prefill draw transformers' tqdm bars
once they run long enough (tqdm's `delay`), and `disable_progress_bar()` silences them."""

import numpy as np
import pytest
import torch
from transformers.utils import logging as transformers_logging

from demo.synth import write_video
from scripts.local_import import modeling, video_decoding
from tests.conftest import random_frames, tiny_model, video_prompt

FRAMES = 12  # three windows of four frames in the tiny config


@pytest.fixture
def bars_at_once(monkeypatch):
    """Every bar drawn from the start, as if the work were long."""
    monkeypatch.setattr(modeling, "PROGRESS_DELAY_SECONDS", 0)
    monkeypatch.setattr(video_decoding(), "PROGRESS_DELAY_SECONDS", 0)
    yield
    transformers_logging.enable_progress_bar()


@pytest.fixture(scope="module")
def video_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    frames = np.random.default_rng(0).integers(0, 255, (20, 48, 64, 3), dtype=np.uint8)
    write_video(frames, path, fps=5)
    return path


def decode(path, num_frames: int = 8):
    decoding = video_decoding()
    return decoding.read_video_frames(path, decoding.VideoSampling(num_frames=num_frames), lambda image: image)


def prefill(model):
    with torch.no_grad():
        model.model(video_prompt(FRAMES), pixel_values_videos=random_frames(FRAMES))


def test_decoding_reports_each_frame_and_is_silenced_by_disable_progress_bar(video_file, bars_at_once, capsys):
    decode(video_file)
    err = capsys.readouterr().err
    assert "Decoding video frames: 100%" in err and "8/8" in err
    transformers_logging.disable_progress_bar()
    decode(video_file)
    assert capsys.readouterr().err == ""


def test_decoding_shorter_than_the_delay_draws_no_bar(video_file, capsys, monkeypatch):
    monkeypatch.setattr(video_decoding(), "PROGRESS_DELAY_SECONDS", 3600)  # the machine's speed must not matter
    decode(video_file)
    assert "Decoding" not in capsys.readouterr().err


def test_the_prefill_reports_its_windows_and_is_silenced_by_disable_progress_bar(bars_at_once, capsys):
    model = tiny_model()
    prefill(model)
    err = capsys.readouterr().err
    assert "Encoding video windows: 100%" in err and "3/3" in err
    transformers_logging.disable_progress_bar()
    prefill(model)
    assert capsys.readouterr().err == ""


def test_no_window_bar_for_training_text_steps_or_short_prefills(bars_at_once, capsys):
    model = tiny_model()
    with torch.no_grad():
        model.model(torch.tensor([[4, 10, 11, 12]]))  # text only: a decoding step has no windows
    assert capsys.readouterr().err == ""
    model.train()
    model.model(video_prompt(FRAMES), pixel_values_videos=random_frames(FRAMES))  # Trainer draws its own bar
    assert capsys.readouterr().err == ""


def test_a_prefill_shorter_than_the_delay_draws_no_bar(capsys, monkeypatch):
    monkeypatch.setattr(modeling, "PROGRESS_DELAY_SECONDS", 3600)
    prefill(tiny_model())
    assert "Encoding" not in capsys.readouterr().err
