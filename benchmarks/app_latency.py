#!/usr/bin/env python
"""Latency of the browser app (app.py) on the bundled tiny model: question 1 (decode + encode the video, then answer)
against question 2 (answered from the kept memory), through the app's own streaming path (`VideoQA.answer`).

For each of `--videos` synthetic needle videos (`--frames` frames, sampled whole), it asks the video's question, then
another question about it, and records the time to the first streamed token and to the whole answer. It prints a
table of medians and writes JSON.

    .venv/bin/python -m benchmarks.app_latency --frames 128 --videos 5 --json benchmarks/results/app_latency_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from app import BUNDLED_MODEL, MemoryStore, VideoQA  # noqa: E402
from demo.qa import load  # noqa: E402
from demo.run import needle_video  # noqa: E402

FOLLOW_UP = ("Where in the frame did the object appear?\nA. top left\nB. top right\nC. bottom left\nD. bottom right\n"
             "Answer with the option's text.")


def ask_twice(qa: VideoQA, video: Path, question: str, frames: int) -> list[dict]:
    """The app's records of question 1 and question 2 on one fresh session memory."""
    memory = qa.store.get(str(video))
    for text in (question, FOLLOW_UP):
        for _ in qa.answer(memory, str(video), text, {"num_frames": frames}, qa.model.config.beacon_ratio):
            pass
    records = memory.questions
    qa.store.free(str(video))
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=BUNDLED_MODEL)
    parser.add_argument("--frames", type=int, default=128)
    parser.add_argument("--videos", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, processor = load(args.model)
    qa = VideoQA(model, processor, MemoryStore(budget_mb=4096, idle_seconds=3600))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        warm_up, _ = needle_video(0, args.frames, Path(tmp), "colour")
        ask_twice(qa, warm_up, "warm-up", args.frames)
        for seed in range(1, args.videos + 1):
            path, sample = needle_video(seed, args.frames, Path(tmp), "colour")
            first, second = ask_twice(qa, path, sample.question, args.frames)
            rows.append({"seed": seed, "q1_first_token_s": first["first_token_seconds"], "q1_s": first["seconds"],
                         "q2_first_token_s": second["first_token_seconds"], "q2_s": second["seconds"],
                         "q2_reused_memory": second["reused_memory"]})

    median = {key: statistics.median(row[key] for row in rows)
              for key in ("q1_first_token_s", "q1_s", "q2_first_token_s", "q2_s")}
    print(f"app latency, {args.model.name}, {args.frames} frames, {args.videos} videos, {args.threads} thread(s); "
          "medians in seconds")
    print(f"{'':<10}{'first token':>12}{'answer':>10}")
    print(f"{'question 1':<10}{median['q1_first_token_s']:>12.3f}{median['q1_s']:>10.3f}")
    print(f"{'question 2':<10}{median['q2_first_token_s']:>12.3f}{median['q2_s']:>10.3f}")
    print(f"first token: question 2 is {median['q1_first_token_s'] / median['q2_first_token_s']:.0f}x faster")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "model": str(args.model.name), "frames": args.frames, "threads": args.threads,
            "machine": platform.processor() or platform.machine(), "median": median, "rows": rows,
        }, indent=1) + "\n")


if __name__ == "__main__":
    main()
