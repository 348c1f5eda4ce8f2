"""The conformance suite: the behaviour every memory design behind ``latentmem.api.MemoryModel``
must show, checked the same way for each design (the pattern of transformers' ModelTesterMixin).

A design joins by adding a ``Design`` entry to DESIGNS: a factory for a tiny random model, and an
independent reference for its logits (a slow float64 computation written from the paper, not the
design's fast path) that ``score`` and greedy decoding are checked against.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from conftest import CORPUS, ref_logits, tiny_lm
from latentmem import InjectionError, Memory, MemoryFormatError, MemoryModel
from latentmem.store import MemoryStore


@dataclass
class Design:
    name: str
    make: Callable[[int], MemoryModel]  # seed -> a tiny random model of the design
    # (lm, memory or None, token ids) -> float64 logits [T, V] of the sequence read with memory
    reference_logits: Callable[[MemoryModel, Memory | None, list[int]], torch.Tensor]
    # (lm, monkeypatch, n): make the design's n-th internal write step of the next inject raise
    break_nth_write: Callable[[MemoryModel, pytest.MonkeyPatch, int], None]


def _memoryllm_reference(lm, memory, ids):
    pool = memory.logical_memory().double() if memory is not None and memory.initialized else None
    return ref_logits(lm.model, ids, pool)


def _memoryllm_break_nth_write(lm, monkeypatch, n):
    real, calls = type(lm)._update, [0]

    def failing(self, *a, **k):  # one self-update of every pool in the batch
        calls[0] += 1
        if calls[0] == n:
            raise RuntimeError("interrupted")
        return real(self, *a, **k)

    monkeypatch.setattr(type(lm), "_update", failing)


# Larimar's read depends on the query: its reference takes the query from the prompts the last
# call read with (``lm.last_reads``; see test_larimar.read_query)
from test_larimar import larimar_break_nth_write, larimar_reference, tiny_larimar  # noqa: E402


def _longmem_reference(lm, memory, ids):
    from test_longmem import ref_logits as longmem_ref_logits

    return longmem_ref_logits(lm, memory, ids)


def _longmem_make(seed):
    from test_longmem import tiny_longmem

    return tiny_longmem(seed)


def _longmem_break_nth_write(lm, monkeypatch, n):
    real, calls = type(lm)._write, [0]

    def failing(self, *a, **k):  # one segment into every bank of the batch
        calls[0] += 1
        if calls[0] == n:
            raise RuntimeError("interrupted")
        return real(self, *a, **k)

    monkeypatch.setattr(type(lm), "_write", failing)


DESIGNS = [
    Design("memoryllm", tiny_lm, _memoryllm_reference, _memoryllm_break_nth_write),
    Design("longmem", _longmem_make, _longmem_reference, _longmem_break_nth_write),
    Design("larimar", tiny_larimar, larimar_reference, larimar_break_nth_write),
]


@pytest.fixture(params=DESIGNS, ids=lambda d: d.name)
def design(request) -> Design:
    return request.param


@pytest.fixture
def lm(design):
    return design.make(0)


def filled(lm, seed=0, texts=CORPUS[:3]):
    mem = lm.new_memory(seed=seed)
    for t in texts:
        lm.inject(mem, t)
    return mem


def test_implements_the_interface(lm):
    assert isinstance(lm, MemoryModel)
    mem = lm.new_memory(seed=0)
    assert isinstance(mem, Memory)
    assert lm.design and isinstance(lm.forget_exact, bool) and lm.model_id
    empty = lm.info(mem)
    assert empty.design == lm.design and empty.model_id == lm.model_id
    assert empty.capacity_units > 0 and empty.used_units == 0 and empty.update_count == 0
    lm.inject(mem, CORPUS[0])
    after = lm.info(mem)
    assert after.used_units > 0 and after.update_count >= 1 and after.last_injection_id == 1 and after.memory_bytes > 0


def test_inject_then_generate_reads_the_memory(lm, design):
    """A round trip: injecting changes what the model predicts, and greedy decoding follows the
    independent reference's argmax with and without memory."""
    mem = lm.new_memory(seed=0)
    result = lm.inject(mem, CORPUS[1])
    assert result.injection_id == 1 and result.num_tokens == len(lm.encode(CORPUS[1])) and result.num_chunks >= 1
    prompt = "Paris is the capital of"
    ids = lm.encode(prompt)
    for memory in (None, mem):
        g = lm.generate(memory, prompt, chat=False, max_new_tokens=1, temperature=0.0)
        expected = int(design.reference_logits(lm, memory, ids)[-1].argmax())
        assert g.token_ids[:1] == [expected] or g.finish_reason == "stop"
    with_mem = design.reference_logits(lm, mem, ids)[-1]
    without = design.reference_logits(lm, None, ids)[-1]
    assert not torch.allclose(with_mem, without)


def test_score_matches_a_plain_log_softmax_reference(lm, design):
    mem = filled(lm)
    prompts, answers = ["Alice lives in", "The meeting was moved to"], ["Zurich", "Thursday at three"]
    for memory in (None, mem):
        scores = lm.score([memory] * 2, prompts, answers)
        for (lp, n), p, a in zip(scores, prompts, answers):
            p_ids, full = lm.encode(p), lm.encode(p + " " + a)
            a_ids = full[len(p_ids):] if full[: len(p_ids)] == p_ids else lm.encode(" " + a)
            logp = torch.log_softmax(design.reference_logits(lm, memory, p_ids + a_ids), -1)
            expected = sum(float(logp[len(p_ids) + i - 1, t]) for i, t in enumerate(a_ids))
            assert n == len(a_ids)
            assert math.isclose(lp, expected, rel_tol=1e-4, abs_tol=1e-4)


def test_batched_equals_sequential(lm):
    texts = CORPUS[:3]
    one_by_one = [lm.new_memory(seed=i) for i in range(3)]
    for m, t in zip(one_by_one, texts):
        lm.inject(m, t)
    together = [lm.new_memory(seed=i) for i in range(3)]
    results = lm.inject(together, texts)
    assert [r.injection_id for r in results] == [1, 1, 1]
    prompts = ["The quick brown", "Paris is the", "Memory helps the"]
    s_seq = [lm.score([m], [p], ["fox"])[0][0] for m, p in zip(one_by_one, prompts)]
    s_bat = [s for s, _ in lm.score(together, prompts, ["fox"] * 3)]
    assert s_seq == pytest.approx(s_bat, abs=1e-4)
    seq = [lm.generate(m, p, chat=False, max_new_tokens=4, temperature=0.0).token_ids for m, p in zip(one_by_one, prompts)]
    bat = [g.token_ids for g in lm.generate_batch(together, prompts, chat=False, max_new_tokens=4, temperature=0.0)]
    assert seq == bat


def test_stream_gives_the_generated_text(lm):
    mem = filled(lm)
    g = lm.generate(mem, "Alice lives in", chat=False, max_new_tokens=6, temperature=0.0)
    assert "".join(lm.stream(mem, "Alice lives in", chat=False, max_new_tokens=6, temperature=0.0)) == g.text


def test_save_load_is_bit_exact(lm, tmp_path, design):
    mem = filled(lm)
    mem.save(tmp_path / "m.safetensors")
    back = lm.load_memory(tmp_path / "m.safetensors")
    assert back.equal(mem) and mem.equal(back)
    lm.inject(mem, CORPUS[4])
    lm.inject(back, CORPUS[4])  # the random state (drops, ...) travelled with the file
    assert back.equal(mem)
    other = design.make(1)  # another model (other weights): its memories do not fit
    with pytest.raises(MemoryFormatError):
        other.load_memory(tmp_path / "m.safetensors")


def test_a_failed_inject_leaves_memory_exactly_as_before(lm):
    mems = [filled(lm, seed=0), filled(lm, seed=1)]
    before = [m.clone() for m in mems]
    for bad in (["fine text for the first memory, long enough", ""], ["fine text for the first memory, long enough", 42], ["x", "y"]):
        with pytest.raises(InjectionError):
            lm.inject(mems, bad)
        assert all(m.equal(b) for m, b in zip(mems, before))
    with pytest.raises(InjectionError):
        lm.inject([mems[0], mems[0]], CORPUS[:2])  # one memory twice in a batch
    assert mems[0].equal(before[0])


def test_a_failure_part_way_through_rolls_back(lm, design, monkeypatch):
    """An error raised inside the model while writing, after earlier writes of the same inject
    went through, leaves every memory of the batch as it was: the design undoes what it did."""
    mems = [filled(lm, seed=0), lm.new_memory(seed=1)]
    before = [m.clone() for m in mems]
    long_text = " ".join(CORPUS) * 3  # several writes
    design.break_nth_write(lm, monkeypatch, 2)
    with pytest.raises(RuntimeError, match="interrupted"):
        lm.inject(mems, [long_text, long_text])
    assert all(m.equal(b) for m, b in zip(mems, before))


def test_replay_equals_the_live_memory(lm, tmp_path):
    live = filled(lm, seed=3, texts=CORPUS[:4])
    again = filled(lm, seed=3, texts=CORPUS[:4])
    assert again.equal(live)
    with MemoryStore(tmp_path / "store", lm) as store:
        store.create("u", seed=3)
        store.inject("u", list(CORPUS[:4]))
        assert store.memory("u").equal(live)
        assert store.verify("u").ok
        assert store.replay("u").equal(live)


def test_forget_behaves_as_declared(lm, design):
    mem = filled(lm, texts=CORPUS[:3])
    owners = lm.owners(mem)
    assert set(owners.unique().tolist()) - {-1} <= {1, 2, 3} and bool((owners == 3).any())
    target = 3  # the newest injection: it surely holds units
    before = mem.clone()
    result = lm.forget(mem, target)
    assert result.injection_id == target and result.exact == lm.forget_exact
    assert result.removed_units == int((lm.owners(before) == target).sum()) > 0
    assert not bool((lm.owners(mem) == target).any())
    assert not mem.equal(before)
    never = filled(lm, texts=CORPUS[:2])  # the same memory that never received injection 3
    if lm.forget_exact:
        assert mem.equal(never)
    else:
        assert result.note or lm.differences(mem, never)  # says what may remain
    # what the store reports as changed between the two
    d = lm.diff(before, mem)
    assert d["changed_units"] >= 0 and target in d["removed_by_injection"]


def test_memories_of_another_model_are_refused(lm, design):
    other = design.make(1)
    foreign = other.new_memory(seed=0)
    other.inject(foreign, CORPUS[0])
    with pytest.raises(MemoryFormatError):
        lm.inject(foreign, CORPUS[1])
    with pytest.raises(MemoryFormatError):
        lm.generate(foreign, "Paris is", max_new_tokens=1)


# --------------------------------------------------------------------------------------------
# Files written before the package was renamed (memoryllm 0.1, commit 62f5937) still load
# --------------------------------------------------------------------------------------------

DATA = __import__("pathlib").Path(__file__).parent / "data"


def same_memory_up_to_float_order(a, b) -> None:
    """The pool of a file written by another process equals a fresh replay up to the float
    summation order (which depends on torch's thread count: bit-exact replay across thread
    counts is issue 17); everything else (slot owners, drop generator, counters) exactly."""
    torch.testing.assert_close(a.logical_memory(), b.logical_memory(), rtol=1e-5, atol=1e-5)
    assert torch.equal(a.logical_provenance(), b.logical_provenance())
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
    assert (a.initialized, a.update_count, a.last_injection_id, a.model_id) == (b.initialized, b.update_count, b.last_injection_id, b.model_id)


def test_a_memory_file_from_before_the_rename_loads_and_equals_a_fresh_replay():
    """tests/data/memory_v0.1_tiny.safetensors: tiny_lm(seed=0), new_memory(seed=5), CORPUS[:3]
    injected one by one, saved by the pre-rename code (2 torch threads)."""
    lm = tiny_lm(0)
    old = lm.load_memory(DATA / "memory_v0.1_tiny.safetensors")
    assert old.model_id == lm.model_id and (old.update_count, old.last_injection_id) == (6, 3)
    same_memory_up_to_float_order(old, filled(lm, seed=5, texts=CORPUS[:3]))


def test_a_store_export_from_before_the_rename_imports(tmp_path):
    """tests/data/export_v0.1_tiny.zip: the same memory as the pre-rename store exported it."""
    lm = tiny_lm(0)
    with MemoryStore(tmp_path / "s", lm) as store:
        store.import_file(DATA / "export_v0.1_tiny.zip", "alice")
        same_memory_up_to_float_order(store.memory("alice"), filled(lm, seed=5, texts=CORPUS[:3]))
        same_memory_up_to_float_order(store.replay("alice"), store.memory("alice"))
        assert [e.injection_id for e in store.history("alice") if e.kind == "inject"] == [1, 2, 3]
