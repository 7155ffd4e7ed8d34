#!/usr/bin/env python
"""What encoding each video once saves in an lmms-eval run: the Video-MME stand-in with and without memory reuse.

For each frame count, `scripts/write_eval_data.py videomme` writes `--videos` synthetic videos with 3 questions
each (Video-MME's schema), and lmms-eval runs the `videomme_standin` task (lmms-eval's own videomme prompts, parsing
and scoring) with `--model videoxl` at `num_frames=F`: once with `reuse_memory=False` (every question decodes and
encodes its video) and once with `reuse_memory=True` (one encoding per video; the other questions run against its
kept memory). Both runs must give the same answers.

Reported per point: wall seconds inside the model's `generate_until` (the requests alone) and of the whole lmms-eval
run (`simple_evaluate`: task loading and scoring too; model loaded before), videos encoded, the speed-ups, the most
the kept memories held against `--budget-mb`, and the process's peak RSS (ru_maxrss, which only grows: the runs go
from small to large). It prints a table and writes JSON. Runs in the lmms-eval venv:

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 .venv-eval/bin/python benchmarks/eval_reuse.py --frames 64,256 \
        --json benchmarks/results/eval_reuse_demo_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from scripts.write_eval_data import write_videomme  # noqa: E402


def run_point(model: str, frames: int, videos: int, reuse: bool, budget_mb: float, data: Path, dtype: str) -> dict:
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager
    from lmms_eval_videoxl.videoxl import VideoXL

    lm = VideoXL(pretrained=model, num_frames=frames, dtype=dtype, reuse_memory=reuse,
                 memory_budget_gb=budget_mb / 1024)
    manager = TaskManager(include_path=str(data), include_defaults=False, verbosity="WARNING")
    answering = []  # seconds inside the model's generate_until: the requests alone, no task or scoring overhead
    generate_until = lm.generate_until

    def timed_generate_until(requests):
        start = time.perf_counter()
        try:
            return generate_until(requests)
        finally:
            answering.append(time.perf_counter() - start)

    lm.generate_until = timed_generate_until
    start = time.perf_counter()
    results = simple_evaluate(model=lm, tasks=["videomme_standin"], task_manager=manager, log_samples=True,
                              verbosity="WARNING")
    seconds = time.perf_counter() - start
    samples = sorted(results["samples"]["videomme_standin"], key=lambda s: s["doc_id"])
    return {
        "frames": frames, "reuse": reuse, "questions": len(samples), "videos": videos, "seconds": seconds,
        "model_seconds": sum(answering),
        "videos_encoded": lm.videos_encoded, "memory_peak_mb": lm.memories.peak_bytes / 2**20,
        "budget_mb": budget_mb, "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "score": results["results"]["videomme_standin"]["videomme_perception_score,none"],
        "answers": [s["resps"] for s in samples],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO_ROOT / "demo" / "model"))
    parser.add_argument("--frames", default="64,256")
    parser.add_argument("--videos", type=int, default=2, help="videos per point (3 questions each)")
    parser.add_argument("--budget-mb", type=float, default=256.0, help="memory_budget_gb of the reuse run, in MiB")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for frames in [int(f) for f in args.frames.split(",")]:
            data = Path(tmp) / f"f{frames}"
            write_videomme(data, args.videos, frames, seed=0)
            os.environ["HF_HOME"] = str(data)  # where lmms-eval's videomme code finds videomme/data/<id>.mp4
            sys.modules.pop("lmms_eval.tasks.videomme.utils", None)  # it reads HF_HOME when imported
            off = run_point(args.model, frames, args.videos, False, args.budget_mb, data, args.dtype)
            on = run_point(args.model, frames, args.videos, True, args.budget_mb, data, args.dtype)
            if on["answers"] != off["answers"]:
                raise SystemExit(f"{frames} frames: the answers with reuse differ from those without")
            rows.append({"frames": frames, "without": off, "with": on,
                         "speedup": off["model_seconds"] / on["model_seconds"],
                         "run_speedup": off["seconds"] / on["seconds"],
                         "within_budget": on["memory_peak_mb"] <= args.budget_mb})

    print("| frames | questions | videos | no reuse: model s (run s), encodes | reuse: model s (run s), encodes | "
          "speed-up model (run) | kept memory peak / budget MiB | RSS peak MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        off, on = row["without"], row["with"]
        print(f"| {row['frames']} | {on['questions']} | {on['videos']} | {off['model_seconds']:.1f} "
              f"({off['seconds']:.1f}), {off['videos_encoded']} | {on['model_seconds']:.1f} ({on['seconds']:.1f}), "
              f"{on['videos_encoded']} | {row['speedup']:.2f}x ({row['run_speedup']:.2f}x) | "
              f"{on['memory_peak_mb']:.1f} / {on['budget_mb']:.0f} | {on['rss_peak_mb']:.0f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        for row in rows:
            for run in (row["without"], row["with"]):
                run.pop("answers")
        args.json.write_text(json.dumps({
            "model": args.model, "dtype": args.dtype, "machine": platform.platform(), "cpus": os.cpu_count(),
            "torch_threads": __import__("torch").get_num_threads(), "rows": rows,
        }, indent=1))


if __name__ == "__main__":
    main()
