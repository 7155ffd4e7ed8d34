#!/usr/bin/env python
"""Batching benchmark of Video-XL: 8 mixed prompts in one batch vs one at a time, in one run.

The prompts differ in every way a batch of unrelated requests does: frame counts (a partial last window too), an
image, two videos in one prompt, a text-only prompt, questions of different lengths. Each run (one prompt alone, or
the left-padded batch of all 8) happens in a fresh child process that builds the same random-weight model from a
size preset (`benchmarks/prefill.py`), warms up on a small prompt, then times

- the prefill: `model(**inputs, logits_to_keep=1)` (every sample compressed with its own windows), and
- the decode: `--decode-tokens` greedy steps against the cache the prefill returned (no early stop),

and records the peak RSS above the memory before the prefill (weights and inputs). Time and memory come from
separate children: the memory ones run with a fixed malloc mmap threshold (`MALLOC_MMAP_THRESHOLD_=65536`), so that
large blocks go back to the system when freed and the RSS high-water mark follows the live tensors rather than heap
left over from earlier windows (glibc's default threshold grows after frees, and the leftover depends on the order
of allocations, not on what is alive). The one-at-a-time figures are the sums over the 8 runs (time) and the
largest of them (memory). Goals (issue 11): decode throughput >= 3x one at a
time, prefill no slower, peak working memory within the largest single prompt's + the kept memory of the others.

    .venv/bin/python benchmarks/batch.py --size small --threads 1 --json benchmarks/results/batch_small_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.prefill import build_model, kv_bytes_per_position, peak_rss_mb, reset_peak_rss, rss_mb  # noqa: E402
from scripts.cli import HelpFormatter  # noqa: E402


# (question tokens, visual spans as (kind, frames or tiles)): 47 frames and tiles in all.
PROMPTS = [
    (12, [("video", 12)]),  # windows of 10 + 2 frames
    (20, [("video", 4)]),
    (8, [("image", 2)]),
    (40, []),  # text only
    (10, [("video", 3), ("video", 5)]),  # two videos in one prompt
    (5, [("video", 8)]),
    (16, [("video", 10)]),  # exactly one window
    (12, [("image", 1), ("video", 2)]),
]
PREFIX_TOKENS = 14


def prompt_inputs(config, index: int) -> tuple[list[int], dict[str, list]]:
    """Ids of one prompt and its pixels per kind (`[n, 3, H, W]` tensors, in order)."""
    import torch

    gen = torch.Generator().manual_seed(index)
    vocab, side = config.text_config.vocab_size, config.vision_config.image_size
    question, spans = PROMPTS[index]
    text = lambda n: torch.randint(10, vocab - 10, (n,), generator=gen).tolist()  # noqa: E731
    ids, pixels = text(PREFIX_TOKENS), {"video": [], "image": []}
    for kind, frames in spans:
        token = config.video_token_id if kind == "video" else config.image_token_id
        ids += [token] * (frames * config.tokens_per_frame) + text(2)
        pixels[kind].append(torch.randn(frames, 3, side, side, generator=gen))
    return ids + text(question), pixels


def batch_inputs(config, indices: list[int]) -> dict:
    """The prompts left-padded into one batch (pad id 0), pixels concatenated sample after sample."""
    import torch

    prompts = [prompt_inputs(config, i) for i in indices]
    length = max(len(ids) for ids, _ in prompts)
    inputs = {
        "input_ids": torch.tensor([[0] * (length - len(ids)) + ids for ids, _ in prompts]),
        "attention_mask": torch.tensor([[0] * (length - len(ids)) + [1] * len(ids) for ids, _ in prompts]),
    }
    for kind, name in (("video", "pixel_values_videos"), ("image", "pixel_values")):
        frames = [p for _, pixels in prompts for p in pixels[kind]]
        if frames:
            inputs[name] = torch.cat(frames)
    return inputs


def run_child(spec: dict) -> dict:
    """Prefill and decode `spec["prompts"]` as one batch; seconds, tokens and peak working memory."""
    import torch

    torch.set_num_threads(spec["threads"])
    model = build_model(spec["size"], torch.device("cpu"), torch.float32, "sdpa")
    config = model.config
    with torch.no_grad():
        model(**batch_inputs(config, [1]), logits_to_keep=1)  # warm-up: allocator pools, kernels, lazy imports
        inputs = batch_inputs(config, spec["prompts"])
        resettable = reset_peak_rss()
        base = rss_mb()
        start = time.perf_counter()
        out = model(**inputs, logits_to_keep=1)
        prefill_s = time.perf_counter() - start
        cache, next_ids = out.cache, out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(spec["decode_tokens"]):
            next_ids = model(next_ids, cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
        decode_s = time.perf_counter() - start
        peak = peak_rss_mb(resettable)
    kept = cache.next_positions() - spec["decode_tokens"]
    return {
        "prompts": spec["prompts"],
        "prompt_tokens": int(inputs["attention_mask"].sum()),
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "decode_tokens": spec["decode_tokens"] * len(spec["prompts"]),
        "working_mb": peak - base,
        "kept": kept.tolist(),
    }


def measure(spec: dict, timeout: float, memory: bool = False) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"} if memory else None
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, timeout=timeout,
        env=env,
    )
    if proc.returncode:
        raise RuntimeError(f"child {spec['prompts']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--size", choices=("tiny", "small"), default="small",
                        help="model size preset (benchmarks/prefill.py)")
    parser.add_argument("--decode-tokens", type=int, default=32, help="greedy tokens per answer")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per child before it counts as skipped")
    parser.add_argument("--json", help="write the records and ratios here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return 0

    spec = {"size": args.size, "threads": args.threads, "decode_tokens": args.decode_tokens}
    everything = list(range(len(PROMPTS)))
    alone = [measure({**spec, "prompts": [i]}, args.timeout) for i in everything]
    batched = measure({**spec, "prompts": everything}, args.timeout)
    for record, prompts in zip(alone + [batched], [[i] for i in everything] + [everything]):
        record["working_mb"] = measure({**spec, "prompts": prompts}, args.timeout, memory=True)["working_mb"]

    kv_mb = kv_bytes_per_position(args.size, "float32") / 2**20
    largest = max(range(len(alone)), key=lambda i: alone[i]["working_mb"])
    kept_of_others_mb = sum(r["kept"][0] for i, r in enumerate(alone) if i != largest) * kv_mb
    one_at_a_time = {
        "prefill_s": sum(r["prefill_s"] for r in alone),
        "decode_s": sum(r["decode_s"] for r in alone),
        "decode_tokens": sum(r["decode_tokens"] for r in alone),
        "working_mb": alone[largest]["working_mb"],
    }
    prompt_tokens = batched["prompt_tokens"]
    rows = []
    for name, r in (("one at a time", one_at_a_time), ("batch of 8", batched)):
        rows.append({
            "mode": name,
            "prefill_s": r["prefill_s"],
            "prefill_tok_s": prompt_tokens / r["prefill_s"],
            "decode_tok_s": r["decode_tokens"] / r["decode_s"],
            "working_mb": r["working_mb"],
        })
    ratios = {
        "decode_throughput": rows[1]["decode_tok_s"] / rows[0]["decode_tok_s"],
        "prefill_throughput": rows[1]["prefill_tok_s"] / rows[0]["prefill_tok_s"],
        "peak_memory": rows[1]["working_mb"] / rows[0]["working_mb"],
    }
    memory_budget_mb = one_at_a_time["working_mb"] + kept_of_others_mb

    print(f"{args.size} preset, CPU, {args.threads} thread(s), {prompt_tokens} prompt tokens in 8 prompts, "
          f"{args.decode_tokens} decoded tokens each")
    print("| mode | prefill s | prefill tokens/s | decode tokens/s | peak working MB |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['mode']} | {row['prefill_s']:.2f} | {row['prefill_tok_s']:.0f} | {row['decode_tok_s']:.1f} | "
              f"{row['working_mb']:.0f} |")
    print(f"| batch / one at a time | {1 / ratios['prefill_throughput']:.2f}x time | "
          f"{ratios['prefill_throughput']:.2f}x | {ratios['decode_throughput']:.2f}x | {ratios['peak_memory']:.2f}x |")
    print()
    print("Goals:")
    print(f"  decode throughput >= 3x one at a time: {ratios['decode_throughput']:.2f}x "
          f"{'PASS' if ratios['decode_throughput'] >= 3 else 'FAIL'}")
    print(f"  prefill no slower: {ratios['prefill_throughput']:.2f}x throughput "
          f"{'PASS' if ratios['prefill_throughput'] >= 0.95 else 'FAIL'} (5 % timing noise allowed)")
    print(f"  peak memory <= largest single prompt's ({one_at_a_time['working_mb']:.0f} MB) + kept memory of the "
          f"others ({kept_of_others_mb:.1f} MB) = {memory_budget_mb:.0f} MB: {batched['working_mb']:.0f} MB "
          f"{'PASS' if batched['working_mb'] <= memory_budget_mb else 'FAIL'}")
    if args.json:
        record = {
            "size": args.size, "threads": args.threads, "decode_tokens": args.decode_tokens, "prompts": PROMPTS,
            "machine": platform.machine(), "python": platform.python_version(),
            "alone": alone, "batched": batched, "rows": rows, "ratios": ratios,
            "kept_of_others_mb": kept_of_others_mb, "memory_budget_mb": memory_budget_mb,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
