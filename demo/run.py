"""Ask Video-XL about a video.

    python -m demo.run                                    # the tour: one video, a question of every kind, one memory
    python -m demo.run --kind counting                    # one fresh needle question, the bundled tiny model
    python -m demo.run --video clip.mp4 --question "What happens?" [--model DIR] [--num-frames N] [--ratio R]

The tour encodes one synthetic video once, asks it a colour, shape, quadrant, ordering and counting question from
that one compressed memory (`model.chat` with the kept cache), saves the memory to a file, loads it and answers
again from the file.

With `--model` pointing at a converted real Video-XL checkpoint (scripts/convert_original_checkpoint.py) this is
the original's demo. The bundled tiny model only knows the synthetic needle task (see the README).
"""

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repo root importable for `demo.qa`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo.qa import answer_letter, ask, load  # noqa: E402
from demo.synth import Question, make_sample, make_tour, write_video  # noqa: E402

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


def tour(model, processor, seed: int, frames: int, ratio: int | None, out_dir: Path) -> list[dict]:
    """Encode one tour video once and answer every question of `make_tour` from that memory, then from the memory
    saved to a file and loaded again. Prints each answer, the truth and its time; returns one record per answer."""
    video = make_tour(seed, frames)
    path = out_dir / f"tour_{seed}.mp4"
    write_video(video.frames, path, fps=1.0)
    shown = ", ".join(f"{n.describe()} at frame {n.frames[0]}" for n in sorted(video.needles, key=lambda n: n.frames))
    print(f"synthetic video: seed {seed}, {frames} frames; {shown}\n")

    def chat(question: Question, cache) -> tuple[dict, object]:
        messages = [{"role": "user", "content": [{"type": "video", "video": str(path)},
                                                 {"type": "text", "text": question.question}]}]
        start = time.perf_counter()
        answer, cache = model.chat(processor, messages, cache=cache, compression_ratio=ratio, num_frames=frames,
                                   max_new_tokens=8)
        seconds = time.perf_counter() - start
        right = answer_letter(answer, question.question) == question.answer
        print(f"{question.name:>9}: {question.question.splitlines()[0]}\n"
              f"{'':>9}  answer {answer!r}, truth {question.answer_text!r} ({'right' if right else 'wrong'}), "
              f"{seconds:.2f} s")
        return {"question": question.name, "answer": answer, "truth": question.answer_text, "right": right,
                "seconds": seconds}, cache

    records, cache = [], None
    for i, question in enumerate(video.questions):
        record, cache = chat(question, cache)
        records.append(record)
        if i == 0:
            print(f"{'':>11}(decoding and encoding the video: only this first question pays for it)")
    memory = out_dir / f"tour_{seed}.memory.safetensors"
    cache.save(memory)
    kept = cache.get_seq_length()
    print(f"\nmemory: {frames} frames x {model.config.tokens_per_frame} visual tokens at ratio "
          f"{ratio or model.config.beacon_ratio} -> {kept} kept positions with the text; "
          f"saved to a file of {memory.stat().st_size / 1e6:.2f} MB")
    loaded = type(cache).load(memory)
    print("loaded the memory from the file and asked again:")
    record, _ = chat(video.questions[0], loaded)
    records.append({**record, "from_file": True})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=BUNDLED_MODEL)
    parser.add_argument("--video", type=Path, help="a video file; default: a fresh synthetic needle video")
    parser.add_argument("--question", help="required with --video")
    parser.add_argument("--num-frames", type=int, help="frames sampled uniformly (default: the processor's)")
    parser.add_argument("--ratio", type=int, help="compression ratio (default: the model config's)")
    parser.add_argument("--seed", type=int, help="seed of the synthetic video (default: random)")
    parser.add_argument("--frames", type=int, default=100, help="length of the synthetic video")
    parser.add_argument("--kind", choices=list(QUESTIONS),
                        help="ask one question of this kind about a fresh needle video instead of the tour")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    if args.video and not args.question:
        parser.error("--video needs --question")

    model, processor = load(args.model)
    seed = args.seed if args.seed is not None else random.randrange(500_000)  # below the training seeds
    if args.video is None and args.kind is None:
        with tempfile.TemporaryDirectory() as tmp:
            tour(model, processor, seed, args.frames, args.ratio, Path(tmp))
        return
    sample = None
    with tempfile.TemporaryDirectory() as tmp:
        video, question, num_frames = args.video, args.question, args.num_frames
        if video is None:
            kind = args.kind
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
