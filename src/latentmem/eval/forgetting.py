"""Forgetting (``eval compare``): is ``forget`` exact, and what does exactness cost?

A memory receives ``size`` synthetic facts (``eval/synthetic.py``), one injection each. Then,
for ``forgets`` of them (evenly spaced, the first and the newest included), each on its own
copy of the full memory:

* ``forget(copy, id)`` is timed and its ``ForgetResult`` kept (``exact`` as claimed, units removed);
* the *replay*, a fresh memory that receives every other fact in the same order under the same
  injection ids, is timed: it is what a store does to make a non-exact forget exact;
* ``verified``: the forgotten copy equals the replay (``Memory.equal``), the definition of exact;
* the forgotten fact's question is asked before (full memory), after ``forget`` and from the
  replay: a forget that works brings the first figure down to the replay's.

``cost_seconds`` per forget is the forget alone where it verified exact, else forget + replay.
Only the shared interface is used.
"""

from __future__ import annotations

import time

from . import metrics
from .facts import asked_items
from .synthetic import FactGenerator
from ..text import qa_prompt


def _ask(lm, memories, questions, max_new_tokens: int) -> list[str]:
    gens = lm.generate_batch(list(memories), [qa_prompt(lm, q, "plain") for q in questions], chat=False, max_new_tokens=max_new_tokens, temperature=0.0, stop=["\n"])
    return [g.text for g in gens]


def measure_forgetting(lm, *, size: int, forgets: int = 5, seed: int = 0, max_new_tokens: int = 8) -> dict:
    if size < 1 or forgets < 1:
        raise ValueError(f"forgetting needs size >= 1 and forgets >= 1, got {size}, {forgets}")
    facts = FactGenerator(seed).facts(size)
    full = lm.new_memory(seed=seed)
    ids = [lm.inject(full, f["text"], allow_short=True, progress=False).injection_id for f in facts]
    victims = asked_items(list(range(size)), forgets)
    rows, forgotten, replays = [], [], []
    for v in victims:
        mem = full.clone()
        t0 = time.perf_counter()
        r = lm.forget(mem, ids[v])
        forget_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = lm.new_memory(seed=seed)
        for j, f in enumerate(facts):
            if j != v:
                lm.inject(ref, f["text"], allow_short=True, progress=False, injection_id=ids[j])
        replay_s = time.perf_counter() - t0
        verified = bool(mem.equal(ref))
        rows.append({"fact": v + 1, "claimed_exact": bool(r.exact), "verified_exact": verified, "removed_units": r.removed_units,
                     "differences": [] if verified else [str(d) for d in lm.differences(mem, ref)[:3]], "note": r.note,
                     "timing": {"forget_seconds": forget_s, "replay_seconds": replay_s, "cost_seconds": forget_s if verified else forget_s + replay_s}})
        forgotten.append(mem)
        replays.append(ref)
    qs = [facts[v]["questions"][0] for v in victims]
    answers = {k: _ask(lm, mems, qs, max_new_tokens) for k, mems in (("before", [full] * len(victims)), ("after_forget", forgotten), ("replay", replays))}
    for i, (row, v) in enumerate(zip(rows, victims)):
        row["hits"] = {k: bool(metrics.hit(a[i], facts[v]["answers"])) for k, a in answers.items()}
        row["answers"] = {k: a[i] for k, a in answers.items()}
    n = len(rows)
    return {
        "facts_in_memory": size,
        "forgets": n,
        "forget_exact_declared": bool(lm.forget_exact),
        "claimed_exact": metrics.rate([r["claimed_exact"] for r in rows]),
        "verified_exact": metrics.rate([r["verified_exact"] for r in rows]),
        "claims_agree": all(r["claimed_exact"] == r["verified_exact"] for r in rows),
        "forgotten_recall": {k: metrics.rate([r["hits"][k] for r in rows]) for k in answers},
        "timing": {k: sum(r["timing"][k] for r in rows) / n for k in ("forget_seconds", "replay_seconds", "cost_seconds")},
        "rows": rows,
    }
