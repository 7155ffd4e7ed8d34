"""Fine-tune Video-XL with transformers' `Trainer` on LLaVA-style chat data.

    python scripts/finetune.py --model DIR --data train.jsonl --output OUT [--train all|llm|vst|projector|lora]
    torchrun --nproc_per_node 2 scripts/finetune.py ...          # several processes (DDP; gloo on CPU)
    accelerate launch --config_file zero2.yaml scripts/finetune.py ...   # DeepSpeed / FSDP on GPUs

`--model` is a model dir loadable with `trust_remote_code` (code files beside the weights); the processor comes from
the same dir unless `--processor` names another. Each line of `--data` is
`{"video": "clip.mp4", "conversations": [{"from": "human", "value": "<video>\\n..."}, {"from": "gpt", "value": "..."}]}`
(`image` for images, neither for text-only, `role`/`content` instead of `from`/`value`); only assistant answers are
labelled (see scripts/collator.py).

Compression ratios: without `--ratio`, every window draws its ratio from `--ratios` (saved as
`config.beacon_train_ratios`). The draw is reseeded before every micro-batch from (seed, optimizer step, micro-batch),
so every process draws the same ratio for its k-th window whatever the lengths of the samples before, and a run
resumed with `--resume` draws what the uninterrupted run would have drawn.
"""

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    PreTrainedModel,
    ProcessorMixin,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

if __package__ in (None, ""):  # run as a file: make the repo root importable for `scripts.collator`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.collator import VideoXLCollator, read_jsonl  # noqa: E402


TRAIN_MODES = ("all", "llm", "vst", "projector", "lora")
# Decoder attention (with the VST copies beacon_{q,k,v}_proj) and MLP linears; the vision tower's q/k/v_proj are not
# matched because the pattern is anchored at the decoder layers.
LORA_TARGETS = r"model\.layers\.\d+\.(self_attn\.(q|k|v|o|beacon_q|beacon_k|beacon_v)_proj|mlp\.(gate|up|down)_proj)"


# --------------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------------


def parse_ratios(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = parser.add_argument_group("model and data")
    io.add_argument("--model", required=True, help="model dir (weights, config and code files)")
    io.add_argument("--processor", default=None, help="processor dir (default: --model)")
    io.add_argument("--data", required=True, help="JSON-lines (or JSON list) file of chat samples")
    io.add_argument("--media-root", default=None, help="folder of relative media paths (default: the data file's)")
    io.add_argument("--output", required=True, help="where checkpoints and the final model go")
    io.add_argument("--resume", default=None, help="a checkpoint dir of an earlier run to continue from")
    io.add_argument("--attn-implementation", default=None, help="eager, sdpa or flash_attention_2 (default: config)")

    what = parser.add_argument_group("what to train")
    what.add_argument("--train", choices=TRAIN_MODES, default="all",
                      help="all: everything, vision tower included; llm: decoder, embeddings, lm_head and VST "
                           "parameters; vst: VST parameters only; projector: the mm_projector; lora: LoRA adapters")
    what.add_argument("--lora-r", type=int, default=16)
    what.add_argument("--lora-alpha", type=int, default=32)
    what.add_argument("--lora-dropout", type=float, default=0.05)
    what.add_argument("--merge", action="store_true", help="LoRA: also save the merged full model in OUTPUT/merged")

    visual = parser.add_argument_group("frames and compression")
    visual.add_argument("--ratios", type=parse_ratios, default=None,
                        help="ratios drawn per window in training, e.g. 2,4,8 (default: the config's)")
    visual.add_argument("--ratio", type=int, default=None, help="one fixed ratio for every window")
    visual.add_argument("--num-frames", type=int, default=None, help="frames per video (default: the processor's)")
    visual.add_argument("--fps", type=float, default=None, help="sample frames at this rate instead")
    visual.add_argument("--max-frames", type=int, default=None, help="cap on frames per video")
    visual.add_argument("--max-length", type=int, default=None, help="refuse samples longer than this many tokens")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--lr", type=float, default=1e-5)
    optim.add_argument("--epochs", type=float, default=1.0)
    optim.add_argument("--max-steps", type=int, default=-1, help="optimizer steps (overrides --epochs)")
    optim.add_argument("--batch-size", type=int, default=1, help="per process; >1 needs one prompt layout")
    optim.add_argument("--grad-accum", type=int, default=8)
    optim.add_argument("--warmup", type=float, default=0.03, help="warm-up steps, or a fraction of them if < 1")
    optim.add_argument("--bf16", action="store_true")
    optim.add_argument("--activation-checkpointing", action="store_true")
    optim.add_argument("--seed", type=int, default=0)
    optim.add_argument("--save-steps", type=int, default=500)
    optim.add_argument("--logging-steps", type=int, default=10)
    optim.add_argument("--workers", type=int, default=0, help="data loader worker processes")
    optim.add_argument("--deepspeed", default=None, help="DeepSpeed JSON config (see the README)")
    optim.add_argument("--log-ratios", default=None,
                       help="write the ratio of every window drawn, per step and process, to DIR/ratios.rank{N}.jsonl")
    args = parser.parse_args(argv)
    if args.merge and args.train != "lora":
        parser.error("--merge only applies to --train lora")
    return args


# --------------------------------------------------------------------------------------------------------------------
# Model, processor, trainable parameters
# --------------------------------------------------------------------------------------------------------------------


def load_model(path: str, attn_implementation: str | None) -> PreTrainedModel:
    """The model in float32 (bf16 runs use autocast, the optimizer keeps float32 weights)."""
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32, **kwargs)


def load_processor(path: str, config) -> ProcessorMixin:
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    check_processor_matches(processor, config)
    return processor


def check_processor_matches(processor, config) -> None:
    """A processor for another frame size or vocabulary would feed the model misaligned visual tokens."""
    expected = {
        "num_image_tokens": config.tokens_per_frame,
        "image_size": config.vision_config.image_size,
        "video_token_id": config.video_token_id,
        "image_token_id": config.image_token_id,
    }
    found = {key: getattr(processor, key) for key in expected}
    if found != expected:
        raise ValueError(f"the processor does not match the model: processor {found}, model {expected}")


def core_model(model: nn.Module) -> nn.Module:
    """The Video-XL backbone inside `model` (also inside a PEFT wrapper): it owns the ratio generator."""
    return next(module for module in model.modules() if hasattr(module, "ratio_generator"))


def configure_ratios(model: PreTrainedModel, ratios: list[int] | None, ratio: int | None) -> None:
    """Set the training ratios and check, before any data is loaded, that each divides the windows and frames."""
    if ratios:
        model.config.beacon_train_ratios = list(ratios)
    for candidate in [ratio] if ratio is not None else model.config.beacon_train_ratios:
        core_model(model).ratio_sampler(candidate)  # raises ValueError naming the allowed ratios


def is_trainable(name: str, mode: str) -> bool:
    """Whether parameter `name` (of `VideoXLForCausalLM`) trains in `mode` (all but lora)."""
    if mode == "all":
        return True
    if mode == "vst":
        return "beacon_" in name
    if mode == "projector":
        return name.startswith("model.mm_projector.")
    if mode == "llm":
        return not name.startswith(("model.vision_tower.", "model.mm_projector."))
    raise ValueError(f"unknown training mode {mode!r}")


def apply_lora(model: PreTrainedModel, r: int, alpha: int, dropout: float) -> nn.Module:
    """Wrap `model` in PEFT LoRA adapters on the decoder's attention (VST projections included) and MLP."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS, bias="none")
    return get_peft_model(model, config)


def select_trainable(model: PreTrainedModel, args: argparse.Namespace) -> nn.Module:
    """Freeze what `args.train` leaves out; for lora return the PEFT model (only its adapters train)."""
    if args.train == "lora":
        return apply_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout)
    for name, param in model.named_parameters():
        param.requires_grad_(is_trainable(name, args.train))
    return model


def count_parameters(model: nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{trainable:,} of {total:,} parameters train ({100 * trainable / total:.2f}%)"


# --------------------------------------------------------------------------------------------------------------------
# Ratio draws in step across processes
# --------------------------------------------------------------------------------------------------------------------


def micro_batch_seed(seed: int, step: int, micro_batch: int) -> int:
    """A well-mixed 64-bit seed from (run seed, optimizer step, micro-batch index)."""
    return int(np.random.SeedSequence([seed, step, micro_batch]).generate_state(1, np.uint64)[0])


class RatioSeedCallback(TrainerCallback):
    """Reseed the per-window ratio draw before every micro-batch.

    Seeding once is not enough: a text-only sample draws no ratio and a long video draws many, so generators seeded
    alike drift apart after the first micro-batch whose samples differ in length between processes. Every process
    runs the same micro-batches (DDP requires it), so seeding each from (seed, step, micro-batch) keeps the k-th
    window of a micro-batch on the same ratio everywhere.
    """

    def __init__(self, model: nn.Module, seed: int):
        self.core, self.seed, self.micro_batch = core_model(model), seed, 0

    def reseed(self, step: int) -> None:
        self.core.seed_compression_ratios(micro_batch_seed(self.seed, step, self.micro_batch))

    def on_step_begin(self, args, state, control, **kwargs):
        self.micro_batch = 0
        self.reseed(state.global_step)

    def on_substep_end(self, args, state, control, **kwargs):
        self.micro_batch += 1
        self.reseed(state.global_step)


class RatioLogCallback(TrainerCallback):
    """Record the ratio of every window the model draws; after each optimizer step append
    `{"step", "rank", "ratios": [[ratios of micro-batch 0], ...]}` to `directory/ratios.rank{rank}.jsonl`."""

    def __init__(self, model: nn.Module, directory: str | Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.draws: list[list[int]] = []
        core = core_model(model)
        core.ratio_sampler = self.recording(core.ratio_sampler)

    def recording(self, ratio_sampler: Callable[[int | None], Callable[[], int]]) -> Callable:
        """Wrap the model's `ratio_sampler` (called once per forward) so each forward's draws are kept."""

        def sampler(compression_ratio: int | None) -> Callable[[], int]:
            draw, drawn = ratio_sampler(compression_ratio), []
            self.draws.append(drawn)

            def record() -> int:
                drawn.append(draw())
                return drawn[-1]

            return record

        return sampler

    def on_step_end(self, args, state, control, **kwargs):
        line = {"step": state.global_step, "rank": args.process_index, "ratios": self.draws}
        with open(self.directory / f"ratios.rank{args.process_index}.jsonl", "a") as file:
            file.write(json.dumps(line) + "\n")
        self.draws = []


# --------------------------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------------------------


def training_arguments(args: argparse.Namespace) -> TrainingArguments:
    # Without an accelerator, accelerate only runs several processes (torchrun, gloo) when told to use the CPU.
    use_cpu = not torch.accelerator.is_available()
    return TrainingArguments(
        output_dir=args.output,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup,
        weight_decay=0.0,
        bf16=args.bf16,
        activation_checkpointing=args.activation_checkpointing,
        seed=args.seed,
        save_strategy="steps",
        save_steps=args.save_steps,
        logging_steps=args.logging_steps,
        use_cpu=use_cpu,
        dataloader_num_workers=args.workers,
        dataloader_pin_memory=not use_cpu,
        deepspeed=args.deepspeed,
        # The batches carry pixels and labels that forward takes by name; nothing is to be dropped.
        remove_unused_columns=False,
        # Text-only samples leave the vision tower, projector and VST parameters without gradients.
        ddp_find_unused_parameters=True,
        report_to="none",
    )


def build_trainer(args: argparse.Namespace) -> Trainer:
    # The training arguments come first: under DeepSpeed ZeRO-3 they make from_pretrained load the weights sharded.
    training_args = training_arguments(args)
    model = load_model(args.model, args.attn_implementation)
    processor = load_processor(args.processor or args.model, model.config)
    configure_ratios(model, args.ratios, args.ratio)
    model = select_trainable(model, args)
    collator = VideoXLCollator(processor, num_frames=args.num_frames, fps=args.fps, max_frames=args.max_frames,
                               max_length=args.max_length, compression_ratio=args.ratio)
    callbacks = [RatioSeedCallback(model, args.seed)]
    if args.log_ratios:
        callbacks.append(RatioLogCallback(model, args.log_ratios))
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=list(read_jsonl(args.data, args.media_root)),
        data_collator=collator,
        processing_class=processor,
        callbacks=callbacks,
    )
    if trainer.is_world_process_zero():
        print(count_parameters(model))
    return trainer


def save_outputs(trainer: Trainer, args: argparse.Namespace) -> None:
    """The final model (LoRA: the adapter) and the processor in OUTPUT; with --merge the merged model in OUTPUT/merged."""
    trainer.save_model(args.output)
    if args.merge and trainer.is_world_process_zero():
        merged = trainer.model.merge_and_unload()
        merged.save_pretrained(Path(args.output) / "merged")
        trainer.processing_class.save_pretrained(Path(args.output) / "merged")


def main(argv: list[str] | None = None) -> Trainer:
    args = parse_args(argv)
    trainer = build_trainer(args)
    trainer.train(resume_from_checkpoint=args.resume)
    save_outputs(trainer, args)
    return trainer


if __name__ == "__main__":
    main()
