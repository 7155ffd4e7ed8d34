"""Video-XL as an lmms-eval model: every question about a video is answered from one encoded memory.

The model and processor come from `AutoModelForCausalLM` / `AutoProcessor` with `trust_remote_code=True` and are
used through their public surface only: `model.chat` (which takes and returns the cache holding the compressed
video), the cache's `align` / `checkpoint` / `rewind` / `restore`, and the processor's chat template and tokenizer.

Requests are ordered so that those about the same video (same file, same frame sampling) are adjacent; the memories
of recent videos are kept within `memory_budget_gb` (least recently used out), and results go back in lmms-eval's
order. A video that is missing or cannot be decoded is logged as one error naming the doc and the file, its answer is
recorded as empty (scored wrong) and the run goes on, as lmms-eval's video models do.
"""

import json
from collections.abc import Callable, Hashable
from typing import Any

import torch
from accelerate import Accelerator
from loguru import logger as eval_logger
from PIL import Image
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoProcessor

from lmms_eval import utils
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms

from .memories import VideoMemories


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "auto": "auto"}
# What a failed doc gets in place of an answer (its error is in the log); scored wrong by every task.
FAILED_ANSWER = ""


class VideoUnreadable(Exception):
    """A doc's video is missing or cannot be decoded."""


class VideoXL(lmms):
    """`--model videoxl --model_args pretrained=PATH,num_frames=128,compression_ratio=8,...`

    Args:
        pretrained: a converted Video-XL checkpoint (local directory or hub id) with its remote code.
        num_frames / fps / max_frames: the processor's frame sampling (num_frames uniformly; or fps, at most
            max_frames). None leaves the processor's default (128 frames).
        compression_ratio: visual tokens per VST (2, 4, 8, 16); None uses the checkpoint's generation config.
        dtype: bfloat16 (default), float16, float32 or auto.
        device: where the model runs in one process (default cuda if available, else cpu); under `accelerate
            launch` each process takes its own device.
        device_map: passed to `from_pretrained` in one process (e.g. auto to spread a model over GPUs).
        attn_implementation: passed to `from_pretrained`.
        batch_size: requests taken together from lmms-eval's ordered list (those about one video share a memory).
        reuse_memory: answer every question about a video from one encoded memory (False: encode per question).
        memory_budget_gb: the most the kept memories of recent videos may take.
        system_prompt: an optional system turn before every question.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        num_frames: int | None = None,
        fps: float | None = None,
        max_frames: int | None = None,
        compression_ratio: int | None = None,
        dtype: str = "bfloat16",
        device: str | None = None,
        device_map: str | None = None,
        attn_implementation: str | None = None,
        batch_size: int = 1,
        reuse_memory: bool = True,
        memory_budget_gb: float = 16.0,
        system_prompt: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(
                f"videoxl: unknown model_args {sorted(kwargs)}; expected pretrained, num_frames, fps, max_frames, "
                "compression_ratio, dtype, device, device_map, attn_implementation, batch_size, reuse_memory, "
                "memory_budget_gb, system_prompt"
            )
        if dtype not in DTYPES:
            raise ValueError(f"videoxl: dtype={dtype!r}; expected one of {sorted(DTYPES)}")
        if int(batch_size) < 1:
            raise ValueError(f"videoxl: batch_size={batch_size}; expected a positive integer")
        self.accelerator = Accelerator()
        if self.accelerator.num_processes > 1:  # one model per process, each on its own device
            self._device = self.accelerator.device
            device_map = "cpu" if self._device.type == "cpu" else str(self._device)
        else:
            self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
            device_map = device_map or str(self._device)
        self._rank = self.accelerator.process_index
        self._world_size = self.accelerator.num_processes

        load_kwargs = {"dtype": DTYPES[dtype], "device_map": device_map}
        if attn_implementation is not None:
            load_kwargs["attn_implementation"] = attn_implementation
        self._model = AutoModelForCausalLM.from_pretrained(pretrained, trust_remote_code=True, **load_kwargs).eval()
        self.processor = AutoProcessor.from_pretrained(pretrained, trust_remote_code=True)
        self.sampling = {
            name: value for name, value in (("num_frames", num_frames), ("fps", fps), ("max_frames", max_frames))
            if value is not None
        }
        self.compression_ratio = None if compression_ratio is None else int(compression_ratio)
        self.batch_size_per_gpu = int(batch_size)
        self.reuse_memory = bool(reuse_memory)
        self.memories = VideoMemories(int(float(memory_budget_gb) * 2**30))
        self.system_prompt = system_prompt
        self.videos_encoded = 0  # memories built (each a video decoded and run through the model)
        self.failed_docs: list[tuple[str, Any, str]] = []  # (task, doc_id, error) of docs whose video failed

    # ---- the properties lmms-eval's models expose ----------------------------------------------------------------

    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    def clean(self) -> None:
        """What lmms-eval calls after a run: the kept memories go with the model."""
        self.memories.clear()
        super().clean()

    # ---- requests --------------------------------------------------------------------------------------------------

    def generate_until(self, requests: list[Instance]) -> list[str]:
        def answer(args: tuple) -> str:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = args
            messages, key, path = self._messages(doc_to_visual, doc_id, task, split, context)
            generate_kwargs, until = generation_options(gen_kwargs)
            try:
                text = self._chat(messages, key, generate_kwargs, path)
            except VideoUnreadable as err:
                return self._failed(task, doc_id, err)
            for stop in until:
                text = text.split(stop)[0] if stop else text
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            return text

        return self._in_video_order(requests, answer, "generate_until")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        def answer_rounds(args: tuple) -> list[str]:
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = args
            messages, key, path = self._messages(doc_to_visual, doc_id, task, split, context)
            generate_kwargs, _ = generation_options(gen_kwargs)
            doc = self.task_dict[task][split][doc_id]
            shown = {visual_identity(v) for v in doc_to_visual(doc) or []}
            try:
                answer, cache = self._chat_with_cache(messages, key, generate_kwargs, path)
                rounds, info = [answer], None
                while True:
                    visuals, context, done, _, info = doc_to_text(
                        doc, previous_output=list(rounds), round_idx=len(rounds), previous_round_info=info
                    )
                    if done:
                        break
                    new = [v for v in visuals or [] if visual_identity(v) not in shown]
                    shown.update(visual_identity(v) for v in new)
                    if new and key is not None:  # the cache now holds more than the video: not its memory any more
                        self.memories.drop(key)
                        key = None
                    messages += [
                        {"role": "assistant", "content": [{"type": "text", "text": rounds[-1]}]},
                        {"role": "user", "content": [*visual_items(new), {"type": "text", "text": context}]},
                    ]
                    answer, cache = self.model.chat(self.processor, messages, cache=cache, **self._chat_kwargs(
                        generate_kwargs))
                    rounds.append(answer)
            except VideoUnreadable as err:
                return [self._failed(task, doc_id, err)]
            if key is not None and self.reuse_memory:
                self.memories.refresh(key)
            self.cache_hook.add_partial("generate_until_multi_round", (args[0], gen_kwargs), rounds)
            return rounds

        return self._in_video_order(requests, answer_rounds, "generate_until_multi_round")

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """(log-probability of the continuation, whether greedy decoding gives it) per request, each wrapped in a
        `GenerationResult`: lmms-eval 0.7.3's evaluator turns any other response that is not a string into its
        `str()` (`unwrap_generation_output`), which multiple_choice tasks cannot unpack; the wrapper is passed
        through as it is."""

        def score(args: tuple) -> tuple[float, bool]:
            context, doc_to_target, doc_to_visual, doc_id, task, split = args
            continuation = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(
                self.task_dict[task][split][doc_id])
            messages, key, path = self._messages(doc_to_visual, doc_id, task, split, context)
            try:
                if key is None or not self.reuse_memory:
                    return self._score_fresh(messages, continuation, path)
                memory = self._memory(messages, key, path)
            except VideoUnreadable as err:
                self._failed(task, doc_id, err)
                return float("-inf"), False
            result = self._score_on_memory(memory, messages, continuation)
            self.memories.refresh(key)
            self.cache_hook.add_partial("loglikelihood", (context, continuation), result)
            return result

        return [GenerationResult(text=result) for result in self._in_video_order(requests, score, "loglikelihood")]

    # ---- order: the requests about one video adjacent, results in lmms-eval's order -----------------------------

    def _in_video_order(self, requests: list[Instance], run: Callable[[tuple], Any], what: str) -> list[Any]:
        """`run(args)` for every request, those about the same video (and generation options) one after another;
        the results in the order of `requests`."""
        keys = {id(request.args): self._video_sort_key(request.args) for request in requests}
        # Generation requests are grouped by their generation options (as lmms-eval's models do), likelihoods not.
        collator = utils.Collator(
            [request.args for request in requests],
            sort_fn=lambda args: keys[id(args)],
            grouping=what != "loglikelihood",
        )
        results = []
        progress = tqdm(total=len(requests), disable=(self.rank != 0), desc=f"videoxl {what}")
        for batch in collator.get_batched(n=self.batch_size, batch_fn=None):
            for args in batch:
                results.append(run(args))
                progress.update(1)
        progress.close()
        return collator.get_original(results)

    def _video_sort_key(self, args: tuple) -> tuple[str, int]:
        """(the video files a request is about, its doc id): sorting on it puts each video's questions together
        in doc order. The visuals' paths are read without decoding anything."""
        doc_to_visual, doc_id, task, split = args[2], args[-3], args[-2], args[-1]
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        return "|".join(v if isinstance(v, str) else f"<{type(v).__name__}>" for v in visuals), int(doc_id)

    # ---- prompts, memories, answers ------------------------------------------------------------------------------

    def _messages(
        self, doc_to_visual: Callable, doc_id: Any, task: str, split: str, context: str
    ) -> tuple[list[dict], Hashable | None, str]:
        """The chat messages of one request, the key of its video memory (None: not one reusable video) and a
        description of its visuals for errors."""
        visuals = list(doc_to_visual(self.task_dict[task][split][doc_id]) or [])
        text = context.replace("<image>", "").replace("<video>", "").strip()
        content = [*visual_items(visuals), {"type": "text", "text": text}]
        messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + [
            {"role": "user", "content": content}
        ]
        videos = [v for v in visuals if isinstance(v, str)]
        key = None
        if len(videos) == 1 and len(visuals) == 1:
            key = (videos[0], json.dumps(self.sampling, sort_keys=True), self.compression_ratio)
        return messages, key, ", ".join(videos) or "(no video file)"

    def _chat_kwargs(self, generate_kwargs: dict) -> dict:
        return {**self.sampling, "compression_ratio": self.compression_ratio, **generate_kwargs}

    def _chat_with_cache(self, messages: list[dict], key: Hashable | None, generate_kwargs: dict, path: str):
        """(answer, cache) for the last user turn: from the video's kept memory when there is one (the chat rewinds
        the earlier question), else encoding the video (and keeping its memory)."""
        memory = self.memories.get(key) if key is not None and self.reuse_memory else None
        try:
            answer, cache = self.model.chat(self.processor, messages, cache=memory, **self._chat_kwargs(
                generate_kwargs))
        except (OSError, ValueError) as err:
            if memory is None and (isinstance(err, OSError) or path in str(err)):
                raise VideoUnreadable(str(err) if path in str(err) else f"{path}: {err}") from err
            raise
        if memory is None:
            self.videos_encoded += 1
            if key is not None and self.reuse_memory:
                self.memories.put(key, cache)
        elif key is not None:
            self.memories.refresh(key)
        return answer, cache

    def _chat(self, messages: list[dict], key: Hashable | None, generate_kwargs: dict, path: str) -> str:
        return self._chat_with_cache(messages, key, generate_kwargs, path)[0]

    def _memory(self, messages: list[dict], key: Hashable, path: str):
        """The kept memory of the request's video, encoding it (with a one-token answer) if there is none."""
        memory = self.memories.get(key)
        if memory is None:
            _, memory = self._chat_with_cache(messages, key, {"max_new_tokens": 1}, path)
        return memory

    @torch.no_grad()
    def _score_on_memory(self, memory, messages: list[dict], continuation: str) -> tuple[float, bool]:
        """log P(continuation | prompt) and whether greedy decoding gives it, running only the prompt's text after
        the video (and the continuation) against the memory; the memory is left as it was found (rewound)."""
        video_id = self.model.config.video_token_id
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        tail = text.rsplit(self.processor.video_token, 1)[1]
        absorbed = memory.record.absorbed_ids[0].cpu()
        video_end = int((absorbed == video_id).nonzero().max()) + 1
        whole_tail = self.tokenizer(tail + continuation, add_special_tokens=False)["input_ids"]
        ids = torch.cat([absorbed[:video_end], torch.tensor(whole_tail)]).unsqueeze(0)
        first_target = ids.shape[1] - self._continuation_length(text, continuation)
        memory.align(ids)
        if memory.record.absorbed_length > first_target - 1:  # the memory's earlier answer began like this continuation
            memory.rewind(first_target - 1)
        state = memory.checkpoint()
        try:
            start = memory.record.absorbed_length
            output = self.model(
                input_ids=ids[:, start:].to(self.device),
                cache=memory,
                compression_ratio=self.compression_ratio,
                logits_to_keep=torch.arange(first_target - 1 - start, ids.shape[1] - 1 - start),
            )
        finally:
            memory.restore(state)
        return continuation_score(output.logits[0], ids[0, first_target:])

    @torch.no_grad()
    def _score_fresh(self, messages: list[dict], continuation: str, path: str) -> tuple[float, bool]:
        """The same score from the whole prompt (video decoded and encoded again): `reuse_memory=False`."""
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        videos = [item["path"] for m in messages if isinstance(m["content"], list) for item in m["content"]
                  if item["type"] == "video"]
        images = [item["image"] for m in messages if isinstance(m["content"], list) for item in m["content"]
                  if item["type"] == "image"]
        try:
            whole = self.processor(text=text + continuation, videos=videos or None, images=images or None,
                                   return_tensors="pt", **self.sampling)
        except (OSError, ValueError) as err:
            if isinstance(err, OSError) or path in str(err):
                raise VideoUnreadable(str(err) if path in str(err) else f"{path}: {err}") from err
            raise
        self.videos_encoded += 1
        ids = whole["input_ids"]
        first_target = ids.shape[1] - self._continuation_length(text, continuation)
        inputs = {name: value.to(self.device) for name, value in whole.items() if isinstance(value, torch.Tensor)}
        inputs.pop("image_sizes", None)
        output = self.model(**inputs, compression_ratio=self.compression_ratio,
                            logits_to_keep=torch.arange(first_target - 1, ids.shape[1] - 1))
        return continuation_score(output.logits[0], ids[0, first_target:])

    def _continuation_length(self, text: str, continuation: str) -> int:
        """Tokens `continuation` adds after the prompt `text` (the text after its last placeholder tokenises on its
        own, as inside the whole prompt)."""
        tail = text.rsplit(self.processor.video_token, 1)[-1].rsplit(self.processor.image_token, 1)[-1]
        prompt_tail = self.tokenizer(tail, add_special_tokens=False)["input_ids"]
        whole_tail = self.tokenizer(tail + continuation, add_special_tokens=False)["input_ids"]
        if whole_tail[: len(prompt_tail)] != prompt_tail or len(whole_tail) == len(prompt_tail):
            raise ValueError(f"videoxl: the continuation {continuation!r} does not tokenise apart from its prompt")
        return len(whole_tail) - len(prompt_tail)

    def _failed(self, task: str, doc_id: Any, err: Exception) -> str:
        eval_logger.error(f"videoxl: task {task}, doc {doc_id}: cannot read its video: {err}; recorded as failed "
                          "(empty answer), the run goes on")
        self.failed_docs.append((task, doc_id, str(err)))
        return FAILED_ANSWER


def visual_items(visuals: list[Any]) -> list[dict]:
    """Chat content items for a doc's visuals: file paths are videos, PIL images are images."""
    items = []
    for visual in visuals:
        if isinstance(visual, str):
            items.append({"type": "video", "path": visual})
        elif isinstance(visual, Image.Image):
            items.append({"type": "image", "image": visual})
        else:
            raise ValueError(f"videoxl takes video file paths and PIL images as visuals, got {type(visual).__name__}")
    return items


def visual_identity(visual: Any) -> Hashable:
    """A file by its path, an image by the object."""
    return visual if isinstance(visual, str) else id(visual)


def generation_options(gen_kwargs: dict) -> tuple[dict, list[str]]:
    """(generate keyword arguments, stop strings) from a task's generation_kwargs: greedy unless the task samples."""
    options = dict(gen_kwargs or {})
    until = options.pop("until", [])
    until = [until] if isinstance(until, str) else list(until)
    temperature = float(options.get("temperature") or 0.0)
    do_sample = temperature > 0  # lmms-eval's tasks ask for greedy answers with temperature 0
    generate = {"max_new_tokens": int(options.get("max_new_tokens", 128)), "do_sample": do_sample}
    if do_sample:
        generate["temperature"] = temperature
        if options.get("top_p") is not None:
            generate["top_p"] = float(options["top_p"])
    if int(options.get("num_beams") or 1) > 1:
        generate["num_beams"] = int(options["num_beams"])
    return generate, until


def continuation_score(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, bool]:
    """(sum of log-probabilities of `targets` `[n]` under `logits` `[n, vocab]`, all of them the argmax)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
    targets = targets.cpu()
    picked = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1)
    return float(picked.sum()), bool((logprobs.argmax(dim=-1) == targets).all())
