"""Configuration of Video-XL: a CLIP vision tower, a 2-layer MLP projector and a Qwen2 language model whose
layers carry extra projections for visual summarization tokens (VSTs)."""

# First: an unsupported transformers fails here with one clear error, before a name that moved can fail below.
from .compat_videoxl import check_transformers_version  # noqa: F401, I001

import copy
import math

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig
from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig


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
        image_grid_pinpoints (`list`): the anyres grid as the original checkpoint's config lists it ([w, h] pairs),
            kept for reference only: the model reads tiles, and the processor owns the tiling
            (`VideoXLImageProcessor.image_grid_pinpoints`, [h, w] pairs).
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
        problems = field_problems(self)
        if problems:
            raise ValueError("invalid VideoXLConfig:\n" + "\n".join(f"- {problem}" for problem in problems))

    @property
    def patch_grid(self) -> int:
        """Patches along each side of a frame or tile (24 for CLIP-336/14)."""
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def tokens_per_frame(self) -> int:
        """Visual tokens per frame or image tile after the 2x2 pool (144 for CLIP-336/14)."""
        side = self.patch_grid // self.spatial_pool_stride
        return side * side


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def ratio_divisors(window: int, tokens_per_frame: int) -> list[int]:
    """Ratios that divide every window: the window length and the tokens of one frame or tile (the model's rule)."""
    unit = math.gcd(window, tokens_per_frame)
    return [r for r in range(1, unit + 1) if unit % r == 0]


def field_problems(config: VideoXLConfig) -> list[str]:
    """One sentence per bad field (what it is, what was expected); empty when the config is usable.

    Checked at construction because a bad value otherwise fails far from its cause: a negative window compresses
    nothing and the answer ignores the video, a ratio of 0 fails at the first forward, an empty list of training
    ratios deep inside the first training step.
    """
    problems = []
    stride, grid = config.spatial_pool_stride, config.patch_grid
    if not _is_int(stride) or not 1 <= stride <= grid:
        problems.append(f"spatial_pool_stride must be an integer from 1 to the patch grid's side {grid} "
                        f"(image_size {config.vision_config.image_size} / patch_size "
                        f"{config.vision_config.patch_size}), got {stride!r}")
    window = config.beacon_window
    if not _is_int(window) or window < 1:
        problems.append(f"beacon_window must be a positive number of visual tokens per compression window "
                        f"(1440 = 10 frames of 144), got {window!r}")
    if problems:  # the ratios are checked against the window and the frame, which must be valid first
        return problems + param_problems(config)
    allowed = ratio_divisors(window, config.tokens_per_frame)
    what = (f"divide both the window of {window} tokens and a frame of {config.tokens_per_frame} tokens: one of "
            f"{allowed}")
    if not _is_int(config.beacon_ratio) or config.beacon_ratio not in allowed:
        problems.append(f"beacon_ratio must {what}, got {config.beacon_ratio!r}")
    ratios = config.beacon_train_ratios
    if not ratios:
        problems.append(f"beacon_train_ratios must list at least one ratio to draw in training (each must {what}), "
                        f"got {ratios!r}")
    else:
        bad = [r for r in ratios if not _is_int(r) or r not in allowed]
        if bad:
            problems.append(f"beacon_train_ratios: each ratio must {what}; {bad} do not")
    return problems + param_problems(config)


def param_problems(config: VideoXLConfig) -> list[str]:
    """The fields that do not depend on the window: VST projections, feature layer, activation, token ids."""
    problems = []
    unknown = set(config.beacon_param) - {"q", "k", "v"}
    if unknown:
        problems.append(f"beacon_param may only name 'q', 'k' and 'v', got {sorted(unknown)}")
    layers = config.vision_config.num_hidden_layers
    layer = config.vision_feature_layer
    if not _is_int(layer) or not -(layers + 1) <= layer <= layers:
        problems.append(f"vision_feature_layer must index the vision tower's {layers + 1} hidden states (from "
                        f"{-(layers + 1)} to {layers}), got {layer!r}")
    if config.projector_hidden_act not in ACT2FN:
        problems.append(f"projector_hidden_act must be one of transformers' activations (e.g. 'gelu'), got "
                        f"{config.projector_hidden_act!r}")
    ids = {"image_token_id": config.image_token_id, "video_token_id": config.video_token_id}
    for name, value in ids.items():
        if not _is_int(value) or value < 0:
            problems.append(f"{name} must be a non-negative token id, got {value!r}")
    if config.image_token_id == config.video_token_id:
        problems.append(f"image_token_id and video_token_id must differ (images and videos are told apart by their "
                        f"tokens), both are {config.image_token_id}")
    return problems


__all__ = ["VideoXLConfig"]
