"""Answer questions about a video while it is still arriving.

    python -m demo.live                                      # a synthetic needle video, played 10x faster than real time
    python -m demo.live --video clip.mp4 --ask 20:"What is happening?" --ask 45:"What colour is the car?" --pace 1

The video file is read as if it were a live stream: frames are sampled at `--fps` and arrive at their time
(`--pace` seconds of video per wall-clock second). A background thread feeds them to `model.live(...)` window by
window; each question is asked when its time comes, from the memory so far, while feeding goes on.
"""

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repo root importable for `demo.qa`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo.qa import load  # noqa: E402
from demo.run import BUNDLED_MODEL, needle_video  # noqa: E402
from scripts.local_import import session  # noqa: E402
from scripts.cli import HelpFormatter  # noqa: E402

read_live_frames = session.read_live_frames


def parse_question(text: str) -> tuple[float, str]:
    seconds, _, question = text.partition(":")
    if not question:
        raise argparse.ArgumentTypeError(f"--ask takes SECONDS:QUESTION, got {text!r}")
    return float(seconds), question


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", type=Path, default=BUNDLED_MODEL, help="model dir (default: the bundled demo model)")
    parser.add_argument("--video", type=Path, help="a video file; default: a synthetic needle video")
    parser.add_argument("--ask", type=parse_question, action="append", default=[],
                        help="SECONDS:QUESTION, asked when the video reaches SECONDS (repeatable)")
    parser.add_argument("--fps", type=float, default=1.0, help="frames sampled per second of video")
    parser.add_argument("--pace", type=float, default=10.0, help="seconds of video per wall-clock second")
    parser.add_argument("--frames", type=int, default=60, help="length of the synthetic video (1 frame per second)")
    parser.add_argument("--seed", type=int, default=5, help="seed of the synthetic video")
    parser.add_argument("--ratio", type=int, help="compression ratio (default: the model config's)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="greedy tokens per answer")
    return parser


def main() -> None:
    args = build_parser().parse_args()

    model, processor = load(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        video, questions = args.video, sorted(args.ask)
        if video is None:
            video, sample = needle_video(args.seed, args.frames, Path(tmp))
            print(f"synthetic needle video: {args.frames} s, needle at {sample.needle_frames} s; answer "
                  f"{sample.answer} ({sample.answer_text})")
            questions = questions or [(t, sample.question) for t in (args.frames * 0.25, args.frames - 1)]
        live = model.live(processor, compression_ratio=args.ratio)
        frames = read_live_frames(str(video), fps=args.fps, pace=args.pace)
        feeder = threading.Thread(target=live.feed_all, args=(frames,), daemon=True)
        start = time.monotonic()
        feeder.start()
        for at, question in questions:
            time.sleep(max(0.0, at / args.pace - (time.monotonic() - start)))
            asked = time.monotonic()
            answer = live.ask(question, max_new_tokens=args.max_new_tokens)
            print(f"\n[video {at:.0f} s, {live.frames} frames in memory, {live.cache.get_seq_length()} positions] "
                  f"{question.splitlines()[0]}\n  -> {answer}   ({time.monotonic() - asked:.2f} s)")
        feeder.join()
    print(f"\nfed {live.frames} frames; memory {live.cache.get_seq_length()} positions, {len(live.pending)} "
          "frames waiting for their window")


if __name__ == "__main__":
    main()
