"""The tiny model's training recipe: the extra losses read the logits and VST states they mean to, about the
needles the answer names or the VSTs show."""

import torch

from demo.build_tiny_tokenizer import build_tiny_tokenizer
from demo.synth import COUNTS, appearances, make_sample
from scripts import train_tiny
from scripts.collator import VideoXLCollator


def test_needle_words_loss_scores_the_logits_that_predict_each_answer_naming_a_needle(tmp_path):
    """In training the model computes logits only at labelled columns; the loss must still pick, for each retrieval
    and ordering row, the position right before its answer, score all four word groups there, and leave counting
    out."""
    tokenizer = build_tiny_tokenizer(tmp_path / "tokenizer")
    processor = train_tiny.tiny_processor(tokenizer)
    config = train_tiny.tiny_config(tokenizer)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = train_tiny.VideoXLForCausalLM(config).eval()
    words, groups = train_tiny.needle_word_groups(tokenizer)
    batches = train_tiny.NeedleBatches(VideoXLCollator(processor, fps=1.0, video_fps=1.0), words, groups)
    kinds = ["retrieval", "counting", "retrieval", "ordering"]  # answers of different lengths: different columns
    samples = [train_tiny.training_sample(5 + i, 10, kind) for i, kind in enumerate(kinds)]
    batch = batches([samples])
    batch.pop("needle_token_classes"), batch.pop("needle_token_counts")  # for the VST losses
    classes = batch.pop("needle_classes")
    assert (classes[1] == -100).all() and (classes[[0, 2, 3]] >= 0).all()

    with torch.no_grad():
        trained = model(**batch).logits  # the labelled columns only
        full = model(**{key: value for key, value in batch.items() if key != "labels"}).logits
    loss = train_tiny.needle_words_loss(trained, batch["labels"], classes, groups)

    expected = []
    for row in (0, 2, 3):
        before_answer = (batch["labels"][row] != -100).nonzero()[0, 0] - 1
        logits = full[row, before_answer]
        expected.append([torch.nn.functional.cross_entropy(logits[group], classes[row, g])
                         for g, group in enumerate(groups)])
    torch.testing.assert_close(loss, torch.tensor(expected).mean(), rtol=1e-4, atol=1e-5)

    no_needle = torch.full_like(classes, -100)
    assert train_tiny.needle_words_loss(trained, batch["labels"], no_needle, groups).item() == 0.0


def test_training_counts_and_orders_appearances_a_viewer_would_count():
    """The training data follows the one-answer rule too: in every frame the collator feeds (all of them, fps=1),
    a counted object appears as many separate times as its answer says, an ordered object once; also in the
    shortest videos (8 frames, where four counted copies only just fit)."""
    seen = set()
    for seed in range(40):
        for sample in train_tiny.training_group(seed, progress=0.1, size=8):
            shown = range(len(sample["video"]))
            kind_answer = sample["conversations"][1]["value"]
            times = appearances(sample["shown"], shown)
            if kind_answer in COUNTS:
                assert times == {sample["shown"][0].describe(): int(kind_answer)}
                seen.add((len(sample["video"]), int(kind_answer)))
            else:
                assert set(times.values()) == {1}
    assert (8, 4) in seen


def test_an_ordering_answer_names_the_object_that_came_first_or_last():
    """The needle whose words the loss asks for is the one the answer names, at the end of time the question asks."""
    for seed in range(8):
        sample = make_sample(seed, 20, "ordering", digit_prob=0.0)
        needle = train_tiny.answered_needle(sample)
        assert needle.describe() == sample.answer_text
        starts = sorted(n.frames[0] for n in sample.needles)
        asked_first = "first" in sample.prompt
        assert needle.frames[0] == (starts[0] if asked_first else starts[-1])
    assert train_tiny.answered_needle(make_sample(0, 20, "counting")) is None
    retrieval = make_sample(0, 20, "retrieval")
    assert train_tiny.answered_needle(retrieval) is retrieval.needles[0]


def tiny_setup(tmp_path):
    tokenizer = build_tiny_tokenizer(tmp_path / "tokenizer")
    processor = train_tiny.tiny_processor(tokenizer)
    config = train_tiny.tiny_config(tokenizer)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = train_tiny.VideoXLForCausalLM(config)
    words, groups = train_tiny.needle_word_groups(tokenizer)
    batches = train_tiny.NeedleBatches(VideoXLCollator(processor, fps=1.0, video_fps=1.0), words, groups)
    count_tokens = [train_tiny.answer_tokens(tokenizer, count)[0] for count in COUNTS]
    return model, batches, groups, count_tokens


def test_each_vst_is_marked_with_the_needle_its_own_tokens_show(tmp_path):
    """Over windows of different ratios, the VSTs marked for a needle are those that close one of the tokens the
    needle touches, on its own frames: one VST per needle frame at r = 16, one per touched group of r tokens below."""
    model, batches, groups, _ = tiny_setup(tmp_path)
    samples = [train_tiny.training_sample(40 + i, 28, kind) for i, kind in enumerate(["counting", "ordering"])]
    batch = batches([samples])
    shown, counts = batch["needle_token_classes"], batch["needle_token_counts"]  # [2, 28 frames * 16(, 4)]
    window = model.config.beacon_window
    ratios = [2, 16, 4]
    per_vst = train_tiny.vst_classes(shown, ratios, window)
    per_vst_counts = train_tiny.vst_classes(counts, ratios, window)
    assert per_vst.shape == (2, window // 2 + window // 16 + (28 * 16 - 2 * window) // 4, 4)

    spans = []  # the visual tokens [a, b) each VST closes, window after window
    for start, r in zip(range(0, 28 * 16, window), ratios):
        spans += [(a, a + r) for a in range(start, min(start + window, 28 * 16), r)]
    for row, sample in enumerate(samples):
        frames = sorted(f for needle in sample["shown"] for f in needle.frames)
        expected = set()
        for needle in sample["shown"]:
            _, touched = train_tiny.needle_tokens(needle.box)
            tokens = {f * 16 + t for f in needle.frames for t in touched}
            expected |= {v for v, (a, b) in enumerate(spans) if tokens & set(range(a, b))}
        marked = (per_vst[row, :, 0] >= 0).nonzero().squeeze(1).tolist()
        assert set(marked) == expected
        assert sorted({spans[v][0] // 16 for v in marked}) == frames
        for v in marked:
            assert (per_vst[row, v] == shown[row, spans[v][0] : spans[v][1]].amax(dim=0)).all()
            assert per_vst_counts[row, v] == frames.index(spans[v][0] // 16) + 1  # needles so far, its own included
        assert (per_vst_counts[row][per_vst[row, :, 0] < 0] == -100).all()


def test_the_trainer_adds_the_vst_losses_over_the_vsts_the_last_layer_reads(tmp_path):
    """The trainer's loss is the model's loss plus `needle_words_loss`, `vst_words_loss` and `running_count_loss`,
    the VST ones taken on the VST rows of the last layer's input with the ratios the forward drew."""
    model, batches, groups, count_tokens = tiny_setup(tmp_path)
    samples = [train_tiny.training_sample(60 + i, 18, kind) for i, kind in enumerate(["counting", "retrieval"])]
    batch = batches([samples])
    args = train_tiny.TrainingArguments(output_dir=str(tmp_path / "trainer"), report_to=[], use_cpu=True)
    trainer = train_tiny.NeedleTrainer(model=model, args=args, groups=groups, count_tokens=count_tokens)
    model.model.ratio_schedule.reseed(3)
    loss = trainer.compute_loss(model, dict(batch))

    model.model.ratio_schedule.reseed(3)
    plain = {key: value for key, value in batch.items() if not key.startswith("needle")}
    out = model(**plain, output_hidden_states=True)
    (ratios,) = model.model.ratio_schedule.take_recorded()
    window = model.config.beacon_window
    per_vst = train_tiny.vst_classes(batch["needle_token_classes"], ratios, window)
    counts = train_tiny.vst_classes(batch["needle_token_counts"], ratios, window)
    first = int((batch["input_ids"][0] == model.config.video_token_id).nonzero()[0])
    states = out.hidden_states[-2][:, first : first + per_vst.shape[1]]
    embeddings = model.get_input_embeddings().weight
    expected = (out.loss + train_tiny.needle_words_loss(out.logits, batch["labels"], batch["needle_classes"], groups)
                + train_tiny.vst_words_loss(states, embeddings, per_vst, groups)
                + train_tiny.running_count_loss(states, embeddings, counts, count_tokens))
    torch.testing.assert_close(loss, expected)


def test_the_vst_losses_rank_states_that_name_their_own_needle_and_count_first(tmp_path):
    """States built from the right words score lower than the same states shifted by one VST; VSTs that show no
    needle are not scored."""
    model, batches, groups, count_tokens = tiny_setup(tmp_path)
    samples = [train_tiny.training_sample(60 + i, 18, kind) for i, kind in enumerate(["counting", "ordering"])]
    batch = batches([samples])
    ratios = [16, 4]
    per_vst = train_tiny.vst_classes(batch["needle_token_classes"], ratios, model.config.beacon_window)
    counts = train_tiny.vst_classes(batch["needle_token_counts"], ratios, model.config.beacon_window)
    assert set(counts[0][counts[0] >= 0].tolist()) == {1, 2, 3, 4}  # four counted copies
    assert set(counts[1][counts[1] >= 0].tolist()) == {1, 2}  # an ordering pair
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        hidden = embeddings.shape[1]
        naming = torch.zeros(*per_vst.shape[:2], hidden)
        counting = torch.zeros(*per_vst.shape[:2], hidden)
        for b, v in (per_vst[..., 0] >= 0).nonzero().tolist():
            naming[b, v] = sum(embeddings[group[c]] for group, c in zip(groups, per_vst[b, v].tolist()))
            counting[b, v] = embeddings[count_tokens[counts[b, v] - 1]]
        right = train_tiny.vst_words_loss(naming, embeddings, per_vst, groups)
        shifted = train_tiny.vst_words_loss(naming.roll(1, dims=1), embeddings, per_vst, groups)
        counted = train_tiny.running_count_loss(counting, embeddings, counts, count_tokens)
        miscounted = train_tiny.running_count_loss(counting.roll(1, dims=1), embeddings, counts, count_tokens)
        elsewhere_noise = torch.where(per_vst[..., :1] >= 0, naming, torch.randn_like(naming))
    assert right < shifted
    assert counted < miscounted
    torch.testing.assert_close(train_tiny.vst_words_loss(elsewhere_noise, embeddings, per_vst, groups), right)
    silent = torch.full_like(counts, -100)
    assert train_tiny.running_count_loss(counting, embeddings, silent, count_tokens).item() == 0.0
