"""Many facts in one memory (issue 15): recall against an item's age in a memory that is in use.

One memory receives a stream of items one at a time, as a user's notes arrive: short synthetic
facts (``eval/synthetic.py``: invented people and places, ~15-30 tokens, paraphrased questions,
one short answer), counterfactual_qa passages of ``passage_tokens`` (16-512) tokens (answers a
model cannot know), and unrelated news filler between them (``filler_rate`` fillers per item,
spread evenly). No entity is repeated within a stream. At each checkpoint (after 10, 100, 1000
items) the question of every item written so far (or an evenly spaced sample that keeps the
first and the newest) is asked, plain ``Question: ... Answer:`` prompt, greedy, newline stop; a
hit when the normalised gold answer appears in the answer (``metrics.hit``).

Methods, all on the same stream and the same questions:

* ``memory``: the one memory that received the whole stream;
* ``none``: no memory, the question alone;
* ``window``: the last stream texts that fit in a ``window_tokens`` prompt (the model's window),
  whole texts, oldest dropped first, newest last (cut to its end if it alone does not fit);
* ``bm25``: rank-bm25 (Okapi) over the texts written so far picks the best-matching ones for the
  question, up to ``bm25_tokens`` tokens, kept in stream order, into the prompt;
* ``fresh``: each item alone in an empty memory (the fresh-pool reference of issue 15);
* after every item the newest item's question is also asked from the memory (``probe``): the
  newest-item recall as a function of how many items the memory had absorbed.

An item's age at a checkpoint is counted in updates (writes applied after its own, from
``info(memory).update_count``) and in tokens written since. Where the design reports N and K
(``MemoryInfo.details``) the paper's Eq. 5, a_b + (a_u - a_b) (1 - K/N)^m after m later updates
(a_u the fresh-pool recall, a_b the no-memory recall), is reported as a reference curve.

Only the shared interface is used (inject, generate_batch, info, new_memory, save/load_memory).
The run is resumable: ``workdir/progress.json`` holds every answer as soon as it is measured and
points at the last saved memory; the results JSON (``complete: false`` until done) is rewritten
after every batch, so an interrupted run keeps what it measured and the same command continues
(``max_seconds`` or SIGTERM stop it cleanly after the current batch).
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path

from . import metrics
from .common import as_list, environment, filler_pool, finish, model_info, results_path, start_task, write_json
from .data import eval_rows_only, load_qa, load_texts
from .integrity import _Stop
from .synthetic import FactGenerator
from ..text import qa_prompt

PROGRESS = "progress.json"
ALL_METHODS = ("memory", "none", "window", "bm25", "fresh")


# ---- the stream ---------------------------------------------------------------------------------


def _passages(lm, dataset: str, lo: int, hi: int, max_answer_tokens: int | None, seed: int, heldout_only: bool | None = None) -> list[dict]:
    """counterfactual_qa rows whose context is lo-hi tokens (held-out rows only for a trained
    model, or as ``heldout_only`` says), one row per distinct context, in a seeded order."""
    out, seen = [], set()
    for r in load_qa(dataset, seed=seed, heldout_only=eval_rows_only(lm) if heldout_only is None else heldout_only):
        ctx = r["context"].strip()
        if not ctx or ctx in seen:
            continue
        n = len(lm.encode(ctx))
        if not lo <= n <= hi:
            continue
        if max_answer_tokens and len(lm.encode(" " + r["answer"])) > max_answer_tokens:
            continue
        seen.add(ctx)
        out.append({"id": r["id"], "kind": "passage", "text": ctx, "questions": [r["question"]], "answer": r["answer"], "answers": r["answers"]})
    return out


def build_stream(lm, *, items: int, seed: int = 0, passage_share: float = 0.5, dataset: str = "counterfactual_qa", passage_tokens: tuple[int, int] = (16, 512), max_answer_tokens: int | None = 4, filler: str = "news_articles", filler_rate: float = 0.5, filler_tokens: int = 128, heldout_only: bool | None = None) -> list[dict]:
    """The stream: ``items`` question-bearing items (facts and passages, ``passage_share`` of
    them passages) with ``filler_rate`` fillers per item spread evenly between them (item k is
    followed by floor((k+1) r) - floor(k r) fillers). Deterministic for the seed and the model's
    tokenizer. Each element: kind, text, and for items id, question, answers, item (1-based).
    ``heldout_only``: passages from held-out rows only (None: only for a trained model), so
    that several models can be given the same stream (``eval compare``)."""
    rng = random.Random(f"stream-{seed}")
    n_pass = round(items * passage_share)
    kinds = ["passage"] * n_pass + ["fact"] * (items - n_pass)
    rng.shuffle(kinds)
    passages = _passages(lm, dataset, passage_tokens[0], passage_tokens[1], max_answer_tokens, seed, heldout_only) if n_pass else []
    if len(passages) < n_pass:
        raise ValueError(f"{dataset}: only {len(passages)} distinct passages of {passage_tokens[0]}-{passage_tokens[1]} tokens, {n_pass} needed")
    gen = FactGenerator(seed)
    n_fill = math.floor(items * filler_rate)
    fillers = filler_pool(lm, load_texts(filler), filler_tokens, n_fill, seed) if n_fill else []
    stream, p, f = [], 0, 0
    for k, kind in enumerate(kinds):
        item = passages[p] if kind == "passage" else gen.fact()
        p += kind == "passage"
        qs = item["questions"]
        # one paraphrase per item, drawn once, so an item is asked the same way at every checkpoint
        q = qs[rng.randrange(len(qs))]
        stream.append({"kind": kind, "id": item["id"], "item": k + 1, "text": item["text"], "tokens": len(lm.encode(item["text"])), "question": q, "answers": item["answers"]})
        for _ in range(math.floor((k + 1) * filler_rate) - math.floor(k * filler_rate)):
            stream.append({"kind": "filler", "text": fillers[f], "tokens": len(lm.encode(fillers[f]))})
            f += 1
    return stream


def writes_of(lm, text: str) -> int:
    """Updates a text takes when the design is not run (``max_inject_tokens`` per write)."""
    return max(1, math.ceil(len(lm.encode(text)) / lm.info().details["max_inject_tokens"]))


def ages(updates_after: list[int], tokens_after: list[int], pos: int, at: int) -> tuple[int, int]:
    """(later updates, tokens written since) of the stream element at ``pos`` when the stream
    has been written up to and including element ``at``; the two lists are cumulative counts
    after each element."""
    return updates_after[at] - updates_after[pos], tokens_after[at] - tokens_after[pos]


def asked_items(positions: list[int], limit: int | None) -> list[int]:
    """Which item positions a checkpoint asks: all, or ``limit`` evenly spaced ones that always
    include the first and the newest."""
    if not limit or len(positions) <= limit:
        return list(positions)
    if limit == 1:
        return [positions[-1]]
    idx = sorted({round(i * (len(positions) - 1) / (limit - 1)) for i in range(limit)})
    return [positions[i] for i in idx]


# ---- baseline prompts -----------------------------------------------------------------------------


def window_context(lm, texts: list[str], question: str, window_tokens: int, max_new_tokens: int) -> str:
    """The last texts that fit, with the question and the answer's tokens, in ``window_tokens``:
    whole texts newest last, the oldest dropped first; the newest alone cut to its last tokens
    when even it does not fit."""
    def size(ctx: str) -> int:
        return len(lm.encode(qa_prompt(lm, question, "plain", ctx))) + max_new_tokens

    chosen: list[str] = []
    for t in reversed(texts):
        if size("\n".join([t] + chosen)) > window_tokens:
            break
        chosen.insert(0, t)
    if chosen or not texts:
        return "\n".join(chosen)
    ids = lm.encode(texts[-1])
    room = window_tokens - size("x") + 1
    for _ in range(8):
        if room <= 0:
            return ""
        piece = lm.tokenizer.decode(ids[len(ids) - room :], skip_special_tokens=True)
        over = size(piece) - window_tokens
        if over <= 0:
            return piece
        room -= over
    return ""


def bm25_context(lm, texts: list[str], question: str, budget_tokens: int) -> str:
    """The texts BM25 ranks best for the question, best first while they fit in
    ``budget_tokens`` (a text that does not fit is skipped), joined in stream order; the best
    one cut to the budget when none fits whole."""
    from rank_bm25 import BM25Okapi

    if not texts:
        return ""
    corpus = [metrics.normalize_answer(t).split() or [""] for t in texts]
    scores = BM25Okapi(corpus).get_scores(metrics.normalize_answer(question).split())
    order = sorted(range(len(texts)), key=lambda i: (-scores[i], -i))  # ties: the newer text
    chosen, used = [], 0
    for i in order:
        n = len(lm.encode(texts[i])) + 1
        if used + n <= budget_tokens:
            chosen.append(i)
            used += n
    if not chosen:
        ids = lm.encode(texts[order[0]])[: budget_tokens]
        return lm.tokenizer.decode(ids, skip_special_tokens=True)
    return "\n".join(texts[i] for i in sorted(chosen))


# ---- summaries --------------------------------------------------------------------------------------

UPDATE_BINS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
TOKEN_BINS = (0, 1, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)


def _bin(v: int, edges) -> int:
    """Index of the bin [edges[i], edges[i+1]) holding v (the last bin is open)."""
    i = 0
    while i + 1 < len(edges) and v >= edges[i + 1]:
        i += 1
    return i


def _bin_label(i: int, edges) -> str:
    lo = edges[i]
    hi = edges[i + 1] - 1 if i + 1 < len(edges) else None
    return str(lo) if hi == lo else (f"{lo}-{hi}" if hi is not None else f"{lo}+")


def by_age(rows: list[dict], key: str, edges) -> list[dict]:
    """Recall per age bin (only bins holding answers), with Wilson intervals and the mean age."""
    groups: dict[int, list[dict]] = {}
    for r in rows:
        groups.setdefault(_bin(r[key], edges), []).append(r)
    return [{"bin": _bin_label(i, edges), "from": edges[i], "mean_age": sum(r[key] for r in g) / len(g), **metrics.rate([r["hit"] for r in g])} for i, g in sorted(groups.items())]


def modal_answer(preds: list[str]) -> dict | None:
    """The most frequent normalised answer and its share: one answer given to many different
    questions is the crowding-out signature (issue 15: every question answered with one fact)."""
    norm = [metrics.normalize_answer(p) for p in preds if metrics.normalize_answer(p)]
    if not norm:
        return None
    best = max(sorted(set(norm)), key=norm.count)
    return {"answer": best, "count": norm.count(best), "share": norm.count(best) / len(preds)}


def summarize(stream: list[dict], state: dict, checkpoints: list[int], methods: list[str], details: dict) -> dict:
    """Every figure of the results file, from the stream and the answers measured so far."""
    item_pos = [i for i, s in enumerate(stream) if s["kind"] != "filler"]
    upd, tok = state["updates_after"], state["tokens_after"]
    N, K = details.get("N"), details.get("K")
    none_ans, fresh_ans = state["answers"].get("none", {}), state["answers"].get("fresh", {})
    out_ckpts = []
    for c in checkpoints:
        at = _ckpt_end(stream, item_pos, c)  # the stream up to the c-th item and its fillers
        if at >= len(upd):
            continue
        asked = asked_items(item_pos[:c], state["ident"]["questions_per_checkpoint"])
        entry = {"items": c, "stream_elements": at + 1, "updates": upd[at], "tokens_written": tok[at], "questions": len(asked), "methods": {}}
        for m in methods:
            if m == "fresh":
                continue
            answers = state["answers"]["ckpt"].get(str(c), {}).get(m, {}) if m != "none" else none_ans
            rows = []
            for p in asked:
                a = answers.get(str(p))
                if a is None:
                    continue
                u, t = ages(upd, tok, p, at)
                rows.append({"pos": p, "item": stream[p]["item"], "kind": stream[p]["kind"], "age_updates": u, "age_tokens": t, "age_items": c - stream[p]["item"], "hit": bool(a[1]), "pred": a[0]})
            if not rows:
                continue
            newest = [r for r in rows if r["item"] == c]
            first = [r for r in rows if r["item"] == 1]
            entry["methods"][m] = {
                "recall": metrics.rate([r["hit"] for r in rows]),
                "newest_item": metrics.rate([r["hit"] for r in newest]),
                "first_item": metrics.rate([r["hit"] for r in first]),
                "by_age_updates": by_age(rows, "age_updates", UPDATE_BINS),
                "by_age_tokens": by_age(rows, "age_tokens", TOKEN_BINS),
                "by_kind": {k: metrics.rate([r["hit"] for r in rows if r["kind"] == k]) for k in ("fact", "passage") if any(r["kind"] == k for r in rows)},
                "modal_answer": modal_answer([r["pred"] for r in rows]),
                "complete": len(rows) == len(asked),
            }
        if "fresh" in methods:
            f = [(stream[p]["kind"], bool(fresh_ans[str(p)][1])) for p in asked if str(p) in fresh_ans]
            if f:
                entry["methods"]["fresh"] = {"recall": metrics.rate([h for _, h in f]), "by_kind": {k: metrics.rate([h for kk, h in f if kk == k]) for k in ("fact", "passage") if any(kk == k for kk, _ in f)}, "complete": len(f) == len(asked)}
        out_ckpts.append(entry)
    probe = state["answers"].get("probe", {})
    probe_rows = [(stream[int(p)]["item"], bool(a[1])) for p, a in probe.items()]
    probe_kinds = {k: metrics.rate([bool(a[1]) for p, a in probe.items() if stream[int(p)]["kind"] == k]) for k in ("fact", "passage") if any(stream[int(p)]["kind"] == k for p in probe)}
    bands = [(1, 10), (11, 100), (101, 1000), (1001, 10**9)]
    probe_sum = {
        "all": metrics.rate([h for _, h in probe_rows]),
        "by_kind": probe_kinds,
        "modal_answer": modal_answer([a[0] for a in probe.values()]),
        "by_items_before": [{"items": f"{lo}-{hi}" if hi < 10**9 else f"{lo}+", "earlier_items": f"{lo - 1}-{hi - 1}" if hi < 10**9 else f"{lo - 1}+", **metrics.rate([h for k, h in probe_rows if lo <= k <= hi])} for lo, hi in bands if any(lo <= k <= hi for k, _ in probe_rows)],
    }
    a_u = metrics.rate([bool(a[1]) for a in fresh_ans.values()])["mean"] if fresh_ans else None
    a_b = metrics.rate([bool(a[1]) for a in none_ans.values()])["mean"] if none_ans else None
    theory = None
    if N and K and a_u is not None and a_b is not None:
        ms = list(range(0, max([upd[-1]] if upd else [0]) + 1))
        theory = {"formula": "a_b + (a_u - a_b) * (1 - K/N) ** m after m later updates (paper Eq. 5; a_u fresh-pool recall, a_b no-memory recall)", "N": N, "K": K, "a_u": a_u, "a_b": a_b, "capacity_updates": N // K,
                  "updates": ms, "eq5": [a_b + (a_u - a_b) * (1 - K / N) ** m for m in ms]}
    return {"checkpoints": out_ckpts, "newest_probe": probe_sum, "theory": theory}


# ---- the run --------------------------------------------------------------------------------------


def _save_progress(workdir: Path, state: dict) -> None:
    write_json(workdir / PROGRESS, state)


def _gen(lm, memories, prompts, max_new_tokens) -> list[str]:
    gens = lm.generate_batch(list(memories), list(prompts), chat=False, max_new_tokens=max_new_tokens, temperature=0.0, stop=["\n"])
    return [g.text for g in gens]


def run_facts(
    lm=None,
    *,
    items: int = 100,
    checkpoints: tuple[int, ...] | list[int] | str = (10, 100, 1000),
    methods: tuple[str, ...] | list[str] | str = ALL_METHODS,
    passage_share: float = 0.5,
    dataset: str = "counterfactual_qa",
    min_passage_tokens: int = 16,
    max_passage_tokens: int = 512,
    max_answer_tokens: int | None = 4,
    filler: str = "news_articles",
    filler_rate: float = 0.5,
    filler_tokens: int = 128,
    questions_per_checkpoint: int | None = None,
    probe: bool = True,
    window_tokens: int | None = None,
    bm25_tokens: int = 512,
    max_new_tokens: int = 10,
    batch_size: int = 8,
    checkpoint_every: int = 25,
    workdir: str | None = None,
    resume: bool = True,
    max_seconds: float | None = None,
    heldout_only: bool | None = None,
    seed: int = 0,
    out=None,
    plot: bool = True,
    threads: int | None = None,
    progress: bool = False,
    **model_options,
) -> dict:
    lm, clock = start_task(lm, threads, model_options)
    details = lm.info().details
    checkpoints = as_list(checkpoints, int)
    methods = as_list(methods)
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad:
        raise ValueError(f"unknown facts method(s) {bad}; choose from {', '.join(ALL_METHODS)}")
    checkpoints = sorted({int(c) for c in checkpoints if 0 < int(c) <= items} | {items})
    window_tokens = int(window_tokens or details["context_window"])
    use_memory = "memory" in methods
    probe = probe and use_memory
    ident = {"items": items, "checkpoints": checkpoints, "methods": methods, "passage_share": passage_share, "dataset": str(dataset), "passage_tokens": [min_passage_tokens, max_passage_tokens], "max_answer_tokens": max_answer_tokens, "filler": str(filler), "filler_rate": filler_rate, "filler_tokens": filler_tokens, "questions_per_checkpoint": questions_per_checkpoint, "probe": probe, "window_tokens": window_tokens, "bm25_tokens": bm25_tokens, "max_new_tokens": max_new_tokens, "seed": seed, "model_id": lm.model_id}
    if heldout_only is not None:  # only when asked, so runs started before the option still resume
        ident["heldout_only"] = bool(heldout_only)
    stream = build_stream(lm, items=items, seed=seed, passage_share=passage_share, dataset=dataset, passage_tokens=(min_passage_tokens, max_passage_tokens), max_answer_tokens=max_answer_tokens, filler=filler, filler_rate=filler_rate, filler_tokens=filler_tokens, heldout_only=heldout_only)
    tag = f"{Path(str(dataset)).stem}_{items}"
    workdir = Path(workdir) if workdir else Path("runs") / "eval" / f"facts_{tag}_seed{seed}"
    workdir.mkdir(parents=True, exist_ok=True)
    state = None
    if resume and (workdir / PROGRESS).is_file():
        state = json.loads((workdir / PROGRESS).read_text())
        if state["ident"] != ident:
            raise ValueError(f"{workdir} holds a run with different settings {state['ident']} (now {ident}); use another --workdir or --no-resume")
    if state is None:
        state = {"ident": ident, "memory_pos": 0, "memory_file": None, "updates_after": [], "tokens_after": [], "answers": {"none": {}, "fresh": {}, "probe": {}, "ckpt": {}}, "seconds": 0.0, "sessions": []}
    mem = None
    if use_memory:
        mem = lm.load_memory(workdir / state["memory_file"]) if state["memory_file"] else lm.new_memory(seed=seed)
    pos = state["memory_pos"]
    del state["updates_after"][pos:], state["tokens_after"][pos:]  # re-measured from the saved memory on
    session_t0, session_from = time.perf_counter(), pos
    item_pos = [i for i, s in enumerate(stream) if s["kind"] != "filler"]
    ckpt_at = {_ckpt_end(stream, item_pos, c): c for c in checkpoints}
    texts = [s["text"] for s in stream]
    prompts = {p: qa_prompt(lm, stream[p]["question"], "plain") for p in item_pos}
    ans = state["answers"]

    def log(msg: str) -> None:
        if progress:
            print(f"[facts] {msg} ({clock():.0f} s)", file=sys.stderr, flush=True)

    def result(complete: bool) -> dict:
        return {
            "task": "facts",
            "complete": complete,
            "options": {**{k: v for k, v in ident.items() if k != "model_id"}, "workdir": str(workdir)},
            "model": model_info(lm),
            "capacity": {k: details.get(k) for k in ("capacity_updates", "capacity_tokens", "max_inject_tokens", "context_window")},
            "stream": _stream_stats(lm, stream, state),
            **summarize(stream, state, checkpoints, methods, details),
            "items": [{"item": s["item"], "kind": s["kind"], "id": s["id"], "text": s["text"], "question": s["question"], "answers": s["answers"]} for s in stream if s["kind"] != "filler"],
            "answers": ans,
            "timing": {"total_seconds": round(state["seconds"] + (time.perf_counter() - session_t0), 2), "sessions": state["sessions"]},
            "env": environment(),
        }

    def save(with_memory: bool) -> None:
        if with_memory and mem is not None:
            name = f"memory-{pos:07d}.safetensors"
            old = state["memory_file"]
            mem.save(workdir / name)
            state["memory_file"] = name
            state["memory_pos"] = pos
            if old and old != name and (workdir / old).exists():
                (workdir / old).unlink()
        elif with_memory:
            state["memory_pos"] = pos
        _save_progress(workdir, {**state, "seconds": state["seconds"] + (time.perf_counter() - session_t0)})
        write_json(results_path(out, "facts", tag), result(False))

    def over_time() -> bool:  # max_seconds reached, or SIGTERM: stop after the current batch
        return (max_seconds is not None and clock() >= max_seconds) or stop.flag

    def answer(store: dict, todo: list[int], make, memories) -> bool:
        """Answer ``todo`` (item positions) in batches, recording each batch as measured; False
        when stopped by max_seconds."""
        todo = [p for p in todo if str(p) not in store]
        for s in range(0, len(todo), batch_size):
            if over_time():
                return False
            part = todo[s : s + batch_size]
            preds = _gen(lm, memories(part), [make(p) for p in part], max_new_tokens)
            for p, pred in zip(part, preds):
                store[str(p)] = [pred, int(metrics.hit(pred, stream[p]["answers"]))]
            save(False)
        return True

    stopped = "done"
    stop = _Stop().__enter__()
    try:
        while True:
            c = ckpt_at.get(pos - 1) if pos > 0 else None
            if c is not None and not _ckpt_done(state, c, methods, stream, item_pos, questions_per_checkpoint):
                log(f"checkpoint {c} items: {upd_now(state)} updates")
                asked = asked_items(item_pos[:c], questions_per_checkpoint)
                store = ans["ckpt"].setdefault(str(c), {})
                written = texts[:pos]
                ok = True
                if "none" in methods:
                    ok = ok and answer(ans["none"], asked, lambda p: prompts[p], lambda part: [None] * len(part))
                if ok and "fresh" in methods:
                    ok = _fresh(lm, ans["fresh"], asked, stream, prompts, seed, batch_size, max_new_tokens, save, over_time)
                if ok and use_memory:
                    ok = answer(store.setdefault("memory", {}), asked, lambda p: prompts[p], lambda part: [mem] * len(part))
                # cheapest first (the window's long prompts last), so a stopped run has the most methods
                if ok and "bm25" in methods:
                    ok = answer(store.setdefault("bm25", {}), asked, lambda p: qa_prompt(lm, stream[p]["question"], "plain", bm25_context(lm, written, stream[p]["question"], bm25_tokens)), lambda part: [None] * len(part))
                if ok and "window" in methods:
                    ok = answer(store.setdefault("window", {}), asked, lambda p: qa_prompt(lm, stream[p]["question"], "plain", window_context(lm, written, stream[p]["question"], window_tokens, max_new_tokens)), lambda part: [None] * len(part))
                if not ok:
                    stopped = "signal" if stop.flag else "max_seconds"
                    break
                for m in methods:
                    if m in ("none", "fresh"):
                        continue
                    v = metrics.rate([store[m][str(p)][1] for p in asked]) if m in store else None
                    if v:
                        log(f"checkpoint {c}: {m} recall {v['mean']:.3f} ({v['n']} questions)")
            if pos == len(stream):
                break
            if over_time():
                stopped = "signal" if stop.flag else "max_seconds"
                break
            el = stream[pos]
            if use_memory:
                r = lm.inject(mem, el["text"], allow_short=True, progress=False)
                state["updates_after"].append(lm.info(mem).update_count)
                state["tokens_after"].append((state["tokens_after"][-1] if state["tokens_after"] else 0) + r.num_tokens)
            else:
                state["updates_after"].append((state["updates_after"][-1] if state["updates_after"] else 0) + writes_of(lm, el["text"]))
                state["tokens_after"].append((state["tokens_after"][-1] if state["tokens_after"] else 0) + el["tokens"])
            pos += 1
            if probe and el["kind"] != "filler" and str(pos - 1) not in ans["probe"]:
                pred = _gen(lm, [mem], [prompts[pos - 1]], max_new_tokens)[0]
                ans["probe"][str(pos - 1)] = [pred, int(metrics.hit(pred, el["answers"]))]
                if el["item"] % 10 == 0:
                    recent = [a[1] for a in list(ans["probe"].values())[-10:]]
                    log(f"item {el['item']}/{items}, {state['updates_after'][-1]} updates, newest-item recall of the last 10: {sum(recent)}/{len(recent)}")
            if (pos - 1) in ckpt_at or pos - state["memory_pos"] >= checkpoint_every:
                save(True)
    except KeyboardInterrupt:
        stopped = "interrupted"
    except Exception as e:  # keep what was measured (the memory file stays the last consistent one)
        state["sessions"].append({"from": session_from, "to": pos, "seconds": round(time.perf_counter() - session_t0, 2), "stopped": f"error: {type(e).__name__}"})
        state["seconds"] += time.perf_counter() - session_t0
        session_t0 = time.perf_counter()
        save(False)
        raise
    finally:
        stop.__exit__()
    session_s = time.perf_counter() - session_t0
    state["sessions"].append({"from": session_from, "to": pos, "seconds": round(session_s, 2), "stopped": stopped})
    state["seconds"] += session_s
    session_t0 = time.perf_counter()
    save(True)
    from .plots import plot_facts

    log(f"stopped: {stopped}")
    return finish({**result(stopped == "done"), "stopped": stopped}, out, "facts", tag, plot_facts if plot else None)


def upd_now(state: dict) -> int:
    return state["updates_after"][-1] if state["updates_after"] else 0


def _ckpt_end(stream: list[dict], item_pos: list[int], c: int) -> int:
    """The stream position after which checkpoint ``c`` is asked: the c-th item and the fillers
    that follow it (the last element of the stream for the last checkpoint)."""
    return item_pos[c] - 1 if c < len(item_pos) else len(stream) - 1


def _ckpt_done(state: dict, c: int, methods: list[str], stream, item_pos, limit) -> bool:
    asked = asked_items(item_pos[:c], limit)
    a = state["answers"]
    for m in methods:
        store = a["none"] if m == "none" else a["fresh"] if m == "fresh" else a["ckpt"].get(str(c), {}).get(m, {})
        if any(str(p) not in store for p in asked):
            return False
    return True


def _fresh(lm, store: dict, asked: list[int], stream, prompts, seed: int, batch_size: int, max_new_tokens: int, save, over_time) -> bool:
    """Each item alone in an empty memory (the fresh-pool reference), in batches."""
    todo = [p for p in asked if str(p) not in store]
    for s in range(0, len(todo), batch_size):
        if over_time():
            return False
        part = todo[s : s + batch_size]
        mems = [lm.new_memory(seed=seed * 1_000_003 + p) for p in part]
        lm.inject(mems, [stream[p]["text"] for p in part], allow_short=True, progress=False)
        preds = _gen(lm, mems, [prompts[p] for p in part], max_new_tokens)
        for p, pred in zip(part, preds):
            store[str(p)] = [pred, int(metrics.hit(pred, stream[p]["answers"]))]
        save(False)
    return True


def _stream_stats(lm, stream: list[dict], state: dict) -> dict:
    out = {}
    for kind in ("fact", "passage", "filler"):
        toks = [s["tokens"] for s in stream if s["kind"] == kind]
        if toks:
            out[kind] = {"count": len(toks), "tokens_min": min(toks), "tokens_mean": round(sum(toks) / len(toks), 1), "tokens_max": max(toks)}
    out["elements"] = len(stream)
    out["written"] = len(state["updates_after"])
    out["updates"] = state["updates_after"][-1] if state["updates_after"] else 0
    out["tokens"] = state["tokens_after"][-1] if state["tokens_after"] else 0
    return out
