"""Chat samples -> training batches: `input_ids`, `labels` (assistant answers only) and pixels, via the processor.

A sample is LLaVA-style JSON:

    {"video": "clip.mp4", "conversations": [{"from": "human", "value": "<video>\\nWhat happens?"},
                                            {"from": "gpt", "value": "A cat jumps."}]}

`video` / `image` may also be arrays or lists (several images); `role`/`content` work in place of `from`/`value`;
a sample without `video` or `image` is text-only. A video or image without a marker in the text gets one at the
start of the first user turn, as LLaVA does.
"""

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch


ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IGNORE_INDEX = -100
MEDIA_KEYS = ("video", "image")


def read_jsonl(path: str | Path, media_root: str | Path | None = None) -> Iterator[dict]:
    """Samples of a JSON-lines file (a JSON list works too).

    Relative media paths (a string or a list of strings) resolve against `media_root`, by default the file's folder.
    """
    path = Path(path)
    root = Path(media_root) if media_root is not None else path.parent
    text = path.read_text()
    samples = json.loads(text) if text.lstrip().startswith("[") else [json.loads(l) for l in text.splitlines() if l.strip()]
    for sample in samples:
        for key in MEDIA_KEYS:
            if isinstance(sample.get(key), str):
                sample[key] = resolve(sample[key], root)
            elif isinstance(sample.get(key), list) and all(isinstance(item, str) for item in sample[key]):
                sample[key] = [resolve(item, root) for item in sample[key]]
        yield sample


def resolve(media: str, root: Path) -> str:
    """A media path made absolute against `root`; URLs and absolute paths stay as they are."""
    if "://" in media or Path(media).is_absolute():
        return media
    return str(root / media)


def as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def to_messages(sample: dict, video_token: str, image_token: str) -> list[dict]:
    """LLaVA `conversations` -> chat messages with string content, markers made explicit."""
    messages = []
    for turn in sample["conversations"]:
        role = ROLES.get(turn.get("from", turn.get("role")))
        if role is None:
            raise ValueError(f"unknown role in turn {turn!r}; expected one of {sorted(ROLES)}")
        content = turn.get("value", turn.get("content"))
        if not isinstance(content, str):
            raise ValueError(
                f"turn content must be a string (media go in the sample's 'video' / 'image' keys, marked by "
                f"{video_token} / {image_token} in the text), got {type(content).__name__} in {turn!r}"
            )
        messages.append({"role": role, "content": content})
    first_user = next((m for m in messages if m["role"] == "user"), None)
    if first_user is None:
        raise ValueError("a sample needs at least one user turn")
    text = "".join(m["content"] for m in messages)
    for token, key in ((image_token, "image"), (video_token, "video")):
        if as_list(sample.get(key)) and token not in text:
            first_user["content"] = f"{token}\n" * len(as_list(sample[key])) + first_user["content"]
    return messages


def assistant_labels(input_ids: torch.Tensor, header: Sequence[int], end_id: int) -> torch.Tensor:
    """Labels for one row: the tokens after each assistant header up to and including its `<|im_end|>`."""
    ids = input_ids.tolist()
    labels = [IGNORE_INDEX] * len(ids)
    i, n = 0, len(header)
    while i <= len(ids) - n:
        if ids[i : i + n] != list(header):
            i += 1
            continue
        j = i + n
        while j < len(ids) and ids[j] != end_id:
            labels[j] = ids[j]
            j += 1
        if j < len(ids):
            labels[j] = ids[j]
        i = j + 1
    return torch.tensor(labels, dtype=torch.long)


class VideoXLCollator:
    """Turn a list of chat samples into one padded (right-padded) training batch.

    Args:
        processor: a `VideoXLProcessor` (any tokenizer with the ChatML and visual tokens).
        num_frames / fps / max_frames / video_fps: frame sampling of every video (processor defaults when None;
            `video_fps` is the frame rate of in-memory videos, so `fps=video_fps` keeps every frame).
        max_length: refuse samples longer than this many tokens (never truncates silently).
        compression_ratio: when set, added to every batch: the model then uses this one ratio for every window,
            in training too (otherwise it draws a ratio per window from `config.beacon_train_ratios`).
    """

    def __init__(self, processor, num_frames: int | None = None, fps: float | None = None,
                 max_frames: int | None = None, video_fps: float | None = None, max_length: int | None = None,
                 compression_ratio: int | None = None):
        self.processor = processor
        options = dict(num_frames=num_frames, fps=fps, max_frames=max_frames, video_fps=video_fps)
        self.sampling = {key: value for key, value in options.items() if value is not None}
        self.max_length = max_length
        self.compression_ratio = compression_ratio
        tokenizer = processor.tokenizer
        self.header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        self.end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")

    def __call__(self, samples: list[dict]) -> dict[str, Any]:
        texts, videos, images, answers = [], [], [], []
        for sample in samples:
            messages = to_messages(sample, self.processor.video_token, self.processor.image_token)
            texts.append(self.processor.apply_chat_template(messages, tokenize=False))
            answers.append(sum(m["role"] == "assistant" for m in messages))
            videos += as_list(sample.get("video"))
            images += as_list(sample.get("image"))
        batch = self.processor(
            text=texts,
            videos=videos or None,
            images=images or None,
            padding=True,
            padding_side="right",
            return_tensors="pt",
            **self.sampling,
        )
        if self.max_length is not None and batch["input_ids"].shape[1] > self.max_length:
            raise ValueError(
                f"a sample has {batch['input_ids'].shape[1]} tokens, more than max_length={self.max_length}; "
                "sample fewer frames or raise max_length"
            )
        labels = torch.stack([assistant_labels(row, self.header, self.end_id) for row in batch["input_ids"]])
        labels = labels.masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        self.check_every_answer_labelled(labels, answers)
        batch["labels"] = labels
        batch = dict(batch)
        if self.compression_ratio is not None:
            batch["compression_ratio"] = self.compression_ratio
        return batch

    def check_every_answer_labelled(self, labels: torch.Tensor, answers: list[int]) -> None:
        """Each assistant turn must give one labelled span closed by `<|im_end|>`; a tokenizer that merges the
        assistant header with the answer's first characters would otherwise drop the answer from the loss unseen."""
        found = (labels == self.end_id).sum(dim=1).tolist()
        for index, (got, expected) in enumerate(zip(found, answers)):
            if got != expected:
                raise ValueError(
                    f"sample {index} of the batch has {expected} assistant turns but {got} labelled answers: the "
                    "tokens of '<|im_start|>assistant\\n' were not found before each answer (does an answer start "
                    "with whitespace that the tokenizer merges with the header's newline?)"
                )
