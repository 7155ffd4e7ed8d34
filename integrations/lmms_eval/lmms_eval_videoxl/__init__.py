"""Video-XL for lmms-eval, registered through lmms-eval's plugin entry point (group `lmms_eval.models`):

    lmms-eval --model videoxl --model_args pretrained=PATH,num_frames=128,compression_ratio=8 --tasks videomme
"""

from lmms_eval.models.registry_v2 import ModelManifest


def manifest() -> ModelManifest:
    """The entry point's payload: `--model videoxl` loads `lmms_eval_videoxl.videoxl.VideoXL` (a simple model:
    it takes lmms-eval's text contexts and the task's `doc_to_visual` videos)."""
    return ModelManifest(model_id="videoxl", simple_class_path="lmms_eval_videoxl.videoxl.VideoXL")
