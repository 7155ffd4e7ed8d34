"""Smoke tests of the benchmarks: benchmarks/prefill.py's tiny preset through its command line, benchmarks/gpu.py's
tiny preset on the CPU."""

import json
import subprocess
import sys

import pytest

from scripts.local_import import REPO_ROOT


FIELDS = ("frames", "ratio", "prefill_s", "vision_s", "base_mb", "peak_mb", "kept", "decode_ms",
          "device", "dtype", "attn", "size", "repeats")
PREFIX, QUESTION, TOKENS_PER_FRAME, WINDOW = 14, 12, 16, 64  # the tiny preset: 16 tokens a frame, 4-frame windows


def expected_kept(frames: int, ratio: int) -> int:
    """S + sum_k floor(W_k / r) + Q; every visual token for the baseline (ratio 0)."""
    visual = frames * TOKENS_PER_FRAME
    if ratio == 0:
        return PREFIX + visual + QUESTION
    windows = [min(WINDOW, visual - start) for start in range(0, visual, WINDOW)]
    return PREFIX + sum(w // ratio for w in windows) + QUESTION


@pytest.mark.slow
def test_tiny_run_writes_records(tmp_path):
    out = tmp_path / "tiny.json"
    png = tmp_path / "tiny.png"
    # 18 and 32 frames: several windows, a partial last one, and working memory far above the page-level fuzz of the kernel's RSS
    # counters (at 2 frames the baseline's was about 70 KB, and a fresh-clone run read its peak 4 KB under its base)
    cmd = [sys.executable, str(REPO_ROOT / "benchmarks" / "prefill.py"), "--size", "tiny", "--frames", "18,32",
           "--ratios", "4", "--repeats", "1", "--decode-tokens", "2", "--threads", "1", "--timeout", "120",
           "--json", str(out), "--png", str(png)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| frames | ratio |" in proc.stdout

    records = json.loads(out.read_text())
    assert sorted((r["frames"], r["ratio"]) for r in records) == [(18, 0), (18, 4), (32, 0), (32, 4)]
    for record in records:
        assert not record.get("skipped"), record
        for field in FIELDS:
            assert record[field] is not None, (field, record)
        assert record["size"] == "tiny" and record["device"] == "cpu" and record["repeats"] == 1
        assert record["kept"] == expected_kept(record["frames"], record["ratio"]), record
        assert 0 < record["vision_s"] <= record["prefill_s"]
        assert 0 < record["base_mb"] <= record["peak_mb"]
        assert record["decode_ms"] > 0
    # 18 frames = 288 tokens = four full windows of 64 and one of 32 at r = 4: 64 + 8 VSTs instead of 288 tokens.
    kept = {(r["frames"], r["ratio"]): r["kept"] for r in records}
    assert kept[(18, 4)] == 14 + 72 + 12 and kept[(18, 0)] == 14 + 288 + 12 and kept[(32, 4)] == 14 + 128 + 12
    assert png.stat().st_size > 0


def test_baseline_is_the_same_language_model():
    """The uncompressed baseline shares the Video-XL tensors and computes the same function where nothing is
    compressed (a text-only prompt)."""
    import importlib.util

    import torch

    spec = importlib.util.spec_from_file_location("prefill_bench", REPO_ROOT / "benchmarks" / "prefill.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model = bench.build_model("tiny", torch.device("cpu"), torch.float32, "sdpa")
    lm = bench.build_baseline_lm(model)
    assert lm.lm_head.weight.data_ptr() == model.lm_head.weight.data_ptr()
    assert lm.model.layers[1].mlp.up_proj.weight.data_ptr() == model.model.layers[1].mlp.up_proj.weight.data_ptr()
    ids = torch.randint(10, 900, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(lm(input_ids=ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    assert bench.expected_kept(model.config, 6, 4) == 14 + 16 + 8 + 12  # windows of 64 and 32 tokens


def test_gpu_benchmark_runs_its_tiny_preset_on_the_cpu(tmp_path):
    """benchmarks/gpu.py end to end on the tiny preset: the compared short case, the prefill + decode record, the
    doubling up to --max-frames, one JSON."""
    from benchmarks import gpu

    out = tmp_path / "gpu.json"
    assert gpu.main(["--preset", "tiny", "--device", "cpu", "--frames", "4", "--max-frames", "8", "--check-frames",
                     "4", "--decode-tokens", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["comparison"]["reference"] == "sdpa" and len(result["comparison"]["tokens"]["sdpa"]) == 8
    assert [(r["attn"], r["frames"]) for r in result["records"]] == [("sdpa", 4), ("sdpa", 8)]
    for record in result["records"]:
        assert record["prefill_s"] > 0 and record["peak_mb"] > 0 and record["decode_ms"] > 0
        assert record["kept"] == 14 + record["frames"] * TOKENS_PER_FRAME // 16 + 12  # whole windows at r = 16
    assert result["most_frames_run"] == 8
