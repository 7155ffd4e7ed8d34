"""The tiny model's training recipe: the extra loss on the needle's words reads the logits it means to."""

import torch

from demo.build_tiny_tokenizer import build_tiny_tokenizer
from scripts import train_tiny
from scripts.collator import VideoXLCollator


def test_needle_words_loss_scores_the_logits_that_predict_each_retrieval_answer(tmp_path):
    """In training the model computes logits only at labelled columns; the loss must still pick, for each retrieval
    row, the position right before its answer, score all four word groups there, and leave other kinds out."""
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
    assert (classes[[1, 3]] == -100).all() and (classes[[0, 2]] >= 0).all()

    with torch.no_grad():
        trained = model(**batch).logits  # the labelled columns only
        full = model(**{key: value for key, value in batch.items() if key != "labels"}).logits
    loss = train_tiny.needle_words_loss(trained, batch["labels"], classes, groups)

    expected = []
    for row in (0, 2):
        before_answer = (batch["labels"][row] != -100).nonzero()[0, 0] - 1
        logits = full[row, before_answer]
        expected.append([torch.nn.functional.cross_entropy(logits[group], classes[row, g])
                         for g, group in enumerate(groups)])
    torch.testing.assert_close(loss, torch.tensor(expected).mean(), rtol=1e-4, atol=1e-5)

    no_retrieval = torch.full_like(classes, -100)
    assert train_tiny.needle_words_loss(trained, batch["labels"], no_retrieval, groups).item() == 0.0
