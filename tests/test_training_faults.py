"""scripts/finetune.py under faults: a run killed with SIGKILL and resumed from its last complete checkpoint ends
where the uninterrupted run ends; a bad dataset (bad JSON, missing or unreadable media, a sample with nothing to
learn) stops the run before training with one error naming the line; a diverging run stops at its first non-finite
loss or gradient and never saves non-finite weights; a checkpoint that cannot be written (a full disk) is removed and
the last good one stays usable."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoProcessor, TrainerCallback

from scripts import finetune
from scripts.collator import check_dataset
from scripts.local_import import REPO_ROOT
from tests.test_training import subprocess_env, write_dataset, write_tiny_model


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> SimpleNamespace:
    folder = tmp_path_factory.mktemp("faults")
    return SimpleNamespace(folder=folder, model=write_tiny_model(folder), data=write_dataset(folder))


def options(assets, output: Path, *more: str) -> list[str]:
    """Random ratios per window, shuffled data, AdamW with warm-up and cosine decay: all state a resume must restore."""
    return ["--model", str(assets.model), "--data", str(assets.data), "--output_dir", str(output), "--max_steps", "24",
            "--save_steps", "2", "--learning_rate", "1e-2", "--warmup_steps", "0.1", "--seed", "3",
            "--report_to", "none", *more]


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    start = time.monotonic()
    while not path.exists():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() - start < timeout
        time.sleep(0.02)


def test_run_killed_with_sigkill_resumes_from_its_last_checkpoint_to_the_same_weights(assets, tmp_path):
    torch.set_num_threads(1)  # as in the subprocess: the same kernels, the same bits
    straight = finetune.main(options(assets, tmp_path / "straight")).model.state_dict()

    killed = tmp_path / "killed"
    script = [sys.executable, str(REPO_ROOT / "scripts" / "finetune.py")]
    run = subprocess.Popen([*script, *options(assets, killed)], cwd=tmp_path, env=subprocess_env(tmp_path),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(killed / "checkpoint-6" / "trainer_state.json", run)
    run.send_signal(signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL
    assert not (killed / "model.safetensors").exists() and not (killed / "checkpoint-24").exists()
    steps = sorted(int(path.name.split("-")[1]) for path in killed.glob("checkpoint-*"))
    assert 6 <= steps[-1] < 24

    subprocess.run([*script, *options(assets, killed, "--resume_from_checkpoint", "last")], check=True, cwd=tmp_path,
                   env=subprocess_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resumed = load_file(killed / "model.safetensors")
    assert resumed.keys() == straight.keys()
    for name, weight in straight.items():
        assert torch.equal(resumed[name], weight), name  # bitwise on CPU
    assert not torch.equal(resumed["lm_head.weight"], load_file(assets.model / "model.safetensors")["lm_head.weight"])


def test_resume_from_last_skips_a_checkpoint_cut_short(tmp_path):
    for step, state in ((2, "{}"), (4, '{"global_step": 4'), (6, None)):  # 4: killed mid-write; 6: before the state
        (tmp_path / f"checkpoint-{step}").mkdir()
        if state is not None:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert finetune.last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint in"):
        finetune.last_complete_checkpoint(tmp_path / "checkpoint-6")


# ---- the dataset is checked before training --------------------------------------------------------------------------


def corrupt(assets, tmp_path: Path, line: int, text: str) -> Path:
    """The assets' data with one line replaced, in tmp_path (media paths made absolute)."""
    lines = [json.dumps(sample) for sample in map(json.loads, assets.data.read_text().splitlines())]
    lines = [l.replace('"clip', f'"{assets.folder}/clip') for l in lines]
    lines[line - 1] = text
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_on(assets, data: Path, tmp_path: Path, *more: str):
    return finetune.main(["--model", str(assets.model), "--data", str(data), "--output_dir", str(tmp_path / "out"),
                          "--max_steps", "1", "--report_to", "none", *more])


def test_a_malformed_line_stops_the_run_before_training_naming_it(assets, tmp_path):
    data = corrupt(assets, tmp_path, 2, '{"video": "clip1.mp4", "conversations": [')
    with pytest.raises(ValueError, match=rf"^{re.escape(str(data))}:2: not valid JSON \(Expecting value at column 42\)$"):
        run_on(assets, data, tmp_path)
    assert not (tmp_path / "out").exists()
    data = corrupt(assets, tmp_path, 3, '["a list"]')
    with pytest.raises(ValueError, match=rf"^{re.escape(str(data))}:3: a sample must be a JSON object with a 'conversations' list"):
        run_on(assets, data, tmp_path)
    data = corrupt(assets, tmp_path, 1, '{"conversations": [{"from": "robot", "value": "hi"}]}')
    with pytest.raises(ValueError, match=rf"^{re.escape(str(data))}:1: unknown role in turn"):
        run_on(assets, data, tmp_path)


def test_a_missing_media_file_stops_the_run_before_training_naming_it(assets, tmp_path):
    sample = {"video": "gone.mp4", "conversations": [{"from": "human", "value": "<video>\nWhat?"},
                                                     {"from": "gpt", "value": "red"}]}
    data = corrupt(assets, tmp_path, 3, json.dumps(sample))
    with pytest.raises(FileNotFoundError, match=rf"^{re.escape(str(data))}:3: video file not found: {re.escape(str(tmp_path / 'gone.mp4'))}$"):
        run_on(assets, data, tmp_path)
    assert not (tmp_path / "out").exists()
    (tmp_path / "gone.mp4").write_text("not a video")  # present but unreadable: its header is read (fps sampling)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(data))}:3: a media file cannot be read"):
        run_on(assets, data, tmp_path, "--max-length", "100000")


def test_a_sample_over_max_length_stops_the_run_before_training_naming_it(assets, tmp_path):
    processor = AutoProcessor.from_pretrained(assets.model, trust_remote_code=True)
    collator_lengths = []
    for sample in check_dataset(assets.data, processor):
        batch = finetune.VideoXLCollator(processor)([sample])
        collator_lengths.append(batch["input_ids"].shape[1])
    longest = max(collator_lengths)  # the 12-frame video, line 2
    assert collator_lengths.index(longest) == 1
    run_on(assets, assets.data, tmp_path / "fits", "--max-length", str(longest))  # the count is exact
    with pytest.raises(ValueError, match=rf"^{re.escape(str(assets.data))}:2: the sample has {longest} tokens, more than "
                                         rf"max_length={longest - 1}"):
        run_on(assets, assets.data, tmp_path, "--max-length", str(longest - 1))
    assert not (tmp_path / "out").exists()


def test_checking_the_dataset_runs_no_video_through_the_processor(assets, monkeypatch):
    """Only each video's first frame is decoded (`probe_video`), never the sampled frames."""
    processor = AutoProcessor.from_pretrained(assets.model, trust_remote_code=True)
    call = type(processor).__call__

    def refuse_videos(self, *args, videos=None, **kwargs):
        assert videos is None, "a video was decoded"
        return call(self, *args, **kwargs)

    monkeypatch.setattr(type(processor), "__call__", refuse_videos)
    for sampling in ({}, {"num_frames": 6}, {"fps": 5.0, "max_frames": 4}):
        samples = check_dataset(assets.data, processor, sampling, max_length=10_000)
        assert len(samples) == 3


# ---- issue 29: diverging runs, samples with nothing to learn, unreadable media, a full disk --------------------------


def test_a_diverging_run_stops_at_the_first_non_finite_loss_naming_step_and_samples(assets, tmp_path):
    """A learning rate of 1e9: Trainer alone logs `loss 0, grad_norm nan`, exits 0 and saves NaN weights."""
    data = assets.data
    with pytest.raises(finetune.NonFiniteTrainingError) as caught:
        run_on(assets, data, tmp_path, "--max_steps", "6", "--learning_rate", "1e9", "--warmup_steps", "0",
               "--save_steps", "1", "--seed", "0")
    message = str(caught.value)
    step = int(re.match(r"training stopped at step (\d+): ", message).group(1))
    assert re.fullmatch(
        rf"training stopped at step {step}: (the loss is nan on {re.escape(str(data))}:[123]|the gradients of \d+ of "
        rf"\d+ trainable tensors are not finite \(first: [\w.]+\), from {re.escape(str(data))}:[123])\. Nothing of "
        r"this step was applied and no checkpoint holds it; the learning rate was [\d.e+]+: lower it \(or check these "
        r"samples\) and resume from the last checkpoint", message), message
    saved = sorted((tmp_path / "out").glob("checkpoint-*"))
    assert [path.name for path in saved] == [f"checkpoint-{n}" for n in range(1, step)]  # none holds the bad step
    for path in saved:
        assert all(torch.isfinite(t).all() for t in load_file(path / "model.safetensors").values())
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_a_gradient_that_is_not_finite_stops_the_step_before_the_optimizer(assets, tmp_path, monkeypatch):
    """A finite loss whose backward overflows: the step is refused before `optimizer.step`."""
    applied = []

    class PoisonGradients(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:
                next(p for p in model.parameters() if p.grad is not None).grad[0] = float("inf")

        def on_optimizer_step(self, args, state, control, **kwargs):
            applied.append(state.global_step)

    build = finetune.build_trainer

    def with_poison(*args):
        trainer = build(*args)
        trainer.callback_handler.callbacks.insert(0, PoisonGradients())  # before the check
        return trainer

    monkeypatch.setattr(finetune, "build_trainer", with_poison)
    with pytest.raises(finetune.NonFiniteTrainingError, match=r"^training stopped at step 2: the gradients of 1 of "
                                                              r"\d+ trainable tensors are not finite \(first: "):
        run_on(assets, assets.data, tmp_path, "--max_steps", "4", "--save_steps", "1")
    assert applied == [0]  # step 1 was applied, step 2 was not
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-1"]


def test_non_finite_weights_are_never_saved(assets, tmp_path, monkeypatch):
    class PoisonWeights(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:
                with torch.no_grad():
                    model.lm_head.weight[0, 0] = float("nan")

    build = finetune.build_trainer

    def with_poison(*args):
        trainer = build(*args)
        trainer.add_callback(PoisonWeights())
        return trainer

    monkeypatch.setattr(finetune, "build_trainer", with_poison)
    with pytest.raises(finetune.NonFiniteTrainingError,
                       match=rf"^refusing to save {re.escape(str(tmp_path / 'out' / 'checkpoint-2'))}: 1 weight "
                             r"tensors are not finite \(first: lm_head\.weight\)"):
        run_on(assets, assets.data, tmp_path, "--max_steps", "3", "--save_steps", "1")
    assert sorted(p.name for p in (tmp_path / "out").glob("checkpoint-*")) == ["checkpoint-1"]


def test_a_sample_with_no_assistant_turn_is_refused_before_training(assets, tmp_path, processor):
    sample = {"video": "clip0.mp4", "conversations": [{"from": "human", "value": "<video>\nWhat?"}]}
    data = corrupt(assets, tmp_path, 2, json.dumps(sample))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(data))}:2: the sample has no assistant turn: nothing to "
                                         r"learn from \(only assistant answers are labelled\)"):
        run_on(assets, data, tmp_path)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=r"^the sample has no assistant turn"):  # the collator refuses it too
        finetune.VideoXLCollator(processor)([{"conversations": [{"from": "human", "value": "hi"}]}])


@pytest.fixture(scope="module")
def processor(assets):
    return AutoProcessor.from_pretrained(assets.model, trust_remote_code=True)


def test_media_that_cannot_be_opened_is_refused_before_training_naming_the_line(assets, tmp_path, processor):
    clip = (assets.folder / "clip1.mp4").read_bytes()
    (tmp_path / "cut.mp4").write_bytes(clip[: len(clip) // 2])  # its index (at the end) is gone
    (tmp_path / "text.mp4").write_text("not a video")
    (tmp_path / "garbled.mp4").write_bytes(clip[:48] + bytes(len(clip) - 96) + clip[-48:])
    cases = {
        str(tmp_path / "cut.mp4"): "cannot be read as a video",
        str(tmp_path / "text.mp4"): "cannot be read as a video",
        str(tmp_path / "garbled.mp4"): "cannot be read as a video",
        "file:///etc/passwd": "cannot be read as a video",
        "ftp://127.0.0.1/clip.mp4": "unsupported URL scheme 'ftp'",
        "concat:a.mp4|b.mp4": "unsupported URL scheme 'concat'",
    }
    for video, error in cases.items():
        sample = {"video": video, "conversations": [{"from": "human", "value": "<video>\nWhat?"},
                                                    {"from": "gpt", "value": "red"}]}
        data = corrupt(assets, tmp_path, 3, json.dumps(sample))
        with pytest.raises(ValueError, match=rf"^{re.escape(str(data))}:3: a media file cannot be read \(.*{error}"):
            run_on(assets, data, tmp_path)
        assert not (tmp_path / "out").exists()
    sample["video"] = f"file://{assets.folder}/clip1.mp4"  # a file:// URL to a video is fine
    assert len(check_dataset(corrupt(assets, tmp_path, 3, json.dumps(sample)), processor)) == 3


def test_a_full_disk_while_checkpointing_keeps_the_last_good_checkpoint_and_says_so(assets, tmp_path):
    """`ulimit -f` in the subprocess: model.safetensors (200 kB) fits, optimizer.pt (400 kB) does not."""
    out = tmp_path / "out"
    run_on(assets, assets.data, tmp_path, "--max_steps", "2", "--save_steps", "2", "--learning_rate", "1e-3")
    good = load_file(out / "checkpoint-2" / "model.safetensors")
    limit = 300_000
    assert (out / "checkpoint-2" / "model.safetensors").stat().st_size < limit < \
        (out / "checkpoint-2" / "optimizer.pt").stat().st_size

    def limit_file_size():
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    script = [sys.executable, str(REPO_ROOT / "scripts" / "finetune.py")]
    result = subprocess.run(
        [*script, "--model", str(assets.model), "--data", str(assets.data), "--output_dir", str(out),
         "--max_steps", "4", "--save_steps", "2", "--learning_rate", "1e-3", "--report_to", "none", "--resume_from_checkpoint", "last"],
        cwd=tmp_path, env=subprocess_env(tmp_path), capture_output=True, text=True, preexec_fn=limit_file_size,
        timeout=600)
    errors = [line for line in result.stderr.splitlines() if line.startswith("CheckpointWriteError: ")]
    assert result.returncode == 1 and len(errors) == 1, result.stderr[-3000:]
    error = errors[0]
    assert re.fullmatch(
        rf"CheckpointWriteError: cannot write {re.escape(str(out / 'checkpoint-4'))}: the disk is "
        rf"full or a file reached its size limit \(\d+ MiB free on {re.escape(str(out))}(/checkpoint-4)?; ulimit -f: "
        rf"{limit} bytes; RuntimeError: .*\)\. The partial checkpoint was removed; the last complete checkpoint is "
        rf"{re.escape(str(out / 'checkpoint-2'))} \(free space and resume with --resume_from_checkpoint last\)",
        error), error
    assert not (out / "checkpoint-4").exists()
    assert finetune.last_complete_checkpoint(out) == str(out / "checkpoint-2")
    kept = load_file(out / "checkpoint-2" / "model.safetensors")
    assert all(torch.equal(kept[name], good[name]) for name in good)
    assert torch.load(out / "checkpoint-2" / "optimizer.pt", weights_only=True)["state"]
