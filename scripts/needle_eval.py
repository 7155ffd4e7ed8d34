"""Needle in a video haystack: accuracy per (frames, depth), as in the Video-XL paper's figure.

Synthetic (the tiny model; any model can take it):

    python -m scripts.needle_eval --model demo/model --frames 10,40,100 --depths 0,25,50,75,100 --ratio 16 \
        --samples 20 --seed 0 --json out.json --png out.png [--kind retrieval|ordering|counting] [--no-needle] \
        [--attributes colour,shape,position,digit]

The original's protocol (real models): a haystack video, needle images and their questions; each needle is
inserted as one extra frame at each depth among `frames - 1` uniformly sampled haystack frames:

    python -m scripts.needle_eval --model videoxl-7b --haystack long.mp4 --needles needles.json ...

`needles.json`: `[{"image": "needle1.png", "question": "...\\nA. ...\\nB. ...", "answer": "B"}, ...]` (image
paths relative to the JSON file). Answers are scored by the option letter.
"""

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

if __package__ in (None, ""):  # run as a file: make the repo root importable for `demo.qa`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo.qa import answer_letter, ask, load  # noqa: E402
from demo.synth import ATTRIBUTES, make_sample  # noqa: E402
from scripts.local_import import processing  # noqa: E402
from scripts.cli import HelpFormatter  # noqa: E402


def parse_list(text: str, kind=int) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


def synthetic_trials(args) -> Iterator[tuple[int, float, object, str, str]]:
    """(frames, depth, video, question, answer) for the synthetic task. Seeds stay below the training range."""
    for frames in args.frames:
        for depth in args.depths:
            for i in range(args.samples):
                seed = (args.seed * 1000 + frames) * 1000 + int(depth) * 10 + i % 10 + (i // 10) * 100_000
                attribute = args.attributes[i % len(args.attributes)] if args.kind == "retrieval" else None
                sample = make_sample(
                    seed, frames, args.kind, depth=depth, needle=not args.no_needle,
                    attribute=attribute, digit_prob=0.5 if "digit" in args.attributes else 0.0,
                )
                yield frames, depth, sample.frames, sample.question, sample.answer


def haystack_trials(args) -> Iterator[tuple[int, float, object, str, str]]:
    """(frames, depth, frame list, question, answer) for the original's protocol."""
    needles_file = Path(args.needles)
    needles = json.loads(needles_file.read_text())
    sampling = processing().VideoSampling(num_frames=max(args.frames) - 1)
    for frames in args.frames:
        sampling.num_frames = frames - 1
        haystack, _ = processing().read_video_frames(args.haystack, sampling, lambda image: image)
        for depth in args.depths:
            for needle in needles:
                image = Image.open(needles_file.parent / needle["image"]).convert("RGB")
                at = round(depth / 100 * (frames - 1))
                video = list(haystack[:at]) + [image] + list(haystack[at:])
                yield frames, depth, video, needle["question"], needle["answer"]


def heatmap(cells: dict, frames: list[int], depths: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.array([[cells[(f, d)] for f in frames] for d in depths])
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(frames), 1.0 + 0.6 * len(depths)))
    image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(frames)), [str(f) for f in frames])
    ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
    ax.set_xlabel("frames")
    ax.set_ylabel("needle depth")
    for (y, x), value in np.ndenumerate(grid):
        ax.text(x, y, f"{value:.0%}", ha="center", va="center", fontsize=8)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# The needle goals (README, "The bundled tiny model"): (name, kind, attributes, frames, needle shown)
SUITE = [
    ("colour", "retrieval", ["colour"], [10, 40, 100, 200], True),
    ("shape", "retrieval", ["shape"], [10, 40, 100, 200], True),
    ("quadrant", "retrieval", ["position"], [10, 40, 100, 200], True),
    ("ordering", "ordering", list(ATTRIBUTES), [20, 40, 100], True),
    ("counting", "counting", list(ATTRIBUTES), [20, 40, 100], True),
    ("control", "retrieval", ["colour", "shape", "position"], [10, 40, 100], False),
]


def evaluate(model, processor, args) -> dict:
    """Ask every trial of `args` (the CLI's fields) and score it: per-cell and overall accuracy, every reply."""
    trials = haystack_trials(args) if args.haystack else synthetic_trials(args)
    per_cell = len(json.loads(Path(args.needles).read_text())) if args.haystack else args.samples
    correct, results = {}, []
    for frames, depth, video, question, answer in tqdm(trials, total=len(args.frames) * len(args.depths) * per_cell,
                                                       desc="needle", disable=args.quiet):
        sampling = {"num_frames": frames} if args.haystack else {"fps": 1.0, "video_fps": 1.0}
        reply = ask(model, processor, video, question, ratio=args.ratio, max_new_tokens=4, **sampling)
        hit = answer_letter(reply.text, question) == answer
        correct.setdefault((frames, depth), []).append(hit)
        results.append({"frames": frames, "depth": depth, "answer": answer, "reply": reply.text, "correct": hit})
    cells = {key: float(np.mean(hits)) for key, hits in correct.items()}
    return {
        "model": str(args.model), "kind": args.kind, "attributes": args.attributes, "ratio": args.ratio,
        "needle": not args.no_needle, "accuracy": float(np.mean([r["correct"] for r in results])),
        "cells": [{"frames": f, "depth": d, "accuracy": a} for (f, d), a in cells.items()], "results": results,
    }


def cells_of(summary: dict) -> dict:
    return {(cell["frames"], cell["depth"]): cell["accuracy"] for cell in summary["cells"]}


def print_table(summary: dict, frames: list[int], depths: list[float]) -> None:
    cells = cells_of(summary)
    print("| depth \\ frames | " + " | ".join(str(f) for f in frames) + " |")
    print("|---" * (len(frames) + 1) + "|")
    for depth in depths:
        print(f"| {depth:g}% | " + " | ".join(f"{cells[(f, depth)]:.0%}" for f in frames) + " |")
    print(f"\naccuracy {summary['accuracy']:.1%} over {len(summary['results'])} questions ({summary['kind']}, "
          f"ratio {summary['ratio']}{'' if summary['needle'] else ', no needle'})")


def run_suite(model, processor, args) -> None:
    """Every goal of the bundled model's needle test: each question kind at r = 16 (a JSON and a heatmap each),
    again at the other `--ratios` (JSON), and `summary_r<ratios>.md`, a table of accuracy per kind, ratio and
    frame count."""
    out = args.suite
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, kind, attributes, frames, needle in SUITE:
        for ratio in args.ratios if needle else [r for r in args.ratios if r == 16]:
            run = argparse.Namespace(**{**vars(args), "kind": kind, "attributes": attributes, "frames": frames,
                                        "ratio": ratio, "no_needle": not needle})
            summary = evaluate(model, processor, run)
            (out / f"{name}_r{ratio}.json").write_text(json.dumps(summary, indent=1))
            if ratio == 16:
                heatmap(cells_of(summary), frames, args.depths, out / f"{name}_r{ratio}.png",
                        f"{name}, r={ratio}: {summary['accuracy']:.0%}")
            per_frames = {f: np.mean([r["correct"] for r in summary["results"] if r["frames"] == f]) for f in frames}
            rows.append((name, ratio, summary["accuracy"], per_frames, len(summary["results"])))
            print(f"{name} r={ratio}: {summary['accuracy']:.1%} "
                  + " ".join(f"{f}f {a:.0%}" for f, a in per_frames.items()), flush=True)
    lines = ["| question | r | accuracy | per frame count | questions |", "|---|---:|---:|---|---:|"]
    for name, ratio, accuracy, per_frames, count in rows:
        detail = ", ".join(f"{f}: {a:.0%}" for f, a in per_frames.items())
        lines.append(f"| {name} | {ratio} | {accuracy:.1%} | {detail} | {count} |")
    (out / f"summary_r{'-'.join(map(str, args.ratios))}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", required=True, help="model dir with remote code (e.g. demo/model)")
    parser.add_argument("--frames", type=parse_list, default=[10, 40, 100],
                        help="comma-separated video lengths in frames")
    parser.add_argument("--depths", type=lambda t: parse_list(t, float), default=[0, 25, 50, 75, 100],
                        help="comma-separated needle depths, percent of the video")
    parser.add_argument("--ratio", type=int, default=16, help="compression ratio")
    parser.add_argument("--samples", type=int, default=20, help="questions per (frames, depth) cell")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first sample")
    parser.add_argument("--kind", default="retrieval", choices=["retrieval", "ordering", "counting"],
                        help="question kind")
    parser.add_argument("--no-needle", action="store_true", help="control: the same questions, no needle shown")
    parser.add_argument("--attributes", type=lambda t: parse_list(t, str), default=list(ATTRIBUTES),
                        help=f"retrieval questions cycle through these (of {','.join(ATTRIBUTES)}); needles carry a "
                             "digit only when digits are asked about")
    parser.add_argument("--haystack", help="a haystack video file (the original's protocol)")
    parser.add_argument("--needles", help="JSON list of needle images and questions (with --haystack)")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--png", type=Path, help="plot the accuracy grid here")
    parser.add_argument("--suite", type=Path, help="run every needle goal of the bundled model into this folder "
                                                   "(--samples per cell; the other task options are the suite's)")
    parser.add_argument("--ratios", type=parse_list, default=[16, 8, 4, 2], help="the suite's ratios")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if unknown := set(args.attributes) - set(ATTRIBUTES):
        parser.error(f"--attributes: unknown {sorted(unknown)}; expected some of {','.join(ATTRIBUTES)}")

    model, processor = load(args.model)
    if args.suite:
        run_suite(model, processor, args)
        return
    summary = evaluate(model, processor, args)
    print_table(summary, args.frames, args.depths)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=1))
    if args.png:
        args.png.parent.mkdir(parents=True, exist_ok=True)
        heatmap(cells_of(summary), args.frames, args.depths, args.png,
                f"{args.kind}, r={args.ratio}: {summary['accuracy']:.0%}")


if __name__ == "__main__":
    main()
