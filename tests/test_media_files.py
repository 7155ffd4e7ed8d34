"""Bad or unusual video files get one clear error or the right result (issue 13: findings 2, 3, 5).

Every file is written with PyAV inside the test (tests/_video_files.py).
"""

import logging
import tracemalloc
from fractions import Fraction

import av
import numpy as np
import pytest
import torch
from PIL import Image

from _video_files import clip_crop_reference, decode_all, frame_pattern, write_video
from scripts.local_import import REPO_ROOT, processing, video_decoding


pv = processing()
vdv = video_decoding()


@pytest.fixture(scope="module")
def processor():
    from transformers import Qwen2Tokenizer

    return pv.VideoXLProcessor(Qwen2Tokenizer.from_pretrained(REPO_ROOT))


@pytest.fixture(scope="module")
def faststart(tmp_path_factory):
    """A 10 s, 25 fps MP4 with its index (moov) first: a cut copy still opens and declares 250 frames."""
    return write_video(tmp_path_factory.mktemp("fs") / "fs.mp4", n_frames=250, fps=25,
                       container_options={"movflags": "faststart"})




# ------------------------------------------------------------------------------------------------
# finding 2: truncated or corrupt files
# ------------------------------------------------------------------------------------------------


def test_the_faststart_file_itself_is_fine(processor, faststart):
    with av.open(str(faststart)) as container:
        assert container.streams.video[0].frames == 250
    pixels, meta = processor.load_video(str(faststart), num_frames=8)
    assert pixels.shape[0] == 8 and meta.total_num_frames == 250


@pytest.mark.parametrize("percent", [20, 30, 40, 50, 60, 70, 80, 90, 99])
def test_cut_faststart_mp4_is_an_error_naming_the_file_and_what_is_missing(processor, faststart, tmp_path, percent):
    data = faststart.read_bytes()
    cut = tmp_path / f"cut{percent}.mp4"
    cut.write_bytes(data[: len(data) * percent // 100])
    with av.open(str(cut)) as container:  # the cut file opens: only the frame data is gone
        assert container.streams.video[0].frames == 250
    with pytest.raises(ValueError, match=rf"cut{percent}\.mp4: the video is truncated or corrupt: it holds (\d+) of "
                                         r"the 250 frames its container declares \(\d+ missing"):
        processor(text="<video>", videos=str(cut), num_frames=8)


def test_partial_file_accepted_only_on_request_with_a_warning(processor, faststart, tmp_path, caplog):
    data = faststart.read_bytes()
    cut = tmp_path / "half.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING):
        pixels, meta = processor.load_video(str(cut), num_frames=8, allow_partial_video=True)
    assert "half.mp4" in caplog.text and "allow_partial_video=True" in caplog.text
    assert 0 < meta.total_num_frames < 250 and pixels.shape[0] == 8
    assert meta.frames_indices[-1] == meta.total_num_frames - 1  # sampled over what is there


def test_cut_matroska_is_an_error_naming_the_seconds_missing(processor, tmp_path):
    mkv = write_video(tmp_path / "a.mkv", n_frames=250, fps=25, container_format="matroska")
    data = mkv.read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) * 6 // 10])
    with pytest.raises(ValueError, match=r"cut\.mkv: .*its frames cover \d+\.\d s of the 10\.0 s its container "):
        processor.load_video(str(cut), num_frames=4)


def test_corrupt_index_byte_is_an_error_not_a_thousand_second_video(processor, faststart, tmp_path):
    """One flipped byte in the sample-timing table (stts) once gave a 10 s clip a length of days."""
    data = bytearray(faststart.read_bytes())
    data[data.find(b"stts") + 16] ^= 0x40
    bad = tmp_path / "stts.mp4"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"stts\.mp4: the video is truncated or corrupt: .*container declares"):
        processor.load_video(str(bad), fps=1)


# ------------------------------------------------------------------------------------------------
# finding 3: rotation (display matrix)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rotation, turns", [(90, 1), (-90, -1), (180, 2)])
def test_display_matrix_is_applied(processor, tmp_path, rotation, turns):
    """A phone-style file: 64x48 frames stored sideways with a display rotation. The model sees them
    upright (as ffmpeg's autorotate shows them) and the metadata reports the upright size."""
    path = write_video(tmp_path / "rot.mp4", n_frames=10, rotation=rotation)
    with av.open(str(path)) as container:
        assert next(container.decode(video=0)).rotation % 360 == rotation % 360
    stored, _ = decode_all(path)
    pixels, meta = processor.load_video(str(path), num_frames=3)
    upright = [np.ascontiguousarray(np.rot90(stored[i], k=turns)) for i in meta.frames_indices]
    expected = processor.image_processor.frames_to_pixels([clip_crop_reference(f) for f in upright])
    assert torch.equal(pixels, expected)
    assert (meta.width, meta.height) == ((48, 64) if rotation % 180 else (64, 48))


def test_unrotated_file_is_unchanged(processor, tmp_path):
    path = write_video(tmp_path / "plain.mp4", n_frames=10)
    stored, _ = decode_all(path)
    pixels, meta = processor.load_video(str(path), num_frames=3)
    expected = processor.image_processor.frames_to_pixels([clip_crop_reference(stored[i]) for i in meta.frames_indices])
    assert torch.equal(pixels, expected) and (meta.width, meta.height) == (64, 48)


# ------------------------------------------------------------------------------------------------
# finding 5: memory bombs
# ------------------------------------------------------------------------------------------------


def test_extreme_aspect_ratio_frame_costs_bounded_memory(processor, tmp_path):
    """A 1x5000 video: resizing the short side to 336 first would build a 336 x 1,680,000 frame
    (1.7 GB) per frame. Only what the crop keeps is resized, and the crop is its own array."""
    path = tmp_path / "tall.mkv"
    with av.open(str(path), "w", format="matroska") as container:
        stream = container.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 1, 5000, "yuv444p"
        for i in range(4):
            column = np.linspace(0, 255, 5000, dtype=np.uint8)[:, None, None] * np.ones((1, 1, 3), np.uint8)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(column + i * 10), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    assert path.stat().st_size < 50_000
    tracemalloc.start()
    try:
        pixels, _ = processor.load_video(str(path), num_frames=4)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert pixels.shape == (4, 3, 336, 336)
    assert peak < 64 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    crop = processor.image_processor.resize_crop(Image.new("RGB", (1, 5000)))
    assert crop.base is None and crop.flags["C_CONTIGUOUS"] and crop.shape == (3, 336, 336)


@pytest.mark.parametrize("size", [(8, 400), (30, 1000), (400, 8), (1000, 30)])
def test_extreme_aspect_ratio_crop_matches_the_whole_frame_resize(processor, size):
    width, height = size
    image = Image.fromarray(np.random.default_rng(width).integers(0, 256, (height, width, 3), dtype=np.uint8))
    assert np.array_equal(processor.image_processor.resize_crop(image), clip_crop_reference(np.asarray(image)))


def test_normal_crop_is_a_copy_not_a_view(processor):
    crop = processor.image_processor.resize_crop(Image.fromarray(frame_pattern(1, 48, 640)))
    assert crop.base is None and crop.flags["C_CONTIGUOUS"]


def test_too_many_frames_is_refused_before_decoding(processor, tmp_path, monkeypatch):
    """A 50-minute file (50 frames shown a minute each): fps=1 means 3,000 frames, 4 GiB of pixels."""
    path = write_video(tmp_path / "long.mp4", n_frames=50, frame_durations_ms=[60_000])
    monkeypatch.setattr(vdv, "_decode_wanted", lambda *a, **k: pytest.fail("decoding started"))
    with pytest.raises(ValueError, match=r"long\.mp4: fps=1 over 3000\.0 s asks for 3000 frames \(3\.8 GiB of pixel "
                                         r"values\), more than 1024 without an explicit max_frames; pass max_frames"):
        processor.load_video(str(path), fps=1)
    with pytest.raises(ValueError, match=r"num_frames=5000 asks for 5000 frames"):
        processor(text="<video>", videos=str(path), num_frames=5000)


def test_explicit_max_frames_caps_or_permits(processor, tmp_path):
    path = write_video(tmp_path / "long.mp4", n_frames=50, frame_durations_ms=[60_000])
    _, meta = processor.load_video(str(path), fps=1 / 60, max_frames=10)
    assert meta.frames_indices == np.linspace(0, 49, 10, dtype=int).tolist()


def test_fps_faster_than_the_video_is_refused(processor, tmp_path):
    path = write_video(tmp_path / "v.mp4", n_frames=40, fps=10)
    with pytest.raises(ValueError, match=r"v\.mp4: fps=100 is faster than the video's 10 frames per second"):
        processor.load_video(str(path), fps=100)
    _, meta = processor.load_video(str(path), fps=10)
    assert meta.frames_indices == list(range(40))


@pytest.mark.parametrize("fps", [float("inf"), float("nan"), "2", 0, -1, True])
def test_bad_fps_values(processor, tmp_path, fps):
    path = write_video(tmp_path / "v.mp4", n_frames=10)
    with pytest.raises(ValueError, match="fps must be a finite number > 0"):
        processor(text="<video>", videos=str(path), fps=fps)


@pytest.mark.parametrize("options, message", [({"num_frames": "8"}, "num_frames must be an integer >= 1"),
                                              ({"max_frames": 2.5}, "max_frames must be an integer >= 1"),
                                              ({"video_fps": float("inf"), "fps": 1}, "video_fps must be a finite")])
def test_bad_sampling_values(processor, options, message):
    with pytest.raises(ValueError, match=message):
        processor(text="<video>", videos=np.zeros((4, 8, 8, 3), np.uint8), **options)


def test_variable_frame_rate_metadata_times(processor, tmp_path):
    path = write_video(tmp_path / "vfr.mp4", n_frames=9, frame_durations_ms=[100, 400])
    _, meta = processor.load_video(str(path), num_frames=9)
    assert meta.timestamps == pytest.approx([0.0, 0.1, 0.5, 0.6, 1.0, 1.1, 1.5, 1.6, 2.0])
    assert Fraction(meta.duration).limit_denominator(100) == Fraction(9, 4)  # + the median spacing (0.25 s)
