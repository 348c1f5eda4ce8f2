"""Markdown tables from results JSON files (used to write docs/results.md).

    python -m latentmem.eval.report results/eval > tables.md
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def _pct(x: dict | float | None) -> str:
    if x is None:
        return "-"
    if isinstance(x, dict):
        lo, hi = x["ci95"]
        return f"{100 * x['mean']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"
    return f"{100 * x:.1f}"


def _model_line(r: dict) -> str:
    m = r["model"]
    trained = m.get("trained_memory_weights")
    t = "" if trained is None else (" - trained memory weights shipped" if trained else " - **memory weights untrained** (no shipped default_memoryllm.safetensors at run time)")
    argv = r["env"]["argv"].split(" ")
    if argv and (argv[0].endswith("cli.py") or argv[0].endswith("memoryllm")):
        argv[0] = "memoryllm"
    cmd = " ".join(argv)
    return f"Model: {m['name']}, {m['layers']} layers, d={m['hidden_size']}, N={m['N']}, K={m['K']} (N/K={m['N'] // m['K']}), {m['dtype']}{t}. Command: `{cmd}` ({r['env']['threads']} torch thread(s), {r['timing'].get('seconds', r['timing'].get('total_seconds'))} s)."


def retention(r: dict) -> str:
    lines = [f"### Retention: {r['dataset']} ({r['rows']} rows, {r['options']['steps']} steps, {r['options']['filler_tokens']}-token fillers from {r['options']['filler']})", "", _model_line(r), ""]
    lines.append(f"No context (a_b): hit {_pct(r['no_context']['hit'])}%, mean answer log-prob/token {r['no_context']['answer_logprob']['mean']:.3f}. ")
    if r.get("context_in_prompt"):
        lines[-1] += f"Context in the prompt: hit {_pct(r['context_in_prompt']['hit'])}%, log-prob/token {r['context_in_prompt']['answer_logprob']['mean']:.3f}."
    lines += ["", "| step | hit % [95% CI] | Eq. 5 % | answer log-prob/token [95% CI] |", "|---|---|---|---|"]
    for s, th in zip(r["steps"], r["theory"]["eq5"] or [None] * len(r["steps"])):  # no Eq. 5 outside MemoryLLM
        lp = s["answer_logprob"]
        lines.append(f"| {s['step']} | {_pct(s['hit'])} | {'-' if th is None else f'{100 * th:.1f}'} | {lp['mean']:.3f} [{lp['ci95'][0]:.3f}, {lp['ci95'][1]:.3f}] |")
    return "\n".join(lines)


def editing(r: dict) -> str:
    lines = [f"### Editing: {r['edits']} counterfactual edits from {r['facts']}", "", _model_line(r), ""]
    for kind, label in (("generation", "generation accuracy (greedy continuation contains the target)"), ("probability", "probability (P(new) > P(old); specificity: P(true) > P(new))")):
        lines += [f"**{label}**, % with bootstrap 95% CI:", "", "| method | Score | Efficacy | Generalization | Specificity | seconds |", "|---|---|---|---|---|---|"]
        for m, v in r["methods"].items():
            k = v[kind]
            lines.append(f"| {m} | {100 * k['score']:.1f} | {_pct(k['efficacy'])} | {_pct(k['generalization'])} | {_pct(k['specificity'])} | {r['timing']['per_method_seconds'].get(m, '-')} |")
        lines.append("")
    d = r.get("method_details", {})
    if "memoryllm_sequence" in d and "efficacy_prob_by_age" in d["memoryllm_sequence"]:
        ages = ", ".join(f"age {b}: {_pct(v)}% (n={v['n']})" for b, v in d["memoryllm_sequence"]["efficacy_prob_by_age"].items())
        lines.append(f"memoryllm_sequence efficacy (probability) by age in updates: {ages}.")
    for m in ("ft_l", "ft_l_sequence"):
        if m in d:
            lines.append(f"{m}: layer {d[m]['layer']} down_proj, {d[m]['steps']} Adam steps, lr {d[m]['lr']}, L-inf bound {d[m]['eps']}, mean final loss {d[m]['final_loss_mean']:.3f}.")
    return "\n".join(lines)


def longqa(r: dict) -> str:
    o = r["options"]
    lines = [f"### Long-context QA: {r['dataset']} ({r['questions']} questions per length)", "", _model_line(r), "", f"Window for 'truncated': {o['window']} tokens; memoryllm chunks: {o['chunk_tokens']} tokens; BM25: {o['bm25_tokens']} tokens in {o['bm25_chunk_tokens']}-token passages; prompt style {o['prompt']}, {o['max_new_tokens']} new tokens.", ""]
    lines += ["| length | method | F1 % [95% CI] | hit % | s/question | attention state MiB | prompt tokens |", "|---|---|---|---|---|---|---|"]
    for L in o["lengths"]:
        for m, by in r["methods"].items():
            if str(L) in by:
                v = by[str(L)]
                flag = f" ({v['beyond_window']} beyond window)" if v.get("beyond_window") else ""
                lines.append(f"| {L} | {m} | {_pct(v['f1'])} | {_pct(v['hit']['mean'])} | {r['timing']['seconds_per_question'][m][str(L)]} | {v['state_mib_per_question']} | {v['prompt_tokens_mean']}{flag} |")
    return "\n".join(lines)


def integrity(r: dict) -> str:
    p, a, h = r["progress"], r["accuracy"], r["health_summary"]
    sess = r["timing"]["sessions"]
    rate = ", ".join(f"{s['updates_per_second']} updates/s ({s['updates_from']}->{s['updates_to']}, stopped: {s['stopped']})" for s in sess)
    return "\n".join([
        f"### Integrity: {r['dataset']} ({r['rows']} rows per pass)", "", _model_line(r), "",
        f"Progress: {p['updates']} updates, {p['injections']} injections, {p['passes_completed']} full passes; target {p['target_updates']}. Speed: {rate}.", "",
        "| answers | accuracy % [95% CI] |", "|---|---|",
        f"| all ({a['all']['n']}) | {_pct(a['all'])} |", f"| first half | {_pct(a['first_half'])} |", f"| second half | {_pct(a['second_half'])} |", f"| last window ({a['last_window']['n']}) | {_pct(a['last_window'])} |", "",
        f"Memory health: NaN/Inf ever: {h['nonfinite_ever']}; mean token norm first check {h['mean_norm_first']}, last {h['mean_norm_last']}.",
    ])


def facts(r: dict) -> str:
    """The many-facts benchmark: recall by checkpoint and method, by age, newest/first item."""
    o, s = r["options"], r["stream"]
    kinds = ", ".join(f"{v['count']} {k}s ({v['tokens_min']}-{v['tokens_max']} tokens, mean {v['tokens_mean']})" for k, v in s.items() if isinstance(v, dict))
    lines = [f"### Many facts in one memory: {o['items']} items{'' if r.get('complete') else ' (partial: stopped before the end)'}", "", _model_line(r), "",
             f"Stream: {kinds}; {s['updates']} updates, {s['tokens']} tokens written. Prompt window for 'window': {o['window_tokens']} tokens; BM25 budget {o['bm25_tokens']} tokens; {o['max_new_tokens']} greedy tokens, newline stop.", ""]
    lines += ["| after items | method | recall % [95% CI] | facts % | passages % | newest item | first item | most common answer (share) | questions |", "|---|---|---|---|---|---|---|---|---|"]

    def kind(v, k):
        x = v.get("by_kind", {}).get(k)
        return "-" if not x else f"{100 * x['mean']:.0f} ({x['n']})"

    for c in r["checkpoints"]:
        for m, v in c["methods"].items():
            if m == "fresh":
                lines.append(f"| {c['items']} | fresh (each item alone) | {_pct(v['recall'])} | {kind(v, 'fact')} | {kind(v, 'passage')} | - | - | - | {v['recall']['n']} |")
                continue
            nw, fi, mo = v["newest_item"], v["first_item"], v.get("modal_answer")
            mode = "-" if not mo else f"{mo['answer'][:30]} ({100 * mo['share']:.0f}%)"
            lines.append(f"| {c['items']} | {m} | {_pct(v['recall'])} | {kind(v, 'fact')} | {kind(v, 'passage')} | {'-' if not nw['n'] else int(nw['mean'])} | {'-' if not fi['n'] else int(fi['mean'])} | {mode} | {v['recall']['n']} |")
    last = r["checkpoints"][-1] if r["checkpoints"] else None
    if last:
        methods = [m for m in last["methods"] if m != "fresh"]
        bins = sorted({b["bin"]: b["from"] for m in methods for b in last["methods"][m]["by_age_updates"]}.items(), key=lambda kv: kv[1])
        lines += ["", f"Recall % by age in later updates, after {last['items']} items (n per bin in parentheses):", "", "| age (updates) | " + " | ".join(methods) + (" | Eq. 5 |" if r.get("theory") else " |"), "|---" * (len(methods) + 1 + bool(r.get("theory"))) + "|"]
        for label, lo in bins:
            cells = []
            for m in methods:
                b = next((b for b in last["methods"][m]["by_age_updates"] if b["bin"] == label), None)
                cells.append("-" if b is None else f"{100 * b['mean']:.0f} ({b['n']})")
            row = f"| {label} | " + " | ".join(cells)
            if r.get("theory"):
                ref = next((b for b in last["methods"][methods[0]]["by_age_updates"] if b["bin"] == label), None)
                th = r["theory"]
                row += " | " + ("-" if ref is None else f"{100 * (th['a_b'] + (th['a_u'] - th['a_b']) * (1 - th['K'] / th['N']) ** ref['mean_age']):.0f}")
            lines.append(row + " |")
    p = r["newest_probe"]
    if p["all"]["n"]:
        bands = "; ".join(f"items {b['items']}: {_pct(b)}% (n={b['n']})" for b in p["by_items_before"])
        kinds = "; ".join(f"{k}s {_pct(v)}% (n={v['n']})" for k, v in p.get("by_kind", {}).items())
        lines += ["", f"Newest item, asked right after it was written: {_pct(p['all'])}% (n={p['all']['n']}); {bands}; {kinds}."]
    if r.get("theory"):
        t = r["theory"]
        lines += ["", f"Eq. 5 reference: a_u = {100 * t['a_u']:.1f}% (fresh-pool recall), a_b = {100 * t['a_b']:.1f}% (no memory), N={t['N']}, K={t['K']}, nominal capacity N/K = {t['capacity_updates']} updates."]
    return "\n".join(lines)


RENDER = {"retention": retention, "editing": editing, "longqa": longqa, "integrity": integrity, "facts": facts}


def render(folder: str | Path) -> str:
    parts = []
    for f in sorted(Path(folder).glob("*.json")):
        r = json.loads(f.read_text())
        fn = RENDER.get(r.get("task"))
        if fn:
            png = Path(os.path.relpath(f.with_suffix(".png"), "docs")).as_posix()
            parts.append(fn(r) + f"\n\n![{f.stem}]({png})\n")
    return "\n\n".join(parts)


if __name__ == "__main__":
    print(render(sys.argv[1] if len(sys.argv) > 1 else "results/eval"))
