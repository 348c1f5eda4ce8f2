"""What the evaluations and benchmarks need from a design beyond reading and writing, checked on
MemoryLLM against plain computations: the size facts of ``info().details``, ``health`` and the
hook for backbone-editing baselines (``editable_weight`` + ``backbone_logits``)."""

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import CORPUS, filled_memory, make_tokenizer, ref_logits, tiny_lm, tiny_model
from latentmem.eval.common import model_info
from latentmem.memoryllm.lm import MemoryLM

torch.set_num_threads(1)


def test_size_details_match_the_tensors_a_read_holds():
    lm = tiny_lm()
    c = lm.model.config
    empty = lm.new_memory(seed=0)
    mem = filled_memory(lm)
    d_none, d_empty, d = lm.info().details, lm.info(empty).details, lm.info(mem).details
    kv = lm.prefix([mem])  # what a read of this memory caches
    cache_bytes = sum(t.numel() * t.element_size() for t in [*kv.k, *kv.v])
    assert d["read_cache_bytes"] == cache_bytes
    positions = kv.k[0].shape[-2]  # bos + N
    assert positions == c.num_memory_tokens + 1
    assert d["kv_bytes_per_token"] * positions == cache_bytes
    assert d["read_state_bytes"] == mem.memory.numel() * mem.memory.element_size() + cache_bytes
    assert d_none["read_cache_bytes"] == d_none["read_state_bytes"] == 0
    assert d_empty["read_cache_bytes"] == d_empty["read_state_bytes"] == 0  # nothing written: nothing read
    assert d["weights_bytes"] == sum(t.numel() * t.element_size() for t in [*lm.model.parameters(), *lm.model.buffers()])
    assert d["context_window"] == c.max_position_embeddings
    assert (d["layers"], d["min_inject_tokens"], d["max_inject_tokens"]) == (c.num_hidden_layers, c.min_inject_tokens, c.max_inject_tokens)
    json.dumps(lm.info(mem).to_dict())  # JSON-able


def test_model_info_keeps_its_keys_and_reports_applied_weights():
    lm = tiny_lm()
    c = lm.model.config
    info = model_info(lm)
    assert {k: info[k] for k in ("layers", "hidden_size", "N", "K", "max_inject_tokens")} == {
        "layers": c.num_hidden_layers, "hidden_size": c.hidden_size, "N": c.num_memory_tokens, "K": c.num_tokens, "max_inject_tokens": c.max_inject_tokens,
    }
    assert info["parameters_M"] == round(sum(p.numel() for p in lm.model.parameters()) / 1e6, 2)
    assert info["dtype"] == "float32" and info["design"] == "memoryllm"
    assert "trained_memory_weights" not in info and "applied_weights" not in info  # a model without shipped weights
    lm.model.applied_weights = None  # the embedded default loaded untrained
    assert model_info(lm)["trained_memory_weights"] is False and model_info(lm)["applied_weights"] is None
    lm.model.applied_weights = {"file": "trained.safetensors"}
    assert model_info(lm)["trained_memory_weights"] is True and model_info(lm)["applied_weights"] == {"file": "trained.safetensors"}


def _plain_health(memory: torch.Tensor, provenance: torch.Tensor, prev, since: int) -> dict:
    """The health numbers written out on the pool's tensors (float64, NaN/Inf counted as zero)."""
    m = memory.double()
    bad = ~torch.isfinite(m)
    m = m.masked_fill(bad, 0.0)
    per_layer = torch.stack([torch.stack([row.norm() for row in layer]).mean() for layer in m])
    out = {"layer_norm": per_layer.tolist(), "mean_norm": float(per_layer.mean()), "max_abs": float(m.abs().max()), "nonfinite": int(bad.sum()), "replaced_since_start": float((provenance > since).double().mean())}
    if prev is not None:
        pm, pp = prev
        out["drift"] = float((m - pm).norm() / pm.norm())
        out["rewritten_since_last_check"] = float((provenance != pp).double().mean())
    return out, (m, provenance.clone())


def _assert_health(h: dict, ref: dict) -> None:
    assert h["nonfinite"] == ref["nonfinite"]
    assert h["layer_norm"] == pytest.approx(ref["layer_norm"], abs=1e-5)
    for k in ("mean_norm", "max_abs", "replaced_since_start", "drift", "rewritten_since_last_check"):
        if k in ref:
            assert h[k] == pytest.approx(ref[k], abs=1e-5), k


def test_health_matches_a_plain_computation_on_the_pool():
    lm = tiny_lm()
    mem = lm.new_memory(seed=0)
    h0, snap = lm.health(mem)
    assert h0["drift"] is None and h0["rewritten_since_last_check"] is None and h0["mean_norm"] == 0 and h0["nonfinite"] == 0
    lm.inject(mem, CORPUS[0])
    h1, snap = lm.health(mem, snap)
    assert h1["drift"] is None  # no relative change from an all-zero pool
    assert h1["rewritten_since_last_check"] == 1.0  # the first write tiles every slot
    ref_prev = (mem.memory.double().clone(), mem.provenance.clone())
    for t in CORPUS[1:4]:
        lm.inject(mem, t)
    h2, snap = lm.health(mem, snap, since_injection=1)
    ref, _ = _plain_health(mem.memory, mem.provenance, ref_prev, since=1)
    _assert_health(h2, ref)
    assert 0 < h2["rewritten_since_last_check"] < 1 and 0 < h2["drift"]
    json.dumps(h2)
    # non-finite values are counted and left out of the norms
    broken = mem.clone()
    broken.memory[0, 3, 1] = float("nan")
    broken.memory[1, 5, 0] = float("inf")
    hb, _ = lm.health(broken)
    refb, _ = _plain_health(broken.memory, broken.provenance, None, since=0)
    assert hb["nonfinite"] == 2
    _assert_health(hb, refb)


def test_backbone_logits_and_their_loss_match_the_float64_reference():
    lm = tiny_lm()
    ids = lm.encode(CORPUS[1])
    logits = lm.backbone_logits(ids)
    assert logits.requires_grad and logits.shape == (len(ids), lm.model.config.vocab_size)
    ref = ref_logits(lm.model, ids)  # no memory: the base model, float64
    torch.testing.assert_close(logits.detach().double(), ref, rtol=1e-4, atol=1e-4)
    n = 5
    target = torch.tensor(ids[-n:])
    loss = F.cross_entropy(logits[-n - 1 : -1].float(), target)
    ref_loss = -torch.log_softmax(ref[-n - 1 : -1], -1).gather(-1, target[:, None]).mean()
    assert float(loss.detach()) == pytest.approx(float(ref_loss), abs=1e-4)
    with torch.no_grad():  # autograd is on inside, whatever the caller's mode
        assert lm.backbone_logits(ids).requires_grad


def test_editable_weight_is_the_live_mlp_output_projection_and_gets_the_loss_gradient():
    lm64 = MemoryLM(tiny_model().double(), make_tokenizer(), name="tiny64")
    layer = 1
    w = lm64.editable_weight(layer)
    assert w is lm64.model.model.layers[layer].mlp.down_proj.weight
    with pytest.raises(ValueError):
        lm64.editable_weight(lm64.info().details["layers"])
    ids = lm64.encode(CORPUS[3])
    n = 4
    target = torch.tensor(ids[-n:])

    def loss() -> torch.Tensor:
        return F.cross_entropy(lm64.backbone_logits(ids)[-n - 1 : -1], target)

    (grad,) = torch.autograd.grad(loss(), [w])
    direction = torch.randn(w.shape, generator=torch.Generator().manual_seed(0), dtype=w.dtype)
    eps = 1e-3  # parts of the backbone (norms) compute in float32: a smaller step drowns in rounding
    with torch.no_grad():
        w += eps * direction
        up = float(loss())
        w -= 2 * eps * direction
        down = float(loss())
        w += eps * direction
    assert float((grad * direction).sum()) == pytest.approx((up - down) / (2 * eps), rel=1e-3)
    # a write to the weight changes what the model computes: the weight is live
    before = lm64.backbone_logits(ids).detach()
    with torch.no_grad():
        w.add_(0.5)
    assert not torch.allclose(lm64.backbone_logits(ids).detach(), before)


def test_ftl_edits_only_its_weight_within_the_bound_and_leaves_no_gradients():
    from latentmem.eval.editing import FTL

    lm = tiny_lm()
    named = dict(lm.model.named_parameters())
    flags = {k: p.requires_grad for k, p in named.items()}
    before = {k: p.detach().clone() for k, p in named.items()}
    eps = 1e-2
    ft = FTL(lm, layer=0, steps=3, lr=0.1, eps=eps)
    loss = ft.apply({"prompt": "Paris is the capital of", "new": "Italy"})
    assert loss == loss  # not NaN
    changed = [k for k, p in named.items() if not torch.equal(p.detach(), before[k])]
    assert changed == ["model.layers.0.mlp.down_proj.weight"]
    delta = named[changed[0]].detach() - before[changed[0]]
    assert float(delta.abs().max()) <= eps + 1e-7
    assert all(p.grad is None for p in named.values())
    assert {k: p.requires_grad for k, p in named.items()} == flags
    ft.restore()
    assert torch.equal(named[changed[0]].detach(), before[changed[0]])


def test_random_adapters_helper_gives_a_working_model_with_its_own_id():
    pytest.importorskip("peft")
    from latentmem.memoryllm.bench import with_random_adapters

    plain = tiny_lm()
    ids = plain.encode(CORPUS[2])
    base = plain.backbone_logits(ids).detach()
    branches = with_random_adapters(tiny_lm(), merge_read=False, seed=0)
    merged = with_random_adapters(tiny_lm(), merge_read=True, seed=0)
    assert merged.model_id != plain.model_id  # the reader folded into the weights the id samples
    read_b, read_m = branches.backbone_logits(ids).detach(), merged.backbone_logits(ids).detach()
    assert not torch.allclose(read_b, base)
    torch.testing.assert_close(read_m, read_b, rtol=1e-4, atol=1e-4)  # the same reader, folded into the weights
    for lm in (branches, merged):
        mem = lm.new_memory(seed=0)
        lm.inject(mem, CORPUS[0])
        g = lm.generate(mem, "Question: where? Answer:", chat=False, max_new_tokens=3)
        assert g.prompt_tokens > 0
