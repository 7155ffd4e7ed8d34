"""Chat samples -> training batches: `input_ids`, `labels` (assistant answers only) and pixels, via the processor.

The labels are the tokens the chat template marks with `{% generation %}` (`return_assistant_tokens_mask=True`):
each assistant answer and its `<|im_end|>`.

A sample is LLaVA-style JSON:

    {"video": "clip.mp4", "conversations": [{"from": "human", "value": "<video>\\nWhat happens?"},
                                            {"from": "gpt", "value": "A cat jumps."}]}

`video` / `image` may also be arrays or lists (several images); `role`/`content` work in place of `from`/`value`;
a sample without `video` or `image` is text-only. A video or image without a marker in the text gets one at the
start of the first user turn, as LLaVA does.
"""

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from scripts.local_import import image_processing, video_decoding


ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IGNORE_INDEX = -100
MEDIA_KEYS = ("video", "image")


def read_jsonl(path: str | Path, media_root: str | Path | None = None) -> Iterator[dict]:
    """Samples of a JSON-lines file (a JSON list works too), read line by line.

    Relative media paths (a string or a list of strings) resolve against `media_root`, by default the file's folder.
    A line that is not a JSON object with a `conversations` list raises one ValueError naming the file and line.
    """
    for _, sample in located_samples(path, media_root):
        yield sample


def located_samples(path: str | Path, media_root: str | Path | None = None) -> Iterator[tuple[str, dict]]:
    """`("file:line", sample)` pairs of `read_jsonl`."""
    path = Path(path)
    root = Path(media_root) if media_root is not None else path.parent
    for where, sample in raw_samples(path):
        if not isinstance(sample, dict) or not isinstance(sample.get("conversations"), list):
            raise ValueError(f"{where}: a sample must be a JSON object with a 'conversations' list, got {sample!r:.200}")
        for key in MEDIA_KEYS:
            if isinstance(sample.get(key), str):
                sample[key] = resolve(sample[key], root)
            elif isinstance(sample.get(key), list) and all(isinstance(item, str) for item in sample[key]):
                sample[key] = [resolve(item, root) for item in sample[key]]
        yield where, sample


def raw_samples(path: Path) -> Iterator[tuple[str, Any]]:
    """`("file:line", parsed JSON)` for each non-blank line; a file starting with `[` is one JSON list."""
    with path.open() as file:
        first = file.read(1)
        while first.isspace():
            first = file.read(1)
        file.seek(0)
        if first == "[":
            for index, sample in enumerate(json.load(file)):
                yield f"{path}: item {index}", sample
            return
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(line.rstrip())
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})") from None


def resolve(media: str, root: Path) -> str:
    """A media path made absolute against `root`; URLs (any scheme: others are refused later) and absolute paths
    stay as they are."""
    if video_decoding().url_scheme(media) is not None or Path(media).is_absolute():
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
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("the sample has no assistant turn: nothing to learn from (only assistant answers are "
                         "labelled); add the answer, or leave the sample out")
    text = "".join(m["content"] for m in messages)
    for token, key in ((image_token, "image"), (video_token, "video")):
        if as_list(sample.get(key)) and token not in text:
            first_user["content"] = f"{token}\n" * len(as_list(sample[key])) + first_user["content"]
    return messages


def template_labels(
    input_ids: torch.Tensor, valid: torch.Tensor, template_ids: list[int], assistant_mask: list[int],
    visual_ids: torch.Tensor,
) -> torch.Tensor:
    """Labels for one processed row `[seq]` from the chat template's assistant mask.

    `template_ids` / `assistant_mask` are the template's tokens, one marker per image or video, and its
    `{% generation %}` mask over them; the processor's row has each marker expanded into a run of visual tokens.
    The text tokens of both must agree one for one: the mask then carries over to the row's text tokens.
    """
    template_ids, mask = torch.tensor(template_ids), torch.tensor(assistant_mask, dtype=torch.bool)
    template_text = ~torch.isin(template_ids, visual_ids)
    if mask[~template_text].any():
        raise ValueError("an assistant answer contains an <image> or <video> marker; answers must be text")
    row_text = (valid & ~torch.isin(input_ids, visual_ids)).nonzero().squeeze(1)
    if not torch.equal(input_ids[row_text], template_ids[template_text]):
        raise ValueError(
            "the processor's text tokens differ from the chat template's; the processor must render the same "
            "template (its `chat_template`) and add no special tokens of its own"
        )
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labelled = row_text[mask[template_text]]
    labels[labelled] = input_ids[labelled]
    return labels


def labelled_spans(labels: torch.Tensor) -> list[tuple[int, int]]:
    """`(start, end)` of each run of consecutive labelled positions of a row."""
    where = (labels != IGNORE_INDEX).nonzero().squeeze(1).tolist()
    spans: list[tuple[int, int]] = []
    for position in where:
        if spans and spans[-1][1] == position:
            spans[-1] = (spans[-1][0], position + 1)
        else:
            spans.append((position, position + 1))
    return spans


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
        self.end_id = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.visual_ids = torch.tensor([processor.video_token_id, processor.image_token_id])

    def __call__(self, samples: list[dict]) -> dict[str, Any]:
        texts, videos, images, answers, templated = [], [], [], [], []
        for sample in samples:
            messages = to_messages(sample, self.processor.video_token, self.processor.image_token)
            texts.append(self.processor.apply_chat_template(messages, tokenize=False))
            templated.append(self.processor.tokenizer.apply_chat_template(
                messages, chat_template=self.processor.chat_template, tokenize=True, return_dict=True,
                return_assistant_tokens_mask=True,
            ))
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
        labels = torch.stack([
            template_labels(row, valid.bool(), chat["input_ids"], chat["assistant_masks"], self.visual_ids)
            for row, valid, chat in zip(batch["input_ids"], batch["attention_mask"], templated)
        ])
        self.check_every_answer_labelled(labels, answers)
        batch["labels"] = labels
        batch = dict(batch)
        if self.compression_ratio is not None:
            batch["compression_ratio"] = self.compression_ratio
        return batch

    def check_every_answer_labelled(self, labels: torch.Tensor, answers: list[int]) -> None:
        """Each assistant turn must give one labelled span ending in `<|im_end|>`: a chat template without
        `{% generation %}` blocks, or one that marks other text, would otherwise train on the wrong tokens unseen."""
        for index, (row, expected) in enumerate(zip(labels, answers)):
            spans = labelled_spans(row)
            closed = sum(int(row[end - 1]) == self.end_id for _, end in spans)
            if len(spans) != expected or closed != expected:
                raise ValueError(
                    f"sample {index} of the batch has {expected} assistant turns but {len(spans)} labelled spans "
                    f"({closed} ending in <|im_end|>): the chat template must wrap each assistant answer and its "
                    "<|im_end|> in one {% generation %} block"
                )


# ---- checking a dataset before training ------------------------------------------------------------------------------


def video_frame_count(probe, sampling: dict) -> int:
    """Frames the processor will sample from a video, from its header (`probe_video`; nothing more decoded).

    Exact for `num_frames` sampling; for `fps` sampling the duration comes from the header, so the count can be off
    by a frame (the collator still refuses a batch over `max_length`).
    """
    if sampling.get("fps") is not None:
        count = max(1, int((probe.declared_seconds or 0.0) * sampling["fps"] + 1e-6))
    else:
        count = int(sampling["num_frames"])
    max_frames = sampling.get("max_frames")
    return min(count, max_frames) if max_frames is not None else count


def open_media(sample: dict, processor) -> dict[str, list]:
    """Open every media file of a sample cheaply: each video's container and first frame (`probe_video`), each
    image whole. Paths, `file://` URLs and, under the processor's URL policy, http(s) URLs; anything else is
    refused. Returns {"video": [VideoProbe | in-memory video], "image": [...]}; raises FileNotFoundError or one
    ValueError naming the file."""
    decoding, images = video_decoding(), image_processing()
    policy = getattr(processor, "url_policy", None)
    opened: dict[str, list] = {"video": [], "image": []}
    for video in as_list(sample.get("video")):
        opened["video"].append(decoding.probe_video(video, policy) if isinstance(video, str) else video)
    for image in as_list(sample.get("image")):
        if isinstance(image, str):
            source = images.load_image_source(image, "image", policy)
            image = images.to_rgb_image(source, f"image ({image})")
        opened["image"].append(image)
    return opened


def check_dataset(
    path: str | Path, processor, sampling: dict | None = None, max_length: int | None = None,
    media_root: str | Path | None = None, same_visual_layout: bool = False,
) -> list[dict]:
    """Read and check every sample of a JSON-lines file before training; return the samples (see `checked_samples`)."""
    return [sample for _, sample in checked_samples(path, processor, sampling, max_length, media_root,
                                                    same_visual_layout)]


def checked_samples(
    path: str | Path, processor, sampling: dict | None = None, max_length: int | None = None,
    media_root: str | Path | None = None, same_visual_layout: bool = False,
) -> list[tuple[str, dict]]:
    """`("file:line", sample)` for every sample of a JSON-lines file, each checked before training.

    Streams the file once. Each sample must parse, have valid turns and at least one assistant answer (something
    to learn), name media that open (every video's container and first frame, every image: a corrupt file or a
    path that is not a video stops the run here, not at its step), and (with `max_length`) fit in `max_length`
    tokens, visual tokens counted from the sampling settings.
    `same_visual_layout` also requires every sample to hold as many visual tokens per video / images as the first
    (FSDP and ZeRO-3 gather each layer's weights every time the layer runs, once per window: every process must run
    as many).
    The first problem raises one ValueError (FileNotFoundError for media) naming the file and line.
    """
    options = {"num_frames": processor.num_frames, "fps": processor.fps, "max_frames": processor.max_frames}
    sampling = {**options, **(sampling or {})}
    samples, first_layout = [], None
    for where, sample in located_samples(path, media_root):
        try:
            messages = to_messages(sample, processor.video_token, processor.image_token)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        try:
            opened = open_media(sample, processor)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{where}: {err}") from None
        except Exception as err:  # PyAV's, PIL's and the URL policy's errors, each naming the file
            raise ValueError(f"{where}: a media file cannot be read ({err})") from err
        layout = visual_tokens(opened, processor, sampling) if same_visual_layout or max_length is not None else []
        first_layout = layout if first_layout is None else first_layout
        if same_visual_layout and layout != first_layout:
            raise ValueError(
                f"{where}: the sample's visual tokens per video / images are {layout}, the first sample's "
                f"{first_layout}; under FSDP and ZeRO-3 every sample must run the same windows (same number of "
                "frames, videos and image tiles), or the processes' collectives stop matching"
            )
        if max_length is not None:
            length = text_length(messages, processor) + sum(layout)
            if length > max_length:
                raise ValueError(
                    f"{where}: the sample has {length} tokens, more than max_length={max_length}; sample fewer "
                    "frames (num_frames / fps / max_frames) or raise max_length"
                )
        samples.append((where, sample))
    if not samples:
        raise ValueError(f"{path}: no samples")
    return samples


def text_length(messages: list[dict], processor) -> int:
    """Tokens of a sample's rendered chat, its image and video markers left out."""
    template_ids = processor.tokenizer.apply_chat_template(
        messages, chat_template=processor.chat_template, tokenize=True, return_dict=True
    )["input_ids"]
    return sum(token not in (processor.video_token_id, processor.image_token_id) for token in template_ids)


def visual_tokens(opened: dict[str, list], processor, sampling: dict) -> list[int]:
    """Visual tokens of each video, then of all images (`open_media`'s result): videos from their headers, images
    from their tiles."""
    counts = []
    for video in opened["video"]:
        if not isinstance(video, video_decoding().VideoProbe):
            raise ValueError("only video files can be counted before training")
        counts.append(video_frame_count(video, sampling) * processor.num_image_tokens)
    if opened["image"]:  # tiles depend on each image's size: the processor computes them
        images = opened["image"]
        expanded = processor(text=processor.image_token * len(images), images=images, return_tensors=None)
        counts.append(expanded["input_ids"][0].count(processor.image_token_id))
    return counts
