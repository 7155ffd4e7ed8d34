"""What Video-XL is given: checks of the ids and options of a call, and its visual inputs ([`VisualInputs`]: each
kind's frames, per sample), built and checked once per prefill. Bad input gets one clear error before anything runs.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .beacon_cache import frame_digests
from .configuration_videoxl import VideoXLConfig


# CLIP-normalised pixels of images in [0, 1] lie in about [-1.8, 2.2]; the bound leaves room for other
# normalisations and random test tensors, and still catches unnormalised 0..255 pixels.
PIXEL_LIMIT = 10.0


def visual_kinds(config: VideoXLConfig) -> dict[str, int]:
    """The pixel argument of each visual kind and the token id that stands for its frames (or tiles)."""
    return {"pixel_values_videos": config.video_token_id, "pixel_values": config.image_token_id}


@dataclass
class VisualInputs:
    """The frames of each visual kind, per sample: `frames[token_id][i]` `[n_i, 3, H, W]`, views of the pixels as
    given (frames of every video, or tiles of every image, in order of appearance, sample after sample).

    Built once per prefill from the pixel arguments and `input_ids`, whose tokens of each kind must be whole frames
    ([`from_pixels`]); generation repeats, splits and skips samples' frames through it.
    """

    frames: dict[int, list[torch.Tensor]]
    tokens_per_frame: int

    @classmethod
    def from_pixels(cls, input_ids: torch.Tensor, pixels: dict[str, torch.Tensor | None], config: VideoXLConfig) -> "VisualInputs":
        """Split each kind's pixels (`pixels` by argument name) by the samples' token counts; refuse counts that
        disagree, partial frames and frames of the wrong shape."""
        per_frame, size = config.tokens_per_frame, config.vision_config.image_size
        frames = {}
        for name, token_id in visual_kinds(config).items():
            given = pixels.get(name)
            tokens = (input_ids == token_id).sum(dim=1).tolist()
            num_frames = 0 if given is None else given.reshape(-1, *given.shape[-3:]).shape[0]
            if sum(tokens) != num_frames * per_frame:
                raise ValueError(
                    f"{name} holds {num_frames} frames/tiles = {num_frames * per_frame} visual tokens, but input_ids "
                    f"has {sum(tokens)} tokens with id {token_id} ({per_frame} tokens per frame or tile)"
                )
            if not num_frames:
                continue
            if given.dim() not in (4, 5) or tuple(given.shape[-3:]) != (3, size, size):
                raise ValueError(
                    f"{name} must be [n, 3, {size}, {size}] or [videos, n, 3, {size}, {size}], got {tuple(given.shape)}"
                )
            partial = [i for i, count in enumerate(tokens) if count % per_frame]
            if partial:
                raise ValueError(
                    f"sample {partial[0]} has {tokens[partial[0]]} tokens with id {token_id}: not whole frames or "
                    f"tiles of {per_frame} tokens"
                )
            frames[token_id] = list(given.reshape(-1, *given.shape[-3:]).split([t // per_frame for t in tokens]))
        return cls(frames, per_frame)

    def check_values(self, config: VideoXLConfig) -> None:
        """Pixels must be CLIP-normalised floats: finite and in a plausible range (one pass over the pixels)."""
        for name, token_id in visual_kinds(config).items():
            for sample in self.frames.get(token_id, []):
                if sample.shape[0]:
                    check_pixel_values(name, sample)

    def window(self, token_id: int, frames: tuple[int, int]) -> torch.Tensor:
        """Frames `[first, last)` of one kind, of every sample: `[batch * frames, 3, H, W]`."""
        samples = [sample[frames[0] : frames[1]] for sample in self.frames[token_id]]
        return samples[0] if len(samples) == 1 else torch.cat(samples)  # one sample: a view, not a copy

    def digests(self, token_id: int, frames: tuple[int, int], device: torch.device) -> torch.Tensor:
        """Fingerprints `[batch, frames, 2]` of frames `[first, last)` of one kind ([`frame_digests`]), on `device`."""
        return torch.stack([frame_digests(sample[frames[0] : frames[1]].to(device)) for sample in self.frames[token_id]])

    def sample(self, index: int) -> "VisualInputs":
        """The frames of one sample (kinds it has none of are left out)."""
        return VisualInputs(
            {t: [samples[index]] for t, samples in self.frames.items() if samples[index].shape[0]}, self.tokens_per_frame
        )

    def repeat_samples(self, times: int) -> "VisualInputs":
        """Each sample's frames `times` times in a row (generation's expansion of each prompt)."""
        return VisualInputs(
            {t: [sample for sample in samples for _ in range(times)] for t, samples in self.frames.items()},
            self.tokens_per_frame,
        )

    def drop_first(self, frames: dict[int, list[int]]) -> "VisualInputs":
        """Without the first `frames[token_id][i]` frames of each sample (those a cache already holds)."""
        return VisualInputs(
            {t: [sample[n:] for sample, n in zip(samples, frames.get(t, [0] * len(samples)))]
             for t, samples in self.frames.items()},
            self.tokens_per_frame,
        )

    def as_arguments(self, config: VideoXLConfig) -> dict[str, torch.Tensor]:
        """Pixel arguments `[frames, 3, H, W]` of the kinds with any frames, sample after sample."""
        arguments = {}
        for name, token_id in visual_kinds(config).items():
            samples = self.frames.get(token_id, [])
            if sum(sample.shape[0] for sample in samples):
                arguments[name] = torch.cat(samples)
        return arguments


def unabsorbed_pixels(
    input_ids: torch.Tensor,
    absorbed: int,
    pixels: dict[str, torch.Tensor | None],
    config: VideoXLConfig,
    check_held: Callable[[int, list[torch.Tensor]], None] | None = None,
) -> dict[str, torch.Tensor]:
    """The pixel arguments (by name) of the visual tokens in `input_ids[:, absorbed:]`, from `pixels` that cover
    either every visual token of `input_ids` (the frames of the first `absorbed` columns are dropped, after
    `check_held(token_id, frames per sample)` where given) or only the new ones. Samples may hold different numbers
    of frames."""
    if absorbed == 0:
        return {name: value for name, value in pixels.items() if value is not None}
    try:
        visual = VisualInputs.from_pixels(input_ids, pixels, config)
    except ValueError:
        return VisualInputs.from_pixels(input_ids[:, absorbed:], pixels, config).as_arguments(config)
    held = {}
    for token_id, samples in visual.frames.items():
        tokens = (input_ids[:, :absorbed] == token_id).sum(dim=1)
        if (tokens % config.tokens_per_frame).any():
            raise ValueError(f"the cache ends inside a frame (token id {token_id}; {tokens.tolist()} tokens absorbed)")
        held[token_id] = (tokens // config.tokens_per_frame).tolist()
        if check_held is not None:
            check_held(token_id, [sample[:n] for sample, n in zip(samples, held[token_id])])
    return visual.drop_first(held).as_arguments(config)


def check_pixel_values(name: str, pixels: torch.Tensor) -> None:
    """Pixels must be CLIP-normalised floats: finite and in a plausible range (one pass over the pixels)."""
    if not pixels.is_floating_point():
        raise ValueError(
            f"{name} must be CLIP-normalised floating-point pixels (the processor's output), got dtype "
            f"{pixels.dtype}: raw 0..255 frames need the processor."
        )
    low, high = (value.item() for value in torch.aminmax(pixels))
    if not (math.isfinite(low) and math.isfinite(high)):  # min and max propagate NaN
        raise ValueError(f"{name} holds NaN or infinite values.")
    if low < -PIXEL_LIMIT or high > PIXEL_LIMIT:
        raise ValueError(
            f"{name} ranges over [{low:.4g}, {high:.4g}]; CLIP-normalised pixels lie in about [-1.8, 2.2] "
            f"(refused beyond +-{PIXEL_LIMIT:g}). Were they normalised? Raw 0..255 frames need the processor."
        )
    if low >= 0.0 and high <= 1.0:
        # Normalised pixels go below 0 wherever a channel is darker than its CLIP mean (about 117 of 255) and above
        # 1 where it is brighter than mean + std (about 190): only frames of nothing but mid tones land in [0, 1].
        raise ValueError(
            f"{name} lies entirely in [0, 1] ([{low:.4g}, {high:.4g}]): pixels scaled to 0..1 but not CLIP-normalised? "
            "Normalised frames hold negative values wherever a channel is darker than its CLIP mean. Use the "
            "processor, or subtract the CLIP mean and divide by its std."
        )


def same_layout(input_ids: torch.Tensor, visual_ids: tuple[int, ...]) -> bool:
    """Whether every sample of `input_ids` `[batch, seq]` holds the same kind of visual token (video or image) in
    the same columns, so that one plan of windows serves them all."""
    kinds = input_ids.masked_fill(~torch.isin(input_ids, torch.tensor(visual_ids, device=input_ids.device)), -1)
    return bool((kinds == kinds[:1]).all())


def check_input_ids(input_ids: torch.Tensor | None, config: VideoXLConfig) -> None:
    """`input_ids` must be a non-empty `[batch, seq]` tensor of token ids of the vocabulary or visual token ids."""
    if input_ids is None:
        raise ValueError("Pass input_ids (or inputs_embeds for a text-only prompt).")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): give at least one token per sample.")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    vocab = config.text_config.vocab_size
    visual_ids = torch.tensor([config.video_token_id, config.image_token_id], device=input_ids.device)
    outside = ((input_ids < 0) | (input_ids >= vocab)) & ~torch.isin(input_ids, visual_ids)
    if outside.any():
        sample, column = outside.nonzero()[0].tolist()
        raise ValueError(
            f"input_ids holds {int(outside.sum())} id(s) outside the vocabulary [0, {vocab}) that are not visual "
            f"token ids, e.g. {int(input_ids[sample, column])} at sample {sample}, column {column}."
        )


def check_attention_mask(attention_mask: torch.Tensor) -> None:
    """An `attention_mask` `[batch, columns]` may pad a prompt on the left or on the right, not inside it: a zero
    between ones of a row (e.g. over a video's columns) would silently change what the prompt means, and a row of
    zeros is a sample without a token."""
    tokens = attention_mask.bool()
    empty = (~tokens.any(dim=1)).nonzero()
    if empty.numel():
        raise ValueError(
            f"attention_mask of sample {int(empty[0])} is all zeros: that sample has no token to run. Drop it from "
            "the batch (1 = token, 0 = padding)."
        )
    before = tokens.long().cummax(dim=1).values.bool()  # a token at or before the column
    after = tokens.flip(1).long().cummax(dim=1).values.flip(1).bool()  # a token at or after it
    holes = (~tokens & before & after).nonzero()
    if holes.numel():
        sample, column = holes[0].tolist()
        raise ValueError(
            f"attention_mask of sample {sample} has a hole: 0 at column {column} between tokens (1). Padding may "
            "only come before a prompt (left) or after it (right); to leave out part of a prompt (a video's "
            "columns), leave it out of input_ids."
        )


def input_validity(attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor:
    """`[batch, seq]` bool: which columns of `input_ids` are tokens (not padding), from an `attention_mask` `[batch,
    seq]` or `[batch, past + seq]` whose last `seq` columns are theirs."""
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.dim() != 2 or attention_mask.shape[0] != input_ids.shape[0]:
        raise ValueError(
            f"attention_mask must be 2-D [batch, seq], got shape {tuple(attention_mask.shape)} for input_ids "
            f"{tuple(input_ids.shape)}"
        )
    if attention_mask.shape[1] < input_ids.shape[1]:
        raise ValueError(
            f"attention_mask has {attention_mask.shape[1]} columns, fewer than the {input_ids.shape[1]} of input_ids"
        )
    if input_ids.shape[1] > 1:  # a prefill; a decode step's single column cannot open a hole
        check_attention_mask(attention_mask)
    return attention_mask[:, -input_ids.shape[1] :].bool()


def check_run_continues(absorbed_ids: torch.Tensor | None, input_ids: torch.Tensor, config: VideoXLConfig) -> None:
    """Refuse `input_ids` that continue a visual run whose last window in the memory (`absorbed_ids`, the ids it
    holds) was partial: its windows would be cut where one prompt would not cut them (a run may go on across calls
    only after whole windows, as live ingestion and a retried prompt do)."""
    if absorbed_ids is None or input_ids.shape[1] == 0:
        return
    last = absorbed_ids[0, -1]
    if int(last) not in visual_kinds(config).values() or input_ids[0, 0] != last:
        return
    others = (absorbed_ids[0] != last).nonzero()
    run = absorbed_ids.shape[1] - (int(others[-1]) + 1 if others.numel() else 0)
    if run % config.beacon_window:
        raise ValueError(
            f"input_ids continue a visual run of {run} tokens that the cache closed with a partial window (windows "
            f"are {config.beacon_window} tokens): its frames would be compressed differently from one prompt. Pass "
            "cache=None, or feed a visual run in whole windows."
        )


def is_plain_text(input_ids: torch.Tensor, config: VideoXLConfig) -> bool:
    """Whether `input_ids` `[batch, seq]` are vocabulary ids without a visual token (a decode step, a question): such
    a call runs as one text step without the planner and the visual checks. Anything else takes the general path,
    whose checks explain what is wrong."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.dtype not in (torch.int64, torch.int32):
        return False
    vocab, visual = config.text_config.vocab_size, (config.video_token_id, config.image_token_id)
    if input_ids.numel() <= 64:  # a decode step: reading a few ids once is cheaper than several kernels
        return all(0 <= i < vocab and i not in visual for i in input_ids.flatten().tolist())
    other = (input_ids < 0) | (input_ids >= vocab) | (input_ids == visual[0]) | (input_ids == visual[1])
    return not bool(other.any())


def check_inputs_embeds(
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor,
    pixel_values_videos: torch.Tensor | None,
    pixel_values: torch.Tensor | None,
) -> None:
    """`inputs_embeds` `[batch, seq, hidden]` replaces `input_ids` for text only: the ids say where the visual
    windows are, which embeddings cannot."""
    if input_ids is not None:
        raise ValueError("Pass either input_ids or inputs_embeds, not both.")
    if pixel_values_videos is not None or pixel_values is not None:
        raise ValueError(
            "inputs_embeds works for text-only prompts: a visual prompt needs input_ids, because the video and "
            "image token ids mark where each window of frames goes and how it is compressed."
        )
    if inputs_embeds.dim() != 3 or inputs_embeds.shape[1] == 0:
        raise ValueError(f"inputs_embeds must be a non-empty [batch, seq, hidden], got {tuple(inputs_embeds.shape)}")


def check_output_attentions(output_attentions: bool | None) -> None:
    if output_attentions:
        raise ValueError(
            "output_attentions is not supported: each window attends to a compressed memory that changes from "
            "window to window, so there is no [seq, seq] attention map to return. Use output_hidden_states."
        )


__all__ = ["VisualInputs", "check_attention_mask", "check_input_ids", "check_inputs_embeds", "check_output_attentions", "check_pixel_values",
           "is_plain_text", "same_layout", "visual_kinds"]
