"""What moved between the transformers 5.x releases this remote code supports, in one place.

The model, config, processor and scripts import the moving parts from here; nothing else checks versions. Each adapter
is chosen by looking for the feature itself (a dataclass field, a parameter, a method), not by comparing version
numbers, so a patch release that back-ports a change is handled too. The version is read only by the guard and by the
error messages.

| what                                | before                                 | from                                |
|-------------------------------------|----------------------------------------|-------------------------------------|
| cache argument / output field       | `past_key_values`                      | `cache` (5.24)                      |
| activation checkpointing            | `gradient_checkpointing_enable()`,     | `activation_checkpointing_enable()`,|
|                                     | `TrainingArguments(gradient_...)`      | `TrainingArguments(activation_...)` |
|                                     |                                        | (5.23)                              |
| `Cache.crop(n)`                     | n > 0: the length to keep              | n <= 0 only: the rows to remove     |
|                                     |                                        | (5.15)                              |
| assisted decoding's cache           | asks the assistant for "dynamic_full"  | asks nothing (5.15)                 |
| processor `apply_chat_template`     | assistant masks from offsets in the    | moved past expanded placeholders    |
|                                     | caller's text                          | by the library (5.18)               |
| extra `apply_chat_template` keywords| replace `processor_kwargs` (5.5-5.21)  | merged into them (5.22)             |
| user text marked by the template    | expanded / counted as placeholders     | kept as text (5.23)                 |
| `device_map={"": "disk"}`           | left undispatched                      | dispatched (5.13)                   |

The last two cannot be added here without copying library code: on releases without them, the paths that need them
raise one clear error naming the release that has them (`refuse_marked_text`, `check_dispatched`).
"""

import sys

import transformers  # noqa: F401 (the guard reads its version; every release imports cleanly)
from packaging.version import Version


OLDEST = "5.10.0"  # the floor (README, "Install"); requirements-oldest.txt pins it for `make test-oldest`
NEWEST_TESTED = "5.25.0"  # requirements.txt
SUPPORTED_RANGE = f">={OLDEST},<6"


def check_transformers_version(installed: str | None = None) -> None:
    """Raise one `ImportError` naming the supported range when `installed` (default: the imported transformers'
    `__version__`, read at call time) is outside it."""
    # Looked up at call time: transformers may replace its module object in `sys.modules` after import.
    installed = sys.modules["transformers"].__version__ if installed is None else installed
    if not Version(OLDEST) <= Version(installed) < Version("6.0.0"):
        raise ImportError(
            f"Video-XL's remote code supports transformers{SUPPORTED_RANGE} (tested {OLDEST} to {NEWEST_TESTED}), "
            f"but transformers {installed} is installed: pip install 'transformers{SUPPORTED_RANGE}'"
        )


# Runs before anything below imports from transformers, so that an unsupported version fails here and not on a name
# that moved.
check_transformers_version()

import dataclasses  # noqa: E402
import inspect  # noqa: E402

from transformers import modeling_outputs as _outputs  # noqa: E402
from transformers.cache_utils import DynamicLayer  # noqa: E402
from transformers.modeling_utils import PreTrainedModel  # noqa: E402
from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, TextKwargs  # noqa: E402


# --------------------------------------------------------------------------------------------------------------------
# The cache's name
# --------------------------------------------------------------------------------------------------------------------

# The name under which this transformers passes the cache to `forward` / `prepare_inputs_for_generation` and reads it
# back from model outputs.
CACHE_NAME = "cache" if "cache" in {f.name for f in dataclasses.fields(_outputs.BaseModelOutputWithPast)} else (
    "past_key_values"
)
_OTHER_CACHE_NAME = "past_key_values" if CACHE_NAME == "cache" else "cache"


def take_cache(cache, past_key_values):
    """The cache a caller passed as `cache=` (5.24's name) or as `past_key_values=` (the name before). Giving both is
    an error."""
    if cache is not None and past_key_values is not None:
        raise ValueError("Pass the cache once: as `cache=` or as `past_key_values=`, not both.")
    return past_key_values if cache is None else cache


def rename_cache_kwarg(model_kwargs: dict) -> None:
    """Move a cache given under the name this transformers does not use to `CACHE_NAME`, in place (for `generate`,
    whose cache handling looks only at its own name)."""
    given = model_kwargs.pop(_OTHER_CACHE_NAME, None)
    if given is not None:
        if model_kwargs.get(CACHE_NAME) is not None:
            raise ValueError("Pass the cache once: as `cache=` or as `past_key_values=`, not both.")
        model_kwargs[CACHE_NAME] = given


def cache_field(cache) -> dict:
    """`{CACHE_NAME: cache}`: the keyword that puts `cache` into a model output of this transformers."""
    return {CACHE_NAME: cache}


def cache_of(output):
    """The cache held by any model or `generate` output, whichever name this transformers gives it."""
    return getattr(output, CACHE_NAME)


def _with_cache_alias(output_class: type) -> type:
    """`output_class`, readable as `.cache` too where its field is still `past_key_values` (5.24's outputs read
    both names)."""
    if CACHE_NAME == "cache":
        return output_class
    aliased = dataclasses.dataclass(type(output_class.__name__, (output_class,), {"__module__": __name__}))
    aliased.cache = property(lambda self: self.past_key_values, doc="The same object as `past_key_values`.")
    return aliased


BaseModelOutputWithPast = _with_cache_alias(_outputs.BaseModelOutputWithPast)
CausalLMOutputWithPast = _with_cache_alias(_outputs.CausalLMOutputWithPast)


# --------------------------------------------------------------------------------------------------------------------
# Activation (gradient) checkpointing names
# --------------------------------------------------------------------------------------------------------------------

# The library's name for its model methods (`<name>_enable` / `<name>_disable`), `TrainingArguments` flag and
# `<name>_kwargs`: `activation_checkpointing` from 5.23, `gradient_checkpointing` before.
ACTIVATION_CHECKPOINTING = (
    "activation_checkpointing" if hasattr(PreTrainedModel, "activation_checkpointing_enable") else "gradient_checkpointing"
)
def __getattr__(name: str):
    # `ActivationCheckpointingArguments` is built on first use (by the training scripts): `TrainingArguments` imports
    # the trainer's helpers, which import PEFT and through it bitsandbytes, which fetches kernels from the Hub at
    # import. The model and processor import this module and must not.
    if name == "ActivationCheckpointingArguments":
        globals()[name] = _activation_checkpointing_arguments()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _activation_checkpointing_arguments() -> type:
    from transformers import TrainingArguments

    training_argument_names = {f.name for f in dataclasses.fields(TrainingArguments)}

    @dataclasses.dataclass
    class ActivationCheckpointingArguments:
        """Mixin for a `TrainingArguments` dataclass (listed before it): `activation_checkpointing` and
        `activation_checkpointing_kwargs` (also `--activation_checkpointing` on the command line) on releases whose
        only names are `gradient_checkpointing*` (before 5.23), kept equal to them. Empty where the library has both."""

        if "activation_checkpointing" not in training_argument_names:
            activation_checkpointing: bool | None = dataclasses.field(
                default=None, metadata={"help": "Activation checkpointing (this release's gradient_checkpointing).",
                                        "nargs": "?", "const": True})
            activation_checkpointing_kwargs: dict | str | None = dataclasses.field(
                default=None, metadata={"help": "Keyword arguments of activation checkpointing "
                                                "(this release's gradient_checkpointing_kwargs)."})

            def __post_init__(self):
                if self.activation_checkpointing is not None:
                    self.gradient_checkpointing = self.activation_checkpointing
                if self.activation_checkpointing_kwargs is not None:
                    self.gradient_checkpointing_kwargs = self.activation_checkpointing_kwargs
                super().__post_init__()
                self.activation_checkpointing = self.gradient_checkpointing
                self.activation_checkpointing_kwargs = self.gradient_checkpointing_kwargs

    return ActivationCheckpointingArguments


# --------------------------------------------------------------------------------------------------------------------
# The model class: names and checks the library adds in later releases
# --------------------------------------------------------------------------------------------------------------------


class ModelAdapters:
    """Mixin for a `PreTrainedModel` (listed before it):

    - `activation_checkpointing_enable/disable` where the library only names them `gradient_checkpointing_*`;
    - `is_gradient_checkpointing` without the library's deprecation warning where it has `is_activation_checkpointing`
      (PEFT still reads the old name when it wraps a model);
    - `from_pretrained` refuses a device map with disk offload that this release leaves undispatched (a map whose
      only device is "disk", before 5.13), instead of returning a model that is not where it was asked to be.
    """

    if ACTIVATION_CHECKPOINTING != "activation_checkpointing":

        def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None) -> None:
            self.gradient_checkpointing_enable(gradient_checkpointing_kwargs=activation_checkpointing_kwargs)

        def activation_checkpointing_disable(self) -> None:
            self.gradient_checkpointing_disable()

    if hasattr(PreTrainedModel, "is_activation_checkpointing"):

        @property
        def is_gradient_checkpointing(self) -> bool:
            # PEFT reads the old name on every `get_peft_model` / `PeftModel.from_pretrained`; the library's alias
            # warns (FutureWarning, from 5.23) about a read the user did not write.
            return self.is_activation_checkpointing

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        loaded = super().from_pretrained(*args, **kwargs)
        check_dispatched(loaded[0] if kwargs.get("output_loading_info") else loaded, kwargs.get("device_map"))
        return loaded


def check_dispatched(model, device_map) -> None:
    """Raise a `ValueError` when `device_map` puts weights on "disk" but the library loaded the model without
    dispatching it (transformers dispatches a map whose only device is "disk" from 5.13)."""
    if isinstance(device_map, dict) and "disk" in device_map.values() and not hasattr(model, "hf_device_map"):
        raise ValueError(
            f"transformers {_installed()} does not dispatch device_map={device_map!r} (a map whose only device is "
            "\"disk\" is dispatched from transformers 5.13): give a map with a second device, e.g. "
            "{\"model\": \"disk\", \"lm_head\": \"cpu\"}, or upgrade transformers."
        )


def _installed() -> str:
    return sys.modules["transformers"].__version__


# --------------------------------------------------------------------------------------------------------------------
# Cache rollback (assisted decoding)
# --------------------------------------------------------------------------------------------------------------------

# `Cache.crop(n)`: from 5.15 the library passes only n <= 0, the number of tokens to remove; before, it passes the
# number of tokens to keep (the parameter was `max_length`).
CROP_TAKES_LENGTH = "max_length" in inspect.signature(DynamicLayer.crop).parameters


def crop_count(argument: int, seen_tokens: int) -> int:
    """`Cache.crop`'s argument as a count to remove (<= 0), given the `seen_tokens` columns the cache holds: on
    releases that pass the length to keep (a positive `argument`), `argument - seen_tokens`, or 0 when it keeps all."""
    if CROP_TAKES_LENGTH and argument > 0:
        return min(argument - seen_tokens, 0)
    return argument


def drop_rollback_cache_request(generation_config) -> None:
    """Clear `cache_implementation="dynamic_full"` from `generation_config`, in place, for a model that brings its own
    cache: before 5.15, assisted decoding asks its assistant for that full-length, croppable cache, and the library
    then refuses any other cache next to the request. A `BeaconCache` is croppable where rollback needs it."""
    if generation_config.cache_implementation == "dynamic_full":
        generation_config.cache_implementation = None


# --------------------------------------------------------------------------------------------------------------------
# Processor: marked user text, assistant masks
# --------------------------------------------------------------------------------------------------------------------

# From 5.23 the library's processor keeps text that `mark_control_tokens` marked (user-typed placeholders and ChatML
# tokens) as text: it neither counts nor expands it. Before, marked text would still be expanded.
PROCESSOR_KEEPS_MARKED_TEXT = "sanitize_control_tokens" in TextKwargs.__annotations__


def refuse_marked_text(what: str) -> None:
    """Raise the `ValueError` for a chat whose user text this release cannot keep as text (`what`: what was found)."""
    raise ValueError(
        f"{what}: keeping user-typed placeholders and control tokens as text needs transformers 5.23 or newer "
        f"(installed: {_installed()}, whose processor would expand them or let them open real turns). Remove them "
        "from the text, or upgrade transformers."
    )


if {"return_text_replacement_offsets"} & (TextKwargs.__annotations__.keys() | ProcessingKwargs.__annotations__.keys()):
    ProcessorTextKwargs = TextKwargs
else:

    class ProcessorTextKwargs(TextKwargs, total=False):
        """The library's `TextKwargs` with `return_text_replacement_offsets`, which its processor reads but does not
        declare before 5.15 (an undeclared option is dropped with a warning)."""

        return_text_replacement_offsets: bool | None


_CHAT_TEMPLATE_PARAMETERS = set(inspect.signature(ProcessorMixin.apply_chat_template).parameters)


def chat_template_keywords(processor_kwargs: dict, kwargs: dict) -> dict:
    """The keywords for `ProcessorMixin.apply_chat_template`: `processor_kwargs=processor_kwargs` and `kwargs`.

    The library takes every extra keyword that is not a variable of the chat template (a pipeline's `do_sample`, say)
    as an option for the processor's `__call__`: from 5.22 merged into `processor_kwargs`, before in their place,
    which would drop them silently. So when extra keywords come, the options go among them.
    """
    if processor_kwargs and any(key not in _CHAT_TEMPLATE_PARAMETERS for key in kwargs):
        return {**processor_kwargs, **kwargs}
    return {"processor_kwargs": processor_kwargs, **kwargs}


def offsets_in_caller_text(offset_mapping: list, replacements: list[dict]) -> list:
    """One sample's token `offset_mapping` moved from the placeholder-expanded text back to the text the caller gave:
    a token inside an expansion gets the span of its placeholder. `replacements`: `{"span", "new_span"}` per expanded
    placeholder, in order (the library's `text_replacement_offsets`).

    Before 5.18 `apply_chat_template` computes assistant masks from the offsets it asks for, taking them as offsets
    into its own (unexpanded) text; from 5.18 it asks for the replacements too and moves its spans itself.
    """
    moved, index, shift = [], 0, 0
    for start, end in offset_mapping:
        while index < len(replacements) and start >= replacements[index]["new_span"][1]:
            shift = replacements[index]["new_span"][1] - replacements[index]["span"][1]
            index += 1
        inside = index < len(replacements) and start >= replacements[index]["new_span"][0] and end > start
        moved.append(tuple(replacements[index]["span"]) if inside else (start - shift, end - shift))
    return moved


__all__ = [
    "OLDEST",
    "SUPPORTED_RANGE",
    "CACHE_NAME",
    "check_transformers_version",
    "take_cache",
    "rename_cache_kwarg",
    "cache_field",
    "cache_of",
    "BaseModelOutputWithPast",
    "CausalLMOutputWithPast",
    "ACTIVATION_CHECKPOINTING",
    "ActivationCheckpointingArguments",
    "ModelAdapters",
    "check_dispatched",
    "CROP_TAKES_LENGTH",
    "crop_count",
    "drop_rollback_cache_request",
    "PROCESSOR_KEEPS_MARKED_TEXT",
    "refuse_marked_text",
    "ProcessorTextKwargs",
    "chat_template_keywords",
    "offsets_in_caller_text",
]
