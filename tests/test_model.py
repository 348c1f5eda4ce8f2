"""MemoryLLM's forward passes against independent references: transformers' own Llama / Qwen2
models while the memory is empty, and the slow float64 reference in conftest.py (explicit
attention over [bos, memory, input]) for reading and writing memory."""

from __future__ import annotations

import pytest
import torch
from conftest import hf_twin, make_tokenizer, ref_keep, ref_logits, ref_new_memory, ref_position_factor, tiny_model

from latentmem.memoryllm.model import tile_to, update_pool

torch.set_num_threads(1)  # tiny tensors: extra threads only fight over the shared CPU (300x slower)

# The fast path runs in float32 and the reference in float64.
REF_TOL = dict(rtol=1e-4, atol=1e-4)
# Batched vs one-row runs of the same float32 code differ only by summation order.
TIGHT = dict(rtol=1e-5, atol=1e-5)

# Small windows so that the releases' position scalings really shrink positions (factor < 1).
SCALINGS = {
    "none": {},
    "interpolate": dict(position_scaling="interpolate", max_position_embeddings=20),
    "linear": dict(position_scaling="linear", max_position_embeddings=20, max_input_tokens=32),
}


def random_ids(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, len(make_tokenizer()), (n,), generator=g)


def random_pool(model, seed: int, batch: int | None = None) -> torch.Tensor:
    """A pool [L, N, d] (or [B, L, N, d]) of the scale hidden states have in the tiny models."""
    cfg = model.config
    shape = (cfg.num_hidden_layers, cfg.num_memory_tokens, cfg.hidden_size)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(((batch,) if batch else ()) + shape, generator=g)


# --------------------------------------------------------------------------------------------
# Reading: an empty pool is the base model
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,overrides",
    [("llama", {}), ("llama", dict(num_key_value_heads=4)), ("llama", dict(num_key_value_heads=1)), ("qwen2", dict(qkv_bias=True))],
    ids=["llama-gqa", "llama-mha", "llama-mqa", "qwen2-qkv-bias"],
)
@torch.no_grad()
def test_empty_memory_is_exactly_the_base_model(kind, overrides):
    model = tiny_model(seed=1, **overrides)
    hf = hf_twin(model, kind)
    ids = torch.stack([random_ids(11, 0), random_ids(11, 1)])
    expected = hf(ids).logits
    torch.testing.assert_close(model(ids), expected)
    # an uninitialised pool passed in (as a tensor or as a prefix) is not attended at all
    pools = random_pool(model, 0, batch=2)
    torch.testing.assert_close(model(ids, memory=pools, initialized=False), expected)
    torch.testing.assert_close(model(ids, memory=model.memory_prefix(pools, initialized=False)), expected)


# --------------------------------------------------------------------------------------------
# Reading an initialised pool
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scaling", SCALINGS)
@pytest.mark.parametrize("overrides", [{}, dict(qkv_bias=True), dict(add_bos_embedding=False)], ids=["gqa", "qkv-bias", "no-bos"])
@torch.no_grad()
def test_reading_memory_matches_reference(scaling, overrides):
    model = tiny_model(seed=2, **SCALINGS[scaling], **overrides)
    if scaling != "none":
        assert ref_position_factor(model.config) < 1  # the scaling is really exercised
    pools = random_pool(model, 3, batch=2)
    ids = torch.stack([random_ids(9, 4), random_ids(9, 5)])
    logits = model(ids, memory=pools)
    for b in range(2):
        torch.testing.assert_close(logits[b].double(), ref_logits(model, ids[b], pools[b]), **REF_TOL)
    # not vacuous: reading memory does change the answer
    assert not torch.allclose(logits[0], model(ids[:1])[0], atol=1e-3)


@torch.no_grad()
def test_prefix_with_physical_positions_reads_the_logical_order():
    """A pool stored out of order (MemoryState's slots) reads the same when each row gets the RoPE
    position of its logical index."""
    model = tiny_model(seed=3)
    cfg = model.config
    logical = random_pool(model, 6)
    perm = torch.stack([torch.randperm(cfg.num_memory_tokens, generator=torch.Generator().manual_seed(l)) for l in range(cfg.num_hidden_layers)])
    physical = logical.gather(1, perm[..., None].expand(-1, -1, cfg.hidden_size))  # physical row i = logical perm[i]
    ids = random_ids(7, 7)[None]
    expected = model(ids, memory=logical[None])
    prefix = model.memory_prefix(physical[None], True, positions=perm[None])
    torch.testing.assert_close(model(ids, memory=prefix), expected, **TIGHT)


@torch.no_grad()
def test_left_padded_rows_equal_unpadded_rows():
    model = tiny_model(seed=4)
    pools = random_pool(model, 8, batch=3)
    lengths = [9, 4, 1]
    T = max(lengths)
    rows = [random_ids(n, 10 + n) for n in lengths]
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.bool)
    for b, r in enumerate(rows):
        ids[b, T - len(r) :], mask[b, T - len(r) :] = r, True
    logits = model(ids, mask, memory=pools)
    assert torch.isfinite(logits).all()  # padding rows must not produce NaN
    for b, r in enumerate(rows):
        alone = model(r[None], memory=pools[b : b + 1])[0]
        torch.testing.assert_close(logits[b, T - len(r) :], alone, **TIGHT)
        torch.testing.assert_close(alone.double(), ref_logits(model, r, pools[b]), **REF_TOL)


@torch.no_grad()
def test_mixed_batch_uninitialised_row_is_the_base_model():
    model = tiny_model(seed=5)
    pools = random_pool(model, 9, batch=2)
    ids = torch.stack([random_ids(6, 11), random_ids(6, 12)])
    logits = model(ids, memory=pools, initialized=torch.tensor([True, False]))
    torch.testing.assert_close(logits[0], model(ids[:1], memory=pools[:1])[0], **TIGHT)
    torch.testing.assert_close(logits[1], model(ids[1:])[0], **TIGHT)
    torch.testing.assert_close(logits[1].double(), ref_logits(model, ids[1]), **REF_TOL)


# --------------------------------------------------------------------------------------------
# Writing: the self-update's forward pass
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [20, 8, 3], ids=["n>K", "n==K", "n<K"])
@pytest.mark.parametrize("initialized", [True, False], ids=["pool", "empty"])
@pytest.mark.parametrize("overrides", [{}, SCALINGS["interpolate"], dict(add_bos_embedding=False, qkv_bias=True)], ids=["plain", "interpolate", "no-bos-bias"])
@torch.no_grad()
def test_new_memory_tokens_match_reference(n, initialized, overrides):
    model = tiny_model(seed=6, **overrides)
    K = model.config.num_tokens
    assert K == 8  # the ids above are written for K = 8
    pool = random_pool(model, 13)
    ids = random_ids(n, 14)
    new, count = model.new_memory_tokens(pool[None], initialized, ids[None])
    assert new.shape == (1, model.config.num_hidden_layers, K, model.config.hidden_size)
    expected = ref_new_memory(model, ids, pool if initialized else None)
    # An initialised pool always gets K tokens (Fig. 8: with n < K old memory tokens fill the
    # window); an empty pool gets the context's last min(n, K) outputs.
    assert int(count[0]) == (K if initialized else min(n, K)) == expected.shape[1]
    torch.testing.assert_close(new[0, :, K - int(count[0]) :].double(), expected, **REF_TOL)


@torch.no_grad()
def test_new_memory_positional_emb_marks_the_new_positions():
    """The learned marker changes the new tokens of an initialised pool (the reference test above
    checks where it goes); an empty pool runs the plain context, as the releases do."""
    model = tiny_model(seed=7)
    pool, ids = random_pool(model, 15)[None], random_ids(12, 16)[None]
    before_init, _ = model.new_memory_tokens(pool, True, ids)
    before_empty, _ = model.new_memory_tokens(pool, False, ids)
    model.new_memory_positional_emb.data.zero_()
    after_init, _ = model.new_memory_tokens(pool, True, ids)
    after_empty, _ = model.new_memory_tokens(pool, False, ids)
    assert not torch.allclose(before_init, after_init, atol=1e-3)
    torch.testing.assert_close(before_empty, after_empty, rtol=0, atol=0)


@torch.no_grad()
def test_batched_new_memory_tokens_equal_one_row_at_a_time():
    """Different lengths (left padding moved in front of [bos, memory]) and a mix of initialised
    and empty pools in one forward pass give each row's one-row result."""
    model = tiny_model(seed=8)
    K = model.config.num_tokens
    pools = random_pool(model, 17, batch=4)
    init = torch.tensor([True, False, True, False])
    lengths = [20, 13, 3, 5]
    T = max(lengths)
    rows = [random_ids(n, 20 + b) for b, n in enumerate(lengths)]
    ids = torch.zeros(4, T, dtype=torch.long)
    mask = torch.zeros(4, T, dtype=torch.bool)
    for b, r in enumerate(rows):
        ids[b, T - len(r) :], mask[b, T - len(r) :] = r, True
    new, count = model.new_memory_tokens(pools, init, ids, mask)
    assert count.tolist() == [K, K, K, 5]
    for b, r in enumerate(rows):
        alone, alone_count = model.new_memory_tokens(pools[b : b + 1], bool(init[b]), r[None])
        assert int(alone_count[0]) == int(count[b])
        c = int(count[b])
        torch.testing.assert_close(new[b, :, K - c :], alone[0, :, K - c :], **TIGHT)


def test_new_memory_tokens_refuses_an_empty_context():
    model = tiny_model()
    with pytest.raises(ValueError, match="empty context"):
        model.new_memory_tokens(random_pool(model, 0)[None], True, torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 3, dtype=torch.bool))


# --------------------------------------------------------------------------------------------
# Writing: the drop and the append (update_pool, the pure rule)
# --------------------------------------------------------------------------------------------


def test_update_pool_drops_k_keeps_order_and_appends():
    L, N, K, d = 2, 12, 4, 3
    pool = torch.arange(L * N * d, dtype=torch.float32).view(1, L, N, d)
    new = -torch.arange(1, L * K * d + 1, dtype=torch.float32).view(1, L, K, d)
    keep = ref_keep(torch.Generator().manual_seed(0), L, N, K, per_layer=True)
    out = update_pool(pool, torch.tensor([True]), new, torch.tensor([K]), [keep])
    assert out.shape == pool.shape
    for l in range(L):
        survivors = [i for i in range(N) if i in set(keep[l].tolist())]  # old order, K dropped
        assert len(survivors) == N - K
        torch.testing.assert_close(out[0, l, : N - K], pool[0, l, survivors], rtol=0, atol=0)
        torch.testing.assert_close(out[0, l, N - K :], new[0, l], rtol=0, atol=0)


def test_update_pool_shared_keep_drops_the_same_slots_in_every_layer():
    L, N, K, d = 3, 10, 2, 1
    pool = torch.arange(N, dtype=torch.float32).view(1, 1, N, 1).expand(1, L, N, d).clone()
    keep = ref_keep(torch.Generator().manual_seed(1), L, N, K, per_layer=False)
    out = update_pool(pool, torch.tensor([True]), torch.full((1, L, K, d), -1.0), torch.tensor([K]), [keep])
    assert all(torch.equal(out[0, l], out[0, 0]) for l in range(L))
    assert out[0, 0, : N - K, 0].tolist() == keep[0].float().tolist()


@pytest.mark.parametrize("k,n,expected", [(4, 12, [0, 1, 2, 3] * 3), (3, 8, [0, 1, 2, 0, 1, 2, 1, 2]), (5, 3, [2, 3, 4])])
def test_empty_pool_is_filled_by_tiling_the_new_tokens(k, n, expected):
    """Whole copies first, then the last n % k new tokens (the releases' rule)."""
    new = torch.arange(k, dtype=torch.float32).view(1, k, 1)
    assert tile_to(new, n)[0, :, 0].tolist() == expected
    # through update_pool: an empty pool ignores its old contents and keep indices
    pool = torch.full((1, 1, n, 1), 99.0)
    out = update_pool(pool, torch.tensor([False]), new[None], torch.tensor([k]), [None])
    assert out[0, 0, :, 0].tolist() == expected


def test_update_pool_uses_only_the_last_count_new_rows_and_takes_lists():
    """new_tokens carries K rows; a short first context only made the last `count` of them."""
    K, N = 4, 8
    new = torch.tensor([[[[-9.0], [-9.0], [1.0], [2.0]]]])  # [B=1, L=1, K, d=1], 2 valid rows
    out = update_pool([torch.zeros(1, N, 1)], torch.tensor([False]), new, torch.tensor([2]), [None])
    assert isinstance(out, list) and out[0][0, :, 0].tolist() == [1.0, 2.0] * 4
