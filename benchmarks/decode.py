#!/usr/bin/env python
"""Decode benchmark: milliseconds per generated token of Video-XL against `Qwen2ForCausalLM` with the same weights.

Both models decode greedily through `generate` from a cache of the same length, so the difference is what Video-XL
adds per token (its input handling and cache bookkeeping), not attention over a longer memory:

- `text`: a text prompt of `--prompt-tokens` tokens; both caches hold that prompt.
- `video`: Video-XL's cache holds a `--frames`-frame video prompt compressed at `--ratio` (prefilled once, outside
  the timing); the baseline's `DynamicCache` holds as many text positions as Video-XL kept.

ms/token = (time of generating `--new-tokens` + 1 tokens - time of generating 1) / `--new-tokens`: the prefill of
the last prompt column and generate's set-up cancel out. The two models alternate, `--repeats` times, and the median
is reported. Models: the demo model (demo/model, its trained weights) and the `small` preset of benchmarks/prefill.py
(random weights), float32 on CPU by default.

    .venv/bin/python benchmarks/decode.py --json benchmarks/results/decode_cpu.json
    .venv/bin/python benchmarks/decode.py --models demo --frames 16 --new-tokens 20 --repeats 1   # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def load_model(name: str, device):
    """(Video-XL model, the Qwen2ForCausalLM sharing its language-model tensors) for `demo` or `small`."""
    import torch

    from benchmarks.prefill import build_baseline_lm, build_model
    from scripts.local_import import VideoXLForCausalLM

    if name == "demo":
        model = VideoXLForCausalLM.from_pretrained(REPO_ROOT / "demo" / "model", dtype=torch.float32,
                                                   attn_implementation="sdpa").to(device).eval()
    else:
        model = build_model(name, device, torch.float32, "sdpa")
    return model, build_baseline_lm(model)


def video_prompt(config, frames: int, device, seed: int = 0):
    """`[1, 14 + frames * tokens_per_frame + 12]` ids and `[1, frames, 3, H, W]` normalised-looking pixels."""
    import torch

    from benchmarks.prefill import make_inputs

    ids, pixels = make_inputs(config, frames, device, torch.float32, seed=seed)
    return ids, pixels.clamp_(-1.5, 1.5)


def timed_generate(model, ids, new_tokens: int, **kwargs) -> float:
    start = time.perf_counter()
    model.generate(ids, attention_mask=None, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   pad_token_id=0, **kwargs)
    return time.perf_counter() - start


def measure_pair(model, ids, cache, lm, baseline_ids, baseline_cache, new_tokens: int, repeats: int) -> dict:
    """Median ms/token of both models, each continuing its own cache (cut back after every run): `cache` holds
    `ids` but their last column, `baseline_cache` the same of `baseline_ids`."""
    from scripts.local_import import compat

    kept_rows = baseline_cache.get_seq_length()
    state = cache.checkpoint()
    times = {"videoxl": [], "qwen2": []}
    for _ in range(repeats):
        for name in times:
            runs = []
            for tokens in (1, new_tokens + 1):
                if name == "videoxl":
                    runs.append(timed_generate(model, ids, tokens, cache=cache))
                    cache.restore(state)
                else:
                    runs.append(timed_generate(lm, baseline_ids, tokens, **compat.cache_field(baseline_cache)))
                    extra = baseline_cache.get_seq_length() - kept_rows
                    baseline_cache.crop(kept_rows if compat.CROP_TAKES_LENGTH else -extra)  # the library's convention
            times[name].append((runs[1] - runs[0]) / new_tokens * 1000)
    videoxl, qwen2 = statistics.median(times["videoxl"]), statistics.median(times["qwen2"])
    return {"videoxl_ms": videoxl, "qwen2_ms": qwen2, "ratio": videoxl / qwen2, "kept": kept_rows,
            "runs_ms": times}


def baseline_cache_of_length(lm, rows: int, device):
    """(`DynamicCache` holding `rows` positions of random text, those ids and one more `[1, rows + 1]`): the
    baseline's memory of the same length and the prompt that continues it."""
    import torch
    from transformers import DynamicCache

    from scripts.local_import import compat

    cache = DynamicCache(config=lm.config)
    ids = torch.randint(10, 100, (1, rows + 1), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        lm(input_ids=ids[:, :-1], **compat.cache_field(cache), use_cache=True, logits_to_keep=1)
    return cache, ids


def run_model(name: str, args, device) -> list[dict]:
    import torch

    from scripts.local_import import BeaconCache

    model, lm = load_model(name, device)
    records = []
    # text: the same prompt in both caches, all but its last column (generate runs that one).
    vocab = model.config.text_config.vocab_size
    text = torch.randint(10, min(vocab, 100), (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    cache = BeaconCache(model.config.text_config.num_hidden_layers)
    with torch.no_grad():
        model(text[:, :-1], cache=cache, logits_to_keep=1)
    baseline, baseline_ids = baseline_cache_of_length(lm, args.prompt_tokens - 1, device)
    result = measure_pair(model, text, cache, lm, baseline_ids, baseline, args.new_tokens, args.repeats)
    records.append({"model": name, "case": "text", **result})
    print(f"{name:5s} text        : Video-XL {result['videoxl_ms']:7.2f} ms/token, Qwen2 {result['qwen2_ms']:7.2f}, "
          f"ratio {result['ratio']:.3f} (cache {result['kept']} rows)", flush=True)

    ids, pixels = video_prompt(model.config, args.frames, device)
    cache = BeaconCache(model.config.text_config.num_hidden_layers)
    start = time.perf_counter()
    with torch.no_grad():
        model(ids[:, :-1], pixel_values_videos=pixels, cache=cache, compression_ratio=args.ratio, logits_to_keep=1)
    prefill_s = time.perf_counter() - start
    del pixels
    baseline, baseline_ids = baseline_cache_of_length(lm, cache.get_seq_length(), device)
    result = measure_pair(model, ids, cache, lm, baseline_ids, baseline, args.new_tokens, args.repeats)
    records.append({"model": name, "case": f"video_{args.frames}f_r{args.ratio}", "prefill_s": prefill_s, **result})
    print(f"{name:5s} {args.frames}-frame video: Video-XL {result['videoxl_ms']:7.2f} ms/token, Qwen2 "
          f"{result['qwen2_ms']:7.2f}, ratio {result['ratio']:.3f} (cache {result['kept']} rows; prefill "
          f"{prefill_s:.0f} s)", flush=True)
    return records


def markdown_table(records: list[dict]) -> str:
    lines = ["| model | case | cache rows | Video-XL ms/token | Qwen2 ms/token | ratio |", "|---|---|---:|---:|---:|---:|"]
    for r in records:
        lines.append(f"| {r['model']} | {r['case']} | {r['kept']} | {r['videoxl_ms']:.2f} | {r['qwen2_ms']:.2f} | "
                     f"{r['ratio']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="demo,small", help="comma-separated: demo, small, tiny")
    parser.add_argument("--frames", type=int, default=512)
    parser.add_argument("--ratio", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--json", help="write the records here")
    args = parser.parse_args(argv)

    import platform

    import torch
    import transformers

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    records = []
    for name in args.models.split(","):
        records += run_model(name.strip(), args, device)
    print()
    print(f"device=cpu threads={torch.get_num_threads()} new_tokens={args.new_tokens} repeats={args.repeats} "
          f"torch {torch.__version__} transformers {transformers.__version__} ({platform.processor() or 'cpu'})")
    print(markdown_table(records))
    worst = max(r["ratio"] for r in records)
    print(f"\nGoal (issue 27): Video-XL / Qwen2 <= 1.10 in every case: worst {worst:.3f}: "
          f"{'PASS' if worst <= 1.10 else 'FAIL'}")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
