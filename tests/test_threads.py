"""One cache shared by several threads: every public entry that changes it (chat, generate, forward, crop,
rewind, align, restore, save, LiveVideo) holds the cache's lock, so concurrent calls run one at a time and answer
exactly as the same calls made one after another."""

import threading
import time

import pytest
import torch

from demo.qa import load
from demo.run import BUNDLED_MODEL
from demo.synth import format_question, make_sample
from tests.conftest import random_frames, tiny_model, video_prompt


FRAMES = 20
QUESTIONS = [
    format_question("What colour was the star that appeared in the video?", ["red", "blue", "green", "cyan"]),
    format_question("What shape appeared in the video?", ["star", "circle", "square", "triangle"]),
    "What colour was the star?",
]
ANSWER = dict(max_new_tokens=6, num_frames=FRAMES)


def ask(video, question):
    return [{"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": question}]}]


def run_threads(targets, timeout=600):
    """Run each callable on its own thread; (their results, the exceptions raised)."""
    results, errors = [None] * len(targets), []

    def run(i):
        try:
            results[i] = targets[i]()
        except BaseException as err:  # reported, not lost with the thread
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(targets))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads), "a thread did not finish"
    return results, errors


def test_chat_from_several_threads_on_one_cache_answers_as_sequential_calls():
    model, processor = load(BUNDLED_MODEL)
    frames = list(make_sample(4242, FRAMES, "retrieval", depth=50.0, attribute="colour", digit_prob=0.0).frames)
    _, cache = model.chat(processor, ask(frames, QUESTIONS[0]), **ANSWER)
    sequential = {q: model.chat(processor, ask(frames, q), cache=cache, **ANSWER)[0] for q in QUESTIONS}
    orders = [QUESTIONS, QUESTIONS[::-1], QUESTIONS[1:] + QUESTIONS[:1]]

    def conversation(order):
        return lambda: [(q, model.chat(processor, ask(frames, q), cache=cache, **ANSWER)[0]) for q in order]

    results, errors = run_threads([conversation(order) for order in orders])
    assert errors == []
    assert [answer for result in results for answer in result] == [(q, sequential[q]) for o in orders for q in o]
    assert cache.record.digests[model.config.video_token_id].shape[1] == FRAMES  # one video, encoded once


def test_generate_from_several_threads_on_one_cache_answers_as_sequential_calls():
    model, ids = tiny_model(), video_prompt(6, suffix=())
    with torch.no_grad():
        cache = model(ids, pixel_values_videos=random_frames(6)).cache
    questions = [torch.cat([ids, torch.tensor([[13 + i, 20 + i, 30]])], dim=1) for i in range(4)]

    def answer(question):
        return model.generate(question, cache=cache, max_new_tokens=5, do_sample=False)[0].tolist()

    sequential = [answer(q) for q in questions]
    results, errors = run_threads([lambda q=q: [answer(q) for _ in range(3)] for q in questions])
    assert errors == []
    assert results == [[expected] * 3 for expected in sequential]


def test_cache_operations_wait_for_a_call_in_progress(tmp_path):
    model, ids = tiny_model(), video_prompt(2)
    with torch.no_grad():
        cache = model(ids, pixel_values_videos=random_frames(2)).cache
    rows = cache.get_seq_length()
    operations = {
        "save": lambda: cache.save(tmp_path / "memory.safetensors"),
        "crop": lambda: cache.crop(-1),
        "rewind": lambda: cache.rewind(cache.record.absorbed_length),
        "restore": lambda: cache.restore(cache.checkpoint()),
        "align": lambda: cache.align(torch.cat([ids, torch.tensor([[13]])], dim=1)),
        "forward": lambda: model(torch.tensor([[13]]), cache=cache),
    }
    for name, operation in operations.items():
        done = threading.Event()
        with cache.lock:  # another thread's call is writing the cache
            worker = threading.Thread(target=lambda: (operation(), done.set()))
            worker.start()
            assert not done.wait(0.3), f"{name} ran while another thread held the cache"
            assert cache.get_seq_length() == rows
        worker.join(60)
        assert done.is_set(), name
        rows = cache.get_seq_length()


def test_live_video_uses_the_caches_lock():
    model, processor = load(BUNDLED_MODEL)
    live = model.live(processor)
    assert live.lock is live.cache.lock
