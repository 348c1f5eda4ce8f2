"""Long-context QA (paper section 4.4, Figure 4 and Table 2) and a LongBench scorer.

``run_longqa``: documents of ``lengths`` tokens made from a QA row's context hidden among
distractor passages (other rows' contexts) at a seeded random position. Methods:

* ``memoryllm``: the document is cut into ``chunk_tokens`` chunks; all but the last are injected
  in order into a fresh pool, the last chunk and the question go in the prompt (the paper's
  protocol: "split the context into 512-token chunks, inject them in order, generate from the
  last chunk");
* ``truncated``: the base model with the document cut to ``window`` tokens, LongBench-style
  (the middle is removed: first half and last half kept);
* ``full``: the whole document in the prompt (beyond the base model's trained window the result
  is flagged ``beyond_window``);
* ``bm25``: rank-bm25 (Okapi BM25) picks the passages of ``bm25_chunk_tokens`` tokens that best
  match the question, up to ``bm25_tokens`` tokens, kept in document order, into the prompt.

Scored with LongBench's QA F1 (``metrics.qa_f1_score``, best over the references); time and the
attention state held per question (pool + memory keys/values, or the prompt's KV cache; computed
from shapes) are reported.

``run_longbench``: the memoryllm method (or any other) on users' local LongBench jsonl files
(``input``, ``context``, ``answers``, ``length``); writes LongBench-format predictions and scores
them. ``score_longbench``: LongBench QA F1 of prediction files (``pred``, ``answers``), overall
and by LongBench-E length bucket (0-4k, 4-8k, 8k+).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from . import metrics
from .common import Timer, as_list, atomic_write_bytes, environment, finish, format_prompt, generate, get_lm, model_info, results_path, set_threads, start_task, write_json
from .data import DataError, load_longbench, load_qa, read_jsonl

ALL_METHODS = ("memoryllm", "truncated", "full", "bm25")
KNOWN_METHODS = ALL_METHODS + ("none",)  # "none": the question without any passage (eval compare's no-memory baseline)
INSTRUCTION = "Answer the question based on the given passages. Only give me the answer and do not output any other words."
# LongBench's generation budgets for its QA datasets
LONGBENCH_MAX_NEW = {"narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "multifieldqa_zh": 64, "hotpotqa": 32, "2wikimqa": 32, "musique": 32, "dureader": 128}


def longqa_prompt(lm, context: str, question: str, style: str) -> str:
    """The long-context QA prompt: an instruction, the passages, the instruction again, the question."""
    body = f"{INSTRUCTION}\n\nThe following are given passages.\n{context}\n\n{INSTRUCTION}\n\nQuestion: {question}\nAnswer:"
    return format_prompt(lm, body, style)


def build_document(lm, row: dict, distractors: list[str], length: int, rng: random.Random) -> tuple[str, int]:
    """The row's context among distractor passages, about ``length`` tokens; returns (text, gold index)."""
    gold_tokens = len(lm.encode(row["context"]))
    passages, total = [], gold_tokens
    order = list(range(len(distractors)))
    rng.shuffle(order)
    for i in order:
        d = distractors[i]
        if d == row["context"]:
            continue
        n = len(lm.encode(d)) + 2  # the passage and its separator
        if total + n > length:
            room = length - total - 2
            if room > 32:
                ids = lm.encode(d)[:room]
                passages.append(lm.tokenizer.decode(ids, skip_special_tokens=True))
            break
        passages.append(d)
        total += n
    gold = rng.randrange(len(passages) + 1)
    passages.insert(gold, row["context"])
    return "\n\n".join(passages), gold


def state_bytes(lm, memory, tokens: int) -> int:
    """Attention state held to answer from ``memory`` (None: none) with ``tokens`` prompt and
    generated tokens: what a read of the memory holds (its vectors and the keys/values computed
    from them; nothing for an empty memory) plus the decode cache of the tokens."""
    d = lm.info(memory).details
    return d["read_state_bytes"] + d["kv_bytes_per_token"] * tokens


def truncate_middle(lm, text: str, max_tokens: int) -> str:
    ids = lm.encode(text)
    if len(ids) <= max_tokens:
        return text
    half = max_tokens // 2
    dec = lm.tokenizer.decode
    return dec(ids[:half], skip_special_tokens=True) + dec(ids[len(ids) - (max_tokens - half) :], skip_special_tokens=True)


def bm25_select(lm, text: str, question: str, budget: int, chunk_tokens: int) -> str:
    from rank_bm25 import BM25Okapi

    ids = lm.encode(text)
    chunks = [lm.tokenizer.decode(ids[i : i + chunk_tokens], skip_special_tokens=True) for i in range(0, len(ids), chunk_tokens)]
    if len(chunks) * chunk_tokens <= budget:
        return text
    corpus = [metrics.normalize_answer(c).split() or [""] for c in chunks]
    scores = BM25Okapi(corpus).get_scores(metrics.normalize_answer(question).split())
    best = sorted(range(len(chunks)), key=lambda i: (-scores[i], i))[: max(1, budget // chunk_tokens)]
    return "\n".join(chunks[i] for i in sorted(best))


def answer(lm, method: str, docs: list[str], questions: list[str], *, window: int, chunk_tokens: int, bm25_tokens: int, bm25_chunk_tokens: int, max_new_tokens: int, prompt: str, batch_size: int, seed: int) -> list[dict]:
    """Predictions with seconds, prompt tokens and attention-state bytes per question."""
    out: list[dict] = []
    if method == "memoryllm":
        for s in range(0, len(docs), batch_size):
            t = Timer()
            part = range(s, min(s + batch_size, len(docs)))
            pools, last_chunks = [], []
            for i in part:
                ids = lm.encode(docs[i])
                chunks = [ids[j : j + chunk_tokens] for j in range(0, len(ids), chunk_tokens)]
                last_chunks.append(lm.tokenizer.decode(chunks[-1], skip_special_tokens=True))
                pool = lm.new_memory(seed=seed * 1_000_003 + i)
                pools.append((pool, [lm.tokenizer.decode(c, skip_special_tokens=True) for c in chunks[:-1]]))
            rounds = max(len(c) for _, c in pools)
            for r in range(rounds):  # chunk r of every document in one forward pass
                live = [(p, c[r]) for p, c in pools if r < len(c)]
                lm.inject([p for p, _ in live], [c for _, c in live], allow_short=True, progress=False)
            prompts = [longqa_prompt(lm, lc, questions[i], prompt) for lc, i in zip(last_chunks, part)]
            preds = generate(lm, [p for p, _ in pools], prompts, max_new_tokens)
            sec = t() / len(prompts)
            for pred, pr, (pool, c) in zip(preds, prompts, pools):
                n = len(lm.encode(pr))
                out.append({"pred": pred, "seconds": sec, "prompt_tokens": n, "updates": pool.update_count, "state_bytes": state_bytes(lm, pool, n + max_new_tokens)})
        return out
    context_window = lm.info().details["context_window"]
    for i, (doc, q) in enumerate(zip(docs, questions)):
        t = Timer()
        if method == "full":
            ctx = doc
        elif method == "none":
            ctx = ""
        elif method == "truncated":
            overhead = len(lm.encode(longqa_prompt(lm, "", q, prompt)))
            ctx = truncate_middle(lm, doc, max(16, window - overhead - max_new_tokens))
        elif method == "bm25":
            ctx = bm25_select(lm, doc, q, bm25_tokens, bm25_chunk_tokens)
        else:
            raise ValueError(f"unknown long-context method {method!r}; choose from {', '.join(KNOWN_METHODS)}")
        pr = longqa_prompt(lm, ctx, q, prompt)
        pred = generate(lm, [None], [pr], max_new_tokens)[0]
        n = len(lm.encode(pr))
        out.append({"pred": pred, "seconds": t(), "prompt_tokens": n, "state_bytes": state_bytes(lm, None, n + max_new_tokens), "beyond_window": n + max_new_tokens > context_window})
    return out


def _defaults(lm, window, chunk_tokens, bm25_tokens):
    d = lm.info().details
    chunk_tokens = int(chunk_tokens or d["max_inject_tokens"])
    window = int(window or min(2048, d["context_window"]))
    bm25_tokens = int(bm25_tokens or window // 2)
    return window, chunk_tokens, bm25_tokens


def run_longqa(
    lm=None,
    *,
    dataset: str = "squad_disfluent_qa",
    questions: int = 30,
    lengths: tuple[int, ...] | list[int] | str = (2048, 4096, 8192),
    methods: tuple[str, ...] | list[str] | str = ALL_METHODS,
    window: int | None = None,
    chunk_tokens: int | None = None,
    bm25_tokens: int | None = None,
    bm25_chunk_tokens: int = 128,
    max_new_tokens: int = 16,
    prompt: str = "auto",
    batch_size: int = 4,
    heldout_only: bool = False,
    seed: int = 0,
    out=None,
    plot: bool = True,
    threads: int | None = None,
    progress: bool = False,
    **model_options,
) -> dict:
    lm, clock = start_task(lm, threads, model_options)
    lengths = as_list(lengths, int)
    methods = as_list(methods)
    bad = [m for m in methods if m not in KNOWN_METHODS]
    if bad:
        raise ValueError(f"unknown long-context method(s) {bad}; choose from {', '.join(KNOWN_METHODS)}")
    window, chunk_tokens, bm25_tokens = _defaults(lm, window, chunk_tokens, bm25_tokens)
    rows = load_qa(dataset, seed=seed, heldout_only=heldout_only)  # heldout_only: eval compare asks every model the same held-out rows
    qs = rows[:questions]
    distractors = sorted({r["context"] for r in rows[questions : questions + 2000]})
    res: dict = {m: {} for m in methods}
    per_q: dict = {m: {} for m in methods}
    seconds: dict = {m: {} for m in methods}  # kept apart from the scores: timings vary between runs
    opts = {"window": window, "chunk_tokens": chunk_tokens, "bm25_tokens": bm25_tokens, "bm25_chunk_tokens": bm25_chunk_tokens, "max_new_tokens": max_new_tokens, "prompt": prompt, "seed": seed}

    def summary() -> dict:
        return _longqa_result(lm, dataset, qs, lengths, methods, res, per_q, seconds, clock, **opts)

    for L in lengths:
        docs, golds = [], []
        for k, r in enumerate(qs):
            d, g = build_document(lm, r, distractors, int(L), random.Random(seed * 1_000_003 + k * 7919 + int(L)))
            docs.append(d)
            golds.append(g)
        doc_tokens = [len(lm.encode(d)) for d in docs]
        for m in methods:
            preds = answer(lm, m, docs, [r["question"] for r in qs], window=window, chunk_tokens=chunk_tokens, bm25_tokens=bm25_tokens, bm25_chunk_tokens=bm25_chunk_tokens, max_new_tokens=max_new_tokens, prompt=prompt, batch_size=batch_size, seed=seed)
            f1 = [metrics.max_f1(p["pred"], r["answers"]) for p, r in zip(preds, qs)]
            hits = [metrics.hit(p["pred"], r["answers"]) for p, r in zip(preds, qs)]
            res[m][str(L)] = {
                "f1": metrics.mean_ci(f1, seed=seed),
                "hit": metrics.rate(hits),
                "state_mib_per_question": round(sum(p["state_bytes"] for p in preds) / len(preds) / 2**20, 1),
                "prompt_tokens_mean": round(sum(p["prompt_tokens"] for p in preds) / len(preds), 1),
                "beyond_window": sum(bool(p.get("beyond_window")) for p in preds),
            }
            seconds[m][str(L)] = round(sum(p["seconds"] for p in preds) / len(preds), 3)
            per_q[m][str(L)] = [{"id": r["id"], "pred": p["pred"], "f1": round(f, 4), "doc_tokens": n, "gold_passage": g} for p, r, f, n, g in zip(preds, qs, f1, doc_tokens, golds)]
            if progress:
                print(f"[longqa] {L} tokens, {m}: F1 {res[m][str(L)]['f1']['mean']:.3f}, {seconds[m][str(L)]:.1f} s/question ({clock():.0f} s)", file=sys.stderr, flush=True)
            if out is not None:  # a long run keeps what it has measured if it is stopped
                write_json(results_path(out, "longqa", Path(str(dataset)).stem), {**summary(), "complete": False})
    from .plots import plot_longqa

    return finish({**summary(), "complete": True}, out, "longqa", Path(str(dataset)).stem, plot_longqa if plot else None)


def _longqa_result(lm, dataset, qs, lengths, methods, res, per_q, seconds, clock, **options) -> dict:
    return {
        "task": "longqa",
        "dataset": str(dataset),
        "questions": len(qs),
        "options": {"lengths": [int(x) for x in lengths], "methods": methods, **options},
        "model": model_info(lm),
        "methods": res,
        "per_question": per_q,
        "timing": {"seconds": round(clock(), 2), "seconds_per_question": seconds},
        "env": environment(),
    }


# ---- LongBench ---------------------------------------------------------------------------------


def _bucket(length) -> str:
    if length is None:
        return "unknown"
    return "0-4k" if length < 4000 else "4-8k" if length < 8000 else "8k+"


def score_longbench(predictions: list[str] | str, *, out=None) -> dict:
    """LongBench QA F1 of prediction jsonl files (one per dataset; rows with ``pred`` and
    ``answers``; ``length`` enables LongBench-E buckets). Returns and writes the scores."""
    files = [predictions] if isinstance(predictions, (str, Path)) else list(predictions)
    scores = {}
    for f in files:
        rows = read_jsonl(f)
        if not rows:
            raise DataError(f"{f}: no predictions")
        for i, r in enumerate(rows):
            if "pred" not in r or "answers" not in r:
                raise DataError(f"{f}: row {i} needs 'pred' and 'answers' (has {sorted(r)})")
        name = Path(f).stem
        f1 = [100 * metrics.max_f1(r["pred"], r["answers"]) for r in rows]
        by = {}
        for r, v in zip(rows, f1):
            by.setdefault(_bucket(r.get("length")), []).append(v)
        scores[name] = {"f1": round(sum(f1) / len(f1), 2), "n": len(f1), "ci95": [round(x, 2) for x in metrics.bootstrap_ci(f1)], "by_length": {k: round(sum(v) / len(v), 2) for k, v in sorted(by.items())}}
    result = {"task": "longbench-score", "metric": "LongBench qa_f1_score x 100 (best over references)", "scores": scores}
    if out is not None:
        write_json(results_path(out, "longbench_scores"), result)
    return result


def run_longbench(lm=None, *, data: list[str] | str, method: str = "memoryllm", limit: int | None = None, predictions_dir: str = "results/eval/longbench_pred", window: int | None = None, chunk_tokens: int | None = None, bm25_tokens: int | None = None, bm25_chunk_tokens: int = 128, max_new_tokens: int | None = None, prompt: str = "auto", batch_size: int = 2, seed: int = 0, out=None, threads: int | None = None, progress: bool = False, **model_options) -> dict:
    """Answer local LongBench files with ``method``, write ``<dataset>.jsonl`` predictions in
    LongBench's format, and score them."""
    set_threads(threads)
    lm = lm if lm is not None else get_lm(model_options)
    window, chunk_tokens, bm25_tokens = _defaults(lm, window, chunk_tokens, bm25_tokens)
    files = [data] if isinstance(data, (str, Path)) else list(data)
    written = []
    for f in files:
        rows = load_longbench(f, limit=limit)
        name = rows[0]["dataset"] if rows else Path(f).stem
        mnt = int(max_new_tokens or LONGBENCH_MAX_NEW.get(name, 32))
        preds = answer(lm, method, [r["context"] for r in rows], [r["question"] for r in rows], window=window, chunk_tokens=chunk_tokens, bm25_tokens=bm25_tokens, bm25_chunk_tokens=bm25_chunk_tokens, max_new_tokens=mnt, prompt=prompt, batch_size=batch_size, seed=seed)
        path = Path(predictions_dir) / method / f"{Path(f).stem}.jsonl"
        lines = [json.dumps({"pred": p["pred"], "answers": r["answers"], "all_classes": None, "length": r["length"], "_id": r["id"], "seconds": round(p["seconds"], 3)}, ensure_ascii=False) for p, r in zip(preds, rows)]
        atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
        written.append(str(path))
        if progress:
            print(f"[longbench] {f}: {len(rows)} predictions -> {path}", file=sys.stderr, flush=True)
    result = score_longbench(written)
    result.update({"task": "longbench", "method": method, "predictions": written, "model": model_info(lm), "env": environment()})
    write_json(results_path(out, "longbench", method), result)
    return result
