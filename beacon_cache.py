"""The memory of Video-XL: per layer, the keys and values that survive compression, and a record of what it holds.

Keep rule: text rows are kept as they are; of a visual window only the VST rows are kept, with their keys rotated
at the position they take in memory. Raw visual keys and values are never stored. Keys are stored after RoPE, and
a kept row's position equals the number of valid rows kept before it, so stored keys never need rotating again.

A step (a text span or one visual window) lands in every layer or in none ([`BeaconCache.commit`]). Beside the
rows, the cache holds one [`MemoryRecord`]: the input ids it absorbed (so a prompt that does not continue them is
refused instead of being answered from the wrong memory), the windows' ratios, fingerprints of the frames, the
sessions' media notes and the identity of the model that wrote it. The file format is in `cache_file_videoxl.py`.

Lengths, one per question:
- `get_seq_length()`: kept rows per layer (prefix + VSTs + text), the library's question.
- `record.absorbed_length`: columns of `input_ids` the memory holds (more than the rows once compressed).
- `compressed_rows`: kept rows up to the end of the last window; only rows after it (raw text) can be cropped.
- `next_positions()`: per sample, the position the next token takes (valid rows kept; padding does not count).
"""

import functools
import hashlib
import hmac
import json
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .cache_file_videoxl import load_cache, save_cache, sign
from .compat_videoxl import crop_count


def holding_lock(method):
    """Run a cache method holding the cache's lock (see `BeaconCache.lock`)."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self.lock:
            return method(self, *args, **kwargs)

    return locked


class BeaconLayer(DynamicLayer):
    """One layer's kept rows: keys/values `[batch, kv_heads, kept, head_dim]` (their validity is the cache's).

    While the appended rows carry autograd history (training), the layer also remembers them step by step
    ([`pieces`]): a checkpointed decoder layer then holds references to these pieces, which live anyway, instead of
    the concatenated memory of its step, which would keep one copy of the memory per step alive (memory quadratic
    in the number of windows).
    """

    def __init__(self) -> None:
        super().__init__()
        # (a weak reference to the keys the pieces make up, the pieces); stale once `keys` is replaced otherwise.
        self._pieces: tuple[weakref.ref, list[tuple[torch.Tensor, torch.Tensor]]] | None = None

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        pieces = self.pieces()
        self.update(keys, values)
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

    def reset(self) -> None:
        # Dropped, not zeroed: `update` grows them by concatenation. (Before 5.18 the library's reset zeroes them in
        # place and keeps their rows; with `is_initialized` cleared first it only resets its own bookkeeping.)
        self.keys = self.values = None
        self.is_initialized = False
        super().reset()
        self._pieces = None


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


# Elements read from each parameter for its fingerprint: enough that retrained or other weights differ, few enough
# that a 7B model is fingerprinted in well under a second.
FINGERPRINT_SAMPLES = 1024


def weights_fingerprint(module: torch.nn.Module) -> bytes:
    """A deterministic 32-byte fingerprint of a module's weights (name, shape, dtype and up to
    `FINGERPRINT_SAMPLES` evenly spaced values of every parameter and buffer). Not a hash of every byte: it tells
    other weights of the same config apart (another seed, another fine-tune), cheaply. Weights not materialised
    (meta device, sharded to nothing) count by name and shape only."""
    digest = hashlib.sha256()
    for name, tensor in sorted([*module.named_parameters(), *module.named_buffers()], key=lambda item: item[0]):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        tensor = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # a DTensor: this rank's shard
        if tensor.is_meta or tensor.numel() == 0:
            continue
        flat = tensor.detach().reshape(-1)
        stride = max(flat.numel() // FINGERPRINT_SAMPLES, 1)
        # a copy: numpy on a view of the weight's own storage would pin it (FSDP frees and refills that storage)
        digest.update(flat[::stride][:FINGERPRINT_SAMPLES].float().cpu().clone().numpy().tobytes())
    return digest.digest()


def weights_tag(key: bytes) -> str:
    """The public name of a weights fingerprint (the fingerprint itself is the key that signs cache files)."""
    return hashlib.sha256(b"videoxl-weights-tag:" + key).hexdigest()[:16]


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
    for frame in flat:  # one frame's int64 bits at a time (8 bytes a pixel), not a window's
        bits = frame.float().view(torch.int32).to(torch.int64)
        digests.append(torch.stack([bits.sum(), (bits * weights).sum()]))
    return torch.stack(digests) if digests else torch.zeros(0, 2, dtype=torch.int64, device=flat.device)


@dataclass
class MemoryRecord:
    """What a session needs to know about a memory besides its rows.

    - `absorbed_ids` `[batch, absorbed_length]`: the columns of `input_ids` the memory holds, in order (kept as the
      steps' pieces, joined when read).
    - `ratios`: the compression ratio of each window, in order.
    - `digests`: per visual token id, `[batch, frames, 2]` fingerprints ([`frame_digests`]) of the frames absorbed.
    - `media`: JSON-able notes on the absorbed videos and images, written and read by the sessions
      (`session_videoxl.py`); the cache only keeps and saves them.
    - `model_id`: [`model_identity`] of the model that wrote the memory.
    """

    id_pieces: list[torch.Tensor] = field(default_factory=list)
    ratios: list[int] = field(default_factory=list)
    digests: dict[int, torch.Tensor] = field(default_factory=dict)
    media: list[dict[str, Any]] = field(default_factory=list)
    model_id: str | None = None
    # The columns `id_pieces` hold, counted as they change: generation reads it at every token.
    absorbed_length: int = 0

    @property
    def absorbed_ids(self) -> torch.Tensor | None:
        if len(self.id_pieces) > 1:
            self.id_pieces = [torch.cat(self.id_pieces, dim=1)]
        return self.id_pieces[0] if self.id_pieces else None

    def add_ids(self, ids: torch.Tensor) -> None:
        """Append the `[batch, columns]` ids of one step."""
        self.id_pieces.append(ids)
        self.absorbed_length += ids.shape[1]

    def set_ids(self, ids: torch.Tensor | None) -> None:
        """Replace the absorbed ids (`[batch, columns]`; None or no column: none)."""
        self.id_pieces = [] if ids is None or ids.shape[1] == 0 else [ids]
        self.absorbed_length = 0 if not self.id_pieces else ids.shape[1]

    @property
    def batch_size(self) -> int | None:
        return self.id_pieces[0].shape[0] if self.id_pieces else None

    def with_digests(self, token_id: int, new: torch.Tensor) -> dict[int, torch.Tensor]:
        old = self.digests.get(token_id)
        return {**self.digests, token_id: new if old is None else torch.cat([old, new.to(old.device)], dim=1)}

    def cut(self, absorbed_length: int, ratios: int, frames: dict[int, int]) -> None:
        """Keep the first `absorbed_length` ids, `ratios` ratios and `frames[token_id]` frames' digests."""
        self.set_ids(self.absorbed_ids[:, :absorbed_length] if absorbed_length else None)
        self.ratios = self.ratios[:ratios]
        self.digests = {t: d[:, : frames[t]] for t, d in self.digests.items() if frames.get(t)}

    def map_batch(self, fn) -> None:
        """Apply a batch-dimension operation (reorder, repeat, select) to the per-sample fields."""
        ids = self.absorbed_ids
        self.set_ids(None if ids is None else fn(ids))
        self.digests = {token_id: fn(d) for token_id, d in self.digests.items()}


class BeaconCache(Cache):
    """A [`Cache`] holding the kept (compressed) memory of every layer ([`BeaconLayer`]), the validity of its rows
    (`key_mask` `[batch, kept]`, False for padding rows that are never attended to), the compressed boundary
    (`compressed_rows`) and the [`MemoryRecord`] (`record`). See the module docstring for its lengths."""

    def __init__(self, num_layers: int, model_id: str | None = None, key: bytes | None = None):
        super().__init__(layers=[BeaconLayer() for _ in range(num_layers)])
        self.key_mask: torch.Tensor | None = None
        self.compressed_rows = 0
        self.record = MemoryRecord(model_id=model_id)
        # The weights fingerprint of the model the cache is bound to: it signs the cache's files (never saved).
        self.key = key
        # A cache read from a file: (path, content digest, signature), checked by the first model that uses it.
        self.seal: tuple[str, bytes, str] | None = None
        # Every public entry that changes the cache (the model's forward/generate/chat with it, LiveVideo, crop,
        # rewind, align, restore, save) holds this lock: callers on several threads are served one at a time.
        # Re-entrant: generate holds it across the forwards it makes.
        self.lock = threading.RLock()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["lock"]  # a lock cannot be copied or pickled; a copy gets its own
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.lock = threading.RLock()

    def next_positions(self) -> torch.Tensor | None:
        """`[batch]`: the position the next token of each sample takes (its valid kept rows); None while empty."""
        return None if self.key_mask is None else self.key_mask.sum(dim=1)

    def memory_bytes(self) -> int:
        """Bytes of the kept keys and values over every layer: what the memory holds on its device."""
        return sum(layer.keys.nbytes + layer.values.nbytes for layer in self.layers if layer.is_initialized)

    def memory_pieces(self, layer_idx: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The kept keys and values of one layer as lists of pieces `[batch, kv_heads, rows_i, head_dim]` (see
        [`BeaconLayer.pieces`]); empty lists while the layer is empty."""
        pieces = self.layers[layer_idx].pieces()
        return [keys for keys, _ in pieces], [values for _, values in pieces]

    # ---- writing: one step at a time -------------------------------------------------------------------------------

    def bind(self, model_id: str, key: bytes | None = None) -> None:
        """Tie an empty cache to a model (its identity and weights fingerprint `key`); refuse a cache written by a
        model of another config or with other weights, and a cache file whose signature is not this model's."""
        if self.record.model_id is None and self.record.absorbed_length == 0:
            self.record.model_id = model_id
        elif self.record.model_id != model_id:
            raise ValueError(
                f"this cache was written by a model with another config or other weights (identity "
                f"{self.record.model_id}, this model {model_id}); its memory cannot be read by this model. Start "
                "from cache=None."
            )
        if key is None:
            return
        if self.seal is not None:
            path, content_digest, signature = self.seal
            if not hmac.compare_digest(sign(key, content_digest), signature):
                raise ValueError(
                    f"{path} is not signed by this model's weights: the file was altered after it was saved (its "
                    "metadata, tensors or checksum), or written by other weights. Build the cache again."
                )
            self.seal = None
        self.key = key

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
                layer.append(keys, values)
            valid = valid.bool()
            key_mask = valid if self.key_mask is None else torch.cat([self.key_mask, valid.to(self.key_mask.device)], 1)
            all_digests = self.record.digests if digests is None else self.record.with_digests(*digests)
        except BaseException:
            for layer in self.layers:
                layer.truncate(rows)
            raise
        # After everything that can fail: the validity and the record move with the rows.
        self.key_mask = key_mask
        self.record.add_ids(ids)
        self.record.digests = all_digests
        if ratio:
            self.record.ratios.append(ratio)
            self.compressed_rows = self.get_seq_length()

    @holding_lock
    def stack(self, caches: list["BeaconCache"], absorbed_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        """Fill this empty cache with the samples of single-sample caches (each `[1, ...]`), e.g. prompts
        prefilled one at a time.

        `absorbed_ids` `[batch, seq]` is the padded prompt the batch decodes from, `attention_mask` `[batch, seq]`
        its padding (0); each cache holds the rows of its sample's tokens. Each sample's rows are left-padded with
        invalid rows to the longest, so the raw text rows after the last window line up with the last columns
        where every sample ends in text (only those can be rewound or cropped). Frame digests are padded with
        zeros after a sample's own frames. `ratios` lists the samples' ratios in turn.

        The given caches are emptied: their rows are released layer by layer as they are copied, so stacking needs
        one layer's rows on top of the samples' memory, not a second copy of all of it.
        """
        if self.record.absorbed_length or self.get_seq_length():
            raise ValueError("stack fills an empty cache")
        if not caches or any(cache.record.absorbed_length == 0 or cache.record.batch_size != 1 for cache in caches):
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
        digests = {}
        for token_id in {token_id for cache in caches for token_id in cache.record.digests}:
            per_sample = [cache.record.digests.get(token_id) for cache in caches]
            frames = max(d.shape[1] for d in per_sample if d is not None)
            template = next(d for d in per_sample if d is not None)
            digests[token_id] = torch.cat([
                template.new_zeros(1, frames, 2) if d is None else _right_pad(d, frames, dim=1) for d in per_sample
            ])
        valid = torch.cat([_left_pad(cache.key_mask, longest, dim=1) for cache in caches])
        kept = []
        for layer_idx in range(len(self.layers)):
            layers = [cache.layers[layer_idx] for cache in caches]
            keys = torch.cat([_left_pad(layer.keys, longest, dim=2) for layer in layers])
            values = torch.cat([_left_pad(layer.values, longest, dim=2) for layer in layers])
            kept.append((keys, values))
            for layer in layers:
                layer.reset()
        self.bind(caches[0].record.model_id, caches[0].key)
        self.commit(kept, valid, absorbed_ids)
        self.compressed_rows = longest - min(min(tail, end) for tail, end in zip(tails, unpadded_ends))
        self.record.ratios = [ratio for cache in caches for ratio in cache.record.ratios]
        self.record.digests = digests
        for cache in caches:
            cache.reset()

    # ---- Cache operations ------------------------------------------------------------------------------------------

    def reset(self) -> None:
        super().reset()
        self.key_mask = None
        self.compressed_rows = 0
        self.record = MemoryRecord()

    @property
    def is_croppable(self) -> bool:
        # Raw text rows after the last window can be removed (crop refuses anything earlier), which is all that
        # assisted decoding's rollback removes.
        return True

    @holding_lock
    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last `-tokens_to_remove` rows (transformers' convention: a negative count, 0 = nothing).

        Only raw text rows after the last compressed window can be removed, each with the absorbed column it came
        from; cutting into compressed memory raises a `ValueError` (a compressed window cannot be re-opened).
        Releases before 5.15 pass the number of columns to keep instead (`compat_videoxl.crop_count`).
        """
        tokens_to_remove = crop_count(tokens_to_remove, self.record.absorbed_length)
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
        rows = self.get_seq_length() - remove
        for layer in self.layers:
            layer.truncate(rows)
        self.key_mask = self.key_mask[:, :rows] if rows else None
        self.record.set_ids(self.record.absorbed_ids[:, :-remove])

    @holding_lock
    def rewind(self, absorbed_length: int) -> None:
        """Forget the absorbed columns after the first `absorbed_length` (raw text only, as `crop`)."""
        if not 0 <= absorbed_length <= self.record.absorbed_length:
            raise ValueError(
                f"cannot rewind to {absorbed_length} columns: the cache has absorbed {self.record.absorbed_length}"
            )
        self.crop(absorbed_length - self.record.absorbed_length)

    def checkpoint(self) -> dict[str, Any]:
        """The cache's current extent (a few numbers, no tensors): [`restore`] returns to it."""
        return {
            "rows": self.get_seq_length(),
            "absorbed_length": self.record.absorbed_length,
            "compressed_rows": self.compressed_rows,
            "ratios": len(self.record.ratios),
            "frames": {token_id: d.shape[1] for token_id, d in self.record.digests.items()},
            "media": json.dumps(self.record.media),
            "model_id": self.record.model_id,
        }

    @holding_lock
    def restore(self, checkpoint: dict[str, Any]) -> None:
        """Return to an earlier [`checkpoint`] of this cache, compressed windows included: memory only ever grows
        by appending, so every earlier extent is a whole cache. (Views: nothing is copied.)"""
        if checkpoint["rows"] > self.get_seq_length() or checkpoint["absorbed_length"] > self.record.absorbed_length:
            raise ValueError("restore takes a checkpoint of this cache taken earlier; the cache is shorter than it")
        for layer in self.layers:
            layer.truncate(checkpoint["rows"])
        self.key_mask = self.key_mask[:, : checkpoint["rows"]] if checkpoint["rows"] else None
        self.compressed_rows = checkpoint["compressed_rows"]
        self.record.cut(checkpoint["absorbed_length"], checkpoint["ratios"], checkpoint["frames"])
        self.record.media = json.loads(checkpoint["media"])
        self.record.model_id = checkpoint["model_id"]

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
        if self.key_mask is not None:
            self.key_mask = fn(self.key_mask)
        self.record.map_batch(fn)

    # ---- checks ------------------------------------------------------------------------------------------------------

    @holding_lock
    def align(self, input_ids: torch.Tensor) -> None:
        """Make the cache a prefix of `input_ids` `[batch, seq]`, leaving at least one column to run.

        Everything up to the end of the last compressed window must be the start of `input_ids`: a prompt that parts
        from it (another video or layout, other earlier text, a shorter prompt) or another batch size is refused
        with a `ValueError`. Raw text after it that `input_ids` do not repeat (an earlier question and answer, tokens
        assisted decoding rejected) is rewound, which is exactly what a fresh prompt would compute.
        """
        absorbed = self.record.absorbed_length
        if absorbed == 0:
            return
        absorbed_ids = self.record.absorbed_ids
        if input_ids.shape[0] != absorbed_ids.shape[0]:
            raise ValueError(f"the cache holds {absorbed_ids.shape[0]} sample(s) but input_ids has {input_ids.shape[0]}")
        length = min(absorbed, input_ids.shape[1])
        same = (input_ids[:, :length] == absorbed_ids[:, :length].to(input_ids.device)).all(dim=0)
        differs = (~same).nonzero()
        common = int(differs[0]) if differs.numel() else length
        common = min(common, input_ids.shape[1] - 1)  # the last column runs again rather than nothing
        frozen = absorbed - (self.get_seq_length() - self.compressed_rows)  # columns up to the last window's end
        if common < frozen:
            what = (
                "the whole prompt is already in the cache and ends with its compressed memory: add new tokens"
                if common == input_ids.shape[1] - 1 and length == absorbed == input_ids.shape[1]
                else "this cache belongs to another prompt (other visual input or earlier text, or a shorter prompt): "
                "pass cache=None, or a prompt that starts with cache.record.absorbed_ids"
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
        known = self.record.digests.get(token_id)
        if known is None or known.shape[1] == 0:
            return
        frames_known = known.shape[1]
        given = torch.stack([_right_pad(frame_digests(sample[:frames_known]), frames_known, 0) for sample in frames])
        if not torch.equal(given.to(known.device), known):
            raise ValueError(
                f"the pixels given for the {known.shape[1]} frame(s) the cache already holds (token id {token_id}) "
                "are not the frames it encoded: this cache belongs to another video or image. Pass cache=None."
            )

    # ---- on disk (the format: cache_file_videoxl.py) ---------------------------------------------------------------

    @holding_lock
    def save(self, path: str | Path) -> None:
        """Write the memory to one safetensors file (see `cache_file_videoxl.save_cache`)."""
        save_cache(self, path)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "BeaconCache":
        """Read a cache written by [`save`]. `device`/`dtype`: where and in which floating type to put the keys and
        values (default: CPU, as saved; the model casts them to its own dtype at first use). A file that is not a
        complete, consistent cache of this format raises `ValueError` naming it; the first model that uses the cache
        checks the file's signature against its weights."""
        return load_cache(cls, path, device, dtype)


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


__all__ = ["BeaconCache", "BeaconLayer", "MemoryRecord", "frame_digests", "model_identity"]
