"""Every script's command line: help that lists each flag and default once, and scripts that run as files.

The help of every script is built in this process from the script's `build_parser()`; one subprocess runs each
script as a file from another folder (only the script's own location can make the repo importable there).
"""

import argparse
import importlib
import os
import re
import subprocess
import sys

import pytest

from scripts.local_import import REPO_ROOT

SCRIPTS = [
    "scripts/build_tokenizer.py",
    "scripts/convert_original_checkpoint.py",
    "scripts/finetune.py",
    "scripts/needle_eval.py",
    "scripts/train_tiny.py",
    "benchmarks/batch.py",
    "benchmarks/prefill.py",
    "benchmarks/quantization.py",
    "benchmarks/sessions.py",
    "benchmarks/train_memory.py",
    "benchmarks/video_decode.py",
    "demo/build_tiny_tokenizer.py",
    "demo/live.py",
    "demo/run.py",
    "demo/synth.py",
]
WIDTH = 100  # COLUMNS: the terminal width argparse wraps to
FINETUNE_PROJECT_LINES = 40  # `finetune.py --help` before the Trainer's options: one screen

pytestmark = pytest.mark.slow  # starts processes: `make test-all`


def module_name(script: str) -> str:
    return script.removesuffix(".py").replace("/", ".")


@pytest.fixture(scope="module", autouse=True)
def terminal_width():
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(WIDTH)
    yield
    if previous is None:
        del os.environ["COLUMNS"]
    else:
        os.environ["COLUMNS"] = previous


def shown_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.help != argparse.SUPPRESS]


def option_entries(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each shown option's entry in the help (from its first flag to the next entry), keyed by its first flag."""
    text = parser.format_help()
    starts = []
    for action in shown_actions(parser):
        if action.option_strings:
            match = re.search(rf"^  {re.escape(action.option_strings[0])}\b", text, flags=re.MULTILINE)
            assert match, f"{action.option_strings[0]} is not in the help"
            starts.append((match.start(), action.option_strings[0]))
    starts.sort()
    ends = [s for s, _ in starts[1:]] + [len(text)]
    return {flag: text[start:end] for (start, flag), end in zip(starts, ends)}


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_each_flag_and_default_once_with_help_and_choices(script):
    parser = importlib.import_module(module_name(script)).build_parser()
    text = parser.format_help()
    entries = option_entries(parser)
    invocations = [entry.splitlines()[0].strip().split("  ")[0] for entry in entries.values()]
    flags = [word.rstrip(",") for invocation in invocations for word in invocation.split() if word.startswith("-")]
    assert len(flags) == len(set(flags)), f"{script}: a flag listed twice: {invocations}"
    for action in shown_actions(parser):
        if not action.option_strings:
            continue
        entry = entries[action.option_strings[0]]
        invocation = entry.splitlines()[0].strip().split("  ")[0]
        # "--a_b, --a-b VALUE", not "--a_b VALUE, --a-b VALUE": only flags are followed by a comma
        assert all(word.startswith("-") for word in invocation.split() if word.endswith(",")), invocation
        assert action.help, f"{script}: {action.option_strings[0]} has no help"
        assert entry.count("(default") <= 1 and entry.count("default:") <= 1, f"{script}: default twice in\n{entry}"
        assert "(default: None)" not in entry and "(default: False)" not in entry, entry
        if action.choices:
            assert all(str(choice) in entry for choice in action.choices), f"{script}: choices not shown\n{entry}"
    if parser.description and "\n    " in parser.description:  # an indented example keeps its line break
        example = next(line for line in parser.description.splitlines() if line.startswith("    "))
        assert example in text


def test_finetune_help_puts_the_project_options_first_on_one_screen():
    from scripts.finetune import build_parser

    text = build_parser().format_help()
    trainer = re.search(r"^Trainer options", text, flags=re.MULTILINE)
    project = text.index("project options:")
    assert trainer and project < trainer.start()
    assert text[: trainer.start()].count("\n") <= FINETUNE_PROJECT_LINES, text[: trainer.start()]
    assert "--train {all,llm,vst,projector,lora}" in text
    assert "--lora_r, --lora-r R" in text and "LoRA rank (default: 16)" in text
    assert "--max_steps" in text[trainer.start():] and "--max_steps" not in text[: trainer.start()]


def test_every_script_runs_as_a_file_from_another_folder(tmp_path):
    """One process runs each script file with --help, its repo imports forgotten between scripts."""
    driver = f"""
import runpy, sys
root = {str(REPO_ROOT)!r}
failures = []
for script in {SCRIPTS!r}:
    sys.path[:] = [p for p in sys.path if p not in (root, root + "/")]
    for name in [n for n in sys.modules if n.split(".")[0] in ("scripts", "demo", "benchmarks", "videoxl")]:
        del sys.modules[name]
    sys.argv = [script, "--help"]
    try:
        runpy.run_path(root + "/" + script, run_name="__main__")
    except SystemExit as exit:
        if exit.code not in (0, None):
            failures.append(script)
    except Exception as error:
        failures.append(f"{{script}}: {{error!r}}")
print("FAILURES", failures)
"""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "-c", driver], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "FAILURES []" in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]
    assert run.stdout.count("usage:") == len(SCRIPTS)
