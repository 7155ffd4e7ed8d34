"""handler.py, the Inference Endpoints custom handler: every payload form answers as `model.chat` does, a video sent
again is answered from its kept memory, and every bad payload gets one error naming its field."""

import base64
import functools
import http.server
import io
import threading

import pytest
from PIL import Image

from demo.run import BUNDLED_MODEL, needle_video
from handler import EndpointHandler

FRAMES = 32
PARAMETERS = {"num_frames": FRAMES, "max_new_tokens": 16}


@pytest.fixture(scope="module")
def handler():
    return EndpointHandler(str(BUNDLED_MODEL))


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path, sample = needle_video(3, FRAMES, tmp_path_factory.mktemp("video"), "colour")
    return path, sample.question


@pytest.fixture(scope="module")
def url_of(tmp_path_factory, video):
    """http://127.0.0.1 URLs of files served from the video's folder."""
    folder = video[0].parent
    serve = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), serve)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield lambda name: f"http://127.0.0.1:{server.server_address[1]}/{name}"
    server.shutdown()


@pytest.fixture
def frames_encoded(handler):
    """Frames the vision tower runs on during a test."""
    count = [0]
    hook = handler.model.model.vision_tower.register_forward_hook(lambda m, args, out: count.__setitem__(
        0, count[0] + args[0].shape[0]))
    yield count
    hook.remove()


def reference(handler, kind, source, question, **options):
    """model.chat on a fresh memory: the answer every payload form must give."""
    content = ([{"type": kind, kind: source}] if kind else []) + [{"type": "text", "text": question}]
    answer, _ = handler.model.chat(handler.processor, [{"role": "user", "content": content}], **options)
    return answer


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_each_payload_form_answers_as_model_chat(handler, video, url_of):
    path, question = video
    data = path.read_bytes()
    expected = reference(handler, "video", str(path), question, num_frames=FRAMES, max_new_tokens=16)
    forms = {
        "chat, data URI": [{"role": "user", "content": [
            {"type": "video", "video": f"data:video/mp4;base64,{b64(data)}"}, {"type": "text", "text": question}]}],
        "chat, video_url": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": url_of(path.name)}}, {"type": "text", "text": question}]}],
        "chat, url key": [{"role": "user", "content": [
            {"type": "video", "url": url_of(path.name)}, {"type": "text", "text": question}]}],
        "video and text": {"video": b64(data), "text": question},
    }
    answers = {name: handler({"inputs": inputs, "parameters": PARAMETERS}) for name, inputs in forms.items()}
    assert answers == {name: [{"generated_text": expected}] for name in forms}

    image = png_bytes()
    image_answer = reference(handler, "image", Image.open(io.BytesIO(image)), "What colour is it?", max_new_tokens=16)
    assert handler({"inputs": {"image": b64(image), "text": "What colour is it?"},
                    "parameters": {"max_new_tokens": 16}}) == [{"generated_text": image_answer}]
    text_answer = reference(handler, None, None, "What is a video?", max_new_tokens=16)
    assert handler({"inputs": "What is a video?", "parameters": {"max_new_tokens": 16}}) == [
        {"generated_text": text_answer}]


def test_a_video_sent_again_is_answered_from_its_kept_memory(handler, video, frames_encoded):
    path, question = video
    data = b64(path.read_bytes())
    other = "Where in the frame did the object appear?\nA. top left\nB. top right\nC. bottom left\nD. bottom right"
    ratio = {"compression_ratio": 8}
    expected = [[{"generated_text": reference(handler, "video", str(path), q, num_frames=FRAMES, max_new_tokens=16,
                                              **ratio)}] for q in (question, other)]
    handler.memories.clear()
    frames_encoded[0] = 0
    first = handler({"inputs": {"video": data, "text": question}, "parameters": {**PARAMETERS, **ratio}})
    assert frames_encoded[0] == FRAMES
    again = handler({"inputs": {"video": data, "text": other}, "parameters": {**PARAMETERS, **ratio}})
    assert frames_encoded[0] == FRAMES  # the vision tower did not run again
    assert [first, again] == expected
    # Other sampling is another memory.
    handler({"inputs": {"video": data, "text": other}, "parameters": {**PARAMETERS, "num_frames": 16}})
    assert frames_encoded[0] == FRAMES + 16


def test_memories_past_the_budget_are_not_kept(handler, video, frames_encoded, monkeypatch):
    path, question = video
    monkeypatch.setattr(handler, "memory_budget", 1024)  # bytes: less than one video's memory
    handler.memories.clear()
    for _ in range(2):
        handler({"inputs": {"video": b64(path.read_bytes()), "text": question}, "parameters": PARAMETERS})
    assert frames_encoded[0] == 2 * FRAMES and not handler.memories


BAD_PAYLOADS = [
    ("not a dict", "payload"),
    ({"parameters": {}}, "payload"),
    ({"inputs": 3}, "inputs:"),
    ({"inputs": []}, "inputs:"),
    ({"inputs": {"video": "AAAA", "question": "?"}}, "inputs.question"),
    ({"inputs": {"video": "AAAA"}}, "inputs.text"),
    ({"inputs": {"video": "not base64 !", "text": "?"}}, "inputs.video"),
    ({"inputs": {"video": "/etc/passwd", "text": "?"}}, "inputs.video"),
    ({"inputs": [{"role": "robot", "content": "hi"}]}, "inputs[0]"),
    ({"inputs": [{"role": "user", "content": 5}]}, "inputs[0].content"),
    ({"inputs": [{"role": "user", "content": [{"type": "audio", "audio": "x"}]}]}, "inputs[0].content[0].type"),
    ({"inputs": [{"role": "user", "content": [{"type": "video_url", "video_url": "x"}]}]},
     "inputs[0].content[0].video_url.url"),
    ({"inputs": [{"role": "user", "content": [{"type": "image", "url": 7}]}]}, "inputs[0].content[0].url"),
    ({"inputs": "hi", "parameters": []}, "parameters:"),
    ({"inputs": "hi", "parameters": {"max_tokens": 5}}, "parameters.max_tokens"),
    ({"inputs": "hi", "parameters": {"max_new_tokens": "5"}}, "parameters.max_new_tokens"),
    ({"inputs": "hi", "parameters": {"num_frames": 0}}, "parameters.num_frames"),
    ({"inputs": "hi", "parameters": {"do_sample": 1}}, "parameters.do_sample"),
    ({"inputs": "hi", "parameters": {"compression_ratio": 5}}, "parameters.compression_ratio"),
]


@pytest.mark.parametrize("payload, field", BAD_PAYLOADS, ids=[f for _, f in BAD_PAYLOADS])
def test_a_bad_payload_gets_an_error_naming_its_field(handler, payload, field):
    with pytest.raises(ValueError, match=r"^" + field.replace("[", r"\[").replace("]", r"\]").replace(".", r"\.")):
        handler(payload)


def test_an_undecodable_video_is_named(handler):
    with pytest.raises(ValueError, match="video"):
        handler({"inputs": {"video": b64(b"not a video at all" * 50), "text": "?"}, "parameters": PARAMETERS})


def test_urls_follow_the_processors_policy(handler, video, url_of, monkeypatch):
    monkeypatch.setattr(handler.processor, "allow_remote_urls", False)
    with pytest.raises(ValueError, match=r"^inputs\.video: remote URL refused"):
        handler({"inputs": {"video": url_of(video[0].name), "text": "?"}})
    monkeypatch.setattr(handler.processor, "allow_remote_urls", True)
    with pytest.raises(ValueError, match=r"^inputs\.video: cannot fetch .*missing\.mp4"):
        handler({"inputs": {"video": url_of("missing.mp4"), "text": "?"}})
