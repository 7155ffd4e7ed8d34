"""The supported transformers range and what moved inside it (compat_videoxl.py): one clear error outside the range,
and the cache reachable under both of its names on every supported release."""

import copy
import importlib.util

import pytest
import torch
import transformers

from scripts.local_import import REPO_ROOT, BeaconCache, compat
from tests.conftest import random_frames, tiny_model, video_prompt


@pytest.mark.parametrize("version", ["4.57.6", "5.9.0", "5.10.0rc0", "6.0.0"])
def test_an_unsupported_transformers_is_refused_with_the_supported_range(monkeypatch, version):
    monkeypatch.setattr(transformers, "__version__", version)
    with pytest.raises(ImportError, match=r"supports transformers>=5\.10\.0,<6 .*" + version.replace(".", r"\.")):
        compat.check_transformers_version()


@pytest.mark.parametrize("version", ["5.10.0", "5.17.2", "5.23.0", "5.24.0", "5.99.1"])
def test_a_supported_transformers_passes(monkeypatch, version):
    monkeypatch.setattr(transformers, "__version__", version)
    compat.check_transformers_version()


def test_importing_the_code_under_an_unsupported_transformers_fails_at_the_guard(monkeypatch):
    monkeypatch.setattr(transformers, "__version__", "4.57.6")
    spec = importlib.util.spec_from_file_location("compat_videoxl_fresh", REPO_ROOT / "compat_videoxl.py")
    with pytest.raises(ImportError, match=r"transformers>=5\.10\.0,<6"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def prefilled(model, ids, pixels):
    cache = BeaconCache(model.config.text_config.num_hidden_layers)
    with torch.no_grad():
        model(ids, pixel_values_videos=pixels, compression_ratio=4, cache=cache)
    return cache


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_forward_continues_a_cache_given_under_either_name(name):
    model = tiny_model()
    ids, pixels = video_prompt(6), random_frames(6)
    question = torch.tensor([[20, 21, 22]])
    with torch.no_grad():
        whole = model(torch.cat([ids, question], dim=1), pixel_values_videos=pixels, compression_ratio=4)
        cache = prefilled(model, ids, pixels)
        out = model(question, **{name: cache})
    torch.testing.assert_close(out.logits, whole.logits[:, -3:], atol=1e-5, rtol=1e-5)
    assert out.cache is cache is compat.cache_of(out)
    assert cache.seen_tokens == ids.shape[1] + 3


def test_forward_refuses_a_cache_given_twice():
    model = tiny_model()
    ids = torch.tensor([[4, 10, 11]])
    cache = BeaconCache(model.config.text_config.num_hidden_layers)
    with pytest.raises(ValueError, match="once"):
        model(ids, cache=cache, past_key_values=cache)


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_generate_continues_a_cache_given_under_either_name(name):
    model = tiny_model()
    ids, pixels = video_prompt(6), random_frames(6)
    expected = model.generate(ids, pixel_values_videos=pixels, compression_ratio=4, max_new_tokens=5, do_sample=False)
    cache = prefilled(model, ids[:, :-2], pixels)  # the last two prompt tokens are left for generate
    kwargs = {name: copy.deepcopy(cache)}
    got = model.generate(ids, compression_ratio=4, max_new_tokens=5, do_sample=False, **kwargs)
    assert torch.equal(got, expected)
    assert kwargs[name].seen_tokens == expected.shape[1] - 1  # the user's cache object was the one extended


def test_generate_returns_the_cache_under_this_transformers_name():
    model = tiny_model()
    out = model.generate(
        video_prompt(6), pixel_values_videos=random_frames(6), compression_ratio=4, max_new_tokens=3,
        do_sample=False, return_dict_in_generate=True,
    )
    assert isinstance(compat.cache_of(out), BeaconCache)
    assert compat.cache_of(out).seen_tokens == out.sequences.shape[1] - 1


def test_clip_parameter_names_have_the_vision_model_level():
    model = tiny_model()
    names = [n for n, _ in model.named_parameters() if ".vision_tower." in n]
    assert names and all(n.startswith("model.vision_tower.vision_tower.vision_model.") for n in names)
    assert "model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight" in names

