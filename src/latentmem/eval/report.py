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


RENDER = {"retention": retention, "editing": editing, "longqa": longqa, "integrity": integrity}


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
