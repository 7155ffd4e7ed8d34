"""Every Python block of README.md and docs/*.md runs, against the bundled tiny model and synthetic media, so the
documentation cannot rot.

The blocks of one document run in order in one interpreter, as a reader would paste them (a later block may use a
name an earlier one defined). The documents name real things (`videoxl-7b`, `movie.mp4`, ...); `PLACEHOLDERS` below
is the one place that swaps each for what this machine has: the bundled tiny model, a synthetic needle video or image
written by the test. A block that needs something not listed here must be a shell block, or must add its swap here.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from demo.synth import make_sample, write_video
from scripts.local_import import REPO_ROOT

DOCUMENTS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def placeholders(media: Path) -> dict[str, str]:
    """Each name the documents use -> what the test runs instead (quoted names are swapped inside their quotes)."""
    return {
        "videoxl-7b": str(REPO_ROOT / "demo" / "model"),
        "movie.mp4": str(media / "movie.mp4"),
        "clip.mp4": str(media / "clip.mp4"),
        "photo.jpg": str(media / "photo.jpg"),
        "https://camera.example/live.ts": str(media / "clip.mp4"),
        "movie.r8.safetensors": str(media / "movie.r8.safetensors"),
    }


def python_blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text())


def write_media(folder: Path) -> None:
    write_video(make_sample(3, 30, "retrieval", attribute="colour", digit_prob=0.0).frames, folder / "movie.mp4", fps=1.0)
    write_video(make_sample(4, 20, "counting", digit_prob=0.0).frames, folder / "clip.mp4", fps=1.0)
    Image.fromarray(make_sample(5, 1, "retrieval", digit_prob=0.0).frames[0]).save(folder / "photo.jpg")


def swapped(source: str, table: dict[str, str]) -> str:
    for name, value in table.items():
        source = source.replace(name, value)
    return source


def test_every_document_has_python_blocks_and_the_readme_quick_start_is_one():
    assert python_blocks(REPO_ROOT / "README.md"), "the README shows no Python"
    assert any("from_pretrained" in block for block in python_blocks(REPO_ROOT / "README.md"))


@pytest.mark.parametrize("document", [d for d in DOCUMENTS if python_blocks(d)], ids=lambda d: d.name)
def test_python_blocks_run(document, tmp_path):
    write_media(tmp_path)
    table = placeholders(tmp_path)
    blocks = [swapped(block, table) for block in python_blocks(document)]
    script = "\n".join(f"# --- block {i} of {document.name}\n{block}" for i, block in enumerate(blocks))
    (tmp_path / "doc_blocks.py").write_text(script)
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run([sys.executable, "doc_blocks.py"], cwd=tmp_path, capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, f"{document.name}:\n{result.stderr[-3000:]}"
