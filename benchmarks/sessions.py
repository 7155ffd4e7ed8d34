#!/usr/bin/env python
"""Session benchmark of Video-XL: ask many questions about one encoded video, keep its memory on disk.

For each frame count, a random-weight model of a size preset (benchmarks/prefill.py) answers `--questions`
different questions of 12 tokens about one video prompt (14 text tokens + frames x tokens_per_frame video tokens),
greedy, `--new-tokens` tokens each, the way `model.chat` does it:

- question 1: `generate` on the whole prompt with the pixels and a fresh cache (decode, encode, compress);
- questions 2..n: `cache.rewind(<end of the video>)`, then `generate` on the whole prompt with that cache and no
  pixels: only the new question runs against the kept memory.

It reports the seconds (wall and CPU of this process) of question 1 and the median of questions 2..n and their
ratio; the cache (rows and bytes of kept K/V + masks + ids) after question 1 and after the last one; the time to
save the cache and load it back, and the file size per frame against the kept K/V bytes. It prints a table and
writes JSON.

    .venv/bin/python benchmarks/sessions.py --size small --frames 128,512 --threads 1 \
        --json benchmarks/results/sessions_small_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.prefill import PREFIX_TOKENS, build_model  # noqa: E402
from scripts.cli import HelpFormatter  # noqa: E402
from scripts.local_import import compat  # noqa: E402


QUESTION_TOKENS = 12


def cache_bytes(cache) -> dict:
    kv = cache.memory_bytes()
    masks = cache.key_mask.numel()
    ids = cache.record.absorbed_ids.numel() * cache.record.absorbed_ids.element_size()
    return {"rows": cache.get_seq_length(), "kv_bytes": kv, "bytes": kv + masks + ids}


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def run_point(model, frames: int, questions: int, new_tokens: int, seed: int = 0) -> dict:
    import torch

    config = model.config
    gen = torch.Generator().manual_seed(seed)
    vocab = config.text_config.vocab_size
    prefix = torch.randint(10, vocab - 10, (1, PREFIX_TOKENS), generator=gen)
    video = torch.full((1, frames * config.tokens_per_frame), config.video_token_id)
    video_prompt = torch.cat([prefix, video], dim=1)
    side = config.vision_config.image_size
    pixels = torch.randn(1, frames, 3, side, side, generator=gen)
    asks = [torch.cat([video_prompt, torch.randint(10, vocab - 10, (1, QUESTION_TOKENS), generator=gen)], dim=1)
            for _ in range(questions)]
    options = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    with torch.no_grad():
        first, q1_wall, q1_cpu = timed(lambda: model.generate(asks[0], pixel_values_videos=pixels,
                                                              return_dict_in_generate=True, **options))
        cache = compat.cache_of(first)  # `generate`'s output names it `past_key_values` before 5.24
        after_first = cache_bytes(cache)
        walls, cpus = [], []
        for ids in asks[1:]:
            cache.rewind(video_prompt.shape[1])
            _, wall, cpu = timed(lambda: model.generate(ids, cache=cache, **options))
            walls.append(wall)
            cpus.append(cpu)
        after_last = cache_bytes(cache)
        # The same question with all the pixels passed again: the cache checks them against the frames it holds.
        cache.rewind(video_prompt.shape[1])
        _, checked_wall, _ = timed(lambda: model.generate(asks[1], pixel_values_videos=pixels, cache=cache, **options))

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "memory.safetensors"
        _, save_s, _ = timed(lambda: cache.save(path))
        loaded, load_s, _ = timed(lambda: type(cache).load(path))
        file_bytes = path.stat().st_size
    assert loaded.get_seq_length() == cache.get_seq_length()
    kv = after_last["kv_bytes"]
    return {
        "frames": frames,
        "questions": questions,
        "new_tokens": new_tokens,
        "q1_s": q1_wall,
        "q1_cpu_s": q1_cpu,
        "q_next_s": statistics.median(walls),
        "q_next_cpu_s": statistics.median(cpus),
        "q_next_s_all": walls,
        "q_next_over_q1": statistics.median(walls) / q1_wall,
        "q_next_over_q1_cpu": statistics.median(cpus) / q1_cpu,
        "q_next_checked_pixels_s": checked_wall,
        "cache_after_q1": after_first,
        "cache_after_last": after_last,
        "growth_rows": after_last["rows"] - after_first["rows"],
        "growth_bytes": after_last["bytes"] - after_first["bytes"],
        "save_s": save_s,
        "load_s": load_s,
        "file_bytes": file_bytes,
        "file_bytes_per_frame": file_bytes / frames,
        "file_over_kv": file_bytes / kv - 1.0,
    }


def table(records: list[dict]) -> str:
    head = ("| frames | Q1 s (cpu s) | Q2..n median s (cpu s) | ratio (cpu) | Q2 pixels checked s | cache rows/MB "
            "after Q1 | after Qn | save s | load s | file KB/frame | file - K/V |")
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for r in records:
        a, b = r["cache_after_q1"], r["cache_after_last"]
        lines.append(
            f"| {r['frames']} | {r['q1_s']:.2f} ({r['q1_cpu_s']:.2f}) | {r['q_next_s']:.3f} ({r['q_next_cpu_s']:.3f}) "
            f"| 1/{1 / r['q_next_over_q1']:.0f} (1/{1 / r['q_next_over_q1_cpu']:.0f}) | "
            f"{r['q_next_checked_pixels_s']:.3f} | {a['rows']} / {a['bytes'] / 2**20:.2f} | "
            f"{b['rows']} / {b['bytes'] / 2**20:.2f} | {r['save_s']:.3f} | {r['load_s']:.3f} | "
            f"{r['file_bytes_per_frame'] / 1024:.1f} | {100 * r['file_over_kv']:+.2f} % |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--size", choices=("tiny", "small", "7b"), default="small",
                        help="model size preset (benchmarks/prefill.py)")
    parser.add_argument("--frames", default="128,512", help="comma-separated frame counts")
    parser.add_argument("--questions", type=int, default=10, help="questions asked about each video")
    parser.add_argument("--new-tokens", type=int, default=8, help="greedy tokens per answer")
    parser.add_argument("--device", default="cpu", help="torch device")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", type=Path, help="write the records here")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.size, torch.device(args.device), torch.float32, "sdpa")
    records = []
    for frames in [int(f) for f in args.frames.split(",")]:
        record = run_point(model, frames, args.questions, args.new_tokens)
        record.update(size=args.size, device=args.device, dtype="float32", attn="sdpa", threads=args.threads,
                      torch=torch.__version__, transformers=transformers.__version__, machine=platform.machine())
        records.append(record)
        print(f"{frames} frames: Q1 {record['q1_s']:.2f} s, Q2..n {record['q_next_s']:.3f} s", flush=True)
    print()
    print(table(records))
    for r in records:
        print(f"{r['frames']} frames: Q2..n / Q1 = 1/{1 / r['q_next_over_q1']:.0f} (goal <= 1/20 at 512); cache grew "
              f"by {r['growth_rows']} rows / {r['growth_bytes']} bytes over {r['questions'] - 1} more questions "
              f"(goal: no more than the text rows); file = K/V {100 * r['file_over_kv']:+.3f} % (goal < 1 %)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
