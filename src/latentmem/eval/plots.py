"""PNG plots of the evaluation results (matplotlib, Agg backend, written atomically)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .common import atomic_write_bytes  # noqa: E402


def _save(fig, path: str | os.PathLike) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def _subtitle(res: dict) -> str:
    """The model and the memory weights it ran with (every plot says which weights it shows)."""
    m = res.get("model", {})
    trained = m.get("trained_memory_weights")
    w = m.get("applied_weights") or {}
    if trained is False:
        note = ", memory weights UNTRAINED"
    elif isinstance(w, dict) and w.get("sha256"):
        folder = Path(str(w.get("path", ""))).parent.name  # runs/train_stage5/... -> train_stage5
        note = f", memory weights {folder + ' ' if folder not in ('', 'assets') else ''}sha256 {w['sha256'][:8]}"
    else:
        note = ""
    return f"{m.get('name', '?')} (N={m.get('N')}, K={m.get('K')}{note})"


def _legend(ax, **kw) -> None:
    """A legend only when something carries a label (an empty one is a box with no entries)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**{"fontsize": 7, **kw})


def plot_retention(res: dict, path) -> Path:
    steps = res["steps"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    acc = [s["hit"]["mean"] for s in steps]
    lo = [s["hit"]["ci95"][0] for s in steps]
    hi = [s["hit"]["ci95"][1] for s in steps]
    t = [s["step"] for s in steps]
    ax.plot(t, acc, "o-", label="MemoryLLM (hit rate)")
    ax.fill_between(t, lo, hi, alpha=0.2)
    ax.axhline(res["no_context"]["hit"]["mean"], color="gray", ls="--", label="no context (a_b)")
    if res.get("context_in_prompt"):
        ax.axhline(res["context_in_prompt"]["hit"]["mean"], color="green", ls=":", label="context in prompt")
    if res["theory"]["eq5"] is not None:  # MemoryLLM's curve; other designs have none
        ax.plot(t, res["theory"]["eq5"], "r-.", label=f"Eq. 5 ((N-K)/N)^(t-1), N={res['model']['N']}, K={res['model']['K']}")
    ax.set_xlabel("step (context injected at step 1, one unrelated context per later step)")
    ax.set_ylabel("hit rate (answer in 10 generated tokens)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    ax.set_title(f"Retention: {res['dataset']} ({res['rows']} rows)", fontsize=9)
    ax = axes[1]
    ll = [s["answer_logprob"]["mean"] for s in steps]
    ax.plot(t, ll, "o-", label="MemoryLLM")
    ax.fill_between(t, [s["answer_logprob"]["ci95"][0] for s in steps], [s["answer_logprob"]["ci95"][1] for s in steps], alpha=0.2)
    ax.axhline(res["no_context"]["answer_logprob"]["mean"], color="gray", ls="--", label="no context")
    if res.get("context_in_prompt"):
        ax.axhline(res["context_in_prompt"]["answer_logprob"]["mean"], color="green", ls=":", label="context in prompt")
    ax.set_xlabel("step")
    ax.set_ylabel("log P(answer) per token (teacher-forced)")
    ax.legend(fontsize=7)
    ax.set_title("answer log-likelihood", fontsize=9)
    fig.suptitle(_subtitle(res), fontsize=9)  # a figure title: panel titles side by side overlap
    fig.subplots_adjust(top=0.84)
    return _save(fig, path)


def plot_integrity(res: dict, path) -> Path:
    c = res["curve"]
    h = res["health"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    if c["updates"]:
        ax.plot(c["updates"], c["window_accuracy"], "-", label=f"accuracy, last {res['options']['window']} contexts")
    ax.set_xlabel("updates")
    ax.set_ylabel("accuracy on the most recent context")
    ax.set_ylim(-0.02, 1.02)
    _legend(ax)
    ax.set_title(f"Integrity: {res['dataset']}, {res['progress']['updates']} updates", fontsize=9)
    ax = axes[1]
    if h:
        xs = [r["updates"] for r in h]
        norms = list(zip(*[r["layer_norm"] for r in h]))
        for li in sorted({0, len(norms) // 2, len(norms) - 1}):
            ax.plot(xs, norms[li], label=f"layer {li}")
        ax.plot(xs, [r["mean_norm"] for r in h], "k--", label="mean over layers")
        bad = [r["updates"] for r in h if r["nonfinite"]]
        for b in bad:
            ax.axvline(b, color="red", alpha=0.3)
    ax.set_xlabel("updates")
    ax.set_ylabel("mean L2 norm of memory tokens")
    _legend(ax)
    ax.set_title("memory health (red lines: NaN/Inf found)", fontsize=9)
    ax = axes[2]
    if h:
        d = [(r["updates"], r["drift"]) for r in h if r["drift"] is not None]
        if d:
            ax.plot(*zip(*d), "-", label="relative change of the pool since last check")
        rw = [(r["updates"], r["rewritten_since_last_check"]) for r in h if r.get("rewritten_since_last_check") is not None]
        if rw:
            ax.plot(*zip(*rw), ":", label="fraction of slots rewritten since last check")
    ax.set_xlabel("updates")
    ax.set_ylabel("drift")
    _legend(ax)
    ax.set_title("pool drift", fontsize=9)
    fig.suptitle(_subtitle(res), fontsize=9)
    fig.subplots_adjust(top=0.84)
    return _save(fig, path)


def plot_editing(res: dict, path) -> Path:
    methods = list(res["methods"])
    metrics = ["efficacy", "generalization", "specificity", "score"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    for ax, kind in zip(axes, ("generation", "probability")):
        width = 0.8 / max(1, len(methods))
        for i, m in enumerate(methods):
            vals = [res["methods"][m][kind][k]["mean"] if k != "score" else res["methods"][m][kind]["score"] for k in metrics]
            ax.bar([j + i * width for j in range(len(metrics))], vals, width, label=m)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(metrics))])
        ax.set_xticklabels(metrics)
        ax.set_ylim(0, 1.02)
        ax.set_title(f"editing ({kind}: {'answer generated' if kind == 'generation' else 'P(new) > P(old)'}), {res['edits']} edits", fontsize=9)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(methods), fontsize=7, frameon=False, bbox_to_anchor=(0.5, -0.04))
    fig.suptitle(_subtitle(res), fontsize=9)
    fig.subplots_adjust(bottom=0.16, top=0.85)
    return _save(fig, path)


def plot_longqa(res: dict, path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    lengths = sorted(res["options"]["lengths"])
    nan = float("nan")
    drawn = [m for m, by_len in res["methods"].items() if any(by_len.get(str(L)) for L in lengths)]
    for m, by_len in res["methods"].items():
        # every length on the x axis, NaN where this method has no result: the line breaks there
        # instead of joining the lengths either side of a missing one
        rows = [by_len.get(str(L)) for L in lengths]
        if not any(rows):
            continue  # nothing measured: no line and no legend entry
        mean = [r["f1"]["mean"] if r else nan for r in rows]
        err = [[max(0.0, r["f1"]["mean"] - r["f1"]["ci95"][0]) if r else nan for r in rows],
               [max(0.0, r["f1"]["ci95"][1] - r["f1"]["mean"]) if r else nan for r in rows]]
        shift = 1.02 ** (drawn.index(m) - (len(drawn) - 1) / 2)  # methods side by side, not on top of each other
        axes[0].errorbar([L * shift for L in lengths], mean, yerr=err, marker="o", capsize=3, label=m)
        sec = res["timing"]["seconds_per_question"].get(m, {})
        axes[1].plot(lengths, [sec.get(str(L), nan) if r else nan for L, r in zip(lengths, rows)], "o-", label=m)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.minorticks_off()  # log-scale minor labels overlap the ones set below
        ax.set_xlim(min(lengths) / 1.4, max(lengths) * 1.4)
        ax.set_xticks(lengths)
        ax.set_xticklabels([f"{L // 1024}k" if L >= 1024 else str(L) for L in lengths])
        ax.set_xlabel("document length (tokens)")
        _legend(ax)
    axes[0].set_ylabel("LongBench QA F1")
    axes[0].set_title(f"long-context QA: {res['dataset']} ({res['questions']} questions per length)", fontsize=9)
    axes[1].set_ylabel("seconds per question")
    axes[1].set_title("time per question", fontsize=9)
    fig.suptitle(_subtitle(res), fontsize=9)
    fig.subplots_adjust(top=0.84)
    return _save(fig, path)


_FACTS_STYLE = {"memory": ("C0", "o-"), "window": ("C2", "s-"), "bm25": ("C1", "^-"), "none": ("C7", "x--")}
_FACTS_LABEL = {"memory": "memory (one memory, whole stream)", "window": "last texts that fit in the prompt", "bm25": "BM25 retrieval into the prompt", "none": "no memory"}


def plot_facts(res: dict, path) -> Path:
    """Recall against age (later updates) at each checkpoint, one line per method, 95% Wilson
    bands; points only where a bin holds answers (empty bins break the line); the fresh-pool
    recall and Eq. 5 as reference lines; one legend below the panels."""
    ckpts = res.get("checkpoints") or []
    n = max(1, len(ckpts))
    fig, axes = plt.subplots(1, n, figsize=(4.6 * n + 1, 4.2), squeeze=False)
    handles: dict[str, object] = {}
    th = res.get("theory")
    for ax, c in zip(axes[0], ckpts or [None]):
        if c is None:
            ax.text(0.5, 0.5, "nothing measured yet", ha="center", transform=ax.transAxes)
            continue
        top = 1
        for j, (m, (color, style)) in enumerate(_FACTS_STYLE.items()):
            v = c["methods"].get(m)
            if not v:
                continue
            from .facts import UPDATE_BINS

            # x = mean age + 1 on a log axis (age 0 = the newest item), methods nudged apart so
            # their error bars do not overlap; a NaN where a bin between two measured ones is
            # empty, so no line is drawn across it
            xs, ys, lo, hi, prev = [], [], [], [], None
            for b in v["by_age_updates"]:
                k = UPDATE_BINS.index(b["from"])
                if prev is not None and k > prev + 1:
                    xs.append(float("nan")), ys.append(float("nan")), lo.append(0.0), hi.append(0.0)
                prev = k
                xs.append((b["mean_age"] + 1) * 1.06 ** (j - 1.5))
                ys.append(b["mean"])
                lo.append(max(0.0, b["mean"] - b["ci95"][0]))  # Wilson bounds can miss 0 or 1 by rounding
                hi.append(max(0.0, b["ci95"][1] - b["mean"]))
            top = max([top] + [x for x in xs if x == x])
            h = ax.errorbar(xs, ys, yerr=[lo, hi], fmt=style, color=color, ms=4, lw=1.2, elinewidth=0.8, capsize=2, alpha=0.9)
            handles.setdefault(_FACTS_LABEL[m], h)
        pr = (res.get("newest_probe") or {}).get("all")
        if pr and pr["n"] and c is ckpts[-1]:  # age 0: each item asked right after it was written
            h = ax.errorbar([1], [pr["mean"]], yerr=[[max(0.0, pr["mean"] - pr["ci95"][0])], [max(0.0, pr["ci95"][1] - pr["mean"])]], fmt="*", color="C0", ms=9, capsize=3)
            handles.setdefault(f"memory, newest item asked right after its write (all {pr['n']} items)", h)
        fr = c["methods"].get("fresh")
        if fr:
            h = ax.axhline(fr["recall"]["mean"], color="C3", ls=":", lw=1)
            handles.setdefault("each item alone in an empty memory", h)
        if th:
            ms = [m for m in th["updates"] if m + 1 <= top]
            if ms:
                (h,) = ax.plot([m + 1 for m in ms], [th["eq5"][m] for m in ms], "-.", color="C4", lw=1)
                handles.setdefault(f"Eq. 5 from the fresh-pool recall (N={th['N']}, K={th['K']})", h)
            h = ax.axvline(th["capacity_updates"] + 1, color="0.6", lw=0.8, ls="--")
            handles.setdefault(f"nominal capacity: N/K = {th['capacity_updates']} later updates", h)
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("age: later updates + 1 (log)")
        ax.set_title(f"after {c['items']} items ({c['updates']} updates, {c['questions']} questions)", fontsize=9)
    axes[0][0].set_ylabel("recall (gold answer in the greedy answer)")
    s = res.get("stream", {})
    kinds = ", ".join(f"{v['count']} {k}s" for k, v in s.items() if isinstance(v, dict))
    fig.suptitle(f"Many facts in one memory: {kinds}{'' if res.get('complete') else ' (partial)'} - {_subtitle(res)}", fontsize=9)
    if handles:
        fig.legend(list(handles.values()), list(handles.keys()), loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(3, len(handles)), fontsize=8, frameon=False)
    fig.tight_layout()
    return _save(fig, path)


# ---- eval compare: every method on one figure ------------------------------------------------------


def _method_label(res: dict, m: str, task: str = "") -> str:
    info = res.get("methods", {}).get(m, {})
    if info.get("kind") == "design":
        return f"{m} ({info.get('weights', '?')})"
    if task == "editing":
        return {"none": "no edit (baseline)", "prompt": "IKE, edit in the prompt (baseline)", "ft_l": "FT-L (baseline)"}.get(m, m)
    return {"none": "no memory (baseline)", "prompt": "text in prompt (baseline)", "bm25": "BM25 into prompt (baseline)", "ft_l": "FT-L (baseline)"}.get(m, m)


def _ordered(res: dict, task: str) -> list[str]:
    have = {c["method"] for c in res["cells"].values() if c["task"] == task}
    return [m for m in res.get("order", sorted(have)) if m in have] + sorted(have - set(res.get("order", [])))


def plot_compare_facts(res: dict, path) -> Path:
    """Recall against an item's age (tokens written after it), one panel per memory size, every
    method on each panel, 95% Wilson intervals as bars (methods shifted a little along the age
    axis so that equal figures stay visible)."""
    from matplotlib.ticker import NullFormatter

    sizes = sorted({c["size"] for c in res["cells"].values() if c["task"] == "facts"})
    methods = _ordered(res, "facts")
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.2 * len(sizes), 4.2), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for i, m in enumerate(methods):
            c = res["cells"].get(f"facts/{size}/{m}")
            if not c or not c["result"].get("by_age_tokens"):
                continue
            bins = c["result"]["by_age_tokens"]
            shift = 1.06 ** (i - (len(methods) - 1) / 2)
            x = [(b["mean_age"] + 1) * shift for b in bins]  # +1: age 0 on a log axis
            y = [b["mean"] for b in bins]
            err = [[b["mean"] - b["ci95"][0] for b in bins], [b["ci95"][1] - b["mean"] for b in bins]]
            design = res["methods"].get(m, {}).get("kind") == "design"
            ax.errorbar(x, y, yerr=err, fmt="o-" if design else "s--", capsize=2, ms=4, lw=1.2, elinewidth=0.8, alpha=0.85, label=_method_label(res, m))
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("age of the item (tokens written after it, + 1)")
        ax.set_ylabel("recall")
        ax.set_title(f"after {size} items", fontsize=9)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=7, bbox_to_anchor=(0.5, -0.02 - 0.035 * ((len(labels) + 2) // 3)))
    fig.suptitle(f"Many facts in one memory: recall vs age, 95% intervals (eval compare, {res.get('preset')} preset, seed {res['ident']['seed']})", fontsize=10)
    return _save(fig, path)


def plot_compare_editing(res: dict, path) -> Path:
    """Editing Score (harmonic mean of efficacy, generalization, specificity) against the number
    of sequential edits, probability and generation measures side by side."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, kind in zip(axes, ("probability", "generation")):
        for m in _ordered(res, "editing"):
            pts = sorted((c["size"], c["result"][kind]["score"]) for c in res["cells"].values() if c["task"] == "editing" and c["method"] == m)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if res["methods"].get(m, {}).get("kind") == "design" else "s--", ms=4, label=_method_label(res, m, "editing"))
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xticks(sorted({c["size"] for c in res["cells"].values() if c["task"] == "editing"}))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("sequential edits")
        ax.set_ylabel(f"Score ({kind})")
        ax.grid(alpha=0.3)
    _legend(axes[1], loc="best")
    fig.suptitle(f"Editing Score vs number of edits (eval compare, {res.get('preset')} preset, seed {res['ident']['seed']})", fontsize=10)
    return _save(fig, path)
