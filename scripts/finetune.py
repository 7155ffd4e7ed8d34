"""Fine-tune Video-XL with transformers' `Trainer` on LLaVA-style chat data.

    python scripts/finetune.py --model DIR --data train.jsonl --output_dir OUT [--train all|llm|vst|projector|lora]
    torchrun --nproc_per_node 2 scripts/finetune.py ...                     # DDP (gloo on CPU)
    torchrun --nproc_per_node 2 scripts/finetune.py ... --fsdp "full_shard auto_wrap" --fsdp_config fsdp.json
    torchrun --nproc_per_node 2 scripts/finetune.py ... --deepspeed zero2.json

The command line is `HfArgumentParser` over the project's options (`ProjectArguments`: --model, --data, --train,
--num-frames, --ratio(s), ...) and `TrainingArguments`, so every Trainer flag works under its own name
(`--max_steps`, `--save_total_limit`, `--gradient_accumulation_steps`, `--report_to`, `--activation_checkpointing`,
`--fsdp`, `--deepspeed`, ...). Project defaults: learning rate 1e-5, cosine schedule, 3% warm-up, one sample per micro-batch.

`--model` is a model dir loadable with `trust_remote_code` (code files beside the weights) or a hub id; the
processor comes from the same place unless `--processor` names another. Each line of `--data` is
`{"video": "clip.mp4", "conversations": [{"from": "human", "value": "<video>\\n..."}, {"from": "gpt", "value": "..."}]}`
(`image` for images, neither for text-only, `role`/`content` instead of `from`/`value`). The whole file is checked
before training (scripts/collator.py `check_dataset`); only assistant answers are labelled, as the chat template's
`{% generation %}` blocks mark them.

Compression ratios: without `--ratio`, every window draws its ratio from `--ratios` (saved as
`config.beacon_train_ratios`). The model's ratio schedule is reseeded before every micro-batch from (seed, optimizer
step, micro-batch), so every process draws the same ratio for its k-th window whatever the lengths of the samples
before, and a run resumed with `--resume_from_checkpoint DIR` (or `last`: the newest complete checkpoint of
`--output_dir`) draws what the uninterrupted run would have drawn.
"""

import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoProcessor,
    HfArgumentParser,
    PreTrainedModel,
    ProcessorMixin,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

if __package__ in (None, ""):  # run as a file: make the repo root importable for `scripts.collator`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.collator import VideoXLCollator, check_dataset  # noqa: E402
from scripts.cli import HelpFormatter  # noqa: E402
from scripts.local_import import compat  # noqa: E402


TRAIN_MODES = ("all", "llm", "vst", "projector", "lora")
# Decoder attention (with the VST copies beacon_{q,k,v}_proj) and MLP linears; the vision tower's q/k/v_proj are not
# matched because the pattern is anchored at the decoder layers.
LORA_TARGETS = r"model\.layers\.\d+\.(self_attn\.(q|k|v|o|beacon_q|beacon_k|beacon_v)_proj|mlp\.(gate|up|down)_proj)"
# The installed transformers' name for the TrainingArguments flag and `<name>_kwargs`, and for the model methods
# `<name>_enable` / `<name>_disable` (before 5.23: gradient_checkpointing). `--activation_checkpointing` works on every
# release (`compat.ActivationCheckpointingArguments`).
ACTIVATION_CHECKPOINTING = compat.ACTIVATION_CHECKPOINTING


# --------------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------------


def option(default=None, help: str = "", metavar: str | None = None, required: bool = False, **argparse_kwargs):
    """A dataclass field for HfArgumentParser (which adds the `--with-dashes` spelling of every flag itself)."""
    metadata = {"help": help, **({"metavar": metavar} if metavar else {}), **argparse_kwargs}
    return field(metadata=metadata) if required else field(default=default, metadata=metadata)


@dataclass
class ProjectArguments:
    """The project's own options; everything else is `TrainingArguments`."""

    _argument_group_name = "project options"

    model: str = option(help="model dir (weights, config, code files) or hub id", metavar="DIR", required=True)
    data: str = option(help="JSON-lines (or JSON list) file of chat samples", metavar="FILE", required=True)
    processor: str | None = option(help="processor dir (default: --model)", metavar="DIR")
    media_root: str | None = option(help="folder of relative media paths (default: the data file's)", metavar="DIR")
    attn_implementation: str | None = option(help="eager, sdpa or flash_attention_2 (default: the config's)",
                                             metavar="NAME")
    train: str = option("all", help="what trains: all (vision tower too); llm (decoder, embeddings, lm_head, VST "
                                    "weights); vst (VST weights); projector; lora (adapters)", choices=TRAIN_MODES)
    lora_r: int = option(16, help="LoRA rank", metavar="R")
    lora_alpha: int = option(32, help="LoRA scaling numerator (scale = alpha / r)", metavar="A")
    lora_dropout: float = option(0.05, help="dropout on the LoRA adapters' input", metavar="P")
    merge: bool = option(False, help="lora: also save the merged full model in OUTPUT_DIR/merged")
    ratios: list[int] | None = option(help="ratios drawn per window, e.g. 2 4 8 (default: the config's "
                                           "beacon_train_ratios)", metavar="R")
    ratio: int | None = option(help="one fixed ratio for every window", metavar="R")
    num_frames: int | None = option(help="frames per video (default: the processor's)", metavar="N")
    fps: float | None = option(help="sample frames at this rate instead")
    max_frames: int | None = option(help="cap on frames per video", metavar="N")
    max_length: int | None = option(help="refuse samples longer than N tokens (checked before training)", metavar="N")
    log_ratios: str | None = option(help="log each window's ratio to DIR/ratios.rank{N}.jsonl", metavar="DIR")

    def __post_init__(self):
        if self.train not in TRAIN_MODES:
            raise ValueError(f"--train must be one of {TRAIN_MODES}, got {self.train!r}")
        if self.merge and self.train != "lora":
            raise ValueError("--merge only applies to --train lora")


@dataclass
class VideoXLTrainingArguments(compat.ActivationCheckpointingArguments, TrainingArguments):
    """`TrainingArguments` with the project's defaults."""

    _argument_group_name = "Trainer options (transformers' TrainingArguments, each under its own name)"

    # Samples batch together only with the same prompt layout (visual tokens in the same columns): one by default.
    per_device_train_batch_size: int = field(default=1, metadata={"help": "samples per process and micro-batch"})
    learning_rate: float = field(default=1e-5, metadata={"help": "peak learning rate"})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "learning rate schedule"})
    warmup_steps: float = field(default=0.03, metadata={"help": "warm-up steps, or a fraction of all steps if < 1"})
    # The batches carry pixels and labels that forward takes by name; nothing is to be dropped.
    remove_unused_columns: bool = field(default=False, metadata={"help": "drop batch keys forward does not name"})
    # Text-only samples leave the vision tower, projector and VST parameters without gradients.
    ddp_find_unused_parameters: bool | None = field(default=True, metadata={"help": "DDP find_unused_parameters"})

    def __post_init__(self):
        # Without an accelerator, accelerate only runs several processes (torchrun, gloo) when told to use the CPU.
        if not torch.accelerator.is_available():
            self.use_cpu, self.dataloader_pin_memory = True, False
        super().__post_init__()


def build_parser() -> HfArgumentParser:
    """The command line: the project's options, then every `TrainingArguments` flag in a group of its own."""
    return HfArgumentParser(
        (ProjectArguments, VideoXLTrainingArguments),
        usage="%(prog)s --model DIR --data FILE --output_dir DIR [project options] [Trainer options]",
        description="\n\n".join(__doc__.split("\n\n")[:2]),  # the examples; the rest of the docstring is on data
        formatter_class=HelpFormatter,
    )


def parse_args(argv: list[str] | None = None) -> tuple[ProjectArguments, VideoXLTrainingArguments]:
    project, training = build_parser().parse_args_into_dataclasses(args=argv)
    return project, training


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
    """The Video-XL backbone inside `model` (also inside a PEFT wrapper): it owns the ratio schedule."""
    return next(module for module in model.modules() if hasattr(module, "ratio_schedule"))


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


def select_trainable(model: PreTrainedModel, args: ProjectArguments) -> nn.Module:
    """Freeze what `args.train` leaves out; for lora return the PEFT model (only its adapters train)."""
    if args.train == "lora":
        return apply_lora(model, args.lora_r, args.lora_alpha, args.lora_dropout)
    for name, param in model.named_parameters():
        param.requires_grad_(is_trainable(name, args.train))
    return model


def count_parameters(model: nn.Module) -> str:
    def numel(param: torch.Tensor) -> int:  # DeepSpeed ZeRO-3 leaves an empty shard and records the full size
        return getattr(param, "ds_numel", param.numel())

    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(numel(p) for p in model.parameters())
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
        self.schedule = core_model(model).ratio_schedule
        self.schedule.start_recording()

    def on_step_end(self, args, state, control, **kwargs):
        line = {"step": state.global_step, "rank": args.process_index, "ratios": self.schedule.take_recorded()}
        with open(self.directory / f"ratios.rank{args.process_index}.jsonl", "a") as file:
            file.write(json.dumps(line) + "\n")


# --------------------------------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------------------------------


def checkpoint_only_what_trains(model: nn.Module) -> None:
    """Trim what `activation_checkpointing_enable` (non-reentrant) sets up to what training needs.

    Enabling it also hooks the input embeddings of every `PreTrainedModel` inside the model so that their outputs
    require grad (only reentrant checkpointing needs that); in Video-XL that includes CLIP's patch embedding, so a
    frozen vision tower would record its activations for every window and run a backward for nothing. And a
    checkpointed layer keeps its inputs even when nothing in it trains: a frozen CLIP's layer inputs for every
    window. Measured on the small preset (--train llm): 45 MB, then 15 MB per 10-frame window.
    """
    model.disable_input_require_grads()
    clip = core_model(model).vision_tower.vision_tower.vision_model
    if not any(param.requires_grad for param in clip.parameters()):
        getattr(clip, f"{ACTIVATION_CHECKPOINTING}_disable")()


class CheckpointOnlyWhatTrains(TrainerCallback):
    """`checkpoint_only_what_trains` once Trainer has turned activation checkpointing on (non-reentrant)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        options = getattr(args, f"{ACTIVATION_CHECKPOINTING}_kwargs") or {}
        if getattr(args, ACTIVATION_CHECKPOINTING) and not options.get("use_reentrant", False):
            checkpoint_only_what_trains(model)


class SaveModelCodeUnderFSDP(TrainerCallback):
    """Copy the model's code files into every checkpoint when FSDP2 wraps the model.

    FSDP2 swaps the model's class for `FSDPVideoXLForCausalLM`, a subclass defined in torch: `save_pretrained` would
    copy torch's FSDP source files and write that class into `auto_map`, and the checkpoint would not load. Once the
    model is wrapped, the wrapper class is marked as no remote code (config.json keeps the loaded model's `auto_map`)
    and this callback copies the model's own files (its module and what it imports relatively) beside the weights.
    """

    def __init__(self, model: PreTrainedModel):
        self.model_class = type(model)
        module_file = Path(sys.modules[self.model_class.__module__].__file__)
        self.files = [module_file, *map(Path, get_relative_import_files(str(module_file)))]

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        wrapper = type(model)
        if wrapper is not self.model_class and issubclass(wrapper, self.model_class):
            wrapper._auto_class = None  # the FSDP2 subclass only; `save_pretrained` then writes no code

    def copy_to(self, directory: str | Path) -> None:
        for file in self.files:
            shutil.copy(file, Path(directory) / file.name)

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.copy_to(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")


def model_location(name: str) -> str:
    """A local model dir as an absolute path (adapters and merged configs record it); a hub id as it is."""
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def check_sharded_batch(training: TrainingArguments) -> bool:
    """Whether the run shards weights (FSDP, ZeRO-3); such a run takes one sample per micro-batch.

    FSDP and ZeRO-3 gather a layer's weights each time it runs (per window), so every process must run the layers
    as often. Samples of one micro-batch whose visual tokens sit in different columns run one after another, so with
    more than one the count would depend on how each process's text happens to line up.
    """
    sharded = bool(training.fsdp) or is_deepspeed_zero3_enabled()
    if sharded and training.per_device_train_batch_size > 1:
        raise ValueError(
            "FSDP and DeepSpeed ZeRO-3 need --per_device_train_batch_size 1 here (use "
            f"--gradient_accumulation_steps for larger batches), got {training.per_device_train_batch_size}"
        )
    return sharded


def build_trainer(project: ProjectArguments, training: TrainingArguments) -> Trainer:
    sharded = check_sharded_batch(training)
    # `training` exists before the model: under DeepSpeed ZeRO-3 it makes from_pretrained load the weights sharded.
    model = load_model(model_location(project.model), project.attn_implementation)
    processor = load_processor(model_location(project.processor or project.model), model.config)
    configure_ratios(model, project.ratios, project.ratio)
    sampling = {key: value for key, value in
                dict(num_frames=project.num_frames, fps=project.fps, max_frames=project.max_frames).items()
                if value is not None}
    dataset = check_dataset(project.data, processor, sampling, project.max_length, project.media_root,
                            same_visual_layout=sharded)
    model = select_trainable(model, project)
    collator = VideoXLCollator(processor, **sampling, max_length=project.max_length,
                               compression_ratio=project.ratio)
    callbacks = [RatioSeedCallback(model, training.seed), CheckpointOnlyWhatTrains()]
    if project.log_ratios:
        callbacks.append(RatioLogCallback(model, project.log_ratios))
    if training.fsdp:
        callbacks.append(SaveModelCodeUnderFSDP(model))
    trainer = Trainer(
        model=model,
        args=training,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=processor,
        callbacks=callbacks,
    )
    if training.fsdp and not trainer.is_fsdp_enabled:
        raise ValueError(
            f"--fsdp was given but accelerate runs {trainer.accelerator.distributed_type} here: it enables FSDP only "
            "on GPUs and other accelerators, and would silently train without sharding"
        )
    if trainer.is_world_process_zero():
        print(count_parameters(model))
    return trainer


def save_outputs(trainer: Trainer, project: ProjectArguments) -> None:
    """The final model (LoRA: the adapter) and the processor in OUTPUT_DIR; with --merge the merged model in
    OUTPUT_DIR/merged."""
    output = trainer.args.output_dir
    trainer.save_model(output)
    code = next((c for c in trainer.callback_handler.callbacks if isinstance(c, SaveModelCodeUnderFSDP)), None)
    if code is not None and trainer.is_world_process_zero():
        code.copy_to(output)
    if project.merge and trainer.is_world_process_zero():
        merged = trainer.model.merge_and_unload()
        merged.save_pretrained(Path(output) / "merged")
        trainer.processing_class.save_pretrained(Path(output) / "merged")


def last_complete_checkpoint(output_dir: str | Path) -> str:
    """The newest `checkpoint-N` of `output_dir` that was written to the end.

    Trainer writes `trainer_state.json` last, so a run killed while saving leaves a checkpoint without a readable
    one; that checkpoint is skipped.
    """
    steps = sorted((int(path.name.rsplit("-", 1)[1]), path) for path in Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*")
                   if path.name.rsplit("-", 1)[1].isdigit())
    for _, path in reversed(steps):
        try:
            json.loads((path / TRAINER_STATE_NAME).read_text())
            return str(path)
        except (OSError, json.JSONDecodeError):
            continue
    raise FileNotFoundError(f"--resume_from_checkpoint last: no complete checkpoint in {output_dir}")


def main(argv: list[str] | None = None) -> Trainer:
    project, training = parse_args(argv)
    resume = training.resume_from_checkpoint
    if resume == "last":
        resume = last_complete_checkpoint(training.output_dir)
    trainer = build_trainer(project, training)
    trainer.train(resume_from_checkpoint=resume)
    save_outputs(trainer, project)
    return trainer


if __name__ == "__main__":
    main()
    # Close the process group before the interpreter exits: gloo torn down at exit can abort a finished run
    # ("terminate called without an active exception").
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
