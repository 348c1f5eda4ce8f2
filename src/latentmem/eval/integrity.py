"""Model integrity under an endless stream of updates (paper section 4.6, Figure 6).

The dataset's contexts are injected one after another into one pool; after each pass the
dataset is reshuffled (a seeded permutation per pass) and injected again, so the stream never
ends. After every ``eval_every``-th injection the model answers the question of the context
just injected; the accuracy over the last ``window`` answers is the paper's curve (flat over
650k updates for the 7B model). Every ``health_every`` updates the memory's health is recorded
(the design's ``lm.health``; MemoryLLM: per-layer mean token norm, NaN/Inf count, relative
change since the previous check (drift), the fractions of slots rewritten since then and since
the run began).

The run is resumable: every ``checkpoint_every`` updates the pool is saved to
``workdir/memory-<n>.safetensors`` and then ``workdir/progress.json`` (the answers so far, health,
the place in the stream) is replaced atomically to point at it, so a crash or kill at any moment
leaves a consistent checkpoint. Run it again with the same options to continue; ``max_updates``
and ``max_seconds`` bound each invocation (SIGINT/SIGTERM also stop it cleanly after a checkpoint).
"""

from __future__ import annotations

import json
import random
import signal
import sys
import threading
import time
from pathlib import Path

from . import metrics
from .common import environment, finish, generate, model_info, start_task, write_json
from .data import load_qa, eval_rows_only
from ..text import qa_prompt
from .retention import default_max_answer_tokens

PROGRESS = "progress.json"


def _perm(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def health(lm, pool, prev, start_injection: int) -> tuple[dict, object]:
    """One health row: the pool's update count and the design's diagnostics (``lm.health``);
    ``prev`` is the snapshot the previous check returned (None: the first check of a session)."""
    h, snapshot = lm.health(pool, prev, since_injection=start_injection)
    return {"updates": pool.update_count, **h}, snapshot


class _Stop:
    def __init__(self):
        self.flag = False
        self.old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGTERM, self._set)
        return self

    def _set(self, *_):
        self.flag = True

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)


def run_integrity(
    lm=None,
    *,
    dataset: str = "counterfactual_qa",
    max_updates: int = 1000,
    max_seconds: float | None = None,
    window: int = 1000,
    eval_every: int = 1,
    health_every: int = 100,
    checkpoint_every: int = 500,
    workdir: str | None = None,
    resume: bool = True,
    max_new_tokens: int = 10,
    prompt: str = "plain",
    max_answer_tokens: int | str | None = "auto",
    seed: int = 0,
    out=None,
    plot: bool = True,
    threads: int | None = None,
    progress: bool = False,
    curve_points: int = 2000,
    **model_options,
) -> dict:
    """Inject until the pool has ``max_updates`` updates (in total, over all resumed runs)."""
    lm, clock = start_task(lm, threads, model_options)
    if max_answer_tokens == "auto":
        max_answer_tokens = default_max_answer_tokens(dataset)
    rows = [r for r in load_qa(dataset, shuffle=False, heldout_only=eval_rows_only(lm)) if not max_answer_tokens or len(lm.encode(" " + r["answer"])) <= max_answer_tokens]
    if not rows:
        raise ValueError(f"{dataset}: no usable rows")
    workdir = Path(workdir) if workdir else Path("runs") / "eval" / f"integrity_{Path(str(dataset)).stem}_seed{seed}"
    workdir.mkdir(parents=True, exist_ok=True)
    ident = {"dataset": str(dataset), "seed": seed, "model_id": lm.model_id, "rows": len(rows), "prompt": prompt, "max_new_tokens": max_new_tokens, "eval_every": eval_every, "max_answer_tokens": max_answer_tokens}
    state = None
    if resume and (workdir / PROGRESS).is_file():
        state = json.loads((workdir / PROGRESS).read_text())
        if state["ident"] != ident:
            raise ValueError(f"{workdir} holds a run with different settings {state['ident']} (now {ident}); use another --workdir or --no-resume")
        pool = lm.load_memory(workdir / state["memory_file"])
        if progress:
            print(f"[integrity] resuming at {pool.update_count} updates from {workdir}", file=sys.stderr, flush=True)
    else:
        pool = lm.new_memory(seed=seed)
        state = {"ident": ident, "epoch": 0, "pos": 0, "injections": 0, "hits": "", "chunks": "", "health": [], "seconds": 0.0, "sessions": [], "memory_file": None, "start_injection": 0}
    hits = list(state["hits"])
    chunks = list(state.get("chunks", ""))
    health_rows = state["health"]
    epoch, pos, injections = state["epoch"], state["pos"], state["injections"]
    order = _perm(len(rows), seed, epoch)
    prev = None
    session_start_updates = pool.update_count
    session_t0 = time.perf_counter()
    inject_s = read_s = 0.0

    def checkpoint():
        name = f"memory-{pool.update_count:09d}.safetensors"
        pool.save(workdir / name)
        old = state.get("memory_file")
        state.update(epoch=epoch, pos=pos, injections=injections, hits="".join(hits), chunks="".join(chunks), health=health_rows, memory_file=name)
        write_json(workdir / PROGRESS, {**state, "seconds": state["seconds"] + (time.perf_counter() - session_t0)})
        if old and old != name and (workdir / old).exists():
            (workdir / old).unlink()

    next_health = (pool.update_count // health_every + 1) * health_every if health_every else None
    next_ckpt = (pool.update_count // checkpoint_every + 1) * checkpoint_every
    if not health_rows:
        h, prev = health(lm, pool, None, state["start_injection"])
        health_rows.append(h)
    stopped = "max_updates"
    with _Stop() as stop:
        try:
            while pool.update_count < max_updates:
                if max_seconds is not None and clock() >= max_seconds:
                    stopped = "max_seconds"
                    break
                if stop.flag:
                    stopped = "signal"
                    break
                row = rows[order[pos]]
                t0 = time.perf_counter()
                r = lm.inject(pool, row["context"], allow_short=True, progress=False)
                chunks.append(str(min(9, r.num_chunks)))
                inject_s += time.perf_counter() - t0
                injections += 1
                if injections % eval_every == 0:
                    t0 = time.perf_counter()
                    out_text = generate(lm, [pool], [qa_prompt(lm, row["question"], prompt)], max_new_tokens)[0]
                    read_s += time.perf_counter() - t0
                    hits.append("1" if metrics.hit(out_text, row["answers"]) else "0")
                pos += 1
                if pos == len(rows):
                    epoch, pos = epoch + 1, 0
                    order = _perm(len(rows), seed, epoch)
                if next_health is not None and pool.update_count >= next_health:
                    h, prev = health(lm, pool, prev, state["start_injection"])
                    health_rows.append(h)
                    next_health = (pool.update_count // health_every + 1) * health_every
                    if progress:
                        acc = sum(map(int, hits[-window:])) / max(1, len(hits[-window:]))
                        rate_now = (pool.update_count - session_start_updates) / (time.perf_counter() - session_t0)
                        print(f"[integrity] {pool.update_count} updates, window acc {acc:.3f}, mean norm {h['mean_norm']:.3f}, nonfinite {h['nonfinite']}, {rate_now:.2f} updates/s", file=sys.stderr, flush=True)
                if pool.update_count >= next_ckpt:
                    checkpoint()
                    next_ckpt = (pool.update_count // checkpoint_every + 1) * checkpoint_every
        except KeyboardInterrupt:
            stopped = "interrupted"
    session_s = time.perf_counter() - session_t0
    session_updates = pool.update_count - session_start_updates
    state["sessions"].append({"updates_from": session_start_updates, "updates_to": pool.update_count, "seconds": round(session_s, 2), "updates_per_second": round(session_updates / session_s, 4) if session_s > 0 else None, "stopped": stopped})
    checkpoint()
    state["seconds"] += session_s

    flags = [int(c) for c in hits]
    win = metrics.sliding_mean(flags, window)
    step = max(1, len(flags) // curve_points)
    idx = list(range(step - 1, len(flags), step))
    cum, total = [], 0
    for c in chunks:
        total += int(c)
        cum.append(total)
    offset = pool.update_count - total  # updates made before chunk counts were recorded (none normally)

    def updates_at_answer(i: int) -> int:
        j = (i + 1) * eval_every - 1
        return offset + cum[min(j, len(cum) - 1)] if cum else pool.update_count
    half = len(flags) // 2
    result = {
        "task": "integrity",
        "dataset": str(dataset),
        "rows": len(rows),
        "options": {"window": window, "eval_every": eval_every, "health_every": health_every, "checkpoint_every": checkpoint_every, "max_updates": max_updates, "prompt": prompt, "max_new_tokens": max_new_tokens, "seed": seed, "workdir": str(workdir)},
        "model": model_info(lm),
        "progress": {"updates": pool.update_count, "injections": injections, "answers": len(flags), "passes_completed": epoch, "stopped": stopped, "target_updates": max_updates},
        "accuracy": {
            "all": metrics.rate(flags),
            "first_half": metrics.rate(flags[:half]),
            "second_half": metrics.rate(flags[half:]),
            "last_window": metrics.rate(flags[-window:]),
        },
        "curve": {"answers": [i + 1 for i in idx], "updates": [updates_at_answer(i) for i in idx], "window_accuracy": [round(win[i], 5) for i in idx]},
        "health": health_rows,
        "health_summary": {"nonfinite_ever": any(h["nonfinite"] for h in health_rows), "mean_norm_first": health_rows[0]["mean_norm"], "mean_norm_last": health_rows[-1]["mean_norm"]},
        "timing": {"sessions": state["sessions"], "total_seconds": round(state["seconds"], 2), "this_session_inject_seconds": round(inject_s, 2), "this_session_read_seconds": round(read_s, 2)},
        "env": environment(),
    }
    from .plots import plot_integrity

    return finish(result, out, "integrity", Path(str(dataset)).stem, plot_integrity if plot else None)
