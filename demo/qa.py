"""Ask a Video-XL model a question about a video: the path shared by `make demo` and the needle harness."""

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoProcessor

from scripts.local_import import compat


@dataclass
class Answer:
    text: str
    frames: int
    visual_tokens: int  # raw visual tokens the prompt held
    kept: int  # positions in the compressed memory after the prompt
    seconds: float


def load(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """Model and processor from a directory with remote code (offline)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, dtype=dtype).eval()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    return model, processor


def ask(
    model,
    processor,
    video: Any,
    question: str,
    ratio: int | None = None,
    max_new_tokens: int = 16,
    **sampling: Any,
) -> Answer:
    """Greedy answer to `question` about `video` (path, array `[F, H, W, 3]` or frames); `sampling` goes to the
    processor (num_frames / fps / max_frames / video_fps)."""
    start = time.time()
    messages = [{"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": question}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", **sampling
    )
    prompt_length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        output = model.generate(
            **inputs,
            compression_ratio=ratio,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            return_dict_in_generate=True,
        )
    text = processor.tokenizer.decode(output.sequences[0, prompt_length:], skip_special_tokens=True)
    visual = int((inputs["input_ids"] == model.config.video_token_id).sum())
    kept = compat.cache_of(output).get_seq_length() - (output.sequences.shape[1] - prompt_length - 1)
    return Answer(text.strip(), visual // model.config.tokens_per_frame, visual, kept, time.time() - start)


def answer_letter(text: str, question: str | None = None) -> str | None:
    """The option letter a free-form answer names, as the needle test scores it: the first standalone A-D; failing
    that, the letter of the option (an "A. ..." line of `question`) whose text the answer is."""
    match = re.search(r"\b([A-D])\b", text)
    if match:
        return match.group(1)
    options = dict(re.findall(r"^([A-D])\. (.+)$", question or "", flags=re.MULTILINE))
    said = " ".join(text.lower().split()).strip(" .")
    return next((letter for letter, option in options.items() if option.strip().lower() == said), None)
