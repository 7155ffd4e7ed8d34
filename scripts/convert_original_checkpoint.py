"""Turn a checkpoint saved by the original Video-XL code into a directory that loads with `trust_remote_code`.

    python scripts/convert_original_checkpoint.py --input VideoXL_weight_8 --output videoxl-7b [--vision-tower DIR]

The weights keep their original parameter names, so the safetensors files are copied unchanged; only the flat
`llava_qwen` config.json is rewritten as a composite `VideoXLConfig`, and the model code is copied beside it.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from scripts.local_import import CODE_FILES, VideoXLConfig, configuration  # noqa: E402


CLIP_L_336 = configuration.CLIP_L_336


QWEN2_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "tie_word_embeddings",
    "attention_dropout",
    "initializer_range",
    "bos_token_id",
    "eos_token_id",
)
VISION_FIELDS = tuple(CLIP_L_336) + ("num_channels", "attention_dropout", "initializer_range", "initializer_factor")
# Qwen2's vocabulary has free rows from 151646 on; the processor's <image> and <video> take the first two.
QWEN2_IMAGE_TOKEN_ID, QWEN2_VIDEO_TOKEN_ID = 151646, 151647


def find_vision_config(original: dict, input_dir: Path, vision_tower: Path | None) -> dict:
    """The CLIP config: --vision-tower, else the original's `mm_vision_tower` if it is a readable directory,
    else the built-in CLIP-L/336 values."""
    candidates = [vision_tower] if vision_tower else []
    name = original.get("mm_vision_tower")
    if name:
        candidates += [Path(name), input_dir / name, input_dir.parent / name]
    for candidate in candidates:
        if candidate is not None and (candidate / "config.json").is_file():
            vision = json.loads((candidate / "config.json").read_text())
            vision = vision.get("vision_config", vision)  # a full CLIPModel config nests it
            return {key: vision[key] for key in VISION_FIELDS if key in vision}
    if vision_tower:
        raise FileNotFoundError(f"--vision-tower {vision_tower} has no config.json")
    return dict(CLIP_L_336)


def check_supported(original: dict) -> None:
    expected = {
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_feature": "patch",
        "mm_spatial_pool_mode": "average",
        "beacon_attn": "full-coverage",
        "beacon_pos": "interleave",
    }
    for key, value in expected.items():
        if original.get(key, value) != value:
            raise ValueError(f"{key}={original[key]!r} is not supported (this port implements {value!r})")


def convert_config(original: dict, input_dir: Path, vision_tower: Path | None) -> VideoXLConfig:
    check_supported(original)
    text = {key: original[key] for key in QWEN2_FIELDS if key in original}
    text["model_type"] = "qwen2"
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": float(original.get("rope_theta", 1e6))}
    vision = find_vision_config(original, input_dir, vision_tower)
    vision["model_type"] = "clip_vision_model"
    vocab = original["vocab_size"]
    if vocab > QWEN2_VIDEO_TOKEN_ID:
        image_token_id, video_token_id = QWEN2_IMAGE_TOKEN_ID, QWEN2_VIDEO_TOKEN_ID
    else:
        # A small vocabulary has no free rows: use ids past it (visual tokens are never embedded).
        image_token_id, video_token_id = vocab, vocab + 1
    train_ratios = original.get("beacon_ratio", [2, 4, 8])
    train_ratios = train_ratios if isinstance(train_ratios, list) else [train_ratios]
    config = VideoXLConfig(
        text_config=text,
        vision_config=vision,
        vision_feature_layer=original.get("mm_vision_select_layer", -2),
        spatial_pool_stride=original.get("mm_spatial_pool_stride", 2),
        beacon_window=original.get("beacon_window", 1440),
        # The reference demo runs at ratio 8 (it edits the config to do so).
        beacon_ratio=8,
        beacon_train_ratios=train_ratios,
        beacon_param=original.get("beacon_param", ["q", "k", "v"]),
        image_token_id=image_token_id,
        video_token_id=video_token_id,
        image_grid_pinpoints=original.get("image_grid_pinpoints"),
        tie_word_embeddings=original.get("tie_word_embeddings", False),
    )
    config.architectures = ["VideoXLForCausalLM"]
    return config


def copy_weights(input_dir: Path, output_dir: Path) -> list[str]:
    files = sorted(input_dir.glob("*.safetensors")) + sorted(input_dir.glob("*.safetensors.index.json"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {input_dir} (only safetensors checkpoints are supported)")
    for path in files:
        shutil.copyfile(path, output_dir / path.name)
    return [path.name for path in files]


def write_generation_config(input_dir: Path, output_dir: Path, config: VideoXLConfig) -> None:
    original = input_dir / "generation_config.json"
    generation = json.loads(original.read_text()) if original.is_file() else {}
    generation.setdefault("bos_token_id", config.text_config.bos_token_id)
    generation.setdefault("eos_token_id", config.text_config.eos_token_id)
    generation.pop("transformers_version", None)
    (output_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def convert(input_dir: Path, output_dir: Path, vision_tower: Path | None = None) -> Path:
    original = json.loads((input_dir / "config.json").read_text())
    output_dir.mkdir(parents=True, exist_ok=True)
    config = convert_config(original, input_dir, vision_tower)
    config.save_pretrained(output_dir)
    write_generation_config(input_dir, output_dir, config)
    copy_weights(input_dir, output_dir)
    for name in CODE_FILES:
        if (REPO_ROOT / name).is_file():
            shutil.copyfile(REPO_ROOT / name, output_dir / name)
    return output_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, required=True, help="checkpoint directory written by the original code")
    parser.add_argument("--output", type=Path, required=True, help="directory to write")
    parser.add_argument("--vision-tower", type=Path, help="CLIP directory whose config.json describes the tower")
    args = parser.parse_args()
    out = convert(args.input, args.output, args.vision_tower)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
