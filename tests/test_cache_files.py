"""Hostile or damaged cache files are refused with one error naming the file, before anything is allocated from
them; the checksum covers the metadata, the signature is keyed by the weights, and saving is atomic. Every file is
made in the test: saved by a tiny model, then altered as a careless tool or an attacker would."""

import importlib
import json
import struct
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from scripts.local_import import BeaconCache, VideoXLForCausalLM
from tests.conftest import random_frames, tiny_config, tiny_model, video_prompt


cache_file = importlib.import_module("videoxl.cache_file_videoxl")
FRAMES = 6
QUESTION = torch.tensor([[13, 14, 15, 16]])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(model, prompt with a question, path of the model's cache of the prompt)."""
    model, ids = tiny_model(), video_prompt(FRAMES, suffix=())
    with torch.no_grad():
        cache = model(ids, pixel_values_videos=random_frames(FRAMES)).cache
    path = tmp_path_factory.mktemp("cache") / "memory.safetensors"
    cache.save(path)
    return model, torch.cat([ids, QUESTION], dim=1), path


def answer(model, question, cache):
    return model.generate(question, cache=cache, max_new_tokens=6, do_sample=False)[0, question.shape[1]:].tolist()


def raw(path):
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def with_header(path, out, change):
    """A copy of `path` whose header `change(header)` edits (the bytes after it as they were)."""
    header, body = raw(path)
    change(header)
    text = json.dumps(header).encode()
    out.write_bytes(struct.pack("<Q", len(text)) + text + body)
    return out


def forged(path, out, tensors=None, metadata=None, signature=None):
    """A copy of `path` with edited tensors/metadata and the checksum recomputed, as anyone who reads this code can;
    the signature is kept (or replaced by `signature`): without the weights, nobody can compute the right one."""
    with safe_open(str(path), framework="pt") as f:
        meta, values = dict(f.metadata()), {name: f.get_tensor(name) for name in f.keys()}
    if tensors:
        tensors(values)
    if metadata:
        metadata(meta)
    meta["checksum"] = cache_file.content_digest(meta, values).hex()
    if signature:
        meta["signature"] = signature
    save_file(values, str(out), metadata=meta)
    return out


def test_a_saved_cache_loads_and_answers_as_the_original(saved):
    model, question, path = saved
    with torch.no_grad():
        ids = question[:, : -QUESTION.shape[1]]
        cache = model(ids, pixel_values_videos=random_frames(FRAMES)).cache
    assert answer(model, question, BeaconCache.load(path)) == answer(model, question, cache)


def test_a_huge_num_layers_fails_fast_before_allocating(saved, tmp_path):
    _, _, path = saved
    bad = with_header(path, tmp_path / "bad.safetensors", lambda h: h["__metadata__"].update(num_layers="10000000"))
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"bad\.safetensors.*num_layers is 10000000 but the file holds 2 layers"):
        BeaconCache.load(bad)
    assert time.perf_counter() - start < 5  # was 61 s and 1.76 GB: nothing is built from the field


def test_a_huge_run_length_is_refused_before_the_ids_are_expanded(saved, tmp_path):
    _, _, path = saved
    bad = forged(path, tmp_path / "bad.safetensors",
                 tensors=lambda t: t["absorbed_ids.lengths"].__setitem__(0, 10**9))
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"bad\.safetensors: absorbed_ids\.lengths sum to 1000000"):
        BeaconCache.load(bad)
    assert time.perf_counter() - start < 5  # expanding 10^9 columns would allocate 8 GB
    zero = forged(path, tmp_path / "zero.safetensors", tensors=lambda t: t["absorbed_ids.lengths"].__setitem__(0, 0))
    with pytest.raises(ValueError, match="a run of 0 columns"):
        BeaconCache.load(zero)


def test_num_layers_must_match_the_file_and_the_model(saved, tmp_path):
    model, question, path = saved
    bad = forged(path, tmp_path / "bad.safetensors", metadata=lambda m: m.update(num_layers="4"))
    with pytest.raises(ValueError, match="num_layers is 4 but the file holds 2 layers"):
        BeaconCache.load(bad)
    config = tiny_config()
    config.text_config.num_hidden_layers = 4
    config._attn_implementation = "eager"
    deeper = VideoXLForCausalLM(config).eval()
    with pytest.raises(ValueError, match=r"memory\.safetensors holds 2 layers of memory; this model has 4"):
        deeper.generate(question, cache=BeaconCache.load(path), max_new_tokens=2)


@pytest.mark.parametrize("field, value, message", [
    ("media", json.dumps({"kind": "video"}), "media must be a list of notes, got dict"),
    ("media", json.dumps([{"kind": "video", "source": 3, "frames": 6, "timestamps": []}]), "media note 0"),
    ("compressed_rows", "0", r"compressed_rows 0 must lie in \[1, "),
    ("compressed_rows", "-5", r"compressed_rows -5 must lie in \[1, "),
    ("compressed_rows", "1e9", "compressed_rows must be an integer"),
    ("ratios", "[0]", "ratios must be a list of at most"),
    ("ratios", '"4"', "ratios must be a list of at most"),
    ("dtype", "int8", "dtype says 'int8', the keys are float32"),
])
def test_bad_metadata_fields_are_refused_at_load(saved, tmp_path, field, value, message):
    _, _, path = saved
    bad = forged(path, tmp_path / "bad.safetensors", metadata=lambda m: m.update({field: value}))
    with pytest.raises(ValueError, match=r"bad\.safetensors is an inconsistent BeaconCache file: " + message):
        BeaconCache.load(bad)


def test_a_ratio_that_does_not_divide_the_models_window_is_refused_at_use(saved, tmp_path):
    model, question, path = saved
    bad = forged(path, tmp_path / "bad.safetensors", metadata=lambda m: m.update(ratios="[4, 3]"))
    with pytest.raises(ValueError, match=r"records compression ratio\(s\) \[3\]"):
        model.generate(question, cache=BeaconCache.load(bad), max_new_tokens=2)


def test_nan_keys_are_refused_even_with_the_checksum_recomputed(saved, tmp_path):
    _, _, path = saved
    bad = forged(path, tmp_path / "bad.safetensors", tensors=lambda t: t["layers.1.keys"].view(-1).__setitem__(7, float("nan")))
    with pytest.raises(ValueError, match="layer 1 holds NaN or infinite keys or values"):
        BeaconCache.load(bad)


@pytest.mark.parametrize("alteration", ["swapped layers", "other media note", "guessed signature"])
def test_a_file_altered_with_the_checksum_recomputed_fails_the_keyed_signature_at_use(saved, tmp_path, alteration):
    model, question, path = saved

    def swap(tensors):
        tensors["layers.0.keys"], tensors["layers.1.keys"] = tensors["layers.1.keys"], tensors["layers.0.keys"]

    def note(metadata):
        metadata["media"] = json.dumps([{"kind": "video", "source": "video|other.mp4|", "frames": 6, "timestamps": []}])

    if alteration == "swapped layers":
        bad = forged(path, tmp_path / "bad.safetensors", tensors=swap)
    elif alteration == "other media note":
        bad = forged(path, tmp_path / "bad.safetensors", metadata=note)
    else:  # signed with what a file reveals (the identity) instead of the weights' fingerprint
        meta = safe_open(str(path), framework="pt").metadata()
        guess = cache_file.sign(meta["model_id"].encode(), bytes.fromhex(meta["checksum"]))
        bad = forged(path, tmp_path / "bad.safetensors", metadata=note, signature=guess)
    loaded = BeaconCache.load(bad)  # the checksum matches: only the keyed signature can tell
    with pytest.raises(ValueError, match=r"bad\.safetensors is not signed by this model's weights"):
        model.generate(question, cache=loaded, max_new_tokens=2)
    with pytest.raises(ValueError, match="not signed"):  # and it stays refused
        model.generate(question, cache=loaded, max_new_tokens=2)


def test_the_checksum_covers_the_metadata(saved, tmp_path):
    _, _, path = saved
    bad = with_header(path, tmp_path / "bad.safetensors",
                      lambda h: h["__metadata__"].update(compressed_rows=str(int(h["__metadata__"]["compressed_rows"]) - 1)))
    with pytest.raises(ValueError, match=r"bad\.safetensors is corrupt"):
        BeaconCache.load(bad)


@pytest.mark.parametrize("change, message", [
    ("reshaped keys", "every layer's keys and values must match"),
    ("int32 values", "every layer's keys and values must match"),
    ("longer keys", r"lies at bytes"),
    ("negative dim", "malformed entry"),
    ("renamed tensor", r"tensors missing \['valid'\], unexpected \['valid2'\]"),
])
def test_a_header_whose_tensors_disagree_is_refused_naming_the_file(saved, tmp_path, change, message):
    _, _, path = saved

    def edit(header):
        keys = header["layers.0.keys"]
        batch, heads, rows, dim = keys["shape"]
        if change == "reshaped keys":
            keys["shape"] = [batch, heads, rows * 2, dim // 2]
        elif change == "int32 values":
            header["layers.1.values"]["dtype"] = "I32"
        elif change == "longer keys":
            keys["shape"] = [batch, heads, rows + 1, dim]
        elif change == "negative dim":
            keys["shape"] = [batch, heads, -rows, dim]
        else:
            header["valid2"] = header.pop("valid")

    bad = with_header(path, tmp_path / "bad.safetensors", edit)
    with pytest.raises(ValueError, match=r"bad\.safetensors .*" + message):
        BeaconCache.load(bad)


def test_load_takes_only_floating_dtypes_and_a_float16_cache_serves_an_fp32_model(saved):
    model, question, path = saved
    with pytest.raises(ValueError, match="floating-point"):
        BeaconCache.load(path, dtype=torch.int8)
    half = BeaconCache.load(path, dtype=torch.float16)
    assert half.layers[0].keys.dtype == torch.float16
    assert answer(model, question, half) == answer(model, question, BeaconCache.load(path))
    assert half.layers[0].keys.dtype == torch.float32  # cast once, at its first use


def test_a_cache_of_other_weights_with_the_same_config_is_refused(saved):
    _, question, path = saved
    assert tiny_model(seed=0).model.identity == tiny_model(seed=0).model.identity  # deterministic
    other = tiny_model(seed=1)
    assert other.config.to_dict() == tiny_model(seed=0).config.to_dict()
    with pytest.raises(ValueError, match="another config or other weights"):
        other.generate(question, cache=BeaconCache.load(path), max_new_tokens=2)


def test_a_failed_save_leaves_the_previous_file_whole_and_no_temporary_file(saved, tmp_path, monkeypatch):
    model, question, path = saved
    target = tmp_path / "memory.safetensors"
    target.write_bytes(path.read_bytes())
    good = target.read_bytes()
    cache = BeaconCache.load(path)
    answer(model, question, cache)

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:  # what safetensors 0.4.5 did to the final name: half a file, then the error
            f.write(good[: len(good) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_file, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        cache.save(target)
    assert target.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["memory.safetensors"]
    monkeypatch.undo()
    cache.save(target)
    assert answer(model, question, BeaconCache.load(target)) == answer(model, question, BeaconCache.load(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory.safetensors"]
