#!/usr/bin/env python
"""Benchmark: uniformly sample 128 / 512 frames from a 20-minute 640x360 H.264 video.

Methods, each run in a fresh subprocess (peak RSS from resource.getrusage):

* `pyav-seek`      video_decoding_videoxl.read_video_frames: demux index, keyframe seeks, RGB frames
                   (the same uint8 [H, W, 3] frames decord returns);
* `pyav-seek+clip` the same with the image processor's resize_crop + frames_to_pixels: the same plus CLIP-336 resize/crop/normalize
                   (float32 [F, 3, 336, 336], what the model gets);
* `decord`         decord 0.6.0 `VideoReader.get_batch` (what the original Video-XL used), if installed;
* `decord+clip`    decord frames, then the same CLIP preprocessing;
* `naive`          PyAV decodes and converts every frame, keeping the sampled ones (holding all
                   decoded frames instead would need 36,000 x 691 KB = 25 GB).

`pyav-seek` also runs on a 2-minute cut of the same content to show that its peak memory does not
grow with the video's length. Videos are generated once with PyAV and cached in
benchmarks/.cache/ (ignored by git). Results: a markdown table on stdout and
benchmarks/results/video_decode.json.

Usage: python benchmarks/video_decode.py [--minutes 20] [--frames 128 512] [--methods ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.cli import HelpFormatter  # noqa: E402


HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / ".cache"
RESULTS = HERE / "results" / "video_decode.json"
WIDTH, HEIGHT, FPS, GOP_SECONDS = 640, 360, 30, 3
METHODS = ("pyav-seek", "pyav-seek+clip", "decord", "decord+clip", "naive")
REPEATED = ("pyav-seek", "decord")  # the head-to-head comparison; the machine is shared, so repeat it


# ------------------------------------------------------------------------------------------------
# test video
# ------------------------------------------------------------------------------------------------


def _textures(rng: np.random.Generator, count: int = 16) -> list[np.ndarray]:
    """Smooth random textures (camera-like entropy, so the encoder and decoder do real work)."""
    textures = []
    for _ in range(count):
        coarse = rng.integers(0, 256, (HEIGHT // 8 + 1, WIDTH // 8 + 1, 3), dtype=np.uint8)
        fine = np.kron(coarse, np.ones((8, 8, 1), np.uint8))[:HEIGHT, :WIDTH]
        textures.append(np.clip(fine.astype(np.int16) + rng.integers(-12, 12, fine.shape), 0, 255).astype(np.uint8))
    return textures


def make_video(path: Path, minutes: float) -> Path:
    """640x360, 30 fps, H.264 (MPEG-4 part 2 without libx264), keyframe every 3 s, B-frames."""
    import av

    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.parent / ".gitignore").write_text("*\n")
    textures = _textures(np.random.default_rng(0))
    tmp = path.with_suffix(".part.mp4")
    n_frames = int(minutes * 60 * FPS)
    with av.open(str(tmp), "w") as container:
        try:
            stream = container.add_stream("libx264", rate=FPS)
            stream.options = {"preset": "veryfast", "crf": "23", "bf": "2", "sc_threshold": "0"}
        except Exception:  # no libx264 in this PyAV build
            stream = container.add_stream("mpeg4", rate=FPS)
            stream.bit_rate = 1_500_000
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.codec_context.gop_size = FPS * GOP_SECONDS
        stream.codec_context.time_base = Fraction(1, FPS)
        for i in range(n_frames):
            scene = textures[(i // (FPS * 10)) % len(textures)]  # a new "shot" every 10 s, panning
            image = np.roll(scene, shift=(i % (FPS * 10)) * 3, axis=1)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.rename(path)
    return path


# ------------------------------------------------------------------------------------------------
# workers (one per subprocess)
# ------------------------------------------------------------------------------------------------


def _uniform(total: int, count: int) -> list[int]:
    return np.linspace(0, total - 1, count, dtype=int).tolist()


def _decord_frames(path: str, count: int) -> np.ndarray:
    from decord import VideoReader, cpu

    reader = VideoReader(path, ctx=cpu(0))
    return reader.get_batch(_uniform(len(reader), count)).asnumpy()


def _naive_frames(path: str, count: int) -> np.ndarray:
    import av

    with av.open(path) as container:
        total = sum(1 for packet in container.demux(video=0) if packet.size)
    wanted, kept = set(_uniform(total, count)), {}
    with av.open(path) as container:
        container.streams.video[0].codec_context.thread_type = "AUTO"
        for index, frame in enumerate(container.decode(video=0)):
            rgb = frame.to_ndarray(format="rgb24")  # naive: every frame converted
            if index in wanted:
                kept[index] = rgb
    return np.stack([kept[i] for i in _uniform(total, count)])


def run_method(method: str, path: str, count: int) -> dict:
    """Load `count` frames with `method`; return seconds, peak RSS and the output's shape."""
    sys.path.insert(0, str(ROOT))
    from scripts.local_import import processing  # imported before timing: import cost is not decode cost

    pv = processing()
    if method.startswith("decord"):
        import decord  # noqa: F401
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    image_processor = pv.VideoXLImageProcessor()
    sampling = pv.VideoSampling(num_frames=count, max_frames=count)
    start = time.perf_counter()
    if method == "pyav-seek":
        frames, _ = pv.read_video_frames(path, sampling, np.asarray)
        output = np.stack(frames)
    elif method == "pyav-seek+clip":  # exactly what VideoXLProcessor does for a video
        crops, _ = pv.read_video_frames(path, sampling, image_processor.resize_crop)
        output = image_processor.frames_to_pixels(crops)
    elif method == "decord":
        output = _decord_frames(path, count)
    elif method == "decord+clip":
        from PIL import Image

        raw = _decord_frames(path, count)
        output = image_processor.frames_to_pixels([image_processor.resize_crop(Image.fromarray(f)) for f in raw])
    elif method == "naive":
        output = _naive_frames(path, count)
    else:
        raise ValueError(method)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": round(seconds, 3), "peak_rss_mb": round(peak, 1), "rss_after_imports_mb": round(base_rss, 1),
            "output_shape": list(output.shape), "output_dtype": str(output.dtype)}


def check_agreement(path: str, count: int = 32) -> dict:
    """Our frames against decord's at the same indices (both are RGB of the same decoded frames)."""
    sys.path.insert(0, str(ROOT))
    from scripts.local_import import processing

    pv = processing()
    ours, meta = pv.read_video_frames(path, pv.VideoSampling(num_frames=count), np.asarray)
    theirs = _decord_frames(path, count)
    diff = np.abs(np.stack(ours).astype(np.int16) - theirs.astype(np.int16))
    return {"frames": count, "max_abs_diff": int(diff.max()), "mean_abs_diff": float(diff.mean()),
            "total_frames_ours": meta.total_num_frames}


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------


def _subprocess(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def decord_available() -> str | None:
    """decord's version if it imports in a subprocess, else None."""
    proc = subprocess.run([sys.executable, "-c", "import decord; print(decord.__version__)"],
                          capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def summarize(method: str, video: str, count: int, runs: list[dict]) -> dict:
    """Median seconds and the largest peak over repeated runs of one configuration."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"method": method, "video": video, "frames": count, "error": runs[0]["error"]}
    return {"method": method, "video": video, "frames": count, "runs": len(ok),
            "seconds_median": round(float(np.median([r["seconds"] for r in ok])), 2),
            "seconds_all": [r["seconds"] for r in ok],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in ok),
            "peak_over_imports_mb": round(max(r["peak_rss_mb"] - r["rss_after_imports_mb"] for r in ok), 1),
            "output": f"{ok[0]['output_dtype']} {'x'.join(map(str, ok[0]['output_shape']))}"}


def markdown(rows: list[dict]) -> str:
    lines = ["| method | video | frames | seconds (median) | peak RSS MB | peak - RSS after imports MB | output |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['video']} | {r['frames']} | error: {r['error']} | | | |")
            continue
        lines.append(f"| {r['method']} | {r['video']} | {r['frames']} | {r['seconds_median']:.2f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['peak_over_imports_mb']:.0f} | {r['output']} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0, help="length of the long video")
    parser.add_argument("--short-minutes", type=float, default=2.0,
                        help="length of the short cut (pyav-seek's memory check)")
    parser.add_argument("--frames", type=int, nargs="+", default=[128, 512], help="frame counts to sample")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="decoding methods to run")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of the decoder-only configurations (pyav-seek, decord), interleaved; "
                             "the others run once")
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "PATH", "FRAMES"), help=argparse.SUPPRESS)
    parser.add_argument("--agreement", metavar="PATH", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        print(json.dumps(run_method(args.worker[0], args.worker[1], int(args.worker[2]))))
        return 0
    if args.agreement:
        print(json.dumps(check_agreement(args.agreement)))
        return 0

    start = time.perf_counter()
    long_video = make_video(CACHE / f"bench_{args.minutes:g}min_{WIDTH}x{HEIGHT}.mp4", args.minutes)
    short_video = make_video(CACHE / f"bench_{args.short_minutes:g}min_{WIDTH}x{HEIGHT}.mp4", args.short_minutes)
    print(f"videos ready in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    decord_version = decord_available()
    methods = [m for m in args.methods if decord_version or not m.startswith("decord")]

    configs = [(m, long_video, f"{args.minutes:g} min", n) for n in args.frames for m in methods]
    configs.append(("pyav-seek", short_video, f"{args.short_minutes:g} min", args.frames[0]))
    runs: dict[int, list[dict]] = {k: [] for k in range(len(configs))}
    for repeat in range(args.repeats):  # interleaved, so that load from other processes hits all alike
        for k, (method, path, _, count) in enumerate(configs):
            if repeat > 0 and method not in REPEATED:
                continue
            runs[k].append(_subprocess(["--worker", method, str(path), str(count)]))
            print(method, count, path.name, runs[k][-1], file=sys.stderr)
    rows = [summarize(method, video, count, runs[k]) for k, (method, _, video, count) in enumerate(configs)]

    result = {
        "video": {"minutes": args.minutes, "size": [WIDTH, HEIGHT], "fps": FPS, "gop_seconds": GOP_SECONDS,
                  "bytes": long_video.stat().st_size},
        "decord": decord_version or "not installed (pip install decord==0.6.0 failed or was not tried)",
        "agreement_with_decord": _subprocess(["--agreement", str(long_video)]) if decord_version else None,
        "machine": {"cpus": os.cpu_count(), "load_average_at_end": os.getloadavg(),
                    "platform": platform.platform(), "python": platform.python_version()},
        "rows": rows,
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(rows))
    if result["agreement_with_decord"]:
        print(f"\nours vs decord on {result['agreement_with_decord']['frames']} frames: max abs pixel diff "
              f"{result['agreement_with_decord']['max_abs_diff']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
