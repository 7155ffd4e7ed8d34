"""Every script the READMEs show runs both ways they can be typed: as a file and as a module."""

import os
import subprocess
import sys

import pytest

from scripts.local_import import REPO_ROOT

SCRIPTS = [
    "scripts/needle_eval.py",
    "scripts/train_tiny.py",
    "scripts/finetune.py",
    "scripts/convert_original_checkpoint.py",
    "demo/run.py",
    "demo/live.py",
    "benchmarks/prefill.py",
]

pytestmark = pytest.mark.slow  # starts processes: `make test-all`


def test_every_shown_script_runs_as_a_file_from_anywhere_and_as_a_module(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    runs = {}
    for script in SCRIPTS:
        module = script.removesuffix(".py").replace("/", ".")
        # A file from another folder: only the script's own location can make the repo importable.
        runs[f"python {script}"] = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / script), "--help"], cwd=tmp_path, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        runs[f"python -m {module}"] = subprocess.Popen(
            [sys.executable, "-m", module, "--help"], cwd=REPO_ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
    failures = []
    for command, run in runs.items():
        out, err = run.communicate(timeout=300)
        if run.returncode != 0 or "usage:" not in out:
            failures.append(f"{command} --help: exit {run.returncode}\n{err[-600:]}")
    assert not failures, "\n\n".join(failures)
