#!/usr/bin/env python
"""Prefill benchmark of Video-XL: time and memory vs frames and compression ratio, against full attention.

For every (frames, ratio) pair, a fresh child process builds a random-weight model from a size preset, runs a
warm-up forward on a 2-frame input, then `--repeats` prefills of a video prompt

    14 text tokens + frames x tokens_per_frame video tokens + 12 question tokens

each followed by a greedy decode of `--decode-tokens` tokens against the cache the prefill returned. It reports the
median prefill seconds (vision = cumulative time inside `model.model.encode_frames`, LLM = the rest), the memory
before the prefill (`base_mb`: weights + inputs) and at its peak (`peak_mb`), the kept positions
(`cache.get_seq_length()`) and the decode milliseconds per token.

The baseline (`ratio` 0) is the same weights without compression: a `Qwen2ForCausalLM` that shares the Video-XL
language-model tensors, fed [prefix embeddings ; every frame's visual features (encoded window by window, as in the
compressed path) ; question embeddings] in one causal forward with a `DynamicCache`.

Memory: on CPU, peak RSS of the child (Linux: the VmHWM high-water mark is reset through /proc/self/clear_refs
before each repeat; elsewhere `ru_maxrss`, which includes everything since the process started); on CUDA,
`torch.cuda.max_memory_allocated`. The working memory of a prefill is `peak_mb - base_mb`. On CPU the children run
with glibc's mmap threshold fixed at 128 KiB (`--cpu-allocator mmap`, the default, as benchmarks/train_memory.py):
every tensor over it gets its own mapping, returned to the system when freed, so peak RSS tracks the live tensors
rather than the heap's fragmentation (`--cpu-allocator glibc`: glibc's dynamic threshold, which lets freed
multi-MB tensors stay in the heap and count in peak RSS).

Examples (from the repository root):

    .venv/bin/python benchmarks/prefill.py --size small --json benchmarks/results/small_cpu.json \
        --png benchmarks/results/small_cpu.png
    .venv/bin/python benchmarks/prefill.py --size tiny --frames 2,4 --ratios 4 --repeats 1
    python benchmarks/prefill.py --size 7b --device cuda --dtype bfloat16 --attn sdpa \
        --frames 256,512,1024,2048,4096,8192 --ratios 8,16 --json 7b_sdpa.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.cli import HelpFormatter  # noqa: E402


REPO_ROOT = Path(__file__).resolve().parent.parent
PREFIX_TOKENS = 14
QUESTION_TOKENS = 12
WARMUP_FRAMES = 2
MMAP_THRESHOLD = 128 * 1024  # bytes; see --cpu-allocator
RECORD_FIELDS = ("frames", "ratio", "prefill_s", "vision_s", "base_mb", "peak_mb", "kept", "decode_ms")


# --------------------------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------------------------


def preset(size: str) -> dict:
    """Keyword arguments of `VideoXLConfig` for a size preset (`7b`: the defaults, the released model)."""
    if size == "7b":
        return {}
    if size == "small":
        # The issue's comparison model: hidden-512, 8-layer Qwen2; 4-layer, width-256 CLIP at 336 px (576 patches
        # -> 144 tokens per frame after the 2x2 pool); windows of 1440 tokens = 10 frames, as in the 7B.
        text = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                    num_attention_heads=8, num_key_value_heads=2)
        vision = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                      image_size=336, patch_size=14)
        window = 1440
    elif size == "tiny":
        # 112 px frames: 8x8 patches -> 16 tokens per frame; windows of 4 frames.
        text = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      image_size=112, patch_size=14)
        window = 64
    else:
        raise ValueError(f"unknown size {size!r}")
    vocab = text["vocab_size"]
    text.update(model_type="qwen2", max_position_embeddings=32768, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=False,
                bos_token_id=vocab - 5, eos_token_id=vocab - 4)
    vision.update(model_type="clip_vision_model", hidden_act="quick_gelu", layer_norm_eps=1e-5)
    return dict(text_config=text, vision_config=vision, image_token_id=vocab - 2, video_token_id=vocab - 1,
                beacon_window=window)


# --------------------------------------------------------------------------------------------------------------------
# Cost model: FLOPs and kept bytes from the shapes (no torch needed)
# --------------------------------------------------------------------------------------------------------------------

# The released 7B (configuration_videoxl.QWEN2_7B and CLIP_L_336), the base every preset overrides.
DIMS_7B = dict(vocab=152064, hidden=3584, mlp=18944, layers=28, heads=28, kv_heads=4, v_hidden=1024, v_mlp=4096,
               v_layers=24, image=336, patch=14, pool=2, window=1440, feature_layer=-2)


def dims(size: str) -> dict:
    p = preset(size)
    d = dict(DIMS_7B)
    if p:
        t, v = p["text_config"], p["vision_config"]
        d.update(vocab=t["vocab_size"], hidden=t["hidden_size"], mlp=t["intermediate_size"],
                 layers=t["num_hidden_layers"], heads=t["num_attention_heads"], kv_heads=t["num_key_value_heads"],
                 v_hidden=v["hidden_size"], v_mlp=v["intermediate_size"], v_layers=v["num_hidden_layers"],
                 image=v["image_size"], patch=v["patch_size"], window=p["beacon_window"])
    d["head_dim"] = d["hidden"] // d["heads"]
    d["patches"] = (d["image"] // d["patch"]) ** 2
    d["tokens_per_frame"] = d["patches"] // d["pool"] ** 2
    return d


def kv_bytes_per_position(size: str, dtype: str) -> int:
    """Bytes of kept K/V per position: layers x 2 (K, V) x kv_heads x head_dim x bytes per element."""
    d = dims(size)
    element = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    return d["layers"] * 2 * d["kv_heads"] * d["head_dim"] * element


def point_flops(size: str, frames: int, ratio: int, clip_layers: int | None = None) -> dict:
    """Multiply-add FLOPs (2 per MAC) of one prefill, by part. `ratio` 0: no compression.

    LLM linear, per row:     2 L (h*q + 2 h*kv + q*h + 3 h*m)          (q = heads*head_dim, kv = kv_heads*head_dim)
      + per VST row, its beacon q/k/v projections on top:  2 L (h*q + 2 h*kv)
    LLM attention, per (query row, visible key):  4 L q   (QK^T and AV)
      window k with W_k visual tokens: R_k = W_k + W_k/r rows, K_k kept positions before it ->
      R_k*K_k + R_k(R_k+1)/2 row-key pairs; prefix S(S+1)/2; question Q*K + Q(Q+1)/2.
      No compression: N = S + 144 F + Q rows, N(N+1)/2 pairs.
    CLIP per frame (P patches + CLS, width c, MLP e, layers run = n):
      n [2 (P+1)(4 c^2 + 2 c e) + 4 (P+1)^2 c]  + patch conv 2 P (3 p^2) c
    Projector per frame: 2 P (c h + h h).
    """
    d = dims(size)
    h, q, kv, m, L = d["hidden"], d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"], d["mlp"], d["layers"]
    per_row = 2 * L * (h * q + 2 * h * kv + q * h + 3 * h * m)
    per_vst = 2 * L * (h * q + 2 * h * kv)
    per_pair = 4 * L * q
    S, Q, T, W = PREFIX_TOKENS, QUESTION_TOKENS, d["tokens_per_frame"], d["window"]
    visual = frames * T
    if ratio == 0:
        n = S + visual + Q
        rows, vsts, pairs = n, 0, n * (n + 1) // 2
    else:
        rows, vsts, pairs, kept = S + Q, 0, S * (S + 1) // 2, S
        for start in range(0, visual, W):
            w = min(W, visual - start)
            b = w // ratio
            r = w + b
            rows, vsts = rows + r, vsts + b
            pairs += r * kept + r * (r + 1) // 2
            kept += b
        pairs += Q * kept + Q * (Q + 1) // 2
    P, c, e = d["patches"], d["v_hidden"], d["v_mlp"]
    n_clip = d["v_layers"] if clip_layers is None else clip_layers
    clip = frames * (n_clip * (2 * (P + 1) * (4 * c * c + 2 * c * e) + 4 * (P + 1) ** 2 * c)
                     + 2 * P * 3 * d["patch"] ** 2 * c)
    projector = frames * 2 * P * (c * h + h * h)
    out = dict(llm_linear=rows * per_row + vsts * per_vst, llm_attention=pairs * per_pair, clip=clip,
               projector=projector, lm_head=2 * h * d["vocab"])
    out["llm"] = out["llm_linear"] + out["llm_attention"] + out["lm_head"]
    out["vision"] = clip + projector
    out["total"] = out["llm"] + out["vision"]
    return out


# --------------------------------------------------------------------------------------------------------------------
# Child: one (frames, ratio) measurement
# --------------------------------------------------------------------------------------------------------------------


def rss_mb() -> float:
    """Current resident set size of this process, from the counters VmHWM comes from (/proc/self/statm's lag them by
    a few pages, enough to put a tiny run's base above its peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb(resettable: bool) -> float:
    if resettable:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Clock:
    """Wall-clock timer that waits for the device first (so CUDA kernels are counted where they run)."""

    def __init__(self, device):
        import torch

        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def __call__(self) -> float:
        self.sync()
        return time.perf_counter()


def model_classes(code_dir: str | None = None):
    """(VideoXLConfig, VideoXLForCausalLM) from the repository, or from a copy of its root .py files in `code_dir`
    (imported as the same `videoxl` package, the way scripts/local_import.py does it), for A/B runs of a change."""
    if not code_dir:
        from scripts.local_import import VideoXLConfig, VideoXLForCausalLM

        return VideoXLConfig, VideoXLForCausalLM
    import importlib
    import types

    package = types.ModuleType("videoxl")
    package.__path__ = [str(Path(code_dir).resolve())]
    sys.modules["videoxl"] = package
    configuration = importlib.import_module("videoxl.configuration_videoxl")
    modeling = importlib.import_module("videoxl.modeling_videoxl")
    return configuration.VideoXLConfig, modeling.VideoXLForCausalLM


def library_cache_kwarg(cache) -> dict:
    """`{"cache": cache}` or `{"past_key_values": cache}`: the name the installed transformers' own Qwen2 takes (from
    the loaded code's compat_videoxl)."""
    import importlib

    return importlib.import_module("videoxl.compat_videoxl").cache_field(cache)


def build_model(size: str, device, dtype, attn: str, seed: int = 0, code_dir: str | None = None):
    """A random-weight Video-XL built directly on `device` in `dtype` (the 7B never exists in fp32 on the host)."""
    import torch

    VideoXLConfig, VideoXLForCausalLM = model_classes(code_dir)
    config = VideoXLConfig(**preset(size))
    torch.manual_seed(seed)
    with torch.device(device):
        model = VideoXLForCausalLM._from_config(config, dtype=dtype, attn_implementation=attn)
    return model.eval()


def build_baseline_lm(model):
    """A `Qwen2ForCausalLM` whose parameters are the Video-XL language-model tensors themselves (no copy).

    The VST projections and embedding, the vision tower and the projector are left out (unexpected keys).
    """
    import torch
    from transformers import Qwen2ForCausalLM

    text_config = model.config.text_config
    text_config._attn_implementation = model.config._attn_implementation
    with torch.device("meta"):
        lm = Qwen2ForCausalLM(text_config)
    result = lm.load_state_dict(model.state_dict(), strict=False, assign=True)
    missing = [k for k in result.missing_keys if "rotary_emb" not in k]
    if missing:
        raise RuntimeError(f"baseline LM lacks weights: {missing[:5]}")
    unexpected = [k for k in result.unexpected_keys
                  if not any(s in k for s in ("beacon_", "vision_tower", "mm_projector"))]
    if unexpected:
        raise RuntimeError(f"unexpected Video-XL weights left out of the baseline: {unexpected[:5]}")
    lm.model.rotary_emb = model.model.rotary_emb  # same text config; its inv_freq is a real (non-meta) buffer
    return lm.eval()


def make_inputs(config, frames: int, device, dtype, seed: int = 0):
    """`input_ids` `[1, 14 + frames*tokens_per_frame + 12]` and random pixels `[1, frames, 3, H, W]`."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    vocab = config.text_config.vocab_size
    text = torch.randint(10, vocab - 10, (PREFIX_TOKENS + QUESTION_TOKENS,), generator=gen)
    video = torch.full((frames * config.tokens_per_frame,), config.video_token_id)
    ids = torch.cat([text[:PREFIX_TOKENS], video, text[PREFIX_TOKENS:]])[None].to(device)
    side = config.vision_config.image_size
    pixels = torch.empty(1, frames, 3, side, side, device=device, dtype=dtype)
    pixels.normal_(generator=torch.Generator(device=device).manual_seed(seed) if device.type == "cuda" else gen)
    return ids, pixels


def expected_kept(config, frames: int, ratio: int) -> int:
    """Spec 4.8: S + sum_k floor(W_k / r) + Q (every visual token when ratio is 0)."""
    visual = frames * config.tokens_per_frame
    if ratio == 0:
        return PREFIX_TOKENS + visual + QUESTION_TOKENS
    windows = [min(config.beacon_window, visual - start) for start in range(0, visual, config.beacon_window)]
    return PREFIX_TOKENS + sum(w // ratio for w in windows) + QUESTION_TOKENS


class Runner:
    """Prefill + decode of one configuration; `ratio` 0 is the uncompressed baseline."""

    def __init__(self, model, ratio: int, device):
        import torch

        self.torch = torch
        self.model, self.ratio, self.device = model, ratio, device
        self.clock = Clock(device)
        self.vision_s = self.vision_cpu_s = 0.0
        self.lm = build_baseline_lm(model) if ratio == 0 else None
        inner = model.model
        original = inner.encode_frames

        def timed_encode_frames(pixel_values):
            start, start_cpu = self.clock(), time.process_time()
            out = original(pixel_values)
            self.vision_s += self.clock() - start
            self.vision_cpu_s += time.process_time() - start_cpu
            return out

        inner.encode_frames = timed_encode_frames  # instance attribute: window_features calls it per window

    def prefill(self, ids, pixels):
        """Returns (logits of the last position, cache)."""
        torch = self.torch
        if self.ratio:
            out = self.model(ids, pixel_values_videos=pixels, compression_ratio=self.ratio, use_cache=True,
                             logits_to_keep=1)
            return out.logits, out.cache
        from transformers import DynamicCache

        inner, config = self.model.model, self.model.config
        per_frame = config.tokens_per_frame
        window_frames = max(config.beacon_window // per_frame, 1)
        frames = pixels.shape[1]
        visual_end = PREFIX_TOKENS + frames * per_frame
        embeds = torch.empty(1, ids.shape[1], config.text_config.hidden_size, device=ids.device,
                             dtype=inner.embed_tokens.weight.dtype)
        embeds[:, :PREFIX_TOKENS] = inner.embed_tokens(ids[:, :PREFIX_TOKENS])
        for first in range(0, frames, window_frames):  # same CLIP batches as the compressed path
            last = min(first + window_frames, frames)
            features = inner.encode_frames(pixels[0, first:last])
            embeds[:, PREFIX_TOKENS + first * per_frame : PREFIX_TOKENS + last * per_frame] = features.reshape(
                1, -1, features.shape[-1])
            del features
        embeds[:, visual_end:] = inner.embed_tokens(ids[:, visual_end:])
        cache = DynamicCache(config=self.lm.config)
        out = self.lm(inputs_embeds=embeds, **library_cache_kwarg(cache), use_cache=True, logits_to_keep=1)
        return out.logits, cache

    def decode(self, logits, cache, steps: int) -> float:
        """Greedy decode `steps` tokens one at a time against `cache`; milliseconds per token."""
        next_ids = logits[:, -1:].argmax(-1)
        start, start_cpu = self.clock(), time.process_time()
        for _ in range(steps):
            if self.ratio:
                out = self.model(next_ids, cache=cache, use_cache=True, logits_to_keep=1)
            else:
                out = self.lm(input_ids=next_ids, **library_cache_kwarg(cache), use_cache=True, logits_to_keep=1)
            next_ids = out.logits[:, -1:].argmax(-1)
        self.decode_cpu_ms = (time.process_time() - start_cpu) / steps * 1000
        return (self.clock() - start) / steps * 1000


def run_child(spec: dict) -> dict:
    """Measure one (frames, ratio) point in this (fresh) process."""
    if spec.get("mem_limit_gb"):
        limit = int(spec["mem_limit_gb"] * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    sys.path.insert(0, str(REPO_ROOT))
    import torch
    import transformers

    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    frames, ratio = spec["frames"], spec["ratio"]
    load_start = os.getloadavg()[0]

    with torch.inference_mode():
        model = build_model(spec["size"], device, dtype, spec["attn"], code_dir=spec.get("model_code"))
        config = model.config
        runner = Runner(model, ratio, device)

        # Warm-up on a small input: allocator pools, kernels, lazy imports.
        warm_ids, warm_pixels = make_inputs(config, WARMUP_FRAMES, device, dtype, seed=1)
        logits, cache = runner.prefill(warm_ids, warm_pixels)
        runner.decode(logits, cache, 2)
        del logits, cache, warm_ids, warm_pixels

        ids, pixels = make_inputs(config, frames, device, dtype)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base_mb = torch.cuda.memory_allocated() / 2**20
        else:
            base_mb = rss_mb()

        prefill_s, vision_s, prefill_cpu_s, vision_cpu_s, decode_ms, peak_mb, kept = [], [], [], [], [], [], None
        decode_cpu_ms = []
        resettable = False
        for _ in range(spec["repeats"]):
            gc.collect()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            else:
                resettable = reset_peak_rss()
                # the collection above may hand freed pages back (mmap allocator): memory before the prefill is what
                # is left now, which the reset high-water mark starts from
                base_mb = min(base_mb, rss_mb())
            runner.vision_s = runner.vision_cpu_s = 0.0
            start, start_cpu = runner.clock(), time.process_time()
            logits, cache = runner.prefill(ids, pixels)
            prefill_s.append(runner.clock() - start)
            prefill_cpu_s.append(time.process_time() - start_cpu)
            vision_s.append(runner.vision_s)
            vision_cpu_s.append(runner.vision_cpu_s)
            if device.type == "cuda":
                peak_mb.append(torch.cuda.max_memory_allocated() / 2**20)
            else:
                peak_mb.append(peak_rss_mb(resettable))
            kept = cache.get_seq_length()
            decode_ms.append(runner.decode(logits, cache, spec["decode_tokens"]))
            decode_cpu_ms.append(runner.decode_cpu_ms)
            del logits, cache

    median = statistics.median
    return dict(
        frames=frames,
        ratio=ratio,
        prefill_s=median(prefill_s),
        vision_s=median(vision_s),
        llm_s=median(p - v for p, v in zip(prefill_s, vision_s)),
        # CPU seconds of this process (all its threads): with --threads 1 on a busy machine, far steadier than wall
        # time, which also counts the time other processes hold the cores.
        prefill_cpu_s=median(prefill_cpu_s),
        vision_cpu_s=median(vision_cpu_s),
        base_mb=base_mb,
        peak_mb=max(peak_mb),
        work_mb=max(peak_mb) - base_mb,
        kept=kept,
        expected_kept=expected_kept(config, frames, ratio),
        decode_ms=median(decode_ms),
        decode_cpu_ms=median(decode_cpu_ms),
        prefill_s_all=prefill_s,
        prefill_cpu_s_all=prefill_cpu_s,
        peak_mb_all=peak_mb,
        size=spec["size"],
        device=spec["device"],
        device_name=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        dtype=spec["dtype"],
        attn=spec["attn"],
        repeats=spec["repeats"],
        decode_tokens=spec["decode_tokens"],
        threads=torch.get_num_threads(),
        peak_method="cuda.max_memory_allocated" if device.type == "cuda"
        else ("VmHWM after clear_refs" if resettable else "ru_maxrss"),
        cpu_allocator=spec.get("cpu_allocator"),
        loadavg_start=load_start,
        loadavg_end=os.getloadavg()[0],
        torch=torch.__version__,
        transformers=transformers.__version__,
        model_code=spec.get("model_code") or "repo",
        model_tflop=point_flops(spec["size"], frames, ratio)["total"] / 1e12,
    )


# --------------------------------------------------------------------------------------------------------------------
# Parent: schedule children, collect, report
# --------------------------------------------------------------------------------------------------------------------


PRELOAD = ["__main__", "torch", "transformers", "transformers.modeling_utils", "transformers.cache_utils",
           "transformers.generation", "transformers.models.qwen2.modeling_qwen2",
           "transformers.models.clip.modeling_clip"]


def child_main(spec: dict, conn) -> None:
    """Entry point of a measurement process: send ("ok", record) or ("error", text) back through `conn`."""
    try:
        conn.send(("ok", run_child(spec)))
    except BaseException as error:  # noqa: BLE001 - any failure is reported as a skipped point
        text = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        oom = isinstance(error, MemoryError) or "out of memory" in text.lower() or "can't allocate" in text.lower()
        conn.send(("oom" if oom else "error", text[:300]))
    finally:
        conn.close()


def measure(spec: dict, timeout: float) -> dict:
    """Run one measurement in a fresh process; an OOM, a crash or a timeout becomes a skipped record.

    On Linux the process is forked from a fork server that has only imported torch and transformers (no tensor
    work, no threads), which saves ~10 s of imports per point; elsewhere it is spawned.
    """
    import multiprocessing as mp

    method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(PRELOAD)
    receiver, sender = ctx.Pipe(duplex=False)
    start = time.perf_counter()
    proc = ctx.Process(target=child_main, args=(spec, sender), daemon=True)
    proc.start()
    sender.close()
    message = None
    try:
        if receiver.poll(timeout):
            message = receiver.recv()
    except EOFError:
        pass
    if message is None and proc.is_alive():
        proc.kill()
        proc.join()
        return skipped(spec, f"timeout after {timeout:.0f} s")
    proc.join()
    if message is None:
        return skipped(spec, "killed (out of memory?)" if proc.exitcode in (-9, 137) else f"exit {proc.exitcode}")
    status, payload = message
    if status != "ok":
        return skipped(spec, ("out of memory: " if status == "oom" else "") + payload)
    payload["child_wall_s"] = time.perf_counter() - start
    return payload


def skipped(spec: dict, reason: str) -> dict:
    record = {field: None for field in RECORD_FIELDS}
    record.update(frames=spec["frames"], ratio=spec["ratio"], skipped=reason, size=spec["size"],
                  device=spec["device"], dtype=spec["dtype"], attn=spec["attn"], repeats=spec["repeats"])
    return record


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(records: list[dict]) -> str:
    with_decode_cpu = any(r.get("decode_cpu_ms") is not None for r in records)
    lines = [
        "| frames | ratio | kept | prefill s | vision s | LLM s | prefill CPU s | vision CPU s | base MB | peak MB "
        "| working MB | decode ms/tok |" + (" decode CPU ms/tok |" if with_decode_cpu else ""),
        "|---:" * (13 if with_decode_cpu else 12) + "|",
    ]
    for r in sorted(records, key=lambda r: (r["frames"], r["ratio"])):
        ratio = "none" if r["ratio"] == 0 else str(r["ratio"])
        if r.get("skipped"):
            lines.append(f"| {r['frames']} | {ratio} | | skipped: {r['skipped']} |" + " |" * (9 if with_decode_cpu else 8))
            continue
        lines.append(
            f"| {r['frames']} | {ratio} | {r['kept']} | {fmt(r['prefill_s'], '.2f')} | {fmt(r['vision_s'], '.2f')} "
            f"| {fmt(r['prefill_s'] - r['vision_s'], '.2f')} | {fmt(r.get('prefill_cpu_s'), '.2f')} "
            f"| {fmt(r.get('vision_cpu_s'), '.2f')} | {fmt(r['base_mb'], '.0f')} "
            f"| {fmt(r['peak_mb'], '.0f')} | {fmt(r['peak_mb'] - r['base_mb'], '.0f')} | {fmt(r['decode_ms'], '.1f')} |"
            + (f" {fmt(r.get('decode_cpu_ms'), '.1f')} |" if with_decode_cpu else "")
        )
    return "\n".join(lines)


def goal_checks(records: list[dict]) -> str:
    """The issue's goals (stated for the small preset on CPU; computed for whatever was measured).

    Time is compared in CPU seconds of the process when every record ran single-threaded (then wall time also
    counts how long other jobs held the cores, which differs from point to point on a shared machine), else in
    wall seconds.
    """
    ok = {(r["frames"], r["ratio"]): r for r in records if not r.get("skipped")}
    if not ok:
        return "no measurements"
    any_record = next(iter(ok.values()))
    size = any_record["size"]
    kv_per_pos = kv_bytes_per_position(size, any_record["dtype"])
    ratios = sorted({r for _, r in ok if r > 0})
    cpu = all(r.get("threads") == 1 and r.get("prefill_cpu_s") for r in ok.values())
    total, vision = ("prefill_cpu_s", "vision_cpu_s") if cpu else ("prefill_s", "vision_s")
    other = "prefill_s" if cpu else "prefill_cpu_s"
    unit = "CPU s" if cpu else "s"
    lines = [f"(time basis: {'CPU seconds of the single-threaded process' if cpu else 'wall seconds'})"]

    def work(rec):
        return rec["peak_mb"] - rec["base_mb"]

    lo, hi = 128, 1024
    for ratio in ratios:
        a, b = ok.get((lo, ratio)), ok.get((hi, ratio))
        if not (a and b):
            continue
        time_ratio = b[total] / a[total]
        modelled = point_flops(size, hi, ratio)["total"] / point_flops(size, lo, ratio)["total"]
        lines.append(
            f"- r={ratio}: prefill({hi})/prefill({lo}) = {b[total]:.1f}/{a[total]:.1f} {unit} = {time_ratio:.2f} "
            f"(goal <= 8.8: {'PASS' if time_ratio <= 8.8 else 'FAIL'}; the FLOP model of this size says "
            f"{modelled:.2f}); LLM part {(b[total] - b[vision]) / (a[total] - a[vision]):.2f}, vision part "
            f"{b[vision] / a[vision]:.2f}"
            + (f"; [the other clock: {b[other] / a[other]:.2f}]" if a.get(other) and b.get(other) else ""))
        kv_growth = (b["kept"] - a["kept"]) * kv_per_pos / 2**20
        wm_growth = work(b) - work(a)
        lines.append(f"  working memory {work(a):.0f} -> {work(b):.0f} MB: {wm_growth:+.0f} MB vs kept K/V "
                     f"+{kv_growth:.0f} MB ({b['kept'] - a['kept']} positions x {kv_per_pos} B); goal <= "
                     f"{1.1 * kv_growth:.0f} MB: {'PASS' if wm_growth <= 1.1 * kv_growth else 'FAIL'}")
    if len(lines) == 1:
        lines.append(f"- (time/memory growth checks need {lo} and {hi} frames)")
    base, r16 = ok.get((256, 0)), ok.get((256, 16))
    if base and r16:
        mem_factor = work(base) / max(work(r16), 1e-9)
        speed = base[total] / r16[total]
        lines.append(f"- 256 frames, r=16 vs no compression: working memory {work(r16):.0f} vs {work(base):.0f} MB "
                     f"= {mem_factor:.2f}x less (goal >= 3x: {'PASS' if mem_factor >= 3 else 'FAIL'}); prefill "
                     f"{r16[total]:.1f} vs {base[total]:.1f} {unit} = {speed:.2f}x faster "
                     f"({'PASS' if speed > 1 else 'FAIL'})"
                     + (f" [the other clock: {base[other] / r16[other]:.2f}x]"
                        if r16.get(other) and base.get(other) else "")
                     + f"; decode {r16['decode_ms']:.1f} vs {base['decode_ms']:.1f} ms/token")
    else:
        lines.append("- (the 256-frame check needs 256 frames at r=16 and the baseline)")
    return "\n".join(lines)


def model_table(size: str, dtype: str, frames: list[int], ratios: list[int]) -> str:
    """The FLOP / byte model of a size preset as markdown (what benchmarks/README.md quotes for the 7B)."""
    d = dims(size)
    kv = kv_bytes_per_position(size, dtype)
    T = d["tokens_per_frame"]
    lines = [f"size={size}, {dtype}: K/V per kept position = {d['layers']} layers x 2 x {d['kv_heads']} KV heads x "
             f"{d['head_dim']} x {kv // (d['layers'] * 2 * d['kv_heads'] * d['head_dim'])} B = {kv} B "
             f"({kv / 1024:g} KiB); {T} tokens per frame; window {d['window']} tokens", "",
             "Per frame (marginal cost of one more frame; a window of W tokens has W + W/r rows):", "",
             "| ratio | kept positions per frame | K/V per frame | LLM linear GFLOP | in-window attention GFLOP | "
             "attention GFLOP per 1,000 kept positions | CLIP+projector GFLOP |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    h, q, kvd, m, L = d["hidden"], d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"], d["mlp"], d["layers"]
    per_row = 2 * L * (h * q + 2 * h * kvd + q * h + 3 * h * m)
    per_vst = 2 * L * (h * q + 2 * h * kvd)
    per_pair = 4 * L * q
    vision = point_flops(size, 1, 16)["vision"]
    for ratio in [0] + ratios:
        kept = T if ratio == 0 else T / ratio
        rows = T + (0 if ratio == 0 else T / ratio)
        window_rows = d["window"] + (0 if ratio == 0 else d["window"] / ratio)
        linear = rows * per_row + (T / ratio * per_vst if ratio else 0)
        in_window = rows * (window_rows + 1) / 2 * per_pair if ratio else None
        lines.append(f"| {'none' if ratio == 0 else ratio} | {kept:g} | {kept * kv / 2**20:.3f} MiB | {linear / 1e9:.0f} "
                     f"| {'(causal over all earlier frames)' if ratio == 0 else f'{in_window / 1e9:.0f}'} "
                     f"| {rows * 1000 * per_pair / 1e9:.0f} | {vision / 1e9:.0f} |")
    lines += ["", "| frames | ratio | kept positions | kept K/V GiB | LLM linear PFLOP | LLM attention PFLOP | "
              "CLIP+proj PFLOP | total PFLOP | s at 989 TFLOP/s |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for f in frames:
        for ratio in [0] + ratios:
            c = point_flops(size, f, ratio)
            kept_positions = PREFIX_TOKENS + QUESTION_TOKENS + (f * T if ratio == 0 else sum(
                min(d["window"], f * T - s) // ratio for s in range(0, f * T, d["window"])))
            lines.append(f"| {f} | {'none' if ratio == 0 else ratio} | {kept_positions} | "
                         f"{kept_positions * kv / 2**30:.2f} | {c['llm_linear'] / 1e15:.3f} | "
                         f"{c['llm_attention'] / 1e15:.3f} | {c['vision'] / 1e15:.3f} | {c['total'] / 1e15:.3f} | "
                         f"{c['total'] / 989e12:.2f} |")
    return "\n".join(lines)


def plot(records: list[dict], path: str, title: str, time_field: str = "prefill_s") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if not r.get("skipped")]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for ratio in sorted({r["ratio"] for r in ok}, key=lambda r: (r == 0, r)):
        rows = sorted((r for r in ok if r["ratio"] == ratio), key=lambda r: r["frames"])
        frames = [r["frames"] for r in rows]
        style = dict(color="black", linestyle="--", marker="s", label="no compression") if ratio == 0 else dict(
            marker="o", label=f"r = {ratio}")
        axes[0].plot(frames, [r[time_field] for r in rows], **style)
        axes[1].plot(frames, [max(r["peak_mb"] - r["base_mb"], 1e-3) for r in rows], **style)
        axes[2].plot(frames, [r["decode_ms"] for r in rows], **style)
    time_label = "prefill CPU seconds (process)" if time_field == "prefill_cpu_s" else "prefill seconds (wall)"
    for ax, label in zip(axes, (time_label, "working memory, MB (peak - base)", "decode ms / token")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("frames")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--size", choices=("tiny", "small", "7b"), default="small",
                        help="model size preset (random weights)")
    parser.add_argument("--frames", type=parse_ints, default=parse_ints("32,64,128,256,512,1024"),
                        help="comma-separated frame counts")
    parser.add_argument("--ratios", type=parse_ints, default=parse_ints("2,4,8,16"),
                        help="comma-separated compression ratios")
    parser.add_argument("--repeats", type=int, default=3, help="runs per point (the median is reported)")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the uncompressed baseline (ratio 0)")
    parser.add_argument("--max-baseline-frames", type=int, default=None,
                        help="largest frame count for the baseline (default: 512 on CPU, no limit on CUDA)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the model runs")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--attn", choices=("sdpa", "eager", "flash_attention_2"), default="sdpa",
                        help="attention implementation")
    parser.add_argument("--decode-tokens", type=int, default=16, help="greedy tokens decoded after the prefill")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in the child (0: torch's default)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per child before it counts as skipped")
    parser.add_argument("--mem-limit-gb", type=float, default=None,
                        help="address-space limit of each child (CPU): an allocation beyond it fails cleanly")
    parser.add_argument("--max-tflop", type=float, default=None,
                        help="skip points whose modelled prefill cost (point_flops) exceeds this many TFLOP")
    parser.add_argument("--model-code", default=None,
                        help="import the model from a copy of the repository's root .py files in this folder (A/B)")
    parser.add_argument("--model-table", action="store_true",
                        help="print the FLOP / byte model of --size (no measurement) and exit")
    parser.add_argument("--report", nargs="+", metavar="JSON",
                        help="measure nothing: print the table and goal checks of these result files (merged), and "
                             "plot them with --png")
    parser.add_argument("--plot-time", choices=("wall", "cpu"), default="wall",
                        help="time axis of --png: wall seconds, or CPU seconds of the process (steadier with "
                             "--threads 1 on a busy machine)")
    parser.add_argument("--cpu-allocator", choices=("mmap", "glibc"), default="mmap",
                        help="CPU: tensors over 128 KiB in their own mappings (mmap: peak RSS = live tensors) or "
                             "glibc's default heap (peak RSS also counts its slack)")
    parser.add_argument("--json", help="write the records here")
    parser.add_argument("--png", help="plot time, working memory and decode vs frames here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    if args.child:
        # One point in this process, printed as JSON (for profilers: py-spy record -- python prefill.py --child ...).
        print(json.dumps(run_child(json.loads(args.child)), indent=1), flush=True)
        return 0

    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.report:
        records = [r for path in args.report for r in json.loads(Path(path).read_text())]
        print(markdown_table(records))
        print()
        print("Goal checks (issue 6; stated for the small preset on this CPU):")
        print(goal_checks(records))
        if args.png:
            first = next((r for r in records if not r.get("skipped")), records[0])
            plot(records, args.png, f"Video-XL prefill, size={first['size']}, {first['device']} {first['dtype']}, "
                                    f"attn={first['attn']}",
                 "prefill_cpu_s" if args.plot_time == "cpu" else "prefill_s")
        return 0
    if args.model_table:
        print(model_table(args.size, args.dtype or ("bfloat16" if args.size == "7b" else dtype), args.frames,
                          args.ratios))
        return 0
    max_baseline = args.max_baseline_frames
    if max_baseline is None:
        max_baseline = 512 if args.device == "cpu" else 1 << 30
    runs = [(f, r) for f in args.frames for r in args.ratios]
    if args.baseline:
        runs += [(f, 0) for f in args.frames if f <= max_baseline]
    runs.sort()

    planned = [point_flops(args.size, f, r)["total"] / 1e12 for f, r in runs]
    planned = sum(t for t in planned if args.max_tflop is None or t <= args.max_tflop)
    print(f"{len(runs)} points, modelled work {planned:.1f} TFLOP x {args.repeats} repeats (+ warm-ups); at "
          f"~40 GFLOP/s per CPU thread (this 2-core machine, float32) that is about "
          f"{planned * args.repeats / 0.04 / 60:.0f} min of CPU time", flush=True)
    if args.device == "cpu" and args.cpu_allocator == "mmap":
        # Read by glibc when a process starts: the fork server (started by the first point) and its children.
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    started = time.perf_counter()
    records = []
    for frames, ratio in runs:
        spec = dict(size=args.size, frames=frames, ratio=ratio, device=args.device, dtype=dtype, attn=args.attn,
                    repeats=args.repeats, decode_tokens=args.decode_tokens, threads=args.threads,
                    mem_limit_gb=args.mem_limit_gb, model_code=args.model_code,
                    cpu_allocator=args.cpu_allocator if args.device == "cpu" else None)
        tflop = point_flops(args.size, frames, ratio)["total"] / 1e12
        if args.max_tflop is not None and tflop > args.max_tflop:
            record = skipped(spec, f"modelled cost {tflop:.1f} TFLOP > --max-tflop {args.max_tflop:g}")
        else:
            record = measure(spec, args.timeout)
        records.append(record)
        if record.get("skipped"):
            print(f"frames={frames:5d} ratio={ratio:2d}: skipped ({record['skipped']})", flush=True)
        else:
            print(f"frames={frames:5d} ratio={ratio:2d}: prefill {record['prefill_s']:8.2f} s (vision "
                  f"{record['vision_s']:7.2f}) peak {record['peak_mb']:7.0f} MB base {record['base_mb']:7.0f} MB "
                  f"kept {record['kept']:7d} decode {record['decode_ms']:6.1f} ms  [load "
                  f"{record['loadavg_start']:.1f}->{record['loadavg_end']:.1f}, child {record['child_wall_s']:.0f} s]",
                  flush=True)
        if args.json:  # after every point, so a long run that is interrupted keeps what it measured
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(records, indent=1) + "\n")

    total = time.perf_counter() - started
    print()
    print(f"size={args.size} device={args.device} dtype={dtype} attn={args.attn} repeats={args.repeats} "
          f"threads={args.threads or 'default'} model code={args.model_code or 'repo'} (median prefill, max peak); "
          f"total {total / 60:.1f} min")
    print()
    print(markdown_table(records))
    print()
    print("Goal checks (issue 6; stated for the small preset on this CPU):")
    print(goal_checks(records))
    if args.png:
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        plot(records, args.png, f"Video-XL prefill, size={args.size}, {args.device} {dtype}, attn={args.attn}",
             "prefill_cpu_s" if args.plot_time == "cpu" else "prefill_s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
