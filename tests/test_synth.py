"""Tests of the synthetic needle videos (demo/synth.py) and the tiny tokenizer."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from demo import synth
from demo.build_tiny_tokenizer import IMAGE, UNK, VIDEO, build_tiny_tokenizer
from demo.synth import ATTRIBUTES, COLOURS, KINDS, LETTERS, make_sample

# Small frames keep the many-seed tests fast; the question logic does not depend on size.
SMALL = {"height": 48, "width": 64}
QUESTION_RE = re.compile(
    r"^(?P<prompt>[^\n]+\?)\nA\. [^\n]+\nB\. [^\n]+\nC\. [^\n]+\nD\. [^\n]+\n"
    + re.escape(synth.ANSWER_INSTRUCTION)
    + "$"
)


def chroma(pixels: np.ndarray) -> np.ndarray:
    """Max minus min over RGB, per pixel: 0 for greys, ~200+ for the vivid needle colours."""
    return pixels.max(-1).astype(int) - pixels.min(-1).astype(int)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_sample_and_other_seed_differs(kind):
    a = make_sample(7, 12, kind)
    b = make_sample(7, 12, kind)
    c = make_sample(8, 12, kind)
    assert a.frames.dtype == np.uint8 and a.frames.shape == (12, 240, 320, 3)
    assert np.array_equal(a.frames, b.frames)
    assert (a.question, a.answer, a.needle_frames) == (b.question, b.answer, b.needle_frames)
    assert not np.array_equal(a.frames, c.frames)


@pytest.mark.parametrize("haystack", list(synth.HAYSTACKS))
def test_haystacks_move_and_stay_muted(haystack):
    frames, name = synth.make_haystack(3, 16, kind=haystack)
    assert name == haystack and frames.shape == (16, 240, 320, 3)
    assert np.abs(np.diff(frames.astype(np.int16), axis=0)).mean() > 0.5  # not a still image
    assert frames.std() > 5  # not a flat colour
    assert chroma(frames).max() < synth.MAX_HAYSTACK_CHROMA


def test_needle_colours_are_far_more_vivid_than_any_haystack():
    vivid = chroma(np.array(list(COLOURS.values()), np.uint8))
    assert vivid.min() > 2 * synth.MAX_HAYSTACK_CHROMA


@pytest.mark.parametrize("kind", KINDS)
def test_needle_changes_only_needle_frames_and_control_keeps_question(kind):
    with_needle = make_sample(11, 16, kind, distractors=1)
    control = make_sample(11, 16, kind, needle=False, distractors=1)
    changed = np.flatnonzero(np.any(with_needle.frames != control.frames, axis=(1, 2, 3)))
    assert changed.tolist() == with_needle.needle_frames
    assert control.needle_frames == [] and control.planned_needle_frames == changed.tolist()
    assert (control.question, control.options, control.answer) == (
        with_needle.question, with_needle.options, with_needle.answer,
    )
    for needle in with_needle.needles + with_needle.distractors:
        x0, y0, size = needle.box
        patch = with_needle.frames[needle.frames[0], y0 : y0 + size, x0 : x0 + size]
        assert (chroma(patch) > 150).mean() > 0.12  # a large vivid object, not a dot


def test_haystack_does_not_depend_on_question_kind():
    frames = [make_sample(5, 10, kind, needle=False).frames for kind in KINDS]
    assert all(np.array_equal(frames[0], f) for f in frames[1:])


@pytest.mark.parametrize("depth,frame", [(0, 0), (100, 39), (50, 20), (25, 10), (75, 29)])
def test_depth_maps_to_frame_index(depth, frame):
    sample = make_sample(2, 40, "retrieval", depth, **SMALL)
    assert sample.needle_frames == [frame] == [synth.depth_to_frame(depth, 40)]


def test_needle_run_and_depth_clamped_to_fit():
    sample = make_sample(4, 20, "retrieval", 100, needle_len=3, **SMALL)
    assert sample.needle_frames == [17, 18, 19]
    with pytest.raises(ValueError):
        make_sample(4, 10, "counting", count=4, needle_len=3, **SMALL)


def test_needles_sit_in_their_quadrant_of_the_centre_crop():
    for seed in range(40):
        for needle in make_sample(seed, 8, "counting", count=4).needles:
            x0, y0, size = needle.box
            cx, cy = x0 + size / 2 - 40, y0 + size / 2  # into the central 240x240 square
            assert 40 <= x0 and x0 + size <= 280 and 0 <= y0 and y0 + size <= 240
            assert size >= 72  # >= ~100 px after resizing to 336: several 28 px tokens
            expected = ("bottom " if cy >= 120 else "top ") + ("right" if cx >= 120 else "left")
            assert needle.position == expected


@pytest.mark.parametrize("attribute", ATTRIBUTES)
def test_retrieval_answer_is_the_needles_attribute(attribute):
    for seed in range(30):
        s = make_sample(seed, 6, "retrieval", attribute=attribute, **SMALL)
        (needle,) = s.needles
        assert s.attribute == attribute and QUESTION_RE.match(s.question)
        assert s.answer_text == getattr(needle, attribute)
        assert len(set(s.options)) == 4


def test_ordering_answer_is_the_first_or_last_needle():
    for seed in range(60):
        s = make_sample(seed, 10, "ordering", **SMALL)
        first, last = sorted(s.needles, key=lambda n: n.frames[0])
        target = first if "first" in s.prompt else last
        assert QUESTION_RE.match(s.question) and len(set(s.options)) == 4
        assert s.answer_text == target.describe()
        assert {first.describe(), last.describe()} <= set(s.options)


def test_counting_answer_is_the_number_of_needles():
    seen = set()
    for seed in range(60):
        s = make_sample(seed, 10, "counting", **SMALL)
        assert QUESTION_RE.match(s.question) and sorted(s.options) == ["1", "2", "3", "4"]
        assert s.answer_text == str(len(s.needles)) == str(len(s.needle_frames))
        assert len({n.describe() for n in s.needles}) == 1
        seen.add(len(s.needles))
    assert seen == {1, 2, 3, 4}


def test_appearances_count_runs_in_the_frames_shown():
    red = synth.Needle("red", "circle", None, "top left", (10,), (0, 0, 8))
    red_again = synth.Needle("red", "circle", None, "top left", (11,), (0, 0, 8))
    red_later = synth.Needle("red", "circle", None, "top left", (12,), (0, 0, 8))
    assert synth.appearances([red, red_again], range(20)) == {"red circle": 1}  # touching runs play as one
    assert synth.appearances([red, red_later], range(20)) == {"red circle": 2}
    assert synth.appearances([red, red_later], [0, 10, 12]) == {"red circle": 1}  # the frame between is not shown
    assert synth.appearances([red], [0, 5, 15]) == {"red circle": 0}


def test_place_runs_keeps_the_gap_and_refuses_what_breaks_it():
    rng = np.random.default_rng(0)
    for _ in range(200):
        starts = sorted(synth.place_runs(rng, 4, 7, 1, gap=1))
        assert starts == [0, 2, 4, 6]  # the only way 4 runs fit 7 frames a frame apart
    with pytest.raises(ValueError, match="do not fit"):
        synth.place_runs(rng, 4, 6, 1, gap=1)
    with pytest.raises(ValueError, match="closer than 1"):
        synth.place_runs(rng, 2, 20, 1, fixed=[5, 6], gap=1)
    assert sorted(synth.place_runs(rng, 2, 20, 1, fixed=[5, 6])) == [5, 6]  # no gap asked: touching is allowed


@pytest.mark.parametrize("frames", [20, 40, 100])
def test_counting_and_ordering_have_one_answer_in_the_frames_the_model_sees(frames):
    """Every counted copy is its own appearance, and each ordered object one, in the frames the demo and the needle
    suite sample (`num_frames` = all of them) and training samples (`fps=1` of a 1 fps video): the same frames."""
    from scripts.local_import import video_decoding

    decoding = video_decoding()
    shown = [decoding.uniform_indices(frames, frames), decoding.fps_indices(np.arange(frames, dtype=float), 1.0)]
    for seed in range(400 if frames == 20 else 100):
        counting = make_sample(seed, frames, "counting", **SMALL)
        ordering = make_sample(seed, frames, "ordering", distractors=1, **SMALL)
        for indices in shown:
            assert synth.appearances(counting.needles, indices) == {counting.needles[0].describe(): len(counting.needles)}
            assert set(synth.appearances(ordering.needles, indices).values()) == {1}


def test_tour_questions_each_have_one_answer():
    """A appears 2-4 times in one quadrant, B once before or after all of A, a frame between any two appearances;
    the other object's colour or shape is never an option of a colour or shape question."""
    for seed in range(60):
        tour = synth.make_tour(seed, 20, **SMALL)
        a, b = tour.needles[0], tour.needles[-1]
        copies = [n for n in tour.needles if n.describe() == a.describe()]
        times = synth.appearances(tour.needles, range(20))
        assert times == {a.describe(): len(copies), b.describe(): 1} and 2 <= len(copies) <= 4
        assert a.colour != b.colour and a.shape != b.shape and len({n.position for n in copies}) == 1
        assert all(b.frames[0] < n.frames[0] for n in copies) or all(b.frames[0] > n.frames[0] for n in copies)
        by_name = {q.name: q for q in tour.questions}
        assert list(by_name) == ["colour", "shape", "quadrant", "ordering", "counting"]
        assert by_name["colour"].answer_text == a.colour and b.colour not in by_name["colour"].options
        assert by_name["shape"].answer_text == b.shape and a.shape not in by_name["shape"].options
        assert by_name["quadrant"].answer_text == a.position
        first = min(tour.needles, key=lambda n: n.frames[0]).describe()
        last = max(tour.needles, key=lambda n: n.frames[0]).describe()
        ordering = by_name["ordering"]
        assert ordering.answer_text == (first if "first" in ordering.question else last)
        assert by_name["counting"].answer_text == str(len(copies))
        for q in tour.questions:
            assert QUESTION_RE.match(q.question) and len(set(q.options)) == 4


def test_distractors_never_share_colour_or_shape_with_the_question():
    for seed in range(30):
        s = make_sample(seed, 10, KINDS[seed % 3], distractors=2, **SMALL)
        words = set(" ".join([s.prompt, *s.options, *(n.describe() for n in s.needles)]).split())
        for d in s.distractors:
            assert d.colour not in words and d.shape not in words
        assert len(set(s.needle_frames)) == len(s.needle_frames)  # no shared frames


def test_answer_letters_are_balanced():
    counts = Counter(make_sample(seed, 7, KINDS[seed % 3], **SMALL).answer for seed in range(400))
    assert set(counts) == set(LETTERS)
    assert all(70 <= n <= 130 for n in counts.values()), counts  # 100 expected each


def test_mp4_round_trip_keeps_frame_count_and_content(tmp_path):
    sample = make_sample(3, 12, "retrieval")
    path = tmp_path / "x.mp4"
    codec = synth.write_video(sample.frames, path, fps=10)
    decoded = synth.read_video(path)
    assert codec in ("libx264", "mpeg4")
    assert decoded.shape == sample.frames.shape
    assert np.abs(decoded.astype(int) - sample.frames.astype(int)).mean() < 6


def test_conversation_shapes():
    sample = make_sample(1, 4, **SMALL)
    user, assistant = synth.to_conversation(sample, "v.mp4", with_answer=True)
    assert user == {
        "role": "user",
        "content": [{"type": "video", "video": "v.mp4"}, {"type": "text", "text": sample.question}],
    }
    assert assistant == {"role": "assistant", "content": [{"type": "text", "text": sample.answer}]}
    assert len(synth.to_conversation(sample, "v.mp4")) == 1


def test_cli_writes_video_and_prints_answer(tmp_path, capsys):
    out = tmp_path / "cli.mp4"
    synth.main(["--seed", "3", "--frames", "8", "--kind", "counting", "--out", str(out)])
    text = capsys.readouterr().out
    assert out.stat().st_size > 0 and synth.read_video(out).shape[0] == 8
    assert re.search(r"^answer: [ABCD] \(", text, re.M)


def test_tokenizer_special_tokens_are_single_ids(tokenizer):
    ids = tokenizer.convert_tokens_to_ids([IMAGE, VIDEO, "<|im_start|>", "<|im_end|>"])
    assert len(set(ids)) == 4 and tokenizer.unk_token_id not in ids
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.encode("<video>\n", add_special_tokens=False) == [ids[1], tokenizer.encode(
        "\n", add_special_tokens=False)[0]]
    assert len(tokenizer) < 1000


def test_tokenizer_covers_200_seeds_and_round_trips(tokenizer):
    unk = tokenizer.convert_tokens_to_ids(UNK)
    for seed in range(200):
        s = make_sample(seed, 7, KINDS[seed % 3], **SMALL)
        messages = synth.to_conversation(s, "v.mp4", with_answer=True)
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        assert text.startswith(
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
            "<|im_start|>user\n<video>\n" + s.question + "<|im_end|>\n<|im_start|>assistant\n"
        )
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert unk not in ids, tokenizer.convert_ids_to_tokens(ids)
        assert tokenizer.decode(ids) == text
        answer_ids = tokenizer.encode(s.answer, add_special_tokens=False)
        assert len(answer_ids) == 1 and tokenizer.decode(answer_ids) == s.answer
