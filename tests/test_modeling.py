"""Behaviour of the Video-XL model, proven by equivalences on tiny random configs."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2ForCausalLM
from transformers.testing_utils import CaptureLogger

from scripts.local_import import REPO_ROOT, BeaconCache, VideoXLConfig, VideoXLForCausalLM, modeling
from tests.conftest import EOS_ID, IMAGE_ID, TOKENS_PER_FRAME, VIDEO_ID, random_frames, tiny_model, video_prompt


def logits_of(model, input_ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids, **kwargs).logits


def qwen2_with_same_weights(model: VideoXLForCausalLM) -> Qwen2ForCausalLM:
    qwen = Qwen2ForCausalLM(model.config.text_config).eval()
    missing, unexpected = qwen.load_state_dict(model.state_dict(), strict=False)
    assert not missing
    assert all("beacon_" in key or "vision_tower" in key or "mm_projector" in key for key in unexpected)
    qwen.config._attn_implementation = "eager"
    return qwen


# ---- text and the first window against a plain Qwen2 -------------------------------------------------------------


def test_text_only_prompt_is_a_plain_qwen2_forward():
    model = tiny_model()
    qwen = qwen2_with_same_weights(model)
    ids = torch.tensor([[4, 20, 21, 22, 23, 24, 25, 26]])
    torch.testing.assert_close(logits_of(model, ids), logits_of(qwen, ids), atol=1e-5, rtol=1e-5)
    ours = model.generate(ids, max_new_tokens=6, do_sample=False)
    theirs = qwen.generate(ids, max_new_tokens=6, do_sample=False)
    assert ours.tolist() == theirs.tolist()


def test_first_window_is_one_causal_forward_over_prefix_and_interleaved_window():
    """Invariants: positions are arange over [prefix ; window], attention is causal over both, a VST follows every
    r visual tokens and takes the beacon embedding. With VST projections equal to q/k/v (as initialised from a
    checkpoint without them), the window is then a plain Qwen2 forward over those inputs."""
    model = tiny_model()
    model.init_vst_parameters()
    qwen = qwen2_with_same_weights(model)
    ratio, frames = 4, 3  # 48 visual tokens: less than one window of 64
    ids, pixels = video_prompt(frames, suffix=()), random_frames(frames)
    prefix_len = 4
    columns = torch.arange(ids.shape[1])
    ours = logits_of(model, ids, pixel_values_videos=pixels, compression_ratio=ratio, logits_to_keep=columns)

    with torch.no_grad():
        features = model.model.encode_frames(pixels[0]).reshape(1, -1, 32)
        groups = features.reshape(1, -1, ratio, 32)
        vst = model.model.beacon_embed_tokens.weight.expand(1, groups.shape[1], 1, 32)
        window = torch.cat([groups, vst], dim=2).reshape(1, -1, 32)
        embeds = torch.cat([model.model.embed_tokens(ids[:, :prefix_len]), window], dim=1)
        reference = qwen(inputs_embeds=embeds).logits
    raw_rows = [r for r in range(embeds.shape[1]) if r < prefix_len or (r - prefix_len) % (ratio + 1) != ratio]
    torch.testing.assert_close(ours, reference[:, raw_rows], atol=1e-5, rtol=1e-5)


# ---- caching ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("frames", [3, 10])
def test_cached_decode_equals_recompute(frames):
    model = tiny_model()
    ids, pixels = video_prompt(frames), random_frames(frames)
    kwargs = dict(pixel_values_videos=pixels, max_new_tokens=6, do_sample=False, output_scores=True,
                  return_dict_in_generate=True)
    cached = model.generate(ids, **kwargs)
    recomputed = model.generate(ids, use_cache=False, **kwargs)
    assert cached.sequences.tolist() == recomputed.sequences.tolist()
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(recomputed.scores), atol=1e-5, rtol=1e-5)


def test_prefill_then_question_equals_one_forward_and_keeps_the_spec_size():
    model = tiny_model()
    frames, ratio = 10, 4  # windows of 64, 64, 32 tokens
    ids, pixels = video_prompt(frames), random_frames(frames)
    visual_end = 4 + frames * TOKENS_PER_FRAME
    whole = model(ids, pixel_values_videos=pixels, compression_ratio=ratio)

    cache = BeaconCache(2)
    with torch.no_grad():
        model(ids[:, :visual_end], pixel_values_videos=pixels, compression_ratio=ratio, cache=cache)
        assert cache.get_seq_length() == 4 + 16 + 16 + 8
        question = model(ids[:, visual_end:], cache=cache).logits
    torch.testing.assert_close(question, whole.logits[:, visual_end:], atol=1e-5, rtol=1e-5)
    assert whole.cache.get_seq_length() == 4 + 40 + 5 == cache.get_seq_length()
    assert whole.cache.record.absorbed_length == ids.shape[1]


def test_text_in_one_step_or_in_chunks_gives_the_same_numbers():
    model = tiny_model()
    ids = torch.tensor([[4, 20, 21, 22, 23, 24, 25, 26, 27]])
    whole = logits_of(model, ids)
    cache = BeaconCache(2)
    with torch.no_grad():
        parts = [model(chunk, cache=cache).logits for chunk in ids.split([2, 4, 3], dim=1)]
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, atol=1e-5, rtol=1e-5)


def test_no_state_leaks_across_calls():
    model = tiny_model()
    a_ids, a_pix = video_prompt(5), random_frames(5, seed=1)
    b_ids, b_pix = video_prompt(9, suffix=(30, 31)), random_frames(9, seed=2)
    first = model.generate(a_ids, pixel_values_videos=a_pix, max_new_tokens=5, do_sample=False)
    model.generate(b_ids, pixel_values_videos=b_pix, max_new_tokens=5, do_sample=False)
    again = model.generate(a_ids, pixel_values_videos=a_pix, max_new_tokens=5, do_sample=False)
    assert first.tolist() == again.tolist()


# ---- attention implementations and dtypes -----------------------------------------------------------------------


def test_sdpa_equals_eager():
    eager, sdpa = tiny_model(attn_implementation="eager"), tiny_model(attn_implementation="sdpa")
    ids, pixels = video_prompt(6), random_frames(6)
    torch.testing.assert_close(
        logits_of(sdpa, ids, pixel_values_videos=pixels), logits_of(eager, ids, pixel_values_videos=pixels),
        atol=1e-5, rtol=1e-5,
    )
    kwargs = dict(pixel_values_videos=pixels, max_new_tokens=5, do_sample=False)
    assert sdpa.generate(ids, **kwargs).tolist() == eager.generate(ids, **kwargs).tolist()


def test_sdpa_gradients_equal_eager_gradients():
    """Training must not take the CPU log-sum-exp merge: the flash op's log-sum-exp output has no gradient."""
    grads = {}
    for attn in ("eager", "sdpa"):
        model = tiny_model(attn_implementation=attn)
        model.train()
        ids = video_prompt(10)
        labels = torch.full_like(ids, -100)
        labels[0, -3:] = ids[0, -3:]
        model(ids, pixel_values_videos=random_frames(10), labels=labels, compression_ratio=4).loss.backward()
        grads[attn] = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert grads["sdpa"].keys() == grads["eager"].keys()
    for name, grad in grads["eager"].items():
        torch.testing.assert_close(grads["sdpa"][name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("rows, kept", [(1, 7), (5, 0), (6, 11), (16, 40)])
@pytest.mark.parametrize("grad", [False, True])
def test_mask_free_attention_equals_masked_attention(rows, kept, grad):
    """Memory fully visible, causal over the step, grouped KV heads: against an explicit mask, with and without
    autograd (two different kernels on CPU)."""
    generator = torch.Generator().manual_seed(rows + kept)
    query = torch.randn(2, 4, rows, 8, generator=generator)
    keys, values = (torch.randn(2, 2, kept + rows, 8, generator=generator) for _ in range(2))
    allowed = torch.cat([torch.ones(rows, kept, dtype=torch.bool), torch.ones(rows, rows, dtype=torch.bool).tril()], 1)
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, keys.repeat_interleave(2, dim=1), values.repeat_interleave(2, dim=1), attn_mask=allowed, scale=0.3
    ).transpose(1, 2)
    with torch.set_grad_enabled(grad):
        memory = (keys[:, :, :kept], values[:, :, :kept]) if kept else None
        step = (keys[:, :, kept:], values[:, :, kept:])
        got = modeling.memory_causal_attention(query.requires_grad_(grad), memory, step, groups=2, scaling=0.3)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_half_precision_masks_do_not_overflow(dtype, attn):
    model = tiny_model(attn_implementation=attn).to(dtype)
    ids = torch.cat([torch.tensor([[0, 0]]), video_prompt(6)], dim=1)  # left padding exercises the mask
    mask = torch.ones_like(ids)
    mask[:, :2] = 0
    logits = logits_of(model, ids, attention_mask=mask, pixel_values_videos=random_frames(6).to(dtype))
    assert torch.isfinite(logits[:, 2:]).all()


# ---- batches ----------------------------------------------------------------------------------------------------


def test_batch_with_one_layout_equals_single_runs():
    model = tiny_model()
    ids = torch.cat([video_prompt(6), video_prompt(6, suffix=(40, 41, 42, 43, 44))])
    pixels = torch.cat([random_frames(6, seed=1), random_frames(6, seed=2)])
    batched = logits_of(model, ids, pixel_values_videos=pixels)
    for i in range(2):
        single = logits_of(model, ids[i : i + 1], pixel_values_videos=pixels[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], single, atol=1e-5, rtol=1e-5)
    generated = model.generate(ids, pixel_values_videos=pixels, max_new_tokens=4, do_sample=False)
    for i in range(2):
        single = model.generate(ids[i : i + 1], pixel_values_videos=pixels[i : i + 1], max_new_tokens=4, do_sample=False)
        assert generated[i].tolist() == single[0].tolist()


def test_left_padded_text_batch_equals_single_runs():
    model = tiny_model(attn_implementation="sdpa")
    long, short = [4, 20, 21, 22, 23, 24], [4, 30, 31]
    ids = torch.tensor([long, [0] * 3 + short])
    mask = torch.tensor([[1] * 6, [0] * 3 + [1] * 3])
    generated = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert generated[0, 6:].tolist() == model.generate(torch.tensor([long]), max_new_tokens=5, do_sample=False)[0, 6:].tolist()
    assert generated[1, 6:].tolist() == model.generate(torch.tensor([short]), max_new_tokens=5, do_sample=False)[0, 3:].tolist()


def test_batch_with_different_layouts_equals_single_runs():
    """Visual tokens in other columns: each sample runs with its own windows (tests/test_batching.py has more)."""
    model = tiny_model()
    ids = torch.cat([video_prompt(2), video_prompt(2, prefix=(4, 10, 11, 12, 13), suffix=(14, 15, 16, 17))])
    pixels = torch.cat([random_frames(2), random_frames(2, seed=1)])
    with torch.no_grad():
        batched = model(ids, pixel_values_videos=pixels).logits
        for i in range(2):
            single = model(ids[i : i + 1], pixel_values_videos=pixels[i : i + 1]).logits
            torch.testing.assert_close(batched[i : i + 1], single, atol=1e-5, rtol=1e-5)


# ---- generation strategies ---------------------------------------------------------------------------------------


def test_beam_search_with_cache_equals_beam_search_recomputed():
    model = tiny_model()
    ids, pixels = video_prompt(6), random_frames(6)
    kwargs = dict(pixel_values_videos=pixels, max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False)
    cached = model.generate(ids, **kwargs)
    recomputed = model.generate(ids, use_cache=False, **kwargs)
    assert cached.shape == (2, ids.shape[1] + 5)
    assert cached.tolist() == recomputed.tolist()


def test_sampling_with_cache_equals_sampling_recomputed():
    model = tiny_model()
    ids, pixels = video_prompt(6), random_frames(6)
    kwargs = dict(pixel_values_videos=pixels, max_new_tokens=6, do_sample=True, top_k=20, num_return_sequences=2)
    torch.manual_seed(3)
    cached = model.generate(ids, **kwargs)
    torch.manual_seed(3)
    recomputed = model.generate(ids, use_cache=False, **kwargs)
    assert cached.tolist() == recomputed.tolist()


# ---- visual spans -------------------------------------------------------------------------------------------------


def test_images_and_videos_in_any_order_each_compressed():
    model = tiny_model()
    ids = torch.tensor([[4, 10] + [IMAGE_ID] * 32 + [11] + [VIDEO_ID] * 80 + [12] + [IMAGE_ID] * 16 + [13, 14]])
    tiles = torch.randn(3, 3, 112, 112)
    out = model(ids, pixel_values=tiles, pixel_values_videos=random_frames(5), compression_ratio=8)
    # kept: text 2 + 1 + 1 + 2, image 32/8, video 64/8 + 16/8, image 16/8
    assert out.cache.get_seq_length() == 6 + 4 + 8 + 2 + 2
    # the VSTs carry what was seen: changing the second image changes the answer logits
    tiles2 = tiles.clone()
    tiles2[2] += 1.0
    other = model(ids, pixel_values=tiles2, pixel_values_videos=random_frames(5), compression_ratio=8)
    assert not torch.allclose(out.logits[:, -1], other.logits[:, -1])


def test_vst_weights_matter():
    model = tiny_model()
    ids, pixels = video_prompt(4), random_frames(4)
    before = logits_of(model, ids, pixel_values_videos=pixels)
    with torch.no_grad():
        model.model.layers[0].self_attn.beacon_k_proj.weight.add_(0.5)
    assert not torch.allclose(before[:, -1], logits_of(model, ids, pixel_values_videos=pixels)[:, -1])


# ---- errors -------------------------------------------------------------------------------------------------------


def test_ratio_that_does_not_divide_the_window_is_a_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"allowed values: \[1, 2, 4, 8, 16\], got 3"):
        model(video_prompt(2), pixel_values_videos=random_frames(2), compression_ratio=3)


def test_token_and_frame_counts_must_match():
    model = tiny_model()
    with pytest.raises(ValueError, match="3 frames/tiles = 48 visual tokens, but input_ids has 32 tokens"):
        model(video_prompt(2), pixel_values_videos=random_frames(3))
    with pytest.raises(ValueError, match="0 frames/tiles"):
        model(video_prompt(2))
    with pytest.raises(ValueError, match=r"must be \[n, 3, 112, 112\].*got \(1, 2, 3, 224, 224\)"):
        model(video_prompt(2), pixel_values_videos=torch.zeros(1, 2, 3, 224, 224))


# ---- training path ---------------------------------------------------------------------------------------------


def test_loss_is_the_token_mean_over_labelled_text():
    model = tiny_model()
    ids, pixels = video_prompt(6), random_frames(6)
    labels = torch.full_like(ids, -100)
    labels[0, -3:] = ids[0, -3:]
    out = model(ids, pixel_values_videos=pixels, labels=labels, compression_ratio=4)
    full = logits_of(model, ids, pixel_values_videos=pixels, compression_ratio=4)
    expected = torch.nn.functional.cross_entropy(full[0, -4:-1], ids[0, -3:])
    torch.testing.assert_close(out.loss, expected, atol=1e-5, rtol=1e-5)
    assert out.logits.shape[1] == 3  # logits only where a label follows


def test_gradient_reaches_the_first_frame_through_the_kept_vsts():
    model = tiny_model()
    model.train()
    frames = 10  # frame 0 is in the first window, the answer after the third
    ids = video_prompt(frames)
    pixels = random_frames(frames).requires_grad_(True)
    labels = torch.full_like(ids, -100)
    labels[0, -2:] = ids[0, -2:]
    model(ids, pixel_values_videos=pixels, labels=labels, compression_ratio=4).loss.backward()
    assert pixels.grad[0, 0].abs().sum() > 0
    assert model.model.beacon_embed_tokens.weight.grad.abs().sum() > 0


def test_training_ratios_are_drawn_per_window_from_a_seed():
    model = tiny_model()
    model.train()

    def draws(seed):
        model.seed_compression_ratios(seed)
        sampler = model.model.ratio_sampler(None)
        return [sampler() for _ in range(20)]

    assert draws(7) == draws(7)
    assert len(set(draws(7))) > 1
    assert set(draws(7)) <= {2, 4, 8}
    steps = modeling.plan_steps(video_prompt(12), model.config, model.model.ratio_sampler(None))
    assert [step.is_window for step in steps] == [False, True, True, True, False]
    model.eval()
    assert {model.model.ratio_sampler(None)() for _ in range(5)} == {model.config.beacon_ratio}


# ---- the released 7B layout ------------------------------------------------------------------------------------------


def test_7b_config_has_the_released_parameter_names_and_shapes():
    with torch.device("meta"):
        model = VideoXLForCausalLM(VideoXLConfig())
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes["model.embed_tokens.weight"] == (152064, 3584)
    assert shapes["model.beacon_embed_tokens.weight"] == (1, 3584)
    assert shapes["lm_head.weight"] == (152064, 3584)
    for i in (0, 27):
        prefix = f"model.layers.{i}.self_attn."
        assert shapes[prefix + "q_proj.weight"] == (3584, 3584) and shapes[prefix + "q_proj.bias"] == (3584,)
        assert shapes[prefix + "k_proj.weight"] == (512, 3584) and shapes[prefix + "v_proj.weight"] == (512, 3584)
        assert shapes[prefix + "beacon_q_proj.weight"] == (3584, 3584)
        assert shapes[prefix + "beacon_k_proj.bias"] == (512,) and shapes[prefix + "beacon_v_proj.weight"] == (512, 3584)
        assert shapes[prefix + "o_proj.weight"] == (3584, 3584) and prefix + "o_proj.bias" not in shapes
        assert shapes[f"model.layers.{i}.mlp.gate_proj.weight"] == (18944, 3584)
    assert "model.layers.28.input_layernorm.weight" not in shapes
    assert shapes["model.mm_projector.0.weight"] == (3584, 1024)
    assert shapes["model.mm_projector.2.weight"] == (3584, 3584)
    clip = "model.vision_tower.vision_tower.vision_model."
    assert shapes[clip + "embeddings.patch_embedding.weight"] == (1024, 3, 14, 14)
    assert shapes[clip + "embeddings.position_embedding.weight"] == (577, 1024)
    assert clip + "encoder.layers.23.self_attn.q_proj.weight" in shapes
    assert clip + "post_layernorm.weight" in shapes and clip + "pre_layrnorm.weight" in shapes
    beacon = sum(p.numel() for n, p in model.named_parameters() if "beacon_" in n and "layers" in n)
    assert abs(beacon / 28 - 16.5e6) < 0.1e6
    total = sum(p.numel() for p in model.parameters())
    assert 8.3e9 < total < 8.5e9


def test_released_config_json_is_the_default_config():
    config = json.loads((REPO_ROOT / "config.json").read_text())
    loaded = VideoXLConfig.from_dict(config)
    default = VideoXLConfig()
    assert loaded.text_config.to_dict() == default.text_config.to_dict()
    assert loaded.vision_config.to_dict() == default.vision_config.to_dict()
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_videoxl.VideoXLForCausalLM"


# ---- saving and loading -----------------------------------------------------------------------------------------------


LOAD_AND_RUN = """
import sys, torch
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText
path, out = sys.argv[1], sys.argv[2]
torch.set_num_threads(int(sys.argv[3]))  # the parent's: the same reduction order, so bit-identical logits
ids = torch.load(out + ".in.pt")
results = []
for auto in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText):
    model = auto.from_pretrained(path, trust_remote_code=True, attn_implementation="eager").eval()
    assert type(model).__name__ == "VideoXLForCausalLM", type(model)
    with torch.no_grad():
        results.append(model(ids["input_ids"], pixel_values_videos=ids["pixels"]).logits)
torch.save(results, out)
"""


@pytest.mark.slow
def test_save_and_load_in_a_fresh_offline_process(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "model")
    ids, pixels = video_prompt(5), random_frames(5)
    expected = logits_of(model, ids, pixel_values_videos=pixels)
    torch.save({"input_ids": ids, "pixels": pixels}, str(tmp_path / "out.pt") + ".in.pt")
    script = tmp_path / "load.py"
    script.write_text(LOAD_AND_RUN)
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, str(script), str(tmp_path / "model"), str(tmp_path / "out.pt"),
                    str(torch.get_num_threads())],
                   check=True, env=env, cwd=tmp_path)
    for logits in torch.load(tmp_path / "out.pt"):
        torch.testing.assert_close(logits, expected, atol=0, rtol=0)


def test_missing_vst_weights_start_as_copies_with_a_warning(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "beacon_" not in k}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    with CaptureLogger(modeling.logger) as captured:
        loaded = VideoXLForCausalLM.from_pretrained(tmp_path)
    assert "13 VST weights are missing" in captured.out
    attn = loaded.model.layers[1].self_attn
    for name in ("q", "k", "v"):
        torch.testing.assert_close(getattr(attn, f"beacon_{name}_proj").weight, getattr(attn, f"{name}_proj").weight)
        torch.testing.assert_close(getattr(attn, f"beacon_{name}_proj").bias, getattr(attn, f"{name}_proj").bias)
    assert attn.beacon_q_proj.weight.data_ptr() != attn.q_proj.weight.data_ptr()
    torch.testing.assert_close(loaded.model.beacon_embed_tokens.weight[0], loaded.model.embed_tokens.weight[EOS_ID])
    torch.testing.assert_close(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_one_encoded_video_answers_several_questions_from_copies_of_its_cache():
    import copy

    model = tiny_model()
    frames = 6
    video = video_prompt(frames, suffix=())
    pixels = random_frames(frames)
    cache = BeaconCache(2)
    with torch.no_grad():
        model(video, pixel_values_videos=pixels, cache=cache)
        for question in ([13, 14, 15], [40, 41]):
            answer = model(torch.tensor([question]), cache=copy.deepcopy(cache)).logits
            whole = logits_of(model, torch.cat([video, torch.tensor([question])], dim=1), pixel_values_videos=pixels)
            torch.testing.assert_close(answer, whole[:, -len(question):], atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == 4 + frames * TOKENS_PER_FRAME // 4


def test_decoding_after_a_video_plans_and_checks_visual_input_once_and_hashes_the_config_once(monkeypatch):
    """Decode steps take the text path: after the prefill, no planner, no visual checks; the model's identity is
    computed once (not per call) and the answer equals a fresh model's."""
    expected = tiny_model().generate(video_prompt(6), pixel_values_videos=random_frames(6), max_new_tokens=8,
                                     do_sample=False)
    calls = {"plan_steps": 0, "from_pixels": 0, "model_identity": 0}

    def counted(name, original):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(modeling, "plan_steps", counted("plan_steps", modeling.plan_steps))
    monkeypatch.setattr(modeling, "model_identity", counted("model_identity", modeling.model_identity))
    monkeypatch.setattr(modeling.VisualInputs, "from_pixels",
                        classmethod(counted("from_pixels", modeling.VisualInputs.from_pixels.__func__)))
    model = tiny_model()
    got = model.generate(video_prompt(6), pixel_values_videos=random_frames(6), max_new_tokens=8, do_sample=False)
    assert got.tolist() == expected.tolist()
    assert calls == {"plan_steps": 1, "from_pixels": 1, "model_identity": 1}
