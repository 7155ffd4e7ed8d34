# Copyright 2024 BAAI and the Video-XL authors; this file: the Video-XL transformers port.
# Licensed under the Apache License, Version 2.0.
"""Video input of Video-XL: which frames, decoded how.

* Sampling (`VideoSampling`): `num_frames` uniform frames at `np.linspace(0, total - 1, n)` floored
  (the original's rule; indices repeat for short videos), or `fps` frames per second of video time,
  capped by `max_frames`. Files, bytes and streams are always sampled; in-memory frames only when
  the call asks for it.
* Decoding: PyAV, one demux pass for the per-frame times and keyframes (no decoding), then seeks to
  the keyframe before each wanted frame (2x faster than decoding everything on long videos). Each
  frame is handed to a `convert` callback (resize + crop) as soon as it is decoded, so only the
  crops are ever held.
* Honesty: a file that holds fewer frames than its container declares, timestamps past its
  declared duration, frames that do not decode, timestamps that restart or a frame size that
  changes (recordings joined end to end), a request whose frames would not fit in memory, an
  unreachable URL: each is one ValueError naming the input. The display matrix (phone videos)
  is applied, as ffmpeg's autorotate does.
* URLs: fetched under a `UrlPolicy` (remote switch, deadline for the whole fetch, size cap,
  http(s) only, redirects only to http(s)); the session module's live reader uses the same.
* Metadata: transformers' `VideoMetadata`, with the true presentation time of every sampled frame
  (`timestamps`, right for variable-frame-rate files too).
"""

from __future__ import annotations

import http.client
import io
import logging
import math
import numbers
import os
import re
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from transformers.utils.logging import tqdm
from transformers.video_utils import VideoMetadata

try:  # PyAV is only needed for video files; image-only users can do without it.
    import av
except ImportError:  # pragma: no cover - exercised only where PyAV is missing
    av = None


logger = logging.getLogger(__name__)

# The released model's evaluation wrapper samples 128 frames uniformly (its demo uses 900).
DEFAULT_NUM_FRAMES = 128
# Without an explicit max_frames, a request for more frames than this is refused before decoding
# (1,024 frames are 1.4 GB of float32 pixels at 336 px).
FRAME_BUDGET = 1024
# Seconds a whole URL fetch may take, and the most bytes it may bring (a fetched video is held in memory).
DEFAULT_URL_TIMEOUT = 30.0
DEFAULT_MAX_URL_BYTES = 2**31
# Decoding shorter than this shows no progress bar (tqdm's `delay`).
PROGRESS_DELAY_SECONDS = 2.0
REMOTE_SCHEMES = ("http://", "https://")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")

VideoLike = Any  # str | os.PathLike | bytes | file-like | np.ndarray | torch.Tensor | list of frames


# ----------------------------------------------------------------------------------------------
# Which frames
# ----------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass
class VideoSampling:
    """How to pick frames. `fps` wins over `num_frames` when set.

    num_frames: uniform `linspace(0, total - 1, num_frames)` floored; repeats frames of short videos.
    fps: one frame every 1/fps seconds of video time, from the first frame.
    max_frames: cap; a sampling that would exceed it becomes `max_frames` uniform frames instead.
        Without it, more than `FRAME_BUDGET` frames is an error raised before decoding.
    video_fps: frame rate of in-memory videos (arrays, frame lists), for `fps` and timestamps.
    allow_partial: accept a truncated or partly undecodable file (with a warning) instead of raising.
    """

    num_frames: int | None = DEFAULT_NUM_FRAMES
    fps: float | None = None
    max_frames: int | None = None
    video_fps: float | None = None
    allow_partial: bool = False

    def validate(self) -> None:
        if self.fps is None and self.num_frames is None:
            raise ValueError("set num_frames or fps")
        for name in ("num_frames", "max_frames"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and value == int(value) and value >= 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("fps", "video_fps"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0 (frames per second), got {value!r}")


def uniform_indices(total: int, count: int) -> np.ndarray:
    """The original's sampling: `np.linspace(0, total - 1, count, dtype=int)` (floors; may repeat)."""
    return np.linspace(0, total - 1, int(count), dtype=int).astype(np.int64)


def video_duration(times: np.ndarray) -> float:
    """Seconds from the first frame to the end of the last one (its display time = median spacing)."""
    spacing = float(np.median(np.diff(times))) if len(times) > 1 else 0.0
    return float(times[-1]) + spacing


def fps_frame_count(times: np.ndarray, fps: float) -> int:
    """How many frames `fps` sampling takes from a video with these frame times (at least 1)."""
    return max(1, int(math.floor(video_duration(times) * fps + 1e-6)))


def fps_indices(times: np.ndarray, fps: float) -> np.ndarray:
    """Index of the frame on screen at t = k / fps for k = 0 .. floor(duration * fps) - 1 (at least 1).

    times: float64 [total] presentation times in seconds from the first frame, increasing.
    """
    sample_times = np.arange(fps_frame_count(times, fps), dtype=np.float64) / fps
    return np.clip(np.searchsorted(times, sample_times + 1e-9, side="right") - 1, 0, len(times) - 1)


def choose_indices(total: int, times: np.ndarray | None, sampling: VideoSampling, name: str,
                   frame_bytes: int | None = None) -> np.ndarray:
    """Frame indices to sample (non-decreasing), following `sampling`.

    Refuses, before anything is decoded, a request for more than `FRAME_BUDGET` frames when no
    `max_frames` is set; `frame_bytes` (bytes of one output frame) puts the memory in the message.
    """
    if total < 1:
        raise ValueError(f"{name}: the video has no frames")
    if sampling.fps is not None:
        if times is None:
            raise ValueError(f"{name}: fps sampling needs frame times (pass video_fps= for in-memory videos)")
        count, what = fps_frame_count(times, sampling.fps), f"fps={sampling.fps:g} over {video_duration(times):.1f} s"
    else:
        count, what = int(sampling.num_frames), f"num_frames={sampling.num_frames}"
    if sampling.max_frames is not None and count > sampling.max_frames:
        return uniform_indices(total, sampling.max_frames)
    if sampling.max_frames is None and count > FRAME_BUDGET:
        memory = "" if frame_bytes is None else f" ({count * frame_bytes / 2**30:.1f} GiB of pixel values)"
        raise ValueError(f"{name}: {what} asks for {count} frames{memory}, more than {FRAME_BUDGET} without an "
                         f"explicit max_frames; pass max_frames=N to sample at most N frames (max_frames={count} "
                         "to take them all)")
    if sampling.fps is None:
        return uniform_indices(total, count)
    native = (total - 1) / float(times[-1]) if total > 1 and times[-1] > 0 else None
    if native is not None and sampling.fps > native * 1.01:
        raise ValueError(f"{name}: fps={sampling.fps:g} is faster than the video's {native:.3g} frames per second: "
                         f"{count} samples of {total} frames would only repeat them; pass fps <= {native:.3g} "
                         "(or num_frames= to repeat frames on purpose)")
    return fps_indices(times, sampling.fps)


class VideoXLVideoMetadata(VideoMetadata):
    """transformers' `VideoMetadata` plus where the video came from and the true time of each sampled
    frame: `timestamps` are seconds from the video's first frame, read from the file (so right for
    variable-frame-rate videos), not `index / fps`."""

    def __init__(self, *, source: str = "", frame_times: list[float] | None = None, **fields: Any) -> None:
        super().__init__(**fields)
        self.source = source
        self.frame_times = frame_times

    @property
    def timestamps(self) -> list[float]:
        if self.frame_times is not None:
            return list(self.frame_times)
        return super().timestamps

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict: the library's fields, `source` and `timestamps` (None when unknown)."""
        data = {name: self[name] for name in self}
        data["source"] = self.source
        try:
            data["timestamps"] = self.timestamps
        except ValueError:
            data["timestamps"] = None
        return data


def warn_repeated_frames(metadata: Sequence[VideoXLVideoMetadata]) -> None:
    """One warning for a processor call whose sampling repeats frames of some videos (fewer frames than asked).

    The repeats are the original Video-XL's uniform rule, kept for parity with it; transformers' own video
    processors refuse such a request instead, so the caller is told which videos it concerns and how to avoid it.
    """
    short = [f"{meta.source} has {meta.total_num_frames} frames, {len(meta.frames_indices)} sampled"
             for meta in metadata if len(meta.frames_indices) > meta.total_num_frames]
    if short:
        logger.warning("%s: frames are repeated to fill the sampling (as the original Video-XL does); pass "
                       "num_frames <= the video's frame count, or fps=, to sample each frame once", "; ".join(short))


# ----------------------------------------------------------------------------------------------
# Sources: paths, file:// and remote URLs, bytes, streams
# ----------------------------------------------------------------------------------------------


def is_remote_url(source: Any) -> bool:
    return isinstance(source, str) and source.startswith(REMOTE_SCHEMES)


def url_scheme(text: str) -> str | None:
    """The scheme of a URL-looking string (`ftp`, `concat`, `data`, ...), None for a plain path. One letter is a
    Windows drive (`C:`), not a scheme."""
    match = _SCHEME.match(text)
    return match.group(1).lower() if match else None


def local_path(source: str | os.PathLike) -> str:
    """A path, with `file://` URLs turned into paths."""
    text = os.fspath(source)
    if text.startswith("file://"):
        return urllib.request.url2pathname(urllib.parse.urlparse(text).path)
    return text


def check_media_string(text: str, policy: "UrlPolicy", what: str = "media") -> None:
    """Refuse what is neither a path, a `file://` URL nor an http(s) URL the policy allows: other URL schemes and
    ffmpeg protocols (`ftp://`, `concat:`, `pipe:`, ...) would otherwise be read as missing files or, by PyAV, as
    whatever the protocol opens."""
    if is_remote_url(text):
        policy.check(text)
        return
    scheme = url_scheme(text)
    if scheme not in (None, "file") and not os.path.exists(text):
        raise ValueError(f"{what}: unsupported URL scheme {scheme!r} in {text}: only http(s) URLs, file:// URLs and "
                         "paths are read")


@dataclass(frozen=True)
class UrlPolicy:
    """How media URLs are fetched (processor options `allow_remote_urls`, `url_timeout`, `max_url_bytes`).

    allow_remote: fetch http(s) URLs at all (False on servers that must not reach the network for a user).
    timeout: seconds for the whole fetch, connection, redirects and body included (not per read).
    max_bytes: the most bytes one URL may send (a fetched video is held in memory while it is decoded).
    Only http(s) is fetched, and redirects are followed only to http(s).
    """

    allow_remote: bool = True
    timeout: float = DEFAULT_URL_TIMEOUT
    max_bytes: int = DEFAULT_MAX_URL_BYTES

    def __post_init__(self) -> None:
        if not (_is_number(self.timeout) and math.isfinite(self.timeout) and self.timeout > 0):
            raise ValueError(f"url_timeout must be a finite number of seconds > 0, got {self.timeout!r}")
        if not (isinstance(self.max_bytes, int) and not isinstance(self.max_bytes, bool) and self.max_bytes >= 1):
            raise ValueError(f"max_url_bytes must be an integer >= 1, got {self.max_bytes!r}")

    def check(self, url: str) -> None:
        """Refuse a URL this policy does not fetch (before any connection)."""
        if not is_remote_url(url):
            raise ValueError(f"not an http(s) URL: {url}")
        if not self.allow_remote:
            raise ValueError(f"remote URL refused: {url} (this processor has allow_remote_urls=False; download the "
                             "file and pass its path or bytes)")


class _Deadline:
    """Shuts down every socket of a fetch when its time is up, so that no read blocks past it (a per-read timeout
    never fires on a server that sends one byte a second)."""

    def __init__(self, seconds: float) -> None:
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shutdown(sock)

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shutdown(sock)

    def cancel(self) -> None:
        self._timer.cancel()

    def connection_class(self, http_class: type) -> Callable[..., Any]:
        """`http_class` (HTTPConnection or HTTPSConnection) whose socket this deadline watches once connected."""
        deadline = self

        def make(*args: Any, **kwargs: Any) -> Any:
            connection = http_class(*args, **kwargs)
            connect = connection.connect

            def watched_connect() -> None:
                connect()
                deadline.watch(connection.sock)

            connection.connect = watched_connect
            return connection

        return make


def _shutdown(sock: socket.socket) -> None:
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's: wakes a blocked read, TLS or not
    except OSError:
        pass


class _RefusedRedirect(ValueError):
    pass


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not is_remote_url(newurl):
            raise _RefusedRedirect(f"it redirects to {newurl}: only redirects to http(s) are followed")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _watched_handlers(deadline: _Deadline) -> list[urllib.request.BaseHandler]:
    class HTTPHandler(urllib.request.HTTPHandler):
        def do_open(self, http_class, req, **kwargs):
            return super().do_open(deadline.connection_class(http_class), req, **kwargs)

    class HTTPSHandler(urllib.request.HTTPSHandler):
        def do_open(self, http_class, req, **kwargs):
            return super().do_open(deadline.connection_class(http_class), req, **kwargs)

    return [HTTPHandler(), HTTPSHandler(), _HttpOnlyRedirects()]


class UrlStream(io.RawIOBase):
    """The body of an http(s) URL as a read-only stream, under a `UrlPolicy`: the whole fetch ends by its deadline
    and after `max_bytes`; each is one ValueError naming the URL. Use as a context manager (or close it)."""

    def __init__(self, url: str, policy: UrlPolicy) -> None:
        super().__init__()
        policy.check(url)
        self.url, self.policy, self.received = url, policy, 0
        self.name = url
        self._deadline = _Deadline(policy.timeout)
        opener = urllib.request.build_opener(*_watched_handlers(self._deadline))
        try:
            self._response = opener.open(url, timeout=policy.timeout)
        except BaseException as err:
            self._deadline.cancel()
            raise self._error(err) from err
        declared = self._response.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > policy.max_bytes:
            self.close()
            raise ValueError(f"{url} is {int(declared)} bytes, more than max_url_bytes={policy.max_bytes}; raise "
                             "max_url_bytes or download the file")

    def _error(self, err: BaseException) -> BaseException:
        if self._deadline.expired:
            return ValueError(f"cannot fetch {self.url} within {self.policy.timeout:g} s: the time was up after "
                              f"{self.received} bytes")
        if isinstance(err, _RefusedRedirect):
            return ValueError(f"cannot fetch {self.url}: {err}")
        if isinstance(err, (urllib.error.URLError, OSError, ValueError, http.client.HTTPException)):
            return ValueError(f"cannot fetch {self.url} within {self.policy.timeout:g} s: {err}")
        return err

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        try:
            chunk = self._response.read1(len(buffer))
        except BaseException as err:
            raise self._error(err) from err
        if not chunk and self._deadline.expired:  # a shut-down socket reads as the end of the body
            raise self._error(TimeoutError())
        self.received += len(chunk)
        if self.received > self.policy.max_bytes:
            raise ValueError(f"{self.url} sent more than max_url_bytes={self.policy.max_bytes} bytes; raise "
                             "max_url_bytes or download the file")
        buffer[: len(chunk)] = chunk
        return len(chunk)

    def close(self) -> None:
        if not self.closed:
            self._deadline.cancel()
            response = getattr(self, "_response", None)
            if response is not None:
                response.close()
        super().close()


def fetch_url(url: str, policy: UrlPolicy | None = None) -> bytes:
    """The bytes at an http(s) URL under `policy` (default `UrlPolicy()`); one ValueError naming the URL otherwise."""
    with UrlStream(url, policy or UrlPolicy()) as stream:
        return b"".join(iter(lambda: stream.read(1 << 20), b""))


def source_name(source: Any) -> str:
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

    def __init__(self, source: str | os.PathLike | bytes | io.IOBase, url_policy: UrlPolicy | None = None) -> None:
        _require_av()
        self.name = source_name(source)
        if isinstance(source, str):
            check_media_string(source, url_policy or UrlPolicy(), "video")
        if is_remote_url(source):
            self._source = fetch_url(source, url_policy)
        elif isinstance(source, (str, os.PathLike)):
            path = local_path(source)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"video file not found: {self.name}")
            self._source = path
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
        except (av.error.FFmpegError, IndexError) as err:  # EOFError included: an empty or cut file
            raise ValueError(f"{self.name}: cannot be read as a video (PyAV: {err})") from err
        if not container.streams.video:
            container.close()
            raise ValueError(f"{self.name}: the file has no video stream")
        return container

    def error(self, err: Exception) -> ValueError:
        return ValueError(f"{self.name}: the video is corrupt or truncated (PyAV: {err})")


# ----------------------------------------------------------------------------------------------
# The demux pass: frame times, keyframes, and what the container declares
# ----------------------------------------------------------------------------------------------


@dataclass
class _StreamIndex:
    """Per-frame timing of a video stream, from a demux pass (no decoding).

    pts: int64 [total] presentation timestamps in stream time base, sorted (= display order);
    None when the container does not give timestamps. keyframe_pts: sorted int64 [n_keyframes].
    declared_frames / declared_seconds: what the container's header says (None when it does not).
    """

    total: int
    pts: np.ndarray | None
    keyframe_pts: np.ndarray | None
    time_base: Fraction | None
    average_rate: Fraction | None
    declared_frames: int | None
    declared_seconds: float | None
    width: int
    height: int

    def times(self) -> np.ndarray | None:
        """float64 [total] seconds from the first frame, or None when unknown."""
        if self.pts is not None and self.time_base is not None:
            return (self.pts - self.pts[0]).astype(np.float64) * float(self.time_base)
        if self.average_rate:
            return np.arange(self.total, dtype=np.float64) / float(self.average_rate)
        return None


def _declared_seconds(container: "av.container.InputContainer", stream: Any) -> float | None:
    """The video stream's declared duration; the container's only when the video is its one stream
    (a container's duration covers its longest stream, often audio)."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration and len(container.streams) == 1:
        return container.duration / 1e6
    return None


def _scan_stream(container: "av.container.InputContainer", name: str) -> _StreamIndex:
    """Demux (no decode) the first video stream: frame count, presentation times, keyframes.

    Containers often report 0 frames or no duration (mkv, webm, streams): counting packets is
    exact and cheap, and gives real times for variable-frame-rate files.
    """
    stream = container.streams.video[0]
    pts, keys, missing, last_dts = [], [], False, None
    for packet in container.demux(stream):
        if packet.size == 0:  # the demuxer's final flush packet
            continue
        if packet.dts is not None:
            if last_dts is not None and packet.dts < last_dts:
                raise _timestamps_restart(name, len(pts), last_dts, packet.dts, stream.time_base)
            last_dts = packet.dts
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
        declared_frames=int(stream.frames) or None,
        declared_seconds=_declared_seconds(container, stream),
        width=stream.codec_context.width,
        height=stream.codec_context.height,
    )


def _timestamps_restart(name: str, frame: int, before: int, after: int, time_base: Fraction | None) -> ValueError:
    """Decode timestamps go back where recordings were joined end to end (`cat a.ts b.ts`) or where the container
    is damaged (the two look the same to a demuxer): frame times, seeking and the sampled frames would mix up."""
    def seconds(stamp: int) -> str:
        return f"{float(stamp * time_base):.2f} s" if time_base else f"{stamp}"

    return ValueError(f"{name}: the video's timestamps restart at frame {frame} (from {seconds(before)} back to "
                      f"{seconds(after)}): it holds several recordings joined end to end (as `cat a.ts b.ts` makes) or "
                      "it is corrupt, and its frames cannot be placed in time; split it where the timestamps restart, "
                      "or re-encode it into one stream")


class _FrameSize:
    """Every decoded frame must have the size the stream declares: a change means parts of different recordings
    joined end to end, and one size in the metadata would be false for some frames."""

    def __init__(self, index: _StreamIndex) -> None:
        self.size = (index.width, index.height) if index.width and index.height else None
        self.first_pts = int(index.pts[0]) if index.pts is not None else None

    def check(self, frame: Any) -> None:
        size = (frame.width, frame.height)
        if self.size is None:
            self.size = size
        elif size != self.size:
            at = ""
            if frame.pts is not None and frame.time_base and self.first_pts is not None:
                at = f" (seen at {float((frame.pts - self.first_pts) * frame.time_base):.2f} s)"
            raise ValueError(f"the frame size changes inside the video, from {self.size[0]}x{self.size[1]} to "
                             f"{size[0]}x{size[1]}{at}: it holds parts of different recordings joined end to end; "
                             "split it where the size changes, or re-encode it to one size")


def _check_complete(index: _StreamIndex, name: str, allow_partial: bool) -> None:
    """What the file holds against what its container declares: frames and duration."""
    problems = []
    if index.declared_frames and index.total < index.declared_frames:
        missing = index.declared_frames - index.total
        problems.append(f"it holds {index.total} of the {index.declared_frames} frames its container declares "
                        f"({missing} missing, {100 * missing / index.declared_frames:.0f}%)")
    times = index.times()
    if index.declared_seconds and times is not None and index.pts is not None:
        end = video_duration(times)
        if end > index.declared_seconds * 1.05 + 1.0:
            problems.append(f"its frame times run to {end:.1f} s but its container declares "
                            f"{index.declared_seconds:.1f} s (a corrupt index)")
        elif end < index.declared_seconds * 0.95 - 1.0:
            problems.append(f"its frames cover {end:.1f} s of the {index.declared_seconds:.1f} s its container "
                            "declares")
    _report(problems, name, allow_partial)


def _report(problems: list[str], name: str, allow_partial: bool) -> None:
    if not problems:
        return
    message = f"{name}: the video is truncated or corrupt: " + "; ".join(problems)
    if not allow_partial:
        raise ValueError(message + ". Pass allow_partial_video=True to use the frames that are there.")
    logger.warning("%s; using the frames that are there (allow_partial_video=True)", message)


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------


def _decodable_frames(container: "av.container.InputContainer", stream: Any) -> Iterator[Any]:
    """The frames of `stream` up to the end or to the first packet the codec refuses. PyAV before 18 raises
    `InvalidDataError` for the cut last packet of a truncated file where later releases end the stream; either way
    the frames after it are not there, and the callers report them as missed."""
    try:
        yield from container.decode(stream)
    except av.error.InvalidDataError as err:
        logger.debug("decoding stopped at a packet the codec refuses: %s", err)


class _ForwardDecoder:
    """Decodes forward from the current position, remembering the last frame (targets may share it)."""

    def __init__(self, container: "av.container.InputContainer", stream: "av.video.stream.VideoStream",
                 size: _FrameSize) -> None:
        self._frames = _decodable_frames(container, stream)
        self._size = size
        self.frame = None

    def advance_to(self, target_pts: int) -> Any:
        """The first frame with pts >= target_pts (the last frame at end of stream; None if none)."""
        while self.frame is None or self.frame.pts is None or self.frame.pts < target_pts:
            try:
                self.frame = next(self._frames)
            except StopIteration:
                return self.frame
            self._size.check(self.frame)
        return self.frame


class _SeekFailed(Exception):
    """The demuxer cannot land at or before a frame: decode sequentially instead."""


def _seek(container, stream, keyframe_pts: np.ndarray, key_slot: int, target: int, size: _FrameSize
          ) -> _ForwardDecoder:
    """Seek to keyframe `key_slot` and return a decoder positioned at or before `target`.

    Some demuxers (MPEG-TS) land after the requested keyframe: then earlier keyframes are tried,
    then the start of the file.
    """
    for slot in [*range(key_slot, max(key_slot - 3, -1), -1), None]:
        if slot is None:
            container.seek(0)  # the start of the file (AV_TIME_BASE units)
        else:
            container.seek(int(keyframe_pts[slot]), stream=stream, backward=True, any_frame=False)
        decoder = _ForwardDecoder(container, stream, size)
        first = decoder.advance_to(-(2**62))  # the first frame after the seek
        if first is not None and first.pts is not None and first.pts <= target:
            return decoder
    raise _SeekFailed(f"cannot seek to pts {target}")


def _decode_by_seeking(
    container: "av.container.InputContainer", index: _StreamIndex, wanted: np.ndarray, missed: list[int]
) -> Iterator[tuple[int, Any]]:
    """Yield (frame index, av.VideoFrame) for sorted unique `wanted`, seeking to keyframes.

    A seek is done only when the target's keyframe lies after the decoder's position: close
    targets are reached by decoding forward, far ones by jumping. Frames in between are decoded
    (they are needed as references) but never converted to RGB. Indices whose frame did not
    decode (another frame stands in) are appended to `missed`.
    """
    stream = container.streams.video[0]
    decoder, position, size = None, None, _FrameSize(index)
    for i in wanted:
        target = int(index.pts[i])
        key_slot = max(0, int(np.searchsorted(index.keyframe_pts, target, side="right")) - 1)
        if decoder is None or position is None or index.keyframe_pts[key_slot] > position:
            decoder = _seek(container, stream, index.keyframe_pts, key_slot, target, size)
        frame = decoder.advance_to(target)
        if frame is None or frame.pts is None:
            raise _SeekFailed(f"no frame decoded up to pts {target}")
        if frame.pts != target:
            missed.append(int(i))
        position = frame.pts
        yield int(i), frame


def _decode_sequentially(
    container: "av.container.InputContainer", index: _StreamIndex, wanted: np.ndarray, missed: list[int]
) -> Iterator[tuple[int, Any]]:
    """Yield (frame index, frame) for sorted unique `wanted` by counting decoded frames (no timestamps)."""
    stream = container.streams.video[0]
    wanted_list, position, last, size = [int(i) for i in wanted], 0, None, _FrameSize(index)
    for count, frame in enumerate(_decodable_frames(container, stream)):
        size.check(frame)
        last = frame
        while position < len(wanted_list) and wanted_list[position] == count:
            yield wanted_list[position], frame
            position += 1
        if position == len(wanted_list):
            return
    for i in wanted_list[position:]:  # fewer decodable frames than packets: the last one stands in
        if last is None:
            raise ValueError("no frame could be decoded")
        missed.append(i)
        yield i, last


_ROTATIONS = {90: Image.Transpose.ROTATE_90, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_270}


def display_rotation(frame: Any) -> int:
    """Counter-clockwise degrees (0, 90, 180, 270) the frame's display matrix turns it by."""
    return int(round((frame.rotation or 0) / 90.0)) * 90 % 360


def upright_image(frame: Any) -> Image.Image:
    """An av.VideoFrame as an RGB PIL image turned as its display matrix says (ffmpeg's autorotate)."""
    image = frame.to_image()
    rotation = display_rotation(frame)
    return image.transpose(_ROTATIONS[rotation]) if rotation else image


def _frame_seconds(frame: Any, index: _StreamIndex, i: int, first_pts: int | None) -> float | None:
    if frame.pts is not None and frame.time_base is not None and first_pts is not None:
        return float((frame.pts - first_pts) * frame.time_base)
    times = index.times()
    return None if times is None else float(times[i])


def _decode_wanted(
    video: _VideoFile, index: _StreamIndex, wanted: np.ndarray, convert: Callable[[Image.Image], Any], seek: bool,
    allow_partial: bool,
) -> tuple[dict[int, Any], dict[int, float | None], int]:
    """{frame index: convert(upright RGB frame)}, {frame index: seconds} and the display rotation,
    for the sorted unique `wanted`."""
    converted, seconds, missed, rotation = {}, {}, [], 0
    first_pts = int(index.pts[0]) if index.pts is not None else None
    with video.open() as container:
        container.streams.video[0].codec_context.thread_type = "AUTO"  # frame threads: ~cores x faster
        frames = (_decode_by_seeking(container, index, wanted, missed) if seek
                  else _decode_sequentially(container, index, wanted, missed))
        # transformers' progress bar: drawn only once decoding runs past PROGRESS_DELAY_SECONDS, silenced by
        # `transformers.utils.logging.disable_progress_bar()`.
        progress = tqdm(total=len(wanted), desc="Decoding video frames", unit="frame", delay=PROGRESS_DELAY_SECONDS)
        try:
            for i, frame in frames:
                rotation = display_rotation(frame)
                converted[i] = convert(upright_image(frame))  # resized and cropped right away
                seconds[i] = _frame_seconds(frame, index, i, first_pts)
                progress.update()
        except av.error.FFmpegError as err:
            raise video.error(err) from err
        except ValueError as err:
            raise ValueError(f"{video.name}: {err}") from err
        finally:
            progress.close()
    if missed:
        _report([f"{len(missed)} of the {len(wanted)} sampled frames do not decode (first: frame {missed[0]})"],
                video.name, allow_partial)
    return converted, seconds, rotation


def read_video_frames(
    source: str | os.PathLike | bytes | io.IOBase,
    sampling: VideoSampling,
    convert: Callable[[Image.Image], Any],
    frame_bytes: int | None = None,
    url_policy: UrlPolicy | None = None,
) -> tuple[list[Any], VideoXLVideoMetadata]:
    """Decode the sampled frames of a video file and pass each, as an upright RGB PIL image, to
    `convert` as soon as it is decoded (so only converted frames are ever held).

    Args:
        source: a path, `file://` or http(s) URL, bytes, or a (seekable or not) binary file object.
        sampling: which frames.
        convert: applied to each decoded frame.
        frame_bytes: bytes of one output frame, for the memory figure in a too-many-frames error.
        url_policy: how http(s) URLs are fetched (default `UrlPolicy()`: allowed, 30 s, 2 GiB).

    Returns ([convert(frame) for each sampled index, in order; repeated indices share the result],
    metadata). Errors: FileNotFoundError (missing path), ValueError (not a video, no video stream,
    zero frames, truncated or corrupt data, too many frames, unreachable or refused URL), each
    naming the source.
    """
    sampling.validate()
    video = _VideoFile(source, url_policy)
    with video.open() as container:
        try:
            index = _scan_stream(container, video.name)
        except av.error.FFmpegError as err:
            raise video.error(err) from err
    _check_complete(index, video.name, sampling.allow_partial)
    times = index.times()
    indices = choose_indices(index.total, times, sampling, video.name, frame_bytes)
    wanted = np.unique(indices)
    try:
        converted, seconds, rotation = _decode_wanted(video, index, wanted, convert,
                                                      index.keyframe_pts is not None, sampling.allow_partial)
    except _SeekFailed as err:
        logger.warning("%s: %s; decoding sequentially", video.name, err)
        converted, seconds, rotation = _decode_wanted(video, index, wanted, convert, False, sampling.allow_partial)
    width, height = (index.height, index.width) if rotation in (90, 270) else (index.width, index.height)
    duration = None if times is None else video_duration(times)
    metadata = VideoXLVideoMetadata(
        source=video.name,
        total_num_frames=index.total,
        fps=float(index.total / duration) if duration else None,
        width=width,
        height=height,
        duration=duration,
        video_backend="pyav",
        frames_indices=[int(i) for i in indices],
        frame_times=None if any(seconds[i] is None for i in wanted) else [seconds[int(i)] for i in indices],
    )
    return [converted[int(i)] for i in indices], metadata


@dataclass
class VideoProbe:
    """What a cheap look at a video file says: its first frame's size and the duration its header declares."""

    width: int
    height: int
    declared_frames: int | None
    declared_seconds: float | None


def probe_video(source: str | os.PathLike, url_policy: UrlPolicy | None = None) -> VideoProbe:
    """Open a video (path, `file://` or http(s) URL under `url_policy`) and decode its first frame only: what a
    check of a whole dataset can afford per file. One ValueError (FileNotFoundError for a missing path) naming the
    file when it cannot be read as a video."""
    _require_av()
    name, policy = os.fspath(source), url_policy or UrlPolicy()
    check_media_string(name, policy, "video")
    if is_remote_url(name):
        target: Any = UrlStream(name, policy)  # only the bytes up to the first frame are fetched
    else:
        target = local_path(name)
        if not os.path.isfile(target):
            raise FileNotFoundError(f"video file not found: {name}")
    try:
        with av.open(target, mode="r", metadata_errors="ignore") as container:
            if not container.streams.video:
                raise ValueError(f"{name}: the file has no video stream")
            stream = container.streams.video[0]
            first = next(iter(container.decode(stream)), None)
            if first is None:
                raise ValueError(f"{name}: no frame of the video decodes")
            rate = stream.average_rate or stream.guessed_rate
            if stream.frames and rate:
                seconds = stream.frames / float(rate)
            elif stream.duration and stream.time_base:
                seconds = float(stream.duration * stream.time_base)
            else:
                seconds = container.duration / 1e6 if container.duration else None
            return VideoProbe(first.width, first.height, int(stream.frames) or None, seconds)
    except (av.error.FFmpegError, IndexError) as err:
        raise ValueError(f"{name}: cannot be read as a video (PyAV: {err})") from err
    finally:
        if isinstance(target, UrlStream):
            target.close()


# ----------------------------------------------------------------------------------------------
# Videos already in memory
# ----------------------------------------------------------------------------------------------


def in_memory_frames(video: Any, name: str = "video") -> list[Any] | None:
    """A video given as frames ([F, H, W, C] array/tensor or a list of frames), else None."""
    if isinstance(video, (np.ndarray, torch.Tensor)):
        if video.ndim == 3:
            raise ValueError(f"{name}: a video array must be [F, H, W, 3] (or [F, H, W, 1]); got shape "
                             f"{tuple(video.shape)}: for grayscale frames add a channel axis (video[..., None])")
        if video.ndim != 4:
            raise ValueError(f"{name}: a video array must be [F, H, W, 3], got shape {tuple(video.shape)}"
                             + ("; pass a batch of videos as a list of 4-D arrays" if video.ndim == 5 else ""))
        return list(video)
    if isinstance(video, (list, tuple)):
        return list(video)
    return None


def sample_frames_in_memory(
    frames: Sequence[Any], sampling: VideoSampling | None, convert: Callable[[Any, int], Any], name: str,
    frame_bytes: int | None = None,
) -> tuple[list[Any], VideoXLVideoMetadata]:
    """Same as `read_video_frames` for a video already in memory; `sampling` None keeps every frame
    as given (like LLaVA-OneVision). `convert(frame, index)` gets each kept frame as given (array or image) and its
    index in `frames`."""
    total = len(frames)
    if total < 1:
        raise ValueError(f"{name}: the video has no frames")
    video_fps = None if sampling is None else sampling.video_fps
    times = None if video_fps is None else np.arange(total, dtype=np.float64) / video_fps
    if sampling is None:
        indices = np.arange(total, dtype=np.int64)
    else:
        sampling.validate()
        indices = choose_indices(total, times, sampling, name, frame_bytes)
    converted = {int(i): convert(frames[int(i)], int(i)) for i in np.unique(indices)}
    metadata = VideoXLVideoMetadata(
        source=name,
        total_num_frames=total,
        fps=video_fps,
        duration=None if video_fps is None else total / video_fps,
        frames_indices=[int(i) for i in indices],
        frame_times=None if times is None else [float(times[int(i)]) for i in indices],
    )
    return [converted[int(i)] for i in indices], metadata


__all__ = ["VideoSampling", "VideoXLVideoMetadata", "read_video_frames", "sample_frames_in_memory", "UrlPolicy",
           "UrlStream", "fetch_url", "check_media_string", "probe_video", "VideoProbe", "in_memory_frames"]
