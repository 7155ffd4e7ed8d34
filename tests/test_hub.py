"""The Hub side: the README's model-card metadata, the converter's complete repository, and a checkout without the
parity fixtures.

The converted repository is the parity checkpoint's (tests/conftest.py `converted_parity`), the same directory whose
logits tests/test_parity.py checks against the original's.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor, pipeline

import conftest
from _video_files import write_video
from scripts.convert_original_checkpoint import check_processor_fits, convert, visual_token_ids
from scripts.local_import import CODE_FILES, REPO_ROOT, VideoXLConfig


README = REPO_ROOT / "README.md"
BASE_MODELS = ["sy1998/Video_XL", "Qwen/Qwen2-7B-Instruct", "openai/clip-vit-large-patch14-336"]


def chat(visual: dict) -> list[dict]:
    """One user turn: an image or a video, then a question."""
    return [{"role": "user", "content": [visual, {"type": "text", "text": "what colour is the needle ?"}]}]


def random_image(seed: int = 0) -> Image.Image:
    """A 500x300 image: 2 tiles of 336 px."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (300, 500, 3), dtype=np.uint8))


# ---- the README's front matter --------------------------------------------------------------------------------


def test_readme_front_matter_is_read_by_huggingface_hub():
    assert README.read_text().startswith("---\n"), "the Hub reads metadata only from the very top of README.md"
    data = ModelCard.load(README).data
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "image-text-to-text"
    assert data.license == "apache-2.0"
    assert {"video", "long-video", "custom_code"} <= set(data.tags)
    assert data.base_model == BASE_MODELS
    # With several base models the Hub would infer a merge; these weights are fine-tuned from them.
    assert data.base_model_relation == "finetune"


def test_front_matter_agrees_with_config():
    data = ModelCard.load(README).data
    auto_map = json.loads((REPO_ROOT / "config.json").read_text())["auto_map"]
    # pipeline_tag image-text-to-text: the pipeline loads the model through AutoModelForImageTextToText.
    assert auto_map["AutoModelForImageTextToText"].endswith(".VideoXLForCausalLM")
    assert "custom_code" in data.tags and all(ref.split(".")[0] + ".py" in CODE_FILES for ref in auto_map.values())


def test_widget_examples_are_in_the_hubs_formats():
    """Chat messages with image_url chunks (the conversational widget), or an image `src` with a question `text`."""
    widget = ModelCard.load(README).data.widget
    assert widget
    images = []
    for example in widget:
        assert example["example_title"]
        if "messages" in example:
            for message in example["messages"]:
                assert message["role"] in ("system", "user", "assistant")
                for chunk in message["content"]:
                    assert chunk["type"] in ("text", "image_url")
                    assert chunk.get("text") or chunk["image_url"]["url"]
                    images += [chunk["image_url"]["url"]] if chunk["type"] == "image_url" else []
        else:
            assert set(example) == {"example_title", "src", "text"}
            images.append(example["src"])
    assert images and all(url.startswith("https://huggingface.co/") for url in images)


# ---- the converter's repository ---------------------------------------------------------------------------------


def test_converted_repo_is_complete(converted_parity, tiny_processor_dir):
    names = {path.name for path in converted_parity.iterdir()}
    assert {"config.json", "generation_config.json", "README.md", "model.safetensors"} <= names
    assert set(CODE_FILES) <= names
    assert all((converted_parity / name).read_bytes() == (REPO_ROOT / name).read_bytes() for name in CODE_FILES)
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")) for name in names)  # no pickle
    # The processor saved itself: the tiny tokenizer, the chat template and the 336 px settings are all there.
    processor = AutoProcessor.from_pretrained(converted_parity, trust_remote_code=True)
    tiny_tokenizer = AutoProcessor.from_pretrained(tiny_processor_dir, trust_remote_code=True).tokenizer
    assert processor.tokenizer.get_vocab() == tiny_tokenizer.get_vocab()
    assert "<|im_start|>" in processor.chat_template
    config = json.loads((converted_parity / "config.json").read_text())
    assert config["image_token_id"] == processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    assert config["video_token_id"] == processor.tokenizer.convert_tokens_to_ids(processor.video_token)
    # The card carries the README's metadata over a body about this checkpoint.
    card = ModelCard.load(converted_parity / "README.md")
    assert card.data.to_dict() == ModelCard.load(README).data.to_dict()
    assert "vocabulary 1000" in card.text and "336 px" in card.text


@pytest.mark.parametrize("kind", ["image", "video"])
def test_converted_repo_loads_with_auto_classes_and_pipeline(converted_parity, tmp_path, kind):
    """`pipeline("image-text-to-text")` on the converter's output answers a chat with an image or a video exactly as
    `generate` on the processor's output does (videos go through chat messages, as with LLaVA-OneVision)."""
    if kind == "image":
        messages, processor_kwargs = chat({"type": "image", "image": random_image()}), {}
    else:
        video = write_video(tmp_path / "clip.mp4", n_frames=12)
        messages, processor_kwargs = chat({"type": "video", "path": str(video)}), {"num_frames": 4}
    model = AutoModelForCausalLM.from_pretrained(converted_parity, trust_remote_code=True, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(converted_parity, trust_remote_code=True)
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt", **processor_kwargs)
    pixels = inputs["pixel_values"] if kind == "image" else inputs["pixel_values_videos"]
    assert pixels.reshape(-1, *pixels.shape[-3:]).shape == (2 if kind == "image" else 4, 3, 336, 336)
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=4, do_sample=False)

    pipe = pipeline("image-text-to-text", model=str(converted_parity), trust_remote_code=True, dtype=torch.float32)
    assert type(pipe.model).__name__ == "VideoXLForCausalLM"
    out = pipe(text=messages, max_new_tokens=4, do_sample=False, return_tensors=True, processor_kwargs=processor_kwargs)
    generated = torch.as_tensor(out[0]["generated_token_ids"])
    # Same prompt ids (the pipeline went through the processor's chat template and pixels) and the same answer.
    assert generated.tolist() == expected[0].tolist()
    assert generated.shape[0] > inputs["input_ids"].shape[1]


def test_default_processor_fits_the_released_7b():
    """The converter's default (this repo's processor) passes its own checks on the 7B's config, with its ids."""
    processor = AutoProcessor.from_pretrained(REPO_ROOT, trust_remote_code=True)
    config = VideoXLConfig.from_pretrained(REPO_ROOT)
    assert visual_token_ids(processor, REPO_ROOT) == (config.image_token_id, config.video_token_id) == (151646, 151647)
    check_processor_fits(processor, config, REPO_ROOT)


def test_converter_refuses_a_tokenizer_past_the_vocabulary(parity_dir, tmp_path):
    # This repo's own processor carries the 7B's Qwen2 tokenizer: 151,648 ids for a 1,000-row embedding.
    with pytest.raises(ValueError, match=r"151648 ids but the checkpoint's vocabulary has 1000 rows"):
        convert(parity_dir / "model", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_converter_refuses_a_processor_of_another_image_size(parity_dir, tmp_path):
    # The demo's processor makes 224 px frames of 16 tokens; the parity tower takes 336 px tiles of 144.
    with pytest.raises(ValueError, match=r"224x224 px .* takes 336x336 px tiles of 144 tokens"):
        convert(parity_dir / "model", tmp_path / "out", processor_source=REPO_ROOT / "demo" / "model")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_converter_command_line(parity_dir, tiny_processor_dir, tmp_path):
    out = tmp_path / "out"
    subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "convert_original_checkpoint.py"), "--input",
         str(parity_dir / "model"), "--output", str(out), "--processor", str(tiny_processor_dir),
         "--base-model", "someone/videoxl-finetune"],
        check=True, cwd=tmp_path, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert ModelCard.load(out / "README.md").data.base_model == ["someone/videoxl-finetune"]
    assert (out / "model.safetensors").read_bytes() == (parity_dir / "model" / "model.safetensors").read_bytes()


# ---- a checkout without ../shared/parity ----------------------------------------------------------------------


def test_parity_path_skips_naming_the_folder_and_variable(tmp_path, monkeypatch):
    monkeypatch.setattr(conftest, "PARITY_DIR", tmp_path)
    with pytest.raises(pytest.skip.Exception, match="VIDEOXL_PARITY_DIR") as skipped:
        conftest.parity_path()
    assert str(tmp_path) in str(skipped.value)


@pytest.mark.slow
def test_parity_tests_skip_without_fixtures(tmp_path):
    empty = tmp_path / "no_parity"
    empty.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_parity.py"],
        cwd=REPO_ROOT, capture_output=True, text=True,
        env={**os.environ, "VIDEOXL_PARITY_DIR": str(empty), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    summary = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 0, result.stdout + result.stderr
    assert "skipped" in summary and "passed" not in summary and "error" not in summary and "failed" not in summary
    assert f"{empty} has no model/config.json" in result.stdout and "VIDEOXL_PARITY_DIR" in result.stdout
