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
before training, every media file opened (scripts/collator.py `checked_samples`); only assistant answers are
labelled, as the chat template's `{% generation %}` blocks mark them.

Faults stop the run with one error (`VideoXLTrainer`): the first non-finite loss or gradient, before the optimizer
applies it, naming the step and its samples (`file:line`); non-finite weights are never saved; a checkpoint that
cannot be written (a full disk) is removed, so `--resume_from_checkpoint last` finds the last good one.

Compression ratios: without `--ratio`, every window draws its ratio from `--ratios` (saved as
`config.beacon_train_ratios`). The model's ratio schedule is reseeded before every micro-batch from (seed, optimizer
step, micro-batch), so every process draws the same ratio for its k-th window whatever the lengths of the samples
before, and a run resumed with `--resume_from_checkpoint DIR` (or `last`: the newest complete checkpoint of
`--output_dir`) draws what the uninterrupted run would have drawn.
"""

import errno
import json
import resource
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

from scripts.collator import VideoXLCollator, checked_samples  # noqa: E402
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


def option(default=None, help: str = "", dashed: str | None = None, required: bool = False):
    """A dataclass field for HfArgumentParser; `dashed` adds the `--with-dashes` spelling of the flag."""
    metadata = {"help": help, **({"aliases": [dashed]} if dashed else {})}
    return field(metadata=metadata) if required else field(default=default, metadata=metadata)


@dataclass
class ProjectArguments:
    """The project's own options; everything else is `TrainingArguments`."""

    model: str = option(help="model dir (weights, config and code files) or hub id", required=True)
    data: str = option(help="JSON-lines (or JSON list) file of chat samples", required=True)
    processor: str | None = option(help="processor dir (default: --model)")
    media_root: str | None = option(help="folder of relative media paths (default: the data file's)",
                                    dashed="--media-root")
    attn_implementation: str | None = option(help="eager, sdpa or flash_attention_2 (default: config)",
                                             dashed="--attn-implementation")
    train: str = option("all", help="all: everything, vision tower included; llm: decoder, embeddings, lm_head and "
                                    "VST parameters; vst: VST parameters only; projector: the mm_projector; lora: "
                                    "LoRA adapters")
    lora_r: int = option(16, dashed="--lora-r")
    lora_alpha: int = option(32, dashed="--lora-alpha")
    lora_dropout: float = option(0.05, dashed="--lora-dropout")
    merge: bool = option(False, help="LoRA: also save the merged full model in OUTPUT_DIR/merged")
    ratios: list[int] | None = option(help="ratios drawn per window in training, e.g. --ratios 2 4 8 "
                                           "(default: the config's beacon_train_ratios)")
    ratio: int | None = option(help="one fixed ratio for every window")
    num_frames: int | None = option(help="frames per video (default: the processor's)", dashed="--num-frames")
    fps: float | None = option(help="sample frames at this rate instead")
    max_frames: int | None = option(help="cap on frames per video", dashed="--max-frames")
    max_length: int | None = option(help="refuse samples longer than this many tokens (checked before training)",
                                    dashed="--max-length")
    log_ratios: str | None = option(help="write the ratio of every window drawn, per step and process, to "
                                         "DIR/ratios.rank{N}.jsonl", dashed="--log-ratios")

    def __post_init__(self):
        if self.train not in TRAIN_MODES:
            raise ValueError(f"--train must be one of {TRAIN_MODES}, got {self.train!r}")
        if self.merge and self.train != "lora":
            raise ValueError("--merge only applies to --train lora")


@dataclass
class VideoXLTrainingArguments(compat.ActivationCheckpointingArguments, TrainingArguments):
    """`TrainingArguments` with the project's defaults."""

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


def parse_args(argv: list[str] | None = None) -> tuple[ProjectArguments, VideoXLTrainingArguments]:
    parser = HfArgumentParser((ProjectArguments, VideoXLTrainingArguments), description=__doc__)
    project, training = parser.parse_args_into_dataclasses(args=argv)
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
# Faults: non-finite numbers, samples named by file:line, checkpoints that cannot be written
# --------------------------------------------------------------------------------------------------------------------


SAMPLE_LOCATIONS = "sample_locations"


class NonFiniteTrainingError(RuntimeError):
    """A loss, gradient or weight that is NaN or infinite: training stops before it is applied or saved."""


class CheckpointWriteError(OSError):
    """A checkpoint (or the final model) could not be written; the partial checkpoint is removed."""


class LocatedCollator:
    """Collate `(file:line, sample)` pairs with `collator` and add the batch's `sample_locations`, so a fault can
    name the samples of its step; an error while collating names them too."""

    def __init__(self, collator: VideoXLCollator):
        self.collator = collator

    def __call__(self, items: list[tuple[str, dict]]) -> dict:
        locations = [where for where, _ in items]
        try:
            batch = self.collator([sample for _, sample in items])
        except (ValueError, OSError) as err:
            raise type(err)(f"{', '.join(locations)}: {err}") from err
        batch[SAMPLE_LOCATIONS] = locations
        return batch


def non_finite_tensors(named: list[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the tensors holding a NaN or an infinity (a sharded DTensor: its local shard)."""
    bad = []
    for name, tensor in named:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        if local.is_floating_point() and not bool(torch.isfinite(local).all()):
            bad.append(name)
    return bad


def any_process(flag: bool, device: torch.device) -> bool:
    """Whether `flag` is set on any process (every process takes the same decision, or the others would hang)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item() > 0)


class StopOnNonFinite(TrainerCallback):
    """Stop training with `NonFiniteTrainingError` at the first non-finite loss or gradient, before the optimizer
    applies it: Trainer by default leaves such losses out of its log (`logging_nan_inf_filter`) and steps on, so a
    diverging run looks fine, ends well and saves NaN weights. The error names the step and its samples."""

    def __init__(self):
        self.samples: list[str] = []
        self.bad_loss: tuple[float, list[str]] | None = None

    def record(self, locations: list[str], loss: torch.Tensor) -> None:
        """Called by `VideoXLTrainer.training_step` after each micro-batch."""
        self.samples += locations
        if self.bad_loss is None and not bool(torch.isfinite(loss.detach()).all()):
            self.bad_loss = (float(loss.detach().float().reshape(-1)[0]), locations)

    def on_step_begin(self, args, state, control, **kwargs):
        self.samples, self.bad_loss = [], None

    def on_pre_optimizer_step(self, args, state, control, model=None, lr_scheduler=None, **kwargs):
        trainable = [(name, p.grad) for name, p in model.named_parameters() if p.grad is not None]
        bad_grads = non_finite_tensors(trainable)
        if not any_process(bool(bad_grads) or self.bad_loss is not None, args.device):
            return
        step = state.global_step + 1
        if self.bad_loss is not None:
            loss, samples = self.bad_loss
            what = f"the loss is {loss} on {', '.join(samples) or 'a micro-batch'}"
        elif bad_grads:
            what = (f"the gradients of {len(bad_grads)} of {len(trainable)} trainable tensors are not finite (first: "
                    f"{bad_grads[0]}), from {', '.join(self.samples) or 'this step'}")
        else:
            what = "another process met a non-finite loss or gradient"
        rate = lr_scheduler.get_last_lr()[0] if lr_scheduler is not None else args.learning_rate
        raise NonFiniteTrainingError(
            f"training stopped at step {step}: {what}. Nothing of this step was applied and no checkpoint holds it; "
            f"the learning rate was {rate:g}: lower it (or check these samples) and resume from the last checkpoint"
        )


def write_failure(err: BaseException, folder: Path) -> str:
    """Why writing into `folder` failed, in words: a full disk (or a file-size limit), or the error itself.

    torch.save reports a failed write as `basic_ios::clear: iostream error`, without the OS error behind it, so the
    message and the free space are read too.
    """
    errnos, texts, chained = set(), [], err
    while chained is not None:
        if isinstance(chained, OSError) and chained.errno is not None:
            errnos.add(chained.errno)
        texts.append(str(chained))
        chained = chained.__cause__ or chained.__context__
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    free = shutil.disk_usage(existing).free
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    signs = ("No space left", "File too large", "iostream error", "write failed", "quota")
    full = errnos & {errno.ENOSPC, errno.EDQUOT, errno.EFBIG} or any(s in t for s in signs for t in texts)
    if not (full or free < 2**26):
        return f"{type(err).__name__}: {err}"
    details = [f"{free / 2**20:.0f} MiB free on {existing}"]
    if limit != resource.RLIM_INFINITY:
        details.append(f"ulimit -f: {limit} bytes")
    return f"the disk is full or a file reached its size limit ({'; '.join(details)}; {type(err).__name__}: {err})"


def check_finite_weights(model: nn.Module, destination: str) -> None:
    bad = non_finite_tensors(list(model.named_parameters()))
    if bad:
        raise NonFiniteTrainingError(
            f"refusing to save {destination}: {len(bad)} weight tensors are not finite (first: {bad[0]}); the last "
            "checkpoint written is the last good one"
        )


def last_checkpoint_note(run_dir: str | Path) -> str:
    try:
        return f"the last complete checkpoint is {last_complete_checkpoint(run_dir)}"
    except FileNotFoundError:
        return "no complete checkpoint was written before"


class VideoXLTrainer(Trainer):
    """`Trainer` that stops at the first non-finite loss or gradient (`StopOnNonFinite`), never saves non-finite
    weights, and turns a checkpoint it cannot write into one error saying why (a full disk), with the partial
    checkpoint removed so that `--resume_from_checkpoint last` finds the last good one."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.non_finite = StopOnNonFinite()
        self.add_callback(self.non_finite)

    def training_step(self, model, inputs, num_items_in_batch=None):
        locations = inputs.pop(SAMPLE_LOCATIONS, [])
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.non_finite.record(locations, loss)
        return loss

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        check_finite_weights(self.model, output_dir or self.args.output_dir)
        super().save_model(output_dir, _internal_call)

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = Path(self._get_output_dir(trial=trial))
        folder = run_dir / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        try:
            super()._save_checkpoint(model, trial)
        except NonFiniteTrainingError:
            raise
        except Exception as err:
            why = write_failure(err, folder)
            shutil.rmtree(folder, ignore_errors=True)  # no half-written checkpoint under its final name
            raise CheckpointWriteError(
                f"cannot write {folder}: {why}. The partial checkpoint was removed; {last_checkpoint_note(run_dir)} "
                "(free space and resume with --resume_from_checkpoint last)"
            ) from err


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
    dataset = checked_samples(project.data, processor, sampling, project.max_length, project.media_root,
                              same_visual_layout=sharded)
    model = select_trainable(model, project)
    collator = LocatedCollator(VideoXLCollator(processor, **sampling, max_length=project.max_length,
                                               compression_ratio=project.ratio))
    callbacks = [RatioSeedCallback(model, training.seed), CheckpointOnlyWhatTrains()]
    if project.log_ratios:
        callbacks.append(RatioLogCallback(model, project.log_ratios))
    if training.fsdp:
        callbacks.append(SaveModelCodeUnderFSDP(model))
    trainer = VideoXLTrainer(
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
    try:
        trainer.save_model(output)
    except NonFiniteTrainingError:
        raise
    except Exception as err:
        raise CheckpointWriteError(f"cannot write the final model into {output}: {write_failure(err, Path(output))}. "
                                   f"{last_checkpoint_note(output).capitalize()}") from err
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
