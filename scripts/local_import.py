"""Import the repo's flat remote-code files as one package, `videoxl`, as `trust_remote_code` would.

The model files use relative imports (`from .beacon_cache import BeaconCache`), so they cannot be imported as
top-level modules; scripts, tests and benchmarks get them from here instead.
"""

import importlib
import sys
import types
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parent.parent
# The flat files a model directory needs beside its weights for `trust_remote_code`.
CODE_FILES = (
    "configuration_videoxl.py",
    "modeling_videoxl.py",
    "inputs_videoxl.py",
    "beacon_cache.py",
    "cache_file_videoxl.py",
    "session_videoxl.py",
    "processing_videoxl.py",
    "image_processing_videoxl.py",
    "video_decoding_videoxl.py",
    "compat_videoxl.py",
    "pipeline_videoxl.py",
)


def _register_package() -> None:
    if "videoxl" not in sys.modules:
        package = types.ModuleType("videoxl")
        package.__path__ = [str(REPO_ROOT)]
        sys.modules["videoxl"] = package


_register_package()
compat = importlib.import_module("videoxl.compat_videoxl")  # first: refuses an unsupported transformers clearly
configuration = importlib.import_module("videoxl.configuration_videoxl")
modeling = importlib.import_module("videoxl.modeling_videoxl")
cache = importlib.import_module("videoxl.beacon_cache")
session = importlib.import_module("videoxl.session_videoxl")

VideoXLConfig = configuration.VideoXLConfig
VideoXLForCausalLM = modeling.VideoXLForCausalLM
BeaconCache = cache.BeaconCache

# save_pretrained then copies the code files beside the weights (config.json carries the full auto_map).
VideoXLConfig.register_for_auto_class()
VideoXLForCausalLM.register_for_auto_class("AutoModelForCausalLM")


def processing():
    """The processor module (imported on demand: it needs PyAV and the tokenizer files)."""
    return importlib.import_module("videoxl.processing_videoxl")


def image_processing():
    """The image processor module (anyres tiles, CLIP-336 frames)."""
    return importlib.import_module("videoxl.image_processing_videoxl")


def video_decoding():
    """The video decoding module (frame sampling, the seeking PyAV decoder); needs PyAV."""
    return importlib.import_module("videoxl.video_decoding_videoxl")
