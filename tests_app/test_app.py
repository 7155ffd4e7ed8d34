"""app.py in a real browser: Debian's headless Chromium driven by Playwright (`make test-app` installs both).

The app runs as a user starts it (`python app.py`, port from GRADIO_SERVER_PORT); the answers in the page are
compared with `model.chat`'s, and the memory panel (server-side counts: questions that encoded the video, frames the
vision tower ran on) shows the second question was answered from the kept memory.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from playwright.sync_api import expect, sync_playwright

from demo.qa import load
from demo.run import BUNDLED_MODEL, needle_video
from scripts.local_import import REPO_ROOT

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
ARTIFACTS = REPO_ROOT / "out" / "test_app"
FRAMES = 128
BUDGET_MB = 1.0  # two 128-frame memories of the tiny model fit (0.36 MB each); 1,000 frames do not


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("app") / "app.log"
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1",
           "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "app.py", "--memory-budget-mb", str(BUDGET_MB)], cwd=REPO_ROOT,
                                   env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 600  # importing gradio alone takes a minute on a busy 2-core machine
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"the app did not start:\n{log.read_text()[-3000:]}")
            time.sleep(1)
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def video_and_questions(tmp_path_factory):
    path, sample = needle_video(11, FRAMES, tmp_path_factory.mktemp("video"), "colour")
    needle = sample.needles[0]
    second = (f"Where in the frame did the {needle.describe()} appear?\nA. top left\nB. top right\nC. bottom left\n"
              "D. bottom right\nAnswer with the option's text.")
    return path, [sample.question, second]


@pytest.fixture(scope="module")
def expected(video_and_questions):
    """model.chat's answers, each question on its own fresh memory."""
    model, processor = load(BUNDLED_MODEL)
    path, questions = video_and_questions
    answers = []
    for question in questions:
        content = [{"type": "video", "path": str(path)}, {"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        answer, _ = model.chat(processor, messages, num_frames=FRAMES, compression_ratio=model.config.beacon_ratio,
                               max_new_tokens=64)
        answers.append(answer)
    return answers


def open_page(browser, url):
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    page.set_default_timeout(300_000)
    page.goto(url)
    # Generous: on a busy 2-core machine the first page load takes long.
    page.wait_for_function("() => (document.querySelector('#memory textarea') || {}).value", timeout=300_000)
    return page


def memory_panel(page) -> dict:
    return json.loads(page.locator("#memory textarea").input_value())


def upload(page, path) -> None:
    page.locator("#video input[type=file]").set_input_files(str(path))
    page.wait_for_selector("#video video", timeout=300_000)
    page.locator("#frames input").fill(str(FRAMES))


def ask(page, question: str) -> str:
    """Ask in the page; the last answer bubble once the memory panel counts the question."""
    asked = len(memory_panel(page)["questions"])
    page.locator("#question textarea").fill(question)
    page.locator("#ask").click()
    page.wait_for_function(
        f"() => (JSON.parse(document.querySelector('#memory textarea').value).questions || []).length > {asked}",
        timeout=600_000,
    )
    return page.locator("#chat .message.bot").last.inner_text().strip()


def test_two_questions_in_the_browser_reuse_one_memory_and_sessions_keep_their_own(
    server, browser, video_and_questions, expected
):
    path, questions = video_and_questions
    page = open_page(browser, server)
    upload(page, path)

    first = ask(page, questions[0])
    after_first = memory_panel(page)
    second = ask(page, questions[1])
    after_second = memory_panel(page)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "two_questions.png"), full_page=True)

    assert [first, second] == expected
    # The first question decoded and encoded every frame; the second ran the vision tower on none.
    assert (after_first["encodes"], after_first["frames_encoded"]) == (1, FRAMES)
    assert (after_second["encodes"], after_second["frames_encoded"]) == (1, FRAMES)
    asked = after_second["questions"]
    assert [q["reused_memory"] for q in asked] == [False, True]
    assert asked[1]["seconds"] < asked[0]["seconds"]
    assert asked[1]["first_token_seconds"] < asked[0]["first_token_seconds"]
    assert after_second["frames"] == FRAMES and after_second["kept_positions"] > 0

    # Another browser (context) starts with no memory of its own, then builds one; the first keeps its own.
    other = open_page(browser, server)
    fresh = memory_panel(other)
    assert (fresh["encodes"], fresh["questions"], fresh["memory_mb"]) == (0, [], 0)
    upload(other, path)
    assert ask(other, questions[1]) == expected[1]
    theirs = memory_panel(other)
    assert (theirs["encodes"], theirs["frames_encoded"]) == (1, FRAMES)
    assert theirs["server"]["sessions"] >= 2
    assert theirs["server"]["total_mb"] == pytest.approx(after_second["memory_mb"] + theirs["memory_mb"], abs=2e-3)
    assert ask(page, questions[0]) == expected[0]
    assert memory_panel(page)["encodes"] == 1  # the first session's memory was still there
    other.screenshot(path=str(ARTIFACTS / "second_session.png"), full_page=True)


def test_bad_input_shows_a_message_and_the_app_keeps_serving(server, browser, video_and_questions, expected, tmp_path):
    path, questions = video_and_questions
    page = open_page(browser, server)

    page.locator("#question textarea").fill(questions[0])
    page.locator("#ask").click()
    expect(page.locator("#message")).to_contain_text("Upload a video or pick a synthetic one first.", timeout=300_000)

    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"this is not a video" * 100)
    page.locator("#video input[type=file]").set_input_files(str(broken))
    page.wait_for_timeout(1000)
    page.locator("#question textarea").fill(questions[0])
    page.locator("#ask").click()
    expect(page.locator("#message")).to_contain_text("broken.mp4", timeout=300_000)

    page.locator("#new-video").click()
    upload(page, path)
    page.locator("#frames input").fill("1000")
    page.locator("#question textarea").fill(questions[0])
    page.locator("#ask").click()
    expect(page.locator("#message")).to_contain_text("over this server's budget of 1 MB", timeout=300_000)
    page.screenshot(path=str(ARTIFACTS / "bad_input.png"), full_page=True)

    page.locator("#frames input").fill(str(FRAMES))
    assert ask(page, questions[0]) == expected[0]
    expect(page.locator("#message")).to_have_text("")


def test_the_live_tab_answers_while_the_video_plays(server, browser, video_and_questions):
    path, questions = video_and_questions
    page = open_page(browser, server)
    page.get_by_role("tab", name="Live").click()
    page.locator("#live-video input[type=file]").set_input_files(str(path))
    page.wait_for_selector("#live-video video", timeout=300_000)
    page.locator("#pace input").fill("16")  # 16 s of video a second: the 128 s video plays in 8 s
    page.locator("#play").click()
    expect(page.locator("#live-status textarea")).to_have_value(re.compile(r"Playing: [1-9]\d* frames fed"),
                                                                timeout=300_000)
    page.locator("#live-question textarea").fill(questions[0])
    page.locator("#live-ask").click()
    answer = page.locator("#live-chat .message.bot").last
    expect(answer).to_contain_text(re.compile(r"after [1-9]\d* frames"), timeout=300_000)
    expect(page.locator("#live-status textarea")).to_have_value(re.compile(rf"Playing: {FRAMES} frames fed"),
                                                                timeout=300_000)
    page.screenshot(path=str(ARTIFACTS / "live.png"), full_page=True)


# ---- the store of session memories, without a browser ----------------------------------------------------------


@pytest.fixture(scope="module")
def qa_on(tmp_path_factory):
    """A VideoQA over the bundled model with a store of the given budget and idle time."""
    from app import MemoryStore, VideoQA

    model, processor = load(BUNDLED_MODEL)
    return lambda budget_mb, idle_seconds: VideoQA(model, processor, MemoryStore(budget_mb, idle_seconds))


def encode(qa, session: str, video, question: str) -> str:
    memory = qa.store.get(session)
    *_, answer = qa.answer(memory, str(video), question, {"num_frames": 16}, qa.model.config.beacon_ratio)
    qa.store.fit(session)
    return answer


def test_memories_past_the_budget_go_least_recently_used_first(qa_on, video_and_questions):
    path, questions = video_and_questions
    probe = qa_on(1e6, 1e6)
    encode(probe, "probe", path, questions[0])
    one = probe.store.total_mb()
    qa = qa_on(2.5 * one, 1e6)  # room for two memories
    for session in ("a", "b"):
        encode(qa, session, path, questions[0])
    qa.store.get("a")  # "a" used again: "b" is now the least recently used
    encode(qa, "c", path, questions[0])
    assert list(qa.store.memories) == ["a", "c"]
    assert qa.store.total_mb() == pytest.approx(2 * one)
    assert qa.store.get("b").cache is None  # "b" starts over
    frames = qa.frames_encoded
    encode(qa, "a", path, questions[1])
    assert qa.frames_encoded == frames  # "a" kept its memory


def test_idle_memories_are_freed_and_their_copies_deleted(qa_on, video_and_questions):
    path, questions = video_and_questions
    qa = qa_on(1e6, idle_seconds=0.5)
    encode(qa, "a", path, questions[0])
    copy = qa.store.memories["a"].copy
    assert copy.is_file()
    time.sleep(1.0)
    qa.store.get("b")
    assert list(qa.store.memories) == ["b"] and not copy.exists()
