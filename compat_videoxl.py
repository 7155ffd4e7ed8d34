"""What moved between the transformers 5.x releases this remote code supports, in one place.

The model, config and scripts import the moving parts from here; nothing else checks versions. Each adapter is chosen
by looking for the feature itself (a dataclass field), not by comparing version numbers, so a patch release
that back-ports a change is handled too. The version is read only by the guard.

| what                          | before                              | from                                  |
|-------------------------------|-------------------------------------|---------------------------------------|
| cache argument / output field | `past_key_values`                   | `cache` (5.24)                        |
"""

import sys

import transformers  # noqa: F401 (the guard reads its version; every release imports cleanly)
from packaging.version import Version


OLDEST = "5.23.0"  # the floor (README, "Install"); requirements-oldest.txt pins it for `make test-oldest`
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


# Runs before anything below imports from transformers, so that an unsupported version fails here and not on a name
# that moved.
check_transformers_version()

import dataclasses  # noqa: E402

from transformers import modeling_outputs as _outputs  # noqa: E402


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
]
