"""Video-XL: a long-video LLM whose language model compresses what it sees.

Visual tokens are fed window by window. Inside a window one visual summarization token (VST) follows every `r`
visual tokens; VST rows use their own q/k/v projections. After the window only the VSTs' keys and values stay in
memory ([`BeaconCache`]). Text is never compressed.

The compression path reads top to bottom in [`VideoXLModel.forward`]:
plan steps -> embed a step (encode its frames) -> run the layers -> keep what the keep rule keeps.
One plan serves a batch whose samples hold the same visual tokens in the same columns; any other batch is prefilled
sample by sample ([`VideoXLModel.forward_per_sample`]) and decodes from one stacked cache.
"""

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention.bias import causal_lower_right
from transformers import AutoModel
from transformers.activations import ACT2FN
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2MLP,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
    eager_attention_forward,
    repeat_kv,
    rotate_half,
)
from transformers.utils import can_return_tuple, logging

from .beacon_cache import BeaconCache, model_identity, weights_fingerprint, weights_tag
from .cache_file_videoxl import check_against_model
from .compat_videoxl import (
    CACHE_NAME,
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
    ModelAdapters,
    cache_field,
    drop_rollback_cache_request,
    rename_cache_kwarg,
    take_cache,
)
from .configuration_videoxl import VideoXLConfig
from .inputs_videoxl import (
    VisualInputs,
    check_attention_mask,
    check_input_ids,
    check_inputs_embeds,
    check_output_attentions,
    check_run_continues,
    input_validity,
    is_plain_text,
    same_layout,
    unabsorbed_pixels,
    visual_kinds,
)
from .session_videoxl import LiveVideo, chat
# transformers 5.10 copies into its module cache only this file's own relative imports, not theirs: the modules that
# only the imported files import are named here too, so that the remote code loads there.
from .video_decoding_videoxl import UrlPolicy  # noqa: F401


logger = logging.get_logger(__name__)

# Arguments of `generate` that are not model inputs here (the library's own bookkeeping, or replaced: positions are
# the model's own; `image_sizes` describes images whose tiles already carry everything the model needs).
NOT_MODEL_OPTIONS = {
    "next_sequence_length", "is_first_iteration", "position_ids", "inputs_embeds", "cache_position",
    "pixel_values_videos", "pixel_values", "image_sizes",
}


def model_options(generate_kwargs: dict) -> dict:
    """The options `generate` carries that go to `forward` on every call (`compression_ratio`, `use_cache`, ...)."""
    return {key: value for key, value in generate_kwargs.items() if key not in NOT_MODEL_OPTIONS}


# One decoded row over a memory up to this long: one SDPA over [memory ; step] costs less than two flash calls and
# their merge (CPU, 1 thread: about half at 64 rows; the merge wins from about 1,000 rows, where the copy dominates).
ONE_KERNEL_MEMORY = 512


def memory_causal_attention(
    query: torch.Tensor,
    memory: tuple[torch.Tensor, torch.Tensor] | None,
    step: tuple[torch.Tensor, torch.Tensor],
    groups: int,
    scaling: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """SDPA of a step's `rows` queries over `[memory ; step]`: the whole memory visible, causal over the step,
    nothing padded. `query` `[batch, heads, rows, head_dim]`; `memory` and `step` are (keys, values)
    `[batch, kv_heads, kept or rows, head_dim]`. Returns `[batch, rows, heads, head_dim]`.

    Neither the `[rows, kept + rows]` mask nor `[memory ; step]` is built where a kernel can avoid it: on CPU
    without autograd the memory and the step are two flash calls merged by their log-sum-exp (the flash op's
    log-sum-exp has no gradient, so training takes the general path), except one row over a short memory (decoding
    after a short prompt), where one SDPA call is cheaper. Elsewhere SDPA gets a lower-right causal bias (flash /
    memory-efficient kernels on CUDA).
    """
    step_keys, step_values = step
    rows = query.shape[2]
    # A private ATen op (the CPU flash kernel behind SDPA, which also returns the log-sum-exp); where a torch build
    # lacks it, the general path below runs.
    flash_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    no_grad = not (torch.is_grad_enabled() and query.requires_grad)
    long_memory = memory is not None and (rows > 1 or memory[0].shape[2] > ONE_KERNEL_MEMORY)
    if long_memory and query.device.type == "cpu" and flash_cpu is not None and no_grad and dropout == 0.0:
        step_out, step_lse = flash_cpu(
            query, repeat_kv(step_keys, groups), repeat_kv(step_values, groups), 0.0, rows > 1, scale=scaling
        )
        # The query heads of a KV group stacked as rows of one head: the memory is read once, not once per head.
        batch, heads, _, head_dim = query.shape
        stacked = query.reshape(batch, heads // groups, groups * rows, head_dim)
        memory_out, memory_lse = flash_cpu(stacked, *memory, 0.0, False, scale=scaling)
        memory_out, memory_lse = memory_out.reshape(query.shape), memory_lse.reshape(batch, heads, rows)
        # The memory's share of the softmax mass: exp(m) / (exp(m) + exp(s)) = sigmoid(m - s).
        memory_weight = torch.sigmoid(memory_lse - step_lse).unsqueeze(-1).to(query.dtype)
        return (step_out + (memory_out - step_out) * memory_weight).transpose(1, 2)
    keys = step_keys if memory is None else torch.cat([memory[0], step_keys], dim=2)
    values = step_values if memory is None else torch.cat([memory[1], step_values], dim=2)
    if rows == 1 or memory is None:  # one new row sees everything; with no memory this is plain causal attention
        bias = {"is_causal": rows > 1}
    else:
        bias = {"attn_mask": causal_lower_right(rows, keys.shape[2])}
    out = nn.functional.scaled_dot_product_attention(
        query, repeat_kv(keys, groups), repeat_kv(values, groups), dropout_p=dropout, scale=scaling, **bias
    )
    return out.transpose(1, 2)


def placed_device(weight: torch.Tensor, fallback: torch.device) -> torch.device:
    """The device a module computes on: its weight's. Under accelerate offload the weight is a `meta` placeholder
    and the module's hook moves its inputs, so they stay on `fallback`."""
    return fallback if weight.device.type == "meta" else weight.device


def check_beacon_cache(cache) -> BeaconCache:
    """Refuse a cache that is not a [`BeaconCache`] (by its interface: a remote-code model and the user may hold
    two copies of the class)."""
    if not all(hasattr(cache, name) for name in ("record", "commit", "align")):
        raise ValueError(
            f"Video-XL keeps its memory in a BeaconCache, got {type(cache).__name__}: pass cache=None (generate and "
            "forward create one; reuse `output.cache`) or a cache returned by an earlier call"
        )
    return cache


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on `x` `[batch, heads, rows, head_dim]` with `cos`/`sin` `[batch, rows, head_dim]`."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


# --------------------------------------------------------------------------------------------------------------------
# Planning: which columns of input_ids run together, and how each window is interleaved with VSTs
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """Columns `[start, end)` of `input_ids` run as one forward.

    A text step (`ratio == 0`) is kept whole. A window step holds visual tokens of one kind (`token_id`), gets one
    VST after every `ratio` of them, and keeps only its VSTs; `visual_offset` visual tokens of its kind come before
    it in each sample (in this call), `tokens_per_frame` of them per frame or tile.
    """

    start: int
    end: int
    token_id: int | None = None
    ratio: int = 0
    visual_offset: int = 0
    tokens_per_frame: int = 0

    @property
    def is_window(self) -> bool:
        return self.ratio > 0

    @property
    def num_vsts(self) -> int:
        return (self.end - self.start) // self.ratio if self.is_window else 0

    @property
    def num_rows(self) -> int:
        return self.end - self.start + self.num_vsts

    @property
    def frames(self) -> tuple[int, int]:
        """Frames `[first, last)` (of each sample's frames of this kind) whose tokens are in the window."""
        end = self.visual_offset + self.end - self.start
        return self.visual_offset // self.tokens_per_frame, -(-end // self.tokens_per_frame)

    @property
    def new_frames(self) -> tuple[int, int]:
        """Frames `[first, last)` that start inside the window (the ones it adds to the memory's record)."""
        return -(-self.visual_offset // self.tokens_per_frame), self.frames[1]

    def vst_rows(self, device: torch.device) -> torch.Tensor:
        """Rows of the VSTs in the interleaved window: a VST closes every group of `ratio` visual tokens."""
        return torch.arange(1, self.num_vsts + 1, device=device) * (self.ratio + 1) - 1

    def rows_of_columns(self, columns: torch.Tensor) -> torch.Tensor:
        """Row in this step of each input column (columns must lie inside the step)."""
        if not self.is_window:
            return columns if self.start == 0 else columns - self.start
        offset = columns - self.start
        return offset + offset // self.ratio

    def columns(self, output_columns: torch.Tensor | None, single: bool, device: torch.device) -> torch.Tensor:
        """The output columns `[n]` inside this step (all of its columns when `output_columns` is None); `single`:
        this is the call's only step."""
        if output_columns is None:
            return torch.arange(self.start, self.end, device=device)
        if single:
            return output_columns
        return output_columns[(output_columns >= self.start) & (output_columns < self.end)]

    def row_validity(self, valid: torch.Tensor) -> torch.Tensor:
        """`[batch, rows]` bool validity of the rows from the columns' `valid` `[batch, seq]`; a window's VSTs are
        valid when its visual tokens are."""
        columns = valid[:, self.start : self.end]
        if not self.is_window:
            return columns
        groups = columns.reshape(columns.shape[0], self.num_vsts, self.ratio)
        return torch.cat([groups, groups[:, :, -1:]], dim=2).flatten(1)

    def kept_rows(self, layer_states: list[torch.Tensor]) -> list[torch.Tensor]:
        """The rows that stay in memory (every text row, a window's VST rows) of each of `layer_states`."""
        if not self.is_window:
            return layer_states
        rows = self.vst_rows(layer_states[0].device)
        return [states[:, rows.to(states.device)] for states in layer_states]


class RatioSchedule:
    """The per-window training ratios: uniform draws from a ratio list with a generator of its own.

    Trainers reseed it (`reseed`) to keep processes in step and may record what every forward drew
    (`start_recording`, then `take_recorded`); the model only draws through it.
    """

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)
        self.recorded: list[list[int]] | None = None  # one list per forward while recording

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def start_recording(self) -> None:
        self.recorded = []

    def take_recorded(self) -> list[list[int]]:
        """The draws of every forward since the last call, one list per forward."""
        if self.recorded is None:
            raise RuntimeError("the ratio schedule is not recording; call start_recording() first")
        recorded, self.recorded = self.recorded, []
        return recorded

    def sampler(self, choices: list[int]) -> Callable[[], int]:
        """A draw function for one forward."""
        drawn: list[int] = []
        if self.recorded is not None:
            self.recorded.append(drawn)

        def draw() -> int:
            drawn.append(choices[torch.randint(len(choices), (1,), generator=self.generator).item()])
            return drawn[-1]

        return draw


# A prefill whose windows take less than this shows no progress bar (tqdm's `delay`).
PROGRESS_DELAY_SECONDS = 2.0


def window_progress(steps: list[Step], training: bool):
    """transformers' progress bar over the visual windows of an inference prefill, silenced by
    `transformers.utils.logging.disable_progress_bar()`; none for training or steps without windows."""
    windows = sum(step.is_window for step in steps)
    if training or not windows:
        return logging.EmptyTqdm()
    return logging.tqdm(total=windows, desc="Encoding video windows", unit="window", delay=PROGRESS_DELAY_SECONDS)


def allowed_ratios(config: VideoXLConfig) -> list[int]:
    """Ratios that divide every window: the window length and the tokens of one frame or tile."""
    unit = math.gcd(config.beacon_window, config.tokens_per_frame)
    return [r for r in range(1, unit + 1) if unit % r == 0]


def check_ratio(ratio: int, config: VideoXLConfig) -> int:
    valid = isinstance(ratio, int) and not isinstance(ratio, bool) and ratio >= 1
    if not valid or math.gcd(config.beacon_window, config.tokens_per_frame) % ratio:  # runs on every call: no list
        raise ValueError(
            f"compression_ratio must divide the window of {config.beacon_window} tokens and a frame of "
            f"{config.tokens_per_frame} tokens; allowed values: {allowed_ratios(config)}, got {ratio!r}"
        )
    return ratio


def visual_runs(token_row: torch.Tensor, visual_ids: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """Maximal runs `(start, end, token_id)` of one visual token id in a 1-D row of ids."""
    length = token_row.shape[0]
    if length == 0:
        return []
    new_run = torch.ones(length, dtype=torch.bool, device=token_row.device)
    new_run[1:] = token_row[1:] != token_row[:-1]
    run_starts = new_run.nonzero().flatten()
    run_ends = torch.cat([run_starts[1:], run_starts.new_tensor([length])])
    visual = torch.isin(token_row[run_starts], torch.tensor(visual_ids, device=token_row.device))
    starts, ends = run_starts[visual].tolist(), run_ends[visual].tolist()
    return list(zip(starts, ends, token_row[run_starts[visual]].tolist()))


def plan_steps(input_ids: torch.Tensor, config: VideoXLConfig, ratio_for_window: Callable[[], int]) -> list[Step]:
    """Cut `input_ids` `[batch, seq]` into text steps and visual windows of `beacon_window` tokens.

    One plan serves the batch: every sample must have the same kind of visual token in the same columns (the
    caller checks [`same_layout`]; `VideoXLModel.forward` runs other batches sample by sample).
    """
    steps, cursor, visual_seen = [], 0, {}
    for start, end, token_id in visual_runs(input_ids[0], tuple(visual_kinds(config).values())):
        if start > cursor:
            steps.append(Step(cursor, start))
        for window_start in range(start, end, config.beacon_window):
            window_end = min(window_start + config.beacon_window, end)
            ratio = ratio_for_window()
            if (window_end - window_start) % ratio:
                raise ValueError(
                    f"A visual window of {window_end - window_start} tokens is not divisible by the compression "
                    f"ratio {ratio}: visual spans must be whole frames of {config.tokens_per_frame} tokens."
                )
            offset = visual_seen.get(token_id, 0)
            steps.append(Step(window_start, window_end, token_id, ratio, offset, config.tokens_per_frame))
            visual_seen[token_id] = offset + window_end - window_start
        cursor = end
    if cursor < input_ids.shape[1]:
        steps.append(Step(cursor, input_ids.shape[1]))
    return steps


# --------------------------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------------------------


class VideoXLAttention(nn.Module):
    """Qwen2 attention whose VST rows compute q, k, v with their own `beacon_{q,k,v}_proj`.

    Keys and values are `[memory ; step]`: the kept memory of earlier steps, then this step's rows. Besides the
    output it returns the rows to keep: all rows of a text step, the VST rows of a window (keys rotated at their
    memory positions).
    """

    def __init__(self, config: VideoXLConfig, layer_idx: int):
        super().__init__()
        # The composite config: it carries the attention implementation chosen for the whole model.
        self.config = config
        self.layer_idx = layer_idx
        beacon_param, config = config.beacon_param, config.text_config
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        q_size = config.num_attention_heads * self.head_dim
        kv_size = config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_size, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, kv_size, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, kv_size, bias=True)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=False)
        self.beacon_param = tuple(beacon_param)
        sizes = {"q": q_size, "k": kv_size, "v": kv_size}
        for name in self.beacon_param:
            setattr(self, f"beacon_{name}_proj", nn.Linear(config.hidden_size, sizes[name], bias=True))

    def project(self, name: str, hidden_states: torch.Tensor, vst_rows: torch.Tensor | None) -> torch.Tensor:
        """`{name}_proj` on every row, replaced by `beacon_{name}_proj` on the VST rows. Output `[batch, heads, rows, head_dim]`."""
        out = getattr(self, f"{name}_proj")(hidden_states)
        if vst_rows is not None and name in self.beacon_param:
            vst_out = getattr(self, f"beacon_{name}_proj")(hidden_states[:, vst_rows])
            out = out.index_copy(1, vst_rows, vst_out)
        return out.view(*hidden_states.shape[:2], -1, self.head_dim).transpose(1, 2)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        key_valid: torch.Tensor | None,
        past_keys: torch.Tensor | None,
        past_values: torch.Tensor | None,
        vst_rows: torch.Tensor | None,
        kept_position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`hidden_states` `[batch, rows, hidden]` -> (output `[batch, rows, hidden]`, kept keys, kept values).
        `past_keys`/`past_values` `[batch, kv_heads, kept, head_dim]`: the memory (None while it is empty);
        `key_valid` `[batch, kept + rows]`: see `VideoXLModel.step_key_validity`."""
        query = self.project("q", hidden_states, vst_rows)
        key = self.project("k", hidden_states, vst_rows)
        value = self.project("v", hidden_states, vst_rows)

        cos, sin = position_embeddings
        query, rotated_key = rotate(query, cos, sin), rotate(key, cos, sin)
        dropout = self.attention_dropout if self.training else 0.0
        if key_valid is None and self.config._attn_implementation == "sdpa":  # see VideoXLModel.step_key_validity
            memory = None if past_keys is None else (past_keys, past_values)
            output = memory_causal_attention(
                query, memory, (rotated_key, value), self.num_key_value_groups, self.scaling, dropout
            )
        else:
            keys = rotated_key if past_keys is None else torch.cat([past_keys, rotated_key], dim=2)
            values = value if past_values is None else torch.cat([past_values, value], dim=2)
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )
            mask = None if key_valid is None else step_attention_mask(key_valid, query.shape[2], query.dtype)
            output, _ = attention_interface(
                self,
                query,
                keys,
                values,
                mask,
                dropout=dropout,
                scaling=self.scaling,
            )
        output = self.o_proj(output.reshape(*hidden_states.shape[:2], -1).contiguous())

        if vst_rows is None:
            return output, rotated_key, value
        kept_cos, kept_sin = kept_position_embeddings
        return output, rotate(key[:, :, vst_rows], kept_cos, kept_sin), value[:, :, vst_rows]


def step_attention_mask(key_valid: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask `[batch, 1, rows, kept + rows]` from key validity `[batch, kept + rows]`: all valid memory, then
    causal over the step's `rows`. Every row sees itself so that a padding row's softmax stays finite; no other row
    attends to padding. Built inside the decoder layer, so that a checkpointed layer keeps the validity (a bit per
    key) rather than this mask for every step."""
    device, kept = key_valid.device, key_valid.shape[1] - rows
    causal = torch.ones(rows, rows, dtype=torch.bool, device=device).tril()
    pattern = torch.cat([torch.ones(rows, kept, dtype=torch.bool, device=device), causal], dim=1)
    allowed = pattern[None] & key_valid[:, None, :]
    allowed[:, torch.arange(rows), kept + torch.arange(rows)] = True
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def join_pieces(pieces: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
    """Pieces of memory `[batch, kv_heads, rows_i, head_dim]` as one tensor along the rows (None for none)."""
    if not pieces:
        return None
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)


class VideoXLDecoderLayer(GradientCheckpointingLayer):
    """A Qwen2 decoder layer with [`VideoXLAttention`]. Pure: it reads the memory and returns what to keep, so
    activation checkpointing can replay it.

    The memory comes last, in pieces (`*memory`: the key pieces, then as many value pieces, see
    [`BeaconCache.memory_pieces`]), joined only inside the layer: a checkpointed layer then keeps references to the
    pieces rather than a concatenation of the whole memory for every step. They are positional so that reentrant
    checkpointing also passes their gradients.
    """

    def __init__(self, config: VideoXLConfig, layer_idx: int):
        super().__init__()
        self.self_attn = VideoXLAttention(config, layer_idx)
        config = config.text_config
        self.mlp = Qwen2MLP(config)
        self.input_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        key_valid: torch.Tensor | None,
        vst_rows: torch.Tensor | None,
        kept_position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        *memory: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pieces = len(memory) // 2
        attn_output, kept_keys, kept_values = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings,
            key_valid,
            join_pieces(memory[:pieces]),
            join_pieces(memory[pieces:]),
            vst_rows,
            kept_position_embeddings,
        )
        hidden_states = hidden_states + attn_output
        hidden_states = hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))
        return hidden_states, kept_keys, kept_values


class VideoXLProjector(GradientCheckpointingLayer, nn.Sequential):
    """CLIP patch features -> LLM inputs: linear, activation, `pool_stride` x `pool_stride` average pool, linear
    (children `0`, `1`, `2`, as the released `mm_projector`). A checkpointing layer: under activation checkpointing
    a trained projector keeps its input, not its activations (several times a frame's features), for every window.
    """

    def __init__(self, vision_hidden: int, hidden: int, activation: str, pool_stride: int):
        super().__init__(nn.Linear(vision_hidden, hidden), ACT2FN[activation], nn.Linear(hidden, hidden))
        self.pool_stride = pool_stride

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """`features` `[n, patches, vision_hidden]` (a square grid of patches) -> `[n, patches / stride^2, hidden]`."""
        first, activation, second = self
        hidden_states = activation(first(features))
        n, patches, dim = hidden_states.shape
        side = int(patches**0.5)
        grid = hidden_states.view(n, side, side, dim).permute(0, 3, 1, 2)
        pooled = nn.functional.avg_pool2d(grid, self.pool_stride)
        # An average commutes with an affine map, so the second linear runs on the pooled rows only.
        return second(pooled.flatten(2).transpose(1, 2))


class VideoXLVisionTower(nn.Module):
    """CLIP vision encoder. Holds the library's `CLIPVisionModel` as `vision_tower.vision_model` so that parameter
    names match the released checkpoint (`model.vision_tower.vision_tower.vision_model.*`)."""

    def __init__(self, vision_config, feature_layer: int):
        super().__init__()
        self.vision_tower = nn.Module()
        self.vision_tower.vision_model = AutoModel.from_config(vision_config)
        self.feature_layer = feature_layer

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`pixel_values` `[n, 3, H, W]` -> patch features `[n, patches, vision_hidden]` (CLS dropped).

        The features are `hidden_states[feature_layer]` of the CLIP encoder; the layers after it are not run, and
        no other layer's states are held.
        """
        clip = self.vision_tower.vision_model
        layers = clip.encoder.layers
        last = self.feature_layer % (len(layers) + 1)  # hidden_states[0] is the embeddings, [i] layer i's output
        hidden_states = clip.pre_layrnorm(clip.embeddings(pixel_values))
        for layer in layers[:last]:
            hidden_states = layer(hidden_states, None)
        return hidden_states[:, 1:]


# --------------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------------


class VideoXLPreTrainedModel(ModelAdapters, PreTrainedModel):
    config_class = VideoXLConfig
    config: VideoXLConfig
    base_model_prefix = "model"
    input_modalities = ("image", "video", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["VideoXLDecoderLayer", "CLIPEncoderLayer", "CLIPVisionEmbeddings"]
    # Every quantizer (bitsandbytes, quanto, ...) leaves these unconverted, as BLIP-2 keeps its Q-Former: the vision
    # side is small and feeds every visual token (and bitsandbytes' CPU 4-bit packing needs widths that are a multiple
    # of its block size, which a CLIP tower need not have). fp16 loads keep them in fp32.
    _keep_in_fp32_modules = ["model.vision_tower", "model.mm_projector"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, VideoXLModel):
            nn.init.normal_(module.beacon_embed_tokens.weight, std=self.config.text_config.initializer_range)


class VideoXLModel(VideoXLPreTrainedModel):
    """The Video-XL backbone: vision tower, projector and a Qwen2 decoder that compresses visual windows."""

    def __init__(self, config: VideoXLConfig):
        super().__init__(config)
        text = config.text_config
        self.embed_tokens = nn.Embedding(text.vocab_size, text.hidden_size, text.pad_token_id)
        self.beacon_embed_tokens = nn.Embedding(1, text.hidden_size)
        self.layers = nn.ModuleList(
            [VideoXLDecoderLayer(config, i) for i in range(text.num_hidden_layers)]
        )
        self.norm = Qwen2RMSNorm(text.hidden_size, eps=text.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config=text)
        self.vision_tower = VideoXLVisionTower(config.vision_config, config.vision_feature_layer)
        self.mm_projector = VideoXLProjector(
            config.vision_config.hidden_size, text.hidden_size, config.projector_hidden_act, config.spatial_pool_stride
        )
        self.ratio_schedule = RatioSchedule(config.ratio_seed)
        self._warned_positions = False
        self._identity: str | None = None
        self._weights_key: bytes | None = None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def seed_compression_ratios(self, seed: int) -> None:
        """Reseed the draw of per-window training ratios (same seed on every process keeps ranks in step)."""
        self.ratio_schedule.reseed(seed)

    @property
    def identity(self) -> str:
        """[`model_identity`] of the config and the public tag of the weights' fingerprint, computed once: it names
        this model in every cache it writes."""
        if self._identity is None:
            self._identity = f"{model_identity(self.config)}-{weights_tag(self.weights_key)}"
        return self._identity

    @property
    def weights_key(self) -> bytes:
        """[`weights_fingerprint`] of this model's weights, computed once (it signs the cache files it writes)."""
        if self._weights_key is None:
            self._weights_key = weights_fingerprint(self)
        return self._weights_key

    def new_cache(self) -> BeaconCache:
        """An empty cache bound to this model."""
        return BeaconCache(len(self.layers), model_id=self.identity, key=self.weights_key)

    def use_cache_here(self, cache: BeaconCache) -> None:
        """Bind `cache` to this model; a cache read from a file is checked on its first use (its signature, its
        layers and ratios) and its keys and values are cast to the model's dtype, once."""
        loaded = cache.seal is not None
        if loaded:
            ratios, visual_ids = allowed_ratios(self.config), list(visual_kinds(self.config).values())
            check_against_model(cache, len(self.layers), ratios, self.config.beacon_window, visual_ids)
        cache.bind(self.identity, self.weights_key)
        if loaded:
            dtype = self.embed_tokens.weight.dtype
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys.to(dtype), layer.values.to(dtype)

    # ---- one step ----------------------------------------------------------------------------------------------

    def encode_frames(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Frames or tiles `[n, 3, H, W]` -> LLM inputs `[n, tokens_per_frame, hidden]`: CLIP -> projector."""
        # Per window onto the tower's device: a long video's pixels can stay in host memory. CLIP casts them to its
        # own dtype (fp32 pixels into a bf16 model).
        patch_weight = self.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight
        return self.mm_projector(self.vision_tower(pixel_values.to(placed_device(patch_weight, pixel_values.device))))

    def embed_step(self, step: Step, input_ids: torch.Tensor, visual: VisualInputs | None) -> torch.Tensor:
        """Inputs of one step `[batch, rows, hidden]`: token embeddings, or window features interleaved with VSTs.
        Only the window's frames go through CLIP."""
        if not step.is_window:
            return self.embed_tokens(input_ids[:, step.start : step.end])
        batch, per_frame = input_ids.shape[0], self.config.tokens_per_frame
        first, last = step.frames
        features = self.encode_frames(visual.window(step.token_id, step.frames)).reshape(batch, (last - first) * per_frame, -1)
        skip = step.visual_offset - first * per_frame
        groups = features[:, skip : skip + step.end - step.start].reshape(batch, step.num_vsts, step.ratio, -1)
        # Called as a module (not `.weight`) so that offload hooks can bring the weight in.
        vst_index = torch.zeros(1, dtype=torch.long, device=placed_device(self.beacon_embed_tokens.weight, groups.device))
        vst = self.beacon_embed_tokens(vst_index).to(groups.device).expand(batch, step.num_vsts, 1, -1)
        # The decoder's dtype: the vision side stays fp32 in fp16 loads (`_keep_in_fp32_modules`).
        return torch.cat([groups.to(vst.dtype), vst], dim=2).reshape(batch, step.num_rows, -1)

    def step_key_validity(self, row_valid: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Which keys of `[memory ; step]` a step's rows may see, `[batch, kept + rows]` bool (the layers turn it
        into a mask, [`step_attention_mask`]).

        None where nothing is padded and the attention builds the pattern itself: a single row, flash-attn, and sdpa
        (`memory_causal_attention`), so no mask, which grows with the memory, is materialised.
        """
        padded = not bool(row_valid.all()) or (key_mask is not None and not bool(key_mask.all()))
        if not padded and (row_valid.shape[1] == 1 or self.config._attn_implementation == "sdpa"):
            return None
        if self.config._attn_implementation == "flash_attention_2":
            if padded:
                raise ValueError("flash_attention_2 does not support padded batches here; use sdpa or eager.")
            return None  # flash-attn aligns its causal mask to the end of the keys: memory is fully visible
        return row_valid if key_mask is None else torch.cat([key_mask, row_valid], dim=1)

    def step_positions(self, step: Step, row_valid: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """Compact positions `[batch, rows]`: each valid row counts the valid rows before it, memory included."""
        if step.is_window:
            return base[:, None] + torch.arange(step.num_rows, device=base.device)
        return (base[:, None] + row_valid.long().cumsum(dim=1) - 1).clamp(min=0)

    def run_layers(
        self,
        hidden_states: torch.Tensor,
        cache: BeaconCache,
        step: Step,
        positions: torch.Tensor,
        key_valid: torch.Tensor | None,
        base: torch.Tensor,
        layer_states: list[torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Run every layer on one step against the memory. Returns the hidden states and, per layer, the (keys,
        values) the keep rule keeps; the caller commits them to the cache together, so a step lands in every layer
        or in none. Only kept rows are held until then, never a window's raw keys and values. Each layer's output is
        appended to `layer_states` when given."""
        position_embeddings = self.rotary_emb(hidden_states, positions)
        vst_rows, kept_position_embeddings = None, None
        if step.is_window:
            vst_rows = step.vst_rows(hidden_states.device)
            kept_positions = base[:, None] + torch.arange(step.num_vsts, device=base.device)
            kept_position_embeddings = self.rotary_emb(hidden_states, kept_positions)
        kept = []
        for layer_idx, layer in enumerate(self.layers):
            past_keys, past_values = cache.memory_pieces(layer_idx)
            hidden_states, kept_keys, kept_values = layer(
                hidden_states,
                position_embeddings,
                key_valid,
                vst_rows,
                kept_position_embeddings,
                *past_keys,
                *past_values,
            )
            kept.append((kept_keys, kept_values))
            if layer_states is not None:
                layer_states.append(hidden_states)
        return hidden_states, kept

    def run_step(
        self,
        step: Step,
        input_ids: torch.Tensor,
        inputs_embeds: torch.Tensor | None,
        visual: VisualInputs | None,
        valid: torch.Tensor,
        cache: BeaconCache,
        layer_states: list[torch.Tensor] | None,
    ) -> torch.Tensor:
        """Embed one step, run it through every layer against the memory and commit what the keep rule keeps.
        Returns the hidden states of its rows `[batch, rows, hidden]` (before the final norm); with `layer_states`
        (a list) the input and every layer's output are appended to it."""
        if inputs_embeds is not None:
            hidden_states = inputs_embeds[:, step.start : step.end]
        else:
            hidden_states = self.embed_step(step, input_ids, visual)
        if layer_states is not None:
            layer_states.append(hidden_states)
        row_valid = step.row_validity(valid)
        base = cache.next_positions()
        base = torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device) if base is None else base
        key_valid = self.step_key_validity(row_valid, cache.key_mask)
        positions = self.step_positions(step, row_valid, base)
        hidden_states, kept = self.run_layers(hidden_states, cache, step, positions, key_valid, base, layer_states)
        step_ids = input_ids[:, step.start : step.end]
        if step.is_window:
            digests = visual.digests(step.token_id, step.new_frames, placed_device(self.embed_tokens.weight, input_ids.device))
            kept_valid = row_valid[:, step.vst_rows(row_valid.device)]
            cache.commit(kept, kept_valid, step_ids, ratio=step.ratio, digests=(step.token_id, digests))
        else:
            cache.commit(kept, row_valid, step_ids)
        return hidden_states

    # ---- forward -----------------------------------------------------------------------------------------------

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        cache: BeaconCache | None = None,
        compression_ratio: int | None = None,
        output_columns: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
    ) -> BaseModelOutputWithPast:
        """Run `input_ids` `[batch, seq]` against `cache` (a new one if None), compressing every visual window.

        Args:
            attention_mask: `[batch, seq]` or `[batch, past + seq]` (1 = token, 0 = padding); its last `seq`
                columns belong to `input_ids`.
            pixel_values_videos: `[videos, frames, 3, H, W]` or `[frames, 3, H, W]`: frames of every video in
                order of appearance, sample after sample; `frames_total * tokens_per_frame` video tokens.
            pixel_values: image tiles `[tiles, 3, H, W]` (or with a leading image dim), in the same order.
            cache: the memory to continue; it is extended in place (also for a batch of mixed layouts).
            compression_ratio: one ratio for every window; None draws per window in training, else the config's.
            output_columns: sorted columns `[n]` whose final hidden states are returned; None = all.
            inputs_embeds: `[batch, seq, hidden]` instead of `input_ids`, for text only (where the visual windows
                are is read from the ids).
            use_cache: False returns no cache (the memory is still built: windows need it).
            output_hidden_states: also return the hidden states of the kept rows (see `kept_hidden_states`).
            output_attentions: refused; there is no `[seq, seq]` attention map once windows are compressed.

        Returns:
            `last_hidden_state` `[batch, n, hidden]` at `output_columns`, the `cache` with the kept memory, and with
            `output_hidden_states` a tuple of `num_hidden_layers + 1` tensors `[batch, kept_rows, hidden]`.
        """
        # Unset output options follow the config, as in the library's models.
        check_output_attentions(self.config.output_attentions if output_attentions is None else output_attentions)
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        cache = self.new_cache() if cache is None else check_beacon_cache(cache)
        with cache.lock:  # calls on several threads with one cache run one at a time
            self.use_cache_here(cache)
            input_ids, visual = self.checked_inputs(input_ids, inputs_embeds, pixel_values_videos, pixel_values, cache)
            valid = input_validity(attention_mask, input_ids)
            if visual is not None and not same_layout(input_ids, tuple(visual_kinds(self.config).values())):
                return self.forward_per_sample(
                    input_ids, valid, visual, cache, compression_ratio, output_columns, use_cache, output_hidden_states
                )
            steps = self.plan(input_ids, visual, compression_ratio)
            outputs, kept_states = [], []
            progress = window_progress(steps, self.training)
            for step in steps:
                layer_states = [] if output_hidden_states else None
                hidden_states = self.run_step(step, input_ids, inputs_embeds, visual, valid, cache, layer_states)
                if output_columns is None and not step.is_window:
                    outputs.append(self.norm(hidden_states))
                else:
                    wanted = step.columns(output_columns, len(steps) == 1, hidden_states.device)
                    if wanted.numel():
                        outputs.append(self.norm(hidden_states[:, step.rows_of_columns(wanted)]))
                if output_hidden_states:
                    kept_states.append(step.kept_rows(layer_states))
                if step.is_window:
                    progress.update()
            progress.close()
            self.warn_beyond_max_positions(cache)
        return BaseModelOutputWithPast(
            last_hidden_state=torch.cat(outputs, dim=1) if len(outputs) > 1 else (outputs[0] if outputs else None),
            hidden_states=self.kept_hidden_states(kept_states) if output_hidden_states else None,
            **cache_field(cache if use_cache is not False else None),
        )

    def checked_inputs(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        pixel_values_videos: torch.Tensor | None,
        pixel_values: torch.Tensor | None,
        cache: BeaconCache,
    ) -> tuple[torch.Tensor, VisualInputs | None]:
        """(`input_ids` `[batch, seq]`, the visual inputs or None for a text-only call), after the checks.

        A call with neither pixels nor visual tokens (every decode step) is checked only for its ids; with
        `inputs_embeds` (text only) the ids are placeholders that give the layout.
        """
        if inputs_embeds is not None:
            check_inputs_embeds(input_ids, inputs_embeds, pixel_values_videos, pixel_values)
            return torch.zeros(inputs_embeds.shape[:2], dtype=torch.long, device=inputs_embeds.device), None
        no_pixels = pixel_values_videos is None and pixel_values is None
        if no_pixels and input_ids is not None and is_plain_text(input_ids, self.config):
            return input_ids, None
        check_input_ids(input_ids, self.config)
        check_run_continues(cache.record.absorbed_ids, input_ids, self.config)
        pixels = {"pixel_values_videos": pixel_values_videos, "pixel_values": pixel_values}
        visual = VisualInputs.from_pixels(input_ids, pixels, self.config)
        visual.check_values(self.config)
        return input_ids, visual

    def plan(self, input_ids: torch.Tensor, visual: VisualInputs | None, compression_ratio: int | None) -> list[Step]:
        """The steps of one call: a text-only call is one text step; else [`plan_steps`]."""
        if visual is None:
            if self.training:  # a recording schedule logs one list per forward (empty for a text-only one)
                self.ratio_sampler(compression_ratio)
            return [Step(0, input_ids.shape[1])]
        return plan_steps(input_ids, self.config, self.ratio_sampler(compression_ratio))

    def forward_per_sample(
        self,
        input_ids: torch.Tensor,
        valid: torch.Tensor,
        visual: VisualInputs,
        cache: BeaconCache,
        compression_ratio: int | None,
        output_columns: torch.Tensor | None,
        use_cache: bool | None,
        output_hidden_states: bool,
    ) -> BaseModelOutputWithPast:
        """A batch of prompts with different layouts (other frame counts, videos beside images or text, other
        question lengths): each sample runs alone, with its own windows, ratios and positions, and the samples'
        caches are stacked into `cache` (one padded memory, [`BeaconCache.stack`]) that the batch decodes from.

        A sample runs on its own tokens only (exactly as alone); outputs at its padding columns are zeros, and
        `hidden_states` rows are left-padded with zeros like the cache.
        """
        if cache.record.absorbed_length:
            raise ValueError(
                "prompts with different layouts (visual tokens of other kinds or in other columns) share a batch only "
                "from an empty cache: pass cache=None, or run them one at a time."
            )
        batch, length = input_ids.shape
        device = input_ids.device
        columns = torch.arange(length, device=device) if output_columns is None else output_columns
        caches, states, kept_states = [], [], []
        for i in range(batch):
            run_columns = valid[i].nonzero().squeeze(1)
            local = torch.full((length,), -1, dtype=torch.long, device=device)
            local[run_columns] = torch.arange(run_columns.numel(), device=device)
            wanted = local[columns] >= 0
            out = self(
                input_ids[i : i + 1, run_columns],
                **visual.sample(i).as_arguments(self.config),
                compression_ratio=compression_ratio,
                output_columns=local[columns][wanted],
                output_hidden_states=output_hidden_states,
            )
            caches.append(out.cache)
            if out.last_hidden_state is not None:
                zeros = out.last_hidden_state.new_zeros(1, columns.numel(), out.last_hidden_state.shape[-1])
                states.append(zeros.index_copy(1, wanted.nonzero().squeeze(1), out.last_hidden_state))
            elif columns.numel():
                states.append(None)
            if output_hidden_states:
                kept_states.append(out.hidden_states)
        ran = [state for state in states if state is not None]
        states = [ran[0].new_zeros(ran[0].shape) if state is None else state for state in states] if ran else []
        hidden_states = None
        if output_hidden_states:
            rows = max(sample[0].shape[1] for sample in kept_states)
            pad = lambda t: nn.functional.pad(t, (0, 0, rows - t.shape[1], 0))  # noqa: E731
            hidden_states = tuple(torch.cat([pad(t) for t in layer]) for layer in zip(*kept_states))
        cache.stack(caches, input_ids, valid)
        return BaseModelOutputWithPast(
            last_hidden_state=torch.cat(states) if states else None,
            hidden_states=hidden_states,
            **cache_field(cache if use_cache is not False else None),
        )

    # ---- standard outputs --------------------------------------------------------------------------------------

    def kept_hidden_states(self, kept_states: list[list[torch.Tensor]]) -> tuple[torch.Tensor, ...]:
        """`hidden_states` like the library's: the input embeddings, then each layer's output, the last one after
        the final norm; each `[batch, kept_rows, hidden]` over the rows this call adds to the memory, in order: text
        rows one per column, each window's VSTs in place of its visual tokens (the visual rows themselves are
        compressed away and are not returned)."""
        per_layer = [torch.cat([states.to(step[0].device) for states in step], dim=1) for step in zip(*kept_states)]
        per_layer[-1] = self.norm(per_layer[-1])
        return tuple(per_layer)

    def warn_beyond_max_positions(self, cache: BeaconCache) -> None:
        """Warn once per model when the memory holds more positions than the language model was trained on."""
        limit = self.config.text_config.max_position_embeddings
        if self._warned_positions or cache.get_seq_length() <= limit:  # the kept length bounds the positions
            return
        positions = int(cache.next_positions().max())
        if positions > limit:
            self._warned_positions = True
            logger.warning(
                f"The memory holds {positions} kept positions, more than max_position_embeddings={limit} of the "
                "language model: positions beyond it were never trained and answers may degrade. Use fewer frames "
                "or a higher compression_ratio."
            )

    # ---- compression ratios ------------------------------------------------------------------------------------

    def ratio_sampler(self, compression_ratio: int | None) -> Callable[[], int]:
        """The ratio of each window: the given one; a draw from the training ratios in train mode; else the default."""
        if compression_ratio is not None:
            ratio = check_ratio(compression_ratio, self.config)
            return lambda: ratio
        if not self.training:
            ratio = check_ratio(self.config.beacon_ratio, self.config)
            return lambda: ratio
        choices = [check_ratio(r, self.config) for r in self.config.beacon_train_ratios]
        return self.ratio_schedule.sampler(choices)


class VideoXLForCausalLM(VideoXLPreTrainedModel, GenerationMixin):
    """Video-XL with a language-model head: `generate` on videos, images and text; `labels` for training."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # tied only if the config says so
    accepts_loss_kwargs = True  # forward takes `num_items_in_batch`; the Trainer reads this instead of **kwargs

    def __init__(self, config: VideoXLConfig):
        super().__init__(config)
        self.model = VideoXLModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def seed_compression_ratios(self, seed: int) -> None:
        self.model.seed_compression_ratios(seed)

    # ---- sessions ----------------------------------------------------------------------------------------------

    def chat(
        self, processor, messages: list[dict], cache: BeaconCache | None = None, **generate_kwargs
    ) -> tuple[str, BeaconCache]:
        """Answer the last user turn of `messages` (chat-template turns with text, video and image items).

        Returns the answer text and the cache, which holds the conversation so far. Pass that cache back with the
        next call on the same conversation: only the new tokens run, and videos/images the cache holds are not
        decoded or encoded again. A new question about the same video (same messages before it) rewinds the text
        after the video memory; a follow-up (the earlier question and answer kept in `messages`) continues it. A
        cache about other videos, images or earlier text is refused with a `ValueError`.

        `generate_kwargs` go to `generate` (greedy unless `do_sample=True`; `compression_ratio`, `max_new_tokens`
        ...) except the processor's frame sampling options `num_frames`, `fps`, `max_frames`, `video_fps`.
        """
        return chat(self, processor, messages, cache, **generate_kwargs)

    def live(self, processor, compression_ratio: int | None = None, system: str | None = None) -> LiveVideo:
        """A [`LiveVideo`]: feed frames of a growing or endless video as they arrive, ask questions at any time."""
        return LiveVideo(self, processor, compression_ratio=compression_ratio, system=system)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        cache: BeaconCache | None = None,
        labels: torch.LongTensor | None = None,
        compression_ratio: int | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        past_key_values: BeaconCache | None = None,
    ) -> CausalLMOutputWithPast:
        r"""
        Args:
            input_ids: `[batch, seq]` with one `video_token_id` per video token (frames x 144) and one
                `image_token_id` per image token (tiles x 144), as the processor writes them.
            image_sizes: `[images, 2]`, the processor's record of the images' sizes, taken so that
                `model(**processor(...))` works; the tiles already carry everything the model needs.
            cache: a [`BeaconCache`] to continue from (its memory is extended in place).
            past_key_values: the same as `cache`, under the name transformers used before 5.24.
            labels: `[batch, seq]` next-token labels (-100 = ignored). Logits are then computed only where a label
                follows, and `logits` is `[batch, n, vocab]` over those columns.
            compression_ratio: one VST after every `compression_ratio` visual tokens in every window.
            use_cache: False returns no cache.
            logits_to_keep: int k = the last k columns (0 = all); or a 1-D tensor of columns.
            inputs_embeds: `[batch, seq, hidden]` instead of `input_ids`, text-only prompts only.
            output_hidden_states: return `hidden_states`: the input embeddings and every layer's output (the last
                after the final norm), each `[batch, kept_rows, hidden]` over the rows this call keeps in memory:
                every text row, and each window's VSTs in place of its visual tokens.
            output_attentions: refused with a clear error (no `[seq, seq]` map exists once windows are compressed).
            num_items_in_batch: the loss's normaliser under gradient accumulation (passed by the `Trainer`).
            return_dict: False returns a tuple of the output's fields that are not None, in order.
        """
        cache = take_cache(cache, past_key_values)
        tokens = input_ids if input_ids is not None else inputs_embeds
        if tokens is None:
            raise ValueError("Pass input_ids (or inputs_embeds for a text-only prompt).")
        length, device = tokens.shape[1], tokens.device
        if labels is not None:
            shift_labels = nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
            columns = (shift_labels != -100).any(dim=0).nonzero().squeeze(1)
        elif isinstance(logits_to_keep, torch.Tensor):
            columns = logits_to_keep.to(device)
        elif logits_to_keep:
            columns = torch.arange(max(length - logits_to_keep, 0), length, device=device)
        else:
            columns = None
        outputs = self.model(
            input_ids,
            attention_mask=attention_mask,
            pixel_values_videos=pixel_values_videos,
            pixel_values=pixel_values,
            cache=cache,
            compression_ratio=compression_ratio,
            output_columns=columns,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        logits = self.lm_head(hidden_states) if hidden_states is not None else None

        loss = None
        if labels is not None:
            if logits is None:
                loss = self.lm_head.weight.sum() * 0.0  # nothing labelled: a zero that still reaches the graph
            else:
                loss = self.loss_function(
                    logits=logits,
                    labels=None,
                    shift_labels=shift_labels[:, columns].to(logits.device),
                    vocab_size=self.config.text_config.vocab_size,
                    num_items_in_batch=num_items_in_batch,
                )
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, **cache_field(outputs.cache)
        )

    # ---- generation --------------------------------------------------------------------------------------------

    def _prepare_generation_config(self, generation_config, *args, **kwargs):
        """`compression_ratio` as a model input: from `generate(compression_ratio=...)`, else from the generation
        config (`model.generation_config.compression_ratio`, or the key in a saved `generation_config.json`).

        This is the one place where the library splits generate's kwargs into generation options and model inputs;
        once the generation config holds a `compression_ratio`, the library treats the kwarg as a generation option
        (the explicit kwarg still wins there), so it is moved back to the model inputs here.
        """
        generation_config, model_kwargs = super()._prepare_generation_config(generation_config, *args, **kwargs)
        ratio = model_kwargs.pop("compression_ratio", None)
        if ratio is None:
            ratio = getattr(generation_config, "compression_ratio", None)
        if ratio is not None:
            model_kwargs["compression_ratio"] = check_ratio(ratio, self.config)
        return generation_config, model_kwargs

    def generate(self, *args, **kwargs):
        """`GenerationMixin.generate`, holding the lock of a given cache (under either name) throughout, so that
        calls on several threads with one cache run one at a time instead of interleaving their steps."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        with nullcontext() if cache is None else check_beacon_cache(cache).lock:
            return super().generate(*args, **kwargs)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        rename_cache_kwarg(model_kwargs)
        if model_kwargs.get(CACHE_NAME) is None and generation_config.use_cache is not False:
            model_kwargs[CACHE_NAME] = self.model.new_cache()
            drop_rollback_cache_request(generation_config)
            if generation_config.cache_implementation is not None:
                raise ValueError(
                    f"cache_implementation={generation_config.cache_implementation!r}: Video-XL keeps its own "
                    "compressed cache (a BeaconCache holding the video memory), which generate builds; leave "
                    "cache_implementation unset, or pass a BeaconCache as cache= to reuse a memory"
                )
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        cache: BeaconCache | None = None,
        past_key_values: BeaconCache | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> dict:
        """Feed only the columns the cache has not absorbed, with the pixels of the visual tokens among them.

        On the first call of a `generate`, a reused cache is aligned with `input_ids` ([`BeaconCache.align`]): they
        must start with everything it holds up to its last compressed window (else a `ValueError`); raw text after
        it that they do not repeat is rewound. Pixels may cover every visual token of `input_ids` (the frames the
        cache holds are then checked against it and skipped) or only those not absorbed yet. Later calls feed the
        generated tokens, which the cache continues by construction, and no pixels.

        `generate` passes the cache under this transformers' name (`compat_videoxl.CACHE_NAME`); both names are
        declared so that its argument check accepts a user's cache under either.
        """
        cache = take_cache(cache, past_key_values)
        # From 5.24 the library names the calls after the prefill (`next_sequence_length`); they feed the tokens it
        # generated, which continue the cache by construction. Every other call is checked in full.
        continuing = kwargs.get("next_sequence_length") is not None and not kwargs.get("is_first_iteration")
        absorbed = 0 if cache is None else check_beacon_cache(cache).record.absorbed_length
        if not (continuing and 0 < absorbed < input_ids.shape[1]):
            return self.prefill_inputs(input_ids, cache, attention_mask, kwargs)
        return {"input_ids": input_ids[:, absorbed:], "cache": cache, "attention_mask": attention_mask,
                **model_options(kwargs)}

    def prefill_inputs(
        self, input_ids: torch.Tensor, cache: BeaconCache | None, attention_mask: torch.Tensor | None, kwargs: dict
    ) -> dict:
        """The inputs of a prefill from `generate`: the columns (and pixels) the cache has not absorbed."""
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids is empty: generate needs at least one token of prompt")
        fresh = kwargs.get("is_first_iteration") or cache is None or cache.record.absorbed_length == 0
        if fresh and attention_mask is not None:
            check_attention_mask(attention_mask)
            if not attention_mask[:, -1].all():
                raise ValueError(
                    "generate got a right-padded batch (a prompt ends in padding, so its next token would follow the "
                    "padding): pad on the left for generation (the processor does by default: padding_side='left')."
                )
        absorbed = 0
        if cache is not None:
            check_beacon_cache(cache).align(input_ids)
            absorbed = cache.record.absorbed_length
        inputs = {"input_ids": input_ids[:, absorbed:], "cache": cache, "attention_mask": attention_mask,
                  **model_options(kwargs)}
        pixels = {name: kwargs.get(name) for name in visual_kinds(self.config)}
        if any(value is not None for value in pixels.values()):
            check_held = cache.check_frames if absorbed and kwargs.get("is_first_iteration") else None
            inputs.update(unabsorbed_pixels(input_ids, absorbed, pixels, self.config, check_held))
        return inputs

    def _expand_inputs_for_generation(self, expand_size: int = 1, is_encoder_decoder: bool = False, input_ids=None, **model_kwargs):
        """Repeat each sample's frames with the sample (the library's repeat would interleave frames of a video)."""
        pixels = {name: model_kwargs.pop(name, None) for name in visual_kinds(self.config)}
        expanded_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        if expand_size > 1 and any(value is not None for value in pixels.values()):
            visual = VisualInputs.from_pixels(input_ids, pixels, self.config)
            pixels = visual.repeat_samples(expand_size).as_arguments(self.config)
        model_kwargs.update((name, value) for name, value in pixels.items() if value is not None)
        return expanded_ids, model_kwargs

    def save_pretrained(self, *args, **kwargs):
        """Save as usual. A generation config derived from the model config drops custom keys when it is loaded
        back; unmarking it (as the library's Seq2SeqTrainer does) keeps a `compression_ratio` set on it."""
        if getattr(self.generation_config, "compression_ratio", None) is not None:
            self.generation_config._from_model_config = False
        return super().save_pretrained(*args, **kwargs)

    # ---- loading -----------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """Load as usual; VST weights missing from the checkpoint start as copies of q/k/v and of the eos row."""
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        missing = [key for key in info["missing_keys"] if "beacon_" in key]
        if missing:
            logger.warning(
                f"{len(missing)} VST weights are missing from the checkpoint (e.g. {missing[0]}); initialising them "
                "as copies of q/k/v_proj and of the eos embedding row."
            )
            model.init_vst_parameters()
            info["missing_keys"] = [key for key in info["missing_keys"] if "beacon_" not in key]
        return (model, info) if output_loading_info else model

    @torch.no_grad()
    def init_vst_parameters(self) -> None:
        """Copy q/k/v_proj into beacon_{q,k,v}_proj (copies, not ties) and the eos embedding into the VST row."""
        for layer in self.model.layers:
            attn = layer.self_attn
            for name in attn.beacon_param:
                source, target = getattr(attn, f"{name}_proj"), getattr(attn, f"beacon_{name}_proj")
                target.weight.copy_(source.weight)
                target.bias.copy_(source.bias)
        eos = self.config.text_config.eos_token_id
        eos = eos[0] if isinstance(eos, list) else eos
        self.model.beacon_embed_tokens.weight.copy_(self.model.embed_tokens.weight[eos : eos + 1])


__all__ = ["VideoXLPreTrainedModel", "VideoXLModel", "VideoXLForCausalLM", "BeaconCache"]
