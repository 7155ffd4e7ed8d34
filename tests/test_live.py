"""Live video: frames fed one by one, a window at a time, answer as one prompt holding the same frames does."""

import threading

import numpy as np
import pytest
import torch

from demo.qa import load
from demo.run import BUNDLED_MODEL
from demo.synth import make_sample, write_video
from scripts.local_import import session

read_live_frames = session.read_live_frames

QUESTION = "What colour was the star?"


@pytest.fixture(scope="module")
def demo():
    return load(BUNDLED_MODEL)


@pytest.fixture(scope="module")
def frames():
    return list(make_sample(99, 27, "retrieval", depth=40.0, attribute="colour", digit_prob=0.0).frames)


def one_prompt_answer(model, processor, frames, question, **kwargs):
    messages = [{"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": question}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt", num_frames=len(frames))
    output = model.generate(**inputs, max_new_tokens=6, do_sample=False, **kwargs)
    return inputs["input_ids"], processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:],
                                                           skip_special_tokens=True).strip()


def test_live_ingestion_then_a_question_equals_the_same_frames_as_one_prompt(demo, frames):
    model, processor = demo
    live = model.live(processor)
    window = live.frames_per_window
    head_rows = live.cache.get_seq_length()
    for n, frame in enumerate(frames, start=1):
        live.feed(frame, timestamp=float(n - 1))
        if n in (7, 20, 27):  # inside the first window, at a window's end, and with 7 frames pending
            state = (live.cache.get_seq_length(), live.cache.record.absorbed_length)
            answer = live.ask(QUESTION, max_new_tokens=6)
            ids, expected = one_prompt_answer(model, processor, frames[:n], QUESTION)
            assert answer == expected
            assert torch.equal(live.prompt_ids(QUESTION), ids)
            assert (live.cache.get_seq_length(), live.cache.record.absorbed_length) == state  # the question left no trace
        # Memory grows by the kept VSTs of finished windows; at most a window's frames wait as pixels.
        vsts = (n // window) * window * model.config.tokens_per_frame // model.config.beacon_ratio
        assert live.cache.get_seq_length() == head_rows + vsts and len(live.pending) == n % window
    assert live.cache.record.media[0]["frames"] == 20 and live.cache.record.media[0]["timestamps"] == [float(i) for i in range(20)]


def test_compression_ratio_passes_through_live_sessions(demo, frames):
    model, processor = demo
    live = model.live(processor, compression_ratio=8)
    live.feed_all(frames[:12])
    _, expected = one_prompt_answer(model, processor, frames[:12], QUESTION, compression_ratio=8)
    assert live.ask(QUESTION, max_new_tokens=6) == expected
    assert live.cache.record.ratios == [8]


def test_questions_can_be_asked_while_another_thread_feeds(demo, frames):
    model, processor = demo
    live = model.live(processor)
    feeder = threading.Thread(target=live.feed_all, args=(frames,))
    feeder.start()
    answers = [live.ask(QUESTION, max_new_tokens=3) for _ in range(3)]
    feeder.join()
    assert all(isinstance(a, str) for a in answers)
    assert live.frames == len(frames) and len(live.pending) == len(frames) % live.frames_per_window
    assert live.ask(QUESTION, max_new_tokens=6) == one_prompt_answer(model, processor, frames, QUESTION)[1]


def test_a_video_file_read_as_a_live_stream_samples_frames_by_time(demo, frames, tmp_path):
    model, processor = demo
    path = tmp_path / "clip.mp4"
    write_video(np.stack(frames[:12]), path, fps=4.0)  # 3 s of video
    sampled = list(read_live_frames(str(path), fps=2.0))
    assert [t for t, _ in sampled] == pytest.approx([0.0, 0.5, 1.0, 1.5, 2.0, 2.5])
    assert sampled[0][1].shape == frames[0].shape and sampled[0][1].dtype == np.uint8
    live = model.live(processor)
    live.follow(str(path), fps=2.0)
    assert live.frames == 6 and live.cache.record.media[0]["timestamps"] == []  # no window finished yet
    with pytest.raises(ValueError, match="fps must be positive"):
        list(read_live_frames(str(path), fps=0))


@pytest.mark.slow
def test_the_live_demo_runs(tmp_path):
    import subprocess
    import sys

    from scripts.local_import import REPO_ROOT

    result = subprocess.run([sys.executable, "-m", "demo.live", "--frames", "24", "--pace", "100"], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path)})
    assert result.stdout.count("->") == 2 and "fed 24 frames" in result.stdout
