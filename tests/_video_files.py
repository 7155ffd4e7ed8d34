"""Real video files for the processor tests, written with PyAV in the test itself.

Every frame is different (a gray level that changes with the index, a moving bar and the index in
binary as big blocks), so a wrong frame index shows up as a pixel difference.
"""

from __future__ import annotations

import math
import struct
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import av
import numpy as np
from PIL import Image


def has_encoder(name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
        return True
    except Exception:  # UnknownCodecError and friends
        return False


def frame_pattern(index: int, height: int = 48, width: int = 64) -> np.ndarray:
    """uint8 [H, W, 3], distinct for every index < 256."""
    frame = np.zeros((height, width, 3), np.uint8)
    frame[..., 0] = (37 * index) % 256
    frame[..., 2] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    bar = (index * 3) % width
    frame[:, bar : bar + 4, 1] = 255
    for bit in range(8):  # index in binary: 8 blocks of 8x8 in the top rows
        if index >> bit & 1:
            frame[: height // 3, bit * (width // 8) : (bit + 1) * (width // 8), 1] = 200
    return frame


def write_video(
    path: Path,
    n_frames: int = 40,
    fps: int = 10,
    codec: str = "libx264",
    container_format: str | None = None,
    size: tuple[int, int] = (64, 48),
    gop: int = 8,
    options: dict[str, str] | None = None,
    frame_durations_ms: Sequence[int] | None = None,
    container_options: dict[str, str] | None = None,
    rotation: int | None = None,
) -> Path:
    """Encode `n_frames` patterned frames. `frame_durations_ms` makes a variable-frame-rate file
    (time base 1/1000, each frame shown for its own duration); `container_options` go to the muxer
    (e.g. {"movflags": "faststart"}: the MP4 index first); `rotation` writes a display matrix that
    turns the frames that many degrees counter-clockwise (what phones write for portrait video)."""
    width, height = size
    with av.open(str(path), "w", format=container_format, options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        if rotation is not None and hasattr(stream, "set_display_rotation"):  # PyAV >= 18
            stream.set_display_rotation(rotation)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        if options:
            stream.options = options
        if frame_durations_ms is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        pts = 0
        for i in range(n_frames):
            frame = av.VideoFrame.from_ndarray(frame_pattern(i, height, width), format="rgb24")
            if frame_durations_ms is not None:
                frame.pts, frame.time_base = pts, Fraction(1, 1000)
                pts += frame_durations_ms[i % len(frame_durations_ms)]
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    if rotation is not None and not hasattr(stream, "set_display_rotation"):
        write_mp4_display_matrix(path, rotation)
    return path


def write_mp4_display_matrix(path: Path, degrees: int) -> None:
    """Write the display matrix of an MP4's first track (its `tkhd` box) in place, as `set_display_rotation`
    does on PyAV >= 18 (turn `degrees` counter-clockwise; a, b, c, d in
    16.16 fixed point, w = 1 in 2.30). Older PyAV cannot write one, and the lmms-eval venv has PyAV 15."""
    data = bytearray(path.read_bytes())
    box = data.find(b"tkhd")
    if box < 0:
        raise ValueError(f"{path}: no tkhd box (not an MP4?)")
    version = data[box + 4]
    matrix_at = box + 4 + (4 + 8 + 8 + 4 + 4 + 8 if version == 1 else 4 + 4 + 4 + 4 + 4 + 4) + 8 + 8
    radians = math.radians(degrees)  # the sign ffmpeg reads back as `degrees` from an MP4's tkhd
    cos, sin = round(math.cos(radians) * 65536), round(math.sin(radians) * 65536)
    data[matrix_at : matrix_at + 36] = struct.pack(">9i", cos, -sin, 0, sin, cos, 0, 0, 0, 1 << 30)
    path.write_bytes(bytes(data))


def write_audio_only(path: Path) -> Path:
    """A WAV file: a valid container without a video stream."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_video_stream_without_frames(path: Path) -> Path:
    """An MKV with a video stream that holds no packet (only the audio stream has data)."""
    with av.open(str(path), "w", format="matroska") as container:
        video = container.add_stream("mpeg4", rate=10)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        audio = container.add_stream("pcm_s16le", rate=8000)
        audio.layout = "mono"
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in audio.encode(frame):
            container.mux(packet)
        for packet in audio.encode():
            container.mux(packet)
    return path


def decode_all(path: Path) -> tuple[list[np.ndarray], list[float] | None]:
    """The reference: decode every frame in order (RGB [H, W, 3]) and its time from the first frame
    (None for streams without timestamps)."""
    frames, times = [], []
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format="rgb24"))
            times.append(None if frame.pts is None else float(frame.pts * frame.time_base))
    if None in times:
        return frames, None
    return frames, [t - times[0] for t in times]


def clip_crop_reference(frame: np.ndarray) -> np.ndarray:
    """Independent CLIP-336 crop of an RGB frame (short side 336 bicubic, floored long side, center)."""
    h, w = frame.shape[:2]
    new_w, new_h = (336, int(336 * h / w)) if w <= h else (int(336 * w / h), 336)
    resized = np.asarray(Image.fromarray(frame).resize((new_w, new_h), Image.BICUBIC))
    top, left = (new_h - 336) // 2, (new_w - 336) // 2
    return resized[top : top + 336, left : left + 336].transpose(2, 0, 1)
