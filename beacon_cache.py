"""The memory of Video-XL: per layer, the keys and values that survive compression.

Keep rule: text rows are kept as they are; of a visual window only the VST rows are kept, with their keys rotated
at the position they take in memory. Raw visual keys and values are never stored. Keys are stored after RoPE, and
a kept row's position equals the number of valid rows kept before it, so stored keys never need rotating again.

A step (a text span or one visual window) lands in every layer or in none ([`BeaconCache.commit`]). Beside the
rows, the cache records the input ids it has absorbed, so a prompt that does not continue them is refused instead
of being answered from the wrong memory.
"""

import hashlib
import json
import struct
import weakref
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.cache_utils import Cache, DynamicLayer

from .compat_videoxl import crop_count


FORMAT = "videoxl-beacon-cache"
FORMAT_VERSION = 1


class BeaconLayer(DynamicLayer):
    """One layer's kept rows: keys/values `[batch, kv_heads, kept, head_dim]` and `valid` `[batch, kept]` (bool:
    False marks a padding row that must never be attended to).

    While the appended rows carry autograd history (training), the layer also remembers them step by step
    ([`pieces`]): a checkpointed decoder layer then holds references to these pieces, which live anyway, instead of
    the concatenated memory of its step, which would keep one copy of the memory per step alive (memory quadratic
    in the number of windows).
    """

    def __init__(self) -> None:
        super().__init__()
        self.valid: torch.Tensor | None = None
        # (a weak reference to the keys the pieces make up, the pieces); stale once `keys` is replaced otherwise.
        self._pieces: tuple[weakref.ref, list[tuple[torch.Tensor, torch.Tensor]]] | None = None

    def append(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> None:
        pieces = self.pieces()
        self.update(keys, values)
        self.valid = valid if self.valid is None else torch.cat([self.valid, valid], dim=1)
        tracked = keys.requires_grad or values.requires_grad
        self._pieces = (weakref.ref(self.keys), [*pieces, (keys, values)]) if tracked else None

    def pieces(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The kept (keys, values) in pieces whose concatenation along the rows is (`keys`, `values`): the steps
        appended with autograd history one by one (after the memory they continued, as one piece), else the whole
        memory as one piece; none while the layer is empty."""
        if self._pieces is not None and self._pieces[0]() is self.keys:
            return self._pieces[1]
        self._pieces = None
        if not self.is_initialized or self.keys.shape[-2] == 0:
            return []
        return [(self.keys, self.values)]

    def truncate(self, rows: int) -> None:
        """Keep the first `rows` rows (views: no copy); also undoes an `append` that failed halfway."""
        if rows == 0:
            self.reset()
        elif self.is_initialized:
            self.keys, self.values = self.keys[..., :rows, :], self.values[..., :rows, :]
            self.valid = self.valid[:, :rows]

    def reset(self) -> None:
        # Dropped, not zeroed: `update` grows them by concatenation. (Before 5.18 the library's reset zeroes them in
        # place and keeps their rows; with `is_initialized` cleared first it only resets its own bookkeeping.)
        self.keys = self.values = None
        self.is_initialized = False
        super().reset()
        self.valid = None
        self._pieces = None

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if tokens_to_remove and self.valid is not None:
            self.valid = self.valid[:, : -abs(tokens_to_remove)]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.valid is not None:
            self.valid = self.valid.index_select(0, beam_idx.to(self.valid.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.valid is not None:
            self.valid = self.valid.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.valid is not None:
            self.valid = self.valid[indices]


def model_identity(config) -> str:
    """A short hash of the config fields that shape the memory (text and vision towers, windows, token ids)."""
    text, vision = config.text_config, config.vision_config
    fields = {
        "text": {key: getattr(text, key, None) for key in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "rope_parameters", "rms_norm_eps")},
        "vision": {key: getattr(vision, key, None) for key in (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
            "patch_size")},
        "model": {key: getattr(config, key, None) for key in (
            "beacon_window", "beacon_param", "image_token_id", "video_token_id", "vision_feature_layer",
            "spatial_pool_stride")},
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


_DIGEST_WEIGHTS: dict[tuple[int, str], torch.Tensor] = {}


def frame_digests(frames: torch.Tensor) -> torch.Tensor:
    """Two exact integer fingerprints per frame `[n, 2]` (int64) of frames `[n, ...]`, on the frames' device: the
    sum of the float32 bit patterns and their sum under fixed random weights. Any changed pixel changes the first,
    and integer sums give the same numbers on every device and in every order (weights < 2**12 keep the sums far
    from overflow)."""
    flat = frames.flatten(1)  # also for no frames (a sample of a stacked batch without this kind)
    key = (flat.shape[1], str(flat.device))
    if key not in _DIGEST_WEIGHTS:
        generator = torch.Generator().manual_seed(0x5EED)
        _DIGEST_WEIGHTS[key] = torch.randint(1, 2**12, (flat.shape[1],), generator=generator).to(flat.device)
    weights = _DIGEST_WEIGHTS[key]
    digests = []
    for chunk in flat.split(8):
        bits = chunk.float().view(torch.int32).to(torch.int64)
        digests.append(torch.stack([bits.sum(1), (bits * weights).sum(1)], dim=1))
    return torch.cat(digests) if digests else torch.zeros(0, 2, dtype=torch.int64, device=flat.device)


class BeaconCache(Cache):
    """A [`Cache`] holding the kept (compressed) memory of every layer ([`BeaconLayer`]).

    `get_seq_length()` is the number of kept rows: prefix + VSTs + text. Besides the rows it holds what belongs to
    the whole cache:

    - `absorbed_ids` `[batch, seen_tokens]`: the columns of `input_ids` the memory holds, in order.
    - `compressed_rows`: kept rows up to the end of the last compressed window. Rows after it are raw text, one
      per absorbed column, and are the only rows `crop` may remove.
    - `ratios`: the compression ratio of each window, in order.
    - `frame_digests`: per visual token id, `[batch, frames, 2]` fingerprints of the frames absorbed, so a prompt
      carrying other pixels for the same tokens is refused.
    - `media`: JSON-able notes on the absorbed videos and images (where they came from, timestamps), written by
      `chat` and live sessions and saved with the cache.
    - `model_id`: [`model_identity`] of the model that wrote it.
    """

    def __init__(self, num_layers: int):
        super().__init__(layers=[BeaconLayer() for _ in range(num_layers)])
        self._clear()

    def _clear(self) -> None:
        self.absorbed_ids: torch.Tensor | None = None
        self.compressed_rows = 0
        self.ratios: list[int] = []
        self.frame_digests: dict[int, torch.Tensor] = {}
        self.media: list[dict[str, Any]] = []
        self.model_id: str | None = None

    # ---- reading -------------------------------------------------------------------------------------------------

    @property
    def seen_tokens(self) -> int:
        """How many columns of `input_ids` the memory has absorbed (more than `get_seq_length()` once compressed)."""
        return 0 if self.absorbed_ids is None else self.absorbed_ids.shape[1]

    @property
    def key_mask(self) -> torch.Tensor | None:
        """`[batch, kept]` bool: which kept rows are valid (not padding)."""
        return self.layers[0].valid

    def memory(self, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The kept keys and values of one layer, or (None, None) while it is empty."""
        layer = self.layers[layer_idx]
        if not layer.is_initialized or layer.keys.shape[-2] == 0:
            return None, None
        return layer.keys, layer.values

    def memory_pieces(self, layer_idx: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The kept keys and values of one layer as lists of pieces `[batch, kv_heads, rows_i, head_dim]` whose
        concatenation is [`memory`]: one per step while training ([`BeaconLayer.pieces`]), else one; empty lists
        while the layer is empty."""
        pieces = self.layers[layer_idx].pieces()
        return [keys for keys, _ in pieces], [values for _, values in pieces]

    def valid_length(self) -> torch.Tensor | None:
        """Number of valid kept rows per sample `[batch]`: the position the next token takes."""
        return None if self.key_mask is None else self.key_mask.sum(dim=1)

    def absorbed_frames(self, token_id: int) -> int:
        """Frames (or tiles) of one visual kind whose tokens the memory has absorbed, per sample."""
        digests = self.frame_digests.get(token_id)
        return 0 if digests is None else digests.shape[1]

    # ---- writing: one step at a time -------------------------------------------------------------------------------

    def bind(self, model_id: str) -> None:
        """Tie an empty cache to a model; refuse a cache written by a model of another config."""
        if self.model_id is None and self.seen_tokens == 0:
            self.model_id = model_id
        elif self.model_id != model_id:
            raise ValueError(
                f"this cache was written by a model with another config (identity {self.model_id}, this model "
                f"{model_id}); its memory cannot be read by this model. Start from cache=None."
            )

    def commit(
        self,
        kept: list[tuple[torch.Tensor, torch.Tensor]],
        valid: torch.Tensor,
        ids: torch.Tensor,
        ratio: int = 0,
        digests: tuple[int, torch.Tensor] | None = None,
    ) -> None:
        """Append one step to every layer at once: `kept[i]` = (keys, values) `[batch, kv_heads, rows, head_dim]`
        of layer i, `valid` `[batch, rows]`, `ids` `[batch, columns]` the input columns the step absorbed. A window
        (`ratio` > 0) also records its ratio and `digests` = (token_id, `[batch, frames, 2]`) of its new frames.

        If anything fails midway (an interrupt, out of memory), the layers already extended are cut back: the cache
        is as before the step.
        """
        if len(kept) != len(self.layers):
            raise ValueError(f"a step must keep rows for all {len(self.layers)} layers, got {len(kept)}")
        rows = self.get_seq_length()
        try:
            for layer, (keys, values) in zip(self.layers, kept):
                layer.append(keys, values, valid.bool())
            absorbed_ids = ids if self.absorbed_ids is None else torch.cat([self.absorbed_ids, ids.to(self.absorbed_ids.device)], 1)
            frame_digests = dict(self.frame_digests)
            if digests is not None:
                token_id, new = digests
                old = frame_digests.get(token_id)
                frame_digests[token_id] = new if old is None else torch.cat([old, new.to(old.device)], dim=1)
            ratios = self.ratios + [ratio] if ratio else self.ratios
            compressed_rows = self.get_seq_length() if ratio else self.compressed_rows
        except BaseException:
            for layer in self.layers:
                layer.truncate(rows)
            raise
        # One statement, after everything that can fail: the whole-cache records move with the rows.
        self.absorbed_ids, self.frame_digests, self.ratios, self.compressed_rows = (
            absorbed_ids, frame_digests, ratios, compressed_rows
        )

    @classmethod
    def stack(
        cls, caches: list["BeaconCache"], absorbed_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> "BeaconCache":
        """One batched cache from single-sample caches (each `[1, ...]`), e.g. prompts prefilled one at a time.

        `absorbed_ids` `[batch, seq]` is the padded prompt the batch decodes from, `attention_mask` `[batch, seq]`
        its padding (0); each cache holds the rows of its sample's tokens. Each sample's rows are left-padded with
        invalid rows to the longest, so the raw text rows after the last window line up with the last columns
        where every sample ends in text (only those can be rewound or cropped). Frame digests are padded with
        zeros after a sample's own frames. `ratios` lists the samples' ratios in turn.

        The given caches are emptied: their rows are released layer by layer as they are copied, so stacking needs
        one layer's rows on top of the samples' memory, not a second copy of all of it.
        """
        if not caches or any(cache.seen_tokens == 0 or cache.absorbed_ids.shape[0] != 1 for cache in caches):
            raise ValueError("stack takes a non-empty list of non-empty single-sample caches")
        if absorbed_ids.shape[0] != len(caches):
            raise ValueError(f"absorbed_ids has {absorbed_ids.shape[0]} rows for {len(caches)} caches")
        rows = [cache.get_seq_length() for cache in caches]
        tails = [length - cache.compressed_rows for length, cache in zip(rows, caches)]
        if any(tail > absorbed_ids.shape[1] for tail in tails):
            raise ValueError("a cache holds more raw text rows than absorbed_ids has columns")
        tokens = torch.ones_like(absorbed_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        unpadded_ends = tokens.flip(1).long().cumprod(dim=1).sum(dim=1).tolist()  # columns after the last padding
        longest = max(rows)
        stacked = cls(len(caches[0].layers))
        for token_id in {token_id for cache in caches for token_id in cache.frame_digests}:
            digests = [cache.frame_digests.get(token_id) for cache in caches]
            frames = max(d.shape[1] for d in digests if d is not None)
            template = next(d for d in digests if d is not None)
            stacked.frame_digests[token_id] = torch.cat([
                template.new_zeros(1, frames, 2) if d is None else _right_pad(d, frames, dim=1) for d in digests
            ])
        valid = torch.cat([_left_pad(cache.key_mask, longest, dim=1) for cache in caches])
        kept = []
        for layer_idx in range(len(stacked.layers)):
            layers = [cache.layers[layer_idx] for cache in caches]
            keys = torch.cat([_left_pad(layer.keys, longest, dim=2) for layer in layers])
            values = torch.cat([_left_pad(layer.values, longest, dim=2) for layer in layers])
            kept.append((keys, values))
            for layer in layers:
                layer.reset()
        stacked.commit(kept, valid, absorbed_ids)
        stacked.compressed_rows = longest - min(min(tail, end) for tail, end in zip(tails, unpadded_ends))
        stacked.ratios = [ratio for cache in caches for ratio in cache.ratios]
        stacked.model_id = caches[0].model_id
        for cache in caches:
            cache.reset()
        return stacked

    # ---- Cache operations ------------------------------------------------------------------------------------------

    def reset(self) -> None:
        super().reset()
        self._clear()

    @property
    def is_croppable(self) -> bool:
        # Raw text rows after the last window can be removed (crop refuses anything earlier), which is all that
        # assisted decoding's rollback removes.
        return True

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last `-tokens_to_remove` rows (transformers' convention: a negative count, 0 = nothing).

        Only raw text rows after the last compressed window can be removed, each with the absorbed column it came
        from; cutting into compressed memory raises a `ValueError` (a compressed window cannot be re-opened).
        Releases before 5.15 pass the number of columns to keep instead (`compat_videoxl.crop_count`).
        """
        tokens_to_remove = crop_count(tokens_to_remove, self.seen_tokens)
        if tokens_to_remove > 0:
            raise ValueError(
                f"crop takes a negative number of rows to remove, got {tokens_to_remove}; to keep n rows call "
                "crop(n - cache.get_seq_length())"
            )
        remove = -tokens_to_remove
        if remove == 0:
            return
        text_rows = self.get_seq_length() - self.compressed_rows
        if remove > text_rows:
            raise ValueError(
                f"cannot crop {remove} rows: only the last {text_rows} rows are raw text after the compressed "
                f"memory ({self.compressed_rows} rows up to the end of the last visual window cannot be cut). "
                "Start from a cache that ends before the visual input instead."
            )
        for layer in self.layers:
            layer.crop(tokens_to_remove)
        self.absorbed_ids = self.absorbed_ids[:, :-remove]

    def rewind(self, seen_tokens: int) -> None:
        """Forget the absorbed columns after the first `seen_tokens` (raw text only, as `crop`)."""
        if not 0 <= seen_tokens <= self.seen_tokens:
            raise ValueError(f"cannot rewind to {seen_tokens} columns: the cache has absorbed {self.seen_tokens}")
        self.crop(seen_tokens - self.seen_tokens)

    def checkpoint(self) -> dict[str, Any]:
        """The cache's current extent (a few numbers, no tensors): [`restore`] returns to it."""
        return {
            "rows": self.get_seq_length(),
            "seen_tokens": self.seen_tokens,
            "compressed_rows": self.compressed_rows,
            "ratios": len(self.ratios),
            "frames": {token_id: d.shape[1] for token_id, d in self.frame_digests.items()},
            "media": json.dumps(self.media),
            "model_id": self.model_id,
        }

    def restore(self, checkpoint: dict[str, Any]) -> None:
        """Return to an earlier [`checkpoint`] of this cache, compressed windows included: memory only ever grows
        by appending, so every earlier extent is a whole cache. (Views: nothing is copied.)"""
        if checkpoint["rows"] > self.get_seq_length() or checkpoint["seen_tokens"] > self.seen_tokens:
            raise ValueError("restore takes a checkpoint of this cache taken earlier; the cache is shorter than it")
        for layer in self.layers:
            layer.truncate(checkpoint["rows"])
        self.absorbed_ids = self.absorbed_ids[:, : checkpoint["seen_tokens"]] if checkpoint["seen_tokens"] else None
        self.compressed_rows = checkpoint["compressed_rows"]
        self.ratios = self.ratios[: checkpoint["ratios"]]
        self.frame_digests = {
            token_id: d[:, : checkpoint["frames"][token_id]]
            for token_id, d in self.frame_digests.items()
            if checkpoint["frames"].get(token_id)
        }
        self.media = json.loads(checkpoint["media"])
        self.model_id = checkpoint["model_id"]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_batch(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    def _map_batch(self, fn) -> None:
        if self.absorbed_ids is not None:
            self.absorbed_ids = fn(self.absorbed_ids)
        self.frame_digests = {token_id: fn(d) for token_id, d in self.frame_digests.items()}

    # ---- checks ------------------------------------------------------------------------------------------------------

    @property
    def compressed_columns(self) -> int:
        """Absorbed columns up to the end of the last compressed window (the rest are raw text, one row each)."""
        return self.seen_tokens - (self.get_seq_length() - self.compressed_rows)

    def align(self, input_ids: torch.Tensor) -> None:
        """Make the cache a prefix of `input_ids` `[batch, seq]`, leaving at least one column to run.

        Everything up to the end of the last compressed window must be the start of `input_ids`: a prompt that parts
        from it (another video or layout, other earlier text, a shorter prompt) or another batch size is refused
        with a `ValueError`. Raw text after it that `input_ids` do not repeat (an earlier question and answer, tokens
        assisted decoding rejected) is rewound, which is exactly what a fresh prompt would compute.
        """
        absorbed = self.seen_tokens
        if absorbed == 0:
            return
        if input_ids.shape[0] != self.absorbed_ids.shape[0]:
            raise ValueError(
                f"the cache holds {self.absorbed_ids.shape[0]} sample(s) but input_ids has {input_ids.shape[0]}"
            )
        length = min(absorbed, input_ids.shape[1])
        same = (input_ids[:, :length] == self.absorbed_ids[:, :length].to(input_ids.device)).all(dim=0)
        differs = (~same).nonzero()
        common = int(differs[0]) if differs.numel() else length
        common = min(common, input_ids.shape[1] - 1)  # the last column runs again rather than nothing
        frozen = self.compressed_columns
        if common < frozen:
            what = (
                "the whole prompt is already in the cache and ends with its compressed memory: add new tokens"
                if common == input_ids.shape[1] - 1 and length == absorbed == input_ids.shape[1]
                else "this cache belongs to another prompt (other visual input or earlier text, or a shorter prompt): "
                "pass cache=None, or a prompt that starts with cache.absorbed_ids"
            )
            raise ValueError(
                f"input_ids part from the ids the cache absorbed at column {max(common, 0)}, inside its compressed "
                f"memory (its first {frozen} columns cannot be rewound): {what}"
            )
        if common < absorbed:
            self.rewind(common)

    def check_frames(self, token_id: int, frames: list[torch.Tensor]) -> None:
        """Refuse pixels whose frames are not the ones the memory absorbed. `frames` holds, per sample, the frames
        `[n, ...]` its absorbed tokens of `token_id` stand for (samples of a stacked batch may hold different
        counts; their digests are zero-padded)."""
        known = self.frame_digests.get(token_id)
        if known is None or known.shape[1] == 0:
            return
        frames_known = known.shape[1]
        given = torch.stack([_right_pad(frame_digests(sample[:frames_known]), frames_known, 0) for sample in frames])
        if not torch.equal(given.to(known.device), known):
            raise ValueError(
                f"the pixels given for the {known.shape[1]} frame(s) the cache already holds (token id {token_id}) "
                "are not the frames it encoded: this cache belongs to another video or image. Pass cache=None."
            )

    # ---- on disk -----------------------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the memory to one safetensors file: kept keys/values, valid rows, absorbed ids and frame digests,
        with JSON metadata (format version, model identity, ratios, frames, media notes, dtype) in its header."""
        if self.seen_tokens == 0:
            raise ValueError("the cache is empty: nothing to save")
        tensors = {}
        for i, layer in enumerate(self.layers):
            tensors[f"layers.{i}.keys"] = layer.keys.contiguous()
            tensors[f"layers.{i}.values"] = layer.values.contiguous()
        tensors["valid"] = self.key_mask.to(torch.uint8).contiguous()
        # Run-length encoded over columns: a video is one long run of the same id.
        runs, lengths = torch.unique_consecutive(self.absorbed_ids, dim=1, return_counts=True)
        tensors["absorbed_ids.runs"], tensors["absorbed_ids.lengths"] = runs.contiguous(), lengths
        for token_id, digests in self.frame_digests.items():
            tensors[f"frame_digests.{token_id}"] = digests.contiguous()
        metadata = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "model_id": self.model_id or "",
            "num_layers": str(len(self.layers)),
            "compressed_rows": str(self.compressed_rows),
            "ratios": json.dumps(self.ratios),
            "frames": json.dumps({str(t): int(d.shape[1]) for t, d in self.frame_digests.items()}),
            "media": json.dumps(self.media),
            "dtype": str(self.layers[0].keys.dtype).removeprefix("torch."),
        }
        tensors = {name: t.detach().cpu() for name, t in tensors.items()}
        metadata["checksum"] = _checksum(tensors)
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "BeaconCache":
        """Read a cache written by [`save`]. `device`/`dtype`: where and in which float type to put the keys and
        values (default: CPU, as saved). A file that is not a complete cache of this format raises `ValueError`."""
        path = Path(path)
        try:
            metadata, tensors = _read_safetensors(path)
        except (OSError, ValueError, RuntimeError, json.JSONDecodeError, struct.error) as err:
            raise ValueError(f"{path} is not a readable BeaconCache file (truncated or corrupt?): {err}") from err
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is not a BeaconCache file (format {metadata.get('format')!r})")
        if metadata.get("format_version") != str(FORMAT_VERSION):
            raise ValueError(
                f"{path} has BeaconCache format version {metadata.get('format_version')}; this code reads "
                f"version {FORMAT_VERSION}"
            )
        if metadata.get("checksum") != _checksum(tensors):
            raise ValueError(f"{path} is corrupt: its contents do not match the checksum written with them")
        try:
            num_layers = int(metadata["num_layers"])
            cache = cls(num_layers)
            valid = tensors["valid"].bool()
            for i, layer in enumerate(cache.layers):
                keys, values = tensors[f"layers.{i}.keys"], tensors[f"layers.{i}.values"]
                if keys.shape != values.shape or keys.shape[2] != valid.shape[1] or keys.shape[0] != valid.shape[0]:
                    raise ValueError(f"layer {i} has keys {tuple(keys.shape)}, values {tuple(values.shape)} and "
                                     f"valid rows {tuple(valid.shape)}")
                keys = keys.to(device=device, dtype=dtype or keys.dtype)
                layer.append(keys, values.to(device=device, dtype=dtype or values.dtype), valid.to(keys.device))
            runs, lengths = tensors["absorbed_ids.runs"], tensors["absorbed_ids.lengths"]
            cache.absorbed_ids = runs.repeat_interleave(lengths, dim=1).to(device)
            cache.frame_digests = {
                int(name.split(".", 1)[1]): t.to(device) for name, t in tensors.items() if name.startswith("frame_digests.")
            }
            cache.compressed_rows = int(metadata["compressed_rows"])
            cache.ratios = [int(r) for r in json.loads(metadata["ratios"])]
            cache.media = json.loads(metadata["media"])
            cache.model_id = metadata["model_id"] or None
        except (KeyError, ValueError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is an incomplete or inconsistent BeaconCache file: {err!r}") from err
        if not cache.compressed_rows <= cache.get_seq_length() or cache.seen_tokens < cache.get_seq_length() - cache.compressed_rows:
            raise ValueError(f"{path} is an inconsistent BeaconCache file (rows and absorbed ids disagree)")
        return cache


def _left_pad(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Zeros (False for bool) before `tensor` along `dim` up to `length`."""
    shape = list(tensor.shape)
    shape[dim] = length - tensor.shape[dim]
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _right_pad(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Zeros after `tensor` along `dim` up to `length`."""
    shape = list(tensor.shape)
    shape[dim] = length - tensor.shape[dim]
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    """BLAKE2b of every tensor's name, shape, dtype and bytes: safetensors itself does not notice a flipped byte."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Metadata and tensors of a safetensors file, after checking its size against its header (safetensors maps
    files lazily, so a truncated file would otherwise fail late or not at all)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        if header_len > size - 8:
            raise ValueError(f"header of {header_len} bytes in a file of {size} bytes")
        header = json.loads(f.read(header_len))
    data_end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
    if 8 + header_len + data_end != size:
        raise ValueError(f"the header describes {8 + header_len + data_end} bytes, the file has {size}")
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}, {name: f.get_tensor(name) for name in f.keys()}


__all__ = ["BeaconCache", "BeaconLayer", "frame_digests", "model_identity"]
