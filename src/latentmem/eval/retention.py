"""Knowledge retention (paper section 4.5, Figure 5).

Per row: a fresh pool; the row's context is injected at step 1, then one unrelated context
(``filler_tokens`` tokens of news or Wikipedia text) per later step. After every step the model
answers the question (greedy, ``max_new_tokens`` = 10; a hit when the answer is in the output)
and the answer's teacher-forced log-likelihood is measured. References: the same question
with no context (a_b, the no-context line), with the context in the prompt, and the paper's
Eq. 5 curve a_b + (a_u - a_b) ((N-K)/N)^(t-1) for this model's own N and K.

Rows are processed ``batch_size`` pools at a time: one forward pass injects every pool's next
context and one decode loop answers for all of them.
"""

from __future__ import annotations

import sys
from pathlib import Path

from . import metrics
from .common import Timer, environment, filler_pool, finish, generate, model_info, start_task
from .data import load_qa, load_texts, eval_rows_only
from ..text import qa_prompt


def default_max_answer_tokens(dataset: str) -> int:
    """The paper's filters: SQuAD answers of at most 3 tokens, Natural Questions at most 4."""
    return 3 if "squad" in str(dataset).lower() else 4


def select_rows(lm, dataset: str, n: int, seed: int, max_answer_tokens: int | None) -> list[dict]:
    rows = load_qa(dataset, seed=seed, heldout_only=eval_rows_only(lm))
    out = []
    for r in rows:
        if max_answer_tokens and len(lm.encode(" " + r["answer"])) > max_answer_tokens:
            continue
        if not r["context"].strip():
            continue
        out.append(r)
        if len(out) == n:
            break
    if not out:
        raise ValueError(f"no row of {dataset} has an answer of at most {max_answer_tokens} tokens")
    return out


def _log(msg: str, progress: bool) -> None:
    if progress:
        print(f"[retention] {msg}", file=sys.stderr, flush=True)


def run_retention(
    lm=None,
    *,
    dataset: str = "counterfactual_qa",
    rows: int = 50,
    steps: int = 20,
    filler: str = "news_articles",
    filler_tokens: int = 512,
    batch_size: int = 8,
    max_new_tokens: int = 10,
    prompt: str = "plain",
    max_answer_tokens: int | str | None = "auto",
    context_in_prompt: bool = True,
    seed: int = 0,
    out=None,
    plot: bool = True,
    threads: int | None = None,
    progress: bool = False,
    **model_options,
) -> dict:
    lm, clock = start_task(lm, threads, model_options)
    details = lm.info().details
    # the paper's Eq. 5 needs MemoryLLM's pool of N tokens updated K at a time; other designs get no curve
    N, K = details.get("N"), details.get("K")
    if steps < 1 or rows < 1 or batch_size < 1:
        raise ValueError("steps, rows and batch_size must be >= 1")
    if max_answer_tokens == "auto":
        max_answer_tokens = default_max_answer_tokens(dataset)
    filler_tokens = min(int(filler_tokens), details["max_inject_tokens"])  # one update per filler
    data = select_rows(lm, dataset, rows, seed, max_answer_tokens)
    fillers = filler_pool(lm, load_texts(filler), filler_tokens, max(1, len(data) * (steps - 1)), seed) if steps > 1 else []
    q_prompts = [qa_prompt(lm, r["question"], prompt) for r in data]
    answers = [r["answer"] for r in data]

    def score(memories, idx):
        gens = generate(lm, memories, [q_prompts[i] for i in idx], max_new_tokens)
        lps = lm.score(memories, [q_prompts[i] for i in idx], [answers[i] for i in idx])
        return gens, lps

    # references: no context, and the context in the prompt (no memory)
    base_hits, base_lp, ctx_hits, ctx_lp = [], [], [], []
    for s in range(0, len(data), batch_size):
        idx = list(range(s, min(s + batch_size, len(data))))
        gens, lps = score([None] * len(idx), idx)
        base_hits += [metrics.hit(g, data[i]["answers"]) for g, i in zip(gens, idx)]
        base_lp += [lp / n for lp, n in lps]
        if context_in_prompt:
            cps = [qa_prompt(lm, data[i]["question"], prompt, data[i]["context"]) for i in idx]
            gens = generate(lm, [None] * len(idx), cps, max_new_tokens)
            lps = lm.score([None] * len(idx), cps, [answers[i] for i in idx])
            ctx_hits += [metrics.hit(g, data[i]["answers"]) for g, i in zip(gens, idx)]
            ctx_lp += [lp / n for lp, n in lps]
    _log(f"references done ({clock():.0f} s): no-context hit {sum(base_hits)}/{len(data)}", progress)

    per_row = [{"id": r["id"], "answer": r["answer"], "hits": [], "answer_logprob": [], "context_updates": 0, "output_step1": None} for r in data]
    inject_s = read_s = 0.0
    updates = 0
    for s in range(0, len(data), batch_size):
        idx = list(range(s, min(s + batch_size, len(data))))
        pools = [lm.new_memory(seed=seed * 1_000_003 + i) for i in idx]
        for t in range(1, steps + 1):
            t0 = Timer()
            if t == 1:
                res = lm.inject(pools, [data[i]["context"] for i in idx], allow_short=True, progress=False)
                for i, r in zip(idx, res):
                    per_row[i]["context_updates"] = r.num_chunks
            else:
                lm.inject(pools, [fillers[i * (steps - 1) + t - 2] for i in idx], allow_short=True, progress=False)
            updates += len(idx)
            inject_s += t0()
            t0 = Timer()
            gens, lps = score(pools, idx)
            read_s += t0()
            for g, (lp, n), i in zip(gens, lps, idx):
                per_row[i]["hits"].append(int(metrics.hit(g, data[i]["answers"])))
                per_row[i]["answer_logprob"].append(round(lp / n, 5))
                if t == 1:
                    per_row[i]["output_step1"] = g
        _log(f"rows {idx[-1] + 1}/{len(data)} done ({clock():.0f} s)", progress)
        del pools

    step_stats = []
    for t in range(steps):
        hits = [r["hits"][t] for r in per_row]
        step_stats.append({"step": t + 1, "hit": metrics.rate(hits), "answer_logprob": metrics.mean_ci([r["answer_logprob"][t] for r in per_row], seed=seed)})
    a_u, a_b = step_stats[0]["hit"]["mean"], sum(base_hits) / len(base_hits)
    result = {
        "task": "retention",
        "dataset": str(dataset),
        "rows": len(data),
        "options": {"steps": steps, "filler": str(filler), "filler_tokens": filler_tokens, "batch_size": batch_size, "max_new_tokens": max_new_tokens, "prompt": prompt, "max_answer_tokens": max_answer_tokens, "seed": seed},
        "model": model_info(lm),
        "no_context": {"hit": metrics.rate(base_hits), "answer_logprob": metrics.mean_ci(base_lp, seed=seed)},
        "context_in_prompt": {"hit": metrics.rate(ctx_hits), "answer_logprob": metrics.mean_ci(ctx_lp, seed=seed)} if context_in_prompt else None,
        "steps": step_stats,
        "theory": {
            "formula": "a_b + (a_u - a_b) * ((N - K) / N) ** (t - 1)  (paper Eq. 5, drawn from a_u down to the no-context line)",
            "a_u": a_u,
            "a_b": a_b,
            "eq5": metrics.eq5_curve(a_u, a_b, N, K, steps) if N and K else None,
            "token_survival": [metrics.retention_fraction(N, K, t) for t in range(steps)] if N and K else None,
        },
        "per_row": per_row,
        "timing": {"seconds": round(clock(), 2), "inject_seconds": round(inject_s, 2), "read_seconds": round(read_s, 2), "updates": updates, "updates_per_second": round(updates / inject_s, 3) if inject_s else None},
        "env": environment(),
    }
    from .plots import plot_retention

    return finish(result, out, "retention", Path(str(dataset)).stem, plot_retention if plot else None)

