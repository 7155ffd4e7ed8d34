"""The file format of a [`BeaconCache`]: one safetensors file, checked in full before anything is taken from it.

Tensors: `layers.{i}.keys` / `layers.{i}.values` `[batch, kv_heads, kept, head_dim]`, `valid` `[batch, kept]`
(uint8), `absorbed_ids.runs` `[batch, runs]` / `absorbed_ids.lengths` `[runs]` (the absorbed ids run-length encoded
over columns: a video is one long run of one id) and `frame_digests.{token_id}` `[batch, frames, 2]`. The header's
metadata holds the format and its version, the model identity (config and weights tag), the number of layers, the
compressed boundary, the ratios, the media notes, the dtype, a checksum of the metadata and every tensor, and a
signature: an HMAC of that checksum keyed by the fingerprint of the writing model's weights.

Reading is in three stages, so that a hostile or damaged file costs no more than its own size and never a deep
error: the header alone (every entry's dtype, shape and offsets, and every metadata field, against each other and
the file's size), then the tensors (checksum, run lengths, finite keys and values), and at the first use with a
model the signature (`BeaconCache.bind`), the layer count and the ratios against that model (`check_against_model`).
The checksum catches damage; the signature catches a file altered by anyone without the weights, who can recompute
the checksum but not the HMAC.
"""

import hashlib
import hmac
import json
import math
import os
import re
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file


FORMAT = "videoxl-beacon-cache"
FORMAT_VERSION = 3  # 3: checksum over metadata and tensors, signature, weights in the identity; 1-2 are refused
# Bytes per element of the safetensors dtypes.
ITEM_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
              "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8}
FLOAT_TYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
METADATA_FIELDS = {"format", "format_version", "model_id", "num_layers", "compressed_rows", "ratios", "media", "dtype",
                   "checksum", "signature"}
MEDIA_FIELDS = {"video": {"kind", "source", "frames", "timestamps"}, "image": {"kind", "source", "frames"}}
LAYER_NAME = re.compile(r"layers\.(0|[1-9][0-9]{0,8})\.(keys|values)")
DIGEST_NAME = re.compile(r"frame_digests\.(0|[1-9][0-9]{0,8})")


class CacheFileError(ValueError):
    """A file that is not a complete, intact cache of this format."""


# ---- writing ---------------------------------------------------------------------------------------------------------


def save_cache(cache, path: str | Path) -> None:
    """Write `cache` (a non-empty `BeaconCache` used with a model) to `path`, atomically: a temporary file in the
    same folder, flushed to disk, then renamed over `path`; a failed save leaves `path` as it was."""
    record = cache.record
    if record.absorbed_length == 0:
        raise ValueError("the cache is empty: nothing to save")
    if cache.key is None or not record.model_id:
        raise ValueError("the cache was never run by a model, so nothing can sign it: save a cache a model filled")
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
        "model_id": record.model_id,
        "num_layers": str(len(cache.layers)),
        "compressed_rows": str(cache.compressed_rows),
        "ratios": json.dumps(record.ratios),
        "media": json.dumps(record.media),
        "dtype": str(cache.layers[0].keys.dtype).removeprefix("torch."),
    }
    digest = content_digest(metadata, tensors)
    metadata["checksum"], metadata["signature"] = digest.hex(), sign(cache.key, digest)
    write_atomically(Path(path), tensors, metadata)


def write_atomically(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """safetensors' `save_file` into a temporary file beside `path`, fsync, `os.replace`: whatever the safetensors
    version does, `path` holds the old file or the whole new one, never a part."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    try:
        save_file(tensors, temp, metadata=metadata)
        with open(temp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(temp, 0o644)  # mkstemp's 0600 would make a cache unreadable to others
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    try:  # the rename itself on disk (POSIX); not every platform opens folders
        folder = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(folder)
    except OSError:
        pass
    finally:
        os.close(folder)


def sign(key: bytes, digest: bytes) -> str:
    """HMAC-SHA256 of a cache file's content digest, keyed by a model's weights fingerprint."""
    return hmac.new(key, digest, hashlib.sha256).hexdigest()


def content_digest(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> bytes:
    """BLAKE2b of the metadata (but the checksum and signature) and of every tensor's name, shape, dtype and
    bytes."""
    digest = hashlib.blake2b(digest_size=32)
    fields = {key: value for key, value in metadata.items() if key not in ("checksum", "signature")}
    digest.update(json.dumps(fields, sort_keys=True).encode() + b"\0")
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.digest()


# ---- reading ---------------------------------------------------------------------------------------------------------


def load_cache(cache_class, path: str | Path, device=None, dtype: torch.dtype | None = None):
    """A `cache_class` (`BeaconCache`) read from `path`, keys and values on `device` in `dtype` (a floating dtype;
    default: CPU, as saved). Raises [`CacheFileError`] (a `ValueError`) naming `path` for anything but a complete,
    intact file of this format; the signature is checked by the first model that uses the cache."""
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating-point torch dtype for the keys and values, got {dtype!r}")
    path = Path(path)
    metadata, entries = read_header(path)
    layout = check_layout(path, metadata, entries)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {name: f.get_tensor(name) for name in entries}
    except Exception as err:  # safetensors' own error types differ between versions
        raise CacheFileError(f"{path} is not a readable BeaconCache file (truncated or corrupt?): {err}") from err
    digest = content_digest(metadata, tensors)
    if metadata["checksum"] != digest.hex():
        raise CacheFileError(f"{path} is corrupt: its contents do not match the checksum written with them")
    ids = absorbed_ids(path, tensors, layout)
    valid = tensors["valid"]
    if valid.numel() and int(valid.max()) > 1:
        raise CacheFileError(f"{path}: 'valid' holds values other than 0 and 1")
    cache = cache_class(layout["num_layers"], model_id=metadata["model_id"])
    kept = []
    for i in range(layout["num_layers"]):
        keys, values = tensors[f"layers.{i}.keys"], tensors[f"layers.{i}.values"]
        if not (torch.isfinite(keys).all() and torch.isfinite(values).all()):
            raise CacheFileError(f"{path}: layer {i} holds NaN or infinite keys or values")
        kept.append((keys.to(device=device, dtype=dtype or keys.dtype),
                     values.to(device=device, dtype=dtype or values.dtype)))
    cache.commit(kept, valid.bool().to(device), ids.to(device))
    cache.compressed_rows = layout["compressed_rows"]
    cache.record.ratios = layout["ratios"]
    cache.record.media = layout["media"]
    cache.record.digests = {
        int(name.split(".", 1)[1]): t.to(device) for name, t in tensors.items() if name.startswith("frame_digests.")
    }
    cache.seal = (str(path), digest, metadata["signature"])
    return cache


def check_against_model(cache, num_layers: int, ratios: list[int], window: int, visual_ids: list[int]) -> None:
    """A cache read from a file, at its first use with a model of `num_layers` layers that compresses windows of
    `window` tokens at `ratios`: the layer count and the recorded ratios must be the model's, and the rows after the
    compressed boundary raw text (no id of `visual_ids`), as the model writes them. The signature is `bind`'s."""
    path = cache.seal[0]
    if len(cache.layers) != num_layers:
        raise ValueError(f"{path} holds {len(cache.layers)} layers of memory; this model has {num_layers}")
    bad = [r for r in cache.record.ratios if r not in ratios]
    if bad:
        raise ValueError(
            f"{path} records compression ratio(s) {bad}; this model compresses windows of {window} tokens at ratios "
            f"{ratios}"
        )
    text_rows = cache.get_seq_length() - cache.compressed_rows
    tail = cache.record.absorbed_ids[:, cache.record.absorbed_length - text_rows :]
    if text_rows and torch.isin(tail, torch.tensor(visual_ids, device=tail.device)).any():
        raise ValueError(
            f"{path} is inconsistent: its compressed_rows ({cache.compressed_rows}) leaves visual tokens among the "
            f"last {text_rows} rows, which only raw text may hold"
        )


def read_header(path: Path) -> tuple[dict[str, str], dict[str, dict[str, Any]]]:
    """Metadata and tensor entries of a safetensors file, each entry's dtype, shape and offsets checked against
    each other and against the file's size (nothing is read but the header)."""
    def refuse(why: str) -> CacheFileError:
        return CacheFileError(f"{path} is not a readable BeaconCache file (truncated or corrupt?): {why}")

    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            if size < 8:
                raise refuse(f"{size} bytes")
            header_len = struct.unpack("<Q", f.read(8))[0]
            if header_len > size - 8:
                raise refuse(f"a header of {header_len} bytes in a file of {size} bytes")
            header = json.loads(f.read(header_len))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise refuse(str(err)) from err
    if not isinstance(header, dict):
        raise refuse("the header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise refuse("its metadata is not a map of strings")
    if metadata.get("format") != FORMAT:
        raise CacheFileError(f"{path} is not a BeaconCache file (format {metadata.get('format')!r})")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise CacheFileError(
            f"{path} has BeaconCache format version {metadata.get('format_version')}; this code reads version "
            f"{FORMAT_VERSION}: build the cache again"
        )
    end = 0
    for name, entry in sorted(header.items(), key=lambda item: _offsets(item[1])):
        if not _well_formed(entry):
            raise refuse(f"tensor {name!r} has a malformed entry {str(entry)[:200]}")
        begin, stop = entry["data_offsets"]
        expected = math.prod(entry["shape"]) * ITEM_SIZES[entry["dtype"]]
        if begin != end or stop - begin != expected:
            raise refuse(
                f"tensor {name!r} ({entry['dtype']} {entry['shape']}, {expected} bytes) lies at bytes "
                f"[{begin}, {stop}) where [{end}, {end + expected}) was expected"
            )
        end = stop
    if 8 + header_len + end != size:
        raise refuse(f"the header describes {8 + header_len + end} bytes, the file has {size}")
    return metadata, header


def _offsets(entry: Any) -> tuple:
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    return tuple(offsets) if isinstance(offsets, list) and all(_is_int(o) for o in offsets) else (-1,)


def _well_formed(entry: Any) -> bool:
    return (
        isinstance(entry, dict) and set(entry) == {"dtype", "shape", "data_offsets"} and entry["dtype"] in ITEM_SIZES
        and isinstance(entry["shape"], list) and all(_is_int(d) and d >= 0 for d in entry["shape"])
        and isinstance(entry["data_offsets"], list) and len(entry["data_offsets"]) == 2
        and all(_is_int(o) and o >= 0 for o in entry["data_offsets"])
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_layout(path: Path, metadata: dict[str, str], entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The parsed metadata (`num_layers`, `compressed_rows`, `ratios`, `media`, and `batch`/`rows`/`runs`), after
    checking every field and every tensor's name, dtype and shape against each other."""
    def refuse(why: str) -> CacheFileError:
        return CacheFileError(f"{path} is an inconsistent BeaconCache file: {why}")

    missing, unknown = METADATA_FIELDS - set(metadata), set(metadata) - METADATA_FIELDS
    if missing or unknown:
        raise refuse(f"metadata fields missing {sorted(missing)}, unknown {sorted(unknown)}")
    layers = [LAYER_NAME.fullmatch(name) for name in entries]
    layer_count = sum(1 for m in layers if m) // 2
    num_layers = _metadata_int(metadata, "num_layers", refuse)
    expected = {f"layers.{i}.{kind}" for i in range(layer_count) for kind in ("keys", "values")}
    expected |= {"valid", "absorbed_ids.runs", "absorbed_ids.lengths"}
    extra = {name for name in entries if name not in expected and not DIGEST_NAME.fullmatch(name)}
    if expected - set(entries) or extra:
        raise refuse(f"tensors missing {sorted(expected - set(entries))[:4]}, unexpected {sorted(extra)[:4]}")
    if num_layers != layer_count or layer_count == 0:
        raise refuse(f"num_layers is {num_layers} but the file holds {layer_count} layers of keys and values")

    first = entries["layers.0.keys"]
    if first["dtype"] not in FLOAT_TYPES or len(first["shape"]) != 4:
        raise refuse(f"layer 0 keys are {first['dtype']} {first['shape']}; floating [batch, heads, rows, dim] expected")
    for name in expected - {"valid", "absorbed_ids.runs", "absorbed_ids.lengths"}:
        if entries[name]["dtype"] != first["dtype"] or entries[name]["shape"] != first["shape"]:
            raise refuse(f"{name} is {entries[name]['dtype']} {entries[name]['shape']}, layer 0 keys are "
                         f"{first['dtype']} {first['shape']}: every layer's keys and values must match")
    if metadata["dtype"] != FLOAT_TYPES[first["dtype"]]:
        raise refuse(f"dtype says {metadata['dtype']!r}, the keys are {FLOAT_TYPES[first['dtype']]}")
    batch, _, rows, _ = first["shape"]
    runs = entries["absorbed_ids.lengths"]["shape"]
    shapes = {"valid": ("U8", [batch, rows]), "absorbed_ids.lengths": ("I64", runs),
              "absorbed_ids.runs": ("I64", [batch, *runs])}
    shapes |= {name: ("I64", [batch, entry["shape"][1] if len(entry["shape"]) == 3 else -1, 2])
               for name, entry in entries.items() if DIGEST_NAME.fullmatch(name)}
    for name, (dtype, shape) in shapes.items():
        if entries[name]["dtype"] != dtype or entries[name]["shape"] != shape or len(runs) != 1:
            raise refuse(f"{name} is {entries[name]['dtype']} {entries[name]['shape']}, expected {dtype} {shape}")
    if batch == 0 or rows == 0 or runs[0] == 0:
        raise refuse(f"an empty memory ({batch} samples, {rows} rows, {runs[0]} runs of ids)")

    compressed_rows = _metadata_int(metadata, "compressed_rows", refuse)
    ratios = _metadata_json(metadata, "ratios", refuse)
    if not isinstance(ratios, list) or len(ratios) > rows or not all(_is_int(r) and 0 < r <= rows for r in ratios):
        raise refuse(f"ratios must be a list of at most {rows} positive ints, got {metadata['ratios'][:100]}")
    if not 0 <= compressed_rows <= rows or (ratios and compressed_rows == 0):
        raise refuse(f"compressed_rows {compressed_rows} must lie in [{1 if ratios else 0}, {rows}] (the kept rows)")
    media = _metadata_json(metadata, "media", refuse)
    check_media(media, refuse)
    return {"num_layers": num_layers, "compressed_rows": compressed_rows, "ratios": ratios, "media": media,
            "batch": batch, "rows": rows, "runs": runs[0]}


def check_media(media: Any, refuse) -> None:
    """Media notes: a list of {kind, source, frames[, timestamps for a video]} (see `session_videoxl.media_note`)."""
    if not isinstance(media, list):
        raise refuse(f"media must be a list of notes, got {type(media).__name__}")
    for i, note in enumerate(media):
        kind = note.get("kind") if isinstance(note, dict) else None
        fields = MEDIA_FIELDS.get(kind) if isinstance(kind, str) else None
        ok = (
            fields is not None and set(note) == fields and isinstance(note["source"], str)
            and _is_int(note["frames"]) and note["frames"] >= 0
            and (note["kind"] == "image" or isinstance(note["timestamps"], list) and all(
                t is None or isinstance(t, (int, float)) and not isinstance(t, bool) for t in note["timestamps"]))
        )
        if not ok:
            raise refuse(f"media note {i} is {str(note)[:200]}; expected {{kind: 'video'|'image', source: str, "
                         "frames: int >= 0, timestamps: [seconds] (videos)}")


def absorbed_ids(path: Path, tensors: dict[str, torch.Tensor], layout: dict[str, Any]) -> torch.Tensor:
    """`[batch, columns]` the absorbed ids, expanded from their runs after checking the run lengths: positive, and
    no more columns than the kept rows can stand for (a text row absorbs one column, a VST `ratio` of them)."""
    lengths = tensors["absorbed_ids.lengths"]
    if int(lengths.min()) <= 0:
        raise CacheFileError(f"{path}: absorbed_ids.lengths holds a run of {int(lengths.min())} columns")
    columns = sum(lengths.tolist())
    bound = layout["rows"] * max(layout["ratios"], default=1)
    text_rows = layout["rows"] - layout["compressed_rows"]
    if not text_rows <= columns <= bound:
        raise CacheFileError(
            f"{path}: absorbed_ids.lengths sum to {columns} columns; {layout['rows']} kept rows at ratios up to "
            f"{max(layout['ratios'], default=1)} stand for {text_rows} to {bound}"
        )
    return tensors["absorbed_ids.runs"].repeat_interleave(lengths, dim=1)


def _metadata_int(metadata: dict[str, str], name: str, refuse) -> int:
    if not re.fullmatch(r"-?[0-9]{1,12}", metadata[name]):
        raise refuse(f"{name} must be an integer, got {metadata[name][:50]!r}")
    return int(metadata[name])


def _metadata_json(metadata: dict[str, str], name: str, refuse) -> Any:
    try:
        return json.loads(metadata[name])
    except (json.JSONDecodeError, RecursionError) as err:
        raise refuse(f"{name} is not JSON: {err}") from err


__all__ = ["CacheFileError", "FORMAT", "FORMAT_VERSION", "load_cache", "save_cache"]
