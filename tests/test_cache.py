"""The cache keeps its own state straight: every Cache operation, atomic steps, misuse refused, assisted decoding,
save -> load (also in a fresh process)."""

import subprocess
import sys

import pytest
import torch

from scripts.local_import import REPO_ROOT, BeaconCache, compat
from tests.conftest import TOKENS_PER_FRAME, VIDEO_ID, random_frames, tiny_model, video_prompt


FRAMES = 6  # windows of 4 + 2 frames: 16 + 8 VSTs at ratio 4


def consistent(cache: BeaconCache) -> None:
    """Every layer has the same rows as its valid mask; raw text rows after the last window = absorbed columns."""
    rows = cache.get_seq_length()
    assert cache.key_mask.shape == (cache.record.absorbed_ids.shape[0], rows)
    for layer in cache.layers:
        assert layer.keys.shape[2] == layer.values.shape[2] == rows
        assert layer.keys.shape[0] == cache.record.absorbed_ids.shape[0]
    assert 0 <= cache.compressed_rows <= rows
    for digests in cache.record.digests.values():
        assert digests.shape[0] == cache.record.absorbed_ids.shape[0]


def prefilled(batch: int = 1, suffix=(13, 14, 15, 16, 17)):
    model = tiny_model()
    ids = video_prompt(FRAMES, suffix=suffix).repeat(batch, 1)
    pixels = torch.cat([random_frames(FRAMES, seed=s) for s in range(batch)])
    cache = BeaconCache(2)
    with torch.no_grad():
        model(ids, pixel_values_videos=pixels, cache=cache)
    return model, ids, pixels, cache


def next_logits(model, cache, ids):
    with torch.no_grad():
        return model(ids, cache=cache).logits


# ---- one test per Cache operation -----------------------------------------------------------------------------------


def test_a_prefilled_cache_records_rows_mask_ids_and_windows():
    model, ids, pixels, cache = prefilled()
    consistent(cache)
    assert cache.get_seq_length() == 4 + 16 + 8 + 5
    assert cache.record.absorbed_length == ids.shape[1] and torch.equal(cache.record.absorbed_ids, ids)
    assert cache.record.ratios == [4, 4] and cache.compressed_rows == 4 + 16 + 8
    assert cache.record.digests[VIDEO_ID].shape[1] == FRAMES and int(cache.next_positions()) == cache.get_seq_length()


def test_reset_empties_rows_mask_ids_and_records():
    _, _, _, cache = prefilled()
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.record.absorbed_length == 0 and cache.key_mask is None
    assert cache.next_positions() is None and cache.compressed_rows == 0 and cache.record.ratios == []
    assert cache.record.digests == {} and cache.record.media == []


def test_crop_removes_raw_text_rows_with_their_ids_and_equals_never_having_them():
    model, ids, pixels, cache = prefilled()
    cache.crop(-3)
    consistent(cache)
    assert cache.get_seq_length() == 4 + 16 + 8 + 2 and torch.equal(cache.record.absorbed_ids, ids[:, :-3])
    short = BeaconCache(2)
    with torch.no_grad():
        model(ids[:, :-3], pixel_values_videos=pixels, cache=short)
    new = torch.tensor([[40, 41]])
    torch.testing.assert_close(next_logits(model, cache, new), next_logits(model, short, new), atol=1e-5, rtol=1e-5)


def test_crop_into_compressed_memory_is_refused_and_changes_nothing():
    _, ids, _, cache = prefilled()
    with pytest.raises(ValueError, match="compressed"):
        cache.crop(-6)
    # A positive count: the number of columns to keep where the library passes that (before 5.15), else refused.
    with pytest.raises(ValueError, match="compressed" if compat.CROP_TAKES_LENGTH else "negative"):
        cache.crop(3)
    consistent(cache)
    assert cache.get_seq_length() == 4 + 16 + 8 + 5 and torch.equal(cache.record.absorbed_ids, ids)
    cache.crop(0)
    assert cache.get_seq_length() == 4 + 16 + 8 + 5


def test_reorder_cache_moves_rows_mask_ids_and_digests_together():
    _, ids, pixels, cache = prefilled(batch=2)
    keys = cache.layers[1].keys.clone()
    digests = cache.record.digests[VIDEO_ID].clone()
    cache.reorder_cache(torch.tensor([1, 0]))
    consistent(cache)
    assert torch.equal(cache.layers[1].keys, keys.flip(0))
    assert torch.equal(cache.record.digests[VIDEO_ID], digests.flip(0))
    assert not torch.equal(digests[0], digests[1])


def test_batch_repeat_interleave_repeats_rows_mask_ids_and_digests():
    _, ids, _, cache = prefilled(batch=2)
    cache.batch_repeat_interleave(3)
    consistent(cache)
    assert cache.record.absorbed_ids.shape[0] == 6 and torch.equal(cache.record.absorbed_ids, ids.repeat_interleave(3, dim=0))
    assert cache.record.digests[VIDEO_ID].shape[0] == 6


def test_batch_select_indices_keeps_rows_mask_ids_and_digests_of_the_chosen_samples():
    _, ids, pixels, cache = prefilled(batch=2)
    second = cache.record.digests[VIDEO_ID][1].clone()
    cache.batch_select_indices(torch.tensor([1]))
    consistent(cache)
    assert cache.record.absorbed_ids.shape[0] == 1 and torch.equal(cache.record.digests[VIDEO_ID][0], second)
    cache.check_frames(VIDEO_ID, pixels[1:])  # the second sample's pixels are now the cache's


def test_checkpoint_and_restore_return_to_an_earlier_extent_with_windows():
    model, ids, pixels, cache = prefilled(suffix=())
    state = cache.checkpoint()
    keys = cache.layers[0].keys.clone()
    with torch.no_grad():
        second_video = torch.cat([torch.tensor([[40]]), torch.full((1, 2 * TOKENS_PER_FRAME), VIDEO_ID)], dim=1)
        model(second_video, pixel_values_videos=random_frames(2, seed=9), cache=cache)
        model(torch.tensor([[40, 41]]), cache=cache)
    cache.restore(state)
    consistent(cache)
    assert torch.equal(cache.layers[0].keys, keys) and cache.record.ratios == [4, 4]
    assert cache.record.digests[VIDEO_ID].shape[1] == FRAMES and torch.equal(cache.record.absorbed_ids, ids)


# ---- a step lands in every layer or in none ---------------------------------------------------------------------------


@pytest.mark.parametrize("failing_step", [0, 1, 2, 3])  # prefix text, first window, second window, question
def test_an_interrupt_inside_a_layer_leaves_the_cache_as_before_the_step(failing_step):
    model, ids, pixels = tiny_model(), video_prompt(FRAMES), random_frames(FRAMES)
    calls = {"n": 0}

    def interrupt(module, args):
        calls["n"] += 1
        if calls["n"] == failing_step + 1:
            raise KeyboardInterrupt

    cache = BeaconCache(2)
    handle = model.model.layers[1].register_forward_pre_hook(interrupt)
    with torch.no_grad(), pytest.raises(KeyboardInterrupt):
        model(ids, pixel_values_videos=pixels, cache=cache)
    handle.remove()
    if cache.record.absorbed_length:
        consistent(cache)
    assert cache.get_seq_length() == [0, 4, 4 + 16, 4 + 16 + 8][failing_step]
    # Retrying the same prompt from that cache runs the rest and equals an uninterrupted run.
    retried = model.generate(ids, pixel_values_videos=pixels, cache=cache, max_new_tokens=5, do_sample=False)
    fresh = model.generate(ids, pixel_values_videos=pixels, max_new_tokens=5, do_sample=False)
    assert retried.tolist() == fresh.tolist()


def test_an_interrupt_inside_the_commit_itself_leaves_the_cache_as_before():
    model, ids, pixels, cache = prefilled(suffix=())
    keys, absorbed = cache.layers[1].keys.clone(), cache.record.absorbed_ids.clone()
    layer = cache.layers[1]

    def half_append(keys, values):  # the keys land, then the interrupt comes before the rest of the step
        layer.update(keys, values)
        raise KeyboardInterrupt

    layer.append = half_append
    with torch.no_grad(), pytest.raises(KeyboardInterrupt):
        model(torch.tensor([[13, 14, 15]]), cache=cache)
    del layer.append
    consistent(cache)
    assert torch.equal(cache.layers[1].keys, keys) and torch.equal(cache.record.absorbed_ids, absorbed)
    assert cache.get_seq_length() == 4 + 16 + 8 and cache.compressed_rows == 4 + 16 + 8


# ---- misuse gets one clear error ------------------------------------------------------------------------------------


def test_a_prompt_that_parts_from_the_compressed_memory_is_refused():
    model, ids, pixels, cache = prefilled()
    other = ids.clone()
    other[0, 2] = 50
    with pytest.raises(ValueError, match="at column 2, inside its compressed memory"):
        model.generate(other, pixel_values_videos=pixels, cache=cache, max_new_tokens=2)
    with pytest.raises(ValueError, match="inside its compressed memory"):  # shorter than the video
        model.generate(ids[:, :10], cache=cache, max_new_tokens=2)
    longer_video = video_prompt(FRAMES + 4)  # 6 cached frames ended with a partial window; 10 would cut 4 + 4 + 2
    with pytest.raises(ValueError, match="partial window"):
        model.generate(longer_video, pixel_values_videos=random_frames(FRAMES + 4), cache=cache, max_new_tokens=2)
    consistent(cache)


@pytest.mark.parametrize("prompt", ["same", "shorter", "other_question"])
def test_raw_text_the_prompt_does_not_repeat_is_rewound_and_equals_a_fresh_prompt(prompt):
    model, ids, pixels, cache = prefilled()
    question = {"same": ids, "shorter": ids[:, :-2],
                "other_question": torch.cat([ids[:, :-5], torch.tensor([[40, 41, 42]])], dim=1)}[prompt]
    reused = model.generate(question, cache=cache, max_new_tokens=5, do_sample=False)
    fresh = model.generate(question, pixel_values_videos=pixels, max_new_tokens=5, do_sample=False)
    assert reused.tolist() == fresh.tolist()
    consistent(cache)


def test_empty_input_is_refused_clearly():
    model, ids, pixels, cache = prefilled()
    with pytest.raises(ValueError, match="empty"):
        model.generate(ids[:, :0], cache=cache, max_new_tokens=2)
    video_only = BeaconCache(2)
    with torch.no_grad():
        model(video_prompt(FRAMES, suffix=()), pixel_values_videos=pixels, cache=video_only)
    with pytest.raises(ValueError, match="whole prompt is already in the cache"):
        model.generate(video_prompt(FRAMES, suffix=()), cache=video_only, max_new_tokens=2)


def test_a_cache_of_another_video_with_the_same_layout_is_refused():
    model, ids, pixels, cache = prefilled(suffix=())
    question = torch.cat([ids, torch.tensor([[13, 14, 15]])], dim=1)
    with pytest.raises(ValueError, match="another video"):
        model.generate(question, pixel_values_videos=random_frames(FRAMES, seed=5), cache=cache, max_new_tokens=2)
    # The right pixels (or none beyond the cache) answer as a fresh prompt does.
    reused = model.generate(question, pixel_values_videos=pixels, cache=cache, max_new_tokens=4, do_sample=False)
    fresh = model.generate(question, pixel_values_videos=pixels, max_new_tokens=4, do_sample=False)
    assert reused.tolist() == fresh.tolist()


def test_a_cache_written_by_another_config_is_refused():
    _, ids, _, cache = prefilled(suffix=())
    other = tiny_model(beacon_window=8 * TOKENS_PER_FRAME)
    with pytest.raises(ValueError, match="another config"):
        other(torch.tensor([[13, 14]]), cache=cache)


# ---- assisted decoding ----------------------------------------------------------------------------------------------


def test_prompt_lookup_decoding_equals_greedy():
    model = tiny_model()
    ids = torch.cat([video_prompt(FRAMES), torch.tensor([[20, 21, 22, 20, 21, 22, 20, 21]])], dim=1)
    pixels = random_frames(FRAMES)
    greedy = model.generate(ids, pixel_values_videos=pixels, max_new_tokens=12, do_sample=False)
    assisted = model.generate(ids, pixel_values_videos=pixels, max_new_tokens=12, do_sample=False,
                              prompt_lookup_num_tokens=3)
    # Older releases' prompt lookup can keep one accepted draft token past max_new_tokens, for any model (a Qwen2
    # does the same on 5.13): the tokens greedy decoding made must be the same.
    assert assisted[:, : greedy.shape[1]].tolist() == greedy.tolist()
    assert assisted.shape[1] - greedy.shape[1] in (0, 1)


def test_beam_search_reorders_the_cache_consistently():
    model = tiny_model()
    ids, pixels = video_prompt(FRAMES), random_frames(FRAMES)
    kwargs = dict(pixel_values_videos=pixels, num_beams=3, num_return_sequences=2, max_new_tokens=6, do_sample=False)
    assert model.generate(ids, **kwargs).tolist() == model.generate(ids, use_cache=False, **kwargs).tolist()


def test_assistant_model_decoding_equals_greedy():
    model, assistant = tiny_model(seed=0), tiny_model(seed=1)
    # Four drafted tokens a round whatever the assistant's confidence, so rejected drafts are rolled back.
    assistant.generation_config.num_assistant_tokens = 4
    assistant.generation_config.num_assistant_tokens_schedule = "constant"
    assistant.generation_config.assistant_confidence_threshold = 0.0
    ids, pixels = video_prompt(FRAMES), random_frames(FRAMES)
    greedy = model.generate(ids, pixel_values_videos=pixels, max_new_tokens=10, do_sample=False)
    assisted = model.generate(ids, pixel_values_videos=pixels, max_new_tokens=10, do_sample=False,
                              assistant_model=assistant)
    assert assisted.tolist() == greedy.tolist()


# ---- on disk --------------------------------------------------------------------------------------------------------


def test_save_then_load_equals_the_original(tmp_path):
    model, ids, pixels, cache = prefilled()
    cache.record.media.append({"kind": "video", "source": "test", "frames": FRAMES, "timestamps": [0.0] * FRAMES})
    cache.save(tmp_path / "memory.safetensors")
    loaded = BeaconCache.load(tmp_path / "memory.safetensors")
    consistent(loaded)
    for a, b in zip(cache.layers, loaded.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    assert torch.equal(cache.key_mask, loaded.key_mask)
    assert torch.equal(loaded.record.absorbed_ids, ids) and loaded.record.ratios == cache.record.ratios and loaded.record.media == cache.record.media
    assert loaded.compressed_rows == cache.compressed_rows and loaded.record.model_id == cache.record.model_id
    assert torch.equal(loaded.record.digests[VIDEO_ID], cache.record.digests[VIDEO_ID])
    with pytest.raises(ValueError, match="another config"):
        tiny_model(beacon_window=8 * TOKENS_PER_FRAME)(torch.tensor([[13]]), cache=loaded)
    half = BeaconCache.load(tmp_path / "memory.safetensors", dtype=torch.bfloat16)
    assert half.layers[0].keys.dtype == torch.bfloat16
    kv_bytes = sum(layer.keys.numel() * 4 * 2 for layer in cache.layers)
    assert (tmp_path / "memory.safetensors").stat().st_size < kv_bytes * 1.5 + 4096


def test_truncated_corrupt_or_foreign_files_are_refused(tmp_path):
    _, _, _, cache = prefilled()
    path = tmp_path / "memory.safetensors"
    cache.save(path)
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        BeaconCache.load(tmp_path / "cut.safetensors")
    flipped = bytearray(data)
    flipped[-10] ^= 0xFF
    (tmp_path / "flipped.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="corrupt"):
        BeaconCache.load(tmp_path / "flipped.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a BeaconCache file"):
        BeaconCache.load(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="empty"):
        BeaconCache(2).save(tmp_path / "empty.safetensors")


FRESH_PROCESS = """
import sys, torch
from scripts.local_import import BeaconCache
from tests.conftest import tiny_model
cache = BeaconCache.load(sys.argv[1])
ids = torch.load(sys.argv[2], weights_only=True)
out = tiny_model().generate(ids, cache=cache, max_new_tokens=6, do_sample=False)
print(out[0, ids.shape[1]:].tolist())
"""


@pytest.mark.slow
def test_save_then_load_in_a_fresh_process_gives_the_same_answer(tmp_path):
    model, ids, pixels, cache = prefilled(suffix=())
    cache.save(tmp_path / "memory.safetensors")
    question = torch.cat([ids, torch.tensor([[13, 14, 15, 16]])], dim=1)
    torch.save(question, tmp_path / "ids.pt")
    here = model.generate(question, pixel_values_videos=pixels, max_new_tokens=6, do_sample=False)
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(tmp_path / "memory.safetensors"),
                             str(tmp_path / "ids.pt")], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == str(here[0, question.shape[1]:].tolist())


def test_a_cache_of_another_kind_is_refused():
    from transformers import DynamicCache

    model, ids = tiny_model(), video_prompt(2)
    with pytest.raises(ValueError, match="BeaconCache"):
        model.generate(ids, pixel_values_videos=random_frames(2), cache=DynamicCache(), max_new_tokens=2)
    with pytest.raises(ValueError, match="BeaconCache"):
        model(ids, pixel_values_videos=random_frames(2), cache=DynamicCache())
