"""Batches of unrelated prompts: every sample of a mixed batch answers as it would alone.

Mixed = different frame counts (a partial last window too), images beside videos, text-only prompts, different
question lengths, two videos in one prompt. Each sample is compressed with its own windows; the batch decodes from
one stacked, left-padded cache.
"""

import pytest
import torch

from scripts.local_import import BeaconCache, compat
from tests.conftest import IMAGE_ID, TOKENS_PER_FRAME, VIDEO_ID, random_frames, tiny_model


PAD = 0


def sample(text_before, visuals, text_after, seed=0):
    """A prompt as (ids, video frames `[n, 3, 112, 112]` or None, image tiles or None).

    `visuals`: a list of ("video" | "image", frames, text after it)."""
    ids, videos, images = list(text_before), [], []
    for i, (kind, frames, text) in enumerate(visuals):
        pixels = random_frames(frames, seed=seed * 10 + i)[0]
        ids += [VIDEO_ID if kind == "video" else IMAGE_ID] * (frames * TOKENS_PER_FRAME) + list(text)
        (videos if kind == "video" else images).append(pixels)
    ids += list(text_after)
    return ids, (torch.cat(videos) if videos else None), (torch.cat(images) if images else None)


MIXED = [
    sample([4, 10, 11], [("video", 6, [])], [13, 14, 15, 16, 17], seed=1),  # a partial last window (6 = 4 + 2)
    sample([4, 12], [("image", 3, [])], [18, 19, 20], seed=2),  # an image prompt
    sample([4, 21, 22, 23, 24, 25, 26], [], [], seed=3),  # text only
    sample([4, 10], [("video", 3, [30, 31]), ("video", 5, [])], [13, 14], seed=4),  # two videos in one prompt
    sample([4, 10, 11, 12], [("video", 4, [])], [40, 41, 42, 43, 44, 45, 46, 47, 48], seed=5),  # a long question
    sample([4], [("image", 2, [50]), ("video", 2, [])], [51, 52, 53], seed=6),  # an image and a video
]


def batch_of(samples, side="left"):
    """Pad samples into one batch, with pixels concatenated sample after sample (as the processor does)."""
    length = max(len(ids) for ids, _, _ in samples)
    rows, masks = [], []
    for ids, _, _ in samples:
        pad = [PAD] * (length - len(ids))
        rows.append(pad + ids if side == "left" else ids + pad)
        ones, zeros = [1] * len(ids), [0] * len(pad)
        masks.append(zeros + ones if side == "left" else ones + zeros)
    inputs = {"input_ids": torch.tensor(rows), "attention_mask": torch.tensor(masks)}
    videos = [v for _, v, _ in samples if v is not None]
    images = [i for _, _, i in samples if i is not None]
    if videos:
        inputs["pixel_values_videos"] = torch.cat(videos)
    if images:
        inputs["pixel_values"] = torch.cat(images)
    return inputs


def assert_same_gradients(batched_grads: dict, model) -> None:
    """The batch's gradients == the ones accumulated in `model` by the per-sample runs. A parameter no output
    depends on may have no gradient on one side and a zero one on the other."""
    assert len(batched_grads) > 10
    for name, p in model.named_parameters():
        single_grad = torch.zeros_like(p) if p.grad is None else p.grad
        batched_grad = batched_grads.get(name, torch.zeros_like(p))
        torch.testing.assert_close(batched_grad, single_grad, atol=1e-5, rtol=1e-4, msg=name)


def alone(one):
    return batch_of([one])


@pytest.fixture(scope="module")
def model():
    return tiny_model(attn_implementation="sdpa")


def test_mixed_batch_greedy_ids_and_last_logits_equal_each_sample_alone(model):
    inputs = batch_of(MIXED)
    length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        batched_logits = model(**inputs, logits_to_keep=1).logits
    generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    for i, one in enumerate(MIXED):
        with torch.no_grad():
            single_logits = model(**alone(one), logits_to_keep=1).logits
        torch.testing.assert_close(batched_logits[i : i + 1], single_logits, atol=1e-5, rtol=1e-5)
        single = model.generate(**alone(one), max_new_tokens=6, do_sample=False)
        assert generated[i, length:].tolist() == single[0, len(one[0]) :].tolist(), f"sample {i}"


def test_mixed_batch_forward_equals_alone_at_every_token_column(model):
    """All columns: each sample's hidden states at its own tokens."""
    inputs = batch_of(MIXED[:4])
    with torch.no_grad():
        batched = model.model(**inputs).last_hidden_state
        for i, one in enumerate(MIXED[:4]):
            single = model.model(**alone(one)).last_hidden_state
            torch.testing.assert_close(batched[i, -len(one[0]) :], single[0], atol=1e-5, rtol=1e-5)


def test_mixed_batch_cache_is_each_samples_cache_left_padded(model):
    inputs = batch_of(MIXED[:3])
    with torch.no_grad():
        cache = model(**inputs, logits_to_keep=1).cache
    assert torch.equal(cache.record.absorbed_ids, inputs["input_ids"])
    for i, one in enumerate(MIXED[:3]):
        with torch.no_grad():
            single = model(**alone(one), logits_to_keep=1).cache
        rows = single.get_seq_length()
        assert int(cache.key_mask[i].sum()) == rows and cache.key_mask[i, -rows:].all()
        for layer, single_layer in zip(cache.layers, single.layers):
            torch.testing.assert_close(layer.keys[i, :, -rows:], single_layer.keys[0], atol=1e-5, rtol=1e-5)
        assert single.record.ratios == [4] * len(single.record.ratios)
    # The raw question rows are the last columns of every sample: a reused cache rewinds them like a fresh one.
    raw_text_rows = cache.get_seq_length() - cache.compressed_rows
    assert cache.record.absorbed_length - raw_text_rows <= inputs["input_ids"].shape[1] - 3


def test_stack_refuses_empty_or_batched_caches():
    with pytest.raises(ValueError, match="non-empty single-sample caches"):
        BeaconCache(2).stack([BeaconCache(2)], torch.zeros(1, 1, dtype=torch.long))


def test_a_mixed_batch_extends_the_cache_it_was_given_in_place(model):
    """`model(..., cache=c)` on a batch of mixed layouts fills `c` itself (as the docstring promises), and decoding
    from `c` equals decoding from a cache the model made."""
    inputs = batch_of(MIXED[:3])
    given = BeaconCache(model.config.text_config.num_hidden_layers)
    with torch.no_grad():
        out = model(**inputs, cache=given, logits_to_keep=1)
        made = model(**inputs, logits_to_keep=1).cache
    assert compat.cache_of(out) is given
    assert given.record.absorbed_length == inputs["input_ids"].shape[1]
    assert torch.equal(given.record.absorbed_ids, inputs["input_ids"]) and torch.equal(given.key_mask, made.key_mask)
    for layer, made_layer in zip(given.layers, made.layers):
        assert torch.equal(layer.keys, made_layer.keys) and torch.equal(layer.values, made_layer.values)
    step = torch.tensor([[40], [41], [42]])
    mask = torch.cat([inputs["attention_mask"], torch.ones(3, 1, dtype=inputs["attention_mask"].dtype)], dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(step, attention_mask=mask, cache=given).logits,
                                   model(step, attention_mask=mask, cache=made).logits, atol=0, rtol=0)


def test_same_layout_batches_still_run_one_plan_equal_to_alone(model, monkeypatch):
    """Same visual columns, other videos and questions: the one-plan path (never sample by sample), equal to alone."""
    same = [
        sample([4, 10, 11], [("video", 5, [])], [13, 14], seed=7),
        sample([4, 10, 11], [("video", 5, [])], [15, 16], seed=8),
    ]
    inputs = batch_of(same)
    with monkeypatch.context() as patch:
        patch.setattr(type(model.model), "forward_per_sample", lambda *args, **kwargs: pytest.fail("ran per sample"))
        generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    for i, one in enumerate(same):
        single = model.generate(**alone(one), max_new_tokens=5, do_sample=False)
        assert generated[i].tolist() == single[0].tolist()


def test_swapped_video_and_image_order_equals_each_alone(model):
    """`<video><image>` beside `<image><video>` in the same columns (once silently answered the other prompt)."""
    swapped = [
        sample([4], [("video", 2, []), ("image", 2, [])], [13, 14], seed=9),
        sample([4], [("image", 2, []), ("video", 2, [])], [13, 14], seed=10),
    ]
    inputs = batch_of(swapped)
    with torch.no_grad():
        batched = model(**inputs).logits
        for i, one in enumerate(swapped):
            torch.testing.assert_close(batched[i : i + 1], model(**alone(one)).logits, atol=1e-5, rtol=1e-5)


def test_right_padded_batch_is_refused_by_generate(model):
    inputs = batch_of(MIXED[:3], side="right")
    with pytest.raises(ValueError, match="right-padded batch.*pad on the left"):
        model.generate(**inputs, max_new_tokens=2)


def test_right_padded_mixed_batch_forward_equals_alone(model):
    """Training batches are right-padded: logits at every token column equal the sample's alone."""
    inputs = batch_of(MIXED, side="right")
    with torch.no_grad():
        batched = model(**inputs).logits
        for i, one in enumerate(MIXED):
            single = model(**alone(one)).logits
            torch.testing.assert_close(batched[i, : len(one[0])], single[0], atol=1e-5, rtol=1e-5)


def test_beam_search_with_several_returns_on_a_mixed_batch_equals_each_alone(model):
    chosen = [MIXED[0], MIXED[1], MIXED[3]]
    inputs = batch_of(chosen)
    kwargs = dict(max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False)
    generated = model.generate(**inputs, **kwargs)
    length = inputs["input_ids"].shape[1]
    for i, one in enumerate(chosen):
        single = model.generate(**alone(one), **kwargs)
        assert generated[2 * i : 2 * i + 2, length:].tolist() == single[:, len(one[0]) :].tolist(), f"sample {i}"


def test_sampling_on_a_mixed_batch_is_seeded_and_scores_each_sample_as_alone(model):
    """With a seed the batch samples the same tokens every time, and every sampled step's logits are the ones
    the sample alone gives for that continuation (the draw itself consumes the generator batch-wide)."""
    chosen = [MIXED[0], MIXED[2], MIXED[4]]
    inputs = batch_of(chosen)
    kwargs = dict(max_new_tokens=4, do_sample=True, top_k=20, num_return_sequences=2, output_logits=True,
                  return_dict_in_generate=True)
    torch.manual_seed(11)
    first = model.generate(**inputs, **kwargs)
    torch.manual_seed(11)
    again = model.generate(**inputs, **kwargs)
    assert first.sequences.tolist() == again.sequences.tolist()
    length = inputs["input_ids"].shape[1]
    step_logits = torch.stack(first.logits, dim=1)  # [batch * 2, new, vocab]
    for row in range(first.sequences.shape[0]):
        ids, _, _ = one = chosen[row // 2]
        new = first.sequences[row, length:]
        if (new == 5).any():  # stop at the first eos (later steps are padding)
            new = new[: int((new == 5).nonzero()[0]) + 1]
        single = alone(one)
        single["input_ids"] = torch.cat([single["input_ids"], new[None, :-1]], dim=1)
        single["attention_mask"] = torch.ones_like(single["input_ids"])
        with torch.no_grad():
            logits = model(**single, logits_to_keep=len(new)).logits[0]
        torch.testing.assert_close(step_logits[row, : len(new)], logits, atol=1e-5, rtol=1e-5)


def test_mixed_training_batch_loss_and_gradients_equal_the_per_sample_sum():
    """Right-padded, labels -100 on padding and prompts; Trainer's normaliser (`num_items_in_batch`)."""
    model = tiny_model(attn_implementation="sdpa").train()
    chosen = MIXED[:5]
    inputs = batch_of(chosen, side="right")
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    labels = labels.masked_fill((labels == VIDEO_ID) | (labels == IMAGE_ID), -100)
    labels[:, :2] = -100
    items = int((labels[:, 1:] != -100).sum())
    loss = model(**inputs, labels=labels, compression_ratio=4, num_items_in_batch=items).loss
    loss.backward()
    batched_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    total = 0.0
    for i, one in enumerate(chosen):
        single_labels = labels[i : i + 1, : len(one[0])]
        single = model(**alone(one), labels=single_labels, compression_ratio=4, num_items_in_batch=items).loss
        single.backward()
        total = total + single.detach()
    torch.testing.assert_close(loss.detach(), total, atol=1e-5, rtol=1e-5)
    assert_same_gradients(batched_grads, model)


def test_pipeline_batches_equal_one_at_a_time():
    """`pipeline("image-text-to-text", batch_size=4)` on the shipped model: images of other tile counts and questions
    of other lengths in one batch. The pipeline pads with the tokenizer's side, which the processor sets to left
    (the demo tokenizer's own default is right)."""
    import numpy as np
    from PIL import Image
    from transformers import pipeline

    from demo.run import BUNDLED_MODEL

    rng = np.random.default_rng(0)
    sizes = [(224, 224), (300, 600), (500, 260), (224, 224), (448, 448)]
    questions = ["What colour is it?", "Describe.", "Which shape is shown in the picture, and where is it?", "A?", "B"]
    messages = [
        [{"role": "user", "content": [
            {"type": "image", "image": Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))},
            {"type": "text", "text": question},
        ]}]
        for (h, w), question in zip(sizes, questions)
    ]
    # A fresh generate_kwargs per call: transformers 5.23's pipeline writes max_new_tokens into the dict it is given.
    kwargs = lambda: dict(max_new_tokens=8, return_full_text=False, generate_kwargs={"do_sample": False})  # noqa: E731
    batched = pipeline("image-text-to-text", model=str(BUNDLED_MODEL), trust_remote_code=True, batch_size=4)
    assert batched.tokenizer.padding_side == "left"
    one_by_one = [batched(text=m, **kwargs())[0]["generated_text"] for m in messages]
    together = [out[0]["generated_text"] for out in batched(text=messages, **kwargs())]
    assert together == one_by_one


def test_collator_batches_mixed_samples_and_the_loss_equals_the_per_sample_losses():
    """scripts/collator.py on a video of 3 frames, one of 5, an image and a text-only sample (right-padded, labels
    -100 on padding): loss and gradients of the batch == the per-sample losses combined as the Trainer does."""
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoProcessor

    from demo.run import BUNDLED_MODEL
    from scripts.collator import VideoXLCollator

    rng = np.random.default_rng(1)
    frames = lambda n: rng.integers(0, 255, (n, 96, 128, 3), dtype=np.uint8)  # noqa: E731
    turns = lambda q, a: [{"from": "human", "value": q}, {"from": "gpt", "value": a}]  # noqa: E731
    samples = [
        {"video": frames(3), "conversations": turns("<video>\nWhat happens?", "A star moves.")},
        {"video": frames(5), "conversations": turns("<video>\nWhich colour?", "Red.")},
        {"image": rng.integers(0, 255, (300, 500, 3), dtype=np.uint8),
         "conversations": turns("Shape?", "A cross in the top left.")},
        {"conversations": turns("Text only, and a longer question than the others.", "Fine.")},
    ]
    processor = AutoProcessor.from_pretrained(BUNDLED_MODEL, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL, trust_remote_code=True, dtype=torch.float32).train()
    collator = VideoXLCollator(processor, compression_ratio=4)
    batch = collator(samples)
    assert (batch["attention_mask"][:, 0] == 1).all() and not batch["attention_mask"][:, -1].all()  # right-padded
    items = int((batch["labels"][:, 1:] != -100).sum())

    loss = model(**batch, num_items_in_batch=items).loss
    loss.backward()
    batched_grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    total = 0.0
    for one in samples:
        single = model(**collator([one]), num_items_in_batch=items).loss
        single.backward()
        total = total + single.detach()
    torch.testing.assert_close(loss.detach(), total, atol=1e-5, rtol=1e-5)
    assert_same_gradients(batched_grads, model)


def test_a_mixed_batchs_cache_continues_a_follow_up_like_a_fresh_prompt(model):
    """The stacked cache is reused with the whole follow-up prompt and every frame (checked against the cache's
    per-sample fingerprints, then skipped): the same tokens as the follow-up run from scratch."""
    chosen = [MIXED[0], MIXED[1], MIXED[2], MIXED[5]]
    inputs = batch_of(chosen)
    first = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    follow_up = dict(inputs)
    follow_up["input_ids"] = torch.cat([first.sequences, torch.tensor([[60, 61]] * len(chosen))], dim=1)
    follow_up["attention_mask"] = torch.ones_like(follow_up["input_ids"])
    follow_up["attention_mask"][:, : inputs["input_ids"].shape[1]] = inputs["attention_mask"]
    reused = model.generate(**follow_up, cache=compat.cache_of(first), max_new_tokens=4, do_sample=False)
    fresh = model.generate(**follow_up, max_new_tokens=4, do_sample=False)
    assert reused.tolist() == fresh.tolist()
    other = dict(follow_up, pixel_values_videos=follow_up["pixel_values_videos"].flip(0))
    with pytest.raises(ValueError, match="not the frames it encoded"):
        model.generate(**other, cache=compat.cache_of(first), max_new_tokens=1)


def test_mixed_batch_hidden_states_are_each_samples_left_padded_and_no_cache_without_use_cache(model):
    chosen = MIXED[:3]
    with torch.no_grad():
        out = model(**batch_of(chosen), output_hidden_states=True, use_cache=False)
        assert out.cache is None
        for i, one in enumerate(chosen):
            single = model(**alone(one), output_hidden_states=True).hidden_states
            assert len(out.hidden_states) == len(single)
            for batched_layer, single_layer in zip(out.hidden_states, single):
                rows = single_layer.shape[1]
                torch.testing.assert_close(batched_layer[i, -rows:], single_layer[0], atol=1e-5, rtol=1e-5)
                assert not batched_layer[i, :-rows].any()


def test_processor_batch_of_videos_images_and_text_generates_as_each_alone():
    """As a user would: `processor(text=[...], videos=[...], images=[...], padding=True)` -> `generate`, on the
    shipped model, with videos of 3, 7 and 2+4 frames, an image and a text-only prompt."""
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoProcessor

    from demo.run import BUNDLED_MODEL

    rng = np.random.default_rng(2)
    frames = lambda n: rng.integers(0, 255, (n, 90, 120, 3), dtype=np.uint8)  # noqa: E731
    processor = AutoProcessor.from_pretrained(BUNDLED_MODEL, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL, trust_remote_code=True, dtype=torch.float32).eval()
    prompts = [
        ("<|im_start|>user\n<video>\nWhat colour was the star?<|im_end|>\n<|im_start|>assistant\n", [frames(3)], []),
        ("<|im_start|>user\n<image>\nShape?<|im_end|>\n<|im_start|>assistant\n", [], [frames(1)[0]]),
        ("<|im_start|>user\nA question without media, a longer one.<|im_end|>\n<|im_start|>assistant\n", [], []),
        ("<|im_start|>user\n<video>\nWhich digit?<|im_end|>\n<|im_start|>assistant\n", [frames(7)], []),
        ("<|im_start|>user\n<video><video>\nSame?<|im_end|>\n<|im_start|>assistant\n", [frames(2), frames(4)], []),
    ]
    call = lambda chosen: processor(  # noqa: E731
        text=[text for text, _, _ in chosen], videos=[v for _, vs, _ in chosen for v in vs] or None,
        images=[i for _, _, images in chosen for i in images] or None, return_tensors="pt",
    )
    inputs = call(prompts)
    assert (inputs["attention_mask"][:, -1] == 1).all()  # left-padded for generation
    generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    length = inputs["input_ids"].shape[1]
    eos = model.generation_config.eos_token_id

    def until_eos(ids: list[int]) -> list[int]:  # a batch pads a row that ended early; alone it just stops
        return ids[: ids.index(eos) + 1] if eos in ids else ids

    for i, one in enumerate(prompts):
        single_inputs = call([one])
        single = model.generate(**single_inputs, max_new_tokens=6, do_sample=False)
        alone = single[0, single_inputs["input_ids"].shape[1] :].tolist()
        assert until_eos(generated[i, length:].tolist()) == alone, i


def test_batch_benchmark_runs_its_8_mixed_prompts_with_each_samples_own_memory():
    """benchmarks/batch.py's child on the tiny preset, in process: the batch keeps per sample what alone keeps."""
    import importlib.util

    from scripts.local_import import REPO_ROOT

    spec = importlib.util.spec_from_file_location("batch_bench", REPO_ROOT / "benchmarks" / "batch.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    base = {"size": "tiny", "threads": torch.get_num_threads(), "decode_tokens": 2}  # leaves the test's threads
    everything = list(range(len(bench.PROMPTS)))
    batched = bench.run_child({**base, "prompts": everything})
    alone_kept = [bench.run_child({**base, "prompts": [i]})["kept"][0] for i in everything]
    assert batched["kept"] == alone_kept
    assert batched["decode_tokens"] == 2 * len(everything) and batched["prefill_s"] > 0 and batched["decode_s"] > 0
