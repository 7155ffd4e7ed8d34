"""Train the tiny demo Video-XL on synthetic needle videos, with the project's own Trainer path.

    python -m scripts.train_tiny --output demo/model [--steps 10000] [--vision-steps 2500] [--seed 0]

The model (about 1.2 M parameters) has the real architecture at a small size: a 3-layer CLIP-style tower on 224 px
frames with 28 px patches (8x8 patches -> 2x2 pool -> 16 tokens per frame), the 2-layer projector, a 4-layer
Qwen2-style LLM with VST projections and tied word embeddings, windows of 10 frames (160 tokens), ratios drawn per
window from {2, 4, 8, 16}, videos of 1 to 20 windows. Stage 1 (`pretrain_vision`) teaches the tower to see needles on
single frames; stage 2 keeps the tower frozen and trains the projector and LLM through the Trainer on four-option
questions about needles (colour, shape, position of one object; the order of two; how many of one kind), whose
answers only come out right if the compressed memory carries what was seen, plus a loss that makes the position
answering a retrieval or ordering question score all of its needle's words (`needle_words_loss`), and two that make
each VST, as the last layer reads it, name the needle its own tokens show (`vst_words_loss`) and how many needles
have appeared so far (`running_count_loss`). Samples are generated on the fly from seeds; evaluation seeds are
disjoint from them. How long the shipped weights took on the 2-core CPU this repo was built on, and what they
score: README, "The bundled tiny model".
"""

import argparse
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import Trainer, TrainingArguments

if __package__ in (None, ""):  # run as a file: make the repo root importable for `demo.build_tiny_tokenizer`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo.build_tiny_tokenizer import SPACE_MARK, build_tiny_tokenizer  # noqa: E402
from demo.synth import COLOURS, COUNTS, KINDS, POSITIONS, SHAPES, Needle, Sample, make_sample  # noqa: E402
from scripts.collator import VideoXLCollator  # noqa: E402
from scripts.local_import import CODE_FILES, REPO_ROOT, VideoXLConfig, VideoXLForCausalLM, processing  # noqa: E402
from scripts.cli import HelpFormatter  # noqa: E402

FRAME_SIZE, PATCH, TOKENS_PER_FRAME, WINDOW_FRAMES = 224, 28, 16, 10
MAX_WINDOWS = 20  # 200 frames: the longest video the needle goals ask about
TINY_PINPOINTS = [[FRAME_SIZE * a, FRAME_SIZE * b] for a in (1, 2) for b in (1, 2) if a * b > 1]  # images of up to 2x2 tiles
TRAIN_RATIOS = [2, 4, 8, 16]
RETRIEVAL_ATTRIBUTES = ("colour", "shape", "position")  # one question per video: see `training_sample`
KIND_WEIGHTS = (0.5, 0.25, 0.25)  # of demo.synth.KINDS: retrieval, ordering, counting
TRAIN_SEED_OFFSET = 1_000_000  # videos from here up, vision-stage frames from half of it; evaluation stays below
# Training renders the central square only: the processor's centre crop would discard the side strips anyway.
TRAIN_HEIGHT = TRAIN_WIDTH = 240


def tiny_config(tokenizer) -> VideoXLConfig:
    ids = tokenizer.convert_tokens_to_ids
    return VideoXLConfig(
        text_config=dict(
            model_type="qwen2",
            vocab_size=len(tokenizer),
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=8192,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            tie_word_embeddings=True,
            bos_token_id=ids("<|im_start|>"),
            eos_token_id=ids("<|im_end|>"),
            pad_token_id=ids("<|endoftext|>"),
        ),
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=96,
            intermediate_size=192,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=FRAME_SIZE,
            patch_size=PATCH,
        ),
        image_token_id=ids("<image>"),
        video_token_id=ids("<video>"),
        beacon_window=WINDOW_FRAMES * TOKENS_PER_FRAME,
        beacon_ratio=16,
        beacon_train_ratios=TRAIN_RATIOS,
        image_grid_pinpoints=TINY_PINPOINTS,
        tie_word_embeddings=True,  # an answer copied from the context or the memory is the token's own vector
    )


def tiny_processor(tokenizer):
    chat_template = (REPO_ROOT / "chat_template.jinja").read_text()
    return processing().VideoXLProcessor(
        tokenizer=tokenizer,
        chat_template=chat_template,
        num_image_tokens=TOKENS_PER_FRAME,
        image_size=FRAME_SIZE,
        num_frames=WINDOW_FRAMES * 10,
        image_grid_pinpoints=TINY_PINPOINTS,
    )


def training_group(seed: int, progress: float, size: int) -> list[dict]:
    """Up to `size` LLaVA-style samples with one frame count (so they batch together; `size // windows` of them),
    each a video and one question: an attribute of one needle, an ordering or a counting one.

    Answers are the option's text ("red"), as the questions ask (`demo.synth.ANSWER_INSTRUCTION`). For the first
    quarter of training (`progress` < 0.25) videos are one window long, then they span 1 to 20 windows (w with
    probability proportional to 1/w); each sample's kind is drawn by `KIND_WEIGHTS` throughout. A retrieval needle
    first stays on screen for a whole window and shrinks to a single frame at 60% of training: a long needle reaches
    every VST of its window, so the path from the memory to the answer is learned before the needle has to be found
    in it.
    """
    rng = np.random.default_rng(seed)
    windows = np.arange(1, 2 if progress < 0.25 else MAX_WINDOWS + 1)
    num_windows = int(rng.choice(windows, p=(1 / windows) / (1 / windows).sum()))
    num_frames = num_windows * WINDOW_FRAMES - int(rng.integers(0, 3))  # >= 8: room for 4 counted needles
    needle_len = max(1, round(WINDOW_FRAMES * (1 - progress / 0.6)))
    size = max(1, size // num_windows)  # about the same number of frames in every step
    kinds = rng.choice(KINDS, size=size, p=KIND_WEIGHTS)
    return [training_sample(seed * size + i, num_frames, str(kind), needle_len) for i, kind in enumerate(kinds)]


def training_sample(seed: int, num_frames: int, kind: str, needle_len: int = 1) -> dict:
    """One video and one question about it. Only one: a colour question names the shape and a shape question the
    colour, so a second question about the same needle could copy its answer from the first one's text instead of
    reading the video. `needle` is the needle the answer names (`answered_needle`), for `needle_words_loss`;
    `shown` every needle on screen, for the VST losses."""
    rng = np.random.default_rng(seed)
    if kind == "retrieval":
        attribute = str(rng.choice(RETRIEVAL_ATTRIBUTES))
        sample = make_sample(seed, num_frames, "retrieval", attribute=attribute, digit_prob=0.0,
                             needle_len=min(needle_len, num_frames), height=TRAIN_HEIGHT, width=TRAIN_WIDTH)
    else:
        sample = make_sample(seed, num_frames, kind, digit_prob=0.0, height=TRAIN_HEIGHT, width=TRAIN_WIDTH)
    turns = [{"from": "human", "value": sample.question}, {"from": "gpt", "value": sample.answer_text}]
    return {"video": sample.frames, "conversations": turns, "needle": answered_needle(sample),
            "shown": sample.needles}


def answered_needle(sample: Sample) -> Needle | None:
    """The needle a sample's answer names: the retrieval needle, or the ordering object that came first or last
    (None for counting, whose answer is a number)."""
    if sample.kind == "retrieval":
        return sample.needles[0]
    if sample.kind == "ordering":
        return next(needle for needle in sample.needles if needle.describe() == sample.answer_text)
    return None


def answer_tokens(tokenizer, text: str) -> list[int]:
    """Token ids of `text` as an answer starts with it (right after the assistant header)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def needle_word_groups(tokenizer) -> tuple[dict[str, list[int]], list[list[int]]]:
    """(each colour, shape and position's answer tokens; the groups a needle is told apart in: the first tokens of
    the colours, of the shapes and of the positions (top/bottom), and the positions' second tokens (left/right))."""
    words = {value: answer_tokens(tokenizer, value) for value in (*COLOURS, *SHAPES, *POSITIONS)}
    groups = [sorted({words[value][0] for value in COLOURS}), sorted({words[value][0] for value in SHAPES}),
              sorted({words[value][0] for value in POSITIONS}), sorted({words[value][1] for value in POSITIONS})]
    return words, groups


def needle_classes(needle: Needle, words: dict[str, list[int]], groups: list[list[int]]) -> list[int]:
    """The needle's colour, shape, top/bottom and left/right as indices into `groups`."""
    first, second = words[needle.position]
    tokens = [words[needle.colour][0], words[needle.shape][0], first, second]
    return [group.index(token) for group, token in zip(groups, tokens)]


def share_spaced_word_embeddings(model: VideoXLForCausalLM, tokenizer) -> None:
    """Start "▁red" (a word after a space, as in the options) as a copy of "red" (as an answer starts), so an
    option and the same word as an answer are one vector from the first step."""
    vocab = tokenizer.get_vocab()
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        for piece, index in vocab.items():
            if piece.startswith(SPACE_MARK) and piece[1:] in vocab:
                weight[index] = weight[vocab[piece[1:]]]


GRID = FRAME_SIZE // PATCH // 2  # pooled tokens per side of a frame (4: 16 tokens)


def needle_tokens(box: tuple[int, int, int]) -> tuple[int, list[int]]:
    """(the pooled token under the needle's centre, every pooled token the needle touches) of a training frame,
    indices in a frame's row-major token order. Training frames are square, so the processor only scales them."""
    x0, y0, size = box
    scale, cell = FRAME_SIZE / TRAIN_WIDTH, FRAME_SIZE / GRID
    left, top, right, bottom = (int(v * scale // cell) for v in (x0, y0, x0 + size - 1, y0 + size - 1))
    centre = int((y0 + size / 2) * scale // cell) * GRID + int((x0 + size / 2) * scale // cell)
    return centre, [row * GRID + col for row in range(top, bottom + 1) for col in range(left, right + 1)]


def token_classes(needles: list[Needle], num_frames: int, words: dict[str, list[int]],
                  groups: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """For every visual token of a video (`[num_frames * tokens per frame]`): the classes (`needle_classes`,
    `[..., 4]`) of the needle it shows, and how many needles have appeared up to it, counting its own (the
    target of `running_count_loss`); -100 where it shows none."""
    classes = torch.full((num_frames, GRID * GRID, 4), -100)
    counts = torch.full((num_frames, GRID * GRID), -100)
    for needle in needles:
        _, touched = needle_tokens(needle.box)
        begun = sum(other.frames[0] <= needle.frames[0] for other in needles)
        for frame in needle.frames:
            classes[frame, touched] = torch.tensor(needle_classes(needle, words, groups))
            counts[frame, touched] = begun
    return classes.flatten(0, 1), counts.flatten(0, 1)


class NeedleFrames(torch.utils.data.IterableDataset):
    """Batches for the vision stage, `pairs` needle frames and as many haystack frames: `(pixels [2n, 3, S, S],
    classes [n, 4], centres [n], quiet [2n, tokens])`. `classes` holds each needle's colour, shape, top/bottom and
    left/right as indices into `groups`; `centres` the flat index (frame * tokens + token) of the token under its
    centre; `quiet` marks the tokens that show no needle."""

    def __init__(self, processor, groups: list[list[int]], words: dict[str, list[int]], steps: int, pairs: int,
                 offset: int):
        self.image_processor, self.groups, self.words = processor.image_processor, groups, words
        self.steps, self.pairs, self.offset = steps, pairs, offset

    def __iter__(self):
        tokens = GRID * GRID
        for step in range(self.steps):
            crops, classes, centres = [], [], []
            quiet = torch.ones(2 * self.pairs, tokens, dtype=torch.bool)
            for i in range(self.pairs):
                sample = make_sample(self.offset + step * self.pairs + i, 2, "retrieval", digit_prob=0.0,
                                     height=TRAIN_HEIGHT, width=TRAIN_WIDTH)
                needle = sample.needles[0]
                for index, frame in enumerate(sample.frames):
                    crops.append(self.image_processor.resize_crop(Image.fromarray(frame)))
                    if index in needle.frames:
                        centre, touched = needle_tokens(needle.box)
                        quiet[len(crops) - 1, touched] = False
                        centres.append((len(crops) - 1) * tokens + centre)
                        classes.append(needle_classes(needle, self.words, self.groups))
            yield (self.image_processor.frames_to_pixels(crops), torch.tensor(classes), torch.tensor(centres), quiet)


def strengthen_position_embeddings(model: VideoXLForCausalLM, std: float = 0.5) -> None:
    """Start the tower's position embeddings at about the scale of its patch embeddings. At CLIP's initial scale
    (0.02 against ~1) where a token sits is a faint signal that this tiny tower did not learn to read in hundreds of
    steps (quadrant at chance); at this scale it learns it in about a hundred."""
    embedding = model.model.vision_tower.vision_tower.vision_model.embeddings.position_embedding.weight
    with torch.no_grad():
        embedding.mul_(std / embedding.std())


def pretrain_vision(model: VideoXLForCausalLM, processor, steps: int, seed: int, pairs: int = 16,
                    lr: float = 2e-3) -> None:
    """Stage 1: the tower and projector learn to see needles. Each projected token is scored against the (tied)
    word embeddings of every colour, shape and quadrant word by cosine similarity (a scale-free score: the raw dot
    product of two tensors this small at initialisation barely moves). The token under a needle's centre must score
    its colour, shape, top/bottom and left/right words highest within each group; a token that shows no needle
    must score every word below 0. Real Video-XL starts from a pretrained CLIP; this is the tiny model's stand-in,
    and it puts the needle's words into the token where it is, so the LLM stage learns to find and copy them rather
    than to see."""
    words, groups = needle_word_groups(processor.tokenizer)
    vocabulary = [token for group in groups for token in group]
    spans = np.cumsum([0] + [len(group) for group in groups])
    encoder = model.model
    embeddings = encoder.embed_tokens.weight
    parameters = [*encoder.vision_tower.parameters(), *encoder.mm_projector.parameters(), embeddings]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    frames = NeedleFrames(processor, groups, words, steps, pairs, TRAIN_SEED_OFFSET // 2 + seed * 10**6)
    loader = torch.utils.data.DataLoader(frames, batch_size=None, num_workers=1)
    for step, (pixels, classes, centres, quiet) in enumerate(loader):
        scores = cosine_scores(encoder.encode_frames(pixels), embeddings[vocabulary])  # [frames, tokens, words]
        silent = scores[quiet]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(silent, torch.zeros_like(silent))
        centre_scores = scores.flatten(0, 1)[centres]
        hits = []
        for g in range(len(groups)):
            group_scores = centre_scores[:, spans[g] : spans[g + 1]]
            loss = loss + torch.nn.functional.cross_entropy(group_scores, classes[:, g])
            hits.append((group_scores.argmax(dim=1) == classes[:, g]).float().mean().item())
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            print(f"vision step {step}: loss {loss.item():.3f}, accuracy colour {hits[0]:.2f} shape {hits[1]:.2f} "
                  f"quadrant {hits[2] * hits[3]:.2f}", flush=True)


def freeze_tower(model: VideoXLForCausalLM) -> None:
    """Keep the tower as stage 1 left it; the projector trains on. With the tower training too, stage 2 erased what
    stage 1 taught (a probe of the tokens fell to chance on shape and quadrant) and learned more slowly; with the
    projector frozen as well, the LLM learned more slowly too. Frozen, the tower also skips its backward pass."""
    model.model.vision_tower.requires_grad_(False)


def needle_words_loss(logits: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor,
                      groups: list[list[int]]) -> torch.Tensor:
    """Cross-entropy, within each group of `groups`, of the logits that predict the first token of an answer that
    names a needle (retrieval, ordering: `answered_needle`) against that needle's own word: its colour, its shape,
    top/bottom and left/right, all four whichever the question asks. With the answer's loss alone, runs learned to
    carry one attribute from the memory to the answer well and the rest weakly, a different one in each run, and
    ordering stayed at chance; README, "The bundled tiny model", has what this loss changed.

    `logits` `[batch, columns, vocab]` at the labelled columns (as the model computes them in training), `labels`
    `[batch, seq]`, `classes` `[batch, 4]` indices into `groups` (-100 for a sample whose answer names no needle).
    """
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100) != -100
    columns = shifted.any(dim=0).nonzero().squeeze(1)
    rows = (classes[:, 0] >= 0).nonzero().squeeze(1)
    if len(rows) == 0:
        return logits.sum() * 0.0
    first_answer_column = torch.searchsorted(columns, shifted[rows].int().argmax(dim=1))
    answer_logits = logits[rows, first_answer_column]  # [rows naming a needle, vocab]
    losses = [torch.nn.functional.cross_entropy(answer_logits[:, group], classes[rows, g])
              for g, group in enumerate(groups)]
    return torch.stack(losses).mean()


def vst_classes(per_token: torch.Tensor, ratios: list[int], window: int) -> torch.Tensor:
    """`[batch, vsts, ...]`: what the needle each VST's own `ratio` visual tokens show is marked with (-100: none),
    from `per_token` `[batch, visual tokens, ...]` (`token_classes`' classes or counts) and the ratio of each
    window of `window` tokens, in order. A VST closes `ratio` tokens of one frame (every ratio divides a frame's
    tokens), so they show at most one needle."""
    pieces, start = [], 0
    for ratio in ratios:
        chunk = per_token[:, start : start + window]
        pieces.append(chunk.unflatten(1, (-1, ratio)).amax(dim=2))  # -100 < every class: a needle token wins
        start += chunk.shape[1]
    return torch.cat(pieces, dim=1)


def vst_words_loss(states: torch.Tensor, embeddings: torch.Tensor, classes: torch.Tensor,
                   groups: list[list[int]]) -> torch.Tensor:
    """Stage 1's target (`pretrain_vision`) on the VSTs as the last layer reads them: a VST whose own tokens show
    a needle must score its colour, shape, top/bottom and left/right words highest within each group. Other VSTs
    are left free: pushing them below 0 on every needle word as well made shape reliable but cut ordering to
    chance.

    `states` `[batch, vsts, hidden]`, `embeddings` the (tied) word embeddings, `classes` `[batch, vsts, 4]`
    (`vst_classes`).
    """
    shows = classes[..., 0] >= 0
    if not shows.any():
        return states.sum() * 0.0
    vocabulary = [token for group in groups for token in group]
    scores = cosine_scores(states[shows], embeddings[vocabulary])  # [VSTs showing a needle, words]
    spans = np.cumsum([0] + [len(group) for group in groups])
    losses = [torch.nn.functional.cross_entropy(scores[:, spans[g] : spans[g + 1]], classes[shows][:, g])
              for g in range(len(groups))]
    return torch.stack(losses).sum()


def running_count_loss(states: torch.Tensor, embeddings: torch.Tensor, counts: torch.Tensor,
                       count_tokens: list[int]) -> torch.Tensor:
    """A VST whose own tokens show a needle must score, among the words "1" to "4" (`count_tokens`), the number of
    needles that have appeared so far, its own included: a counted object's k-th copy says k, an ordering pair's
    later object 2. Averaged over the needle's VSTs, these numbers tell 1 to 4 copies apart at any video length;
    without it counting stayed at 38-48 %, with it ordering rose too (README, "The bundled tiny model").

    `states` `[batch, vsts, hidden]`, `counts` `[batch, vsts]` (`vst_classes` of `token_classes`' counts).
    """
    shows = counts >= 1
    if not shows.any():
        return states.sum() * 0.0
    scores = cosine_scores(states[shows], embeddings[count_tokens])  # [VSTs showing a needle, 4]
    return torch.nn.functional.cross_entropy(scores, counts[shows] - 1)


def cosine_scores(states: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """`[..., words]`: 10 x the cosine of each state `[..., hidden]` with each word embedding `[words, hidden]`; at
    this scale the scores of tensors this small can reach a confident softmax."""
    normalize = torch.nn.functional.normalize
    return 10.0 * normalize(states, dim=-1) @ normalize(words, dim=-1).T


class NeedleTrainer(Trainer):
    """The Trainer with `needle_words_loss`, `vst_words_loss` and `running_count_loss` added to the model's loss
    (weight 1 each). `count_tokens`: the tokens of "1" to "4"."""

    def __init__(self, *args, groups: list[list[int]], count_tokens: list[int], **kwargs):
        super().__init__(*args, **kwargs)
        self.groups, self.count_tokens = groups, count_tokens
        self.model.model.ratio_schedule.start_recording()  # which VSTs close which tokens: `vst_classes`

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        classes = inputs.pop("needle_classes")
        shown, counts = inputs.pop("needle_token_classes"), inputs.pop("needle_token_counts")
        inputs["output_hidden_states"] = True
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        (ratios,) = model.model.ratio_schedule.take_recorded()
        window = model.config.beacon_window
        per_vst, counts = vst_classes(shown, ratios, window), vst_classes(counts, ratios, window)
        first_vst = int((inputs["input_ids"][0] == model.config.video_token_id).nonzero()[0])
        states = outputs.hidden_states[-2][:, first_vst : first_vst + per_vst.shape[1]]  # the last layer's input
        embeddings = model.get_input_embeddings().weight
        loss = loss + needle_words_loss(outputs.logits, inputs["labels"], classes, self.groups)
        loss = loss + vst_words_loss(states, embeddings, per_vst, self.groups)
        loss = loss + running_count_loss(states, embeddings, counts, self.count_tokens)
        return (loss, outputs) if return_outputs else loss


class NeedleBatches:
    """The project's collator, plus each sample's `needle_classes` (`[batch, 4]`, -100 where the answer names no
    needle) and, per visual token, `needle_token_classes` (`[batch, visual tokens, 4]`) and `needle_token_counts`
    (`[batch, visual tokens]`) from `token_classes` (the samples of a batch have one frame count)."""

    def __init__(self, collator: VideoXLCollator, words: dict[str, list[int]], groups: list[list[int]]):
        self.collator, self.words, self.groups = collator, words, groups

    def __call__(self, items: list[list[dict]]) -> dict:
        (samples,) = items  # each dataset item is a whole batch (per-device batch size 1)
        batch = self.collator(samples)
        batch["needle_classes"] = torch.tensor([
            needle_classes(sample["needle"], self.words, self.groups) if sample["needle"] else [-100] * 4
            for sample in samples
        ])
        per_token = [token_classes(sample["shown"], len(sample["video"]), self.words, self.groups)
                     for sample in samples]
        batch["needle_token_classes"] = torch.stack([classes for classes, _ in per_token])
        batch["needle_token_counts"] = torch.stack([counts for _, counts in per_token])
        return batch


class NeedleDataset(torch.utils.data.IterableDataset):
    """`length` groups of `group_size` synthetic samples, in order (the curriculum needs it): group i from seed
    `offset + i`."""

    def __init__(self, length: int, offset: int, group_size: int, start_progress: float = 0.0):
        self.length, self.offset, self.group_size = length, offset, group_size
        self.start_progress = start_progress

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[list[dict]]:
        for index in range(self.length):
            progress = self.start_progress + (1 - self.start_progress) * index / self.length
            yield training_group(self.offset + index, progress, self.group_size)


def link_code_files(output: Path) -> None:
    """Point the model dir's code files at the repo's, so the shipped model never runs a drifting copy."""
    for name in CODE_FILES:
        target = output / name
        if target.exists() or target.is_symlink():
            target.unlink()
        target.symlink_to(os.path.relpath(REPO_ROOT / name, output))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "demo" / "model",
                        help="where the trained model is written (default: demo/model)")
    parser.add_argument("--steps", type=int, default=10000, help="training steps after the vision probe")
    parser.add_argument("--vision-steps", type=int, default=2500, help="stage 1: the vision probe steps (0: skip)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--group-size", type=int, default=8, help="samples per step (one frame count)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and data")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/videoxl_train_tiny"), help="checkpoints and logs")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --work-dir")
    parser.add_argument("--init", type=Path, help="start from this model's weights (e.g. demo/model) instead of random")
    parser.add_argument("--start-progress", type=float, default=0.0,
                        help="skip the curriculum up to this point (0.25: long videos and every kind from the start)")
    return parser


def main() -> None:
    args = build_parser().parse_args()

    torch.manual_seed(args.seed)
    tokenizer = build_tiny_tokenizer(args.work_dir / "tokenizer")
    processor = tiny_processor(tokenizer)
    config = tiny_config(tokenizer)
    config._attn_implementation = "sdpa"
    if args.init:
        model = VideoXLForCausalLM.from_pretrained(args.init)
    else:
        model = VideoXLForCausalLM(config)
        share_spaced_word_embeddings(model, tokenizer)
        strengthen_position_embeddings(model)
    model.seed_compression_ratios(args.seed)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    start = time.time()
    vision_steps = 0 if args.resume else args.vision_steps  # a resumed run's weights have been through stage 1
    if vision_steps:
        pretrain_vision(model, processor, vision_steps, args.seed)
    freeze_tower(model)

    training_args = TrainingArguments(
        output_dir=str(args.work_dir / "trainer"),
        max_steps=args.steps,
        per_device_train_batch_size=1,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=min(100, args.steps // 10),
        weight_decay=0.0,
        logging_steps=25,
        save_strategy="steps",
        save_steps=250,
        save_total_limit=1,
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=1,
        seed=args.seed,
        disable_tqdm=True,
    )
    collator = VideoXLCollator(processor, fps=1.0, video_fps=1.0)  # every generated frame, in order
    dataset = NeedleDataset(args.steps, TRAIN_SEED_OFFSET + args.seed * args.steps, args.group_size,
                            args.start_progress)
    words, groups = needle_word_groups(tokenizer)
    count_tokens = [answer_tokens(tokenizer, count)[0] for count in COUNTS]
    trainer = NeedleTrainer(model=model, args=training_args, train_dataset=dataset,
                            data_collator=NeedleBatches(collator, words, groups), groups=groups,
                            count_tokens=count_tokens)
    trainer.train(resume_from_checkpoint=args.resume)
    minutes = (time.time() - start) / 60
    print(f"trained {vision_steps} vision steps and {args.steps} steps in {minutes:.1f} min")

    args.output.mkdir(parents=True, exist_ok=True)
    for name in CODE_FILES:  # save_pretrained copies the code files and cannot copy onto a link to themselves
        (args.output / name).unlink(missing_ok=True)
    model.eval()
    model.save_pretrained(args.output)
    processor.save_pretrained(args.output)
    link_code_files(args.output)
    shutil.rmtree(args.work_dir / "trainer", ignore_errors=True)
    print(f"saved {args.output} ({sum(f.stat().st_size for f in args.output.iterdir() if f.is_file()) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
