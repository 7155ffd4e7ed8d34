"""The file format of a [`BeaconCache`]: one safetensors file, checked when read.

Tensors: `layers.{i}.keys` / `layers.{i}.values` `[batch, kv_heads, kept, head_dim]`, `valid` `[batch, kept]`
(uint8), `absorbed_ids.runs` / `absorbed_ids.lengths` (the absorbed ids run-length encoded over columns: a video is
one long run of one id) and `frame_digests.{token_id}` `[batch, frames, 2]`. The header's metadata holds the format
and its version, the model identity, the number of layers, the compressed boundary, the ratios, the media notes, the
dtype and a checksum of every tensor (safetensors itself does not notice a flipped byte).
"""

import hashlib
import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


FORMAT = "videoxl-beacon-cache"
FORMAT_VERSION = 2  # 2: the record's fields as they are now; version 1 files are refused (rebuild the cache)


class CacheFileError(ValueError):
    """A file that is not a complete, intact cache of this format."""


def save_cache(cache, path: str | Path) -> None:
    """Write `cache` (a non-empty `BeaconCache`) to `path`."""
    record = cache.record
    if record.absorbed_length == 0:
        raise ValueError("the cache is empty: nothing to save")
    tensors = {}
    for i, layer in enumerate(cache.layers):
        tensors[f"layers.{i}.keys"] = layer.keys
        tensors[f"layers.{i}.values"] = layer.values
    tensors["valid"] = cache.key_mask.to(torch.uint8)
    runs, lengths = torch.unique_consecutive(record.absorbed_ids, dim=1, return_counts=True)
    tensors["absorbed_ids.runs"], tensors["absorbed_ids.lengths"] = runs, lengths
    for token_id, digests in record.digests.items():
        tensors[f"frame_digests.{token_id}"] = digests
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "model_id": record.model_id or "",
        "num_layers": str(len(cache.layers)),
        "compressed_rows": str(cache.compressed_rows),
        "ratios": json.dumps(record.ratios),
        "media": json.dumps(record.media),
        "dtype": str(cache.layers[0].keys.dtype).removeprefix("torch."),
        "checksum": checksum(tensors),
    }
    save_file(tensors, str(path), metadata=metadata)


def load_cache(cache_class, path: str | Path, device=None, dtype: torch.dtype | None = None):
    """A `cache_class` (`BeaconCache`) read from `path`, keys and values on `device` in `dtype` (default: CPU, as
    saved). Raises [`CacheFileError`] (a `ValueError`) for anything but a complete, intact file of this format."""
    path = Path(path)
    metadata, tensors = read_checked(path)
    try:
        cache = cache_class(int(metadata["num_layers"]), model_id=metadata["model_id"] or None)
        valid = tensors["valid"].bool()
        kept = []
        for i in range(len(cache.layers)):
            keys, values = tensors[f"layers.{i}.keys"], tensors[f"layers.{i}.values"]
            if keys.shape != values.shape or keys.shape[2] != valid.shape[1] or keys.shape[0] != valid.shape[0]:
                raise CacheFileError(f"layer {i} has keys {tuple(keys.shape)}, values {tuple(values.shape)} and "
                                     f"valid rows {tuple(valid.shape)}")
            kept.append((keys.to(device=device, dtype=dtype or keys.dtype),
                         values.to(device=device, dtype=dtype or values.dtype)))
        ids = tensors["absorbed_ids.runs"].repeat_interleave(tensors["absorbed_ids.lengths"], dim=1).to(device)
        cache.commit(kept, valid.to(device), ids)
        cache.compressed_rows = int(metadata["compressed_rows"])
        cache.record.ratios = [int(r) for r in json.loads(metadata["ratios"])]
        cache.record.media = json.loads(metadata["media"])
        cache.record.digests = {
            int(name.split(".", 1)[1]): t.to(device) for name, t in tensors.items() if name.startswith("frame_digests.")
        }
    except (KeyError, ValueError, RuntimeError, json.JSONDecodeError) as err:
        raise CacheFileError(f"{path} is an incomplete or inconsistent BeaconCache file: {err!r}") from err
    text_rows = cache.get_seq_length() - cache.compressed_rows
    if not 0 <= text_rows <= cache.record.absorbed_length:
        raise CacheFileError(f"{path} is an inconsistent BeaconCache file (rows and absorbed ids disagree)")
    return cache


def read_checked(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Metadata and tensors of a cache file whose format, version and checksum are right."""
    try:
        metadata, tensors = read_safetensors(path)
    except (OSError, ValueError, RuntimeError, json.JSONDecodeError, struct.error) as err:
        raise CacheFileError(f"{path} is not a readable BeaconCache file (truncated or corrupt?): {err}") from err
    if metadata.get("format") != FORMAT:
        raise CacheFileError(f"{path} is not a BeaconCache file (format {metadata.get('format')!r})")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise CacheFileError(
            f"{path} has BeaconCache format version {metadata.get('format_version')}; this code reads version "
            f"{FORMAT_VERSION}: build the cache again"
        )
    if metadata.get("checksum") != checksum(tensors):
        raise CacheFileError(f"{path} is corrupt: its contents do not match the checksum written with them")
    return metadata, tensors


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """BLAKE2b of every tensor's name, shape, dtype and bytes."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
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


__all__ = ["CacheFileError", "FORMAT", "FORMAT_VERSION", "load_cache", "save_cache"]
