"""An attention mask pads a prompt on the left or the right, never inside it: a hole (a 0 between 1s, e.g. over a
video's columns) and a sample without a token are refused with an error naming the sample."""

import pytest
import torch

from tests.conftest import random_frames, tiny_model, video_prompt


FRAMES = 4


def masked(ids, sample_holes):
    """Masks of ones for `ids` `[batch, seq]`, zero at `sample_holes` = {sample: columns}."""
    mask = torch.ones_like(ids)
    for sample, columns in sample_holes.items():
        mask[sample, columns] = 0
    return mask


def test_a_mask_that_hides_the_video_columns_is_refused():
    model, ids, pixels = tiny_model(), video_prompt(FRAMES), random_frames(FRAMES)
    video = (ids[0] == model.config.video_token_id).nonzero().squeeze(1)
    mask = masked(ids, {0: video})
    with pytest.raises(ValueError, match=rf"sample 0 has a hole: 0 at column {int(video[0])} between tokens"):
        model.generate(ids, attention_mask=mask, pixel_values_videos=pixels, max_new_tokens=2)
    with pytest.raises(ValueError, match="sample 0 has a hole"):
        model(ids, attention_mask=mask, pixel_values_videos=pixels)


def test_a_single_hole_in_one_sample_of_a_batch_is_refused_naming_it():
    model = tiny_model()
    ids = torch.tensor([[4, 10, 11, 12, 13], [4, 10, 11, 12, 13]])
    mask = masked(ids, {1: [2]})
    with pytest.raises(ValueError, match="sample 1 has a hole: 0 at column 2"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="sample 1 has a hole"):
        model(ids, attention_mask=mask)


def test_an_all_zero_mask_row_is_refused_as_such():
    model = tiny_model()
    ids = torch.tensor([[4, 10, 11, 12, 13], [4, 10, 11, 12, 13]])
    mask = masked(ids, {1: list(range(5))})
    with pytest.raises(ValueError, match="sample 1 is all zeros: that sample has no token") as error:
        model.generate(ids, attention_mask=mask, max_new_tokens=2)
    assert "right-padded" not in str(error.value)
    with pytest.raises(ValueError, match="sample 1 is all zeros"):
        model(ids, attention_mask=mask)


def test_left_and_right_padding_are_still_accepted():
    model = tiny_model()
    ids = torch.tensor([[0, 0, 4, 10, 11], [4, 10, 11, 12, 13]])
    left = masked(ids, {0: [0, 1]})
    out = model.generate(ids, attention_mask=left, max_new_tokens=3, do_sample=False)
    alone = model.generate(ids[:1, 2:], max_new_tokens=3, do_sample=False)
    assert out[0, ids.shape[1]:].tolist() == alone[0, 3:].tolist()
    right = masked(torch.tensor([[4, 10, 11, 0, 0]]), {0: [3, 4]})
    with torch.no_grad():
        padded = model(torch.tensor([[4, 10, 11, 0, 0]]), attention_mask=right).logits[:, :3]
        plain = model(torch.tensor([[4, 10, 11]])).logits
    torch.testing.assert_close(padded, plain)
