# Copyright 2024 BAAI and the Video-XL authors; this file: the Video-XL transformers port.
# Licensed under the Apache License, Version 2.0.
"""Image processor of Video-XL: LLaVA-NeXT "anyres" tiling and CLIP-336 preprocessing.

A subclass of transformers' PIL-backed LLaVA-NeXT image processor (no torchvision), which already
computes the original's tiles bit for bit: best grid pinpoint, aspect-kept bicubic resize, centered
paste on black, 336x336 tiles row by row, CLIP rescale and normalize. Video-XL differs in three ways:

* the base thumbnail LLaVA-NeXT puts first is not computed (the model never looks at it), and the
  tiles of all images are concatenated: `pixel_values` [total_tiles, 3, S, S], `num_tiles` [n];
* inputs go through `to_rgb_image` first: any PIL mode (16-bit grayscale scaled, not clipped),
  EXIF orientation applied, truncated files named in one clear error;
* video frames take a measured fast path, `frames_to_pixels`: PIL resize of the short side + center
  crop to uint8, then one table lookup per pixel for rescale + normalize (the same float32 values).
"""

from __future__ import annotations

import io
import os
import threading
from contextlib import contextmanager
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import select_best_resolution
from transformers.image_transforms import divide_to_patches
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from .video_decoding_videoxl import UrlPolicy, check_media_string, fetch_url, is_remote_url, local_path


try:  # transformers >= 5.5 names the PIL/numpy backend explicitly ...
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil as _LlavaNextPilImageProcessor,
    )
except ImportError:  # ... earlier 5.x releases: the default LLaVA-NeXT image processor is the PIL one
    from transformers import LlavaNextImageProcessor as _LlavaNextPilImageProcessor


DEFAULT_IMAGE_SIZE = 336
MAX_TILES = 49
# A frame's resized long side beyond this many crop sides is never built whole (see `resize_crop`).
MAX_RESIZED_ASPECT = 16

ImageLike = Any  # PIL.Image.Image | np.ndarray | torch.Tensor | bytes | str | os.PathLike


# ----------------------------------------------------------------------------------------------
# Any image input -> upright RGB PIL image
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
        if array.size and not np.isfinite(array).all():
            raise ValueError("float images must be finite; got NaN or inf")
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


_STRICT_LOADING = threading.Lock()


@contextmanager
def strict_loading():
    """PIL refuses data that ends early while this holds. Libraries set PIL's process-wide
    `LOAD_TRUNCATED_IMAGES` (lmms-eval does at import), under which a cut file decodes into gray rows without a
    word; the flag is restored afterwards (a lock keeps concurrent loads here from restoring each other's)."""
    with _STRICT_LOADING:
        previous, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous


def pil_to_rgb(image: Image.Image, what: str = "image") -> Image.Image:
    """Any PIL mode (L, LA, P, RGBA, CMYK, I;16, I, F, ...) -> upright RGB.

    The EXIF orientation is applied (as `ImageOps.exif_transpose`); like the original
    (`Image.open(...).convert("RGB")`), alpha is dropped, not composited. A file whose data ends
    early (a cut JPEG) is a ValueError naming `what`.
    """
    _check_sides(image.width, image.height, what)
    try:
        with strict_loading():
            image.load()
        image = ImageOps.exif_transpose(image)
    except OSError as err:  # "image file is truncated", "broken data stream", ...
        raise ValueError(f"{what} is truncated or corrupt ({err})") from err
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        image = _high_bit_depth_to_l(image)
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # avoids PIL's warning about palette transparency
    return image.convert("RGB")


def open_image_bytes(data: bytes, what: str) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data))
    except OSError as err:
        raise ValueError(f"{what} cannot be read as an image ({err})") from err


def open_image_file(path: str | os.PathLike, what: str) -> Image.Image:
    text = os.fspath(path)
    if not os.path.isfile(text):
        raise FileNotFoundError(f"image file not found: {text}")
    try:
        return Image.open(text)
    except OSError as err:
        raise ValueError(f"cannot read image {text}: {err}") from err


def load_image_source(image: ImageLike, what: str, url_policy: UrlPolicy | None = None) -> ImageLike:
    """http(s) URLs -> PIL images (fetched under `url_policy`, default `UrlPolicy()`), `file://` URLs -> paths,
    `data:` URLs decoded; other URL schemes refused; any other input as given."""
    if not isinstance(image, str):
        return image
    if is_remote_url(image):
        return open_image_bytes(fetch_url(image, url_policy), f"{what} ({image})")
    if image.startswith("data:"):
        from transformers.image_utils import load_image  # base64 only: no network, no torchvision

        return load_image(image)
    check_media_string(image, url_policy or UrlPolicy(), what)
    return local_path(image)


def to_rgb_image(image: ImageLike, what: str = "image") -> Image.Image:
    """Convert one image input to an upright RGB PIL image.

    Accepted: PIL images of any mode; numpy [H, W], [H, W, C] (or [C, H, W]) uint8 or float in [0, 1];
    torch [C, H, W] (or [H, W, C]); bytes of an encoded image; a local path (URLs: `load_image_source`
    first). Raises ValueError for a zero side, a truncated or unreadable file, FileNotFoundError for a
    missing file.
    """
    if isinstance(image, Image.Image):
        return pil_to_rgb(image, what)
    if isinstance(image, (str, os.PathLike)):
        return pil_to_rgb(open_image_file(image, what), f"{what} ({os.fspath(image)})")
    if isinstance(image, (bytes, bytearray, memoryview)):
        return pil_to_rgb(open_image_bytes(bytes(image), what), f"{what} ({len(image)} bytes)")
    if isinstance(image, torch.Tensor):
        return _array_to_pil(image.detach().cpu().numpy(), channels_first=True, what=what)
    if isinstance(image, np.ndarray):
        return _array_to_pil(image, channels_first=False, what=what)
    raise TypeError(f"unsupported {what} type {type(image).__name__}")


# ----------------------------------------------------------------------------------------------
# The image processor
# ----------------------------------------------------------------------------------------------


def default_grid_pinpoints(tile: int = DEFAULT_IMAGE_SIZE, max_tiles: int = MAX_TILES) -> list[list[int]]:
    """[height, width] = (tile*b, tile*a) for a*b <= max_tiles, except (tile, tile), a-major order.

    transformers' LLaVA-NeXT reads pinpoints as [height, width]; the released Video-XL config lists
    the same resolutions as [width, height]. The order matters for ties in `select_best_resolution`
    and is the released config's order, so ties break as in the original.
    """
    return [
        [tile * b, tile * a]
        for a in range(1, max_tiles + 1)
        for b in range(1, max_tiles // a + 1)
        if (a, b) != (1, 1)
    ]


def normalization_lut(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """float32 [3, 256]: the value CLIP preprocessing gives each uint8 level of each channel.

    Same arithmetic as transformers' PIL backend (rescale in float64, cast to float32, normalize in
    float32), so a table lookup reproduces it bit for bit and costs one gather per pixel.
    """
    levels = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    mean32, std32 = np.asarray(mean, np.float32)[:, None], np.asarray(std, np.float32)[:, None]
    return ((levels[None, :] - mean32) / std32).astype(np.float32)


class VideoXLImageProcessor(_LlavaNextPilImageProcessor):
    r"""CLIP-336 anyres tiling (images) and frame preprocessing (videos) of Video-XL.

    Called on images it returns `pixel_values` float32 [total_tiles, 3, S, S] (tiles of every image,
    row by row, no base thumbnail), `image_sizes` int64 [n_images, 2] (upright height, width) and
    `num_tiles` int64 [n_images]. `frames_to_pixels` is the video path.

    Args (besides LLaVA-NeXT's): `size` {"shortest_edge": S}, `crop_size` {"height": S, "width": S};
    `image_grid_pinpoints` ([height, width] pairs, as LLaVA-NeXT's) defaults to `default_grid_pinpoints(S)`.
    """

    model_input_names = ["pixel_values", "image_sizes"]
    size = {"shortest_edge": DEFAULT_IMAGE_SIZE}
    crop_size = {"height": DEFAULT_IMAGE_SIZE, "width": DEFAULT_IMAGE_SIZE}
    image_mean = list(OPENAI_CLIP_MEAN)
    image_std = list(OPENAI_CLIP_STD)
    do_pad = False  # tiles of all images are concatenated, not padded to a common count
    image_grid_pinpoints = None

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.image_grid_pinpoints is None:
            self.image_grid_pinpoints = default_grid_pinpoints(self.tile_size)

    @property
    def tile_size(self) -> int:
        """S: the side of a frame crop and of a tile."""
        crop = self.crop_size
        return int(crop["height"] if isinstance(crop, dict) else crop.height)

    # -- images: the library's anyres pipeline --------------------------------------------------

    def preprocess(self, images: Any, *args: Any, **kwargs: Any) -> BatchFeature:
        """Images (or per-sample lists of images) -> pixel_values, image_sizes, num_tiles (see class doc)."""
        rgb = [to_rgb_image(load_image_source(image, f"image {i}"), f"image {i}")
               for i, image in enumerate(flatten_images(images))]
        return_tensors = kwargs.pop("return_tensors", None)
        kwargs.pop("do_pad", None)
        out = super().preprocess(rgb, *args, do_pad=False, return_tensors=None, **kwargs)
        tiles = [np.asarray(image_tiles) for image_tiles in out["pixel_values"]]
        data = {
            "pixel_values": np.concatenate(tiles) if tiles else np.zeros((0, 3, self.tile_size, self.tile_size),
                                                                         np.float32),
            "image_sizes": np.asarray([[im.height, im.width] for im in rgb], dtype=np.int64).reshape(-1, 2),
            "num_tiles": np.asarray([len(t) for t in tiles], dtype=np.int64),
        }
        return BatchFeature(data, tensor_type=return_tensors)

    def get_image_patches(self, image: np.ndarray, grid_pinpoints, size, patch_size: int, resample) -> list:
        """[3, H, W] -> the anyres tiles [3, S, S] row by row (LLaVA-NeXT's, without the base thumbnail)."""
        best = select_best_resolution(image.shape[-2:], grid_pinpoints)
        padded = self._pad_for_patching(self._resize_for_patching(image, best, resample=resample), best)
        return divide_to_patches(padded, patch_size=patch_size)

    def tile_grid(self, height: int, width: int) -> tuple[int, int]:
        """(rows, columns) of tiles an image of this size is cut into."""
        best_h, best_w = select_best_resolution((height, width), self.image_grid_pinpoints)
        return best_h // self.tile_size, best_w // self.tile_size

    # -- video frames: the fast path ------------------------------------------------------------

    def resize_crop(self, image: Image.Image) -> np.ndarray:
        """RGB PIL [H, W] -> uint8 [3, S, S]: short side to S (bicubic, long side floored), center crop.

        The result is a fresh array (never a view of the resized frame). A frame whose resized long
        side would exceed 16 S (aspect ratio beyond 16:1) is resized only where the crop looks (PIL's
        `box`), so memory per frame stays bounded by the source frame's size, not S x S x aspect.
        """
        s = self.tile_size
        width, height = image.size
        if width <= height:
            new_w, new_h = s, int(s * height / width)
        else:
            new_w, new_h = int(s * width / height), s
        top, left = (new_h - s) // 2, (new_w - s) // 2
        if max(new_w, new_h) > MAX_RESIZED_ASPECT * s:
            return self._resize_crop_bounded(image, new_w, new_h, top, left)
        resized = np.asarray(image.resize((new_w, new_h), Image.Resampling.BICUBIC))
        return np.ascontiguousarray(resized[top : top + s, left : left + s].transpose(2, 0, 1))

    def _resize_crop_bounded(self, image: Image.Image, new_w: int, new_h: int, top: int, left: int) -> np.ndarray:
        """`resize_crop` for extreme aspect ratios without building the [new_h, new_w] frame.

        PIL resizes horizontally, then vertically. A wide frame: the horizontal pass restricted to the
        crop's box gives the same pixels. A tall frame: the horizontal pass alone (S x H), then the
        vertical pass restricted to the crop's rows (a one-call box resize would differ by up to ~20
        levels here; these two calls match the whole-frame resize, at most 2 levels off on < 1% of pixels).
        """
        s, (width, height) = self.tile_size, image.size
        if new_w > new_h:
            scale = width / new_w
            box = (left * scale, 0, (left + s) * scale, height)
            kept = image.resize((s, s), Image.Resampling.BICUBIC, box=box)
        else:
            scale = height / new_h
            narrow = image.resize((s, height), Image.Resampling.BICUBIC)
            kept = narrow.resize((s, s), Image.Resampling.BICUBIC, box=(0, top * scale, s, (top + s) * scale))
        return np.asarray(kept).transpose(2, 0, 1).copy()

    def frames_to_pixels(self, crops_u8: Sequence[np.ndarray] | np.ndarray) -> torch.Tensor:
        """Crops from `resize_crop`, uint8 [F, 3, S, S] (or a list of [3, S, S]) -> float32 [F, 3, S, S],
        CLIP-normalized.

        A table lookup per pixel with numpy's single-threaded gather: torch's is ~20x slower here when
        other processes hold the cores (its intra-op threads then spin), and it would need an int64
        copy of the index.
        """
        s, lut = self.tile_size, normalization_lut(self.image_mean, self.image_std)
        out = np.empty((len(crops_u8), 3, s, s), dtype=np.float32)
        for slot, crop in enumerate(crops_u8):
            for channel in range(3):  # uint8 indices are always < 256: "clip" skips the bounds check
                np.take(lut[channel], crop[channel], out=out[slot, channel], mode="clip")
        return torch.from_numpy(out)

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        if output.get("image_grid_pinpoints") == default_grid_pinpoints(self.tile_size):
            output["image_grid_pinpoints"] = None  # 1,100 numbers that `__init__` derives from the tile size
        return output


def flatten_images(images: Any) -> list[Any]:
    """Images in order of appearance, from an image, a list of images or per-sample lists."""
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return [im for item in images for im in flatten_images(item)]
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        return list(images)  # a batch of images
    return [images]


VideoXLImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = ["VideoXLImageProcessor", "default_grid_pinpoints", "load_image_source", "normalization_lut",
           "to_rgb_image"]
