# Copyright 2024 BAAI and the Video-XL authors; this file: the Video-XL transformers port.
# Licensed under the Apache License, Version 2.0.
"""Processor of Video-XL: text, videos and images into model inputs.

One flat file (the remote-code loader copies only top-level files). Pure PIL / numpy / torch and
PyAV: nothing here needs torchvision.

What it computes, exactly as the original Video-XL (LLaVA + CLIPImageProcessor of
openai/clip-vit-large-patch14-336, transformers 4.40):

* a frame: PIL bicubic resize of the short side to 336 (long side `int(336 * long / short)`),
  center crop 336x336 (offsets floored), rescale 1/255 and CLIP mean/std, in float32 -> 144
  `<video>` tokens;
* an image ("anyres"): best grid pinpoint (336a, 336b), aspect-kept bicubic resize (sides rounded
  up), pasted centered on black, cut into 336x336 tiles row by row, each tile as a frame -> 144
  `<image>` tokens per tile. The original's extra base thumbnail is not computed (the model drops
  it);
* a video: `num_frames` frames at `np.linspace(0, total - 1, num_frames)` floored (indices repeat
  when the video is shorter), decoded with PyAV by seeking to keyframes.
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .compat_videoxl import chat_template_arguments, offsets_in_caller_text

try:  # PyAV is only needed for video files; image-only users can do without it.
    import av
except ImportError:  # pragma: no cover - exercised only where PyAV is missing
    av = None


logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_IMAGE_SIZE = 336
DEFAULT_TOKENS_PER_FRAME = 144  # 24x24 CLIP patches, 2x2 average pool -> 12x12
# The released model's evaluation wrapper samples 128 frames uniformly (its demo uses 900).
DEFAULT_NUM_FRAMES = 128
MAX_TILES = 49

ImageLike = Any  # PIL.Image.Image | np.ndarray | torch.Tensor | str | os.PathLike | bytes
VideoLike = Any  # str | os.PathLike | bytes | file-like | np.ndarray | torch.Tensor | list[PIL.Image]


# ----------------------------------------------------------------------------------------------
# Images: any input -> RGB PIL image
# ----------------------------------------------------------------------------------------------


def _array_to_hwc(array: np.ndarray, channels_first: bool) -> np.ndarray:
    """Bring a 2-D or 3-D image array to [H, W, C] with C in (1, 3, 4)."""
    if array.ndim == 2:
        return array[:, :, None]
    if array.ndim != 3:
        raise ValueError(f"an image array must have 2 or 3 dimensions, got shape {tuple(array.shape)}")
    first, last = array.shape[0] in (1, 3, 4), array.shape[-1] in (1, 3, 4)
    if first and (channels_first or not last):
        return np.moveaxis(array, 0, -1)
    if last:
        return array
    raise ValueError(f"cannot tell the channel axis of an image of shape {tuple(array.shape)}")


def _array_to_uint8(array: np.ndarray) -> np.ndarray:
    """uint8 passes through; floats must already be in [0, 1] (as transformers' rescaled images)."""
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating):
        if array.size and (array.min() < 0.0 or array.max() > 1.0):
            raise ValueError("float images must have values in [0, 1]; pass uint8 for 0..255 images")
        return np.round(array * 255.0).astype(np.uint8)
    raise ValueError(f"image arrays must be uint8 or float in [0, 1], got dtype {array.dtype}")


def _check_sides(width: int, height: int, what: str) -> None:
    if width <= 0 or height <= 0:
        raise ValueError(f"{what} has a zero side: width {width}, height {height}")


def _array_to_pil(array: np.ndarray, channels_first: bool, what: str) -> Image.Image:
    hwc = _array_to_hwc(np.asarray(array), channels_first)
    _check_sides(hwc.shape[1], hwc.shape[0], what)
    hwc = _array_to_uint8(hwc)
    if hwc.shape[-1] == 1:
        return Image.fromarray(np.ascontiguousarray(hwc[..., 0])).convert("RGB")  # uint8 [H, W] -> "L"
    return Image.fromarray(np.ascontiguousarray(hwc[..., :3]))  # alpha dropped, as convert("RGB") does


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    """16-bit / 32-bit grayscale -> 8-bit L. PIL's own convert clips at 255, which whitens the image."""
    values = np.asarray(image, dtype=np.float64)
    peak = 65535.0 if (image.mode.startswith("I;16") or values.max(initial=0) > 255) else 255.0
    return Image.fromarray(np.clip(np.round(values * (255.0 / peak)), 0, 255).astype(np.uint8))


def pil_to_rgb(image: Image.Image, what: str = "image") -> Image.Image:
    """Any PIL mode (L, LA, P, RGBA, CMYK, I;16, I, F, ...) -> RGB.

    Like the original (`Image.open(...).convert("RGB")`), alpha is dropped, not composited.
    """
    _check_sides(image.width, image.height, what)
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        image = _high_bit_depth_to_l(image)
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # avoids PIL's warning about palette transparency
    return image.convert("RGB")


def _open_image_path(path: str | os.PathLike) -> Image.Image:
    text = os.fspath(path)
    if text.startswith(("http://", "https://", "data:")):
        from transformers.image_utils import load_image  # network / base64 only; no torchvision involved

        return load_image(text)
    if not os.path.isfile(text):
        raise FileNotFoundError(f"image file not found: {text}")
    try:
        with Image.open(text) as image:
            image.load()
            return image
    except OSError as err:
        raise ValueError(f"cannot read image {text}: {err}") from err


def to_rgb_image(image: ImageLike, what: str = "image") -> Image.Image:
    """Convert one image input to an RGB PIL image.

    Accepted: PIL images of any mode; numpy [H, W], [H, W, C] (or [C, H, W]) uint8 or float in [0, 1];
    torch [C, H, W] (or [H, W, C]); a path, URL or bytes of an encoded image.
    Raises ValueError for a zero side, FileNotFoundError for a missing file.
    """
    if isinstance(image, Image.Image):
        return pil_to_rgb(image, what)
    if isinstance(image, (str, os.PathLike)):
        return pil_to_rgb(_open_image_path(image), what)
    if isinstance(image, (bytes, bytearray, memoryview)):
        try:
            return pil_to_rgb(Image.open(io.BytesIO(bytes(image))), what)
        except OSError as err:
            raise ValueError(f"cannot read {what} from bytes: {err}") from err
    if isinstance(image, torch.Tensor):
        return _array_to_pil(image.detach().cpu().numpy(), channels_first=True, what=what)
    if isinstance(image, np.ndarray):
        return _array_to_pil(image, channels_first=False, what=what)
    raise TypeError(f"unsupported {what} type {type(image).__name__}")


# ----------------------------------------------------------------------------------------------
# CLIP-336 preprocessing and anyres tiling
# ----------------------------------------------------------------------------------------------


def default_grid_pinpoints(tile: int = DEFAULT_IMAGE_SIZE, max_tiles: int = MAX_TILES) -> list[list[int]]:
    """[width, height] = (tile*a, tile*b) for a*b <= max_tiles, except (tile, tile), a-major order.

    The order matters for ties in `select_best_resolution` and is the released config's order.
    """
    return [
        [tile * a, tile * b]
        for a in range(1, max_tiles + 1)
        for b in range(1, max_tiles // a + 1)
        if (a, b) != (1, 1)
    ]


def select_best_resolution(size_wh: tuple[int, int], pinpoints: Sequence[Sequence[int]]) -> tuple[int, int]:
    """LLaVA's rule: the (width, height) pinpoint keeping the most pixels of the image, then wasting least."""
    width, height = size_wh
    best, best_effective, best_wasted = None, 0, math.inf
    for pin_w, pin_h in pinpoints:
        scale = min(pin_w / width, pin_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = pin_w * pin_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (int(pin_w), int(pin_h)), effective, wasted
    return best


def resize_and_pad(image: Image.Image, target_wh: tuple[int, int]) -> Image.Image:
    """Aspect-kept bicubic resize to fit `target_wh` (sides rounded up), pasted centered on black."""
    target_w, target_h = target_wh
    scale_w, scale_h = target_w / image.width, target_h / image.height
    if scale_w < scale_h:
        new_w, new_h = target_w, min(math.ceil(image.height * scale_w), target_h)
    else:
        new_w, new_h = min(math.ceil(image.width * scale_h), target_w), target_h
    canvas = Image.new("RGB", (target_w, target_h), (0, 0, 0))
    resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    canvas.paste(resized, ((target_w - new_w) // 2, (target_h - new_h) // 2))
    return canvas


def normalization_lut(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """float32 [3, 256]: the value CLIPImageProcessor gives each uint8 level of each channel.

    Same arithmetic as transformers 4.40 (rescale in float64, cast to float32, then normalize in
    float32), so a table lookup reproduces it bit for bit and costs one gather per pixel.
    """
    levels = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    mean32, std32 = np.asarray(mean, np.float32)[:, None], np.asarray(std, np.float32)[:, None]
    return ((levels[None, :] - mean32) / std32).astype(np.float32)


class VideoXLImageProcessor:
    """CLIP-336 preprocessing of frames and anyres tiling of images (no transformers base class).

    Every output is uint8 [3, S, S] (S = `size`) until `normalize` maps it through the CLIP table.
    """

    def __init__(
        self,
        size: int = DEFAULT_IMAGE_SIZE,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        grid_pinpoints: Sequence[Sequence[int]] | None = None,
    ) -> None:
        self.size = int(size)
        self.grid_pinpoints = [list(p) for p in (grid_pinpoints or default_grid_pinpoints(self.size))]
        self.lut = normalization_lut(image_mean, image_std)

    def resize_crop(self, image: Image.Image) -> np.ndarray:
        """RGB PIL [H, W] -> uint8 [3, S, S]: short side to S (bicubic, long side floored), center crop."""
        width, height = image.size
        if width <= height:
            new_w, new_h = self.size, int(self.size * height / width)
        else:
            new_w, new_h = int(self.size * width / height), self.size
        # PIL returns a copy when the size is unchanged (tiles), exactly like the original.
        resized = np.asarray(image.resize((new_w, new_h), Image.Resampling.BICUBIC))
        top, left = (new_h - self.size) // 2, (new_w - self.size) // 2
        return resized[top : top + self.size, left : left + self.size].transpose(2, 0, 1)

    def normalize_into(self, out: torch.Tensor, crop_u8: np.ndarray) -> None:
        """Write lut[c, crop_u8[c]] into float32 `out` [3, S, S] (a CPU tensor, written in place).

        numpy's single-threaded gather: torch's is ~20x slower here when other processes hold the
        cores (its intra-op threads then spin), and it would need an int64 copy of the index.
        """
        target = out.numpy()
        for channel in range(3):  # uint8 indices are always < 256: "clip" skips the bounds check
            np.take(self.lut[channel], crop_u8[channel], out=target[channel], mode="clip")

    def normalize(self, crops_u8: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
        """uint8 [N, 3, S, S] (or a list of [3, S, S]) -> float32 [N, 3, S, S]."""
        out = torch.empty((len(crops_u8), 3, self.size, self.size), dtype=torch.float32)
        for slot, crop in enumerate(crops_u8):
            self.normalize_into(out[slot], crop)
        return out

    def video_pixels(self, video: VideoLike, sampling: "VideoSampling", name: str = "video") -> tuple[
            torch.Tensor, "VideoMetadata"]:
        """One video (file, bytes, file-like, [F, H, W, 3] array, list of frames) -> float32 [F, 3, S, S].

        Frames are resized and cropped to uint8 as soon as they are decoded; only the sampled
        crops (F x 3 x S x S bytes) and the output are ever held.
        """
        frames = _in_memory_frames(video)
        if frames is None:
            crops, metadata = read_video_frames(video, sampling, self.resize_crop)
        else:
            crops, metadata = sample_frames_in_memory(frames, sampling, self.resize_crop, name)
        return self.normalize(crops), metadata

    def tiles(self, image: Image.Image) -> np.ndarray:
        """RGB PIL image -> uint8 [n_tiles, 3, S, S], tiles row by row (no base thumbnail)."""
        grid_w, grid_h = select_best_resolution(image.size, self.grid_pinpoints)
        canvas = np.asarray(resize_and_pad(image, (grid_w, grid_h)))
        s = self.size
        # Each tile goes through the frame preprocessing like the original's; for S x S tiles the
        # resize returns a copy and the crop is the whole tile.
        tiles = [
            self.resize_crop(Image.fromarray(canvas[y : y + s, x : x + s]))
            for y in range(0, grid_h, s)
            for x in range(0, grid_w, s)
        ]
        return np.stack(tiles)

    def preprocess_images(self, images: Sequence[ImageLike]) -> dict[str, torch.Tensor]:
        """Images -> {"pixel_values": float32 [total_tiles, 3, S, S], "image_sizes": int64 [n, 2] (h, w),
        "num_tiles": int64 [n]}."""
        rgb = [to_rgb_image(image, what=f"image {i}") for i, image in enumerate(images)]
        tiles = [self.tiles(image) for image in rgb]
        return {
            "pixel_values": self.normalize([tile for image_tiles in tiles for tile in image_tiles]),
            "image_sizes": torch.tensor([[im.height, im.width] for im in rgb], dtype=torch.int64),
            "num_tiles": torch.tensor([len(t) for t in tiles], dtype=torch.int64),
        }


# ----------------------------------------------------------------------------------------------
# Videos: which frames
# ----------------------------------------------------------------------------------------------


@dataclass
class VideoSampling:
    """How to pick frames. Exactly one of `num_frames` / `fps` is used (fps wins when set).

    num_frames: uniform `linspace(0, total - 1, num_frames)` floored; repeats frames of short videos.
    fps: one frame every 1/fps seconds of video time, from the first frame.
    max_frames: cap; a sampling that would exceed it becomes `max_frames` uniform frames instead.
    video_fps: frame rate of in-memory videos (arrays, PIL lists), for `fps` and timestamps.
    """

    num_frames: int | None = DEFAULT_NUM_FRAMES
    fps: float | None = None
    max_frames: int | None = None
    video_fps: float | None = None

    def validate(self) -> None:
        if self.fps is None and self.num_frames is None:
            raise ValueError("set num_frames or fps")
        if self.fps is None and (isinstance(self.num_frames, bool) or int(self.num_frames) != self.num_frames
                                 or self.num_frames < 1):
            raise ValueError(f"num_frames must be an integer >= 1, got {self.num_frames!r}")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"fps must be > 0, got {self.fps!r}")
        if self.max_frames is not None and (int(self.max_frames) != self.max_frames or self.max_frames < 1):
            raise ValueError(f"max_frames must be an integer >= 1, got {self.max_frames!r}")
        if self.video_fps is not None and not self.video_fps > 0:
            raise ValueError(f"video_fps must be > 0, got {self.video_fps!r}")


def uniform_indices(total: int, count: int) -> np.ndarray:
    """The original's sampling: `np.linspace(0, total - 1, count, dtype=int)` (floors; may repeat)."""
    return np.linspace(0, total - 1, int(count), dtype=int).astype(np.int64)


def video_duration(times: np.ndarray) -> float:
    """Seconds from the first frame to the end of the last one (its display time = median spacing)."""
    spacing = float(np.median(np.diff(times))) if len(times) > 1 else 0.0
    return float(times[-1]) + spacing


def fps_indices(times: np.ndarray, fps: float) -> np.ndarray:
    """Index of the frame on screen at t = k / fps for k = 0 .. floor(duration * fps) - 1 (at least 1).

    times: float64 [total] presentation times in seconds from the first frame, increasing.
    """
    count = max(1, int(math.floor(video_duration(times) * fps + 1e-6)))
    sample_times = np.arange(count, dtype=np.float64) / fps
    return np.clip(np.searchsorted(times, sample_times + 1e-9, side="right") - 1, 0, len(times) - 1)


def choose_indices(total: int, times: np.ndarray | None, sampling: VideoSampling, name: str) -> np.ndarray:
    """Frame indices to sample (non-decreasing), following `sampling`."""
    if total < 1:
        raise ValueError(f"{name}: the video has no frames")
    if sampling.fps is not None:
        if times is None:
            raise ValueError(f"{name}: fps sampling needs frame times (pass video_fps= for in-memory videos)")
        indices = fps_indices(times, sampling.fps)
    else:
        indices = uniform_indices(total, sampling.num_frames)
    if sampling.max_frames is not None and len(indices) > sampling.max_frames:
        indices = uniform_indices(total, sampling.max_frames)
    return indices


@dataclass
class VideoMetadata:
    """What was sampled from one video. `timestamps` are seconds from the video's first frame."""

    source: str
    total_frames: int
    fps: float | None
    duration: float | None
    frame_indices: list[int] = field(default_factory=list)
    timestamps: list[float] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# Videos: PyAV decoding
# ----------------------------------------------------------------------------------------------


@dataclass
class _StreamIndex:
    """Per-frame timing of a video stream, from a demux pass (no decoding).

    pts: int64 [total] presentation timestamps in stream time base, sorted (= display order);
    None when the container does not give timestamps. keyframe_pts: sorted int64 [n_keyframes].
    """

    total: int
    pts: np.ndarray | None
    keyframe_pts: np.ndarray | None
    time_base: Fraction | None
    average_rate: Fraction | None

    def times(self) -> np.ndarray | None:
        """float64 [total] seconds from the first frame, or None when unknown."""
        if self.pts is not None and self.time_base is not None:
            return (self.pts - self.pts[0]).astype(np.float64) * float(self.time_base)
        if self.average_rate:
            return np.arange(self.total, dtype=np.float64) / float(self.average_rate)
        return None


def _source_name(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(source)} bytes>"
    return str(getattr(source, "name", f"<{type(source).__name__}>"))


def _require_av() -> None:
    if av is None:
        raise ImportError("decoding video files needs PyAV: pip install av")


class _VideoFile:
    """Opens a video source with PyAV, turning every failure into one clear exception."""

    def __init__(self, source: str | os.PathLike | bytes | io.IOBase) -> None:
        _require_av()
        self.name = _source_name(source)
        if isinstance(source, (str, os.PathLike)):
            if not os.fspath(source).startswith(("http://", "https://", "rtsp://")) and not os.path.isfile(source):
                raise FileNotFoundError(f"video file not found: {self.name}")
            self._source = os.fspath(source)
        elif isinstance(source, (bytes, bytearray, memoryview)):
            self._source = bytes(source)
        elif getattr(source, "seekable", lambda: False)():
            self._source = source
        else:  # a pipe: we read the stream twice (index, then decode), so keep the encoded bytes
            self._source = source.read()

    def open(self) -> "av.container.InputContainer":
        """A fresh container positioned at the start (file-likes are rewound)."""
        target = io.BytesIO(self._source) if isinstance(self._source, bytes) else self._source
        if hasattr(target, "seek"):
            target.seek(0)
        try:
            container = av.open(target, mode="r", metadata_errors="ignore")
        except av.error.FFmpegError as err:  # EOFError included: an empty or cut file
            raise ValueError(f"{self.name}: cannot be read as a video (PyAV: {err})") from err
        if not container.streams.video:
            container.close()
            raise ValueError(f"{self.name}: the file has no video stream")
        return container

    def error(self, err: Exception) -> ValueError:
        return ValueError(f"{self.name}: the video is corrupt or truncated (PyAV: {err})")


def _scan_stream(container: "av.container.InputContainer", name: str) -> _StreamIndex:
    """Demux (no decode) the first video stream: frame count, presentation times, keyframes.

    Containers often report 0 frames or no duration (mkv, webm, streams): counting packets is
    exact and cheap, and gives real times for variable-frame-rate files.
    """
    stream = container.streams.video[0]
    pts, keys, missing = [], [], False
    for packet in container.demux(stream):
        if packet.size == 0:  # the demuxer's final flush packet
            continue
        stamp = packet.pts if packet.pts is not None else packet.dts
        missing |= stamp is None
        pts.append(stamp)
        if packet.is_keyframe:
            keys.append(stamp)
    if not pts:
        raise ValueError(f"{name}: the video stream has zero frames")
    timed = not missing and stream.time_base is not None
    return _StreamIndex(
        total=len(pts),
        pts=np.sort(np.asarray(pts, dtype=np.int64)) if timed else None,
        keyframe_pts=np.sort(np.asarray(keys, dtype=np.int64)) if timed and keys else None,
        time_base=stream.time_base,
        average_rate=stream.average_rate or stream.guessed_rate,
    )


class _ForwardDecoder:
    """Decodes forward from the current position, remembering the last frame (targets may share it)."""

    def __init__(self, container: "av.container.InputContainer", stream: "av.video.stream.VideoStream") -> None:
        self._frames = container.decode(stream)
        self.frame = None

    def advance_to(self, target_pts: int) -> Any:
        """The first frame with pts >= target_pts (the last frame at end of stream; None if none)."""
        while self.frame is None or self.frame.pts is None or self.frame.pts < target_pts:
            try:
                self.frame = next(self._frames)
            except StopIteration:
                return self.frame
        return self.frame


def _decode_by_seeking(
    container: "av.container.InputContainer", index: _StreamIndex, wanted: np.ndarray
) -> Iterator[tuple[int, Any]]:
    """Yield (frame index, av.VideoFrame) for sorted unique `wanted`, seeking to keyframes.

    A seek is done only when the target's keyframe lies after the decoder's position: close
    targets are reached by decoding forward, far ones by jumping. Frames in between are decoded
    (they are needed as references) but never converted to RGB.
    """
    stream = container.streams.video[0]
    decoder, position = None, None
    for i in wanted:
        target = int(index.pts[i])
        key_slot = max(0, int(np.searchsorted(index.keyframe_pts, target, side="right")) - 1)
        if decoder is None or position is None or index.keyframe_pts[key_slot] > position:
            decoder = _seek(container, stream, index.keyframe_pts, key_slot, target)
        frame = decoder.advance_to(target)
        if frame is None or frame.pts is None:
            raise _SeekFailed(f"no frame decoded up to pts {target}")
        if frame.pts != target:
            logger.warning("frame %d (pts %d) not decodable; using the frame at pts %s", i, target, frame.pts)
        position = frame.pts
        yield int(i), frame


class _SeekFailed(Exception):
    """The demuxer cannot land at or before a frame: decode sequentially instead."""


def _seek(container, stream, keyframe_pts: np.ndarray, key_slot: int, target: int) -> _ForwardDecoder:
    """Seek to keyframe `key_slot` and return a decoder positioned at or before `target`.

    Some demuxers (MPEG-TS) land after the requested keyframe: then earlier keyframes are tried,
    then the start of the file.
    """
    for slot in [*range(key_slot, max(key_slot - 3, -1), -1), None]:
        if slot is None:
            container.seek(0)  # the start of the file (AV_TIME_BASE units)
        else:
            container.seek(int(keyframe_pts[slot]), stream=stream, backward=True, any_frame=False)
        decoder = _ForwardDecoder(container, stream)
        first = decoder.advance_to(-(2**62))  # the first frame after the seek
        if first is not None and first.pts is not None and first.pts <= target:
            return decoder
    raise _SeekFailed(f"cannot seek to pts {target}")


def _decode_sequentially(container: "av.container.InputContainer", wanted: np.ndarray) -> Iterator[tuple[int, Any]]:
    """Yield (frame index, frame) for sorted unique `wanted` by counting decoded frames (no timestamps)."""
    stream = container.streams.video[0]
    wanted_list, position, last = [int(i) for i in wanted], 0, None
    for count, frame in enumerate(container.decode(stream)):
        last = frame
        while position < len(wanted_list) and wanted_list[position] == count:
            yield wanted_list[position], frame
            position += 1
        if position == len(wanted_list):
            return
    for i in wanted_list[position:]:  # fewer decodable frames than packets: keep the last one
        if last is None:
            raise ValueError("no frame could be decoded")
        logger.warning("frame %d not decodable; using the last decoded frame", i)
        yield i, last


def _average_fps(total: int, times: np.ndarray | None) -> float | None:
    duration = None if times is None else video_duration(times)
    return float(total / duration) if duration else None


def _frame_seconds(frame: Any, index: _StreamIndex, i: int, first_pts: int | None) -> float | None:
    if frame.pts is not None and frame.time_base is not None and first_pts is not None:
        return float((frame.pts - first_pts) * frame.time_base)
    times = index.times()
    return None if times is None else float(times[i])


def _decode_wanted(
    video: _VideoFile, index: _StreamIndex, wanted: np.ndarray, convert: Callable[[Image.Image], Any], seek: bool
) -> tuple[dict[int, Any], dict[int, float | None]]:
    """{frame index: convert(RGB frame)} and {frame index: seconds} for the sorted unique `wanted`."""
    converted, seconds = {}, {}
    first_pts = int(index.pts[0]) if index.pts is not None else None
    with video.open() as container:
        container.streams.video[0].codec_context.thread_type = "AUTO"  # frame threads: ~cores x faster
        frames = _decode_by_seeking(container, index, wanted) if seek else _decode_sequentially(container, wanted)
        try:
            for i, frame in frames:
                converted[i] = convert(frame.to_image())  # RGB, resized and cropped right away
                seconds[i] = _frame_seconds(frame, index, i, first_pts)
        except av.error.FFmpegError as err:
            raise video.error(err) from err
        except ValueError as err:
            raise ValueError(f"{video.name}: {err}") from err
    return converted, seconds


def read_video_frames(
    source: str | os.PathLike | bytes | io.IOBase,
    sampling: VideoSampling,
    convert: Callable[[Image.Image], Any],
) -> tuple[list[Any], VideoMetadata]:
    """Decode the sampled frames of a video file and pass each, as an RGB PIL image, to `convert`
    as soon as it is decoded (so only converted frames are ever held).

    Returns ([convert(frame) for each sampled index, in order; repeated indices share the result],
    metadata). Errors: FileNotFoundError (missing path), ValueError (not a video, no video stream,
    zero frames, corrupt data), each naming the source.
    """
    sampling.validate()
    video = _VideoFile(source)
    with video.open() as container:
        try:
            index = _scan_stream(container, video.name)
        except av.error.FFmpegError as err:
            raise video.error(err) from err
    times = index.times()
    indices = choose_indices(index.total, times, sampling, video.name)
    wanted = np.unique(indices)
    try:
        converted, seconds = _decode_wanted(video, index, wanted, convert, seek=index.keyframe_pts is not None)
    except _SeekFailed as err:
        logger.warning("%s: %s; decoding sequentially", video.name, err)
        converted, seconds = _decode_wanted(video, index, wanted, convert, seek=False)
    metadata = VideoMetadata(
        source=video.name,
        total_frames=index.total,
        fps=_average_fps(index.total, times),
        duration=None if times is None else video_duration(times),
        frame_indices=[int(i) for i in indices],
        timestamps=None if any(seconds[i] is None for i in wanted) else [seconds[int(i)] for i in indices],
    )
    return [converted[int(i)] for i in indices], metadata


def _in_memory_frames(video: Any) -> list[Any] | None:
    """A video given as frames ([F, H, W, 3] array/tensor or a list of images), else None."""
    if isinstance(video, (np.ndarray, torch.Tensor)):
        if video.ndim != 4:
            raise ValueError(f"a video array must be [F, H, W, 3], got shape {tuple(video.shape)}")
        return list(video)
    if isinstance(video, (list, tuple)):
        return list(video)
    return None


def sample_frames_in_memory(
    frames: Sequence[Any], sampling: VideoSampling, convert: Callable[[Image.Image], Any], name: str
) -> tuple[list[Any], VideoMetadata]:
    """Same as `read_video_frames` for a video already in memory (frames of any image type)."""
    sampling.validate()
    total = len(frames)
    times = None if sampling.video_fps is None else np.arange(total, dtype=np.float64) / sampling.video_fps
    indices = choose_indices(total, times, sampling, name)
    converted = {int(i): convert(_frame_to_pil(frames[int(i)], name, int(i))) for i in np.unique(indices)}
    metadata = VideoMetadata(
        source=name,
        total_frames=total,
        fps=sampling.video_fps,
        duration=None if sampling.video_fps is None else total / sampling.video_fps,
        frame_indices=[int(i) for i in indices],
        timestamps=None if times is None else [float(times[int(i)]) for i in indices],
    )
    return [converted[int(i)] for i in indices], metadata


def _frame_to_pil(frame: Any, name: str, i: int) -> Image.Image:
    """One in-memory frame -> RGB PIL; numpy frames are HWC, torch frames CHW or HWC."""
    return to_rgb_image(frame, what=f"{name} frame {i}")


# ----------------------------------------------------------------------------------------------
# Nested inputs -> flat lists
# ----------------------------------------------------------------------------------------------


def _is_single_video(item: Any) -> bool:
    """A video: a path, bytes, a file-like, a 4-D array, or a list whose items are frames."""
    if isinstance(item, (str, os.PathLike, bytes, bytearray, memoryview)) or hasattr(item, "read"):
        return True
    if isinstance(item, (np.ndarray, torch.Tensor)):
        return item.ndim == 4
    if isinstance(item, (list, tuple)) and item:
        return all(isinstance(f, Image.Image) or (isinstance(f, (np.ndarray, torch.Tensor)) and f.ndim == 3)
                   for f in item)
    return False


def flatten_videos(videos: Any) -> list[Any]:
    """Videos in order of appearance, from a video, a list of videos or per-sample lists."""
    if videos is None:
        return []
    if _is_single_video(videos):
        return [videos]
    if isinstance(videos, (list, tuple)):
        return [v for item in videos for v in flatten_videos(item)]
    raise TypeError(f"unsupported video input type {type(videos).__name__}")


def flatten_images(images: Any) -> list[Any]:
    """Images in order of appearance, from an image, a list of images or per-sample lists."""
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return [im for item in images for im in flatten_images(item)]
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)  # a batch of images
    return [images]


# ----------------------------------------------------------------------------------------------
# The processor
# ----------------------------------------------------------------------------------------------

# Options of __call__ that are not tokenizer arguments (apply_chat_template forwards them).
_VIDEO_OPTIONS = ("num_frames", "fps", "max_frames", "video_fps")
_CALL_OPTIONS = _VIDEO_OPTIONS + ("return_metadata", "padding_side", "padding", "return_tensors")


class VideoXLProcessor(ProcessorMixin):
    r"""Video-XL processor: a Qwen2 tokenizer plus CLIP-336 frame / anyres image preprocessing.

    Every `<video>` in the text becomes `num_image_tokens` (144) `<video>` tokens per sampled frame,
    every `<image>` 144 `<image>` tokens per anyres tile. The token strings are looked up in the
    tokenizer, so any tokenizer that has them works.

    Args:
        tokenizer: a tokenizer with `<image>` and `<video>` tokens.
        chat_template: Jinja chat template (ChatML; one `<video>`/`<image>` per content item).
        num_image_tokens: tokens per frame / tile (144 = 24x24 patches pooled 2x2).
        image_size: frame / tile side (336).
        image_mean, image_std: CLIP normalization.
        image_grid_pinpoints: anyres resolutions [width, height]; default (336a, 336b), a*b <= 49.
        num_frames: default uniform frame count per video (128: the released model's eval setting).
        fps: default sampling rate in frames per second of video (None: use num_frames).
        max_frames: default cap on sampled frames (None: no cap).
        padding_side: "left" (for generation) or "right" (for training).
        image_token, video_token: placeholder strings.
    """

    def __init__(
        self,
        tokenizer=None,
        chat_template: str | None = None,
        num_image_tokens: int = DEFAULT_TOKENS_PER_FRAME,
        image_size: int = DEFAULT_IMAGE_SIZE,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
        image_grid_pinpoints: Sequence[Sequence[int]] | None = None,
        num_frames: int | None = DEFAULT_NUM_FRAMES,
        fps: float | None = None,
        max_frames: int | None = None,
        padding_side: str = "left",
        image_token: str = "<image>",
        video_token: str = "<video>",
    ) -> None:
        self.num_image_tokens = int(num_image_tokens)
        self.image_size = int(image_size)
        self.image_mean = [float(x) for x in image_mean]
        self.image_std = [float(x) for x in image_std]
        # None (the default, kept as None in processor_config.json) means default_grid_pinpoints(image_size).
        self.image_grid_pinpoints = None if image_grid_pinpoints is None else [list(p) for p in image_grid_pinpoints]
        self.num_frames, self.fps, self.max_frames = num_frames, fps, max_frames
        self.padding_side = padding_side
        self.image_token, self.video_token = image_token, video_token
        self.image_processor = VideoXLImageProcessor(self.image_size, self.image_mean, self.image_std,
                                                     self.image_grid_pinpoints)
        super().__init__(tokenizer, chat_template=chat_template)
        self.image_token_id = self._token_id(image_token)
        self.video_token_id = self._token_id(video_token)

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id or isinstance(token_id, list):
            raise ValueError(f"the tokenizer has no {token!r} token; add it as a special token")
        return int(token_id)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_sizes", "pixel_values_videos"]

    # -- public entry points ------------------------------------------------------------------

    def __call__(self, images=None, text=None, videos=None, **kwargs) -> BatchFeature:
        """Prepare a batch.

        Args:
            images: an image or a list (optionally per sample) of images: PIL, numpy HWC, torch CHW,
                path, URL. Used in order of appearance of `<image>` across the batch.
            text: a prompt or a list of prompts containing `<image>` / `<video>` placeholders.
            videos: a video or a list (optionally per sample) of videos: path, bytes, file-like,
                uint8 [F, H, W, 3] array/tensor, or a list of frames (PIL/arrays).
            num_frames / fps / max_frames / video_fps: frame sampling (see `VideoSampling`).
            padding_side: "left" / "right" (default: the processor's, "left").
            return_tensors: "pt" (default) or None for lists of ids.
            return_metadata: add "video_metadata" (list of dicts, one per video, with
                `frame_indices` and `timestamps`); pop it before `model.generate(**inputs)`.
            other keyword arguments go to the tokenizer (e.g. `add_special_tokens`).

        Returns:
            BatchFeature with input_ids / attention_mask [B, L] (when text is given);
            pixel_values_videos float32 [n_videos, F, 3, 336, 336] if all videos have F frames, else
            [total_frames, 3, 336, 336]; pixel_values float32 [total_tiles, 3, 336, 336] and
            image_sizes int64 [n_images, 2] (height, width).
        """
        if isinstance(images, str) and (self.image_token in images or self.video_token in images):
            raise ValueError("the first positional argument is `images` (transformers' order is images, text, "
                             "videos): pass the prompt as text=...")
        options = self._split_kwargs(kwargs)
        texts = self._normalize_text(text)
        video_list, image_list = flatten_videos(videos), flatten_images(images)
        self._check_placeholder_counts(texts, len(video_list), len(image_list))

        data: dict[str, Any] = {}
        video_out = self._process_videos(video_list, options["sampling"]) if video_list else None
        image_out = self.image_processor.preprocess_images(image_list) if image_list else None
        if texts is not None:
            data.update(self._tokenize(texts, video_out, image_out, options))
        if video_out is not None:
            data["pixel_values_videos"] = video_out["pixel_values_videos"]
            if options["return_metadata"]:
                data["video_metadata"] = [m.to_dict() for m in video_out["metadata"]]
        if image_out is not None:
            data["pixel_values"], data["image_sizes"] = image_out["pixel_values"], image_out["image_sizes"]
        return BatchFeature(data, tensor_type=options["return_tensors"],
                            skip_tensor_conversion=["video_metadata", "text_replacement_offsets"])

    def apply_chat_template(self, conversation, chat_template=None, processor_kwargs=None, **kwargs):
        """transformers' apply_chat_template; our sampling options may be passed directly as kwargs
        (e.g. `num_frames=64`) and reach `__call__`. Videos/images named by path in the messages
        are loaded by `__call__` (PyAV / PIL; no torchvision)."""
        processor_kwargs = dict(processor_kwargs or {})
        for key in _CALL_OPTIONS:
            if key in kwargs and key != "return_tensors":
                processor_kwargs[key] = kwargs.pop(key)
        conversation, arguments = chat_template_arguments(conversation, processor_kwargs)
        return super().apply_chat_template(conversation, chat_template=chat_template, **arguments, **kwargs)

    def load_video(self, video: VideoLike, **sampling_kwargs) -> tuple[torch.Tensor, VideoMetadata]:
        """One video -> (float32 [F, 3, S, S] pixel values, metadata). Options as in `__call__`."""
        return self.image_processor.video_pixels(video, self._sampling(sampling_kwargs))

    # -- helpers --------------------------------------------------------------------------------

    def _sampling(self, overrides: dict[str, Any]) -> VideoSampling:
        """Call options over processor defaults; a call-level num_frames overrides a default fps."""
        if overrides.get("num_frames") is not None and overrides.get("fps") is not None:
            raise ValueError("pass either num_frames or fps, not both")
        fps = overrides.get("fps", None if overrides.get("num_frames") is not None else self.fps)
        sampling = VideoSampling(
            num_frames=overrides.get("num_frames") if overrides.get("num_frames") is not None else self.num_frames,
            fps=fps,
            max_frames=overrides.get("max_frames", self.max_frames),
            video_fps=overrides.get("video_fps"),
        )
        sampling.validate()
        return sampling

    def _split_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Separate sampling / output options from tokenizer arguments."""
        kwargs = dict(kwargs)
        for nested in ("videos_kwargs", "text_kwargs", "images_kwargs", "common_kwargs"):
            kwargs.update(kwargs.pop(nested, None) or {})
        if kwargs.pop("audio", None) is not None:
            raise ValueError("Video-XL takes no audio")
        if kwargs.pop("sanitize_control_tokens", False):
            raise NotImplementedError("sanitize_control_tokens is not supported by VideoXLProcessor")
        kwargs.pop("do_sample_frames", None)  # apply_chat_template's flag: we always sample
        sampling = self._sampling({k: kwargs.pop(k) for k in _VIDEO_OPTIONS if k in kwargs})
        padding_side = kwargs.pop("padding_side", None) or self.padding_side
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        return {
            "sampling": sampling,
            "padding_side": padding_side,
            "padding": kwargs.pop("padding", True),
            "return_tensors": kwargs.pop("return_tensors", "pt"),
            "return_metadata": bool(kwargs.pop("return_metadata", False)),
            "return_text_replacement_offsets": bool(kwargs.pop("return_text_replacement_offsets", False)),
            "tokenizer_kwargs": kwargs,
        }

    @staticmethod
    def _normalize_text(text: Any) -> list[str] | None:
        if text is None:
            return None
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("text must be a string or a list of strings")
        return texts

    def _check_placeholder_counts(self, texts: list[str] | None, n_videos: int, n_images: int) -> None:
        """Every placeholder needs exactly one visual input and vice versa (checked before decoding)."""
        for token, count, kind in ((self.video_token, n_videos, "videos"), (self.image_token, n_images, "images")):
            n_markers = 0 if texts is None else sum(t.count(token) for t in texts)
            if texts is not None and n_markers != count:
                raise ValueError(f"the text has {n_markers} {token} placeholder(s) but {count} {kind} were given")

    def _process_videos(self, videos: list[Any], sampling: VideoSampling) -> dict[str, Any]:
        pixels, metadata = zip(*(self.image_processor.video_pixels(v, sampling, f"video {i}")
                                 for i, v in enumerate(videos)))
        frame_counts = [p.shape[0] for p in pixels]
        if len(set(frame_counts)) == 1:
            stacked = pixels[0].unsqueeze(0) if len(pixels) == 1 else torch.stack(pixels)
        else:
            stacked = torch.cat(pixels)  # [total_frames, ...], videos in order of appearance
        return {"pixel_values_videos": stacked, "metadata": list(metadata), "num_frames": frame_counts}

    def _expand_placeholders(
        self, texts: list[str], frame_counts: list[int], tile_counts: list[int]
    ) -> tuple[list[str], list[list[dict[str, Any]]]]:
        """Replace the n-th `<video>` (`<image>`) of the batch by 144 x frames (tiles) tokens.

        Also returns, per sample, the replacement offsets transformers uses for assistant masks.
        """
        units = {self.video_token: iter(frame_counts), self.image_token: iter(tile_counts)}
        kinds = {self.video_token: "video", self.image_token: "image"}
        pattern = re.compile("|".join(re.escape(t) for t in sorted(units, key=len, reverse=True)))
        expanded, offsets = [], []
        for text in texts:
            pieces, sample_offsets, last, shift = [], [], 0, 0
            for match in pattern.finditer(text):
                token, (start, end) = match.group(), match.span()
                replacement = token * (self.num_image_tokens * next(units[token]))
                pieces += [text[last:start], replacement]
                new_span = (start + shift, start + shift + len(replacement))
                sample_offsets.append({"type": kinds[token], "span": (start, end), "new_span": new_span,
                                       "text": token, "replacement": replacement})
                shift += len(replacement) - len(token)
                last = end
            expanded.append("".join(pieces) + text[last:])
            offsets.append(sample_offsets)
        return expanded, offsets

    def _tokenize(self, texts: list[str], video_out: dict | None, image_out: dict | None,
                  options: dict[str, Any]) -> dict[str, Any]:
        frame_counts = video_out["num_frames"] if video_out else []
        tile_counts = image_out["num_tiles"].tolist() if image_out else []
        expanded, offsets = self._expand_placeholders(texts, frame_counts, tile_counts)
        encoded = self.tokenizer(expanded, padding=options["padding"], padding_side=options["padding_side"],
                                 return_tensors=None, **options["tokenizer_kwargs"])
        self._check_token_counts(encoded["input_ids"], sum(frame_counts), sum(tile_counts))
        result = dict(encoded)
        if options["return_text_replacement_offsets"]:
            result["text_replacement_offsets"] = offsets
        elif "offset_mapping" in result:  # asked without the replacements: offsets into the caller's text
            result["offset_mapping"] = [
                offsets_in_caller_text(row, sample) for row, sample in zip(result["offset_mapping"], offsets)
            ]
        return result

    def _check_token_counts(self, input_ids: list[list[int]], frames: int, tiles: int) -> None:
        """Truncation or a tokenizer that splits the placeholders would desync text and pixels."""
        for token_id, units, token in ((self.video_token_id, frames, self.video_token),
                                       (self.image_token_id, tiles, self.image_token)):
            found = sum(row.count(token_id) for row in input_ids)
            if found != units * self.num_image_tokens:
                raise ValueError(f"the tokenized text has {found} {token} tokens, expected "
                                 f"{units * self.num_image_tokens} ({units} x {self.num_image_tokens}); "
                                 "was it truncated?")


VideoXLProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["VideoXLProcessor", "VideoXLImageProcessor", "VideoMetadata", "VideoSampling", "read_video_frames"]
