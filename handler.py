"""Inference Endpoints custom handler: `EndpointHandler(path)(data) -> [{"generated_text": ...}]`.

Payloads (JSON):

    {"inputs": [chat messages], "parameters": {...}}                   # transformers' chat format
    {"inputs": {"video": URL | base64, "text": "..."}, "parameters": {...}}   # or "image" instead of "video"
    {"inputs": "a text-only prompt", "parameters": {...}}

Videos and images are http(s) URLs (fetched under the processor's policy: `allow_remote_urls`, `url_timeout`) or
base64 (a `data:` URI or bare). Local paths are refused: a client must not make the endpoint read its disk.
`parameters`: `max_new_tokens`, `num_frames` / `fps` / `max_frames` (frame sampling), `compression_ratio`, and the
sampling options `do_sample`, `temperature`, `top_p`, `top_k`, `repetition_penalty`.

A video sent again (same content, same sampling and ratio) is answered from the compressed memory kept for it: only
the question runs. Memories are kept least recently used first out, within `memory_budget_mb`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import importlib
import json
import sys
import threading
from collections import OrderedDict
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoProcessor

SAMPLING = {"num_frames": int, "fps": (int, float), "max_frames": int}
GENERATION = {
    "max_new_tokens": int, "compression_ratio": int, "do_sample": bool, "temperature": (int, float),
    "top_p": (int, float), "top_k": int, "repetition_penalty": (int, float),
}
MEDIA_KEYS = {"video": ("video", "url", "path"), "image": ("image", "url", "path")}
# OpenAI-style items: {"type": "image_url", "image_url": {"url": ...}}
URL_ITEMS = {"video_url": "video", "image_url": "image"}


class EndpointHandler:
    """Load the model in `path` (remote code) once; answer payloads, keeping each video's compressed memory."""

    def __init__(self, path: str = "", memory_budget_mb: float = 2048.0) -> None:
        cuda = torch.cuda.is_available()
        self.model = AutoModelForCausalLM.from_pretrained(
            path or ".", trust_remote_code=True, dtype=torch.bfloat16 if cuda else torch.float32,
            device_map="cuda" if cuda else None,
        ).eval()
        self.processor = AutoProcessor.from_pretrained(path or ".", trust_remote_code=True)
        # The processor's own URL fetch (its module's sibling), so URLs follow its policy exactly.
        package = type(self.processor).__module__.rsplit(".", 1)[0]
        self.decoding = importlib.import_module(f"{package}.video_decoding_videoxl")
        self.ratios = sys.modules[type(self.model).__module__].allowed_ratios(self.model.config)
        self.memory_budget = memory_budget_mb * 2**20
        self.memories: OrderedDict[str, Any] = OrderedDict()
        self.lock = threading.Lock()

    def __call__(self, data: dict[str, Any]) -> list[dict[str, str]]:
        if not isinstance(data, dict) or "inputs" not in data:
            raise ValueError(f"payload: expected a JSON object with 'inputs', got {type(data).__name__}")
        sampling, generation = parse_parameters(data.get("parameters"), self.ratios)
        messages = self.messages(data["inputs"])
        key = memory_key(messages, sampling, generation.get("compression_ratio"))
        with self.lock:
            cache = self.memories.pop(key, None) if key else None
            try:
                answer, cache = self.model.chat(self.processor, messages, cache=cache, **sampling, **generation)
            except ValueError:
                if cache is None:
                    raise
                # The kept memory holds other text before the video (another system prompt): encode again.
                answer, cache = self.model.chat(self.processor, messages, cache=None, **sampling, **generation)
            if key:
                self.keep(key, cache)
        return [{"generated_text": answer}]

    # ---- payload -------------------------------------------------------------------------------------------------

    def messages(self, inputs: Any) -> list[dict[str, Any]]:
        """Chat messages with every video / image as bytes, from any of the payload forms."""
        if isinstance(inputs, str):
            return [{"role": "user", "content": [{"type": "text", "text": inputs}]}]
        if isinstance(inputs, dict):
            return [{"role": "user", "content": self.simple_content(inputs)}]
        if isinstance(inputs, list) and inputs:
            return [self.message(m, f"inputs[{i}]") for i, m in enumerate(inputs)]
        raise ValueError("inputs: expected chat messages (a non-empty list), {'video' or 'image': ..., 'text': ...} "
                         f"or a prompt string, got {type(inputs).__name__}")

    def simple_content(self, inputs: dict[str, Any]) -> list[dict[str, Any]]:
        unknown = sorted(set(inputs) - {"video", "image", "text"})
        if unknown:
            raise ValueError(f"inputs.{unknown[0]}: unknown field; expected 'video' or 'image', and 'text'")
        text = inputs.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ValueError("inputs.text: expected the question as a non-empty string")
        content = [{"type": kind, kind: self.media_bytes(inputs[kind], f"inputs.{kind}")}
                   for kind in ("video", "image") if kind in inputs]
        return content + [{"type": "text", "text": text}]

    def message(self, message: Any, where: str) -> dict[str, Any]:
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"{where}: expected a message {{'role': 'system' | 'user' | 'assistant', 'content': ...}}")
        content = message.get("content")
        if isinstance(content, str):
            return {"role": message["role"], "content": content}
        if not isinstance(content, list):
            raise ValueError(f"{where}.content: expected a string or a list of items, got {type(content).__name__}")
        items = [self.item(item, f"{where}.content[{j}]") for j, item in enumerate(content)]
        return {"role": message["role"], "content": items}

    def item(self, item: Any, where: str) -> dict[str, Any]:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "text":
            if not isinstance(item.get("text"), str):
                raise ValueError(f"{where}.text: expected a string")
            return {"type": "text", "text": item["text"]}
        if kind in URL_ITEMS:
            url = (item.get(kind) or {}).get("url") if isinstance(item.get(kind), dict) else None
            return {"type": URL_ITEMS[kind], URL_ITEMS[kind]: self.media_bytes(url, f"{where}.{kind}.url")}
        if kind in MEDIA_KEYS:
            field = next((k for k in MEDIA_KEYS[kind] if item.get(k) is not None), kind)
            return {"type": kind, kind: self.media_bytes(item.get(field), f"{where}.{field}")}
        raise ValueError(f"{where}.type: expected 'text', 'video', 'image', 'video_url' or 'image_url', got {kind!r}")

    def media_bytes(self, source: Any, where: str) -> bytes:
        """The bytes of an http(s) URL (the processor's policy) or of base64 data."""
        if not isinstance(source, str) or not source:
            raise ValueError(f"{where}: expected an http(s) URL or base64 data, got {type(source).__name__}")
        if source.startswith(("http://", "https://")):
            try:
                policy = self.decoding.UrlPolicy(self.processor.allow_remote_urls, self.processor.url_timeout,
                                                 self.processor.max_url_bytes)
                return self.decoding.fetch_url(source, policy)
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from err
        data = source.split(",", 1)[1] if source.startswith("data:") and "," in source else source
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as err:
            raise ValueError(f"{where}: neither an http(s) URL nor valid base64 ({err}); local paths are not "
                             "read by the endpoint") from err

    # ---- kept memories ---------------------------------------------------------------------------------------------

    def keep(self, key: str, cache) -> None:
        """Keep `cache` as the most recently used memory; drop the least recently used past the budget."""
        if cache.memory_bytes() > self.memory_budget:
            return
        self.memories[key] = cache
        while sum(c.memory_bytes() for c in self.memories.values()) > self.memory_budget:
            self.memories.popitem(last=False)


def parse_parameters(parameters: Any, ratios: list[int]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(frame sampling options, generate options) from `parameters`; one error naming a bad field."""
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, dict):
        raise ValueError(f"parameters: expected an object, got {type(parameters).__name__}")
    sampling, generation = {}, {"max_new_tokens": 256}
    for name, value in parameters.items():
        expected = SAMPLING.get(name) or GENERATION.get(name)
        if expected is None:
            known = sorted({**SAMPLING, **GENERATION})
            raise ValueError(f"parameters.{name}: unknown parameter; expected one of {known}")
        if isinstance(value, bool) != (expected is bool) or not isinstance(value, expected):
            raise ValueError(f"parameters.{name}: expected {getattr(expected, '__name__', 'a number')}, got {value!r}")
        if expected is not bool and value <= 0:
            raise ValueError(f"parameters.{name}: expected a positive value, got {value!r}")
        (sampling if name in SAMPLING else generation)[name] = value
    ratio = generation.get("compression_ratio")
    if ratio is not None and ratio not in ratios:
        raise ValueError(f"parameters.compression_ratio: expected one of {ratios}, got {ratio}")
    return sampling, generation


def memory_key(messages: list[dict[str, Any]], sampling: dict[str, Any], ratio: int | None) -> str | None:
    """A content hash of the messages' videos / images with their sampling and ratio; None without any."""
    digest = hashlib.blake2b(digest_size=16)
    found = False
    for message in messages:
        for item in message["content"] if isinstance(message["content"], list) else []:
            if item["type"] in MEDIA_KEYS:
                digest.update(item["type"].encode() + hashlib.blake2b(item[item["type"]]).digest())
                found = True
    digest.update(json.dumps([sampling, ratio], sort_keys=True).encode())
    return digest.hexdigest() if found else None
