"""The tiny model's training recipe: the extra loss on the needle's words reads the logits it means to, about the
needle the answer names."""

import torch

from demo.build_tiny_tokenizer import build_tiny_tokenizer
from demo.synth import make_sample
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
