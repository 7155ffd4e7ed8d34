"""The shipped tiny model end to end: processor + model + compressed memory answer fresh needle questions."""

import subprocess
import sys

import pytest

from demo.qa import answer_letter, ask, load
from demo.run import BUNDLED_MODEL, QUESTIONS, tour
from demo.synth import COLOURS, COUNTS, POSITIONS, SHAPES, format_question, make_sample
from scripts.local_import import CODE_FILES, REPO_ROOT

FRESH_SEED = 777  # never used in training (its seeds start at 500,000)


@pytest.fixture(scope="module")
def tiny():
    return load(BUNDLED_MODEL)


def test_shipped_model_loads_offline_with_the_repos_code():
    for name in CODE_FILES:
        assert (BUNDLED_MODEL / name).resolve() == (REPO_ROOT / name).resolve(), f"{name} must link to the repo's"
    size = sum(path.stat().st_size for path in BUNDLED_MODEL.iterdir() if path.is_file() and not path.is_symlink())
    assert size < 25e6


def test_shipped_model_answers_with_an_option_through_compressed_memory(tiny):
    """The mechanics: a fresh needle video through the processor, compressed at r = 16, answered with an option."""
    model, processor = tiny
    sample = make_sample(FRESH_SEED, 40, "retrieval", depth=50.0, attribute="colour", digit_prob=0.0)
    reply = ask(model, processor, sample.frames, sample.question, ratio=16, max_new_tokens=6, fps=1.0, video_fps=1.0)
    assert answer_letter(reply.text, sample.question) in tuple("ABCD")
    assert reply.frames == 40 and reply.visual_tokens == 40 * 16
    assert reply.kept < reply.visual_tokens // 4  # 40 VSTs + about 60 text tokens, not 640 visual tokens


# Of 8 fresh questions of each kind at r = 16, how many the shipped model must get right (README, "The bundled tiny
# model", has its measured accuracy; chance is 2 of 8, and 5 or more by chance happens under 3 % of the time).
EARNED = {"colour": 6, "shape": 6, "quadrant": 7, "ordering": 5, "counting": 5}  # it gets 7, 7, 8, 6 and 6 here


@pytest.mark.parametrize("name", EARNED)
def test_shipped_model_answers_fresh_questions_of_the_kinds_it_has_learned(tiny, name):
    """8 fresh questions (seeds below the training range), single-frame needles, 10-200 frames (ordering and counting:
    20-100), depths 0-100 %."""
    model, processor = tiny
    kind, attribute = QUESTIONS[name]
    frame_counts = (10, 40, 100, 200) if kind == "retrieval" else (20, 40, 100)
    hits = []
    for i in range(8):
        frames, depth = frame_counts[i % len(frame_counts)], 100.0 * (i % 5) / 4
        sample = make_sample(FRESH_SEED * 100 + i, frames, kind, depth=depth, attribute=attribute, digit_prob=0.0)
        reply = ask(model, processor, sample.frames, sample.question, ratio=16, max_new_tokens=4, fps=1.0,
                    video_fps=1.0)
        hits.append(answer_letter(reply.text, sample.question) == sample.answer)
    assert sum(hits) >= EARNED[name], f"{name}: {sum(hits)}/8 correct"


# What an answer of each kind looks like: the questions ask for the option's text (synth.ANSWER_INSTRUCTION).
ANSWER_FORMS = {
    ("retrieval", "colour"): set(COLOURS),
    ("retrieval", "shape"): set(SHAPES),
    ("retrieval", "position"): set(POSITIONS),
    ("ordering", None): {f"{colour} {shape}" for colour in COLOURS for shape in SHAPES},
    ("counting", None): set(COUNTS),
}


@pytest.mark.parametrize("kind,attribute", ANSWER_FORMS)
def test_shipped_model_answers_every_kind_in_the_form_the_question_asks(tiny, kind, attribute):
    """A fresh question of every kind gets the text of an answer of that kind, never a letter (README: which kinds
    it answers correctly)."""
    model, processor = tiny
    for i in range(3):
        sample = make_sample(FRESH_SEED * 10 + i, (10, 40, 100)[i] + 10 * (kind != "retrieval"), kind,
                             attribute=attribute, digit_prob=0.0)
        reply = ask(model, processor, sample.frames, sample.question, ratio=16, max_new_tokens=4, fps=1.0,
                    video_fps=1.0)
        assert reply.text.strip() in ANSWER_FORMS[kind, attribute], f"{kind}/{attribute}: {reply.text!r}"


def test_a_reply_is_scored_by_its_letter_or_by_the_option_it_names():
    question = format_question("What colour was the star that appeared in the video?", ["red", "blue", "top left", "cyan"])
    assert answer_letter("B", question) == "B"
    assert answer_letter("The answer is C.", question) == "C"
    assert answer_letter("blue", question) == "B"
    assert answer_letter(" Top  left.\n", question) == "C"
    assert answer_letter("purple", question) is None
    assert answer_letter("blue") is None  # no options to match against


def run_demo(tmp_path, *args: str) -> str:
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "demo.run", "--frames", "20", "--seed", "5", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, check=True, env=env).stdout


def test_make_demo_command_tours_one_memory(tmp_path):
    out = run_demo(tmp_path)
    for name in QUESTIONS:
        assert f"{name}: " in out
    assert out.count("truth") == len(QUESTIONS) + 1  # every kind, then once more from the saved memory
    assert "kept positions" in out and "MB" in out and "loaded the memory from the file" in out


def test_make_demo_single_question_form_runs(tmp_path):
    out = run_demo(tmp_path, "--kind", "counting")
    assert "question:" in out and "answer:" in out and "truth:" in out
    assert "memory positions" in out


def test_tour_encodes_the_video_once_and_answers_from_the_saved_memory(tiny, tmp_path, monkeypatch):
    """Every question after the first is answered from the kept memory (the vision tower runs during the first
    question only), and the memory loaded from its file gives the first question's answer again."""
    model, processor = tiny
    asked = []
    encoded_during = []
    chat = model.chat

    def counting_chat(*args, **kwargs):
        asked.append(1)
        return chat(*args, **kwargs)

    monkeypatch.setattr(model, "chat", counting_chat)
    hook = model.model.vision_tower.register_forward_hook(lambda *_: encoded_during.append(len(asked)))
    try:
        records = tour(model, processor, seed=5, frames=20, ratio=16, out_dir=tmp_path)
    finally:
        hook.remove()
    assert [r["question"] for r in records] == [*QUESTIONS, "colour"]
    assert encoded_during and set(encoded_during) == {1}
    assert records[-1]["from_file"] and records[-1]["answer"] == records[0]["answer"]
