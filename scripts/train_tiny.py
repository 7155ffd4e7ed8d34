"""Train the tiny demo Video-XL on synthetic needle videos, with the project's own Trainer path.

    python -m scripts.train_tiny --output demo/model [--steps 3000] [--seed 0]

The model (about 1 M parameters) has the real architecture at a small size: a CLIP-style tower on 224 px frames
with 28 px patches (8x8 patches -> 2x2 pool -> 16 tokens per frame), the 2-layer projector, a 4-layer Qwen2-style
LLM with VST projections, windows of 10 frames (160 tokens), ratios drawn per window from {2, 4, 8, 16}, videos
of 1 to 12 windows. It learns to answer four-option questions about needles (colour, shape, position of one
object; the order of two; how many of one kind), so its answers only come out right if the compressed memory
carries what was seen. Samples are generated on the fly from seeds; evaluation seeds are disjoint from them.
"""

import argparse
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer, TrainingArguments

from demo.build_tiny_tokenizer import build_tiny_tokenizer
from demo.synth import make_sample
from scripts.collator import VideoXLCollator
from scripts.local_import import CODE_FILES, REPO_ROOT, VideoXLConfig, VideoXLForCausalLM, processing

FRAME_SIZE, PATCH, TOKENS_PER_FRAME, WINDOW_FRAMES = 224, 28, 16, 10
MAX_WINDOWS = 12
TINY_PINPOINTS = [[FRAME_SIZE * a, FRAME_SIZE * b] for a in (1, 2) for b in (1, 2) if a * b > 1]  # images of up to 2x2 tiles
TRAIN_RATIOS = [2, 4, 8, 16]
RETRIEVAL_ATTRIBUTES = ("colour", "shape", "position")
TRAIN_SEED_OFFSET = 1_000_000  # evaluation uses seeds below this


def tiny_config(tokenizer) -> VideoXLConfig:
    ids = tokenizer.convert_tokens_to_ids
    return VideoXLConfig(
        text_config=dict(
            model_type="qwen2",
            vocab_size=len(tokenizer),
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=8192,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=False,
            bos_token_id=ids("<|im_start|>"),
            eos_token_id=ids("<|im_end|>"),
            pad_token_id=ids("<|endoftext|>"),
        ),
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=FRAME_SIZE,
            patch_size=PATCH,
        ),
        image_token_id=ids("<image>"),
        video_token_id=ids("<video>"),
        beacon_window=WINDOW_FRAMES * TOKENS_PER_FRAME,
        beacon_ratio=16,
        beacon_train_ratios=TRAIN_RATIOS,
        image_grid_pinpoints=TINY_PINPOINTS,
    )


def tiny_processor(tokenizer):
    chat_template = (REPO_ROOT / "chat_template.jinja").read_text()
    return processing().VideoXLProcessor(
        tokenizer=tokenizer,
        chat_template=chat_template,
        num_image_tokens=TOKENS_PER_FRAME,
        image_size=FRAME_SIZE,
        num_frames=WINDOW_FRAMES * 10,
        image_grid_pinpoints=TINY_PINPOINTS,
    )


def training_group(seed: int, progress: float, size: int) -> list[dict]:
    """Up to `size` LLaVA-style samples with one frame count (so they batch together; `size // windows` of them),
    each a video and its questions:
    three attributes of one needle, or one ordering or counting question.

    Answers name the option, then its letter ("red" newline "B"): reading the attribute off the memory and then
    finding its letter among the options are two easy steps where the bare letter is one hard one; the needle
    harness scores the letter. For the first 40% of training (`progress` < 0.4) videos are one window long and
    questions are about one needle's attributes; then videos span 1 to 12 windows (w with probability
    proportional to 1/w) and ordering and counting questions join in.
    """
    rng = np.random.default_rng(seed)
    windows = np.arange(1, 2 if progress < 0.4 else MAX_WINDOWS + 1)
    num_windows = int(rng.choice(windows, p=(1 / windows) / (1 / windows).sum()))
    num_frames = num_windows * WINDOW_FRAMES - int(rng.integers(0, 3))  # >= 8: room for 4 counted needles
    kinds = ["retrieval"] if progress < 0.4 else ["retrieval", "retrieval", "retrieval", "ordering", "counting"]
    size = max(1, size // num_windows)  # about the same number of frames in every step
    return [training_sample(seed * size + i, num_frames, str(rng.choice(kinds))) for i in range(size)]


def training_sample(seed: int, num_frames: int, kind: str) -> dict:
    rng = np.random.default_rng(seed)
    if kind == "retrieval":
        attributes = rng.permutation(RETRIEVAL_ATTRIBUTES)
        samples = [make_sample(seed, num_frames, "retrieval", attribute=a, digit_prob=0.0) for a in attributes]
    else:
        samples = [make_sample(seed, num_frames, kind, digit_prob=0.0)]
    turns = []
    for sample in samples:
        answer = f"{sample.answer_text}\n{sample.answer}"
        turns += [{"from": "human", "value": sample.question}, {"from": "gpt", "value": answer}]
    return {"video": samples[0].frames, "conversations": turns}


class NeedleDataset(torch.utils.data.IterableDataset):
    """`length` groups of `group_size` synthetic samples, in order (the curriculum needs it): group i from seed
    `offset + i`."""

    def __init__(self, length: int, offset: int, group_size: int, start_progress: float = 0.0):
        self.length, self.offset, self.group_size = length, offset, group_size
        self.start_progress = start_progress

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[list[dict]]:
        for index in range(self.length):
            progress = self.start_progress + (1 - self.start_progress) * index / self.length
            yield training_group(self.offset + index, progress, self.group_size)


def link_code_files(output: Path) -> None:
    """Point the model dir's code files at the repo's, so the shipped model never runs a drifting copy."""
    for name in CODE_FILES:
        target = output / name
        if target.exists() or target.is_symlink():
            target.unlink()
        target.symlink_to(os.path.relpath(REPO_ROOT / name, output))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "demo" / "model")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--group-size", type=int, default=8, help="samples per step (one frame count)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/videoxl_train_tiny"))
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --work-dir")
    parser.add_argument("--init", type=Path, help="start from this model's weights (e.g. demo/model) instead of random")
    parser.add_argument("--start-progress", type=float, default=0.0,
                        help="skip the curriculum up to this point (0.4: long videos and every kind from the start)")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    tokenizer = build_tiny_tokenizer(args.work_dir / "tokenizer")
    processor = tiny_processor(tokenizer)
    config = tiny_config(tokenizer)
    config._attn_implementation = "sdpa"
    model = VideoXLForCausalLM.from_pretrained(args.init) if args.init else VideoXLForCausalLM(config)
    model.seed_compression_ratios(args.seed)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")

    training_args = TrainingArguments(
        output_dir=str(args.work_dir / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=1,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=min(100, args.steps // 10),
        weight_decay=0.0,
        logging_steps=50,
        save_strategy="steps",
        save_steps=250,
        save_total_limit=1,
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=1,
        seed=args.seed,
        disable_tqdm=True,
    )
    collator = VideoXLCollator(processor, fps=1.0, video_fps=1.0)  # every generated frame, in order
    dataset = NeedleDataset(args.steps, TRAIN_SEED_OFFSET + args.seed * args.steps, args.group_size,
                            args.start_progress)
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset,
                      data_collator=lambda groups: collator(groups[0]))
    start = time.time()
    trainer.train(resume_from_checkpoint=args.resume)
    minutes = (time.time() - start) / 60
    print(f"trained {args.steps} steps in {minutes:.1f} min")

    args.output.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.save_pretrained(args.output)
    processor.save_pretrained(args.output)
    link_code_files(args.output)
    shutil.rmtree(args.work_dir / "trainer", ignore_errors=True)
    print(f"saved {args.output} ({sum(f.stat().st_size for f in args.output.iterdir() if f.is_file()) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
