# Copyright 2024 BAAI and the Video-XL authors; this file: the Video-XL transformers port.
# Licensed under the Apache License, Version 2.0.
"""`pipeline("image-text-to-text", ...)` for Video-XL: batches of any mix of videos, images and text-only prompts.

transformers' pipeline prepares each prompt alone and joins a batch with `pad_collate_fn`, which needs every prompt to
hold the same keys and pads each tensor but `pixel_values` along its second axis. A video, an image and a text-only
prompt hold different keys (`pixel_values_videos`; `pixel_values` and `image_sizes`; neither), and padding a video's
frame axis would invent frames. So each prompt's visual inputs cross the collate as one non-tensor entry, and
`_forward` joins them as the processor lays out a batch: frames and tiles in order of appearance, prompt after prompt.
The model runs prompts of different layouts each on its own memory (`VideoXLModel.forward_per_sample`).

config.json names this class under `custom_pipelines`, so `pipeline(..., model=path, trust_remote_code=True)` uses it.
"""

import torch
from transformers.pipelines.image_text_to_text import ImageTextToTextPipeline


VISUAL_KEYS = ("pixel_values_videos", "pixel_values", "image_sizes")
VISUAL_ENTRY = "visual_inputs"


class VideoXLImageTextToTextPipeline(ImageTextToTextPipeline):
    """transformers' image-text-to-text pipeline whose batches may mix videos, images and text-only prompts."""

    def preprocess(self, *args, **kwargs):
        model_inputs = super().preprocess(*args, **kwargs)
        model_inputs[VISUAL_ENTRY] = {key: model_inputs.pop(key) for key in VISUAL_KEYS if key in model_inputs}
        return model_inputs

    def _forward(self, model_inputs, generate_kwargs=None):
        entry = model_inputs.pop(VISUAL_ENTRY)
        prompts = entry if isinstance(entry, list) else [entry]  # a list once collated; one dict at batch_size=1
        for key in VISUAL_KEYS:
            parts = [flat_visual_input(key, prompt[key]) for prompt in prompts if key in prompt]
            if parts:
                model_inputs[key] = torch.cat(parts)
        return super()._forward(model_inputs, generate_kwargs)


def flat_visual_input(key: str, value: torch.Tensor) -> torch.Tensor:
    """Pixels as `[frames or tiles, 3, H, W]` (from `[videos, frames, 3, H, W]` too); `image_sizes` `[images, 2]`."""
    return value if key == "image_sizes" else value.reshape(-1, *value.shape[-3:])


__all__ = ["VideoXLImageTextToTextPipeline"]
