"""Video-XL through the released lmms-eval (`make test-eval`, in `.venv-eval`): the offline tasks give the answers
the repo's own harness gives, with the video memory reused or not, in batches, in two processes; option likelihoods
equal a fresh full prompt's; the Video-MME stand-in goes through lmms-eval's videomme scoring; a bad video is one
error naming the doc and the file, and the run goes on.

Tiny on purpose (the bundled demo model, 10-frame videos, a few docs): the point is equivalence, not accuracy.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from loguru import logger

from demo.qa import answer_letter as harness_answer_letter
from lmms_eval.evaluator import simple_evaluate
from lmms_eval.tasks import TaskManager
from lmms_eval_videoxl.tasks.needle import answer_letter
from lmms_eval_videoxl.videoxl import VideoXL
from scripts.local_import import REPO_ROOT
from scripts.needle_eval import evaluate as needle_evaluate
from scripts.write_eval_data import KINDS, needle_trial_args, write_needle, write_videomme

MODEL = str(REPO_ROOT / "demo" / "model")
FRAMES, DEPTHS, SAMPLES = [10], [50.0], 2  # 2 questions of each kind: 6 docs, 6 videos


@pytest.fixture(scope="module")
def needle_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("needle")
    write_needle(out, FRAMES, DEPTHS, SAMPLES, seed=0)
    return out


@pytest.fixture(scope="module")
def harness():
    """The model and processor as scripts/needle_eval.py loads them."""
    from demo.qa import load

    return load(MODEL)


@pytest.fixture(scope="module")
def harness_replies(harness) -> list[str]:
    """What scripts/needle_eval.py answers on the same samples (in-memory frames, `model.generate`), doc order."""
    model, processor = harness
    replies = []
    for kind in KINDS:
        args = needle_trial_args(FRAMES, DEPTHS, SAMPLES, 0, kind)
        args = argparse.Namespace(**vars(args), haystack=None, ratio=None, model=MODEL, quiet=True)
        replies += [result["reply"] for result in needle_evaluate(model, processor, args)["results"]]
    return replies


def read_docs(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "videoxl_needle.jsonl").read_text().splitlines()]


def write_docs(folder: Path, docs: list[dict], like: Path) -> Path:
    """A variant of the needle data set in `folder` (same task YAML)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "videoxl_needle.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    for yaml in like.glob("*.yaml"):
        (folder / yaml.name).write_text(yaml.read_text())
    return folder


def videoxl(**model_args) -> VideoXL:
    return VideoXL(pretrained=MODEL, fps=1, dtype="float32", device="cpu", **model_args)


def run_tasks(lm: VideoXL, tasks: list[str], include_path: Path) -> dict:
    return simple_evaluate(
        model=lm, tasks=tasks, log_samples=True, batch_size=lm.batch_size,
        task_manager=TaskManager(include_path=str(include_path), include_defaults=False),
    )


def replies_by_doc(results: dict, task: str) -> list:
    samples = sorted(results["samples"][task], key=lambda sample: sample["doc_id"])
    return [sample["filtered_resps"][0] if isinstance(sample["filtered_resps"], list) else sample["filtered_resps"]
            for sample in samples]


@pytest.mark.parametrize("reuse_memory, batch_size", [(True, 1), (True, 4), (False, 1), (False, 4)])
def test_needle_task_answers_as_the_harness(needle_dir, harness_replies, tmp_path, reuse_memory, batch_size):
    """Every question is asked twice (the data set, then again): with reuse the second asking is answered from the
    kept memory (after the first question was rewound) and is still the harness's answer."""
    docs = read_docs(needle_dir)
    twice = write_docs(tmp_path / "twice", docs + [{**doc, "id": doc["id"] + len(docs)} for doc in docs], needle_dir)
    lm = videoxl(reuse_memory=reuse_memory, batch_size=batch_size)
    results = run_tasks(lm, ["videoxl_needle"], twice)
    assert replies_by_doc(results, "videoxl_needle") == harness_replies * 2
    assert lm.videos_encoded == len(docs) * (1 if reuse_memory else 2)
    hits = [answer_letter(reply, doc["options"]) == doc["answer"] for reply, doc in zip(harness_replies, docs)]
    assert results["results"]["videoxl_needle"]["accuracy,none"] == pytest.approx(sum(hits) / len(hits))


def test_task_scoring_reads_replies_as_the_harness(harness_replies, needle_dir):
    docs = read_docs(needle_dir)
    for reply, doc in zip(harness_replies + ["B", "the answer is C", "nonsense"], docs + docs[:3]):
        assert answer_letter(reply, doc["options"]) == harness_answer_letter(reply, doc["question"])


def fresh_option_logprob(model, processor, doc: dict, option: str) -> float:
    """log P(option | prompt) from one full prompt (video decoded and encoded again), computed here."""
    messages = [{"role": "user", "content": [{"type": "video", "path": doc["video"]},
                                             {"type": "text", "text": doc["question"]}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    short = processor(text=prompt, videos=[doc["video"]], fps=1, return_tensors="pt")
    whole = processor(text=prompt + option, videos=[doc["video"]], fps=1, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=whole["input_ids"], pixel_values_videos=whole["pixel_values_videos"]).logits
    start = short["input_ids"].shape[1]
    logprobs = torch.log_softmax(logits[0, start - 1 : -1].float(), dim=-1)
    return float(logprobs.gather(1, whole["input_ids"][0, start:, None]).sum())


@pytest.mark.parametrize("reuse_memory", [True, False])
def test_option_likelihoods_equal_a_fresh_full_prompt(needle_dir, harness, reuse_memory):
    lm = videoxl(reuse_memory=reuse_memory)
    # Both tasks in one run: each video is encoded once, for whichever request type lmms-eval runs first; the
    # likelihoods are then scored on (or build) memories that also hold a question and an answer after the video.
    results = run_tasks(lm, ["videoxl_needle_choice", "videoxl_needle"], needle_dir)
    docs = read_docs(needle_dir)
    assert lm.videos_encoded == (len(docs) if reuse_memory else 5 * len(docs))  # 4 options and 1 answer each
    samples = sorted(results["samples"]["videoxl_needle_choice"], key=lambda sample: sample["doc_id"])
    for sample, doc in zip(samples, docs):
        scored = [float(resp[0][0]) for resp in sample["resps"]]
        expected = [fresh_option_logprob(*harness, doc, option) for option in doc["options"]]
        assert scored == pytest.approx(expected, abs=1e-4), doc["id"]
    assert 0.0 <= results["results"]["videoxl_needle_choice"]["acc,none"] <= 1.0


def test_two_processes_answer_as_one(needle_dir, harness_replies, tmp_path):
    """`accelerate launch --num_processes 2` splits the docs the way lmms-eval does; per doc the answers are the
    one-process answers (the harness's). On CPU: torchrun-style processes (`--multi_gpu`) that accelerate runs as
    MULTI_CPU over gloo when ACCELERATE_USE_CPU is set (its `--cpu` flag alone starts one process)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_HOME": str(tmp_path / "hf"), "ACCELERATE_USE_CPU": "true", "CUDA_VISIBLE_DEVICES": ""}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "-m", "lmms_eval", "--model", "videoxl",
        "--model_args", f"pretrained={MODEL},fps=1,dtype=float32,device=cpu",
        "--tasks", "videoxl_needle", "--include_path", str(needle_dir), "--batch_size", "1",
        "--log_samples", "--output_path", str(tmp_path / "out"),
    ]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (samples_file,) = (tmp_path / "out").rglob("*_samples_videoxl_needle.jsonl")
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert [s["filtered_resps"] if isinstance(s["filtered_resps"], str) else s["filtered_resps"][0]
            for s in samples] == harness_replies
    assert "Running on rank 1" in run.stdout + run.stderr


def test_videomme_standin_goes_through_lmms_evals_videomme_scoring(tmp_path, monkeypatch):
    out = tmp_path / "videomme"
    docs = write_videomme(out, videos=2, frames=8, seed=0)
    monkeypatch.setenv("HF_HOME", str(out))  # where lmms-eval's videomme code looks for videomme/data/<id>.mp4
    answers, logged = {}, []
    sink = logger.add(lambda message: logged.append(str(message)), level="INFO")
    try:
        for reuse in (True, False):
            lm = videoxl(reuse_memory=reuse)
            results = run_tasks(lm, ["videomme_standin"], out)
            answers[reuse] = [s["resps"] for s in sorted(results["samples"]["videomme_standin"],
                                                        key=lambda s: s["doc_id"])]
            assert lm.videos_encoded == (2 if reuse else len(docs))
    finally:
        logger.remove(sink)
    assert answers[True] == answers[False]
    # videomme's aggregation wrote its per-category tables, and its overall figure is the task's score.
    log = "".join(logged)
    for task_type in ("Attribute Perception", "Object Recognition", "Spatial Perception"):
        assert f"Evaluation on Task Categories: {task_type}:" in log
    score = results["results"]["videomme_standin"]["videomme_perception_score,none"]
    assert f"Overall Performance: {score: .1f}%" in log


def test_missing_or_undecodable_video_is_one_error_and_the_run_goes_on(needle_dir, tmp_path):
    docs = read_docs(needle_dir)[:3]
    (tmp_path / "garbage.mkv").write_bytes(b"not a video at all" * 100)
    docs[0]["video"] = str(tmp_path / "missing.mkv")
    docs[1]["video"] = str(tmp_path / "garbage.mkv")
    bad = write_docs(tmp_path / "bad", docs, needle_dir)
    errors = []
    sink = logger.add(lambda message: errors.append(str(message)), level="ERROR")
    try:
        lm = videoxl()
        results = run_tasks(lm, ["videoxl_needle"], bad)
    finally:
        logger.remove(sink)
    replies = replies_by_doc(results, "videoxl_needle")
    assert replies[:2] == ["", ""] and replies[2] != ""
    ours = [e for e in errors if "videoxl" in e]
    assert len(ours) == 2
    by_doc = {doc_id: [e for e in ours if f"doc {doc_id}:" in e] for doc_id in (0, 1)}
    assert len(by_doc[0]) == 1 and "missing.mkv" in by_doc[0][0]
    assert len(by_doc[1]) == 1 and "garbage.mkv" in by_doc[1][0]
    assert "Traceback" not in "".join(ours)
    assert sorted(doc_id for _, doc_id, _ in lm.failed_docs) == [0, 1]


def test_multi_round_follow_ups_equal_the_whole_conversation_asked_fresh(needle_dir, harness):
    """`generate_until_multi_round`: round 2 is a `model.chat` follow-up on round 1's cache; it equals asking the
    whole conversation (question, answer, follow-up) with no cache."""
    from lmms_eval.api.instance import Instance

    doc = read_docs(needle_dir)[0]
    follow_up = read_docs(needle_dir)[1]["question"]

    def doc_to_text(doc, previous_output, round_idx, previous_round_info):
        return None, follow_up, round_idx >= 2, previous_output, previous_round_info

    lm = videoxl()
    lm.task_dict = {"needle": {"test": [doc]}}
    request = Instance(
        request_type="generate_until_multi_round",
        arguments=(doc["question"], {"max_new_tokens": 4}, lambda d: [d["video"]], doc_to_text, 0, "needle", "test"),
        idx=0, metadata={"task": "needle", "doc_id": 0, "repeats": 1},
    )
    (rounds,) = lm.generate_until_multi_round([request])
    assert len(rounds) == 2
    model, processor = harness
    video = {"type": "video", "path": doc["video"]}
    first, _ = model.chat(processor, [{"role": "user", "content": [video, {"type": "text", "text": doc["question"]}]}],
                          fps=1, max_new_tokens=4)
    conversation = [
        {"role": "user", "content": [video, {"type": "text", "text": doc["question"]}]},
        {"role": "assistant", "content": [{"type": "text", "text": first}]},
        {"role": "user", "content": [{"type": "text", "text": follow_up}]},
    ]
    second, _ = model.chat(processor, conversation, fps=1, max_new_tokens=4)
    assert rounds == [first, second]
