"""Write the offline lmms-eval data sets from `demo.synth`, each next to a copy of its task YAML.

    python -m scripts.write_eval_data needle --out DIR [--frames 10 --depths 0,50,100 --samples 2 --seed 0]
    python -m scripts.write_eval_data videomme --out DIR [--videos 4 --frames 16 --seed 0]

`needle`: `videoxl_needle.jsonl` (tasks `videoxl_needle` and `videoxl_needle_choice`): the samples
`scripts/needle_eval.py` asks with the same options, for every question kind, each video stored losslessly (FFV1,
1 frame per second) so that `fps=1` decodes exactly the frames the harness holds in memory.

`videomme`: `videomme_standin.jsonl` in Video-MME's schema, three questions per video (the needle's colour, shape
and quadrant), videos as `videomme/data/<videoID>.mp4`, where lmms-eval's videomme code finds them under `$HF_HOME`.

Then `lmms-eval --model videoxl --model_args pretrained=demo/model,fps=1 --include_path DIR --tasks videoxl_needle`
(and `HF_HOME=DIR ... --tasks videomme_standin`).
"""

import argparse
import json
import shutil
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo.synth import (  # noqa: E402
    ATTRIBUTES, COLOURS, LETTERS, POSITIONS, RETRIEVAL_PROMPTS, SHAPES, make_sample, write_video,
)
from scripts.needle_eval import parse_list, synthetic_trials  # noqa: E402

TASKS_DIR = Path(__file__).resolve().parent.parent / "integrations" / "lmms_eval" / "lmms_eval_videoxl" / "tasks"
KINDS = ("retrieval", "ordering", "counting")
# The stand-in's questions, as Video-MME files them (domain and sub-category: one of its own pairs).
STANDIN_QUESTIONS = (("colour", "Attribute Perception"), ("shape", "Object Recognition"),
                     ("position", "Spatial Perception"))


def write_lossless_video(frames: np.ndarray, path: Path, fps: float = 1.0) -> None:
    """uint8 `[F, H, W, 3]` as FFV1 (lossless) RGB in Matroska: decoding gives the same pixels back."""
    import av

    with av.open(str(path), mode="w", format="matroska") as container:
        stream = container.add_stream("ffv1", rate=Fraction(fps).limit_denominator(1000))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "bgr0"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def options_of(question: str) -> list[str]:
    """The four option texts of a synth question ("A. red" lines)."""
    lines = dict(line.split(". ", 1) for line in question.splitlines() if line[:2] in {f"{c}." for c in LETTERS})
    return [lines[letter] for letter in LETTERS]


def needle_trial_args(frames: list[int], depths: list[float], samples: int, seed: int, kind: str) -> argparse.Namespace:
    """The fields `scripts.needle_eval.synthetic_trials` reads, for one question kind (all attributes)."""
    return argparse.Namespace(frames=frames, depths=depths, samples=samples, seed=seed, kind=kind,
                              attributes=list(ATTRIBUTES), no_needle=False)


def write_needle(out: Path, frames: list[int], depths: list[float], samples: int, seed: int) -> list[dict]:
    """The needle docs of every kind (in `KINDS` order, each in the harness's trial order) and their videos."""
    (out / "videos").mkdir(parents=True, exist_ok=True)
    docs = []
    for kind in KINDS:
        for frame_count, depth, video, question, answer in synthetic_trials(
                needle_trial_args(frames, depths, samples, seed, kind)):
            path = out / "videos" / f"needle_{len(docs):04d}.mkv"
            write_lossless_video(np.asarray(video), path)
            docs.append({"id": len(docs), "video": str(path.resolve()), "question": question,
                         "options": options_of(question), "answer": answer, "kind": kind,
                         "frames": frame_count, "depth": depth})
    write_jsonl(out / "videoxl_needle.jsonl", docs)
    for name in ("videoxl_needle.yaml", "videoxl_needle_choice.yaml"):
        shutil.copy(TASKS_DIR / name, out / name)
    return docs


def standin_questions(sample, rng: np.random.Generator) -> list[tuple[str, list[str], str, str]]:
    """(question, options "A. ...", answer letter, task type) on the needle's colour, shape and quadrant."""
    needle = sample.needles[0]
    pools = {"colour": list(COLOURS), "shape": list(SHAPES), "position": list(POSITIONS)}
    questions = []
    for attribute, task_type in STANDIN_QUESTIONS:
        correct = {"colour": needle.colour, "shape": needle.shape, "position": needle.position}[attribute]
        wrong = [value for value in pools[attribute] if value != correct]
        options = [wrong[i] for i in rng.permutation(len(wrong))[:3]]
        letter = int(rng.integers(4))
        options.insert(letter, correct)
        prompt = RETRIEVAL_PROMPTS[attribute].format(colour=needle.colour, shape=needle.shape)
        questions.append((prompt, [f"{LETTERS[i]}. {o}" for i, o in enumerate(options)], LETTERS[letter], task_type))
    return questions


def write_videomme(out: Path, videos: int, frames: int, seed: int) -> list[dict]:
    """Video-MME-schema docs, three per video, and the videos where lmms-eval's videomme code looks for them."""
    video_dir = out / "videomme" / "data"
    video_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    docs = []
    for v in range(videos):
        sample = make_sample(seed * 1000 + v, frames, "retrieval", depth=float(rng.uniform(0, 100)),
                             attribute="colour", digit_prob=0.0)
        video_id = f"standin{v:03d}"
        write_video(sample.frames, video_dir / f"{video_id}.mp4", fps=1.0)
        for q, (question, options, answer, task_type) in enumerate(standin_questions(sample, rng)):
            docs.append({
                "video_id": f"{v + 1:03d}", "duration": "short", "domain": "Knowledge",
                "sub_category": "Humanity & History", "url": "", "videoID": video_id,
                "question_id": f"{v + 1:03d}-{q + 1}", "task_type": task_type, "question": question,
                "options": options, "answer": answer,
            })
    write_jsonl(out / "videomme_standin.jsonl", docs)
    shutil.copy(TASKS_DIR / "videomme_standin.yaml", out / "videomme_standin.yaml")
    return docs


def write_jsonl(path: Path, docs: list[dict]) -> None:
    path.write_text("".join(json.dumps(doc) + "\n" for doc in docs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=["needle", "videomme"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--frames", type=parse_list, default=None,
                        help="needle: frame counts (default 10,40); videomme: one count (default 16)")
    parser.add_argument("--depths", type=lambda t: parse_list(t, float), default=[0, 50, 100])
    parser.add_argument("--samples", type=int, default=2, help="needle: questions per (kind, frames, depth)")
    parser.add_argument("--videos", type=int, default=4, help="videomme: videos (3 questions each)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.dataset == "needle":
        docs = write_needle(args.out, args.frames or [10, 40], args.depths, args.samples, args.seed)
    else:
        docs = write_videomme(args.out, args.videos, (args.frames or [16])[0], args.seed)
    print(f"wrote {len(docs)} docs to {args.out}")


if __name__ == "__main__":
    main()
