# Copyright 2024 BAAI and the Video-XL authors; this file: the Video-XL transformers port.
# Licensed under the Apache License, Version 2.0.
"""Processor of Video-XL: text, videos and images into model inputs.

transformers' `ProcessorMixin` does the work (kwargs, placeholder expansion, tokenization, chat
templates, `sanitize_control_tokens`); this file says what one placeholder becomes:

* every `<video>` -> `num_image_tokens` (144) `<video>` tokens per sampled frame; frames come from
  `video_decoding_videoxl` (PyAV) and are CLIP-preprocessed by the image processor's fast path;
* every `<image>` -> 144 `<image>` tokens per anyres tile (`image_processing_videoxl`).

Nothing here needs torchvision: transformers' video processors do, so videos go through the image
processor, which owns the frame preprocessing.
"""


import os
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from transformers.processing_utils import ProcessingKwargs, ProcessorMixin, VideosKwargs

from .compat_videoxl import (
    PROCESSOR_KEEPS_MARKED_TEXT,
    ProcessorTextKwargs,
    chat_template_keywords,
    offsets_in_caller_text,
    refuse_marked_text,
)
from .image_processing_videoxl import (
    VideoXLImageProcessor,
    default_grid_pinpoints,
    flatten_images,
    load_image_source,
    to_rgb_image,
)
from .video_decoding_videoxl import (
    DEFAULT_MAX_URL_BYTES,
    DEFAULT_NUM_FRAMES,
    DEFAULT_URL_TIMEOUT,
    UrlPolicy,
    VideoSampling,
    VideoXLVideoMetadata,
    in_memory_frames,
    read_video_frames,
    sample_frames_in_memory,
    source_name,
)


if PROCESSOR_KEEPS_MARKED_TEXT:  # user text marked by `mark_control_tokens` is never a placeholder
    from transformers.utils.chat_template_utils import _get_control_token_patterns, mark_control_tokens

DEFAULT_TOKENS_PER_FRAME = 144  # 24x24 CLIP patches, 2x2 average pool -> 12x12


class VideoXLVideosKwargs(VideosKwargs, total=False):
    """Video options besides the library's `num_frames`, `fps`, `do_sample_frames`, `return_metadata`.

    max_frames: cap on sampled frames (and permission to go past 1,024 frames).
    video_fps: frame rate of in-memory videos, for `fps` sampling and timestamps.
    allow_partial_video: use a truncated or partly undecodable file (with a warning) instead of raising.
    """

    max_frames: int | None
    video_fps: int | float | None
    allow_partial_video: bool | None


class VideoXLProcessorKwargs(ProcessingKwargs, total=False):
    text_kwargs: ProcessorTextKwargs
    videos_kwargs: VideoXLVideosKwargs
    # Batches of prompts of different lengths pad by default. (`_defaults` is read by every 5.x release;
    # 5.24 also reads class attributes of the processor.)
    _defaults = {"text_kwargs": {"padding": True}}


class VideoXLProcessor(ProcessorMixin):
    r"""Video-XL processor: a Qwen2 tokenizer and `VideoXLImageProcessor` (CLIP-336 frames, anyres images).

    Args:
        tokenizer: a tokenizer with `<image>` and `<video>` tokens.
        image_processor: a `VideoXLImageProcessor` (built from `image_size` / `image_mean` / `image_std` /
            `image_grid_pinpoints` when not given).
        chat_template: Jinja chat template (ChatML; one `<video>`/`<image>` per content item).
        num_image_tokens: tokens per frame / tile (144 = 24x24 patches pooled 2x2).
        num_frames: default uniform frame count per video file (128: the released model's eval setting).
        fps: default sampling rate in frames per second of video time (None: use num_frames).
        max_frames: default cap on sampled frames (None: no cap, and more than 1,024 frames is an error).
        padding_side: "left" (for generation) or "right" (for training).
        image_token, video_token: placeholder strings.
        allow_remote_urls: fetch http(s) URLs found in `images` / `videos` / chat messages (set False on
            servers that must not reach the network on a user's behalf: URLs are then refused).
        url_timeout: seconds a whole URL fetch (connection, redirects, body) may take before it fails.
        max_url_bytes: the most bytes one URL may send (2 GiB; a fetched video is held in memory while decoded).
        Only http(s) URLs are fetched, redirects only to http(s); other URL schemes are refused.
    """

    valid_processor_kwargs = VideoXLProcessorKwargs

    def __init__(
        self,
        tokenizer=None,
        image_processor=None,
        chat_template: str | None = None,
        num_image_tokens: int = DEFAULT_TOKENS_PER_FRAME,
        num_frames: int | None = DEFAULT_NUM_FRAMES,
        fps: float | None = None,
        max_frames: int | None = None,
        padding_side: str = "left",
        image_token: str = "<image>",
        video_token: str = "<video>",
        allow_remote_urls: bool = True,
        url_timeout: float = DEFAULT_URL_TIMEOUT,
        max_url_bytes: int = DEFAULT_MAX_URL_BYTES,
        image_size: int | None = None,
        image_mean: Sequence[float] | None = None,
        image_std: Sequence[float] | None = None,
        image_grid_pinpoints: Sequence[Sequence[int]] | None = None,
    ) -> None:
        if image_processor is None:
            image_processor = _build_image_processor(image_size, image_mean, image_std, image_grid_pinpoints)
        elif any(v is not None for v in (image_size, image_mean, image_std, image_grid_pinpoints)):
            raise ValueError("pass image_size / image_mean / image_std / image_grid_pinpoints only without an "
                             "image_processor (they configure the one built when none is given)")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.num_image_tokens = int(num_image_tokens)
        self.num_frames, self.fps, self.max_frames = num_frames, fps, max_frames
        self.padding_side = padding_side
        self.image_token, self.video_token = image_token, video_token
        UrlPolicy(bool(allow_remote_urls), url_timeout, max_url_bytes)  # a bad timeout or cap fails here, not at use
        self.allow_remote_urls = bool(allow_remote_urls)
        self.url_timeout, self.max_url_bytes = url_timeout, max_url_bytes
        VideoSampling(num_frames, fps, max_frames).validate()
        super().__init__(tokenizer, image_processor, chat_template=chat_template)
        # Batches padded outside `__call__` (the pipeline's collate function reads the tokenizer's side) must pad
        # on the processor's side too: a right-padded prompt would generate after its padding.
        self.tokenizer.padding_side = padding_side
        self.image_token_id = self._token_id(image_token)
        self.video_token_id = self._token_id(video_token)

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.tokenizer.unk_token_id or isinstance(token_id, list):
            raise ValueError(f"the tokenizer has no {token!r} token; add it as a special token")
        return int(token_id)

    @property
    def url_policy(self) -> UrlPolicy:
        """How this processor fetches http(s) URLs (built from its attributes, which a caller may change)."""
        return UrlPolicy(self.allow_remote_urls, self.url_timeout, self.max_url_bytes)

    @property
    def image_size(self) -> int:
        """Side of a frame crop / tile (the vision tower's input size)."""
        return self.image_processor.tile_size

    @property
    def video_processor(self) -> VideoXLImageProcessor:
        """`ProcessorMixin` handles videos only through a `video_processor`; ours is the image processor
        (frames are CLIP-preprocessed like images; transformers' video processors need torchvision)."""
        return self.image_processor

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "image_sizes", "pixel_values_videos"]

    @property
    def unused_input_names(self) -> list[str]:
        return ["num_tiles"]

    # -- ProcessorMixin hooks -------------------------------------------------------------------

    def prepare_inputs_layout(self, images=None, text=None, videos=None, audio=None, **kwargs):
        """Text into a list; image URLs fetched under this processor's network policy."""
        if isinstance(images, str) and (self.image_token in images or self.video_token in images):
            raise ValueError("the first positional argument is `images` (transformers' order is images, text, "
                             "videos): pass the prompt as text=...")
        if audio is not None:
            raise ValueError("Video-XL takes no audio")
        if isinstance(text, str):
            text = [text]
        elif text is not None:
            text = list(text)
        if images is not None:
            images = [to_rgb_image(load_image_source(image, f"image {i}", self.url_policy),
                                   f"image {i}") for i, image in enumerate(flatten_images(images))]
        return images, text, videos, None

    def validate_inputs(self, images=None, text=None, videos=None, audio=None, **kwargs) -> None:
        """Every placeholder needs exactly one visual input and vice versa (checked before decoding)."""
        if images is None and text is None and videos is None:
            raise ValueError(f"You need to provide at least one input to call {type(self).__name__}")
        if text is not None and not all(isinstance(t, str) for t in text):
            raise ValueError("text must be a string or a list of strings")
        counts = ((self.video_token, len(flatten_videos(videos)), "videos"),
                  (self.image_token, len(flatten_images(images)), "images"))
        for token, count, kind in counts:
            n_markers = 0 if text is None else sum(t.count(token) for t in text)
            if text is not None and n_markers != count:
                raise ValueError(f"the text has {n_markers} {token} placeholder(s) but {count} {kind} were given")

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        return self.image_token * (self.num_image_tokens * int(image_inputs["num_tiles"][image_idx]))

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs) -> str:
        return self.video_token * (self.num_image_tokens * int(video_inputs["num_frames"][video_idx]))

    def _process_videos(self, videos: Any, **kwargs) -> tuple[dict[str, Any], list[str]]:
        """Decode / sample every video; pixel_values_videos float32 [n_videos, F, 3, S, S] when all
        have F frames, else [total_frames, 3, S, S] in order of appearance."""
        video_list = flatten_videos(videos)
        file_sampling, memory_sampling = self._samplings(kwargs)
        pixels, metadata = [], []
        for i, video in enumerate(video_list):
            frames, meta = self._load_video(video, file_sampling, memory_sampling, f"video {i}")
            pixels.append(frames)
            metadata.append(meta)
        counts = [p.shape[0] for p in pixels]
        stacked = torch.stack(pixels) if len(set(counts)) == 1 else torch.cat(pixels)
        processed = {"pixel_values_videos": stacked.numpy(), "video_metadata": metadata, "num_frames": counts}
        replacements = [self.replace_video_token(processed, i) for i in range(len(video_list))]
        processed.pop("num_frames")
        return processed, replacements

    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs):
        """Prepare a batch (transformers' `ProcessorMixin.__call__`).

        Args:
            images: an image or a list (optionally per sample) of images: PIL, numpy HWC, torch CHW, bytes,
                path, `file://` or http(s) URL.
            text: a prompt or a list of prompts with `<image>` / `<video>` placeholders.
            videos: a video or a list (optionally per sample) of videos: path, `file://` or http(s) URL,
                bytes, file-like, uint8 [F, H, W, 3] array/tensor, or a list of frames (PIL/arrays).
                Files are sampled (default 128 uniform frames); in-memory frames are used as given unless
                the call passes num_frames / fps / max_frames / do_sample_frames=True.
            num_frames / fps / max_frames / video_fps / allow_partial_video: frame sampling (`VideoSampling`).
            return_metadata: add "video_metadata" (one `VideoMetadata` per video, with true `timestamps`);
                pop it before `model.generate(**inputs)`.
            return_tensors: "pt" / "np" / None (lists), as in every transformers processor.
            other keyword arguments go to the tokenizer (e.g. `padding_side`, `add_special_tokens`).

        Returns:
            BatchFeature with input_ids / attention_mask [B, L]; pixel_values_videos float32
            [n_videos, F, 3, S, S] (or [total_frames, 3, S, S] when frame counts differ); pixel_values
            float32 [total_tiles, 3, S, S] and image_sizes int64 [n_images, 2] (upright height, width).
        """
        kwargs.setdefault("padding_side", self.padding_side)
        if videos is not None:
            self._samplings(kwargs)  # our clear errors for bad options before the library's type checks
        # `offset_mapping` asked for without the replacements: offsets into the text the caller gave, as a tokenizer's
        # are (releases before 5.18 compute assistant masks from them).
        caller_offsets = kwargs.get("return_offsets_mapping") and not kwargs.get("return_text_replacement_offsets")
        if caller_offsets:
            kwargs["return_text_replacement_offsets"] = True
        out = super().__call__(images=images, text=text, videos=videos, audio=audio, **kwargs)
        if caller_offsets:
            replacements = out.pop("text_replacement_offsets")
            moved = [offsets_in_caller_text(row, sample) for row, sample in zip(out["offset_mapping"], replacements)]
            offsets = out["offset_mapping"]
            out["offset_mapping"] = torch.tensor(moved, dtype=offsets.dtype) if torch.is_tensor(offsets) else (
                np.array(moved, dtype=offsets.dtype) if isinstance(offsets, np.ndarray) else moved)
        return out

    def apply_chat_template(self, conversation, chat_template=None, processor_kwargs=None, **kwargs):
        """transformers' apply_chat_template. Sampling options may be passed directly (`num_frames=64`);
        `<image>` / `<video>` written inside a text item are text, not placeholders (only image / video
        items make placeholders); `sanitize_control_tokens=True` also turns user-written ChatML tokens
        into text."""
        processor_kwargs = dict(processor_kwargs or {})
        for key in ("num_frames", "fps", "max_frames", "video_fps", "allow_partial_video", "return_metadata",
                    "padding_side", "padding", "do_sample_frames"):
            if key in kwargs:
                processor_kwargs[key] = kwargs.pop(key)
        if PROCESSOR_KEEPS_MARKED_TEXT:
            conversation = self._mark_placeholders_in_text(conversation, kwargs, processor_kwargs)
        else:
            self._refuse_what_this_release_would_expand(conversation, kwargs)
        return super().apply_chat_template(conversation, chat_template=chat_template,
                                           **chat_template_keywords(processor_kwargs, kwargs))

    # -- helpers --------------------------------------------------------------------------------

    def _mark_placeholders_in_text(self, conversation, kwargs: dict, processor_kwargs: dict):
        """Mark `<image>` / `<video>` inside text items as user text (tokenized as text, never expanded).

        Only with `tokenize=True` (a rendered string cannot tell them apart) and without assistant masks
        (marked text is tokenized without offsets); full sanitization already marks them.
        """
        if (not kwargs.get("tokenize") or kwargs.get("sanitize_control_tokens")
                or kwargs.get("return_assistant_tokens_mask")):
            return conversation
        pattern, _ = _get_control_token_patterns((self.image_token, self.video_token))
        batched = isinstance(conversation[0], (list, tuple))
        marked, found = [], False
        for chat in (conversation if batched else [conversation]):
            messages = []
            for message in chat:
                content = message.get("content") if isinstance(message, dict) else None
                if isinstance(content, str):
                    new = mark_control_tokens(content, pattern)
                    found |= new != content
                    message = {**message, "content": new}
                elif isinstance(content, list):
                    items = []
                    for item in content:
                        if isinstance(item, dict) and item.get("type") == "text" and isinstance(item.get("text"), str):
                            new = mark_control_tokens(item["text"], pattern)
                            found |= new != item["text"]
                            item = {**item, "text": new}
                        items.append(item)
                    message = {**message, "content": items}
                messages.append(message)
            marked.append(messages)
        if not found:
            return conversation
        processor_kwargs["sanitize_control_tokens"] = True
        return marked if batched else marked[0]

    def _refuse_what_this_release_would_expand(self, conversation, kwargs: dict) -> None:
        """On releases whose processor cannot keep marked user text as text: refuse `sanitize_control_tokens=True`
        (it would be dropped silently) and, when tokenizing, `<image>` / `<video>` typed inside text items (they would
        count as placeholders)."""
        if kwargs.pop("sanitize_control_tokens", False):
            refuse_marked_text("sanitize_control_tokens=True")
        if not kwargs.get("tokenize"):
            return
        for chat in (conversation if isinstance(conversation[0], (list, tuple)) else [conversation]):
            for message in chat:
                content = message.get("content") if isinstance(message, dict) else None
                texts = [content] if isinstance(content, str) else [
                    item["text"] for item in content or []
                    if isinstance(item, dict) and item.get("type") == "text" and isinstance(item.get("text"), str)
                ]
                found = [token for token in (self.video_token, self.image_token) if any(token in t for t in texts)]
                if found:
                    refuse_marked_text(f"a text item contains {' and '.join(map(repr, found))} (only image / video "
                                       "items make placeholders)")

    def _samplings(self, kwargs: dict[str, Any]) -> tuple[VideoSampling, VideoSampling | None]:
        """(sampling of files, sampling of in-memory frames or None to keep them as given).

        Call options over processor defaults; a call-level num_frames overrides a default fps.
        """
        asked = {key: kwargs.get(key) for key in ("num_frames", "fps", "max_frames") if kwargs.get(key) is not None}
        if "num_frames" in asked and "fps" in asked:
            raise ValueError("pass either num_frames or fps, not both")
        fps = asked.get("fps", None if "num_frames" in asked else self.fps)
        sampling = VideoSampling(
            num_frames=asked.get("num_frames", self.num_frames),
            fps=fps,
            max_frames=asked.get("max_frames", self.max_frames),
            video_fps=kwargs.get("video_fps"),
            allow_partial=bool(kwargs.get("allow_partial_video")),
        )
        sampling.validate()
        do_sample = kwargs.get("do_sample_frames")
        if do_sample is False and asked:
            raise ValueError(f"do_sample_frames=False keeps in-memory frames as given; it contradicts {asked}")
        return sampling, (sampling if asked or do_sample else None)

    def _load_video(self, video: Any, file_sampling: VideoSampling, memory_sampling: VideoSampling | None,
                    name: str) -> tuple[torch.Tensor, VideoXLVideoMetadata]:
        """One video -> (float32 [F, 3, S, S], metadata)."""
        image_processor = self.image_processor
        s = image_processor.tile_size
        frame_bytes = 4 * 3 * s * s
        frames = in_memory_frames(video, name)
        if frames is None:
            crops, metadata = read_video_frames(video, file_sampling, image_processor.resize_crop, frame_bytes,
                                                self.url_policy)
        else:
            def convert(frame: Any, i: int) -> np.ndarray:
                return image_processor.resize_crop(to_rgb_image(frame, what=f"{name} frame {i}"))

            crops, metadata = sample_frames_in_memory(frames, memory_sampling, convert, name, frame_bytes)
        return image_processor.frames_to_pixels(crops), metadata

    def load_video(self, video: Any, **sampling_kwargs: Any) -> tuple[torch.Tensor, VideoXLVideoMetadata]:
        """One video -> (float32 [F, 3, S, S] pixel values, metadata). Options as in `__call__`."""
        file_sampling, memory_sampling = self._samplings(sampling_kwargs)
        return self._load_video(video, file_sampling, memory_sampling, source_name(video)
                                if isinstance(video, (str, os.PathLike, bytes)) else "video")


def _build_image_processor(image_size, image_mean, image_std, image_grid_pinpoints) -> VideoXLImageProcessor:
    kwargs: dict[str, Any] = {}
    if image_size is not None:
        kwargs["size"] = {"shortest_edge": int(image_size)}
        kwargs["crop_size"] = {"height": int(image_size), "width": int(image_size)}
    if image_mean is not None:
        kwargs["image_mean"] = [float(x) for x in image_mean]
    if image_std is not None:
        kwargs["image_std"] = [float(x) for x in image_std]
    kwargs["image_grid_pinpoints"] = ([list(p) for p in image_grid_pinpoints] if image_grid_pinpoints is not None
                                      else default_grid_pinpoints(int(image_size or 336)))
    return VideoXLImageProcessor(**kwargs)


def _is_single_video(item: Any) -> bool:
    """A video: a path, URL, bytes, a file-like, an array with 3 or more axes, or a list of frames."""
    if isinstance(item, (str, os.PathLike, bytes, bytearray, memoryview)) or hasattr(item, "read"):
        return True
    if isinstance(item, (np.ndarray, torch.Tensor)):
        return item.ndim != 5  # a 5-D array is a batch of videos
    if isinstance(item, (list, tuple)) and item:
        return all(isinstance(f, Image.Image) or (isinstance(f, (np.ndarray, torch.Tensor)) and f.ndim in (2, 3))
                   for f in item)
    return False


def flatten_videos(videos: Any) -> list[Any]:
    """Videos in order of appearance, from a video, a list of videos, per-sample lists, or a 5-D batch."""
    if videos is None:
        return []
    if _is_single_video(videos):
        return [videos]
    if isinstance(videos, (np.ndarray, torch.Tensor)):  # [B, F, H, W, C]
        return list(videos)
    if isinstance(videos, (list, tuple)):
        return [v for item in videos for v in flatten_videos(item)]
    raise TypeError(f"unsupported video input type {type(videos).__name__}: pass a path, URL, bytes, a file "
                    "object, an [F, H, W, 3] array or a list of frames")


VideoXLProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["VideoXLProcessor"]
