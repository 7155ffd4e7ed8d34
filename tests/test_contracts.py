"""Every standard argument of forward and generate is honoured or refused with one clear error; placement with
accelerate (CPU and disk offload) gives the unplaced model's answers; bad input is refused before anything runs."""

import json

import pytest
import torch
from accelerate import infer_auto_device_map
from transformers import Qwen2ForCausalLM
from transformers.testing_utils import CaptureLogger

from scripts.local_import import BeaconCache, VideoXLForCausalLM, modeling
from tests.conftest import IMAGE_ID, TOKENS_PER_FRAME, VIDEO_ID, random_frames, tiny_model, video_prompt


TEXT = torch.tensor([[4, 20, 21, 22, 23, 24, 25, 26]])


def image_prompt(tiles: int) -> torch.Tensor:
    return torch.tensor([[4, 10] + [IMAGE_ID] * (tiles * TOKENS_PER_FRAME) + [13, 14, 15]])


def greedy(model, ids, **kwargs) -> list[list[int]]:
    return model.generate(ids, max_new_tokens=5, do_sample=False, **kwargs).tolist()


# ---- return_dict -------------------------------------------------------------------------------------------------


def test_return_dict_false_gives_the_dict_fields_as_a_tuple():
    model = tiny_model()
    ids, pixels = video_prompt(3), random_frames(3)
    labels = ids.clone()
    labels[:, :-3] = -100
    with torch.no_grad():
        as_dict = model(ids, pixel_values_videos=pixels, labels=labels)
        as_tuple = model(ids, pixel_values_videos=pixels, labels=labels, return_dict=False)
        backbone = model.model(ids, pixel_values_videos=pixels, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 3
    loss, logits, cache = as_tuple
    torch.testing.assert_close(loss, as_dict.loss, atol=0, rtol=0)
    torch.testing.assert_close(logits, as_dict.logits, atol=0, rtol=0)
    assert isinstance(cache, BeaconCache) and cache.get_seq_length() == as_dict.cache.get_seq_length()
    assert isinstance(backbone, tuple) and isinstance(backbone[1], BeaconCache)

    model.config.return_dict = False  # the config's default is honoured too
    with torch.no_grad():
        assert isinstance(model(ids, pixel_values_videos=pixels), tuple)


# ---- hidden states -----------------------------------------------------------------------------------------------


def test_text_hidden_states_equal_qwen2_hidden_states():
    model = tiny_model()
    qwen = Qwen2ForCausalLM(model.config.text_config).eval()
    qwen.load_state_dict(model.state_dict(), strict=False)
    qwen.config._attn_implementation = "eager"
    with torch.no_grad():
        ours = model(TEXT, output_hidden_states=True)
        theirs = qwen(TEXT, output_hidden_states=True)
    assert len(ours.hidden_states) == model.config.text_config.num_hidden_layers + 1
    for mine, reference in zip(ours.hidden_states, theirs.hidden_states, strict=True):
        torch.testing.assert_close(mine, reference, atol=1e-5, rtol=1e-5)
    # the last entry is the final norm's output, which lm_head turns into the logits
    torch.testing.assert_close(model.lm_head(ours.hidden_states[-1]), ours.logits, atol=1e-6, rtol=1e-6)
    model.config.output_hidden_states = True  # the config's default is honoured too
    with torch.no_grad():
        assert len(model(TEXT).hidden_states) == 3


def test_visual_hidden_states_cover_the_text_rows_and_the_kept_vsts():
    model = tiny_model()
    ratio, frames = 4, 6
    ids, pixels = video_prompt(frames), random_frames(frames)
    prefix, visual, suffix = 4, frames * TOKENS_PER_FRAME, 5
    with torch.no_grad():
        out = model(ids, pixel_values_videos=pixels, compression_ratio=ratio, output_hidden_states=True)
    kept = prefix + visual // ratio + suffix
    assert out.cache.get_seq_length() == kept
    assert [tuple(h.shape) for h in out.hidden_states] == [(1, kept, 32)] * 3
    embeddings = out.hidden_states[0]
    # rows: the prefix, then one VST per `ratio` visual tokens, then the question
    torch.testing.assert_close(embeddings[:, :prefix], model.model.embed_tokens(ids[:, :prefix]))
    vst = model.model.beacon_embed_tokens.weight[0]
    torch.testing.assert_close(embeddings[0, prefix : kept - suffix], vst.expand(visual // ratio, -1))
    torch.testing.assert_close(embeddings[:, -suffix:], model.model.embed_tokens(ids[:, -suffix:]))
    # text rows of the last entry are the normed states lm_head reads
    text_columns = torch.cat([torch.arange(prefix), torch.arange(ids.shape[1] - suffix, ids.shape[1])])
    text_rows = torch.cat([torch.arange(prefix), torch.arange(kept - suffix, kept)])
    torch.testing.assert_close(
        model.lm_head(out.hidden_states[-1][:, text_rows]), out.logits[:, text_columns], atol=1e-6, rtol=1e-6
    )


def test_generate_returns_hidden_states_per_step():
    model = tiny_model()
    ids, pixels = video_prompt(4), random_frames(4)
    out = model.generate(
        ids, pixel_values_videos=pixels, max_new_tokens=3, do_sample=False,
        output_hidden_states=True, output_logits=True, return_dict_in_generate=True,
    )
    kept = 4 + 4 * TOKENS_PER_FRAME // 4 + 5
    assert [h[0].shape[1] for h in out.hidden_states] == [kept, 1, 1]
    for step_states, step_logits in zip(out.hidden_states, out.logits, strict=True):
        assert len(step_states) == 3
        torch.testing.assert_close(model.lm_head(step_states[-1][:, -1]), step_logits, atol=1e-6, rtol=1e-6)


# ---- refused arguments -------------------------------------------------------------------------------------------


def test_output_attentions_is_one_clear_error():
    model = tiny_model()
    with torch.no_grad():
        model(TEXT, output_attentions=False)
        with pytest.raises(ValueError, match="output_attentions is not supported"):
            model(TEXT, output_attentions=True)
        with pytest.raises(ValueError, match="output_attentions is not supported"):
            model.generate(TEXT, max_new_tokens=2, output_attentions=True, return_dict_in_generate=True)
        model.config.output_attentions = True
        with pytest.raises(ValueError, match="output_attentions is not supported"):
            model(TEXT)


@pytest.mark.parametrize("name", ["position_ids", "cache_position", "token_type_ids", "compresion_ratio"])
def test_unknown_model_kwargs_are_refused(name):
    model = tiny_model()
    with pytest.raises(TypeError, match=name):
        model(TEXT, **{name: torch.zeros_like(TEXT)})
    with pytest.raises(TypeError, match=name):
        model.model(TEXT, **{name: torch.zeros_like(TEXT)})


def test_generate_names_a_misspelt_model_kwarg():
    with pytest.raises(ValueError, match=r"not used by the model: \['compresion_ratio'\]"):
        tiny_model().generate(TEXT, max_new_tokens=2, compresion_ratio=2)


def test_num_items_in_batch_normalises_the_loss():
    model = tiny_model()
    labels = TEXT.clone()
    with torch.no_grad():
        mean = model(TEXT, labels=labels).loss
        summed = model(TEXT, labels=labels, num_items_in_batch=torch.tensor(1)).loss
    torch.testing.assert_close(summed, mean * (TEXT.shape[1] - 1))


# ---- inputs_embeds, use_cache, logits_to_keep ----------------------------------------------------------------------


def test_inputs_embeds_equal_input_ids_for_text():
    model = tiny_model()
    with torch.no_grad():
        from_ids = model(TEXT)
        from_embeds = model(inputs_embeds=model.get_input_embeddings()(TEXT))
        # and the memory they leave answers the next token the same way
        next_ids = model(torch.tensor([[30]]), cache=from_ids.cache).logits
        next_embeds = model(torch.tensor([[30]]), cache=from_embeds.cache).logits
    torch.testing.assert_close(from_embeds.logits, from_ids.logits, atol=0, rtol=0)
    torch.testing.assert_close(next_embeds, next_ids, atol=0, rtol=0)


def test_inputs_embeds_with_a_visual_prompt_is_one_clear_error():
    model = tiny_model()
    embeds = torch.randn(1, 4 + 2 * TOKENS_PER_FRAME + 5, 32)
    with pytest.raises(ValueError, match="a visual prompt needs input_ids"):
        model(inputs_embeds=embeds, pixel_values_videos=random_frames(2))
    with pytest.raises(ValueError, match="either input_ids or inputs_embeds"):
        model(TEXT, inputs_embeds=model.get_input_embeddings()(TEXT))
    with pytest.raises(ValueError, match="inputs_embeds"):
        model.generate(inputs_embeds=model.get_input_embeddings()(TEXT), max_new_tokens=2)


def test_use_cache_false_returns_no_cache_and_generates_the_same():
    model = tiny_model()
    ids, pixels = video_prompt(4), random_frames(4)
    with torch.no_grad():
        assert model(ids, pixel_values_videos=pixels, use_cache=False).cache is None
        assert model(ids, pixel_values_videos=pixels).cache is not None
    assert greedy(model, ids, pixel_values_videos=pixels, use_cache=False) == greedy(model, ids, pixel_values_videos=pixels)


def test_logits_to_keep_selects_the_last_columns_or_the_given_ones():
    model = tiny_model()
    ids, pixels = video_prompt(2), random_frames(2)
    with torch.no_grad():
        full = model(ids, pixel_values_videos=pixels).logits
        last = model(ids, pixel_values_videos=pixels, logits_to_keep=3).logits
        chosen = model(ids, pixel_values_videos=pixels, logits_to_keep=torch.tensor([0, 2, ids.shape[1] - 1])).logits
    torch.testing.assert_close(last, full[:, -3:], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(chosen, full[:, [0, 2, ids.shape[1] - 1]], atol=1e-6, rtol=1e-6)


# ---- compression ratio from the generation config ---------------------------------------------------------------


def test_generation_config_compression_ratio_is_honoured_and_an_explicit_ratio_wins(tmp_path):
    model = tiny_model()
    ids, pixels = video_prompt(8), random_frames(8)
    default = greedy(model, ids, pixel_values_videos=pixels)
    ratio_2 = greedy(model, ids, pixel_values_videos=pixels, compression_ratio=2)
    assert ratio_2 != default  # the test can tell the ratios apart

    model.generation_config.compression_ratio = 2
    assert greedy(model, ids, pixel_values_videos=pixels) == ratio_2
    assert greedy(model, ids, pixel_values_videos=pixels, compression_ratio=4) == default

    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "generation_config.json").read_text())["compression_ratio"] == 2
    loaded = VideoXLForCausalLM.from_pretrained(tmp_path).eval()
    assert greedy(loaded, ids, pixel_values_videos=pixels) == ratio_2
    assert greedy(loaded, ids, pixel_values_videos=pixels, compression_ratio=4) == default

    model.generation_config.compression_ratio = 3
    with pytest.raises(ValueError, match="allowed values"):
        greedy(model, ids, pixel_values_videos=pixels)


# ---- placement ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    model = tiny_model()
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    return model, path


# Budgets for the tiny model (235 KB in fp32): decoder layers split between CPU and disk; the vision tower split
# inside; everything on disk.
@pytest.mark.parametrize(
    "placement",
    [
        {"device_map": "auto", "max_memory": {"cpu": 150_000}},
        {"device_map": "auto", "max_memory": {"cpu": 200_000}},
        {"device_map": {"": "disk"}},
    ],
    ids=["layers-cpu-and-disk", "vision-split", "all-on-disk"],
)
def test_offloaded_model_generates_like_the_unplaced_one(saved_tiny, placement, tmp_path):
    model, path = saved_tiny
    if placement["device_map"] == {"": "disk"} and not library_dispatches_disk_only(tmp_path):
        # Releases before 5.13 leave a disk-only map undispatched, for any model: refused, naming the way out.
        with pytest.raises(ValueError, match=r"does not dispatch device_map=\{'': 'disk'\} .*from transformers 5\.13"):
            VideoXLForCausalLM.from_pretrained(path, offload_folder=str(tmp_path), **placement)
        placement = {"device_map": {"model": "disk", "lm_head": "cpu"}}
    placed = VideoXLForCausalLM.from_pretrained(path, offload_folder=str(tmp_path), **placement).eval()
    assert "disk" in set(placed.hf_device_map.values())
    video_ids, video = video_prompt(6), random_frames(6)
    image_ids, tiles = image_prompt(3), random_frames(3, seed=1)[0]
    assert greedy(placed, video_ids, pixel_values_videos=video) == greedy(model, video_ids, pixel_values_videos=video)
    assert greedy(placed, image_ids, pixel_values=tiles) == greedy(model, image_ids, pixel_values=tiles)
    assert greedy(placed, TEXT) == greedy(model, TEXT)


def library_dispatches_disk_only(tmp_path) -> bool:
    """Whether this transformers dispatches `device_map={"": "disk"}`, asked of the library's own Qwen2."""
    qwen = Qwen2ForCausalLM(tiny_model().config.text_config)
    qwen.save_pretrained(tmp_path / "qwen")
    loaded = Qwen2ForCausalLM.from_pretrained(tmp_path / "qwen", device_map={"": "disk"},
                                              offload_folder=str(tmp_path / "qwen-offload"))
    return hasattr(loaded, "hf_device_map")


def test_device_maps_keep_every_decoder_layer_whole():
    model = tiny_model()
    splits = set()
    for budget in range(20_000, 240_000, 10_000):
        device_map = infer_auto_device_map(
            model, max_memory={"cpu": budget, "disk": 10**9}, no_split_module_classes=model._no_split_modules
        )
        for name in device_map:
            parts = name.split(".")
            if parts[:2] == ["model", "layers"]:
                assert len(parts) <= 3, f"decoder layer split at {name} with {budget} bytes"
            assert "embeddings." not in name and ".layers.0." not in name, f"split inside {name}"
        splits.add(tuple(sorted(set(device_map.values()))))
    assert ("cpu", "disk") in splits  # some budgets do split the model


def test_bf16_model_takes_fp32_pixels():
    model = tiny_model().to(torch.bfloat16)
    ids, pixels = video_prompt(4), random_frames(4)
    with torch.no_grad():
        from_fp32 = model(ids, pixel_values_videos=pixels).logits
        from_bf16 = model(ids, pixel_values_videos=pixels.to(torch.bfloat16)).logits
    assert from_fp32.dtype == torch.bfloat16
    torch.testing.assert_close(from_fp32, from_bf16, atol=0, rtol=0)
    assert greedy(model, ids, pixel_values_videos=pixels) == greedy(model, ids, pixel_values_videos=pixels.bfloat16())


# ---- bad input ---------------------------------------------------------------------------------------------------


def test_a_video_and_an_image_in_the_same_columns_equal_each_alone():
    """Once an `IndexError`, then refused: mixed kinds in the same columns now run, each sample as alone."""
    model = tiny_model()
    ids = torch.cat([video_prompt(2), video_prompt(2)])
    ids[1][ids[1] == VIDEO_ID] = IMAGE_ID
    video, image = random_frames(2), random_frames(2, seed=1)[0]
    with torch.no_grad():
        batched = model(ids, pixel_values_videos=video, pixel_values=image).logits
        torch.testing.assert_close(batched[:1], model(ids[:1], pixel_values_videos=video).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batched[1:], model(ids[1:], pixel_values=image).logits, atol=1e-5, rtol=1e-5)


def test_swapped_video_and_image_order_equals_each_alone():
    """`<video><image>` beside `<image><video>`: same visual columns, different kinds (once ran silently wrong)."""
    model = tiny_model()
    video, image = [VIDEO_ID] * (2 * TOKENS_PER_FRAME), [IMAGE_ID] * (2 * TOKENS_PER_FRAME)
    ids = torch.tensor([[4] + video + image + [13, 14], [4] + image + video + [13, 14]])
    videos, images = random_frames(4)[0], random_frames(4, seed=1)[0]
    generated = model.generate(ids, pixel_values_videos=videos, pixel_values=images, max_new_tokens=3, do_sample=False)
    for i in range(2):
        single = model.generate(
            ids[i : i + 1], pixel_values_videos=videos[2 * i : 2 * i + 2], pixel_values=images[2 * i : 2 * i + 2],
            max_new_tokens=3, do_sample=False,
        )
        assert generated[i].tolist() == single[0].tolist()


@pytest.mark.parametrize(
    "pixels, message",
    [
        ((random_frames(2) * 60 + 128).clamp(0, 255).to(torch.uint8), "floating-point pixels.*torch.uint8"),
        ((random_frames(2) * 60 + 128).clamp(0, 255), r"pixel_values_videos ranges over \[0, 255\].*Were they normalised"),
        ((random_frames(2) * 0.25 + 0.5).clamp(0, 1), r"pixel_values_videos lies entirely in \[0, 1\].*not CLIP-normalised"),
        (random_frames(2).index_put((torch.tensor(0),), torch.tensor(float("nan"))), "pixel_values_videos holds NaN or infinite"),
        (random_frames(2).index_put((torch.tensor(0),), torch.tensor(float("inf"))), "pixel_values_videos holds NaN or infinite"),
    ],
    ids=["uint8", "raw-0-255-floats", "unnormalised-0-1-floats", "nan", "inf"],
)
def test_pixels_the_model_cannot_have_been_meant_to_see_are_refused(pixels, message):
    model = tiny_model()
    with pytest.raises(ValueError, match=message):
        model(video_prompt(2), pixel_values_videos=pixels)
    with pytest.raises(ValueError, match="pixel_values "):
        model(image_prompt(2), pixel_values=pixels[0])


def test_empty_input_ids_are_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"input_ids is empty \(shape \(1, 0\)\)"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="Pass input_ids"):
        model()


@pytest.mark.parametrize("bad_id", [-1, 300, 10**6])
def test_ids_outside_the_vocabulary_are_refused(bad_id):
    model = tiny_model()
    ids = TEXT.clone()
    ids[0, 3] = bad_id
    with pytest.raises(ValueError, match=rf"outside the vocabulary \[0, 300\).*e.g. {bad_id} at sample 0, column 3"):
        model(ids)
    with pytest.raises(ValueError, match="integer token ids"):
        model(TEXT.float())


def test_memory_beyond_max_position_embeddings_warns_once_naming_both_numbers():
    model = tiny_model(text_config={**tiny_model().config.text_config.to_dict(), "max_position_embeddings": 40})
    ids, pixels = video_prompt(8), random_frames(8)  # 4 + 128 / 4 + 5 = 41 kept positions
    with CaptureLogger(modeling.logger) as first:
        model(ids[:, :-1], pixel_values_videos=pixels)  # 40 kept: at the limit, no warning
    assert first.out == ""
    with CaptureLogger(modeling.logger) as second:
        model(ids, pixel_values_videos=pixels)
    assert "41 kept positions" in second.out and "max_position_embeddings=40" in second.out
    with CaptureLogger(modeling.logger) as third:
        model(ids, pixel_values_videos=pixels)
    assert third.out == ""
