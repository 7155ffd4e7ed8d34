"""`model.chat` with a reused cache answers as a fresh full prompt does, without decoding the video again.

The shipped demo model (4 layers, its own tiny tokenizer and processor) runs the conversations in fp32, greedy.
"""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from demo.qa import load
from demo.run import BUNDLED_MODEL
from demo.synth import format_question, make_sample, write_video

FRAMES = 20  # two windows of 10 frames at the demo config
QUESTIONS = [
    format_question("What colour was the star that appeared in the video?", ["red", "blue", "green", "cyan"]),
    format_question("What shape appeared in the video?", ["star", "circle", "square", "triangle"]),
    "What colour was the star?",
    format_question("Where did the shape appear?", ["top left", "top right", "bottom left", "bottom right"]),
    "What happened?",
]
ANSWER = dict(max_new_tokens=6, num_frames=FRAMES)


@pytest.fixture(scope="module")
def demo():
    return load(BUNDLED_MODEL)


@pytest.fixture(scope="module")
def frames():
    return list(make_sample(4242, FRAMES, "retrieval", depth=50.0, attribute="colour", digit_prob=0.0).frames)


def ask(video, question):
    return [{"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": question}]}]


class CountingProcessor:
    """The demo processor, counting the videos and images it is asked to decode."""

    def __init__(self, processor):
        self.processor, self.videos, self.images = processor, 0, 0

    def __getattr__(self, name):
        return getattr(self.processor, name)

    def __call__(self, *args, videos=None, images=None, **kwargs):
        self.videos += len(videos or [])
        self.images += len(images or [])
        return self.processor(*args, videos=videos, images=images, **kwargs)


@pytest.mark.parametrize("order", [[0, 1, 2, 3, 4], [3, 0, 4, 2, 1]])
def test_questions_from_a_reused_cache_equal_fresh_prompts_and_decode_the_video_once(demo, frames, order):
    model, processor = demo
    counting = CountingProcessor(processor)
    cache, lengths = None, []
    for i in order:
        reused, cache = model.chat(counting, ask(frames, QUESTIONS[i]), cache=cache, **ANSWER)
        fresh, _ = model.chat(processor, ask(frames, QUESTIONS[i]), **ANSWER)
        assert reused == fresh, QUESTIONS[i]
        lengths.append(cache.get_seq_length() - cache.compressed_rows)
    assert counting.videos == 1
    # Ask-many rewinds the text after the video memory: the memory holds one video, never a copy per question.
    assert cache.record.ratios == [16, 16] and cache.record.digests[model.config.video_token_id].shape[1] == FRAMES
    assert max(lengths) < 100


def test_compression_ratio_and_generate_options_pass_through(demo, frames):
    model, processor = demo
    options = dict(num_frames=FRAMES, compression_ratio=8, max_new_tokens=4, repetition_penalty=1.3)
    _, cache = model.chat(processor, ask(frames, QUESTIONS[0]), **options)
    assert cache.record.ratios == [8, 8] and cache.record.absorbed_length == cache.record.absorbed_ids.shape[1]
    reused, cache = model.chat(processor, ask(frames, QUESTIONS[1]), cache=cache, **options)
    assert reused == model.chat(processor, ask(frames, QUESTIONS[1]), **options)[0]


def test_a_follow_up_keeps_the_earlier_question_and_answer_and_equals_the_whole_conversation(demo, frames):
    model, processor = demo
    first, cache = model.chat(processor, ask(frames, QUESTIONS[0]), **ANSWER)
    conversation = ask(frames, QUESTIONS[0]) + [
        {"role": "assistant", "content": first},
        {"role": "user", "content": [{"type": "text", "text": QUESTIONS[1]}]},
    ]
    before = cache.record.absorbed_length
    follow_up, cache = model.chat(processor, conversation, cache=cache, **ANSWER)
    from_scratch, scratch_cache = model.chat(processor, conversation, **ANSWER)
    assert follow_up == from_scratch
    assert cache.record.absorbed_length == scratch_cache.record.absorbed_length > before
    assert torch.equal(cache.record.absorbed_ids, scratch_cache.record.absorbed_ids)
    conversation += [{"role": "assistant", "content": follow_up},
                     {"role": "user", "content": [{"type": "text", "text": QUESTIONS[2]}]}]
    third, cache = model.chat(processor, conversation, cache=cache, **ANSWER)
    assert third == model.chat(processor, conversation, **ANSWER)[0]


def test_chat_equals_the_processor_and_generate_path(demo, frames):
    model, processor = demo
    answer, cache = model.chat(processor, ask(frames, QUESTIONS[0]), **ANSWER)
    inputs = processor.apply_chat_template(ask(frames, QUESTIONS[0]), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt", num_frames=FRAMES)
    output = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    prompt = inputs["input_ids"].shape[1]
    assert answer == processor.tokenizer.decode(output[0, prompt:], skip_special_tokens=True).strip()
    assert torch.equal(cache.record.absorbed_ids[:, :prompt], inputs["input_ids"])


def test_the_lower_level_path_prefix_then_generate_with_the_cache(demo, frames):
    """model(**prefix_inputs) once, then generate(whole prompt, cache=...) per question: only the question runs."""
    model, processor = demo
    prefix = processor(text="<|im_start|>user\n<video>\n", videos=[frames], num_frames=FRAMES, return_tensors="pt")
    with torch.no_grad():
        cache = model(**prefix).cache
    for question in QUESTIONS[:2]:
        full = processor(text=f"<|im_start|>user\n<video>\n{question}<|im_end|>\n<|im_start|>assistant\n",
                         videos=[frames], num_frames=FRAMES, return_tensors="pt")
        fresh = model.generate(**full, max_new_tokens=6, do_sample=False)
        reused = model.generate(**full, cache=cache, max_new_tokens=6, do_sample=False)
        assert reused.tolist() == fresh.tolist()
        cache.rewind(prefix["input_ids"].shape[1])  # back to the video for the next question


def test_images_and_text_only_conversations_reuse_their_cache(demo):
    model, processor = demo
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (300, 200, 3), dtype=np.uint8))
    counting = CountingProcessor(processor)
    cache = None
    for question in QUESTIONS[:3]:
        messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
        reused, cache = model.chat(counting, messages, cache=cache, max_new_tokens=5)
        assert reused == model.chat(processor, messages, max_new_tokens=5)[0]
    assert counting.images == 1
    cache = None
    for question in QUESTIONS[:3]:
        messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": question}]
        reused, cache = model.chat(processor, messages, cache=cache, max_new_tokens=5)
        assert reused == model.chat(processor, messages, max_new_tokens=5)[0]


def test_a_video_file_is_recognised_by_path_and_a_changed_file_is_not_reused(demo, frames, tmp_path):
    model, processor = demo
    path = tmp_path / "clip.mp4"
    write_video(np.stack(frames), path, fps=1.0)
    counting = CountingProcessor(processor)
    _, cache = model.chat(counting, ask(str(path), QUESTIONS[0]), **ANSWER)
    second, cache = model.chat(counting, ask(str(path), QUESTIONS[1]), cache=cache, **ANSWER)
    assert counting.videos == 1 and second == model.chat(processor, ask(str(path), QUESTIONS[1]), **ANSWER)[0]
    write_video(np.stack(frames[::-1]), path, fps=1.0)
    with pytest.raises(ValueError, match="not the one the cache encoded"):
        model.chat(processor, ask(str(path), QUESTIONS[1]), cache=cache, **ANSWER)


def test_chat_takes_its_answer_length_from_the_generation_config(demo, frames, monkeypatch):
    model, processor = demo
    messages = ask(frames, QUESTIONS[0])
    monkeypatch.setattr(model.generation_config, "max_new_tokens", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the library's "model-agnostic default max_length" warning
        answer, cache = model.chat(processor, messages, num_frames=FRAMES)
    assert answer == model.chat(processor, messages, num_frames=FRAMES, max_new_tokens=1)[0]
    assert len(processor.tokenizer(answer, add_special_tokens=False)["input_ids"]) <= 1
    monkeypatch.setattr(model.generation_config, "max_new_tokens", None)  # none set: chat's own default, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        answer = model.chat(processor, messages, num_frames=FRAMES)[0]
    assert answer == model.chat(processor, messages, num_frames=FRAMES, max_new_tokens=1024)[0]


def test_misused_caches_are_refused(demo, frames):
    model, processor = demo
    _, cache = model.chat(processor, ask(frames, QUESTIONS[0]), **ANSWER)
    other = frames[::-1]
    with pytest.raises(ValueError, match="not the one the cache encoded"):
        model.chat(processor, ask(other, QUESTIONS[0]), cache=cache, **ANSWER)
    # the same video, other frames: the message names the sampling options that differ
    with pytest.raises(ValueError, match=r"is the one the cache encoded, but sampled with other options "
                                         r"\(num_frames=20 in the cache, 10 now"):
        model.chat(processor, ask(frames, QUESTIONS[0]), cache=cache, max_new_tokens=6, num_frames=10)
    with pytest.raises(ValueError, match=r"num_frames=20 in the cache, None now; None: the processor's default"):
        model.chat(processor, ask(frames, QUESTIONS[0]), cache=cache, max_new_tokens=6)
    with pytest.raises(ValueError, match="compressed at ratio"):
        model.chat(processor, ask(frames, QUESTIONS[0]), cache=cache, compression_ratio=8, **ANSWER)
    with pytest.raises(ValueError, match="only 0"):
        model.chat(processor, [{"role": "user", "content": "hello"}], cache=cache, max_new_tokens=3)
    earlier_text = [{"role": "system", "content": "Another system prompt."}] + ask(frames, QUESTIONS[0])
    with pytest.raises(ValueError, match="inside its compressed memory"):
        model.chat(processor, earlier_text, cache=cache, **ANSWER)


FRESH_PROCESS = """
import sys
from demo.qa import load
from demo.run import BUNDLED_MODEL
from demo.synth import make_sample
from scripts.local_import import BeaconCache
model, processor = load(BUNDLED_MODEL)
frames = list(make_sample(4242, 20, "retrieval", depth=50.0, attribute="colour", digit_prob=0.0).frames)
cache = BeaconCache.load(sys.argv[1])
messages = [{"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": sys.argv[2]}]}]
answer, cache = model.chat(processor, messages, cache=cache, max_new_tokens=6, num_frames=20)
print(repr(answer))
"""


@pytest.mark.slow
def test_a_saved_conversation_answers_the_same_in_a_fresh_process(demo, frames, tmp_path):
    import subprocess
    import sys

    from scripts.local_import import REPO_ROOT

    model, processor = demo
    _, cache = model.chat(processor, ask(frames, QUESTIONS[0]), **ANSWER)
    cache.save(tmp_path / "memory.safetensors")
    here, _ = model.chat(processor, ask(frames, QUESTIONS[2]), **ANSWER)
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(tmp_path / "memory.safetensors"), QUESTIONS[2]],
                            cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == repr(here)


@pytest.mark.slow
def test_the_sessions_benchmark_runs_on_the_tiny_preset(tmp_path):
    import json
    import subprocess
    import sys

    from scripts.local_import import REPO_ROOT

    out = tmp_path / "sessions.json"
    subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "sessions.py"), "--size", "tiny", "--frames", "8",
                    "--questions", "3", "--new-tokens", "2", "--threads", "1", "--json", str(out)],
                   cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=300)
    [record] = json.loads(out.read_text())
    assert record["frames"] == 8 and len(record["q_next_s_all"]) == 2
    assert record["growth_rows"] == 0 and record["cache_after_q1"]["rows"] == 14 + 8 * 16 // 8 + 12 + 1  # r = 8, one token generated
    assert record["file_bytes"] > record["cache_after_last"]["kv_bytes"]
