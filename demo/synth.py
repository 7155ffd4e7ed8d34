"""Synthetic long videos with needles, and multiple-choice questions about them.

A *haystack* is a seeded, non-trivial video (moving blobs, drifting textures, evolving noise, or
scene cuts between those) drawn only in muted, low-saturation colours. A *needle* is a vivid
object (colour, shape, optionally a digit, quadrant position) pasted onto one frame, or a short
run of ``needle_len`` frames, at a chosen depth. The question is four-option multiple choice in
the style of Video-XL's needle test and VNBench's task kinds:

- ``retrieval``: one attribute of the needle (colour / shape / digit / position);
- ``ordering``: two needles at different depths, "which of these appeared first / last";
- ``counting``: ``k`` (1..4) needles of one colour and shape, "how many times ...".

Frames are uint8 ``[F, H, W, 3]`` (default 240x320). The processor resizes the shortest side to
336 and centre-crops 336x336, so everything a question depends on lives in the central
``min(H, W)`` square; the side strips are haystack only.

``make_sample(seed, ...)`` is deterministic per seed; ``needle=False`` gives the same haystack,
question and options without the needle (a control where a model must be at chance).
"""

from __future__ import annotations

import argparse
import colorsys
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# ---------------------------------------------------------------------------------------------
# Vocabulary of the task: everything a question, option or answer can contain comes from here,
# so the tiny tokenizer can enumerate it (see ``corpus_texts``).
# ---------------------------------------------------------------------------------------------

#: Vivid needle colours: saturation ~0.9, far from the muted haystack palette (chroma <= ~60).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (235, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 70, 245),
    "yellow": (245, 225, 20),
    "magenta": (230, 30, 230),
    "cyan": (20, 215, 235),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
DIGITS: tuple[str, ...] = tuple("0123456789")
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
KINDS: tuple[str, ...] = ("retrieval", "ordering", "counting")
ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "digit", "position")
LETTERS: str = "ABCD"
ANSWER_INSTRUCTION = "Answer with the option's text."

RETRIEVAL_PROMPTS: dict[str, str] = {
    "colour": "What colour was the {shape} that appeared in the video?",
    "shape": "What shape was the {colour} object that appeared in the video?",
    "digit": "Which digit was written on the {colour} {shape}?",
    "position": "Where in the frame did the {colour} {shape} appear?",
}
ORDERING_PROMPT = "Which of these objects appeared {which} in the video?"
ORDERING_WHICH: tuple[str, ...] = ("first", "last")
COUNTING_PROMPT = "How many times did a {colour} {shape} appear in the video?"
COUNTS: tuple[str, ...] = ("1", "2", "3", "4")
#: Frames without them between two needle runs of a counting or ordering question: runs that touch play as one
#: appearance, and "how many times" would have two answers.
APPEARANCE_GAP = 1

#: Haystack chroma (max - min over RGB) stays below this; needle colours are far above it.
MAX_HAYSTACK_CHROMA = 80
_FRAME_CHUNK = 32  # frames rendered per vectorised block: bounds float32 memory for long videos


# ---------------------------------------------------------------------------------------------
# Data classes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Needle:
    """One vivid object shown on ``frames`` (consecutive indices) at a fixed place.

    ``box`` is ``(x0, y0, size)`` in frame pixels; the object fills a ``size x size`` square.
    """

    colour: str
    shape: str
    digit: str | None
    position: str
    frames: tuple[int, ...]
    box: tuple[int, int, int]

    def describe(self) -> str:
        """The object's name as the questions use it, e.g. ``"red circle"``."""
        return f"{self.colour} {self.shape}"


@dataclass
class Sample:
    """A synthetic video, its question and the answer.

    ``frames``: uint8 ``[F, H, W, 3]``. ``question`` holds the prompt, the four lettered options
    and the answer instruction; ``options[i]`` is the text behind ``LETTERS[i]``; ``answer`` is
    one letter. ``needle_frames`` lists the frame indices carrying a needle (empty for a control
    made with ``needle=False``; ``planned_needle_frames`` keeps where they would have been).
    """

    frames: np.ndarray
    question: str
    options: list[str]
    answer: str
    needle_frames: list[int]
    kind: str
    seed: int
    prompt: str
    attribute: str | None
    needles: list[Needle]
    distractors: list[Needle]
    depths: list[float]
    haystack: str
    has_needle: bool
    planned_needle_frames: list[int] = field(default_factory=list)

    @property
    def answer_text(self) -> str:
        """The option text of the correct answer."""
        return self.options[LETTERS.index(self.answer)]

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


# ---------------------------------------------------------------------------------------------
# Haystacks: each generator maps (rng, F, H, W) -> uint8 [F, H, W, 3] in muted colours.
# ---------------------------------------------------------------------------------------------

Generator = Callable[[np.random.Generator, int, int, int], np.ndarray]


def _muted_colours(
    rng: np.random.Generator, n: int, value_range: tuple[float, float] = (0.22, 0.78)
) -> np.ndarray:
    """``n`` low-saturation colours as float32 ``[n, 3]`` in 0..255.

    Saturation <= 0.3 and value <= 0.78 keep chroma <= ~60, so no blend of them (nor the
    grain added on top, which is equal on all channels) can look like a vivid needle colour.
    """
    hsv = np.stack(
        [rng.uniform(0, 1, n), rng.uniform(0.04, 0.3, n), rng.uniform(*value_range, n)], axis=1
    )
    rgb = [colorsys.hsv_to_rgb(*c) for c in hsv]
    return np.asarray(rgb, dtype=np.float32) * 255.0


def _dark_light_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A dark and a light muted colour (random order): ramps between them have real contrast."""
    dark = _muted_colours(rng, 1, (0.2, 0.42))[0]
    light = _muted_colours(rng, 1, (0.58, 0.78))[0]
    return (dark, light) if rng.random() < 0.5 else (light, dark)


@functools.lru_cache(maxsize=8)
def _grain_bank(height: int, width: int) -> np.ndarray:
    """A fixed bank of 7 grey grain frames, float32 ``[7, H, W, 1]`` in -6..6.

    Drawing fresh per-pixel noise for every frame would dominate the generation time; cycling
    a small fixed bank still makes consecutive frames differ pixel by pixel.
    """
    rng = np.random.default_rng(12345)
    return rng.integers(-6, 7, size=(7, height, width, 1)).astype(np.float32)


def _add_grain_and_quantise(block: np.ndarray, start: int, out: np.ndarray) -> None:
    """Add the grain bank to float ``block [f, H, W, 3]`` and write uint8 into ``out``."""
    bank = _grain_bank(block.shape[1], block.shape[2])
    idx = (np.arange(start, start + block.shape[0]) * 3) % len(bank)
    block += bank[idx]
    np.clip(block, 0, 255, out=block)
    out[...] = block.astype(np.uint8)


def _gradient_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A linear gradient between two muted colours, float32 ``[H, W, 3]``."""
    c0, c1 = _dark_light_pair(rng)
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = np.cos(angle) * xs / width + np.sin(angle) * ys / height
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    return c0 + ramp[..., None] * (c1 - c0)


def _bounce(x: np.ndarray) -> np.ndarray:
    """Fold positions onto 0..1 (a triangle wave) so moving blobs bounce off the borders."""
    return 1.0 - np.abs(np.mod(x, 2.0) - 1.0)


def moving_blobs(rng: np.random.Generator, num_frames: int, height: int, width: int) -> np.ndarray:
    """Soft-edged muted ellipses drifting and bouncing over a gradient, uint8 ``[F, H, W, 3]``.

    The ellipses are elongated (aspect >= 1.6) with blurred rims, so even ignoring colour they
    never look like a needle's crisp circle.
    """
    bg = _gradient_background(rng, height, width)
    k = int(rng.integers(3, 6))
    colours = _muted_colours(rng, k)
    radius = rng.uniform(0.1, 0.22, k) * min(height, width)
    aspect = rng.uniform(1.6, 3.0, k)
    wide = rng.random(k) < 0.5
    rx = np.where(wide, radius * aspect, radius)
    ry = np.where(wide, radius, radius * aspect)
    start = rng.uniform(0, 1, (k, 2))
    velocity = rng.uniform(-0.03, 0.03, (k, 2))
    t = np.arange(num_frames, dtype=np.float64)[:, None, None]
    centres = _bounce(start[None] + velocity[None] * t)  # [F, k, 2] as fractions (x, y)
    cx = (centres[..., 0] * width).astype(np.float32)
    cy = (centres[..., 1] * height).astype(np.float32)
    xs = np.arange(width, dtype=np.float32)
    ys = np.arange(height, dtype=np.float32)

    out = np.empty((num_frames, height, width, 3), np.uint8)
    for s in range(0, num_frames, _FRAME_CHUNK):
        e = min(s + _FRAME_CHUNK, num_frames)
        block = np.repeat(bg[None], e - s, axis=0)
        for b in range(k):
            # Separable ellipse distance: an [f,1,W] term plus an [f,H,1] term, one broadcast add.
            dx = ((xs[None, :] - cx[s:e, b, None]) / rx[b]) ** 2
            dy = ((ys[None, :] - cy[s:e, b, None]) / ry[b]) ** 2
            mask = dy[:, :, None] + dx[:, None, :]
            np.subtract(1.0, mask, out=mask)
            mask *= 3.0
            np.clip(mask, 0.0, 1.0, out=mask)
            block += mask[..., None] * (colours[b] - block)
        _add_grain_and_quantise(block, s, out[s:e])
    return out


def drifting_texture(
    rng: np.random.Generator, num_frames: int, height: int, width: int
) -> np.ndarray:
    """Two or three sinusoidal gratings drifting at different speeds, mapped to a muted ramp.

    Returns uint8 ``[F, H, W, 3]``. Each grating is written as ``sin(a + b)`` with ``a`` varying
    along x and time and ``b`` along y, so ``sin a cos b + cos a sin b`` is separable.
    """
    c0, c1 = _dark_light_pair(rng)
    n = int(rng.integers(2, 4))
    freq = rng.uniform(0.015, 0.08, n)
    theta = rng.uniform(0, np.pi, n)
    speed = rng.uniform(-0.4, 0.4, n)
    phase = rng.uniform(0, 2 * np.pi, n)
    xs = np.arange(width, dtype=np.float32)
    ys = np.arange(height, dtype=np.float32)
    out = np.empty((num_frames, height, width, 3), np.uint8)
    for s in range(0, num_frames, _FRAME_CHUNK):
        e = min(s + _FRAME_CHUNK, num_frames)
        t = np.arange(s, e, dtype=np.float32)[:, None]
        field_ = np.zeros((e - s, height, width), np.float32)
        for g in range(n):
            a = freq[g] * np.cos(theta[g]) * xs[None] + speed[g] * t + phase[g]  # [f, W]
            b = (freq[g] * np.sin(theta[g]) * ys).astype(np.float32)  # [H]
            field_ += np.sin(a)[:, None, :] * np.cos(b)[None, :, None]
            field_ += np.cos(a)[:, None, :] * np.sin(b)[None, :, None]
        ramp = np.clip(field_ * (0.9 / n) + 0.5, 0.0, 1.0)  # sums of n sines rarely reach n
        block = c0 + ramp[..., None] * (c1 - c0)
        _add_grain_and_quantise(block, s, out[s:e])
    return out


def _smooth_interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Float32 ``[n_out, n_in]`` weights upsampling a coarse grid with smoothstep blending."""
    u = np.linspace(0, n_in - 1, n_out)
    lo = np.minimum(np.floor(u).astype(int), n_in - 2)
    frac = u - lo
    frac = frac * frac * (3 - 2 * frac)  # smoothstep hides the coarse grid's creases
    m = np.zeros((n_out, n_in), np.float32)
    m[np.arange(n_out), lo] = 1 - frac
    m[np.arange(n_out), lo + 1] = frac
    return m


def evolving_noise(
    rng: np.random.Generator, num_frames: int, height: int, width: int
) -> np.ndarray:
    """Smooth value noise that morphs over time, through a three-colour muted palette.

    Returns uint8 ``[F, H, W, 3]``. Coarse random grids at keyframes every ~8 frames are blended
    in time, then upsampled with two small matrix products (cheap compared with per-pixel noise).
    """
    palette = np.stack([*_dark_light_pair(rng), _muted_colours(rng, 1)[0]])[[0, 2, 1]]
    gh, gw = int(rng.integers(3, 7)), int(rng.integers(4, 9))
    period = float(rng.uniform(5, 12))
    n_keys = int(num_frames / period) + 2
    keys = rng.uniform(0, 1, (n_keys, gh, gw)).astype(np.float32)
    up_h = _smooth_interp_matrix(height, gh)
    up_w = _smooth_interp_matrix(width, gw)
    out = np.empty((num_frames, height, width, 3), np.uint8)
    for s in range(0, num_frames, _FRAME_CHUNK):
        e = min(s + _FRAME_CHUNK, num_frames)
        pos = np.arange(s, e) / period
        i0 = pos.astype(int)
        w1 = (pos - i0).astype(np.float32)[:, None, None]
        coarse = keys[i0] * (1 - w1) + keys[i0 + 1] * w1  # [f, gh, gw]
        field_ = up_h @ coarse @ up_w.T  # [f, H, W]
        # Two-segment ramp through the three palette colours.
        lo = np.clip(field_ * 2.0, 0, 1)[..., None]
        hi = np.clip(field_ * 2.0 - 1.0, 0, 1)[..., None]
        block = palette[0] + lo * (palette[1] - palette[0]) + hi * (palette[2] - palette[1])
        _add_grain_and_quantise(block, s, out[s:e])
    return out


BASE_HAYSTACKS: dict[str, Generator] = {
    "blobs": moving_blobs,
    "texture": drifting_texture,
    "noise": evolving_noise,
}


def scene_cuts(rng: np.random.Generator, num_frames: int, height: int, width: int) -> np.ndarray:
    """Hard cuts between 2-5 scenes, each a fresh base haystack, uint8 ``[F, H, W, 3]``.

    Cuts are abrupt whole-frame changes, so a model cannot treat "something changed" as a
    needle cue: only the vivid object is.
    """
    n_scenes = int(min(rng.integers(2, 6), max(1, num_frames // 4)))
    cuts = np.sort(rng.choice(np.arange(1, num_frames), size=n_scenes - 1, replace=False))
    bounds = [0, *cuts.tolist(), num_frames]
    names = list(BASE_HAYSTACKS)
    out = np.empty((num_frames, height, width, 3), np.uint8)
    for s, e in zip(bounds[:-1], bounds[1:]):
        gen = BASE_HAYSTACKS[names[int(rng.integers(len(names)))]]
        out[s:e] = gen(np.random.default_rng(rng.integers(2**32)), e - s, height, width)
    return out


HAYSTACKS: dict[str, Generator] = {**BASE_HAYSTACKS, "cuts": scene_cuts}


def make_haystack(
    seed: int, num_frames: int, height: int = 240, width: int = 320, kind: str | None = None
) -> tuple[np.ndarray, str]:
    """The seed's haystack, uint8 ``[F, H, W, 3]``, and its generator name.

    Uses its own random stream, so the haystack depends only on (seed, F, H, W, kind) and is
    identical across question kinds and with or without needles.
    """
    rng = np.random.default_rng([seed, 1])
    name = kind if kind is not None else str(rng.choice(list(HAYSTACKS)))
    # Haystacks are smooth, so render at half resolution (4x less float work) and upsample.
    half = HAYSTACKS[name](rng, num_frames, (height + 1) // 2, (width + 1) // 2)
    return upsample2x(half)[:, :height, :width], name


def upsample2x(frames: np.ndarray) -> np.ndarray:
    """Nearest-neighbour 2x upsampling of ``[F, h, w, C]`` to ``[F, 2h, 2w, C]`` in one write."""
    f, h, w, c = frames.shape
    out = np.empty((f, h, 2, w, 2, c), frames.dtype)
    out[...] = frames[:, :, None, :, None, :]
    return out.reshape(f, 2 * h, 2 * w, c)


# ---------------------------------------------------------------------------------------------
# Needles: rendering and placement
# ---------------------------------------------------------------------------------------------


def _shape_polygon(shape: str, c: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape centred at ``(c, c)`` filling a box of half-side ``r``.

    Shapes fill their box generously (triangle and diamond span it fully, the star's inner
    radius is half its outer one) so every shape keeps a large vivid area around a digit.
    """
    if shape == "triangle":
        return [(c, c - r), (c + r, c + r), (c - r, c + r)]
    if shape == "star":
        angles = np.deg2rad(-90 + 36 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, r, 0.5 * r)
        return [(c + q * np.cos(a), c + q * np.sin(a) + 0.1 * r) for q, a in zip(radii, angles)]
    if shape == "diamond":
        return [(c, c - r), (c + r, c), (c, c + r), (c - r, c)]
    if shape == "cross":
        a = 0.36 * r  # half arm width: thick arms, so the plus reads as a cross at 28 px/token
        pts = [(a, r), (a, a), (r, a), (r, -a), (a, -a), (a, -r)]
        pts += [(-a, -r), (-a, -a), (-r, -a), (-r, a), (-a, a), (-a, r)]
        return [(c + x, c + y) for x, y in pts]
    raise ValueError(f"not a polygon shape: {shape}")


#: Digit height as a fraction of the needle box, and its vertical offset in units of the
#: half-side: thin shapes get a smaller digit set at their centre of mass, so the digit does
#: not hide the colour and the outline.
_DIGIT_LAYOUT: dict[str, tuple[float, float]] = {
    "circle": (0.5, 0.0), "square": (0.5, 0.0), "cross": (0.5, 0.0),
    "diamond": (0.42, 0.0), "star": (0.36, 0.12), "triangle": (0.38, 0.35),
}


@functools.lru_cache(maxsize=512)
def render_needle(colour: str, shape: str, digit: str | None, size: int) -> np.ndarray:
    """The needle object as straight-alpha RGBA uint8 ``[size, size, 4]``.

    Drawn at 3x and downsampled for anti-aliased edges; a dark outline separates it from any
    background, and the digit is black with a white stroke so it reads on every colour.
    """
    ss = 3
    big = size * ss
    img = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(img)
    fill = (*COLOURS[colour], 255)
    outline = (20, 20, 20, 255)
    width = max(2, big // 40)
    c, r = big / 2, big / 2 - width
    if shape == "circle":
        draw.ellipse([c - r, c - r, c + r, c + r], fill=fill, outline=outline, width=width)
    elif shape == "square":
        h = 0.82 * r  # a little smaller than the box so its area matches the circle's
        draw.rectangle([c - h, c - h, c + h, c + h], fill=fill, outline=outline, width=width)
    else:
        draw.polygon(_shape_polygon(shape, c, r), fill=fill, outline=outline, width=width)
    if digit is not None:
        height, offset = _DIGIT_LAYOUT[shape]
        font = ImageFont.load_default(size=int(big * height))
        draw.text(
            (c, c + offset * r), digit, font=font, anchor="mm", fill=(0, 0, 0, 255),
            stroke_width=max(2, big // 25), stroke_fill=(255, 255, 255, 255),
        )
    return np.asarray(img.resize((size, size), Image.Resampling.LANCZOS))


def paste_needle(frames: np.ndarray, needle: Needle) -> None:
    """Alpha-composite ``needle`` onto ``frames [F, H, W, 3]`` in place, at its frames and box."""
    x0, y0, size = needle.box
    rgba = render_needle(needle.colour, needle.shape, needle.digit, size).astype(np.float32)
    alpha = rgba[..., 3:] / 255.0
    for i in needle.frames:
        region = frames[i, y0 : y0 + size, x0 : x0 + size].astype(np.float32)
        frames[i, y0 : y0 + size, x0 : x0 + size] = (
            region + alpha * (rgba[..., :3] - region) + 0.5
        ).astype(np.uint8)


def needle_box(
    rng: np.random.Generator, position: str, height: int, width: int
) -> tuple[int, int, int]:
    """``(x0, y0, size)`` of a needle inside ``position``'s quadrant of the central square.

    The central square is what survives the processor's centre crop. Size is 0.33-0.4 of its
    side (80-96 px of 240; 112-134 px after resizing to 336, i.e. 4-5 pooled tokens of 28 px).
    """
    side = min(height, width)
    left, top = (width - side) // 2, (height - side) // 2
    quad = side // 2
    size = int(round(side * rng.uniform(0.33, 0.4)))
    row, col = ("bottom" in position), ("right" in position)
    slack = quad - size - 4
    x0 = left + col * quad + 2 + int(rng.integers(0, slack + 1))
    y0 = top + row * quad + 2 + int(rng.integers(0, slack + 1))
    return x0, y0, size


def depth_to_frame(depth: float, num_frames: int) -> int:
    """Frame index of ``depth`` percent (0..100) into a video: ``round(d / 100 * (F - 1))``."""
    if not 0.0 <= depth <= 100.0:
        raise ValueError(f"depth must be in 0..100, got {depth}")
    return int(round(depth / 100.0 * (num_frames - 1)))


def frame_to_depth(frame: int, num_frames: int) -> float:
    """Inverse of ``depth_to_frame``: the depth percent of a frame index."""
    return 100.0 * frame / max(num_frames - 1, 1)


def place_runs(
    rng: np.random.Generator,
    count: int,
    num_frames: int,
    needle_len: int,
    fixed: Sequence[int] = (),
    gap: int = 0,
) -> list[int]:
    """Start frames of ``count`` non-overlapping runs of ``needle_len`` frames, at least ``gap`` frames apart.

    The first runs start at the ``fixed`` frames; the rest go to random free starts. ``gap=1`` keeps every two runs
    apart by a frame without them: runs of one object that touch would play as one appearance. Raises
    ``ValueError`` when the runs overlap, come closer than ``gap`` or cannot all fit.
    """
    if count * needle_len + (count - 1) * gap > num_frames:
        raise ValueError(f"{count} runs of {needle_len} frames, {gap} apart, do not fit in {num_frames} frames")
    # taken[i]: frame i may not hold a new run (it is in a placed run or closer than ``gap`` to one)
    taken = np.zeros(num_frames, bool)

    def take(s: int) -> None:
        taken[max(0, s - gap) : s + needle_len + gap] = True

    starts: list[int] = []
    for s in fixed[:count]:
        if taken[s : s + needle_len].any():
            raise ValueError(f"needle runs starting at {list(fixed)} overlap or are closer than {gap} frames")
        take(s)
        starts.append(s)
    while len(starts) < count:
        free = [
            s for s in range(num_frames - needle_len + 1) if not taken[s : s + needle_len].any()
        ]
        while True:  # a random free start, unless it leaves too little room for the runs still to place
            if not free:
                raise ValueError("no room left for another needle run")
            s = int(rng.choice(free))
            before = taken.copy()
            take(s)
            if _room_for_runs(taken, needle_len, gap) >= count - len(starts) - 1:
                break
            taken[:] = before
            free.remove(s)
        starts.append(s)
    return starts


def _room_for_runs(taken: np.ndarray, needle_len: int, gap: int) -> int:
    """How many more runs fit where no run may start on a ``taken`` frame (leftmost-first packing is optimal)."""
    fitted, s = 0, 0
    while s + needle_len <= len(taken):
        if taken[s : s + needle_len].any():
            s += 1
        else:
            fitted, s = fitted + 1, s + needle_len + gap
    return fitted


def appearances(needles: Sequence[Needle], shown: Sequence[int]) -> dict[str, int]:
    """How many separate times each object plays in the frames a model is ``shown`` (video frame indices, in play
    order, as a sampler returns them): a run of consecutive shown frames with the object counts once."""
    counts: dict[str, int] = {}
    for name in dict.fromkeys(n.describe() for n in needles):
        on = {f for n in needles if n.describe() == name for f in n.frames}
        visible = [int(f) in on for f in shown]
        counts[name] = sum(v and (i == 0 or not visible[i - 1]) for i, v in enumerate(visible))
    return counts


def depths_to_starts(depths: Sequence[float], num_frames: int, needle_len: int) -> list[int]:
    """Run start frames for depths, clamped so a run of ``needle_len`` frames fits."""
    return [min(depth_to_frame(d, num_frames), num_frames - needle_len) for d in depths]


# ---------------------------------------------------------------------------------------------
# Questions
# ---------------------------------------------------------------------------------------------


def _pick(rng: np.random.Generator, pool: Sequence[str], exclude: Sequence[str] = ()) -> str:
    """One element of ``pool`` not in ``exclude``."""
    choices = [p for p in pool if p not in exclude]
    return choices[int(rng.integers(len(choices)))]


def _arrange_options(
    rng: np.random.Generator, correct: str, wrong: Sequence[str]
) -> tuple[list[str], str]:
    """Four options with ``correct`` at a uniformly drawn letter; returns (options, letter).

    Drawing the answer's letter first (rather than shuffling and finding it) keeps the letter
    exactly uniform per sample, so answer letters balance over seeds.
    """
    assert len(wrong) == 3 and correct not in wrong, (correct, wrong)
    letter = int(rng.integers(4))
    rest = [wrong[i] for i in rng.permutation(3)]
    return rest[:letter] + [correct] + rest[letter:], LETTERS[letter]


def format_question(prompt: str, options: Sequence[str]) -> str:
    """Prompt, the lettered options one per line, and the answer instruction."""
    lines = [prompt, *(f"{letter}. {opt}" for letter, opt in zip(LETTERS, options))]
    return "\n".join([*lines, ANSWER_INSTRUCTION])


def _wrong_values(rng: np.random.Generator, pool: Sequence[str], correct: str) -> list[str]:
    """Three distinct values of ``pool`` other than ``correct``, in random order."""
    others = [p for p in pool if p != correct]
    return [others[i] for i in rng.permutation(len(others))[:3]]


def _retrieval_question(
    rng: np.random.Generator, attribute: str, needle: Needle
) -> tuple[str, str, list[str]]:
    """(prompt, correct option, three wrong options) asking ``attribute`` of ``needle``."""
    prompt = RETRIEVAL_PROMPTS[attribute].format(colour=needle.colour, shape=needle.shape)
    pool = {"colour": list(COLOURS), "shape": SHAPES, "digit": DIGITS, "position": POSITIONS}
    correct = {
        "colour": needle.colour,
        "shape": needle.shape,
        "digit": needle.digit,
        "position": needle.position,
    }[attribute]
    assert correct is not None
    return prompt, correct, _wrong_values(rng, pool[attribute], correct)


def _distinct_objects(
    rng: np.random.Generator, n: int, avoid: Sequence[tuple[str, str]] = ()
) -> list[tuple[str, str]]:
    """``n`` (colour, shape) pairs, all different from each other and from ``avoid``."""
    pairs: list[tuple[str, str]] = []
    while len(pairs) < n:
        pair = (_pick(rng, list(COLOURS)), _pick(rng, SHAPES))
        if pair not in pairs and pair not in avoid:
            pairs.append(pair)
    return pairs


# ---------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------


def _as_depth_list(depth: float | Sequence[float] | None) -> list[float]:
    """``depth`` argument of ``make_sample`` as a (possibly empty) list of percents."""
    if depth is None:
        return []
    if np.isscalar(depth):
        return [float(depth)]
    return [float(d) for d in depth]


def _make_needles(
    rng: np.random.Generator,
    objects: Sequence[tuple[str, str]],
    starts: Sequence[int],
    needle_len: int,
    digit_prob: float,
    height: int,
    width: int,
    force_digit: bool = False,
) -> list[Needle]:
    """One ``Needle`` per (colour, shape) object at its run start, in a random quadrant."""
    needles = []
    for (colour, shape), start in zip(objects, starts):
        position = _pick(rng, POSITIONS)
        with_digit = force_digit or rng.random() < digit_prob
        digit = _pick(rng, DIGITS) if with_digit else None
        box = needle_box(rng, position, height, width)
        frames = tuple(range(start, start + needle_len))
        needles.append(Needle(colour, shape, digit, position, frames, box))
    return needles


def make_sample(
    seed: int,
    num_frames: int,
    kind: str = "retrieval",
    depth: float | Sequence[float] | None = None,
    needle: bool = True,
    *,
    attribute: str | None = None,
    count: int | None = None,
    needle_len: int = 1,
    distractors: int = 0,
    digit_prob: float = 0.5,
    haystack: str | None = None,
    height: int = 240,
    width: int = 320,
) -> Sample:
    """A deterministic synthetic needle video with its four-option question.

    Args:
        seed: drives everything (haystack, needles, question, option order).
        num_frames: F, the number of frames generated (the processor should sample all of them).
        kind: ``"retrieval"``, ``"ordering"`` or ``"counting"``.
        depth: percent 0..100 into the video (frame ``round(d / 100 * (F - 1))``). A scalar
            places needle 0 there (the retrieval needle; an ordering pair's first-drawn object,
            which may end up first or last in time; one of the counted needles) and the others
            at random free frames; a sequence gives one depth per needle; None: all random.
        needle: False renders the same haystack, question and options with no needles (and no
            distractors): a control where the answer cannot be seen.
        attribute: for retrieval, one of ``ATTRIBUTES``; None draws it from the seed.
        count: for counting, the number of needles 1..4; None draws it from the seed.
        needle_len: frames each needle stays on screen (a run of consecutive frames).
        distractors: extra vivid objects, each differing in colour *and* shape from every
            asked-about object (and from every option), placed at other frames. They make the
            model bind the question's description to the right object.
        digit_prob: chance a needle carries a digit (always for digit questions).
        haystack: force a generator from ``HAYSTACKS``; None draws it from the seed.
        height, width: frame size; needles live in the central ``min(H, W)`` square.

    Returns:
        A ``Sample`` with ``frames`` uint8 ``[F, H, W, 3]``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    frames, haystack_name = make_haystack(seed, num_frames, height, width, haystack)
    rng = np.random.default_rng([seed, 2])  # task stream: independent of the haystack's
    starts = depths_to_starts(_as_depth_list(depth), num_frames, needle_len)
    if kind == "retrieval":
        built = _build_retrieval(rng, num_frames, starts, attribute, needle_len, digit_prob,
                                 height, width)
    elif kind == "ordering":
        built = _build_ordering(rng, num_frames, starts, needle_len, digit_prob, height, width)
    else:
        built = _build_counting(rng, num_frames, starts, count, needle_len, digit_prob,
                                height, width)
    prompt, correct, wrong, attr, needles, occupied = built
    options, answer = _arrange_options(rng, correct, wrong)
    extra = _make_distractors(rng, distractors, needles, options, occupied, num_frames,
                              needle_len, digit_prob, height, width)
    planned = sorted(i for n in needles + extra for i in n.frames)
    if needle:
        for n in needles + extra:
            paste_needle(frames, n)
    return Sample(
        frames=frames,
        question=format_question(prompt, options),
        options=options,
        answer=answer,
        needle_frames=planned if needle else [],
        kind=kind,
        seed=seed,
        prompt=prompt,
        attribute=attr,
        needles=needles,
        distractors=extra,
        depths=[frame_to_depth(n.frames[0], num_frames) for n in needles],
        haystack=haystack_name,
        has_needle=needle,
        planned_needle_frames=planned,
    )


@dataclass
class Question:
    """One four-option question about a video: ``name`` is a question kind of the demo (``"colour"``, ...,
    ``"counting"``); ``answer`` the correct letter."""

    name: str
    question: str
    options: list[str]
    answer: str

    @property
    def answer_text(self) -> str:
        return self.options[LETTERS.index(self.answer)]


@dataclass
class Tour:
    """One video and a question of every kind about it (``make_tour``); ``frames`` uint8 ``[F, H, W, 3]``;
    ``needles`` A's appearances in time order, then B."""

    frames: np.ndarray
    questions: list[Question]
    needles: list[Needle]
    seed: int


def make_tour(seed: int, num_frames: int, height: int = 240, width: int = 320) -> Tour:
    """A video that answers one question of every kind (colour, shape, quadrant, ordering, counting).

    Object A appears 2 to 4 times, each time in the same quadrant; object B, of another colour and shape, appears
    once, before or after all of A's appearances; runs keep ``APPEARANCE_GAP`` frames apart. So every question
    has one answer: A's colour (named by its shape), B's shape (named by its colour), A's quadrant, which object
    came first or last, and how many times A appeared.
    """
    frames, _ = make_haystack(seed, num_frames, height, width)
    rng = np.random.default_rng([seed, 3])  # task stream: independent of the haystack's and of make_sample's
    a_colour, b_colour = (str(c) for c in rng.permutation(list(COLOURS))[:2])
    a_shape, b_shape = (str(s) for s in rng.permutation(list(SHAPES))[:2])
    count = int(rng.integers(2, 5))
    starts = sorted(place_runs(rng, count + 1, num_frames, 1, gap=APPEARANCE_GAP))
    b_first = bool(rng.integers(2))
    b_start, a_starts = (starts[0], starts[1:]) if b_first else (starts[-1], starts[:-1])
    a_position = _pick(rng, POSITIONS)
    a_box = needle_box(rng, a_position, height, width)
    a_needles = [Needle(a_colour, a_shape, None, a_position, (s,), a_box) for s in a_starts]
    b_position = _pick(rng, POSITIONS)
    b = Needle(b_colour, b_shape, None, b_position, (b_start,), needle_box(rng, b_position, height, width))
    for needle in [*a_needles, b]:
        paste_needle(frames, needle)

    a = a_needles[0]
    which = _pick(rng, ORDERING_WHICH)
    target, other = (b, a) if b_first == (which == "first") else (a, b)
    unseen = [f"{c} {s}" for c, s in _distinct_objects(rng, 2, avoid=[(a_colour, a_shape), (b_colour, b_shape)])]
    asked = [  # as with make_sample's distractors, the other object's colour or shape is never an option
        ("colour", RETRIEVAL_PROMPTS["colour"].format(shape=a_shape), a_colour, _wrong_values(rng, [c for c in COLOURS if c != b_colour], a_colour)),
        ("shape", RETRIEVAL_PROMPTS["shape"].format(colour=b_colour), b_shape, _wrong_values(rng, [s for s in SHAPES if s != a_shape], b_shape)),
        ("quadrant", *_retrieval_question(rng, "position", a)),
        ("ordering", ORDERING_PROMPT.format(which=which), target.describe(), [other.describe(), *unseen]),
        ("counting", COUNTING_PROMPT.format(colour=a_colour, shape=a_shape), str(count),
         [c for c in COUNTS if c != str(count)]),
    ]
    questions = []
    for name, prompt, correct, wrong in asked:
        options, letter = _arrange_options(rng, correct, wrong)
        questions.append(Question(name, format_question(prompt, options), options, letter))
    return Tour(frames, questions, [*a_needles, b], seed)


# (prompt, correct option, three wrong options, attribute, needles, run start frames)
_Built = tuple[str, str, list[str], str | None, list[Needle], list[int]]


def _build_retrieval(
    rng: np.random.Generator, num_frames: int, fixed: list[int], attribute: str | None,
    needle_len: int, digit_prob: float, height: int, width: int,
) -> _Built:
    """One needle and a question on one of its attributes."""
    attr = attribute if attribute is not None else _pick(rng, ATTRIBUTES)
    if attr not in ATTRIBUTES:
        raise ValueError(f"attribute must be one of {ATTRIBUTES}, got {attr!r}")
    objects = _distinct_objects(rng, 1)
    starts = place_runs(rng, 1, num_frames, needle_len, fixed)
    needles = _make_needles(rng, objects, starts, needle_len, digit_prob, height, width,
                            force_digit=attr == "digit")
    prompt, correct, wrong = _retrieval_question(rng, attr, needles[0])
    return prompt, correct, wrong, attr, needles, starts


def _build_ordering(
    rng: np.random.Generator, num_frames: int, fixed: list[int], needle_len: int,
    digit_prob: float, height: int, width: int,
) -> _Built:
    """Two different objects at different frames; options are both plus two unseen objects."""
    objects = _distinct_objects(rng, 4)
    starts = place_runs(rng, 2, num_frames, needle_len, fixed, gap=APPEARANCE_GAP)
    needles = _make_needles(rng, objects[:2], starts, needle_len, digit_prob, height, width)
    which = _pick(rng, ORDERING_WHICH)
    ordered = sorted(needles, key=lambda n: n.frames[0])
    target = ordered[0] if which == "first" else ordered[-1]
    other = ordered[-1] if which == "first" else ordered[0]
    unseen = [f"{c} {s}" for c, s in objects[2:]]
    prompt = ORDERING_PROMPT.format(which=which)
    return prompt, target.describe(), [other.describe(), *unseen], None, needles, starts


def _build_counting(
    rng: np.random.Generator, num_frames: int, fixed: list[int], count: int | None,
    needle_len: int, digit_prob: float, height: int, width: int,
) -> _Built:
    """``k`` needles of one colour and shape (each in its own random quadrant)."""
    k = count if count is not None else int(rng.integers(1, 5))
    if not 1 <= k <= 4:
        raise ValueError(f"count must be in 1..4, got {k}")
    (obj,) = _distinct_objects(rng, 1)
    starts = place_runs(rng, k, num_frames, needle_len, fixed, gap=APPEARANCE_GAP)
    needles = _make_needles(rng, [obj] * k, starts, needle_len, digit_prob, height, width)
    prompt = COUNTING_PROMPT.format(colour=obj[0], shape=obj[1])
    wrong = [c for c in COUNTS if c != str(k)]
    return prompt, str(k), wrong, None, needles, starts


def _make_distractors(
    rng: np.random.Generator, n: int, needles: Sequence[Needle], options: Sequence[str],
    occupied: Sequence[int], num_frames: int, needle_len: int, digit_prob: float,
    height: int, width: int,
) -> list[Needle]:
    """``n`` vivid objects sharing neither colour nor shape with any needle or option object."""
    if n == 0:
        return []
    used_words = {w for text in [*(x.describe() for x in needles), *options] for w in text.split()}
    colours = [c for c in COLOURS if c not in used_words]
    shapes = [s for s in SHAPES if s not in used_words]
    if not colours or not shapes:
        raise ValueError("no colour/shape left for distractors")
    objects = [(_pick(rng, colours), _pick(rng, shapes)) for _ in range(n)]
    # Re-place all runs with the needles' starts fixed, so distractors take only free frames.
    starts = place_runs(rng, len(occupied) + n, num_frames, needle_len, occupied)[len(occupied):]
    return _make_needles(rng, objects, starts, needle_len, digit_prob, height, width)


# ---------------------------------------------------------------------------------------------
# Corpus for the tokenizer, video files, conversations, CLI
# ---------------------------------------------------------------------------------------------


def corpus_texts() -> Iterator[str]:
    """Every distinct prompt, option and answer text the generator can produce.

    Built by enumeration rather than sampling, so a vocabulary made from it covers all seeds.
    """
    for colour in COLOURS:
        for shape in SHAPES:
            for template in RETRIEVAL_PROMPTS.values():
                yield template.format(colour=colour, shape=shape)
            yield COUNTING_PROMPT.format(colour=colour, shape=shape)
            yield f"{colour} {shape}"
    for which in ORDERING_WHICH:
        yield ORDERING_PROMPT.format(which=which)
    yield from COLOURS
    yield from SHAPES
    yield from DIGITS
    yield from POSITIONS
    yield from COUNTS
    yield from (f"{letter}." for letter in LETTERS)
    yield from LETTERS
    yield ANSWER_INSTRUCTION


def write_video(frames: np.ndarray, path: str | Path, fps: float = 10.0, crf: int = 18) -> str:
    """Write uint8 ``[F, H, W, 3]`` frames to an mp4 with PyAV; returns the codec used.

    Prefers H.264 (``libx264``, quality ``crf``) and falls back to ``mpeg4``. H and W must be
    even (yuv420p). Every input frame becomes one stored frame, so a reader gets F frames back.
    """
    _, h, w, c = frames.shape
    if c != 3 or frames.dtype != np.uint8 or h % 2 or w % 2:
        raise ValueError(f"need uint8 [F, H, W, 3], even H and W; got {frames.shape} {frames.dtype}")
    import av  # local import: generation alone must not need PyAV

    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(crf), "preset": "veryfast"}
        else:
            stream.bit_rate = 4_000_000
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return codec


def read_video(path: str | Path) -> np.ndarray:
    """Decode every frame of a video file to uint8 ``[F, H, W, 3]`` (RGB) with PyAV."""
    import av

    with av.open(str(path)) as container:
        return np.stack([fr.to_ndarray(format="rgb24") for fr in container.decode(video=0)])


def to_conversation(sample: Sample, video: object, with_answer: bool = False) -> list[dict]:
    """Chat messages asking ``sample.question`` about ``video`` (a path, URL or frames).

    With ``with_answer`` an assistant turn holding the answer letter follows (for training).
    """
    content = [{"type": "video", "video": video}, {"type": "text", "text": sample.question}]
    messages: list[dict] = [{"role": "user", "content": content}]
    if with_answer:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": sample.answer}]})
    return messages


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: write one sample's video and print its question and answer."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frames", type=int, default=40)
    p.add_argument("--kind", choices=KINDS, default="retrieval")
    p.add_argument("--attribute", choices=ATTRIBUTES, default=None)
    p.add_argument("--depth", type=float, default=None, help="percent 0..100")
    p.add_argument("--needle-len", type=int, default=1)
    p.add_argument("--distractors", type=int, default=0)
    p.add_argument("--no-needle", action="store_true", help="control: same video, no needle")
    p.add_argument("--haystack", choices=list(HAYSTACKS), default=None)
    p.add_argument("--fps", type=float, default=10.0)
    p.add_argument("--out", type=Path, default=None, help="mp4 path (omit to only print)")
    a = p.parse_args(argv)
    s = make_sample(a.seed, a.frames, a.kind, a.depth, not a.no_needle, attribute=a.attribute,
                    needle_len=a.needle_len, distractors=a.distractors, haystack=a.haystack)
    if a.out is not None:
        codec = write_video(s.frames, a.out, fps=a.fps)
        print(f"wrote {a.out} ({s.num_frames} frames, {codec}, haystack={s.haystack})")
    print(s.question)
    print(f"answer: {s.answer} ({s.answer_text})")
    print(f"needle frames: {s.needle_frames} (depths {[round(d, 1) for d in s.depths]})")


if __name__ == "__main__":
    main()
