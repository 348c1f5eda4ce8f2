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


# ---- eval compare ---------------------------------------------------------------------------------

TASK_TITLES = {
    "facts": "Many facts in one memory: recall of every item written so far",
    "editing": "Editing: sequential edits into one memory (Score = harmonic mean of efficacy, generalization, specificity; probability measure)",
    "forgetting": "Forgetting: exactness (forgotten memory equals a replay without the injection) and cost",
    "perplexity": "Long-document perplexity of a document's last tokens (lower is better)",
    "longqa": "Long-context QA (LongBench F1)",
    "needle": "Needle in a haystack (hit rate)",
    "icl": "Memory-augmented in-context learning (accuracy)",
    "cost": "Cost",
}
JOBS = {
    "facts": "remember many short facts and answer about any of them",
    "editing": "apply many sequential edits",
    "forgetting": "forget one injection exactly, cheaply",
    "perplexity": "model a long document (perplexity)",
    "longqa": "answer questions about a long document",
    "needle": "find one fact in a long haystack",
    "icl": "learn a task from many examples",
    "cost": "write text cheaply",
}


def _v(x: dict | None, pct: bool = True, digits: int = 1) -> str:
    if not x:
        return "-"
    f = (lambda a: f"{100 * a:.{digits}f}") if pct else (lambda a: f"{a:.{max(digits, 2)}f}")
    ci = x.get("ci95")
    return f(x["mean"]) + (f" [{f(ci[0])}, {f(ci[1])}]" if ci else "") + (f" (n={x['n']})" if "n" in x else "")


def _command(r: dict, argv: str | None = None) -> str:
    argv = (argv if argv is not None else r.get("env", {}).get("argv", "")).split(" ")
    if argv and (argv[0].endswith("cli.py") or argv[0].endswith("memoryllm") or argv[0].endswith("latentmem")):
        argv[0] = "memoryllm"
    return " ".join(argv)


def _methods_of(r: dict, task: str) -> list[str]:
    have = {c["method"] for c in r["cells"].values() if c["task"] == task}
    return [m for m in r.get("order", []) if m in have] + sorted(have - set(r.get("order", [])))


def _label(r: dict, m: str, task: str) -> str:
    info = r["methods"].get(m, {})
    if info.get("kind") == "design":
        return f"{m} ({info.get('weights')})"
    if task == "editing":
        return {"none": "no edit", "prompt": "IKE (edit in the prompt)", "ft_l": "FT-L"}.get(m, m)
    return {"none": "no memory", "prompt": "text in the prompt (cut to the window)", "bm25": "BM25 chunks in the prompt"}.get(m, m)


def _cell_text(task: str, res: dict) -> str:
    if task == "facts":
        return _v(res["recall"])
    if task == "editing":
        p = res["probability"]
        ci = p.get("score_ci", {}).get("ci95")
        return f"{100 * p['score']:.1f}{f' [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]' if ci else ''} (eff {100 * p['efficacy']['mean']:.0f}, gen {100 * p['generalization']['mean']:.0f}, spec {100 * p['specificity']['mean']:.0f})"
    if task == "forgetting":
        t = res["timing"]
        return f"exact {_v(res['verified_exact'], digits=0)}; recall of the forgotten fact {100 * res['forgotten_recall']['before']['mean']:.0f} -> {100 * res['forgotten_recall']['after_forget']['mean']:.0f}% (replay {100 * res['forgotten_recall']['replay']['mean']:.0f}%); forget {1000 * t['forget_seconds']:.1f} ms, exact cost {1000 * t['cost_seconds']:.1f} ms"
    if task == "perplexity":
        return _v(res["perplexity"], pct=False)
    if task == "longqa":
        return f"F1 {_v(res['f1'])}"
    if task == "needle":
        return _v(res["hit"])
    if task == "icl":
        return f"{_v(res['accuracy'])} (chance {100 * res['chance']:.0f})"
    if task == "cost":
        t = res["timing"]
        return f"write {1e3 * t['write_seconds_per_token']:.3f} ms/token; answer {t['answer_seconds']:.3f} s; {res['bytes_per_token']:.0f} B/token; peak RSS {t['peak_rss_mib']:.0f} MiB"
    return "?"


def _rank_key(task: str, result: dict, v: dict, higher: bool) -> tuple:
    """Sort key, best first: the headline figure, then (forgetting) the cost of exactness."""
    key = (-v["mean"] if higher else v["mean"],)
    if task == "forgetting":
        key += (result["timing"]["cost_seconds"],)
    return key


def which_design(r: dict) -> list[dict]:
    """Per job (task), at its largest measured size: the best method by the headline figure
    (forgetting: ties broken by the cost of exactness; cost: methods that remember something),
    every method tied with it, the best design variant, and whether the best is ahead of the
    runner-up beyond the 95% intervals (None where the figure has no interval)."""
    from .compare import headline

    rows = []
    for task in r.get("tasks", []):
        sizes = sorted({c["size"] for c in r["cells"].values() if c["task"] == task})
        if not sizes:
            continue
        size = sizes[-1]
        scored = []
        for m in _methods_of(r, task):
            c = r["cells"].get(f"{task}/{size}/{m}")
            if c is None or (task == "cost" and m == "none"):  # "none" remembers nothing
                continue
            name, v, higher = headline(task, c["result"])
            if v is not None and v["mean"] == v["mean"]:
                scored.append((_rank_key(task, c["result"], v, higher), m, v, name, higher))
        if not scored:
            continue
        scored.sort(key=lambda x: x[0])
        best = scored[0]
        tied = [s[1] for s in scored if s[0] == best[0]]
        runner = next((s for s in scored if s[0] != best[0]), None)
        designs = [s for s in scored if r["methods"].get(s[1], {}).get("kind") == "design"]
        tied_designs = [s[1] for s in designs if s[0] == designs[0][0]] if designs else []
        clear = None
        if runner and best[2].get("ci95") and runner[2].get("ci95"):
            clear = best[2]["ci95"][0] > runner[2]["ci95"][1] if best[4] else best[2]["ci95"][1] < runner[2]["ci95"][0]
        if len(tied) > 1:
            clear = False
        rows.append({"task": task, "job": JOBS.get(task, task), "size": size, "metric": best[3], "best": best[1], "tied": tied, "best_value": best[2]["mean"],
                     "best_design": designs[0][1] if designs else None, "tied_designs": tied_designs, "best_design_value": designs[0][2]["mean"] if designs else None, "clear": clear})
    return rows


def which_design_table(r: dict) -> str:
    lines = ["| job | measured as | best | best design | ahead beyond the 95% intervals? |", "|---|---|---|---|---|"]
    for w in which_design(r):
        fmt = (lambda x: f"{x:.3g}") if w["task"] in ("perplexity", "cost") else (lambda x: f"{100 * x:.1f}%")
        best = f"{w['best']} ({fmt(w['best_value'])})" if len(w["tied"]) == 1 else f"tie at {fmt(w['best_value'])}: {', '.join(w['tied'])}"
        bd = "-" if not w["best_design"] else f"{w['best_design']} ({fmt(w['best_design_value'])})" if len(w["tied_designs"]) == 1 else f"tie: {', '.join(w['tied_designs'])}"
        clear = "yes" if w["clear"] else ("no: within the intervals" if w["clear"] is False else "no interval")
        lines.append(f"| {w['job']} | {w['metric']}, {w['size']} {r['size_means'][w['task']]} | {best} | {bd} | {clear} |")
    return "\n".join(lines)


UNITS = {
    "perplexity": "Perplexity, with 95% bootstrap intervals over documents.",
    "cost": "Wall-clock on the machine that ran it. Peak RSS is the process's peak so far (models loaded before included): an upper bound.",
    "editing": "Score in % with its 95% bootstrap interval over edits, and its parts (probability measure: mean token log P(new) > P(old); specificity P(true) > P(new)).",
    "forgetting": "Verified exact in % with its 95% interval; exact cost = the forget where it verified exact, else forget + replay of the other injections.",
}


def render_compare(r: dict, folder: str | Path | None = None, link_prefix: str = "") -> str:
    """The results page of ``eval compare``: conditions, one table per task (rows: methods,
    columns: sizes), the plots (linked as ``link_prefix`` + file name), and which method suits
    which job."""
    folder = Path(folder) if folder is not None else None
    lines = [f"## Side by side ({r.get('preset')} preset{'' if r.get('complete') else ', INCOMPLETE: some cells not measured yet'})", "",
             f"Command: `{_command(r)}`; date {r.get('date')}; seed {r['ident']['seed']}; {r.get('env', {}).get('threads')} torch thread(s); "
             f"{len(r['cells'])} cells. Every method is asked the same held-out rows with the same prompts.", ""]
    runs = [x for x in r.get("sessions", []) if x.get("argv")]
    if len(runs) > 1:
        lines += ["Measured in " + ", then ".join(f"`{_command(r, x['argv'])}` (cells {x['cells_before']} -> {x['cells_after']}, {x['seconds']:.0f} s)" for x in runs) + ".", ""]
    lines += [
             "| method | kind | weights | model |", "|---|---|---|---|"]
    for m in r.get("order", []):
        info = r["methods"].get(m)
        if info:
            mi = info.get("model", {})
            lines.append(f"| {m} | {info['kind']} | {info.get('weights')} | {mi.get('name')} ({mi.get('design')}, {mi.get('parameters_M')}M parameters) |")
    lines.append("")
    samples = r["ident"]["samples"]
    for task in r.get("tasks", []):
        sizes = sorted({c["size"] for c in r["cells"].values() if c["task"] == task})
        if not sizes:
            continue
        lines += [f"### {TASK_TITLES.get(task, task)}", "", f"Columns: {r['size_means'][task]}; samples per cell: {samples.get(task)} {r['samples_mean'][task]}. " + UNITS.get(task, "Figures in %, with 95% Wilson (rates) or bootstrap (F1) intervals."), ""]
        lines += ["| method | " + " | ".join(str(s) for s in sizes) + " |", "|---|" + "---|" * len(sizes)]
        for m in _methods_of(r, task):
            cells = [r["cells"].get(f"{task}/{s}/{m}") for s in sizes]
            lines.append(f"| {_label(r, m, task)} | " + " | ".join(_cell_text(task, c["result"]) if c else "-" for c in cells) + " |")
        png = {"facts": "compare_facts.png", "editing": "compare_editing.png"}.get(task)
        if png and folder is not None and (folder / png).exists():
            lines += ["", f"![{task}]({link_prefix}{png})"]
        lines.append("")
    lines += ["### Which design for which job (from the tables above)", "", which_design_table(r), ""]
    return "\n".join(lines) + "\n"


RENDER = {"retention": retention, "editing": editing, "longqa": longqa, "integrity": integrity, "facts": facts}


def render(folder: str | Path) -> str:
    parts = []
    for f in sorted(Path(folder).glob("*.json")):
        r = json.loads(f.read_text())
        if r.get("task") == "compare":  # plots linked from docs/, as the other tables' are
            parts.append(render_compare(r, f.parent, Path(os.path.relpath(f.parent, "docs")).as_posix() + "/"))
            continue
        fn = RENDER.get(r.get("task"))
        if fn:
            png = Path(os.path.relpath(f.with_suffix(".png"), "docs")).as_posix()
            parts.append(fn(r) + f"\n\n![{f.stem}]({png})\n")
    return "\n\n".join(parts)


if __name__ == "__main__":
    print(render(sys.argv[1] if len(sys.argv) > 1 else "results/eval"))
