"""Metric functions shared by every evaluation (pure Python, no model).

* ``normalize_answer`` / ``qa_f1_score``: LongBench's QA F1 (its ``metrics.py``: lower-case,
  drop punctuation and the articles a/an/the, collapse whitespace, token-level F1 on bags of
  tokens); ``max_f1`` takes the best over several reference answers as LongBench does.
* ``hit``: the paper's retention rule: the answer appears in the generated text (compared after
  the same normalisation, so "The Eiffel Tower." contains "eiffel tower").
* ``harmonic_mean``: the editing Score (efficacy, generalization, specificity).
* ``eq5_curve``: the paper's Eq. 5 forgetting curve for pool size N and K tokens per update.
* ``wilson_interval`` / ``bootstrap_ci``: confidence intervals for rates and means;
  ``token_mean_ci`` / ``paired_loss_difference``: a token-weighted loss, and the difference of
  two conditions on the same examples, with intervals that resample whole examples.
"""

from __future__ import annotations

import math
import random
import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """LongBench / SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def f1_tokens(prediction: Sequence[str], ground_truth: Sequence[str]) -> float:
    """Token-bag F1 (LongBench ``f1_score``)."""
    common = Counter(prediction) & Counter(ground_truth)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction)
    recall = num_same / len(ground_truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str) -> float:
    """LongBench ``qa_f1_score`` for one reference answer."""
    return f1_tokens(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def max_f1(prediction: str, answers: str | Iterable[str]) -> float:
    """Best F1 over the reference answers (LongBench scores each prediction this way)."""
    answers = [answers] if isinstance(answers, str) else list(answers)
    if not answers:
        raise ValueError("no reference answers")
    return max(qa_f1_score(prediction, a) for a in answers)


def hit(generated: str, answers: str | Iterable[str]) -> bool:
    """The paper's retention rule: the (normalised) answer occurs in the (normalised) output.

    Matching is on whole normalised tokens, so "1999" does not hit "19990" and "art" does not
    hit "party"."""
    answers = [answers] if isinstance(answers, str) else list(answers)
    out = f" {normalize_answer(generated)} "
    for a in answers:
        na = normalize_answer(a)
        if na and f" {na} " in out:
            return True
    return False


def harmonic_mean(values: Iterable[float]) -> float:
    """Harmonic mean; 0 when any value is 0 (the editing Score's convention)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("harmonic mean of no values")
    if any(v < 0 for v in vals):
        raise ValueError(f"harmonic mean needs non-negative values, got {vals}")
    if any(v == 0 for v in vals):
        return 0.0
    return len(vals) / sum(1.0 / v for v in vals)


def eq5_curve(a_u: float, a_b: float, num_memory_tokens: int, num_tokens: int, steps: int | Sequence[int], add_baseline: bool = True) -> list[float]:
    """The paper's Eq. 5: ``a_t = (a_u - a_b) * ((N - K) / N) ** (t - 1)`` for t = 1..steps.

    a_u is the accuracy at step 1, a_b the accuracy without context. As printed, Eq. 5 is the
    part of the accuracy due to the injected context; the paper's Figure 5 draws it starting at
    a_u and levelling off at the no-context line, i.e. ``a_b + (a_u - a_b) * r ** (t - 1)``,
    which is what ``add_baseline=True`` (the default) returns.
    """
    N, K = int(num_memory_tokens), int(num_tokens)
    if not 0 < K <= N:
        raise ValueError(f"need 0 < K <= N, got N={N}, K={K}")
    ts = range(1, steps + 1) if isinstance(steps, int) else list(steps)
    r = (N - K) / N
    return [(a_b if add_baseline else 0.0) + (a_u - a_b) * r ** (t - 1) for t in ts]


def retention_fraction(num_memory_tokens: int, num_tokens: int, updates: int) -> float:
    """Probability that a token survives ``updates`` later updates: (1 - K/N) ** updates."""
    return (1 - num_tokens / num_memory_tokens) ** updates


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial rate (95% by default); (0, 1) when n == 0."""
    if n == 0:
        return (0.0, 1.0)
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, {n}], got {successes}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_ci(values: Sequence[float], *, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (seeded, so reports are reproducible)."""
    vals = [float(v) for v in values]
    if not vals:
        return (float("nan"), float("nan"))
    if len(vals) == 1:
        return (vals[0], vals[0])
    rng = random.Random(seed)
    n = len(vals)
    means = sorted(sum(vals[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    lo = means[int(math.floor(alpha / 2 * (n_boot - 1)))]
    hi = means[int(math.ceil((1 - alpha / 2) * (n_boot - 1)))]
    return (lo, hi)


def _token_mean(rows: Sequence[tuple[float, int]], idx: Sequence[int]) -> float:
    return sum(rows[i][0] for i in idx) / sum(rows[i][1] for i in idx)


def _bootstrap(n: int, statistic, n_boot: int, seed: int) -> tuple[float, float]:
    """Percentile 95% interval of statistic(indices) over n_boot resamples of n examples."""
    rng = random.Random(seed)
    stats = sorted(statistic([rng.randrange(n) for _ in range(n)]) for _ in range(n_boot))
    return stats[int(math.floor(0.025 * (n_boot - 1)))], stats[int(math.ceil(0.975 * (n_boot - 1)))]


def token_mean_ci(rows: Sequence[tuple[float, int]], *, n_boot: int = 1000, seed: int = 0) -> dict:
    """The token-weighted mean loss of examples given as (summed loss, tokens), with a percentile
    bootstrap 95% interval that resamples whole examples (their tokens are not independent)."""
    n = len(rows)
    if n == 0:
        return {"mean": float("nan"), "n": 0, "ci95": [float("nan"), float("nan")], "ci": "bootstrap over examples"}
    lo, hi = _bootstrap(n, lambda idx: _token_mean(rows, idx), n_boot, seed)
    return {"mean": _token_mean(rows, range(n)), "n": n, "ci95": [lo, hi], "ci": "bootstrap over examples"}


def paired_loss_difference(a: Sequence[tuple[float, int]], b: Sequence[tuple[float, int]], *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Token-weighted mean loss of ``a`` minus that of ``b``, two conditions scored on the same
    examples (as (summed loss, tokens)), with a paired bootstrap 95% interval: each resample
    draws examples and takes both conditions' losses of the drawn examples, so the spread
    between documents, which both conditions share, does not widen the interval."""
    if len(a) != len(b) or not a:
        raise ValueError(f"a paired difference needs the same non-empty examples in both conditions (got {len(a)} and {len(b)})")
    n = len(a)
    diffs: list[float] = []

    def diff(idx: Sequence[int]) -> float:
        diffs.append(_token_mean(a, idx) - _token_mean(b, idx))
        return diffs[-1]

    lo, hi = _bootstrap(n, diff, n_boot, seed)
    below = sum(d < 0 for d in diffs) / n_boot
    return {"difference": _token_mean(a, range(n)) - _token_mean(b, range(n)), "n": n, "ci95": [lo, hi], "share_of_resamples_below_zero": below, "ci": "paired bootstrap over examples"}


def rate(flags: Sequence[bool | int]) -> dict:
    """A binary rate with its Wilson 95% interval, as every results file reports it."""
    n = len(flags)
    k = int(sum(bool(f) for f in flags))
    lo, hi = wilson_interval(k, n)
    return {"mean": k / n if n else float("nan"), "n": n, "ci95": [lo, hi], "ci": "wilson"}


def mean_ci(values: Sequence[float], seed: int = 0) -> dict:
    """A mean with its bootstrap 95% interval."""
    vals = [float(v) for v in values]
    lo, hi = bootstrap_ci(vals, seed=seed)
    return {"mean": sum(vals) / len(vals) if vals else float("nan"), "n": len(vals), "ci95": [lo, hi], "ci": "bootstrap"}


def sliding_mean(flags: Sequence[float], window: int) -> list[float]:
    """Mean of the last ``window`` values at every position (fewer at the start)."""
    out, total = [], 0.0
    for i, f in enumerate(flags):
        total += float(f)
        if i >= window:
            total -= float(flags[i - window])
        out.append(total / min(i + 1, window))
    return out


def harmonic_mean_ci(columns: Sequence[Sequence[float]], *, n_boot: int = 1000, seed: int = 0) -> dict:
    """The harmonic mean of the means of several per-example measures (the editing Score of
    efficacy, generalization and specificity, one value per edit each), with a percentile
    bootstrap 95% interval that resamples examples, all measures of an example together."""
    cols = [[float(v) for v in c] for c in columns]
    n = len(cols[0]) if cols else 0
    if n == 0 or any(len(c) != n for c in cols):
        raise ValueError("harmonic_mean_ci needs measures of the same, non-empty examples")

    def stat(idx: Sequence[int]) -> float:
        return harmonic_mean([sum(c[i] for i in idx) / len(idx) for c in cols])

    lo, hi = _bootstrap(n, stat, n_boot, seed)
    return {"mean": stat(range(n)), "n": n, "ci95": [lo, hi], "ci": "bootstrap over examples"}
