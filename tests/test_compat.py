"""The supported transformers range and what moved inside it (compat_videoxl.py): one clear error outside the range,
and the cache reachable under both of its names on every supported release."""

import copy
import importlib.util
import subprocess
import sys
import warnings

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


@pytest.mark.parametrize("version", ["5.10.0", "5.17.2", "5.23.0", "5.24.0", "5.25.0", "5.99.1"])
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
    assert cache.record.absorbed_length == ids.shape[1] + 3


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
    assert kwargs[name].record.absorbed_length == expected.shape[1] - 1  # the user's cache object was the one extended


def test_generate_returns_the_cache_under_this_transformers_name():
    model = tiny_model()
    out = model.generate(
        video_prompt(6), pixel_values_videos=random_frames(6), compression_ratio=4, max_new_tokens=3,
        do_sample=False, return_dict_in_generate=True,
    )
    assert isinstance(compat.cache_of(out), BeaconCache)
    assert compat.cache_of(out).record.absorbed_length == out.sequences.shape[1] - 1


def test_clip_parameter_names_have_the_vision_model_level():
    model = tiny_model()
    names = [n for n, _ in model.named_parameters() if ".vision_tower." in n]
    assert names and all(n.startswith("model.vision_tower.vision_tower.vision_model.") for n in names)
    assert "model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight" in names



# ---- activation checkpointing names --------------------------------------------------------------------------------


def test_activation_checkpointing_names_work_on_every_release(tmp_path):
    model = tiny_model()
    model.activation_checkpointing_enable()
    assert model.is_gradient_checkpointing
    model.activation_checkpointing_disable()
    assert not model.is_gradient_checkpointing
    assert hasattr(model, f"{compat.ACTIVATION_CHECKPOINTING}_enable")  # the library's own name


def test_wrapping_the_model_with_peft_warns_nothing():
    # PEFT reads `is_gradient_checkpointing`, which the library deprecated in 5.23 (a FutureWarning per wrap).
    from peft import LoraConfig, get_peft_model

    model = tiny_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        get_peft_model(model, LoraConfig(target_modules=r"model\.layers\.\d+\.self_attn\.q_proj"))
    model.activation_checkpointing_enable()
    assert model.is_gradient_checkpointing


@pytest.mark.parametrize("flag", ["--activation_checkpointing", "--gradient_checkpointing"])
def test_the_training_flag_is_read_under_either_name(tmp_path, flag):
    from scripts.finetune import parse_args

    _, args = parse_args(["--model", "m", "--data", "d.jsonl", "--output_dir", str(tmp_path), flag,
                          f"{flag}_kwargs", '{"use_reentrant": false}'])
    # The name this release's Trainer reads is set, whichever was given.
    assert getattr(args, compat.ACTIVATION_CHECKPOINTING) is True
    assert getattr(args, f"{compat.ACTIVATION_CHECKPOINTING}_kwargs") == {"use_reentrant": False}
    assert args.activation_checkpointing is True


# ---- cache rollback ------------------------------------------------------------------------------------------------


def test_crop_counts_follow_this_transformers_convention():
    assert compat.crop_count(-3, seen_tokens=10) == -3 and compat.crop_count(0, seen_tokens=10) == 0
    # A positive argument is the length to keep where the library passes that (before 5.15); else refused later.
    assert compat.crop_count(7, seen_tokens=10) == (-3 if compat.CROP_TAKES_LENGTH else 7)
    assert compat.crop_count(12, seen_tokens=10) == (0 if compat.CROP_TAKES_LENGTH else 12)


# ---- placement -----------------------------------------------------------------------------------------------------


def test_an_undispatched_disk_map_is_refused_naming_the_way_out():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"does not dispatch .*5\.13.*\"lm_head\": \"cpu\""):
        compat.check_dispatched(model, {"": "disk"})
    compat.check_dispatched(model, {"": "cpu"})  # nothing on disk: nothing to dispatch
    model.hf_device_map = {"": "disk"}
    compat.check_dispatched(model, {"": "disk"})


# ---- processor -----------------------------------------------------------------------------------------------------


def test_offsets_move_back_to_the_caller_text_around_expanded_placeholders():
    # caller text "ab<v>cd<v>e" -> expanded "ab" + 6 chars + "cd" + 4 chars + "e"
    replacements = [{"span": (2, 5), "new_span": (2, 8)}, {"span": (7, 10), "new_span": (10, 14)}]
    expanded = [(0, 2), (2, 5), (5, 8), (8, 10), (10, 12), (12, 14), (14, 15), (15, 15)]
    assert compat.offsets_in_caller_text(expanded, replacements) == [
        (0, 2), (2, 5), (2, 5), (5, 7), (7, 10), (7, 10), (10, 11), (11, 11)
    ]


def test_processor_options_stay_with_extra_chat_template_keywords():
    assert compat.chat_template_keywords({"num_frames": 4}, {"tokenize": True}) == {
        "processor_kwargs": {"num_frames": 4}, "tokenize": True}
    # An extra keyword (a pipeline's do_sample): the options go with it, which every release keeps.
    assert compat.chat_template_keywords({"num_frames": 4}, {"tokenize": True, "do_sample": False}) == {
        "num_frames": 4, "tokenize": True, "do_sample": False}


def test_caller_offsets_from_the_processor(tmp_path):
    import numpy as np

    from scripts.local_import import processing

    processor = processing().VideoXLProcessor.from_pretrained(REPO_ROOT, trust_remote_code=True)
    text = "Q <video> A"
    out = processor(text=text, videos=np.zeros((2, 8, 8, 3), np.uint8), return_offsets_mapping=True,
                    return_tensors="pt")
    offsets = out["offset_mapping"][0].tolist()
    video = out["input_ids"][0] == processor.video_token_id
    assert int(video.sum()) == 2 * 144 and "text_replacement_offsets" not in out
    assert {tuple(o) for o, v in zip(offsets, video.tolist()) if v} == {(2, 9)}  # each one the caller's <video>
    assert text[slice(*offsets[-1])] == " A"


@pytest.mark.slow
def test_loading_the_model_and_processor_imports_neither_peft_nor_bitsandbytes():
    # bitsandbytes, imported through PEFT by the trainer's helpers, fetches kernels from the Hub at import; the
    # training arguments' mixin (compat) is built only when a training script asks for it
    code = (
        "import sys\n"
        "from transformers import AutoModelForCausalLM, AutoProcessor\n"
        f"AutoModelForCausalLM.from_pretrained({str(REPO_ROOT / 'demo' / 'model')!r}, trust_remote_code=True)\n"
        f"AutoProcessor.from_pretrained({str(REPO_ROOT / 'demo' / 'model')!r}, trust_remote_code=True)\n"
        "print(sorted({'peft', 'bitsandbytes'} & set(sys.modules)))\n"
        "from scripts.local_import import compat\n"
        "print([f for f in compat.ActivationCheckpointingArguments.__dataclass_fields__])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    imported, fields = result.stdout.strip().splitlines()[-2:]
    assert imported == "[]"
    assert fields == ("[]" if compat.ACTIVATION_CHECKPOINTING == "activation_checkpointing"
                      else "['activation_checkpointing', 'activation_checkpointing_kwargs']")
