"""scripts/finetune.py's Trainer, run by the distributed tests (under torchrun or alone), recording what they compare.

    python tests/_train_worker.py --record DIR [finetune.py arguments]

Rank 0 writes to DIR: `weights.safetensors`, the full trained weights (gathered from FSDP shards or DeepSpeed
partitions), `log.json`, Trainer's log history, and, except under DeepSpeed (which steps inside its backward),
`grads.safetensors`, the full gradient of every trainable parameter before the first optimizer step. Under DeepSpeed
the tests read the gradient from the weights of one plain SGD step instead.
"""

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts import finetune  # noqa: E402


def full_tensor(param: torch.Tensor, deepspeed: bool, grad: bool = False) -> torch.Tensor | None:
    """The whole parameter (or its gradient) on this process, whatever engine sharded it (collective: every rank
    must call it)."""
    if deepspeed:
        from deepspeed.utils import safe_get_full_fp32_param

        value = safe_get_full_fp32_param(param)
    else:
        value = param.grad if grad else param.detach()
    if value is None:
        return None
    if hasattr(value, "full_tensor"):  # an FSDP2 DTensor shard
        value = value.full_tensor()
    return value.detach().to("cpu", torch.float32).clone()


class RecordGradients(TrainerCallback):
    """Full gradients of the first optimizer step."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.grads = model, None

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.grads is None:
            self.grads = {name: full_tensor(param, deepspeed=False, grad=True)
                          for name, param in self.model.named_parameters() if param.requires_grad}


def allow_fsdp_on_cpu() -> None:
    """Let accelerate run its FSDP path on CPU processes (gloo).

    accelerate picks `DistributedType.FSDP` only for GPU-like devices; on CPU it keeps `MULTI_CPU` and drops the FSDP
    plugin, so Trainer would run plain DDP. The tests need FSDP itself, which runs on gloo: after the Accelerator is
    built, its shared state is switched to FSDP with the plugin Trainer asked for. Everything after that (fully_shard
    wrapping, sharded optimizer, state-dict gathering on save) is accelerate's and Trainer's own code.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    import transformers.trainer

    build = transformers.trainer.Accelerator

    def accelerator(*args, fsdp_plugin=None, **kwargs):
        built = build(*args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and built.state.distributed_type == DistributedType.MULTI_CPU:
            # Both shared states: a later AcceleratorState() copies the process state over its own.
            PartialState._shared_state["distributed_type"] = built.state.distributed_type = DistributedType.FSDP
            built.state.fsdp_plugin = fsdp_plugin
        return built

    transformers.trainer.Accelerator = accelerator


def main(argv: list[str]) -> None:
    at = argv.index("--record")
    record, argv = Path(argv[at + 1]), argv[:at] + argv[at + 2 :]
    project, training = finetune.parse_args(argv)
    if training.fsdp:
        allow_fsdp_on_cpu()
    trainer = finetune.build_trainer(project, training)
    deepspeed = bool(training.deepspeed)
    recorder = RecordGradients(trainer.model)
    if not deepspeed:
        trainer.add_callback(recorder)
    trainer.train()
    engine = {
        "world_size": training.world_size,
        "fsdp_sharded": sum(type(p).__name__ == "DTensor" for p in trainer.model.parameters()),
        "fsdp_units": sorted({type(m).__name__ for m in trainer.model.modules() if type(m).__name__.startswith("FSDP")}),
        "deepspeed_stage": trainer.accelerator.deepspeed_plugin.zero_stage if deepspeed else None,
    }
    finetune.save_outputs(trainer, project)
    weights = {name: full_tensor(param, deepspeed) for name, param in trainer.model.named_parameters()}
    if trainer.is_world_process_zero():
        record.mkdir(parents=True, exist_ok=True)
        if recorder.grads is not None:
            save_file({name: grad for name, grad in recorder.grads.items() if grad is not None},
                      record / "grads.safetensors")
        save_file(weights, record / "weights.safetensors")
        (record / "log.json").write_text(json.dumps(trainer.state.log_history))
        (record / "engine.json").write_text(json.dumps(engine))


if __name__ == "__main__":
    main(sys.argv[1:])
    # Close the process group before the interpreter exits: gloo torn down at exit can abort a finished run
    # ("terminate called without an active exception").
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    # Everything is recorded; skip the interpreter's teardown, where a native thread left by DeepSpeed's CPU
    # communication op can still abort the process (seen after a finished ZeRO-2 run, with the group closed).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
