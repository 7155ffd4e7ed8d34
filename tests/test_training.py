"""Fine-tuning: the loss under gradient accumulation and activation checkpointing, ratio draws, LoRA, the collator,
and scripts/finetune.py through Trainer in one process, from the command line and in two processes (torchrun)."""

import json
import os
import subprocess
import sys
import weakref
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from peft import PeftModel
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, AutoProcessor, TrainingArguments

from demo.build_tiny_tokenizer import CHAT_TEMPLATE, build_tiny_tokenizer
from demo.synth import make_sample, write_video
from scripts import finetune
from scripts.collator import IGNORE_INDEX, VideoXLCollator, read_jsonl
from scripts.local_import import REPO_ROOT, VideoXLConfig, VideoXLForCausalLM, modeling, processing
from tests.conftest import TOKENS_PER_FRAME, VIDEO_ID, random_frames, tiny_model, video_prompt


CODE_FILES = {"configuration_videoxl.py", "modeling_videoxl.py", "inputs_videoxl.py", "beacon_cache.py",
              "cache_file_videoxl.py"}
PROCESSOR_FILES = {"processor_config.json", "processing_videoxl.py", "tokenizer.json", "chat_template.jinja"}
WINDOW = 4 * TOKENS_PER_FRAME  # the tiny models' windows


def grads_of(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def answer_labels(ids: torch.Tensor, count: int) -> torch.Tensor:
    """Labels on the last `count` tokens of each row."""
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -count:] = ids[:, -count:]
    return labels


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread; more only fight over the shared cores (10x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class PlanSpy:
    """Records the windows every forward ran: the ratios of the steps `plan_steps` returned."""

    def __init__(self, monkeypatch):
        self.plans: list[list[int]] = []
        plan_steps = modeling.plan_steps

        def spy(*args, **kwargs):
            steps = plan_steps(*args, **kwargs)
            self.plans.append([step.ratio for step in steps if step.is_window])
            return steps

        monkeypatch.setattr(modeling, "plan_steps", spy)


# ---- tiny model and data on disk, as a user would have them ---------------------------------------------------------


def tiny_processor(tokenizer):
    """112 px frames, 16 tokens each; every frame of a 10 fps video."""
    return processing().VideoXLProcessor(
        tokenizer=tokenizer, chat_template=CHAT_TEMPLATE, image_size=112, num_image_tokens=16, num_frames=None, fps=10.0
    )


def write_tiny_model(folder: Path) -> Path:
    """A random tiny Video-XL over the demo tokenizer, saved with its processor."""
    tokenizer = build_tiny_tokenizer(folder / "tokenizer")
    ids = tokenizer.convert_tokens_to_ids
    text = dict(
        model_type="qwen2", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
        bos_token_id=ids("<|im_start|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
    )
    vision = dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=2, image_size=112, patch_size=14)
    config = VideoXLConfig(text_config=text, vision_config=vision, image_token_id=ids("<image>"),
                           video_token_id=ids("<video>"), beacon_window=WINDOW, beacon_ratio=4, beacon_train_ratios=[2, 4, 8])
    torch.manual_seed(0)
    model = VideoXLForCausalLM(config)
    model.generation_config.eos_token_id = ids("<|im_end|>")
    model.generation_config.pad_token_id = ids("<|endoftext|>")
    model.save_pretrained(folder / "model")
    tiny_processor(tokenizer).save_pretrained(folder / "model")
    return folder / "model"


def write_dataset(folder: Path) -> Path:
    """Needle videos of 8 and 12 frames (2 and 3 windows) written with PyAV, and a text-only sample."""
    lines = []
    for seed, count in ((0, 8), (1, 12)):
        sample = make_sample(seed, count, height=112, width=112)
        write_video(sample.frames, folder / f"clip{seed}.mp4")
        lines.append({"video": f"clip{seed}.mp4", "conversations": [
            {"from": "human", "value": "<video>\n" + sample.question}, {"from": "gpt", "value": sample.answer}]})
    lines.append({"conversations": [{"role": "user", "content": "What colour was the circle?"},
                                    {"role": "assistant", "content": "red"}]})
    (folder / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder / "train.jsonl"


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> SimpleNamespace:
    folder = tmp_path_factory.mktemp("finetune")
    return SimpleNamespace(folder=folder, model=write_tiny_model(folder), data=write_dataset(folder))


@pytest.fixture(scope="module")
def processor(assets):
    return AutoProcessor.from_pretrained(assets.model, trust_remote_code=True)


def subprocess_env(tmp_path: Path) -> dict[str, str]:
    """Offline, one thread per process (two cores are shared), a private module cache."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def mean_loss(model, batches: list[dict]) -> float:
    """Loss at the default ratio in eval mode (deterministic), averaged over the batches."""
    model.eval()
    with torch.no_grad():
        return sum(model(**batch).loss.item() for batch in batches) / len(batches)


def generate_answer(model, processor, video: Path) -> torch.Tensor:
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What colour?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=prompt, videos=str(video), return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    return generated[0, inputs["input_ids"].shape[1] :]


# ---- the loss: gradient accumulation, activation checkpointing, eval mode --------------------------------------------


def test_accumulated_single_samples_give_the_gradients_of_one_batch():
    model = tiny_model().train()
    ids = torch.cat([video_prompt(5, suffix=(13, 14, 15, 16, 17)), video_prompt(5, suffix=(20, 21, 22, 23, 24))])
    labels = torch.cat([answer_labels(ids[:1], 3), answer_labels(ids[1:], 1)])  # unequal counts: a mean of
    pixels = torch.cat([random_frames(5, seed=1), random_frames(5, seed=2)])  # means would weigh them wrongly
    items = int((labels[:, 1:] != IGNORE_INDEX).sum())

    model(ids, pixel_values_videos=pixels, labels=labels, compression_ratio=4, num_items_in_batch=items).loss.backward()
    batch = grads_of(model)
    model.zero_grad()
    for i in range(2):
        model(ids[i : i + 1], pixel_values_videos=pixels[i : i + 1], labels=labels[i : i + 1], compression_ratio=4,
              num_items_in_batch=items).loss.backward()
    accumulated = grads_of(model)

    assert batch.keys() == accumulated.keys()
    assert "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight" in batch
    for name in batch:
        torch.testing.assert_close(accumulated[name], batch[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(attn, reentrant):
    """Three windows, so gradients cross the memory the layers receive in pieces; a left-padded sample, so the
    masks built inside the layers are exercised (sdpa too); both checkpointing modes of torch."""
    model = tiny_model(attn_implementation=attn).train()
    ids = torch.cat([torch.tensor([[0, 0] + [4, 10, 11, 12] + [VIDEO_ID] * 10 * TOKENS_PER_FRAME + [13, 14, 15]]),
                     video_prompt(10, prefix=(4, 20, 21, 22, 23, 24), suffix=(30, 31, 32))])
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    labels = answer_labels(ids, 3)
    attention_calls = []  # the recompute stops once the last saved tensor is back: count a module that completes
    model.model.layers[0].self_attn.register_forward_hook(lambda *args: attention_calls.append(1))

    def loss_and_grads():
        model.zero_grad()
        pixels = torch.cat([random_frames(10, seed=1), random_frames(10, seed=2)]).requires_grad_(True)
        loss = model(ids, attention_mask=mask, pixel_values_videos=pixels, labels=labels, compression_ratio=4).loss
        loss.backward()
        return loss.detach(), grads_of(model), pixels.grad

    plain = loss_and_grads()
    calls_plain = len(attention_calls)
    model.activation_checkpointing_enable({"use_reentrant": reentrant})
    checkpointed = loss_and_grads()

    assert calls_plain == 5  # prefix, three windows, question
    assert len(attention_calls) - calls_plain == 2 * calls_plain  # every step's layer ran again in the backward
    torch.testing.assert_close(checkpointed[0], plain[0], atol=0, rtol=0)
    assert plain[1].keys() == checkpointed[1].keys()
    for name in plain[1]:
        torch.testing.assert_close(checkpointed[1][name], plain[1][name], atol=1e-7, rtol=1e-5, msg=name)
    torch.testing.assert_close(checkpointed[2], plain[2], atol=1e-7, rtol=1e-5)


class LiveTensors(TorchDispatchMode):
    """Weak references to every tensor the operations under it create."""

    def __init__(self):
        super().__init__()
        self.created = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.created += [weakref.ref(t) for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out

    def live_bytes(self) -> int:
        """Bytes of the storages of the created tensors still alive (views counted once)."""
        alive = [tensor for tensor in (ref() for ref in self.created) if tensor is not None]
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in alive}.values())


def test_checkpointed_training_keeps_memory_linear_in_the_windows():
    """What a checkpointed forward leaves for the backward (layer inputs, the kept keys and values) grows by the same
    amount for every window: the layers hold the memory in pieces and build their masks themselves, where a
    concatenated memory or a `[rows, memory]` mask per window would grow with the square of the windows. Eager
    attention with a padded sample: the path that builds masks; a frozen vision tower, whose activations are not
    kept."""
    model = finetune.select_trainable(tiny_model(), SimpleNamespace(train="llm")).train()
    model.activation_checkpointing_enable()

    def kept_for_backward(windows: int) -> int:
        ids = torch.cat([torch.tensor([[0, 4]]), video_prompt(4 * windows, prefix=(10, 11))], dim=1)
        mask = torch.ones_like(ids)
        mask[0, 0] = 0
        tracker = LiveTensors()
        with tracker:
            loss = model(ids, attention_mask=mask, pixel_values_videos=random_frames(4 * windows),
                         labels=answer_labels(ids, 3), compression_ratio=4).loss
        kept = tracker.live_bytes()
        del loss
        return kept

    kept_for_backward(1)  # what the first call creates for good (the frame digests' weights)
    two, four, eight = (kept_for_backward(windows) for windows in (2, 4, 8))
    per_window_early, per_window_late = (four - two) / 2, (eight - four) / 4
    assert per_window_late <= 1.02 * per_window_early, (two, four, eight)


def test_eval_mode_uses_the_default_ratio_deterministically(monkeypatch):
    model = tiny_model().eval()
    spy = PlanSpy(monkeypatch)
    ids = video_prompt(12)
    kwargs = dict(pixel_values_videos=random_frames(12), labels=answer_labels(ids, 3))
    losses = [model(ids, **kwargs).loss for _ in range(2)]
    assert spy.plans == [[model.config.beacon_ratio] * 3] * 2
    assert losses[0] == losses[1] == model(ids, compression_ratio=model.config.beacon_ratio, **kwargs).loss


# ---- per-window ratios in training ----------------------------------------------------------------------------------


def test_training_ratios_are_reproducible_from_a_seed_and_vary_across_windows(monkeypatch):
    model = tiny_model().train()
    spy = PlanSpy(monkeypatch)
    num_frames = 24  # six windows
    ids, pixels = video_prompt(num_frames), random_frames(num_frames)
    prefix, suffix = 4, 5

    def run(seed: int) -> tuple[list[int], int]:
        model.seed_compression_ratios(seed)
        kept = model(ids, pixel_values_videos=pixels).cache.get_seq_length()
        return spy.plans[-1], kept

    runs = {seed: run(seed) for seed in range(4)}
    for seed, (ratios, kept) in runs.items():
        assert len(ratios) == num_frames * TOKENS_PER_FRAME // WINDOW and set(ratios) <= {2, 4, 8}
        assert kept == prefix + sum(WINDOW // r for r in ratios) + suffix  # the memory the model really kept
        assert run(seed) == (ratios, kept)
    assert all(len(set(ratios)) > 1 for ratios, _ in runs.values())
    assert len({tuple(ratios) for ratios, _ in runs.values()}) == len(runs)


def test_reseeding_every_micro_batch_keeps_processes_on_the_same_ratios(tmp_path):
    """Two "processes" whose first micro-batches hold 3 windows and none: seeded once, their second micro-batches
    draw different ratios; reseeded by the callback, the same."""
    long_video = dict(input_ids=video_prompt(12), pixel_values_videos=random_frames(12))
    text_only = dict(input_ids=torch.tensor([[4, 10, 11, 12]]))
    video = dict(input_ids=video_prompt(8), pixel_values_videos=random_frames(8))

    def second_micro_batch_ratios(first: dict, reseed: bool) -> list[int]:
        model = tiny_model().train()
        model.seed_compression_ratios(0)
        log = finetune.RatioLogCallback(model, tmp_path)
        assert log.schedule is model.model.ratio_schedule
        seeder, state = finetune.RatioSeedCallback(model, seed=0), SimpleNamespace(global_step=5)
        if reseed:
            seeder.on_step_begin(None, state, None)
        model(**first)
        if reseed:
            seeder.on_substep_end(None, state, None)
        model(**video)
        draws = model.model.ratio_schedule.take_recorded()
        assert [len(ratios) for ratios in draws] == [3 if first is long_video else 0, 2]
        return draws[1]

    assert second_micro_batch_ratios(long_video, reseed=False) != second_micro_batch_ratios(text_only, reseed=False)
    assert second_micro_batch_ratios(long_video, reseed=True) == second_micro_batch_ratios(text_only, reseed=True)


# ---- what trains -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["all", "llm", "vst", "projector"])
def test_training_modes_select_their_parameters(mode):
    model = finetune.select_trainable(tiny_model(), SimpleNamespace(train=mode))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    names = {name for name, _ in model.named_parameters()}
    vision = {n for n in names if n.startswith("model.vision_tower.")}
    projector = {n for n in names if n.startswith("model.mm_projector.")}
    vst = {n for n in names if "beacon_" in n}
    assert len(vst) == 2 * 3 * 2 + 1  # q/k/v weight and bias in 2 layers, and the VST embedding
    expected = {"all": names, "llm": names - vision - projector, "vst": vst, "projector": projector}[mode]
    assert trainable == expected
    if mode == "llm":
        assert {"lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"} | vst <= trainable


def test_lora_trains_only_adapters_saves_loads_and_merges_back(tmp_path):
    model = finetune.apply_lora(tiny_model(), r=4, alpha=8, dropout=0.0)
    adapted = {name.rsplit(".lora_", 1)[0] for name, _ in model.named_parameters() if ".lora_" in name}
    layer = "base_model.model.model.layers.1"
    assert {f"{layer}.self_attn.beacon_q_proj", f"{layer}.self_attn.o_proj", f"{layer}.mlp.down_proj"} <= adapted
    assert len(adapted) == 2 * 10 and not any("vision_tower" in name for name in adapted)
    assert all((".lora_" in name) == p.requires_grad for name, p in model.named_parameters())

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids = video_prompt(6)
    inputs = dict(input_ids=ids, pixel_values_videos=random_frames(6), compression_ratio=4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):
        model(**inputs, labels=answer_labels(ids, 3)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    # The last layer's VST queries feed only VST outputs that nothing reads: no gradient reaches them.
    dead = f"{layer}.self_attn.beacon_q_proj.lora_"
    assert changed == {name for name in before if ".lora_" in name and not name.startswith(dead)}

    model.eval()
    with torch.no_grad():
        expected = model(**inputs).logits
        model.save_pretrained(tmp_path / "adapter")
        reloaded = PeftModel.from_pretrained(tiny_model(), tmp_path / "adapter").eval()
        torch.testing.assert_close(reloaded(**inputs).logits, expected, atol=0, rtol=0)
        merged = reloaded.merge_and_unload()
        assert not any(".lora_" in name for name, _ in merged.named_parameters())
        torch.testing.assert_close(merged(**inputs).logits, expected, atol=1e-5, rtol=1e-5)
        assert (merged(**inputs).logits - tiny_model()(**inputs).logits).abs().max() > 1e-3  # the adapters matter


# ---- the collator ----------------------------------------------------------------------------------------------------


def frames(count: int = 4) -> np.ndarray:
    return np.random.default_rng(count).integers(0, 255, (count, 112, 112, 3), dtype=np.uint8)


def labelled_runs(batch: dict, tokenizer, row: int = 0) -> list[str]:
    """The labelled tokens of a row as decoded runs of consecutive positions; checks labels equal the inputs."""
    labels, ids = batch["labels"][row], batch["input_ids"][row]
    where = (labels != IGNORE_INDEX).nonzero().squeeze(1).tolist()
    assert torch.equal(labels[where], ids[where])
    runs, start = [], None
    for i, position in enumerate(where):
        start = position if start is None else start
        if i + 1 == len(where) or where[i + 1] != position + 1:
            runs.append(tokenizer.decode(ids[start : position + 1]))
            start = None
    return runs


def test_collator_labels_only_assistant_answers_and_their_end(processor):
    sample = {"video": frames(), "conversations": [
        {"from": "system", "value": "You are a helpful assistant."},
        {"from": "human", "value": "<video>\nWhat colour was the circle?"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "What shape was the red object?"},
        {"from": "gpt", "value": "A circle."}]}
    batch = VideoXLCollator(processor, num_frames=4)([sample])
    assert labelled_runs(batch, processor.tokenizer) == ["red<|im_end|>", "A circle.<|im_end|>"]
    assert batch["pixel_values_videos"].shape == (1, 4, 3, 112, 112)
    assert int((batch["input_ids"] == processor.video_token_id).sum()) == 4 * 16
    assert "compression_ratio" not in batch
    assert VideoXLCollator(processor, num_frames=4, compression_ratio=8)([sample])["compression_ratio"] == 8


def scanned_labels(input_ids: torch.Tensor, tokenizer) -> torch.Tensor:
    """The collator's former labels, kept as a reference: the tokens after each `<|im_start|>assistant\\n` header
    up to and including the next `<|im_end|>`, found by scanning token ids."""
    header = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids, labels = input_ids.tolist(), [IGNORE_INDEX] * len(input_ids)
    i = 0
    while i <= len(ids) - len(header):
        if ids[i : i + len(header)] != header:
            i += 1
            continue
        j = i + len(header)
        while j < len(ids) and ids[j] != end_id:
            labels[j] = ids[j]
            j += 1
        if j < len(ids):
            labels[j] = ids[j]
        i = j + 1
    return torch.tensor(labels)


def test_labels_from_the_chat_template_equal_the_scanned_labels_on_the_test_conversations(processor):
    qwen = AutoProcessor.from_pretrained(REPO_ROOT, trust_remote_code=True)
    conversations = [
        ({"video": frames(), "conversations": [
            {"from": "system", "value": "You are a helpful assistant."},
            {"from": "human", "value": "<video>\nWhat colour was the circle?"}, {"from": "gpt", "value": "red"},
            {"from": "human", "value": "What shape was the red object?"}, {"from": "gpt", "value": "A circle."}]},
         {"num_frames": 4}),
        ({"image": [frames(1)[0], frames(2)[0]], "conversations": [
            {"from": "human", "value": "What colour?"}, {"from": "gpt", "value": "red"}]}, {}),
        ({"conversations": [{"role": "user", "content": "What colour was the circle?"},
                            {"role": "assistant", "content": "A red circle."}]}, {}),
        ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello there!\nBye."},
                            {"from": "human", "value": "Again?"}, {"from": "gpt", "value": "Yes."}]}, {}),
    ]
    compared = 0
    for proc in (processor, qwen):
        for sample, options in conversations:
            if proc is processor and "Hello" in json.dumps(sample["conversations"]):
                continue  # words outside the tiny vocabulary
            batch = VideoXLCollator(proc, **options)([sample])
            expected = scanned_labels(batch["input_ids"][0], proc.tokenizer)
            assert (expected != IGNORE_INDEX).any()
            assert torch.equal(batch["labels"][0], expected)
            compared += 1
    assert compared == 7


def test_collator_labels_answers_with_the_real_qwen_tokenizer():
    qwen = AutoProcessor.from_pretrained(REPO_ROOT, trust_remote_code=True)
    sample = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello there!\nBye."},
                                {"from": "human", "value": "Again?"}, {"from": "gpt", "value": "Yes."}]}
    batch = VideoXLCollator(qwen)([sample])
    assert labelled_runs(batch, qwen.tokenizer) == ["Hello there!\nBye.<|im_end|>", "Yes.<|im_end|>"]
    # An answer starting with newlines merges with the header's newline into one token: scanning for the header's
    # tokens lost that answer; the template's character spans label the merged token, the answer's first.
    merged = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "\n\nX"}]}
    batch = VideoXLCollator(qwen)([merged])
    assert (scanned_labels(batch["input_ids"][0], qwen.tokenizer) != IGNORE_INDEX).sum() == 0
    assert labelled_runs(batch, qwen.tokenizer) == ["\n\n\nX<|im_end|>"]


def test_collator_refuses_a_chat_template_that_marks_no_answers():
    plain = AutoProcessor.from_pretrained(REPO_ROOT, trust_remote_code=True)
    plain.chat_template = plain.chat_template.replace("{%- generation -%}", "").replace("{%- endgeneration -%}", "")
    sample = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yes."}]}
    with pytest.raises(ValueError, match="1 assistant turns but 0 labelled spans"):
        VideoXLCollator(plain)([sample])


def test_the_tiny_tokenizer_uses_the_repos_chat_template():
    template = (REPO_ROOT / "chat_template.jinja").read_text()
    assert CHAT_TEMPLATE == template == (REPO_ROOT / "demo" / "model" / "chat_template.jinja").read_text()


def test_collator_takes_from_value_and_role_content_alike(processor):
    turns = [("user", "What colour was the circle?"), ("assistant", "red")]
    llava = {"video": frames(), "conversations": [{"from": {"user": "human", "assistant": "gpt"}[r], "value": t}
                                                  for r, t in turns]}
    chat = {"video": frames(), "conversations": [{"role": r, "content": t} for r, t in turns]}
    collator = VideoXLCollator(processor, num_frames=4)
    a, b = collator([llava]), collator([chat])
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_collator_inserts_a_missing_marker_at_the_start_of_the_first_user_turn(processor):
    def sample(question: str, **media) -> dict:
        return {**media, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": "red"}]}

    collator = VideoXLCollator(processor, num_frames=4)
    implicit = collator([sample("What colour?", video=frames())])
    explicit = collator([sample("<video>\nWhat colour?", video=frames())])
    assert torch.equal(implicit["input_ids"], explicit["input_ids"])
    two_images = collator([sample("What colour?", image=[frames(1)[0], frames(2)[0]])])
    text = processor.tokenizer.decode(two_images["input_ids"][0])
    assert text.count("<image>") == int((two_images["input_ids"] == processor.image_token_id).sum())
    assert "<|im_start|>user\n<image>" in text and text.index("<image>\nWhat") > text.index("<|im_start|>user")


def test_collator_text_only_and_image_samples(processor):
    collator = VideoXLCollator(processor)
    text_only = collator([{"conversations": [{"role": "user", "content": "What colour?"},
                                             {"role": "assistant", "content": "red"}]}])
    assert set(text_only) == {"input_ids", "attention_mask", "labels"}
    assert labelled_runs(text_only, processor.tokenizer) == ["red<|im_end|>"]

    image = np.full((100, 180, 3), 200, dtype=np.uint8)
    batch = collator([{"image": image, "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                                         {"from": "gpt", "value": "red"}]}])
    tiles = batch["pixel_values"].shape[0]
    assert tiles > 1 and batch["pixel_values"].shape[1:] == (3, 112, 112)
    assert batch["image_sizes"].tolist() == [[100, 180]]
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == tiles * 16
    assert labelled_runs(batch, processor.tokenizer) == ["red<|im_end|>"]


def test_collator_pads_right_and_never_labels_padding(processor):
    short = {"conversations": [{"role": "user", "content": "What?"}, {"role": "assistant", "content": "red"}]}
    long = {"conversations": [{"role": "user", "content": "What colour was the circle?"},
                              {"role": "assistant", "content": "A red circle."}]}
    batch = VideoXLCollator(processor)([short, long])
    mask = batch["attention_mask"]
    assert mask[0, -1] == 0 and mask[0, 0] == 1 and mask[1].all()  # right padding, for training
    assert (batch["labels"][mask == 0] == IGNORE_INDEX).all()
    assert labelled_runs(batch, processor.tokenizer, row=0) == ["red<|im_end|>"]


def test_collator_refuses_samples_it_cannot_use_faithfully(processor):
    sample = {"video": frames(), "conversations": [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "red"}]}
    with pytest.raises(ValueError, match="more than max_length=50"):
        VideoXLCollator(processor, num_frames=4, max_length=50)([sample])
    with pytest.raises(ValueError, match="turn content must be a string"):
        VideoXLCollator(processor)([{"conversations": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]}])


def test_read_jsonl_resolves_relative_media(tmp_path):
    lines = [{"video": "a.mp4", "conversations": []}, {"image": ["x.png", "/abs/y.png"], "conversations": []},
             {"video": "https://host/v.mp4", "conversations": []}]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    samples = list(read_jsonl(tmp_path / "data.jsonl"))
    assert samples[0]["video"] == str(tmp_path / "a.mp4")
    assert samples[1]["image"] == [str(tmp_path / "x.png"), "/abs/y.png"]
    assert samples[2]["video"] == "https://host/v.mp4"
    assert list(read_jsonl(tmp_path / "data.jsonl", media_root="/media"))[0]["video"] == "/media/a.mp4"


# ---- scripts/finetune.py: Trainer in this process, the command line, two processes ----------------------------------


def collated(processor, data: Path) -> list[dict]:
    collator = VideoXLCollator(processor)
    return [collator([sample]) for sample in read_jsonl(data)]


@pytest.mark.slow
def test_trainer_run_lowers_the_loss_and_its_checkpoint_loads_and_generates(assets, processor, tmp_path):
    batches = collated(processor, assets.data)
    initial = mean_loss(AutoModelForCausalLM.from_pretrained(assets.model, trust_remote_code=True), batches)
    options = ["--model", str(assets.model), "--data", str(assets.data), "--learning_rate", "1e-2", "--max_steps", "9",
               "--warmup_steps", "0", "--save_steps", "3", "--logging_steps", "3", "--save_total_limit", "2"]
    trainer = finetune.main([*options, "--output_dir", str(tmp_path)])
    trained = mean_loss(trainer.model, batches)
    assert trained < initial - 1.0, (initial, trained)  # from about ln(vocab) = 5.0 to about 3.3

    checkpoint = tmp_path / "checkpoint-9"
    assert sorted(path.name for path in tmp_path.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-9"]  # the limit
    assert CODE_FILES | PROCESSOR_FILES <= {path.name for path in checkpoint.iterdir()}
    assert CODE_FILES | PROCESSOR_FILES <= {path.name for path in tmp_path.iterdir()}
    loaded = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batches[0]).logits, trainer.model(**batches[0]).logits, atol=0, rtol=0)
    answer = generate_answer(loaded, AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True),
                             assets.folder / "clip0.mp4")
    assert 1 <= len(answer) <= 3
    assert torch.equal(answer, generate_answer(trainer.model.eval(), processor, assets.folder / "clip0.mp4"))


@pytest.mark.slow
def test_resumed_trainer_run_ends_where_the_uninterrupted_run_ends(assets, tmp_path):
    """Ratios drawn per window depend on the step, not on the run's history: resuming at step 3 of 6 (random
    ratios, shuffled data) gives bit-identical weights."""
    options = ["--model", str(assets.model), "--data", str(assets.data), "--learning_rate", "1e-2", "--max_steps", "6",
               "--warmup_steps", "0", "--save_steps", "3"]
    straight = finetune.main([*options, "--output_dir", str(tmp_path / "straight")]).model.state_dict()
    resumed = finetune.main([*options, "--output_dir", str(tmp_path / "resumed"),
                             "--resume_from_checkpoint", str(tmp_path / "straight" / "checkpoint-3")]).model.state_dict()
    assert all(torch.equal(resumed[name], straight[name]) for name in straight)


@pytest.mark.slow
def test_command_line_under_torchrun_keeps_ratios_in_step_and_saves_a_mergeable_adapter(assets, processor, tmp_path):
    """scripts/finetune.py in two processes (torchrun, gloo on CPU): LoRA with activation checkpointing and --merge.

    The ranks' samples hold 0, 2 or 3 windows and never the same count at once: each micro-batch's ratios on one
    rank must begin the other's. The adapter and the merged model must give the same logits."""
    out, logs = tmp_path / "out", tmp_path / "ratios"
    relative_model = os.path.relpath(assets.model, tmp_path)  # as typed by a user in tmp_path
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(REPO_ROOT / "scripts" / "finetune.py"), "--model", relative_model, "--data", str(assets.data),
                    "--output_dir", str(out), "--train", "lora", "--merge", f"--{finetune.ACTIVATION_CHECKPOINTING}",
                    "--max_steps", "3", "--gradient_accumulation_steps", "2", "--learning_rate", "1e-2",
                    "--save_steps", "100", "--log-ratios", str(logs)],
                   check=True, cwd=tmp_path, env=subprocess_env(tmp_path))

    ranks = [[json.loads(line) for line in (logs / f"ratios.rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert [line["step"] for line in ranks[0]] == [line["step"] for line in ranks[1]] == [1, 2, 3]
    pairs = [(a, b) for s0, s1 in zip(*ranks) for a, b in zip(s0["ratios"], s1["ratios"], strict=True)]
    assert len(pairs) == 6 and all(len(a) != len(b) for a, b in pairs)
    assert sum(bool(a and b) for a, b in pairs) >= 2  # both ranks drew in some micro-batches
    for a, b in pairs:
        shorter, longer = sorted((a, b), key=len)
        assert longer[: len(shorter)] == shorter and set(longer) <= {2, 4, 8}

    assert {"adapter_config.json", "adapter_model.safetensors"} | PROCESSOR_FILES <= {p.name for p in out.iterdir()}
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(assets.model.resolve())  # loads from any folder
    assert CODE_FILES | PROCESSOR_FILES <= {path.name for path in (out / "merged").iterdir()}
    batch = collated(processor, assets.data)[0]
    merged = AutoModelForCausalLM.from_pretrained(out / "merged", trust_remote_code=True).eval()
    base = AutoModelForCausalLM.from_pretrained(assets.model, trust_remote_code=True).eval()
    with torch.no_grad():
        untrained = base(**batch).logits
        adapted = PeftModel.from_pretrained(base, out).eval()  # wraps `base` in place
        torch.testing.assert_close(merged(**batch).logits, adapted(**batch).logits, atol=1e-5, rtol=1e-5)
        assert (merged(**batch).logits - untrained).abs().max() > 1e-4  # it did train
    assert 1 <= len(generate_answer(merged, processor, assets.folder / "clip1.mp4")) <= 3


def test_ratio_options_are_checked_before_training():
    model = tiny_model()
    finetune.configure_ratios(model, [2, 16], None)
    assert model.config.beacon_train_ratios == [2, 16]
    with pytest.raises(ValueError, match="allowed values"):
        finetune.configure_ratios(model, None, 3)
    with pytest.raises(ValueError, match="allowed values"):
        finetune.configure_ratios(model, [4, 32], None)


# ---- the command line ------------------------------------------------------------------------------------------------


def test_command_line_takes_every_trainer_flag_and_the_projects_options(capsys):
    project, training = finetune.parse_args([
        "--model", "m", "--data", "d.jsonl", "--num-frames", "8", "--ratios", "2", "4", "--max-length", "900",
        "--output_dir", "out", "--save_total_limit", "2", "--report_to", "none", "--gradient_accumulation_steps", "4",
        f"--{finetune.ACTIVATION_CHECKPOINTING}", "--fsdp", "full_shard auto_wrap", "--seed", "7",
    ])
    assert (project.model, project.data, project.num_frames, project.ratios, project.max_length) == (
        "m", "d.jsonl", 8, [2, 4], 900)
    assert (training.output_dir, training.save_total_limit, training.gradient_accumulation_steps, training.seed) == (
        "out", 2, 4, 7)
    assert getattr(training, finetune.ACTIVATION_CHECKPOINTING) and training.fsdp
    assert isinstance(training, TrainingArguments) and training.report_to == []

    assert finetune.check_sharded_batch(training)
    with pytest.raises(ValueError, match="need --per_device_train_batch_size 1 here"):
        finetune.check_sharded_batch(finetune.parse_args([
            "--model", "m", "--data", "d.jsonl", "--fsdp", "full_shard auto_wrap", "--per_device_train_batch_size", "2",
        ])[1])

    defaults = finetune.parse_args(["--model", "m", "--data", "d.jsonl", "--ratio", "4"])[1]
    assert (defaults.learning_rate, defaults.lr_scheduler_type, defaults.warmup_steps) == (1e-5, "cosine", 0.03)
    assert defaults.per_device_train_batch_size == 1 and not defaults.remove_unused_columns
    assert finetune.parse_args(["--model", "m", "--data", "d.jsonl", "--num_frames", "8"])[0].num_frames == 8
    with pytest.raises(ValueError, match="--merge only applies to --train lora"):
        finetune.parse_args(["--model", "m", "--data", "d.jsonl", "--merge"])
    with pytest.raises(SystemExit):  # argparse's own error, which lists the choices
        finetune.parse_args(["--model", "m", "--data", "d.jsonl", "--train", "vision"])
    assert "invalid choice: 'vision' (choose from 'all', 'llm', 'vst', 'projector', 'lora')" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["llm", "lora"])
def test_checkpointing_keeps_a_frozen_vision_tower_out_of_the_graph_with_the_same_gradients(mode):
    """Enabling activation checkpointing makes CLIP's patch embeddings require grad (transformers hooks the input
    embeddings of every sub-model) and checkpoints CLIP's layers, which then keep their inputs: a frozen tower would
    hold activations for every window. The callback removes both; the gradients stay those of the plain model."""
    ids, pixels = video_prompt(8), random_frames(8)
    labels = answer_labels(ids, 3)

    def run(checkpointing: bool, callback: bool) -> tuple[bool, dict]:
        model = finetune.select_trainable(tiny_model(), SimpleNamespace(train=mode, lora_r=4, lora_alpha=8,
                                                                        lora_dropout=0.0)).train()
        if checkpointing:
            getattr(model, f"{finetune.ACTIVATION_CHECKPOINTING}_enable")()
        if callback:
            args = SimpleNamespace(**{finetune.ACTIVATION_CHECKPOINTING: True,
                                      f"{finetune.ACTIVATION_CHECKPOINTING}_kwargs": None})
            finetune.CheckpointOnlyWhatTrains().on_train_begin(args, None, None, model=model)
        recorded = []
        tower = finetune.core_model(model).vision_tower
        tower.register_forward_hook(lambda module, inputs, output: recorded.append(output.requires_grad))
        clip_layers = tower.vision_tower.vision_model.encoder.layers
        if callback:
            assert not any(layer.gradient_checkpointing for layer in clip_layers)
        elif checkpointing:
            assert all(layer.gradient_checkpointing for layer in clip_layers)
        model(ids, pixel_values_videos=pixels, labels=labels, compression_ratio=4).loss.backward()
        return any(recorded), grads_of(model)

    plain_records, plain = run(checkpointing=False, callback=False)
    hooked_records, _ = run(checkpointing=True, callback=False)
    fixed_records, fixed = run(checkpointing=True, callback=True)
    assert (plain_records, hooked_records, fixed_records) == (False, True, False)
    assert plain.keys() == fixed.keys() and len(plain) > 0
    for name in plain:
        torch.testing.assert_close(fixed[name], plain[name], atol=1e-7, rtol=1e-5, msg=name)


@pytest.mark.slow
def test_training_memory_benchmark_runs_one_step_per_point(tmp_path):
    """benchmarks/train_memory.py (a benchmark, not a test of speed): one point of the tiny preset end to end."""
    from benchmarks.train_memory import main, markdown_table

    out = tmp_path / "train_memory.json"
    assert main(["--size", "tiny", "--frames", "4", "--trainable", "lora", "--checkpointing", "on",
                 "--json", str(out)]) == 0
    [record] = json.loads(out.read_text())["records"]
    assert "skipped" not in record, record
    assert record["peak_mb"] >= record["base_mb"] > 0 and record["step_s"] > 0
    assert 0 < record["trainable_params"] < 100_000  # the adapters only
    assert "| lora | on | 4 |" in markdown_table([record])
