"""Every URL fetch (processor media, `LiveVideo.follow`) under one policy: a deadline for the whole fetch, a size
cap, the remote switch, only http(s), redirects only to http(s) (issue 29, item 5). The servers are local
(127.0.0.1) and every test is bounded in time."""

import http.server
import threading
import time

import numpy as np
import pytest

from _video_files import decode_all, write_video
from demo.qa import load
from demo.run import BUNDLED_MODEL
from scripts.local_import import REPO_ROOT, processing, session


pv = processing()
CAP = 1_000_000


class Server(http.server.BaseHTTPRequestHandler):
    """Serves `files`, and the misbehaving endpoints below."""

    files: dict[str, bytes] = {}
    requests: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        self.requests.append(self.path)
        route = {"/endless": self.endless, "/huge": self.huge, "/drip": self.drip, "/drip-headers": self.drip_headers,
                 "/to-ftp": lambda: self.redirect("ftp://127.0.0.1/clip.ts"),
                 "/to-file": lambda: self.redirect("file:///etc/passwd"),
                 "/to-clip": lambda: self.redirect("/clip.ts")}.get(self.path, self.file)
        try:
            route()
        except (BrokenPipeError, ConnectionResetError):  # the client gave up: what the limits are for
            pass

    def file(self):
        body = self.files.get(self.path)
        self.send_response(200 if body is not None else 404)
        if body is not None:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body or b"")

    def endless(self):
        """A body without a length that never ends (a stream, or a hostile server)."""
        self.send_response(200)
        self.end_headers()
        chunk = bytes(65536)
        for _ in range(100_000):  # 6.5 GB: only the client's cap stops it
            self.wfile.write(chunk)

    def huge(self):
        self.send_response(200)
        self.send_header("Content-Length", str(10**12))
        self.end_headers()
        self.wfile.write(bytes(65536))

    def drip(self):
        """One byte a second: every read succeeds long before any per-read timeout."""
        self.send_response(200)
        self.send_header("Content-Length", "1000")
        self.end_headers()
        for _ in range(60):
            self.wfile.write(b"x")
            self.wfile.flush()
            time.sleep(1.0)

    def drip_headers(self):
        for byte in b"HTTP/1.0 200 OK\r\nContent-Length: 10\r\n\r\n":
            self.wfile.write(bytes([byte]))
            self.wfile.flush()
            time.sleep(1.0)

    def redirect(self, location: str):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A 2 s MPEG-TS clip (a stream format: it decodes from a stream that cannot seek)."""
    return write_video(tmp_path_factory.mktemp("net") / "clip.ts", n_frames=20, fps=10, container_format="mpegts")


@pytest.fixture
def server(clip):
    Server.files, Server.requests = {"/clip.ts": clip.read_bytes()}, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Server)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def processor():
    from transformers import Qwen2Tokenizer

    return pv.VideoXLProcessor(Qwen2Tokenizer.from_pretrained(REPO_ROOT), max_url_bytes=CAP, url_timeout=2.0,
                               num_frames=4)


def video_error(processor, url: str) -> tuple[str, float]:
    start = time.monotonic()
    with pytest.raises(ValueError) as caught:
        processor(text="<video>", videos=url)
    return str(caught.value), time.monotonic() - start


def test_a_url_is_fetched_and_decoded_as_its_file_is(processor, server, clip):
    fetched = processor(text="<video>", videos=f"{server}/clip.ts", return_tensors="pt")
    local = processor(text="<video>", videos=str(clip), return_tensors="pt")
    assert np.array_equal(fetched["pixel_values_videos"], local["pixel_values_videos"])
    redirected = processor(text="<video>", videos=f"{server}/to-clip", return_tensors="pt")
    assert np.array_equal(redirected["pixel_values_videos"], local["pixel_values_videos"])


def test_an_endless_body_stops_at_the_size_cap(processor, server):
    message, seconds = video_error(processor, f"{server}/endless")
    assert message == (f"{server}/endless sent more than max_url_bytes={CAP} bytes; raise max_url_bytes or download "
                       "the file")
    assert seconds < 2.0


def test_a_declared_length_over_the_cap_is_refused_before_reading(processor, server):
    message, _ = video_error(processor, f"{server}/huge")
    assert message == (f"{server}/huge is 1000000000000 bytes, more than max_url_bytes={CAP}; raise max_url_bytes or "
                       "download the file")


@pytest.mark.parametrize("path", ["/drip", "/drip-headers"])
def test_a_server_that_drips_one_byte_a_second_ends_at_the_deadline(processor, server, path):
    message, seconds = video_error(processor, f"{server}{path}")
    assert message.startswith(f"cannot fetch {server}{path} within 2 s: the time was up after ")
    assert 1.9 < seconds < 4.0  # the whole fetch, not one read
    with pytest.raises(ValueError, match=rf"^cannot fetch {server}/drip within 2 s: the time was up"):
        processor(text="<image>", images=f"{server}/drip")


def test_redirects_are_followed_only_to_http(processor, server):
    message, _ = video_error(processor, f"{server}/to-ftp")
    assert message == (f"cannot fetch {server}/to-ftp: it redirects to ftp://127.0.0.1/clip.ts: only redirects to "
                       "http(s) are followed")
    message, _ = video_error(processor, f"{server}/to-file")
    assert message.startswith(f"cannot fetch {server}/to-file within 2 s: HTTP Error 302: ")  # urllib refuses file:


@pytest.mark.parametrize("source", ["ftp://127.0.0.1/clip.ts", "concat:a.ts|b.ts", "rtsp://127.0.0.1/live"])
def test_other_schemes_and_ffmpeg_protocols_are_refused(processor, source):
    scheme = source.split(":")[0]
    message, _ = video_error(processor, source)
    assert message == (f"video: unsupported URL scheme {scheme!r} in {source}: only http(s) URLs, file:// URLs and "
                       "paths are read")
    with pytest.raises(ValueError, match=rf"^image 0: unsupported URL scheme {scheme!r}"):
        processor(text="<image>", images=source)


def test_the_limits_are_checked_when_the_processor_is_built(processor):
    tokenizer = processor.tokenizer
    with pytest.raises(ValueError, match=r"^url_timeout must be a finite number of seconds > 0, got 0$"):
        pv.VideoXLProcessor(tokenizer, url_timeout=0)
    with pytest.raises(ValueError, match=r"^max_url_bytes must be an integer >= 1, got -1$"):
        pv.VideoXLProcessor(tokenizer, max_url_bytes=-1)


# ---- LiveVideo.follow / read_live_frames --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo():
    return load(BUNDLED_MODEL)


def test_read_live_frames_reads_a_stream_url_as_its_file(server, clip):
    fetched = list(session.read_live_frames(f"{server}/clip.ts", fps=5.0))
    local = list(session.read_live_frames(str(clip), fps=5.0))
    assert [t for t, _ in fetched] == [t for t, _ in local] and len(local) >= 10
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(fetched, local))
    assert len(decode_all(clip)[0]) == 20


def test_read_live_frames_has_the_deadline_and_the_cap(server):
    policy = pv.UrlPolicy(timeout=1.5, max_bytes=CAP)
    start = time.monotonic()
    with pytest.raises(ValueError, match=rf"^cannot fetch {server}/drip within 1\.5 s: the time was up"):
        list(session.read_live_frames(f"{server}/drip", url_policy=policy))
    assert time.monotonic() - start < 4.0
    with pytest.raises(ValueError, match=rf"^{server}/endless sent more than max_url_bytes={CAP} bytes"):
        list(session.read_live_frames(f"{server}/endless", url_policy=policy))


def test_follow_applies_the_processors_policy(demo, server, clip):
    model, processor = demo
    expected = len(list(session.read_live_frames(str(clip), fps=5.0)))
    live = model.live(processor)
    live.follow(f"{server}/clip.ts", fps=5.0)
    assert live.frames == expected
    closed = pv.VideoXLProcessor(processor.tokenizer, image_processor=processor.image_processor,
                                 chat_template=processor.chat_template, allow_remote_urls=False)
    live = model.live(closed)
    Server.requests.clear()
    with pytest.raises(ValueError, match=rf"^remote URL refused: {server}/clip\.ts \(this processor has "
                                         r"allow_remote_urls=False"):
        live.follow(f"{server}/clip.ts")
    assert Server.requests == []  # refused before any connection
    for source in (f"concat:{clip}|{clip}", "ftp://127.0.0.1/clip.ts"):
        with pytest.raises(ValueError, match=r"^live video: unsupported URL scheme '(concat|ftp)'"):
            live.follow(source)
    live.follow(f"file://{clip}", fps=5.0)
    assert live.frames == expected
