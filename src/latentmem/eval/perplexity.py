"""Long-document perplexity (``eval compare``): how much of a long document's beginning helps to
predict its end, read from memory or from the prompt.

Each held-out Wikipedia article (``data.is_heldout`` on its id) is cut to ``length`` tokens; the
last ``eval_tokens`` are scored (teacher-forced, ``lm.score``) after a prompt that always ends
with the ``local_tokens`` tokens just before them. Methods:

* ``memory``: everything before the scored tokens is injected into an empty memory;
* ``none``: the local tokens alone;
* ``prompt``: the latest preceding tokens that fit in the window (``window_tokens``, the model's
  context window by default, less the scored tokens);
* ``bm25``: the preceding text cut into ``chunk_tokens`` chunks, the ones BM25 ranks best for the
  local tokens (up to ``bm25_tokens``) in document order, then the local tokens.

Perplexity = exp(token-weighted mean negative log-likelihood), its 95% interval from a bootstrap
over documents (``metrics.token_mean_ci``); the loss per document is kept.
"""

from __future__ import annotations

import math
import random

from . import metrics
from .data import DataError, is_heldout, read_jsonl, resolve
from .longqa import bm25_select

METHODS = ("memory", "none", "prompt", "bm25")


def documents(lm, name: str, length: int, count: int, seed: int) -> list[list[int]]:
    """``count`` held-out articles of at least ``length`` tokens, as their first ``length`` token
    ids, in a seeded order."""
    rows = [r for r in read_jsonl(resolve(name)) if is_heldout(str(r.get("id", r.get("title", ""))))]
    random.Random(f"ppl-{seed}").shuffle(rows)
    out = []
    for r in rows:
        ids = lm.encode(r["text"])
        if len(ids) >= length:
            out.append(ids[:length])
        if len(out) == count:
            break
    if not out:
        raise DataError(f"{name}: no held-out article of {length} tokens or more")
    return out


def perplexity(rows: list[tuple[float, int]], seed: int = 0) -> dict:
    """rows: (summed negative log-likelihood, tokens) per document -> perplexity with its interval."""
    nll = metrics.token_mean_ci(rows, seed=seed)
    lo, hi = nll["ci95"]
    return {"mean": math.exp(nll["mean"]), "ci95": [math.exp(lo), math.exp(hi)], "n": nll["n"], "tokens": sum(n for _, n in rows), "nll_per_token": nll["mean"], "ci": "bootstrap over documents"}


def measure_perplexity(lm, method: str, *, length: int, docs: int = 8, dataset: str = "wikipedia_articles", eval_tokens: int = 128, local_tokens: int = 32,
                       window_tokens: int | None = None, bm25_tokens: int = 512, chunk_tokens: int = 64, seed: int = 0) -> dict:
    if method not in METHODS:
        raise ValueError(f"unknown perplexity method {method!r}; choose from {', '.join(METHODS)}")
    if length <= eval_tokens + local_tokens:
        raise ValueError(f"document length {length} must exceed eval_tokens + local_tokens ({eval_tokens + local_tokens})")
    window = int(window_tokens or lm.info().details["context_window"])
    dec = lambda ids: lm.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    rows, per_doc = [], []
    for k, ids in enumerate(documents(lm, dataset, length, docs, seed)):
        before, target = ids[:-eval_tokens], ids[-eval_tokens:]
        local = dec(before[-local_tokens:])
        mem = None
        if method == "memory":
            mem = lm.new_memory(seed=seed * 1_000_003 + k)
            lm.inject(mem, dec(before), allow_short=True, progress=False)
            prompt = local
        elif method == "none":
            prompt = local
        elif method == "prompt":
            room = max(local_tokens, window - eval_tokens - 8)
            prompt = dec(before[-room:])
        else:
            ctx = bm25_select(lm, dec(before[:-local_tokens]), local, bm25_tokens, chunk_tokens)
            prompt = ctx + "\n" + local
        answer = dec(target)
        if answer.startswith(" ") and not prompt.endswith((" ", "\n")):
            answer = answer[1:]  # score puts one space between prompt and answer
        (logp, n), = lm.score([mem], [prompt], [answer])
        rows.append((-logp, n))
        per_doc.append({"doc": k, "nll_per_token": -logp / n, "tokens": n, "prompt_tokens": len(lm.encode(prompt))})
    return {"perplexity": perplexity(rows, seed), "document_tokens": length, "eval_tokens": eval_tokens, "per_document": per_doc}
