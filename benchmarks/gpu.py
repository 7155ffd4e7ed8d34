#!/usr/bin/env python
"""One command for the day a GPU is lent: prefill time, peak memory and decode speed of a 7B-shaped Video-XL.

The model is the released architecture (Qwen2-7B-shaped language model, CLIP-L/336 vision tower: the `7b` preset
of benchmarks/prefill.py) with random bf16 weights made on the device, so nothing is downloaded. For each attention
implementation (sdpa, and flash_attention_2 when `flash_attn` imports):

1. a short case (`--check-frames` frames) compared across the implementations: the last position's logits and the
   greedy tokens after it;
2. a prefill of `--frames` frames (2,048) at ratio `--ratio` (16): wall seconds, peak device memory, kept rows, then
   a greedy decode of `--decode-tokens` tokens one at a time (ms/token);
3. sdpa only: the frame count doubled while the prefill fits in device memory and the next one's estimated time
   (twice the last) fits in `--budget-s`: the most frames that fit, with their numbers.

Prompt: 14 text tokens + frames x tokens_per_frame video tokens + 12 question tokens, random normalised pixels made on
the device. One JSON (`--json`) holds the device, versions and every record; a table is printed.

    python benchmarks/gpu.py --json benchmarks/results/gpu_h100.json          # on the GPU machine (< 8 min)
    python benchmarks/gpu.py --preset tiny --device cpu                       # the CI smoke test
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.prefill import build_model, make_inputs, peak_rss_mb, reset_peak_rss  # noqa: E402


def attention_implementations() -> list[str]:
    """sdpa, and flash_attention_2 where the flash-attn package imports."""
    return ["sdpa"] + (["flash_attention_2"] if importlib.util.find_spec("flash_attn") else [])


def use_attention(model, attn: str) -> None:
    """Switch the whole model (language model and vision tower) to another attention implementation, same weights."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attn)
    else:  # releases before the setter: the configs are read at every call
        for config in (model.config, model.config.text_config, model.config.vision_config):
            config._attn_implementation = attn


class Meter:
    """Wall time (after the device finishes) and peak memory in MiB (device memory on CUDA, peak RSS on CPU)."""

    def __init__(self, device):
        import torch

        self.torch, self.device = torch, device
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def start(self) -> None:
        self.sync()
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
        else:
            self.resettable = reset_peak_rss()
        self.t0 = time.perf_counter()

    def stop(self) -> tuple[float, float]:
        self.sync()
        seconds = time.perf_counter() - self.t0
        peak = self.torch.cuda.max_memory_allocated() / 2**20 if self.cuda else peak_rss_mb(self.resettable)
        return seconds, peak


def prefill_and_decode(model, frames: int, ratio: int, decode_tokens: int, device, dtype, meter: Meter) -> dict:
    """One prefill of `frames` frames and a greedy decode after it."""
    import torch

    ids, pixels = make_inputs(model.config, frames, device, dtype)
    pixels.clamp_(-1.5, 1.5)
    with torch.no_grad():
        meter.start()
        out = model(ids, pixel_values_videos=pixels, compression_ratio=ratio, logits_to_keep=1)
        prefill_s, peak_mb = meter.stop()
        del pixels
        cache, next_ids = out.cache, out.logits[:, -1:].argmax(-1)
        kept = cache.get_seq_length()
        meter.start()
        for _ in range(decode_tokens):
            next_ids = model(next_ids, cache=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)
        decode_s, _ = meter.stop()
    return {"frames": frames, "ratio": ratio, "prefill_s": prefill_s, "peak_mb": peak_mb,
            "kept": kept, "decode_ms": decode_s / max(decode_tokens, 1) * 1000}


def compare_short_case(model, attns: list[str], frames: int, ratio: int, device, dtype) -> dict:
    """Last-position logits and 8 greedy tokens of a short video prompt under each implementation."""
    import torch

    ids, pixels = make_inputs(model.config, frames, device, dtype, seed=1)
    pixels.clamp_(-1.5, 1.5)
    results = {}
    for attn in attns:
        use_attention(model, attn)
        with torch.no_grad():
            logits = model(ids, pixel_values_videos=pixels, compression_ratio=ratio, logits_to_keep=1).logits[0, -1]
            tokens = model.generate(ids, pixel_values_videos=pixels, compression_ratio=ratio, max_new_tokens=8,
                                    min_new_tokens=8, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
        results[attn] = (logits.float(), tokens)
    reference_logits, reference_tokens = results[attns[0]]
    comparison = {"frames": frames, "ratio": ratio, "reference": attns[0], "tokens": {attns[0]: reference_tokens}}
    for attn in attns[1:]:
        logits, tokens = results[attn]
        comparison["tokens"][attn] = tokens
        comparison[f"max_abs_logit_diff_{attn}"] = float((logits - reference_logits).abs().max())
        comparison[f"same_tokens_{attn}"] = tokens == reference_tokens
    return comparison


def most_frames(model, start: int, ratio: int, decode_tokens: int, device, dtype, meter: Meter, deadline: float,
                limit: int) -> list[dict]:
    """Double the frames from `start` while a prefill fits in memory and the next one's time fits the deadline."""
    import torch

    records, frames, last_s = [], start, None
    while frames <= limit:
        if last_s is not None and time.monotonic() + 2 * last_s > deadline:
            records.append({"frames": frames, "ratio": ratio, "skipped": "the time budget would be exceeded"})
            break
        try:
            record = prefill_and_decode(model, frames, ratio, decode_tokens, device, dtype, meter)
        except torch.OutOfMemoryError as err:
            records.append({"frames": frames, "ratio": ratio, "skipped": f"out of memory: {str(err)[:160]}"})
            break
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        records.append(record)
        last_s = record["prefill_s"]
        print(f"  sdpa {frames:6d} frames: prefill {record['prefill_s']:8.2f} s, peak {record['peak_mb']:9.0f} MiB, "
              f"kept {record['kept']}, decode {record['decode_ms']:.1f} ms/token", flush=True)
        frames *= 2
    return records


def markdown_table(records: list[dict]) -> str:
    lines = ["| attn | frames | ratio | prefill s | peak MiB | kept | decode ms/token |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        if r.get("skipped"):
            lines.append(f"| {r['attn']} | {r['frames']} | {r['ratio']} | skipped: {r['skipped']} | | | |")
        else:
            lines.append(f"| {r['attn']} | {r['frames']} | {r['ratio']} | {r['prefill_s']:.2f} | {r['peak_mb']:.0f} | "
                         f"{r['kept']} | {r['decode_ms']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=("7b", "small", "tiny"), default="7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--frames", type=int, default=None, help="default: 2048 (7b, small), 8 (tiny)")
    parser.add_argument("--max-frames", type=int, default=None,
                        help="largest frame count the doubling tries (default: 65536; 32 for tiny)")
    parser.add_argument("--check-frames", type=int, default=None, help="frames of the short compared case "
                        "(default: 20 = two windows; 8 for tiny)")
    parser.add_argument("--ratio", type=int, default=16)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="wall seconds for the whole run; the doubling stops before exceeding it")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    import torch
    import transformers

    began = time.monotonic()
    tiny = args.preset == "tiny"
    frames = args.frames or (8 if tiny else 2048)
    check_frames = args.check_frames or (8 if tiny else 20)
    max_frames = args.max_frames or (32 if tiny else 65536)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    meter = Meter(device)
    attns = attention_implementations() if device.type == "cuda" else ["sdpa"]

    model = build_model(args.preset, device, dtype, "sdpa")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    print(f"{args.preset} preset on {name}: {sum(p.numel() for p in model.parameters()) / 1e6:,.1f} M parameters, "
          f"{dtype}, attention {attns}, built in {time.monotonic() - began:.0f} s", flush=True)

    comparison = compare_short_case(model, attns, check_frames, args.ratio, device, dtype)
    print(f"short case ({check_frames} frames): {json.dumps({k: v for k, v in comparison.items() if k != 'tokens'})}",
          flush=True)

    records = []
    for attn in attns:
        use_attention(model, attn)
        record = prefill_and_decode(model, frames, args.ratio, args.decode_tokens, device, dtype, meter)
        records.append({"attn": attn, **record})
        print(f"  {attn} {frames} frames: prefill {record['prefill_s']:.2f} s, peak {record['peak_mb']:.0f} MiB, "
              f"decode {record['decode_ms']:.1f} ms/token", flush=True)
    use_attention(model, "sdpa")
    deadline = began + args.budget_s
    records += [{"attn": "sdpa", **r} for r in most_frames(model, frames * 2, args.ratio, args.decode_tokens, device,
                                                          dtype, meter, deadline, max_frames)]
    fitted = [r["frames"] for r in records if not r.get("skipped")]
    result = {
        "preset": args.preset, "device": name, "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "device_memory_mib": (torch.cuda.get_device_properties(device).total_memory / 2**20
                              if device.type == "cuda" else None),
        "comparison": comparison, "records": records, "most_frames_run": max(fitted),
        "total_s": time.monotonic() - began,
    }
    print()
    print(markdown_table(records))
    print(f"\nmost frames run: {result['most_frames_run']}; total {result['total_s']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
