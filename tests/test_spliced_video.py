"""Recordings joined end to end (`cat a.ts b.ts`, what recorders and `cat` make): decoding notices the change of
stream parameters and refuses with an error that says so, instead of sampling frames of one part under the other's
times and size (issue 29, item 1). The parts, written with PyAV in the test, decode right on their own."""

import re

import numpy as np
import pytest

from _video_files import decode_all, write_video
from scripts.local_import import processing


pv = processing()


def part(path, size, start_seconds=None):
    """2 s of 10 fps H.264 in MPEG-TS; `start_seconds` shifts its timestamps (a part recorded later)."""
    options = {} if start_seconds is None else {"output_ts_offset": str(start_seconds)}
    return write_video(path, n_frames=20, fps=10, size=size, container_format="mpegts", container_options=options)


def joined(path, *parts):
    path.write_bytes(b"".join(p.read_bytes() for p in parts))
    return path


def sample(path, **sampling):
    return pv.read_video_frames(str(path), pv.VideoSampling(**sampling), np.asarray)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spliced")
    return folder, part(folder / "a.ts", (320, 240)), part(folder / "b.ts", (640, 360))


def test_each_part_decodes_right_on_its_own(parts):
    _, a, b = parts
    for path, (width, height) in ((a, (320, 240)), (b, (640, 360))):
        frames, metadata = sample(path, num_frames=4)
        reference, times = decode_all(path)
        assert [f.shape for f in frames] == [(height, width, 3)] * 4
        assert all(np.array_equal(f, reference[i]) for f, i in zip(frames, metadata.frames_indices))
        assert (metadata.width, metadata.height, metadata.total_num_frames) == (width, height, 20)
        assert metadata.timestamps == pytest.approx([times[i] for i in metadata.frames_indices])


@pytest.mark.parametrize("second", ["b.ts", "a.ts"])  # another size, and the same size (only the times restart)
def test_parts_whose_timestamps_restart_are_refused(parts, second, tmp_path, processor):
    folder, a, _ = parts
    spliced = joined(tmp_path / "c.ts", a, folder / second)
    message = (f"{spliced}: the video's timestamps restart at frame 20 (from 1.90 s back to 0.00 s): it holds several "
               "recordings joined end to end (as `cat a.ts b.ts` makes) or it is corrupt, and its frames cannot be placed "
               "in time; split it where the timestamps restart, or re-encode it into one stream")
    for sampling in ({"num_frames": 8}, {"fps": 2.0}):
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            sample(spliced, **sampling)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        processor(text="<video>", videos=str(spliced))


def test_a_size_change_with_timestamps_that_run_on_is_refused(parts, tmp_path):
    folder, a, _ = parts
    later = part(folder / "b_later.ts", (640, 360), start_seconds=2.2)  # starts where a.ts ends
    spliced = joined(tmp_path / "c.ts", a, later)
    with pytest.raises(ValueError, match=re.escape(
            f"{spliced}: the frame size changes inside the video, from 320x240 to 640x360 (seen at 2.00 s): it holds "
            "parts of different recordings joined end to end; split it where the size changes, or re-encode it to one "
            "size")):
        sample(spliced, num_frames=8)
    with pytest.raises(ValueError, match=r"from 320x240 to 640x360 \(seen at [23]\.\d0 s\)"):  # by time
        sample(spliced, fps=1.0)
