"""`pipeline("image-text-to-text", batch_size=N)` over any mix of videos, images and text-only prompts, in any order:
the greedy ids of every prompt equal those it gets alone (pipeline_videoxl.py)."""

import numpy as np
import pytest
from PIL import Image
from transformers import pipeline

from demo.run import BUNDLED_MODEL
from demo.synth import write_video


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    rng = np.random.default_rng(5)
    folder = tmp_path_factory.mktemp("videos")
    videos = []
    for frames in (3, 5):
        path = folder / f"clip_{frames}.mp4"
        write_video(rng.integers(0, 255, (frames, 96, 128, 3), dtype=np.uint8), path, fps=2)
        videos.append(str(path))
    image = lambda h, w: Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))  # noqa: E731
    user = lambda *content: [{"role": "user", "content": list(content)}]  # noqa: E731
    text = lambda t: {"type": "text", "text": t}  # noqa: E731
    return [
        user({"type": "video", "path": videos[0]}, text("What colour was the square?")),
        user(text("What is a video?")),
        user({"type": "image", "image": image(224, 224)}, text("Describe.")),
        user({"type": "video", "path": videos[1]}, text("How many times did a red star appear in the video?")),
        user({"type": "image", "image": image(300, 600)}, text("Which shape is shown, and where?")),
        user(text("A?")),
        user({"type": "video", "path": videos[1]}, {"type": "image", "image": image(224, 448)}, text("Both?")),
    ]


def generated_ids(pipe, prompts, **options):
    """Each prompt's ids and its greedy continuation, without the batch's padding (left before the prompt, right
    after an early end)."""
    # A fresh generate_kwargs per call: transformers 5.23's pipeline writes max_new_tokens into the dict it is given.
    outputs = pipe(text=prompts, max_new_tokens=6, return_tensors=True, generate_kwargs={"do_sample": False},
                   processor_kwargs={"num_frames": 4}, **options)
    pad = pipe.tokenizer.pad_token_id
    rows = [[int(i) for i in out[0]["generated_token_ids"]] for out in outputs]
    kept = lambda row: [i for i, t in enumerate(row) if t != pad]  # noqa: E731
    return [row[kept(row)[0] : kept(row)[-1] + 1] for row in rows]


def test_pipeline_uses_the_repos_class():
    pipe = pipeline("image-text-to-text", model=str(BUNDLED_MODEL), trust_remote_code=True)
    assert type(pipe).__name__ == "VideoXLImageTextToTextPipeline"


@pytest.mark.parametrize("batch_size", [2, 3, 4])
def test_mixed_batches_equal_one_prompt_at_a_time(prompts, batch_size):
    pipe = pipeline("image-text-to-text", model=str(BUNDLED_MODEL), trust_remote_code=True)
    alone = generated_ids(pipe, prompts, batch_size=1)
    assert generated_ids(pipe, prompts, batch_size=batch_size) == alone
    reordered = prompts[::-1]
    assert generated_ids(pipe, reordered, batch_size=batch_size) == alone[::-1]
