"""Ask Video-XL about a video.

    python -m demo.run                                    # a fresh synthetic needle video, the bundled tiny model
    python -m demo.run --video clip.mp4 --question "What happens?" [--model DIR] [--num-frames N] [--ratio R]

With `--model` pointing at a converted real Video-XL checkpoint (scripts/convert_original_checkpoint.py) this is
the original's demo. The bundled tiny model only knows the synthetic needle task (see the README).
"""

import argparse
import random
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repo root importable for `demo.qa`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo.qa import answer_letter, ask, load  # noqa: E402
from demo.synth import make_sample, write_video  # noqa: E402

BUNDLED_MODEL = Path(__file__).resolve().parent / "model"


# The question kinds of the needle test (demo/synth.py): name -> (kind, attribute asked)
QUESTIONS = {
    "colour": ("retrieval", "colour"),
    "shape": ("retrieval", "shape"),
    "quadrant": ("retrieval", "position"),
    "ordering": ("ordering", None),
    "counting": ("counting", None),
}


def needle_video(seed: int, frames: int, out_dir: Path, question: str = "colour") -> tuple[Path, object]:
    """A needle video file and its `question` (a name of `QUESTIONS`)."""
    kind, attribute = QUESTIONS[question]
    sample = make_sample(seed, frames, kind, digit_prob=0.0, attribute=attribute)
    path = out_dir / f"needle_{seed}.mp4"
    write_video(sample.frames, path, fps=1.0)
    return path, sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=BUNDLED_MODEL)
    parser.add_argument("--video", type=Path, help="a video file; default: a fresh synthetic needle video")
    parser.add_argument("--question", help="required with --video")
    parser.add_argument("--num-frames", type=int, help="frames sampled uniformly (default: the processor's)")
    parser.add_argument("--ratio", type=int, help="compression ratio (default: the model config's)")
    parser.add_argument("--seed", type=int, help="seed of the synthetic video (default: random)")
    parser.add_argument("--frames", type=int, default=100, help="length of the synthetic video")
    parser.add_argument("--kind", choices=list(QUESTIONS), help="the synthetic video's question (default: drawn)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    if args.video and not args.question:
        parser.error("--video needs --question")

    model, processor = load(args.model)
    sample = None
    with tempfile.TemporaryDirectory() as tmp:
        video, question, num_frames = args.video, args.question, args.num_frames
        if video is None:
            seed = args.seed if args.seed is not None else random.randrange(500_000)  # below the training seeds
            kind = args.kind or random.Random(seed).choice(list(QUESTIONS))
            video, sample = needle_video(seed, args.frames, Path(tmp), kind)
            question, num_frames = sample.question, args.frames
            print(f"synthetic needle video: seed {seed}, {args.frames} frames, {kind} question, needles at frames "
                  f"{sample.needle_frames}")
        sampling = {"num_frames": num_frames} if num_frames else {}
        reply = ask(model, processor, str(video), question, ratio=args.ratio,
                    max_new_tokens=args.max_new_tokens, **sampling)

    ratio = args.ratio or model.config.beacon_ratio
    print(f"\nquestion:\n{question}\n")
    print(f"answer: {reply.text}")
    if sample is not None:
        verdict = "correct" if answer_letter(reply.text, sample.question) == sample.answer else "wrong"
        print(f"truth:  {sample.answer} ({sample.answer_text}) -> {verdict}")
    print(f"\nframes {reply.frames}, compression ratio {ratio}: {reply.visual_tokens} visual tokens kept as "
          f"{reply.kept} memory positions (text included), {reply.seconds:.1f} s")


if __name__ == "__main__":
    main()
