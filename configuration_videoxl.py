"""Configuration of Video-XL: a CLIP vision tower, a 2-layer MLP projector and a Qwen2 language model whose
layers carry extra projections for visual summarization tokens (VSTs)."""

# First: an unsupported transformers fails here with one clear error, before a name that moved can fail below.
from .compat_videoxl import check_transformers_version  # noqa: F401, I001

import copy

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig


def default_grid_pinpoints(tile: int = 336, max_tiles: int = 49) -> list[list[int]]:
    """Every (tile*a, tile*b) with a, b >= 1 and a*b <= max_tiles, except a single tile, in the original's order."""
    return [
        [tile * a, tile * b]
        for a in range(1, max_tiles + 1)
        for b in range(1, max_tiles // a + 1)
        if a * b > 1
    ]


# Qwen2-7B-Instruct, the language model of the released checkpoint.
QWEN2_7B = {
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    "tie_word_embeddings": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}

# openai/clip-vit-large-patch14-336, the vision tower of the released checkpoint.
CLIP_L_336 = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}


def sub_config(value: dict | PreTrainedConfig | None, model_type: str, defaults: dict) -> PreTrainedConfig:
    """A sub-config from a config, a dict (its `model_type` defaulting to `model_type`) or None (`defaults`)."""
    if isinstance(value, PreTrainedConfig):
        return value
    value = dict(defaults) if value is None else dict(value)
    return AutoConfig.for_model(value.pop("model_type", model_type), **value)


AUTO_MAP = {
    "AutoConfig": "configuration_videoxl.VideoXLConfig",
    "AutoModel": "modeling_videoxl.VideoXLForCausalLM",
    "AutoModelForCausalLM": "modeling_videoxl.VideoXLForCausalLM",
    "AutoModelForImageTextToText": "modeling_videoxl.VideoXLForCausalLM",
}
# `pipeline("image-text-to-text", model=path, trust_remote_code=True)` builds this class (mixed batches, see its file).
CUSTOM_PIPELINES = {
    "image-text-to-text": {
        "impl": "pipeline_videoxl.VideoXLImageTextToTextPipeline",
        "pt": ["AutoModelForImageTextToText"],
        "type": "multimodal",
    },
}


@strict
class VideoXLConfig(PreTrainedConfig):
    r"""
    Configuration of [`VideoXLForCausalLM`]. Defaults are the released Video-XL 7B (`sy1998/Video_XL`).

    Args:
        text_config (`Qwen2Config` or `dict`): the language model.
        vision_config (`CLIPVisionConfig` or `dict`): the vision tower.
        vision_feature_layer (`int`): which CLIP hidden state feeds the projector (CLS dropped). -2 is the
            second-to-last layer.
        projector_hidden_act (`str`): activation between the projector's two linear layers (exact GELU).
        spatial_pool_stride (`int`): average-pool stride over the patch grid after the projector
            (24x24 patches -> 12x12 = 144 tokens per frame or tile).
        beacon_window (`int`): visual tokens per compression window (1440 = 10 frames).
        beacon_ratio (`int`): default compression ratio: one VST after every `beacon_ratio` visual tokens.
            Overridden per call with `compression_ratio`.
        beacon_train_ratios (`list[int]`): ratios drawn per window in training when no ratio is given.
        beacon_param (`list[str]`): which attention projections have VST copies (`beacon_{q,k,v}_proj`).
        image_token_id / video_token_id (`int`): placeholder ids, one per visual token.
        image_grid_pinpoints (`list`): candidate resolutions (h, w) for anyres image tiling.
        ratio_seed (`int`): seed of the generator that draws training ratios.
    """

    model_type = "videoxl"
    # Declared the way every dataclass-config release reads (5.20 added `SubConfigSpec` defaults, which earlier
    # releases lack): the sub-config classes here, the sub-configs built in `__post_init__`.
    sub_configs = {"text_config": AutoConfig, "vision_config": AutoConfig}

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    vision_feature_layer: int = -2
    projector_hidden_act: str = "gelu"
    spatial_pool_stride: int = 2
    beacon_window: int = 1440
    beacon_ratio: int = 8
    beacon_train_ratios: list[int] | None = None
    beacon_param: list[str] | None = None
    image_token_id: int = 151646
    video_token_id: int = 151647
    image_grid_pinpoints: list | None = None
    ratio_seed: int = 0
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        self.text_config = sub_config(self.text_config, "qwen2", QWEN2_7B)
        self.vision_config = sub_config(self.vision_config, "clip_vision_model", CLIP_L_336)
        super().__post_init__(**kwargs)
        if not getattr(self, "auto_map", None):
            # Saved into config.json so that every Auto class finds the remote code.
            self.auto_map = dict(AUTO_MAP)
        if not getattr(self, "custom_pipelines", None):
            self.custom_pipelines = copy.deepcopy(CUSTOM_PIPELINES)  # the pipeline edits it in place
        if self.beacon_train_ratios is None:
            self.beacon_train_ratios = [2, 4, 8]
        if self.beacon_param is None:
            self.beacon_param = ["q", "k", "v"]
        if self.image_grid_pinpoints is None:
            self.image_grid_pinpoints = default_grid_pinpoints(self.vision_config.image_size)
        unknown = set(self.beacon_param) - {"q", "k", "v"}
        if unknown:
            raise ValueError(f"beacon_param may only name 'q', 'k' and 'v', got {sorted(unknown)}")

    @property
    def tokens_per_frame(self) -> int:
        """Visual tokens per frame or image tile after the 2x2 pool (144 for CLIP-336/14)."""
        side = self.vision_config.image_size // self.vision_config.patch_size // self.spatial_pool_stride
        return side * side


__all__ = ["VideoXLConfig"]
