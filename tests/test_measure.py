"""The held-out language-modelling measurement (latentmem.train.measure): per-example losses
against one-row runs and a plain log-softmax computation, and the paired comparison of two
conditions against a slow bootstrap written out here."""

from __future__ import annotations

import math
import random

import pytest
import torch

from conftest import tiny_lm
from latentmem.eval import metrics as M
from latentmem.train.measure import compare_lm, measure_lm
from latentmem.train.routines import Batch, memory_loss, prompt_loss, training_pool


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rows(seed: int, lengths) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(10, 200) for _ in range(n)] for n in lengths]


@torch.no_grad()
def test_per_row_losses_match_single_rows_and_a_plain_computation():
    lm = tiny_lm(num_tokens=8, num_blocks=4)
    model = lm.model
    contexts, targets = _rows(0, [9, 14, 11]), _rows(1, [7, 12, 5])  # unequal: left padding in both
    batch = Batch("eval", [contexts], targets, [1] * 3, False, False, True, 0)
    pool = training_pool(model, 0)
    sums, counts = memory_loss(model, batch, pool, 0, per_row=True)
    mean, n = memory_loss(model, batch, pool, 0)
    assert counts.tolist() == [len(t) - 1 for t in targets] and int(counts.sum()) == n
    assert float(sums.sum() / counts.sum()) == pytest.approx(mean.item(), rel=1e-5)
    for b in range(3):  # each row alone, in a batch of one (no padding)
        one = Batch("eval", [[contexts[b]]], [targets[b]], [1], False, False, True, 0)
        alone, k = memory_loss(model, one, pool, 0)
        assert float(sums[b]) == pytest.approx(alone.item() * k, rel=1e-4)

    # without memory: the summed next-token NLL after a prompt, from the logits of one row
    prompts = _rows(2, [4, 10, 6])
    sums, counts = prompt_loss(model, batch, 0, prompts, per_row=True)
    for b in range(3):
        ids = torch.tensor([prompts[b] + targets[b]])
        logp = torch.log_softmax(model(ids, torch.ones_like(ids, dtype=torch.bool)).double(), -1)[0]
        start = len(prompts[b]) + 1  # loss_start 1: the target's first token is not scored
        ref = -sum(logp[t - 1, ids[0, t]].item() for t in range(start, ids.shape[1]))
        assert int(counts[b]) == ids.shape[1] - start
        assert float(sums[b]) == pytest.approx(ref, rel=1e-4)


def _slow_paired_bootstrap(a, b, n_boot, seed):
    rng = random.Random(seed)
    n, diffs = len(a), []
    for _ in range(n_boot):
        idx = [rng.randrange(n) for _ in range(n)]
        diffs.append(sum(a[i][0] for i in idx) / sum(a[i][1] for i in idx) - sum(b[i][0] for i in idx) / sum(b[i][1] for i in idx))
    diffs.sort()
    return diffs[math.floor(0.025 * (n_boot - 1))], diffs[math.ceil(0.975 * (n_boot - 1))]


def test_paired_loss_difference():
    rng = random.Random(0)
    # documents of very different difficulty; condition a is 0.05 nats/token better with noise
    tokens = [rng.randint(50, 150) for _ in range(40)]
    level = [rng.uniform(2.0, 4.0) for _ in tokens]
    b = [(lv * t, t) for lv, t in zip(level, tokens)]
    a = [((lv - 0.05 + rng.gauss(0, 0.02)) * t, t) for lv, t in zip(level, tokens)]
    d = M.paired_loss_difference(a, b, seed=1)
    exact = sum(x for x, _ in a) / sum(tokens) - sum(x for x, _ in b) / sum(tokens)
    assert d["difference"] == pytest.approx(exact) and d["n"] == 40
    assert tuple(d["ci95"]) == pytest.approx(_slow_paired_bootstrap(a, b, 1000, 1))
    assert d["ci95"][1] < 0 and d["share_of_resamples_below_zero"] == 1.0
    # pairing removes the spread between documents: each loss's own interval is far wider
    own = M.token_mean_ci(a)
    assert own["mean"] == pytest.approx(sum(x for x, _ in a) / sum(tokens))
    assert own["ci95"][0] < own["mean"] < own["ci95"][1]
    assert own["ci95"][1] - own["ci95"][0] > 5 * (d["ci95"][1] - d["ci95"][0])
    # a constant per-token shift is the same in every resample
    shifted = [(x + 0.1 * t, t) for x, t in b]
    assert M.paired_loss_difference(shifted, b)["ci95"] == pytest.approx([0.1, 0.1])
    with pytest.raises(ValueError, match="same non-empty examples"):
        M.paired_loss_difference(a, b[:-1])


def test_measure_lm_reports_per_example_losses_and_paired_comparisons():
    lm = tiny_lm(num_tokens=8, num_blocks=4)
    rng = random.Random(3)
    examples = [[_rows(rng.random(), [rng.randint(6, 12)])[0] for _ in range(3)] for _ in range(5)]
    res = measure_lm(lm, lm, examples, ["memory_trained", "prompt_last", "none"], batch=2, log=lambda m: None)
    for cond, r in res.items():
        rows = r["per_example"]
        assert len(rows) == 5 and r["tokens"] == sum(c for _, c in rows) == sum(len(ex[-1]) - 1 for ex in examples)
        assert r["loss"] == pytest.approx(sum(x for x, _ in rows) / r["tokens"], abs=1e-4)
        assert r["ci95"][0] <= r["loss"] <= r["ci95"][1]
    # the memory condition reads x1..x(n-1): the same loss as running each example alone
    pool = training_pool(lm.model, 0)
    with torch.no_grad():
        ex = examples[4]
        alone, k = memory_loss(lm.model, Batch("eval", [[ex[0]], [ex[1]]], [ex[2]], [1], False, False, True, 4), pool, 0)
    assert res["memory_trained"]["per_example"][4][0] == pytest.approx(alone.item() * k, abs=2e-3)
    cmp = compare_lm(res)
    assert set(cmp) == {"memory_trained - prompt_last", "memory_trained - none"}  # only measured pairs
    d = cmp["memory_trained - prompt_last"]
    assert d["difference"] == pytest.approx(res["memory_trained"]["loss"] - res["prompt_last"]["loss"], abs=2e-4)
    assert d["ci95"][0] <= d["difference"] <= d["ci95"][1]
    res["none"]["per_example"] = res["none"]["per_example"][:4]  # other examples: not compared
    assert set(compare_lm(res)) == {"memory_trained - prompt_last"}
