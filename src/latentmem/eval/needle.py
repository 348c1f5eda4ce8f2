"""Needle in a haystack (``eval compare``): one synthetic fact hidden at a given depth in
``length`` tokens of unrelated news text, then its question.

Needle ``k`` of ``needles`` is a fresh synthetic fact (``eval/synthetic.py``: an answer no model
can know) placed at depth (k + 0.5) / needles of the haystack, between two filler pieces. The
haystacks are answered with long-context QA's methods (``longqa.answer``), so the protocol is
that task's: ``memory`` injects every chunk but the last into an empty memory and reads the last
chunk and the question from the prompt; ``prompt`` is the haystack cut to the window (its middle
removed, ``longqa.truncate_middle``); ``bm25`` the best-matching chunks; ``none`` the question
alone. A hit when the normalised answer appears in the output (``metrics.hit``).
"""

from __future__ import annotations

from . import metrics
from .common import filler_pool
from .data import load_texts
from .longqa import answer
from .synthetic import FactGenerator

METHODS = {"memory": "memoryllm", "prompt": "truncated", "bm25": "bm25", "none": "none"}  # ours -> longqa.answer's


def haystacks(lm, *, length: int, needles: int, filler: str, piece_tokens: int, seed: int) -> list[dict]:
    facts = FactGenerator(f"needle-{seed}").facts(needles)
    count = max(2, length // piece_tokens + 1)
    pieces = filler_pool(lm, load_texts(filler), piece_tokens, count, seed)
    out = []
    for k, f in enumerate(facts):
        depth = (k + 0.5) / needles
        room = length - len(lm.encode(f["text"]))
        body, used = [], 0
        for p in pieces:  # the same filler for every needle: only the depth and the fact change
            n = len(lm.encode(p)) + 1
            if used + n > room:
                break
            body.append(p)
            used += n
        at = round(depth * len(body))
        text = "\n".join(body[:at] + [f["text"]] + body[at:])
        out.append({"text": text, "tokens": len(lm.encode(text)), "depth": depth, "question": f["questions"][0], "answers": f["answers"]})
    return out


def measure_needle(lm, method: str, *, length: int, needles: int = 5, filler: str = "news_articles", piece_tokens: int = 128, window: int | None = None,
                   chunk_tokens: int | None = None, bm25_tokens: int | None = None, bm25_chunk_tokens: int = 64, max_new_tokens: int = 10, batch_size: int = 4, seed: int = 0) -> dict:
    if method not in METHODS:
        raise ValueError(f"unknown needle method {method!r}; choose from {', '.join(METHODS)}")
    d = lm.info().details
    window = int(window or min(2048, d["context_window"]))
    hs = haystacks(lm, length=length, needles=needles, filler=filler, piece_tokens=piece_tokens, seed=seed)
    preds = answer(lm, METHODS[method], [h["text"] for h in hs], [h["question"] for h in hs], window=window, chunk_tokens=int(chunk_tokens or d["max_inject_tokens"]),
                   bm25_tokens=int(bm25_tokens or window // 2), bm25_chunk_tokens=bm25_chunk_tokens, max_new_tokens=max_new_tokens, prompt="plain", batch_size=batch_size, seed=seed)
    hits = [bool(metrics.hit(p["pred"], h["answers"])) for p, h in zip(preds, hs)]
    return {
        "hit": metrics.rate(hits),
        "haystack_tokens_mean": sum(h["tokens"] for h in hs) / len(hs),
        "by_depth": [{"depth": round(h["depth"], 3), "hit": x, "pred": p["pred"]} for h, x, p in zip(hs, hits, preds)],
        "prompt_tokens_mean": sum(p["prompt_tokens"] for p in preds) / len(preds),
        "timing": {"seconds_per_question": sum(p["seconds"] for p in preds) / len(preds)},
    }
