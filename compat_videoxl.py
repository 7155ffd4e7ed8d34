"""What moved between the transformers 5.x releases this remote code supports, in one place.

The model, config and scripts import the moving parts from here; nothing else checks versions. Each adapter is chosen
by looking for the feature itself (a field, a method, a module attribute), not by comparing version numbers, so a
patch release that back-ports a change is handled too. The version is read only by the guard and by
`library_has` (features that cannot be probed, listed in `LIBRARY_FEATURES`).

| what                            | before                            | from                                  |
|---------------------------------|-----------------------------------|---------------------------------------|
| cache argument / output field   | `past_key_values`                 | `cache` (5.24)                        |
| `CLIPVisionModel` parameters    | under a `vision_model.` level     | no `vision_model.` level (5.6)        |
| attention lookup                | `ALL_ATTENTION_FUNCTIONS[name]`   | `.get_interface(name, default)` (5.1) |
| processor `apply_chat_template` | `__call__` options as keywords,   | `processor_kwargs=` (5.4); string     |
|                                 | list contents only; assistant     | contents (5.7); masks moved past      |
|                                 | masks from offsets in its text    | expanded placeholders (5.18)          |
| activation checkpointing        | `gradient_checkpointing_enable()`,| `activation_checkpointing_enable()`,  |
|                                 | `TrainingArguments(gradient_...)` | `TrainingArguments(activation_...)`   |
|                                 |                                   | (5.23)                                |

Configs became dataclasses (5.4) with `SubConfigSpec` sub-config declarations (5.20); the config here uses the
`__init__` form that every 5.x release accepts for remote code, so it needs nothing from this file.
"""

import sys

import transformers  # noqa: F401 (the guard reads its version; every release imports cleanly)
from packaging.version import Version


OLDEST = "5.0.0"  # the floor; requirements-oldest.txt pins the same release for `make test-oldest`
NEWEST_TESTED = "5.24.0"  # requirements.txt
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


# Library features that arrived inside the range for every model; nothing here can or should add them (that would be
# copying library code). The README names them; tests ask `library_has` instead of comparing versions themselves.
LIBRARY_FEATURES = {
    # image-text-to-text pipeline: `processor_kwargs=` reach the processor for chat inputs (dropped before).
    "pipeline_chat_processor_kwargs": "5.5.0",
    # from_pretrained(device_map={"": "disk"}) dispatches (a single-device map was left undispatched before).
    "disk_only_device_map": "5.13.0",
}


def library_has(feature: str) -> bool:
    """Whether the installed transformers has one of `LIBRARY_FEATURES`."""
    return Version(sys.modules["transformers"].__version__) >= Version(LIBRARY_FEATURES[feature])


# Runs before anything below imports from transformers, so that an unsupported version fails here and not on a name
# that moved.
check_transformers_version()

import dataclasses  # noqa: E402
import inspect  # noqa: E402

from torch import nn  # noqa: E402
from transformers import AutoModel, TrainingArguments  # noqa: E402
from transformers import modeling_outputs as _outputs  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as _ATTENTION_FUNCTIONS  # noqa: E402
from transformers.modeling_utils import PreTrainedModel  # noqa: E402
from transformers.processing_utils import ProcessorMixin  # noqa: E402


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
# Attention implementations
# --------------------------------------------------------------------------------------------------------------------


class _AttentionFunctionsWithLookup:
    """5.0's attention registry with the `get_interface(implementation, default)` lookup that 5.1 added."""

    def get_interface(self, attn_implementation: str | None, default):
        if attn_implementation in (None, "eager"):
            return default
        return _ATTENTION_FUNCTIONS[attn_implementation]


# Call it as `ALL_ATTENTION_FUNCTIONS.get_interface(...)`: from 5.1 the library finds that text in a model's source to
# allow `set_attn_implementation` (5.0 looks for a lookup by index instead, so switching after loading stays off there).
ALL_ATTENTION_FUNCTIONS = (
    _ATTENTION_FUNCTIONS if hasattr(_ATTENTION_FUNCTIONS, "get_interface") else _AttentionFunctionsWithLookup()
)


# --------------------------------------------------------------------------------------------------------------------
# CLIP vision tower layout
# --------------------------------------------------------------------------------------------------------------------


def clip_with_vision_model_level(vision_config) -> nn.Module:
    """The library's CLIP vision model under a module whose `.vision_model` has `embeddings`, `pre_layrnorm` and
    `encoder`, so that parameter names are `vision_model.*` on every release (as in the released checkpoint).

    Before 5.6 `CLIPVisionModel` had that level itself; from 5.6 it is the level, so it is wrapped in one.
    """
    clip = AutoModel.from_config(vision_config)
    if hasattr(clip, "vision_model"):
        return clip
    holder = nn.Module()
    holder.vision_model = clip
    return holder


# --------------------------------------------------------------------------------------------------------------------
# Activation (gradient) checkpointing names
# --------------------------------------------------------------------------------------------------------------------

_ACTIVATION_NAMES = hasattr(PreTrainedModel, "activation_checkpointing_enable")


class ActivationCheckpointingNames:
    """Mixin for a `PreTrainedModel`: `activation_checkpointing_enable/disable` on releases that only name it
    `gradient_checkpointing_enable/disable` (before 5.23). Empty where the library has both."""

    if not _ACTIVATION_NAMES:

        def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None) -> None:
            self.gradient_checkpointing_enable(gradient_checkpointing_kwargs=activation_checkpointing_kwargs)

        def activation_checkpointing_disable(self) -> None:
            self.gradient_checkpointing_disable()


def checkpointing_training_arguments(enabled: bool) -> dict:
    """The `TrainingArguments` keyword that turns activation checkpointing on or off in this transformers."""
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": enabled}


# --------------------------------------------------------------------------------------------------------------------
# Processor chat template
# --------------------------------------------------------------------------------------------------------------------

_CHAT_TEMPLATE_TAKES_PROCESSOR_KWARGS = "processor_kwargs" in inspect.signature(
    ProcessorMixin.apply_chat_template
).parameters


def chat_template_arguments(conversation: list, processor_kwargs: dict) -> tuple[list, dict]:
    """`(conversation, keyword arguments)` for `ProcessorMixin.apply_chat_template` of this transformers.

    Options for the processor's `__call__` go as `processor_kwargs=` (5.4+) or among the other keywords (before).
    Turns whose content is a plain string are given as `[{"type": "text", "text": ...}]`, which the chat template
    renders identically and which releases before 5.7 require when tokenizing.
    """
    batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
    conversations = [
        [message if not isinstance(message.get("content"), str) else _as_text_items(message) for message in chat]
        for chat in (conversation if batched else [conversation])
    ]
    arguments = {"processor_kwargs": processor_kwargs} if _CHAT_TEMPLATE_TAKES_PROCESSOR_KWARGS else processor_kwargs
    return (conversations if batched else conversations[0]), dict(arguments)


def _as_text_items(message: dict) -> dict:
    return {**message, "content": [{"type": "text", "text": message["content"]}]}


def offsets_in_caller_text(offset_mapping: list, replacements: list[dict]) -> list:
    """One sample's token `offset_mapping` moved from the placeholder-expanded text back to the text the caller gave:
    a token inside an expansion gets the span of its placeholder. `replacements`: `{"span", "new_span"}` per expanded
    placeholder, in order (the processor's `text_replacement_offsets`).

    `apply_chat_template` computes assistant masks from these offsets. From 5.18 it asks for the replacement offsets
    too and moves its spans into the expanded text itself; before, it takes the offsets as being in its own text.
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
    "library_has",
    "CACHE_NAME",
    "ALL_ATTENTION_FUNCTIONS",
    "check_transformers_version",
    "take_cache",
    "rename_cache_kwarg",
    "cache_field",
    "cache_of",
    "BaseModelOutputWithPast",
    "CausalLMOutputWithPast",
    "clip_with_vision_model_level",
    "ActivationCheckpointingNames",
    "checkpointing_training_arguments",
    "chat_template_arguments",
    "offsets_in_caller_text",
]
