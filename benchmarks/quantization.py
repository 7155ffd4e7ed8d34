#!/usr/bin/env python
"""Quantized Video-XL against fp32: memory and agreement on video prompts.

Each recipe loads the model with `AutoModelForCausalLM.from_pretrained(..., quantization_config=...)` (the vision
tower and projector stay unquantized: `_keep_in_fp32_modules`) and answers the same synthetic needle videos as the
fp32 model, greedy. Reported per recipe: the MiB its weights take as stored (`weight_mib`), the share of
answers identical to fp32's, the share of generated tokens equal to fp32's at the same position, the last prompt
position's logits against fp32's (max absolute error over the logit range, and the top-1 token), and seconds per
answer. It prints a table and writes JSON.

    .venv/bin/python benchmarks/quantization.py --videos 8 --json benchmarks/results/quantization_demo_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoProcessor, BitsAndBytesConfig, QuantoConfig  # noqa: E402

from demo.run import BUNDLED_MODEL  # noqa: E402
from demo.synth import make_sample, write_video  # noqa: E402
from scripts.cli import HelpFormatter  # noqa: E402


# Name -> the `quantization_config` it loads with (None: the fp32 reference).
RECIPES = {
    "fp32": lambda: None,
    "quanto-int8": lambda: QuantoConfig(weights="int8"),
    "bnb-int8": lambda: BitsAndBytesConfig(load_in_8bit=True),
    "bnb-nf4": lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.float32),
}
KINDS = ("retrieval", "ordering", "counting")


def load(model_dir: str | Path, recipe: str):
    """The model loaded with `recipe`'s quantization config, in eval mode."""
    config = RECIPES[recipe]()
    kwargs = {} if config is None else {"quantization_config": config}
    return AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=torch.float32,
                                                **kwargs).eval()


def weight_mib(model) -> float:
    """MiB of the weights as stored: a quanto tensor by its int8 data and scales (its nominal size is the float
    one, which `get_memory_footprint` counts), bitsandbytes' by their packed bytes."""
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        parts = [tensor._data, tensor._scale] if hasattr(tensor, "_data") and hasattr(tensor, "_scale") else [tensor]
        total += sum(part.nelement() * part.element_size() for part in parts)
    return total / 2**20


def video_prompts(processor, count: int, frames: int, folder: Path) -> list[dict]:
    """`count` needle videos written to `folder` (kinds in turn), each as processor inputs for its question."""
    prompts = []
    for seed in range(count):
        sample = make_sample(seed, frames, KINDS[seed % len(KINDS)], digit_prob=0.0)
        path = folder / f"needle_{seed}.mp4"
        write_video(sample.frames, path, fps=1.0)
        messages = [{"role": "user", "content": [{"type": "video", "video": str(path)},
                                                 {"type": "text", "text": sample.question}]}]
        prompts.append(processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True, return_tensors="pt", num_frames=frames))
    return prompts


@torch.no_grad()
def answer(model, inputs: dict, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(the greedy answer's token ids `[new]`, the last prompt position's logits `[vocab]`, float32)."""
    output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, output_logits=True,
                            return_dict_in_generate=True)
    return output.sequences[0, inputs["input_ids"].shape[1]:], output.logits[0][0].float()


def agreement(answers: list[tuple], reference: list[tuple]) -> dict:
    """How a recipe's answers compare with the fp32 answers to the same prompts."""
    same = sum(a.tolist() == r.tolist() for (a, _), (r, _) in zip(answers, reference))
    matched = total = 0
    for (tokens, _), (ref, _) in zip(answers, reference):
        length = max(len(tokens), len(ref))
        matched += sum(int(x == y) for x, y in zip(tokens.tolist(), ref.tolist()))
        total += length
    errors = [float((logits - ref).abs().max() / (ref.max() - ref.min())) for (_, logits), (_, ref) in
              zip(answers, reference)]
    top1 = sum(int(logits.argmax() == ref.argmax()) for (_, logits), (_, ref) in zip(answers, reference))
    return {
        "same_answer": same / len(reference),
        "token_match": matched / total,
        "max_logit_error": max(errors),
        "top1_match": top1 / len(reference),
    }


def run(model_dir: Path, recipes: list[str], videos: int, frames: int, new_tokens: int) -> list[dict]:
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    with tempfile.TemporaryDirectory() as tmp:
        prompts = video_prompts(processor, videos, frames, Path(tmp))
        reference, records = None, []
        for recipe in ["fp32"] + [r for r in recipes if r != "fp32"]:
            model = load(model_dir, recipe)
            start = time.perf_counter()
            answers = [answer(model, inputs, new_tokens) for inputs in prompts]
            seconds = (time.perf_counter() - start) / len(prompts)
            reference = reference or answers
            records.append({"recipe": recipe, "weights_mib": weight_mib(model),
                            "seconds_per_answer": seconds, **agreement(answers, reference)})
            del model
    return records


def print_table(records: list[dict]) -> None:
    print(f"{'recipe':<12} {'weights MiB':>11} {'same answer':>11} {'token match':>11} {'logit err':>9} "
          f"{'top-1':>6} {'s/answer':>8}")
    for r in records:
        print(f"{r['recipe']:<12} {r['weights_mib']:>11.2f} {r['same_answer']:>11.0%} {r['token_match']:>11.0%} "
              f"{r['max_logit_error']:>9.4f} {r['top1_match']:>6.0%} {r['seconds_per_answer']:>8.3f}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", type=Path, default=BUNDLED_MODEL, help="model dir (default: the demo model)")
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES),
                        help="quantization recipes to compare with fp32")
    parser.add_argument("--videos", type=int, default=8, help="synthetic needle videos, one question each")
    parser.add_argument("--frames", type=int, default=40, help="frames per video (all sampled)")
    parser.add_argument("--new-tokens", type=int, default=8, help="greedy tokens per answer")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--json", type=Path, help="write the records here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    records = run(args.model, args.recipes, args.videos, args.frames, args.new_tokens)
    print_table(records)
    if args.json:
        env = {"torch": torch.__version__, "transformers": sys.modules["transformers"].__version__,
               "cpu": platform.processor() or platform.machine(), "threads": args.threads}
        args.json.write_text(json.dumps({"env": env, "args": {k: str(v) for k, v in vars(args).items()},
                                         "records": records}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
