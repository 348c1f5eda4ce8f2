"""quantize="int8": int8 weight-only linear layers (latentmem.quantize) against a plain
computation with the dequantised weights, and the models it gives (issue 21)."""

from __future__ import annotations

import pytest
import torch
from conftest import CORPUS, filled_memory, tiny_lm
from torch import nn

from latentmem.quantize import Int8WeightOnlyLinear, quantize_int8


@pytest.mark.parametrize("bias", [False, True])
def test_layer_matches_its_dequantised_weights(bias):
    torch.manual_seed(0)
    lin = nn.Linear(64, 48, bias=bias)
    q = Int8WeightOnlyLinear(lin)
    # by hand: per-row symmetric int8, scale = max|row| / 127
    w = lin.weight.detach()
    scale = w.abs().amax(1) / 127
    ints = torch.round(w / scale[:, None]).clamp(-127, 127)
    assert torch.equal(q.weight_int8, ints.to(torch.int8))
    assert (q.dequantized().float() - w).abs().max() <= scale.max() * 0.51 + 1e-2  # half a step (bf16 scales)
    x = torch.randn(3, 5, 64)
    ref = x.bfloat16().float() @ q.dequantized().float().T + (lin.bias.detach().bfloat16().float() if bias else 0)
    out = q(x)
    assert out.shape == (3, 5, 48) and out.dtype == x.dtype
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)
    with pytest.raises(TypeError, match="int8"):
        q.weight


def test_quantized_model_keeps_memory_and_close_logits():
    lm = tiny_lm(seed=2)
    mem = filled_memory(lm, texts=tuple(CORPUS[:2]))
    ref = lm.backbone_logits(lm.encode(CORPUS[3])).detach().float()
    ref_answer = lm.generate(mem, "The meeting", max_new_tokens=5)
    model_id = lm.model_id
    n = quantize_int8(lm.model)
    cfg = lm.model.config
    assert n == cfg.num_hidden_layers * 7 + 1  # q k v o gate up down per layer, and the head
    assert lm.model.dtype == torch.float32 and lm.model_id == model_id
    assert lm.model.model.embed_tokens.weight.dtype == torch.float32  # kept as a float table
    out = lm.backbone_logits(lm.encode(CORPUS[3])).detach().float()
    # int8 weights + bf16 activations stay close to fp32 on a random tiny model
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    mem16 = lm.new_memory()
    lm.inject(mem16, CORPUS[0])  # writing works under int8, into an fp32 pool like the fp32 model's
    assert mem16.memory.dtype == torch.float32 and mem16.update_count >= 1
    assert lm.generate(mem, "The meeting", max_new_tokens=3).token_ids  # a pool written under fp32 reads
    g = lm.generate(mem16, "The meeting", max_new_tokens=5)
    assert len(g.token_ids) >= 1
    del mem, ref_answer


def test_load_options_are_checked():
    import latentmem

    with pytest.raises(ValueError, match="quantize must be"):
        latentmem.load(quantize="int4")
    with pytest.raises(ValueError, match="leave dtype out"):
        latentmem.load(quantize="int8", dtype=torch.float16)
    with pytest.raises(ValueError, match="CPU path"):
        latentmem.load(quantize="int8", device="cuda")


@pytest.mark.default_model
def test_default_model_int8_answers_like_fp32():
    import latentmem

    fact = "The launch of the new rocket is planned for 14 March in Kourou, French Guiana."
    answers, sizes = [], []
    for options in ({}, {"quantize": "int8"}):
        lm = latentmem.load(**options)
        mem = lm.new_memory()
        lm.inject(mem, fact)
        answers.append(lm.generate(mem, "When is the launch?", max_new_tokens=8).text)
        sizes.append(lm.info().details["weights_bytes"])
    assert "14 March" in answers[0] and "14 March" in answers[1]
    assert sizes[1] < 0.5 * sizes[0]


@pytest.mark.default_model
def test_half_precision_loads_keep_the_fp32_model_id():
    """The shipped weights are merged in fp32 whatever the dtype, so a bf16 load has the fp32
    model's id (and accepts its memories). (fp16 can still differ: fp32 -> fp16 -> bf16 rounds
    twice in the id's samples; changing the id's recipe would orphan saved memories.)"""
    import latentmem

    ids = {str(d): latentmem.load(dtype=d).model_id for d in (torch.float32, torch.bfloat16)}
    assert len(set(ids.values())) == 1, ids
    lm = latentmem.load(dtype=torch.bfloat16)
    assert lm.model.dtype == torch.bfloat16 and lm.model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
