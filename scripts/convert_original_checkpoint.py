"""Turn a checkpoint saved by the original Video-XL code into a complete model repository.

    python scripts/convert_original_checkpoint.py --input VideoXL_weight_8 --output videoxl-7b \
        [--vision-tower DIR] [--processor DIR] [--base-model ID ...]

The output loads with `AutoModelForCausalLM`, `AutoProcessor` and `pipeline("image-text-to-text")`
(`trust_remote_code=True`) and can be uploaded to the Hub as it is: the weights keep their original parameter names,
so the safetensors files are copied unchanged; the flat `llava_qwen` config.json is rewritten as a composite
`VideoXLConfig`; the generation config, the code files, the processor (tokenizer, chat template, image settings,
saved by the processor itself) and a model card are written beside them.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from huggingface_hub import ModelCard
from transformers import AutoProcessor


REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from scripts.local_import import CODE_FILES, VideoXLConfig, configuration  # noqa: E402
from scripts.cli import HelpFormatter  # noqa: E402


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


def convert_config(
    original: dict, input_dir: Path, vision_tower: Path | None, image_token_id: int, video_token_id: int
) -> VideoXLConfig:
    """The composite config; the visual token ids are the processor's (the original marks visuals with -200)."""
    check_supported(original)
    text = {key: original[key] for key in QWEN2_FIELDS if key in original}
    text["model_type"] = "qwen2"
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": float(original.get("rope_theta", 1e6))}
    vision = find_vision_config(original, input_dir, vision_tower)
    vision["model_type"] = "clip_vision_model"
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


def weight_files(input_dir: Path) -> list[Path]:
    files = sorted(input_dir.glob("*.safetensors")) + sorted(input_dir.glob("*.safetensors.index.json"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {input_dir} (only safetensors checkpoints are supported)")
    return files


def write_generation_config(input_dir: Path, output_dir: Path, config: VideoXLConfig) -> None:
    original = input_dir / "generation_config.json"
    generation = json.loads(original.read_text()) if original.is_file() else {}
    generation.setdefault("bos_token_id", config.text_config.bos_token_id)
    generation.setdefault("eos_token_id", config.text_config.eos_token_id)
    generation.pop("transformers_version", None)
    (output_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def visual_token_ids(processor, source: Path) -> tuple[int, int]:
    """The tokenizer ids of the processor's image and video placeholders."""
    ids = []
    for token in (processor.image_token, processor.video_token):
        token_id = processor.tokenizer.convert_tokens_to_ids(token)
        if not isinstance(token_id, int) or token_id == processor.tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer of --processor {source} has no {token!r} token")
        ids.append(token_id)
    return ids[0], ids[1]


def check_processor_fits(processor, config: VideoXLConfig, source: Path) -> None:
    """One clear error now, rather than an index error in the embedding or a shape error in CLIP at the first prompt.

    The tokenizer may only produce ids the embedding has rows for, and one image must come out as tiles of the
    tower's size with `tokens_per_frame` placeholder tokens each (checked by running the processor, whatever
    attributes it keeps its settings in).
    """
    vocab = config.text_config.vocab_size
    if len(processor.tokenizer) > vocab:
        raise ValueError(
            f"the tokenizer of --processor {source} has {len(processor.tokenizer)} ids but the checkpoint's "
            f"vocabulary has {vocab} rows: pass --processor with a tokenizer made for this checkpoint"
        )
    size = config.vision_config.image_size
    image = np.zeros((size, size, 3), dtype=np.uint8)
    out = processor(text=[processor.image_token], images=[image], return_tensors="pt")
    tiles = out["pixel_values"].reshape(-1, *out["pixel_values"].shape[-3:])
    tokens = int((out["input_ids"] == config.image_token_id).sum())
    if tuple(tiles.shape[-2:]) != (size, size) or tokens != tiles.shape[0] * config.tokens_per_frame:
        raise ValueError(
            f"--processor {source} turns a {size}x{size} image into {tiles.shape[0]} tiles of "
            f"{tiles.shape[-1]}x{tiles.shape[-2]} px and {tokens} image tokens, but the checkpoint's tower takes "
            f"{size}x{size} px tiles of {config.tokens_per_frame} tokens each"
        )


def model_card(config: VideoXLConfig, input_dir: Path, base_models: list[str] | None) -> ModelCard:
    """The repo README's front matter (the project's one copy of the Hub metadata) over a card for this checkpoint."""
    data = ModelCard.load(REPO_ROOT / "README.md").data
    if base_models:
        data.base_model = base_models
    text, vision = config.text_config, config.vision_config
    body = f"""
# Video-XL for 🤗 Transformers: `{input_dir.name}`

Video-XL ([arXiv 2409.14485](https://arxiv.org/abs/2409.14485)) reads hour-long videos by compressing its visual
tokens into visual summarization tokens (VSTs) as the language model reads them. This repository was written by
`scripts/convert_original_checkpoint.py` of the Video-XL Transformers port from the original checkpoint
`{input_dir.name}`: the weights are unchanged, the code runs with `trust_remote_code=True`.

| part | shape |
|---|---|
| language model | Qwen2, {text.num_hidden_layers} layers, hidden {text.hidden_size}, vocabulary {text.vocab_size} |
| vision tower | CLIP, {vision.image_size} px, {vision.patch_size} px patches, layer {config.vision_feature_layer} |
| visual tokens | {config.tokens_per_frame} per frame or image tile, windows of {config.beacon_window} tokens |
| compression | ratio {config.beacon_ratio} by default (trained on {config.beacon_train_ratios}) |

## Use

```python
import torch
from transformers import AutoModelForCausalLM, AutoProcessor, pipeline

path = "path/to/this/repo"  # or its Hub id
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.bfloat16, device_map="auto")
processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
messages = [{{"role": "user", "content": [
    {{"type": "video", "path": "movie.mp4"}},
    {{"type": "text", "text": "What happens after the man leaves the car?"}},
]}}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt").to(model.device)
out = model.generate(**inputs, max_new_tokens=256)
print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))

# or: pipeline("image-text-to-text", model=path, trust_remote_code=True)(text=messages, max_new_tokens=256)
```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def convert(
    input_dir: Path,
    output_dir: Path,
    vision_tower: Path | None = None,
    processor_source: Path = REPO_ROOT,
    base_models: list[str] | None = None,
) -> Path:
    """Write the complete repository for the original checkpoint `input_dir` into `output_dir`.

    The processor (tokenizer, chat template, image and video settings) is loaded from `processor_source` and saved
    by itself; its `<image>`/`<video>` ids become the config's visual token ids. Everything is checked before
    anything is written.
    """
    original = json.loads((input_dir / "config.json").read_text())
    weights = weight_files(input_dir)
    processor = AutoProcessor.from_pretrained(processor_source, trust_remote_code=True)
    image_token_id, video_token_id = visual_token_ids(processor, processor_source)
    config = convert_config(original, input_dir, vision_tower, image_token_id, video_token_id)
    check_processor_fits(processor, config, processor_source)
    card = model_card(config, input_dir, base_models)

    output_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(output_dir)
    write_generation_config(input_dir, output_dir, config)
    for path in weights:
        shutil.copyfile(path, output_dir / path.name)
    processor.save_pretrained(output_dir)
    # After the processor: the repo's code wins over the copy a --processor directory may carry.
    for name in CODE_FILES:
        shutil.copyfile(REPO_ROOT / name, output_dir / name)
    card.save(output_dir / "README.md")
    return output_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--input", type=Path, required=True, help="checkpoint directory written by the original code")
    parser.add_argument("--output", type=Path, required=True, help="directory to write")
    parser.add_argument("--vision-tower", type=Path, help="CLIP directory whose config.json describes the tower")
    parser.add_argument(
        "--processor",
        type=Path,
        default=REPO_ROOT,
        help="directory to load the processor from (default: this repo, the released 7B's Qwen2 tokenizer)",
    )
    parser.add_argument(
        "--base-model",
        action="append",
        help="Hub id for the card's base_model, repeatable (default: this README's, the released checkpoint's)",
    )
    return parser


def main() -> None:
    args = build_parser().parse_args()
    out = convert(args.input, args.output, args.vision_tower, args.processor, args.base_model)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
