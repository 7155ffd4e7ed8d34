"""Sessions over one compressed memory: `chat` (ask many questions, multi-turn) and live video.

The video is decoded and encoded once. Later prompts are tokenised without touching its pixels: the placeholders
the cache already holds are expanded from the ids it absorbed (a run of visual tokens per video or image), and only
new videos and images go through the processor. A cache remembers where each of its videos and images came from
(`cache.media`), so a conversation about another video is refused instead of being answered from this memory.

The processor is used only through its public surface: `apply_chat_template(..., tokenize=False)`, `__call__` with
text / videos / images, `tokenizer`, `video_token` and `image_token`.
"""

import hashlib
import json
import os
import re
import threading
from collections.abc import Iterable
from itertools import groupby
from pathlib import Path
from typing import Any

import torch

from .beacon_cache import BeaconCache
from .video_decoding_videoxl import UrlPolicy, UrlStream, check_media_string, is_remote_url, local_path


SAMPLING_OPTIONS = ("num_frames", "fps", "max_frames", "video_fps")


def cache_argument(cache: BeaconCache | None) -> dict[str, BeaconCache | None]:
    """The keyword under which `generate` and `forward` take the cache: every call in this file passes it here."""
    return {"cache": cache}


# --------------------------------------------------------------------------------------------------------------------
# Which videos and images a conversation holds, and how to recognise them again without decoding them
# --------------------------------------------------------------------------------------------------------------------


def media_items(messages: list[dict]) -> list[tuple[str, Any]]:
    """(kind, source) of every video / image content item, in order (the keys transformers' chat templates read)."""
    items = []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for item in content:
            kind = item.get("type")
            if kind in ("video", "image"):
                source = next((item[key] for key in (kind, "url", "path") if item.get(key) is not None), None)
                if source is None:
                    raise ValueError(f"a {kind} item of the messages has no {kind!r}, 'url' or 'path'")
                items.append((kind, source))
    return items


def _hash_bytes(chunks: Iterable[bytes | memoryview]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def _frame_bytes(frame: Any) -> bytes:
    if isinstance(frame, torch.Tensor):
        frame = frame.detach().cpu().numpy()
    if hasattr(frame, "tobytes"):  # numpy arrays, PIL images
        shape = getattr(frame, "shape", None) or getattr(frame, "size", None)
        return f"{shape}:".encode() + frame.tobytes()
    raise ValueError(f"cannot recognise a {type(frame).__name__} as a video frame or image to reuse a cache")


def media_key(kind: str, source: Any, sampling: dict[str, Any]) -> str:
    """A name for a video/image source that changes when its content or its frame sampling does: a file by path,
    size and modification time, a URL by itself, bytes and decoded frames by a hash of their content."""
    if isinstance(source, (str, os.PathLike)) and Path(source).is_file():
        stat = Path(source).stat()
        identity = f"file:{Path(source).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    elif isinstance(source, str):
        identity = f"url:{source}"
    elif isinstance(source, (bytes, bytearray)):
        identity = "bytes:" + _hash_bytes([bytes(source)])
    elif isinstance(source, (list, tuple)):
        identity = "frames:" + _hash_bytes(_frame_bytes(frame) for frame in source)
    else:
        identity = "array:" + _hash_bytes([_frame_bytes(source)])
    options = json.dumps(sampling, sort_keys=True, default=str) if kind == "video" else ""
    return f"{kind}|{identity}|{options}"


def absorbed_runs(cache: BeaconCache, visual_ids: dict[int, str]) -> list[tuple[str, int]]:
    """(kind, tokens) of each run of visual tokens in the ids the cache absorbed (first sample)."""
    if cache.seen_tokens == 0:
        return []
    row = cache.absorbed_ids[0].tolist()
    return [(visual_ids[token], len(list(run))) for token, run in groupby(row) if token in visual_ids]


# --------------------------------------------------------------------------------------------------------------------
# chat
# --------------------------------------------------------------------------------------------------------------------


def chat(
    model, processor, messages: list[dict], cache: BeaconCache | None = None, **generate_kwargs: Any
) -> tuple[str, BeaconCache]:
    """See [`VideoXLForCausalLM.chat`]."""
    sampling = {key: generate_kwargs.pop(key) for key in SAMPLING_OPTIONS if key in generate_kwargs}
    config = model.config
    visual_ids = {config.video_token_id: "video", config.image_token_id: "image"}
    placeholders = {"video": processor.video_token, "image": processor.image_token}
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    items = media_items(messages)
    keys = [media_key(kind, source, sampling) for kind, source in items]
    pattern = re.compile("|".join(re.escape(p) for p in sorted(placeholders.values(), key=len, reverse=True)))
    matches = list(pattern.finditer(text))
    found = [("video" if m.group() == processor.video_token else "image") for m in matches]
    if found != [kind for kind, _ in items]:
        raise ValueError(
            f"the chat template wrote placeholders {found} for the messages' items {[k for k, _ in items]}"
        )

    cache = cache if cache is not None else BeaconCache(config.text_config.num_hidden_layers)
    runs = absorbed_runs(cache, visual_ids)
    reused = check_reusable_media(cache, runs, items, keys, generate_kwargs.get("compression_ratio"))

    # Ids of the text up to the last video/image the cache holds, each placeholder expanded to the run of visual
    # tokens the cache absorbed for it: no pixels. Placeholders are special tokens, so the text between them
    # tokenises on its own exactly as inside the whole prompt.
    bos = processor.tokenizer.bos_token
    add_special = not (bos and text.startswith(bos))
    token_ids = {"video": config.video_token_id, "image": config.image_token_id}
    head_ids, last = [], 0
    for i, (match, (kind, length)) in enumerate(zip(matches[:reused], runs)):
        piece = processor.tokenizer(text[last : match.start()], add_special_tokens=add_special and i == 0)
        head_ids += piece["input_ids"] + [token_ids[kind]] * length
        last = match.end()
    head_end = last
    new_videos = [source for kind, source in items[reused:] if kind == "video"]
    new_images = [source for kind, source in items[reused:] if kind == "image"]
    # The text after a placeholder (a special token) tokenises on its own exactly as inside the whole prompt.
    tail = processor(
        text=text[head_end:],
        videos=new_videos or None,
        images=new_images or None,
        return_tensors="pt",
        add_special_tokens=add_special and not reused,
        return_metadata=bool(new_videos),
        **sampling,
    )
    input_ids = torch.cat([torch.tensor([head_ids], dtype=torch.long), tail["input_ids"]], dim=1)
    cache.align(input_ids)  # an earlier question and answer the messages do not repeat are rewound

    pixels = {name: tail[name] for name in ("pixel_values_videos", "pixel_values") if name in tail}
    device = model.device
    output = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=torch.ones_like(input_ids, device=device),
        **cache_argument(cache),
        **{name: value.to(device) for name, value in pixels.items()},
        **{"do_sample": False, **generate_kwargs},
        return_dict_in_generate=True,
    )
    new_runs = absorbed_runs(cache, visual_ids)[reused:]
    video_metadata = iter(tail.get("video_metadata") or [])
    for (kind, _), key, (_, tokens) in zip(items[reused:], keys[reused:], new_runs):
        record = {"kind": kind, "source": key, "frames": tokens // config.tokens_per_frame}
        if kind == "video":
            record["timestamps"] = sampled_times(next(video_metadata, None))
        cache.media.append(record)
    answer = processor.tokenizer.decode(output.sequences[0, input_ids.shape[1] :], skip_special_tokens=True)
    return answer.strip(), cache


def sampled_times(metadata) -> list[float]:
    """Seconds of each sampled frame, or [] where the video gives none (in-memory frames without `video_fps`)."""
    try:
        return list(metadata["timestamps"] or []) if metadata is not None else []
    except (KeyError, ValueError):  # the library's VideoMetadata raises when it cannot infer them
        return []


def check_reusable_media(
    cache: BeaconCache, runs: list[tuple[str, int]], items: list[tuple[str, Any]], keys: list[str],
    compression_ratio: int | None,
) -> int:
    """How many of the messages' videos/images the cache already holds; refuse a cache about other media."""
    if len(cache.media) != len(runs):
        raise ValueError(
            f"the cache holds {len(runs)} videos/images but records where only {len(cache.media)} came from (it was "
            "not written by chat, or a call was interrupted inside a video): pass cache=None"
        )
    if len(runs) > len(items):
        raise ValueError(
            f"the cache holds {len(runs)} videos/images, the messages have only {len(items)}: it belongs to "
            "another conversation; pass cache=None"
        )
    for i, (record, key) in enumerate(zip(cache.media, keys)):
        if record["source"] != key:
            raise ValueError(
                f"{items[i][0]} {i} of the messages is not the one the cache encoded (cache: {record['source']}, "
                f"messages: {key}): pass cache=None for another video or image"
            )
    if runs and compression_ratio is not None and any(r != compression_ratio for r in cache.ratios):
        raise ValueError(
            f"the cache's visual memory was compressed at ratio(s) {sorted(set(cache.ratios))}, not "
            f"compression_ratio={compression_ratio}: pass the same ratio, or cache=None to encode again"
        )
    return len(runs)


# --------------------------------------------------------------------------------------------------------------------
# Live video
# --------------------------------------------------------------------------------------------------------------------


class LiveVideo:
    """The memory of a video that is still arriving: frames are encoded and compressed a window at a time.

    Only a window's worth of preprocessed frames is ever held (`pending`); the memory grows by the kept VSTs of
    each window. `ask` answers from everything fed so far, the pending frames included, and leaves the memory as it
    was, so feeding goes on. `feed` and `ask` may be called from different threads (one window or one answer at a
    time). Feeding frames one by one and then asking equals one prompt holding the same frames (`prompt_ids`).
    """

    def __init__(self, model, processor, compression_ratio: int | None = None, system: str | None = None) -> None:
        self.model, self.processor = model, processor
        self.ratio = compression_ratio
        config = model.config
        self.frames_per_window = max(config.beacon_window // config.tokens_per_frame, 1)
        self.cache = BeaconCache(config.text_config.num_hidden_layers)
        self.pending: list[torch.Tensor] = []
        self.times: list[float | None] = []
        self.lock = threading.Lock()
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": [{"type": "video", "video": "live"}, {"type": "text", "text": "\x00"}]}
        ]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        head, rest = text.split(processor.video_token, 1)
        self.question_template = rest.replace("\x00", "{question}", 1)
        bos = processor.tokenizer.bos_token
        self.head_ids = processor.tokenizer(head, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]
        self.cache.media.append({"kind": "video", "source": "live", "frames": 0, "timestamps": []})
        self._run(torch.tensor([self.head_ids]), None)

    @property
    def frames(self) -> int:
        """Frames fed so far."""
        return len(self.times)

    def feed(self, frame: Any, timestamp: float | None = None) -> None:
        """Add one decoded frame (PIL image, HWC uint8 array). Every `frames_per_window` frames one window is
        encoded, compressed and its pixels freed."""
        pixels = self.processor(videos=[[frame]], num_frames=1, return_tensors="pt")["pixel_values_videos"]
        with self.lock:
            self.pending.append(pixels.reshape(pixels.shape[-3:]))
            self.times.append(timestamp)
            if len(self.pending) == self.frames_per_window:
                self._encode_pending()

    def feed_all(self, frames: Iterable[Any]) -> None:
        """Feed an iterable of frames or of (timestamp, frame) pairs, e.g. [`read_live_frames`]."""
        for frame in frames:
            if isinstance(frame, tuple):
                self.feed(frame[1], timestamp=frame[0])
            else:
                self.feed(frame)

    def follow(self, source: Any, fps: float = 1.0, pace: float | None = None) -> None:
        """Feed a video as it arrives (see [`read_live_frames`]) until it ends; run it in a thread to ask questions
        meanwhile. http(s) URLs are fetched under the processor's `url_policy` (remote policy, `url_timeout` for the
        whole stream, `max_url_bytes`)."""
        self.feed_all(read_live_frames(source, fps=fps, pace=pace, url_policy=self.processor.url_policy))

    def ask(self, question: str, **generate_kwargs: Any) -> str:
        """Greedy (unless told otherwise) answer from the frames fed so far; the memory is left as it was."""
        with self.lock:
            state = self.cache.checkpoint()
            try:
                pending = len(self.pending)
                if pending:
                    self._encode_pending(keep_pending=True)
                tail = self.processor.tokenizer(self.question_template.format(question=question),
                                                add_special_tokens=False)["input_ids"]
                input_ids = torch.cat([self.cache.absorbed_ids.cpu(), torch.tensor([tail])], dim=1)
                output = self.model.generate(
                    input_ids=input_ids.to(self.model.device),
                    attention_mask=torch.ones_like(input_ids, device=self.model.device),
                    **cache_argument(self.cache),
                    **{"do_sample": False, **generate_kwargs},
                    return_dict_in_generate=True,
                )
            finally:
                self.cache.restore(state)
        answer = self.processor.tokenizer.decode(output.sequences[0, input_ids.shape[1] :], skip_special_tokens=True)
        return answer.strip()

    def prompt_ids(self, question: str) -> torch.Tensor:
        """`[1, seq]` the one prompt equivalent to the frames fed so far and `question` (for checks and tests)."""
        tail = self.processor.tokenizer(self.question_template.format(question=question),
                                        add_special_tokens=False)["input_ids"]
        video = [self.model.config.video_token_id] * (self.frames * self.model.config.tokens_per_frame)
        return torch.tensor([self.head_ids + video + tail])

    def _encode_pending(self, keep_pending: bool = False) -> None:
        pixels = torch.stack(self.pending).unsqueeze(0)
        ids = torch.full((1, len(self.pending) * self.model.config.tokens_per_frame), self.model.config.video_token_id)
        self._run(ids, pixels)
        record = self.cache.media[0]
        record["frames"] += len(self.pending)
        record["timestamps"] += self.times[len(record["timestamps"]) : record["frames"]]
        if not keep_pending:
            self.pending = []

    @torch.no_grad()
    def _run(self, input_ids: torch.Tensor, pixels: torch.Tensor | None) -> None:
        device = self.model.device
        self.model.model(
            input_ids.to(device),
            pixel_values_videos=None if pixels is None else pixels.to(device),
            compression_ratio=self.ratio,
            output_columns=torch.zeros(0, dtype=torch.long, device=device),
            **cache_argument(self.cache),
        )


def read_live_frames(
    source: Any, fps: float = 1.0, pace: float | None = None, url_policy: UrlPolicy | None = None
) -> Iterable[tuple[float, Any]]:
    """(seconds, RGB `[H, W, 3]` uint8 array) of a video read with PyAV, sampled at `fps`, as the frames arrive:
    a path or `file://` URL, a pipe or other binary file object, or an http(s) URL fetched under `url_policy`
    (default `UrlPolicy()`: its deadline bounds the whole stream, its size cap the bytes). Other URL schemes and
    ffmpeg protocols (`rtsp://`, `concat:`, ...) are refused. `pace` plays a file as if it were live: `pace` seconds
    of video per second of wall time (1.0 = real time); None reads as fast as it decodes."""
    import time

    import av

    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    policy = url_policy or UrlPolicy()
    if isinstance(source, (str, os.PathLike)):
        source = os.fspath(source)
        check_media_string(source, policy, "live video")
        source = UrlStream(source, policy) if is_remote_url(source) else local_path(source)
    start, next_time = time.monotonic(), 0.0
    try:
        with av.open(source) as container:
            for frame in container.decode(container.streams.video[0]):
                if frame.time is None or frame.time + 1e-6 < next_time:
                    continue
                if pace:
                    time.sleep(max(0.0, frame.time / pace - (time.monotonic() - start)))
                yield frame.time, frame.to_ndarray(format="rgb24")
                next_time += 1.0 / fps
    finally:
        if isinstance(source, UrlStream):
            source.close()


__all__ = ["LiveVideo", "chat", "read_live_frames", "cache_argument"]
