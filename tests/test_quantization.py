"""Quantized loading on CPU: quanto int8, bitsandbytes 8-bit and 4-bit answer video prompts as fp32 does.

The shipped demo model, loaded with `quantization_config=` from benchmarks/quantization.py's recipes, answers
synthetic needle videos greedy. The decoder's linears are quantized, the vision tower and projector are not
(`_keep_in_fp32_modules`), and each recipe's answers equal fp32's token for token, with the first answer token's
logits within a bound of fp32's (relative to their range).
"""

import pytest
import torch
from torch import nn

from benchmarks.quantization import answer, load, video_prompts, weight_mib
from demo.run import BUNDLED_MODEL
from demo.qa import load as load_fp32

FRAMES, VIDEOS, NEW_TOKENS = 20, 2, 6
# Max |logits - fp32 logits| over the fp32 logits' range; benchmarks/quantization.py measured 0.0018, 0.0031, 0.020.
LOGIT_ERROR = {"quanto-int8": 0.01, "bnb-int8": 0.015, "bnb-nf4": 0.08}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    _, processor = load_fp32(BUNDLED_MODEL)
    return video_prompts(processor, VIDEOS, FRAMES, tmp_path_factory.mktemp("videos"))


@pytest.fixture(scope="module")
def reference(prompts):
    model = load(BUNDLED_MODEL, "fp32")
    return [answer(model, inputs, NEW_TOKENS) for inputs in prompts]


@pytest.mark.parametrize("recipe", ["quanto-int8", "bnb-int8", "bnb-nf4"])
def test_quantized_model_answers_video_prompts_as_fp32(recipe, prompts, reference):
    model = load(BUNDLED_MODEL, recipe)
    decoder_linear = model.model.layers[0].self_attn.q_proj
    vision_linear = model.model.vision_tower.vision_tower.vision_model.encoder.layers[0].self_attn.q_proj
    assert type(decoder_linear) is not nn.Linear  # quantized
    assert type(vision_linear) is nn.Linear and vision_linear.weight.dtype == torch.float32
    assert weight_mib(model) < 0.8 * weight_mib(load(BUNDLED_MODEL, "fp32"))
    for inputs, (tokens, logits) in zip(prompts, reference):
        quantized_tokens, quantized_logits = answer(model, inputs, NEW_TOKENS)
        assert quantized_tokens.tolist() == tokens.tolist()
        error = float((quantized_logits - logits).abs().max() / (logits.max() - logits.min()))
        assert 0 < error < LOGIT_ERROR[recipe]
