"""scripts/finetune.py under faults: a run killed with SIGKILL and resumed from its last complete checkpoint ends
where the uninterrupted run ends; a bad dataset stops the run before training with one error naming the line."""

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
from transformers import AutoProcessor

from scripts import finetune
from scripts.collator import check_dataset
from scripts.local_import import REPO_ROOT
from tests.test_training import subprocess_env, write_dataset, write_tiny_model


pytestmark = pytest.mark.slow  # starts processes: `make test-all`


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


def test_checking_the_dataset_decodes_no_video(assets, monkeypatch):
    processor = AutoProcessor.from_pretrained(assets.model, trust_remote_code=True)
    call = type(processor).__call__

    def refuse_videos(self, *args, videos=None, **kwargs):
        assert videos is None, "a video was decoded"
        return call(self, *args, **kwargs)

    monkeypatch.setattr(type(processor), "__call__", refuse_videos)
    for sampling in ({}, {"num_frames": 6}, {"fps": 5.0, "max_frames": 4}):
        samples = check_dataset(assets.data, processor, sampling, max_length=10_000)
        assert len(samples) == 3
