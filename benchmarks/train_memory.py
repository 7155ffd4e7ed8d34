#!/usr/bin/env python
"""Training-step benchmark of Video-XL: peak memory and step time vs frames, activation checkpointing and what trains.

For every (frames, checkpointing, trainable) point, a fresh child process builds a random-weight model from a size
preset of benchmarks/prefill.py, selects the trainable parameters as scripts/finetune.py does (`all`, `llm`, or
`lora`: PEFT adapters, r 16), runs one warm-up step on a 2-frame prompt (AdamW state allocated), then one timed
step on the prompt `14 text tokens + frames x tokens_per_frame video tokens + 12 answer tokens` (the 12 labelled):
forward in train mode at compression ratio `--ratio`, backward, `AdamW.step`, `zero_grad`.

`base_mb`: memory before the step (weights, AdamW state; gradients are freed by `zero_grad`); `peak_mb`: peak during
it, which includes the step's inputs (made inside it: fp32 pixels are 1.35 MB a frame at 336 px) and the gradients
(CPU: peak RSS, VmHWM reset through /proc/self/clear_refs; CUDA: `torch.cuda.max_memory_allocated`); `step_s`: wall
seconds of the step.

On CPU every point runs with glibc's mmap threshold fixed at 128 KiB (`MALLOC_MMAP_THRESHOLD_`, `--cpu-allocator
mmap`, the default): every tensor over it gets its own mapping, returned to the system when freed, so peak RSS tracks
the live tensors as `max_memory_allocated` does on CUDA. With glibc's default dynamic threshold (`--cpu-allocator
glibc`), tensors of a few MB come from the heap and peak RSS also counts its fragmentation, which grows with the
number of windows.

    .venv/bin/python benchmarks/train_memory.py --size small --frames 32,128,512 \
        --json benchmarks/results/train_memory_small_cpu.json
    .venv/bin/python benchmarks/train_memory.py --size tiny --frames 4,8 --trainable llm --checkpointing on
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.cli import HelpFormatter  # noqa: E402


REPO_ROOT = Path(__file__).resolve().parent.parent
ANSWER_TOKENS = 12
WARMUP_FRAMES = 2
MMAP_THRESHOLD = 128 * 1024  # bytes; see --cpu-allocator


def run_point(spec: dict) -> dict:
    """One training step in this (fresh) process."""
    if spec.get("mem_limit_gb"):  # fail with MemoryError instead of waking the OOM killer
        import resource

        limit = int(spec["mem_limit_gb"] * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    sys.path.insert(0, str(REPO_ROOT))
    import torch

    from benchmarks.prefill import build_model, make_inputs, peak_rss_mb, reset_peak_rss, rss_mb
    from scripts import finetune

    torch.set_num_threads(spec["threads"])
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    model = build_model(spec["size"], device, dtype, spec["attn"])
    model = finetune.select_trainable(model, SimpleNamespace(train=spec["trainable"], lora_r=16, lora_alpha=32,
                                                             lora_dropout=0.0))
    if spec["checkpointing"]:  # as Trainer does it, then scripts/finetune.py's CheckpointOnlyWhatTrains
        getattr(model, f"{finetune.ACTIVATION_CHECKPOINTING}_enable")()
        finetune.checkpoint_only_what_trains(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    config = model.config

    def step(frames: int) -> float:
        ids, pixels = make_inputs(config, frames, device, dtype)
        labels = torch.full_like(ids, -100)
        labels[:, -ANSWER_TOKENS:] = ids[:, -ANSWER_TOKENS:]
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        loss = model(input_ids=ids, pixel_values_videos=pixels, labels=labels, compression_ratio=spec["ratio"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - start

    step(WARMUP_FRAMES)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        resettable = reset_peak_rss()
        base = rss_mb()
    seconds = step(spec["frames"])
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else peak_rss_mb(resettable)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {**spec, "step_s": seconds, "base_mb": base, "peak_mb": peak, "trainable_params": trainable}


def measure(spec: dict, timeout: float) -> dict:
    """Run one point in a fresh process; a crash or timeout becomes a skipped record."""
    command = [sys.executable, str(Path(__file__).resolve()), "--point", json.dumps(spec)]
    env = dict(os.environ)
    if spec["device"] == "cpu" and spec["cpu_allocator"] == "mmap":
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, env=env)
    except subprocess.TimeoutExpired:
        return {**spec, "skipped": f"timeout after {timeout:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        error = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        return {**spec, "skipped": error[:300]}
    return json.loads(lines[-1])


def merged(earlier: list[dict], records: list[dict]) -> list[dict]:
    """The records of earlier runs, with this run's replacing those of the same point."""
    key = lambda r: (r["trainable"], r["checkpointing"], r["frames"])  # noqa: E731
    points = {key(r): r for r in earlier}
    points.update((key(r), r) for r in records)
    return list(points.values())


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(records: list[dict]) -> str:
    lines = ["| trainable | checkpointing | frames | step s | base MB | peak MB | working MB | peak / 128-frame peak |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    peaks = {(r["trainable"], r["checkpointing"], r["frames"]): r.get("peak_mb") for r in records}
    for r in sorted(records, key=lambda r: (r["trainable"], not r["checkpointing"], r["frames"])):
        on = "on" if r["checkpointing"] else "off"
        if r.get("skipped"):
            reason = (f"over the {r.get('mem_limit_gb')} GB address-space cap" if "allocate memory" in r["skipped"]
                      else r["skipped"][:80])
            lines.append(f"| {r['trainable']} | {on} | {r['frames']} | not measured: {reason} | | | | |")
            continue
        reference = peaks.get((r["trainable"], r["checkpointing"], 128))
        growth = r["peak_mb"] / reference if reference else None
        working = None if r.get("base_mb") is None else r["peak_mb"] - r["base_mb"]
        lines.append(f"| {r['trainable']} | {on} | {r['frames']} | {fmt(r['step_s'], '.1f')} "
                     f"| {fmt(r['base_mb'], '.0f')} | {fmt(r['peak_mb'], '.0f')} "
                     f"| {fmt(working, '.0f')} | {fmt(growth, '.2f')} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--point", help=argparse.SUPPRESS)
    parser.add_argument("--size", choices=("tiny", "small", "7b"), default="small",
                        help="model size preset (benchmarks/prefill.py)")
    parser.add_argument("--frames", default="32,128,512", help="comma-separated frame counts")
    parser.add_argument("--trainable", default="all,llm,lora", help="comma-separated: all, llm, lora")
    parser.add_argument("--checkpointing", choices=("on", "off", "both"), default="both",
                        help="activation checkpointing on, off, or both")
    parser.add_argument("--ratio", type=int, default=4, help="compression ratio of every window")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--dtype", default="float32", help="torch dtype of the weights")
    parser.add_argument("--attn", default="sdpa", help="attention implementation")
    parser.add_argument("--cpu-allocator", choices=("mmap", "glibc"), default="mmap",
                        help="mmap: glibc's mmap threshold fixed at 128 KiB, so peak RSS tracks live tensors; glibc: "
                             "its default dynamic threshold (peak RSS then includes heap fragmentation)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")),
                        help="torch threads (default: $OMP_NUM_THREADS, else 1)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per point before it is skipped")
    parser.add_argument("--skip", default="", help="points not to run, e.g. 'all/off/512,llm/off/512'")
    parser.add_argument("--mem-limit-gb", type=float, default=None, help="address-space cap of each point")
    parser.add_argument("--json", help="write the records here; points already in it are not run again")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.point:
        print(json.dumps(run_point(json.loads(args.point))))
        return 0

    skip = {tuple(item.split("/")) for item in args.skip.split(",") if item}
    earlier = json.loads(Path(args.json).read_text())["records"] if args.json and Path(args.json).exists() else []
    done = {(r["trainable"], r["checkpointing"], r["frames"]): r for r in earlier
            if not r.get("skipped") and r.get("cpu_allocator", "glibc") == args.cpu_allocator}
    records = []
    for trainable in args.trainable.split(","):
        for checkpointing in {"on": [True], "off": [False], "both": [True, False]}[args.checkpointing]:
            for frames in (int(f) for f in args.frames.split(",")):
                spec = dict(size=args.size, frames=frames, trainable=trainable, checkpointing=checkpointing,
                            ratio=args.ratio, device=args.device, dtype=args.dtype, attn=args.attn,
                            threads=args.threads, mem_limit_gb=args.mem_limit_gb, cpu_allocator=args.cpu_allocator)
                if (trainable, checkpointing, frames) in done:
                    records.append(done[(trainable, checkpointing, frames)])
                    continue
                if (trainable, "on" if checkpointing else "off", str(frames)) in skip:
                    records.append({**spec, "skipped": "not run (--skip)"})
                    continue
                record = measure(spec, args.timeout)
                records.append(record)
                print(json.dumps(record), flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps({"records": merged(earlier, records)}, indent=1))
    print(markdown_table(merged(earlier, records)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
