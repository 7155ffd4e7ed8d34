"""Ask Video-XL about a long video in the browser: the video is encoded once into a compressed memory, and every
later question is answered from that memory.

    python app.py [--model DIR]          # default: the bundled tiny model (demo/model)

Gradio serves on 127.0.0.1:7860; `GRADIO_SERVER_NAME` / `GRADIO_SERVER_PORT` move it, as for any Gradio app.

Each browser session has its own memory (`MemoryStore`): freed when the page closes, after `--idle-minutes` without
use, or, least recently used first, when the memories together pass `--memory-budget-mb`.
"""

from __future__ import annotations

import argparse
import contextvars
import json
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import torch
from transformers import TextIteratorStreamer

from demo.qa import load
from demo.run import QUESTIONS, needle_video
from scripts.local_import import modeling, session

BUNDLED_MODEL = Path(__file__).resolve().parent / "demo" / "model"
LIVE_FRAMES_PER_SECOND = 1.0


# --------------------------------------------------------------------------------------------------------------------
# One browser session's memory, and the store that bounds them all
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Memory:
    """The compressed memory of one video for one browser session, and what it has been asked."""

    video: str | None = None  # the upload's path (Gradio names it by a hash of its content)
    copy: Path | None = None  # this session's own copy, which model.chat reads and recognises by path and mtime
    sampling: dict[str, Any] = field(default_factory=dict)
    ratio: int | None = None
    cache: Any = None  # the BeaconCache `model.chat` returned
    frames: int = 0
    encodes: int = 0  # questions that decoded and encoded the video
    frames_encoded: int = 0  # frames the vision tower ran on, counted by a hook on it
    questions: list[dict[str, Any]] = field(default_factory=list)
    live: Any = None  # a LiveVideo while the live tab plays
    live_stop: threading.Event | None = None
    live_error: str | None = None
    last_used: float = field(default_factory=time.monotonic)

    def holds(self, video: str, sampling: dict[str, Any], ratio: int) -> bool:
        return self.cache is not None and (self.video, self.sampling, self.ratio) == (video, sampling, ratio)

    def keep_copy(self, video: str) -> Path:
        """Copy the upload for this session: another session uploading the same file rewrites Gradio's copy, and a
        changed modification time would make `model.chat` refuse this memory."""
        folder = Path(tempfile.mkdtemp(prefix="videoxl-app-"))
        self.copy = Path(shutil.copy(video, folder / Path(video).name))
        return self.copy

    def forget_video(self) -> None:
        if self.copy is not None:
            shutil.rmtree(self.copy.parent, ignore_errors=True)
            self.copy = None
        self.video, self.sampling, self.ratio, self.cache, self.frames, self.questions = None, {}, None, None, 0, []

    def stop_live(self) -> None:
        if self.live_stop is not None:
            self.live_stop.set()
        self.live, self.live_stop, self.live_error = None, None, None

    def close(self) -> None:
        self.stop_live()
        self.forget_video()

    def megabytes(self) -> float:
        caches = [self.cache] + ([self.live.cache] if self.live is not None else [])
        return sum(cache.memory_bytes() for cache in caches if cache is not None) / 2**20

    def summary(self) -> dict[str, Any]:
        return {
            "video": Path(self.video).name if self.video else None,
            "frames": self.frames,
            "compression_ratio": self.ratio,
            "kept_positions": self.cache.get_seq_length() if self.cache is not None else 0,
            "memory_mb": round(self.megabytes(), 3),
            "encodes": self.encodes,
            "frames_encoded": self.frames_encoded,
            "questions": self.questions,
        }


class MemoryStore:
    """Memories by browser session: least recently used first out past `budget_mb`, and out after `idle_seconds`."""

    def __init__(self, budget_mb: float, idle_seconds: float) -> None:
        self.budget_mb, self.idle_seconds = budget_mb, idle_seconds
        self.memories: OrderedDict[str, Memory] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, session_id: str) -> Memory:
        """The session's memory (a new, empty one if it had none or it was freed), marked as just used."""
        with self.lock:
            self._free_idle()
            memory = self.memories.pop(session_id, None) or Memory()
            memory.last_used = time.monotonic()
            self.memories[session_id] = memory
            return memory

    def fit(self, session_id: str) -> None:
        """Free other sessions' memories, least recently used first, until all fit the budget."""
        with self.lock:
            for other in [key for key in self.memories if key != session_id]:
                if self.total_mb() <= self.budget_mb:
                    break
                self.memories.pop(other).close()

    def free(self, session_id: str) -> None:
        with self.lock:
            memory = self.memories.pop(session_id, None)
        if memory is not None:
            memory.close()

    def total_mb(self) -> float:
        return sum(memory.megabytes() for memory in self.memories.values())

    def _free_idle(self) -> None:
        now = time.monotonic()
        for key in [k for k, m in self.memories.items() if now - m.last_used > self.idle_seconds]:
            self.memories.pop(key).close()

    def summary(self) -> dict[str, Any]:
        return {"sessions": len(self.memories), "total_mb": round(self.total_mb(), 3), "budget_mb": self.budget_mb}


# --------------------------------------------------------------------------------------------------------------------
# The model side: questions, memory estimates, live video
# --------------------------------------------------------------------------------------------------------------------


class VideoQA:
    """The model and processor, shared by every session; one model call at a time."""

    def __init__(self, model, processor, store: MemoryStore, max_new_tokens: int = 64) -> None:
        self.model, self.processor, self.store = model, processor, store
        self.max_new_tokens = max_new_tokens
        self.lock = threading.Lock()
        self.frames_encoded = 0
        model.model.vision_tower.register_forward_hook(self._count_frames)

    def _count_frames(self, module, args, output) -> None:
        self.frames_encoded += int(args[0].shape[0])

    def ratios(self) -> list[int]:
        return modeling.allowed_ratios(self.model.config)

    def kept_bytes_per_frame(self, ratio: int) -> float:
        """Bytes a frame adds to the memory at `ratio`: its VSTs' keys and values in every layer."""
        text = self.model.config.text_config
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        row = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * self.model.dtype.itemsize
        return self.model.config.tokens_per_frame / ratio * row

    def check_request(self, video: str | None, question: str, sampling: dict[str, Any], ratio: int) -> None:
        """One clear message for what cannot be asked, before anything is decoded."""
        if not video:
            raise ValueError("Upload a video or pick a synthetic one first.")
        if not question or not question.strip():
            raise ValueError("Type a question.")
        if ratio not in self.ratios():
            raise ValueError(f"compression ratio {ratio} is not one of {self.ratios()}")
        frames = sampling.get("num_frames")
        if frames is not None:
            estimate = frames * self.kept_bytes_per_frame(ratio) / 2**20
            if estimate > self.store.budget_mb:
                raise ValueError(
                    f"{frames} frames at compression ratio {ratio} need about {estimate:.0f} MB of memory, over this "
                    f"server's budget of {self.store.budget_mb:g} MB: ask for fewer frames or a higher ratio."
                )

    def answer(
        self, memory: Memory, video: str, question: str, sampling: dict[str, Any], ratio: int
    ) -> Iterator[str]:
        """Stream the answer to `question` about `video` (the text so far, then the final answer); the first
        question encodes the video into `memory`, later ones reuse it."""
        if not memory.holds(video, sampling, ratio):
            memory.forget_video()
            memory.keep_copy(video)
        content = [{"type": "video", "path": str(memory.copy)}, {"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict[str, Any] = {}
        reused = memory.cache is not None

        def run() -> None:
            try:
                result["answer"], result["cache"] = self.model.chat(
                    self.processor, messages, cache=memory.cache, compression_ratio=ratio,
                    max_new_tokens=self.max_new_tokens, streamer=streamer, **sampling,
                )
            except BaseException as err:  # shown in the page; the streamer must still end
                result["error"] = err
                streamer.end()

        start = time.monotonic()
        with self.lock:
            frames_before = self.frames_encoded
            # The copied context carries Gradio's progress tracker into the thread: the library's tqdm bars
            # (decoding, then windows) become the page's progress bar.
            worker = threading.Thread(target=contextvars.copy_context().run, args=(run,), daemon=True)
            worker.start()
            text, first_token = "", None
            for piece in streamer:
                if piece and first_token is None:
                    first_token = time.monotonic() - start
                text += piece
                yield text
            worker.join()
            frames_run = self.frames_encoded - frames_before
        if "error" in result:
            memory.forget_video()
            raise result["error"]
        memory.video, memory.sampling, memory.ratio, memory.cache = video, sampling, ratio, result["cache"]
        memory.frames = memory.cache.record.media[0]["frames"]
        memory.encodes += frames_run > 0
        memory.frames_encoded += frames_run
        memory.questions.append({
            "question": question,
            "seconds": round(time.monotonic() - start, 3),
            "first_token_seconds": None if first_token is None else round(first_token, 3),
            "reused_memory": reused,
        })
        yield result["answer"]

    def start_live(self, memory: Memory, video: str, ratio: int, pace: float | None) -> None:
        """Play `video` as a stream into a new LiveVideo in a background thread."""
        memory.stop_live()
        live = self.model.live(self.processor, compression_ratio=ratio)
        stop = threading.Event()
        memory.live, memory.live_stop, memory.live_error = live, stop, None
        frames = session.read_live_frames(video, fps=LIVE_FRAMES_PER_SECOND, pace=pace)

        def play() -> None:
            try:
                for timestamp, frame in frames:
                    if stop.is_set():
                        return
                    with self.lock:
                        live.feed(frame, timestamp=timestamp)
            except Exception as err:  # noqa: BLE001 - shown in the live tab's status
                memory.live_error = f"{type(err).__name__}: {err}"

        threading.Thread(target=play, daemon=True).start()

    def ask_live(self, memory: Memory, question: str) -> str:
        with self.lock:
            return memory.live.ask(question, max_new_tokens=self.max_new_tokens)


# --------------------------------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------------------------------


def sampling_options(frames: float | None, fps: float | None) -> dict[str, Any]:
    """The processor's sampling options from the page: fps when given, else a frame count."""
    if fps:
        if fps <= 0:
            raise ValueError(f"fps must be positive, got {fps}")
        return {"fps": float(fps)}
    if not frames or frames < 1 or int(frames) != frames:
        raise ValueError(f"frames must be a positive whole number, got {frames}")
    return {"num_frames": int(frames)}


def build_app(qa: VideoQA, examples_dir: Path) -> gr.Blocks:
    """The Gradio page: a chat tab over an encoded video and a live tab."""
    store = qa.store
    ratios = qa.ratios()
    default_ratio = qa.model.config.beacon_ratio

    def panel(request: gr.Request) -> str:
        memory = store.get(request.session_hash)
        return json.dumps({**memory.summary(), "server": store.summary()}, indent=1)

    def synthetic(kind: str, seed: float, length: float):
        path, sample = needle_video(int(seed), int(length), examples_dir, kind)
        return str(path), sample.question, int(length)

    def ask(question, history, video, frames, fps, ratio, request: gr.Request, progress=gr.Progress(track_tqdm=True)):
        """Stream (chat, question box, memory panel, message); a request that fails leaves a message in the page."""
        history = list(history or [])
        try:
            sampling = sampling_options(frames, fps)
            ratio = int(ratio)
            qa.check_request(video, question, sampling, ratio)
            memory = store.get(request.session_hash)
            asked = history + [{"role": "user", "content": question}]
            if not memory.holds(video, sampling, ratio):
                progress(0, desc="Decoding and encoding the video")
            for text in qa.answer(memory, video, question, sampling, ratio):
                yield asked + [{"role": "assistant", "content": text}], "", panel(request), ""
            store.fit(request.session_hash)
            yield asked + [{"role": "assistant", "content": text}], "", panel(request), ""
        except Exception as err:  # noqa: BLE001 - any failure is the user's message; the app keeps serving
            yield history, question, panel(request), f"**Could not answer:** {err}"

    def free(request: gr.Request) -> None:
        store.free(request.session_hash)

    def new_video(request: gr.Request):
        memory = store.get(request.session_hash)
        memory.forget_video()
        return None, [], "", panel(request), ""

    def start_live(video, ratio, pace, request: gr.Request):
        if not video:
            raise gr.Error("Pick a video file to play as a stream.")
        memory = store.get(request.session_hash)
        qa.start_live(memory, video, int(ratio), float(pace) if pace else None)
        return live_status(request)

    def stop_live(request: gr.Request):
        store.get(request.session_hash).stop_live()
        return live_status(request)

    def live_status(request: gr.Request) -> str:
        memory = store.get(request.session_hash)
        if memory.live is None:
            return "Not playing."
        state = f"Error: {memory.live_error}" if memory.live_error else "Playing"
        return f"{state}: {memory.live.frames} frames fed, memory {memory.megabytes():.2f} MB"

    def ask_live(question, history, request: gr.Request):
        memory = store.get(request.session_hash)
        if memory.live is None:
            raise gr.Error("Start a live video first.")
        if not question or not question.strip():
            raise ValueError("Type a question.")
        seen = memory.live.frames
        answer = qa.ask_live(memory, question)
        return list(history or []) + [
            {"role": "user", "content": question},
            {"role": "assistant", "content": f"{answer}  \n_(after {seen} frames)_"},
        ], ""

    with gr.Blocks(title="Video-XL: ask a long video") as demo:
        gr.Markdown(
            "# Video-XL: ask a long video\n"
            "The first question decodes the video and compresses it into a memory; later questions are answered "
            "from that memory without encoding again. Each question is asked about the video alone."
        )
        with gr.Tab("Chat"):
            with gr.Row():
                with gr.Column(scale=1):
                    video = gr.Video(label="Video", sources=["upload"], elem_id="video")
                    with gr.Row():
                        kind = gr.Dropdown(list(QUESTIONS), value="colour", label="Synthetic question")
                        seed = gr.Number(7, label="Seed", precision=0)
                        length = gr.Number(128, label="Synthetic frames", precision=0)
                    make = gr.Button("Synthetic needle video", elem_id="synthetic")
                    with gr.Row():
                        frames = gr.Number(128, label="Frames", precision=0, elem_id="frames")
                        fps = gr.Number(None, label="or fps (0: use frames)", elem_id="fps")
                        ratio = gr.Dropdown(ratios, value=default_ratio, label="Compression ratio")
                    reset = gr.Button("New video", elem_id="new-video")
                    memory_panel = gr.Textbox(label="Memory", lines=14, interactive=False, elem_id="memory")
                with gr.Column(scale=2):
                    chat = gr.Chatbot(label="Chat", height=480, elem_id="chat")
                    message = gr.Markdown(elem_id="message")
                    question = gr.Textbox(label="Question", lines=3, elem_id="question")
                    send = gr.Button("Ask", variant="primary", elem_id="ask")
        with gr.Tab("Live"):
            with gr.Row():
                with gr.Column(scale=1):
                    live_video = gr.Video(label="Video played as a stream", sources=["upload"], elem_id="live-video")
                    pace = gr.Number(4.0, elem_id="pace",
                                     label="Seconds of video per second (0: as fast as it decodes)")
                    live_ratio = gr.Dropdown(ratios, value=default_ratio, label="Compression ratio")
                    with gr.Row():
                        play = gr.Button("Play", variant="primary", elem_id="play")
                        halt = gr.Button("Stop")
                    status = gr.Textbox(label="Stream", interactive=False, elem_id="live-status")
                with gr.Column(scale=2):
                    live_chat = gr.Chatbot(label="Questions while it plays", height=400, elem_id="live-chat")
                    live_question = gr.Textbox(label="Question", lines=2, elem_id="live-question")
                    live_send = gr.Button("Ask now", elem_id="live-ask")
            gr.Timer(1.0).tick(live_status, None, status, show_progress="hidden")

        make.click(synthetic, [kind, seed, length], [video, question, frames])
        ask_inputs = [question, chat, video, frames, fps, ratio]
        ask_outputs = [chat, question, memory_panel, message]
        send.click(ask, ask_inputs, ask_outputs)
        question.submit(ask, ask_inputs, ask_outputs)
        reset.click(new_video, None, [video, chat, question, memory_panel, message])
        video.change(panel, None, memory_panel)
        play.click(start_live, [live_video, live_ratio, pace], status)
        halt.click(stop_live, None, status)
        live_send.click(ask_live, [live_question, live_chat], [live_chat, live_question])
        demo.load(panel, None, memory_panel)
        demo.unload(free)
    return demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=BUNDLED_MODEL, help="a Video-XL model directory")
    parser.add_argument("--memory-budget-mb", type=float, default=4096, help="all sessions' memories together")
    parser.add_argument("--idle-minutes", type=float, default=30, help="free a session's memory after this idle")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    model, processor = load(args.model, dtype=torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    if torch.cuda.is_available():
        model.to("cuda")
    store = MemoryStore(args.memory_budget_mb, args.idle_minutes * 60)
    qa = VideoQA(model, processor, store, args.max_new_tokens)
    with tempfile.TemporaryDirectory() as examples:
        demo = build_app(qa, Path(examples))
        demo.queue().launch(allowed_paths=[examples])


if __name__ == "__main__":
    main()
