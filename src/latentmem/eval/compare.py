"""Side by side (issue 20): every memory design, each variant, and the baselines, on the same
held-out rows with the same prompts, task by task.

    memoryllm eval compare --quick                      # a small preset: minutes on a CPU
    memoryllm eval compare --designs memoryllm,larimar --tasks facts,editing --sizes facts=10,100

Methods: a *design variant* (``DESIGN_VARIANTS``: each design's default and the variants it
offers, loaded with its shipped weights where it has them, labelled "untrained" where it has
none) reads and writes its own memory; the *baselines* run on the base model without memory:
``none`` (no memory: the question alone; no edit), ``prompt`` (the text in the prompt, cut to the
window where it does not fit; IKE for edits), ``bm25`` (BM25's best chunks in the prompt) and
``ft_l`` (FT-L, edits only).

Tasks reuse the evaluation modules through the shared interface, one cell per task x size x
method: ``facts`` (``facts.run_facts``: recall vs age after 10 / 100 / 1,000 items), ``editing``
(``editing.run_editing``: 1 / 10 / 100 / 1,000 sequential edits), ``forgetting``
(``forgetting.py``), ``perplexity`` (``perplexity.py``), ``longqa`` (``longqa.run_longqa``),
``needle`` (``needle.py``: haystacks of 4k / 16k / 64k tokens), ``icl`` (``icl.py``) and ``cost``
(``cost.py``). ``PRESETS`` give the sizes and sample counts (``full``, ``quick``); ``sizes`` /
``samples`` override them per task.

The run is resumable: ``<out>/compare.json`` (default ``results/eval/compare/<preset>``) is rewritten after every measured cell (``complete``
false until every cell is in) and a rerun of the same command skips the cells it holds (settings
that change what a cell measures must match, or the run refuses). The sub-runs' own files live in
``workdir``. At the end the page ``<out>/compare.md`` and its plots are rendered
(``report.render_compare``, ``plots.plot_compare_*``); both can be re-rendered from the JSON.
"""

from __future__ import annotations

import datetime
import gc
import json
import sys
import time
from pathlib import Path

from . import metrics
from .common import as_list, environment, model_info, set_threads, write_json

DESIGN_VARIANTS: dict[str, dict[str, dict]] = {
    # design -> variant name -> loader options (the first is the design's default)
    "memoryllm": {"memoryllm": {}},
    "longmem": {"longmem": {}, "longmem-release": {"cross_residual": "release"}},  # Eq. 3's residual as released
    "larimar": {"larimar": {}, "larimar-sequential": {"write_mode": "sequential"}},  # Kanerva-machine writes
}
BASELINES = ("none", "prompt", "bm25", "ft_l")
TASKS = ("facts", "editing", "forgetting", "perplexity", "longqa", "needle", "icl", "cost")
TASK_BASELINES = {
    "facts": ("none", "prompt", "bm25"),
    "editing": ("none", "prompt", "ft_l"),
    "forgetting": (),
    "perplexity": ("none", "prompt", "bm25"),
    "longqa": ("none", "prompt", "bm25"),
    "needle": ("none", "prompt", "bm25"),
    "icl": ("none", "prompt", "bm25"),
    "cost": ("none", "prompt", "bm25"),
}
# what a size is, and what the sample count counts, per task
SIZE_MEANS = {"facts": "items in memory", "editing": "sequential edits", "forgetting": "facts in memory", "perplexity": "document tokens", "longqa": "document tokens",
              "needle": "haystack tokens", "icl": "demonstrations", "cost": "tokens remembered"}
SAMPLES_MEAN = {"facts": "questions per checkpoint (None: every item)", "editing": "(every edit is measured)", "forgetting": "forgets", "perplexity": "documents",
                "longqa": "questions", "needle": "needles (depths)", "icl": "test queries", "cost": "answer repeats"}
PRESETS = {
    "full": {
        "sizes": {"facts": [10, 100, 1000], "editing": [1, 10, 100, 1000], "forgetting": [10, 100], "perplexity": [1024, 4096], "longqa": [2048, 4096, 8192],
                  "needle": [4096, 16384, 65536], "icl": [16, 64, 256], "cost": [1024]},
        "samples": {"facts": 100, "editing": None, "forgetting": 10, "perplexity": 16, "longqa": 30, "needle": 10, "icl": 100, "cost": 3},
    },
    "quick": {
        "sizes": {"facts": [10, 30], "editing": [1, 10], "forgetting": [10], "perplexity": [512], "longqa": [1024], "needle": [1024, 4096], "icl": [16], "cost": [256]},
        "samples": {"facts": 10, "editing": None, "forgetting": 3, "perplexity": 4, "longqa": 5, "needle": 4, "icl": 20, "cost": 2},
    },
}
RESULTS = "compare.json"


# ---- options ------------------------------------------------------------------------------------


def parse_task_values(value, cast, what: str) -> dict:
    """``{"facts": [10, 100]}`` or ``"facts=10,100;editing=1,10"`` (or a list of ``task=values``)."""
    if value is None:
        return {}
    if isinstance(value, dict):
        items = value.items()
    else:
        parts = value.split(";") if isinstance(value, str) else list(value)
        items = []
        for p in parts:
            if not p.strip():
                continue
            if "=" not in p:
                raise ValueError(f"--{what} takes task=values (e.g. facts=10,100), got {p!r}")
            k, v = p.split("=", 1)
            items.append((k.strip(), v))
    out = {}
    for k, v in items:
        if k not in TASKS:
            raise ValueError(f"--{what}: unknown task {k!r}; choose from {', '.join(TASKS)}")
        try:
            out[k] = cast(v)
        except (TypeError, ValueError):
            raise ValueError(f"--{what} {k}={v!r}: not a valid value") from None
    return out


def _sizes(v) -> list[int]:
    sizes = as_list(v, int)
    if not sizes or any(s < 1 for s in sizes):
        raise ValueError("sizes must be positive integers")
    return sorted(set(sizes))


def _samples(v) -> int | None:
    if v is None or (isinstance(v, str) and v.strip().lower() in ("", "none", "all")):
        return None
    n = int(v)
    if n < 1:
        raise ValueError("a sample count must be >= 1")
    return n


def resolve_methods(designs, baselines, variants: str = "all") -> tuple[list[tuple[str, str, dict]], list[str]]:
    """([(method, design, loader options)], [baselines]) from the options; names are checked."""
    if variants not in ("all", "default"):
        raise ValueError(f"variants must be 'all' or 'default', got {variants!r}")
    known = {v: (d, o) for d, vs in DESIGN_VARIANTS.items() for v, o in vs.items()}
    out = []
    for name in as_list(designs):
        if name in DESIGN_VARIANTS:
            vs = list(DESIGN_VARIANTS[name].items())
            picked = vs if variants == "all" else vs[:1]
            out += [(v, name, o) for v, o in picked]
        elif name in known:
            out.append((name, *known[name]))
        else:
            raise ValueError(f"unknown design or variant {name!r}; choose from {', '.join(list(DESIGN_VARIANTS) + [v for v in known if v not in DESIGN_VARIANTS])}")
    seen, methods = set(), []
    for m in out:
        if m[0] not in seen:
            seen.add(m[0])
            methods.append(m)
    bases = as_list(baselines)
    bad = [b for b in bases if b not in BASELINES]
    if bad:
        raise ValueError(f"unknown baseline(s) {bad}; choose from {', '.join(BASELINES)}")
    return methods, bases


def cell_key(task: str, size: int, method: str) -> str:
    return f"{task}/{size}/{method}"


# ---- one cell ------------------------------------------------------------------------------------

FACTS_METHOD = {"none": "none", "prompt": "window", "bm25": "bm25"}  # baseline -> facts.py's method
EDIT_METHOD = {"none": "no_edit", "prompt": "ike", "ft_l": "ft_l_sequence"}  # baseline -> editing.py's
LONGQA_METHOD = {"none": "none", "prompt": "truncated", "bm25": "bm25"}
# long documents into memory: every chunk of this many tokens but the last is injected, the last
# is read from the prompt with the question; one size for every design (not each design's own
# write length: LongMem's 1,024 would leave a 1k document wholly in the prompt), so that every
# design reads the same prompts
LAST_CHUNK_TOKENS = 512


def _facts_cells(lm, method: str, is_design: bool, sizes: list[int], samples, seed: int, workdir: Path, opts: dict) -> dict:
    """One facts run of the largest size, asked at every size: {size: cell result}."""
    from .facts import run_facts

    fm = "memory" if is_design else FACTS_METHOD[method]
    kw = {"max_new_tokens": 10, "batch_size": 8, **opts}
    res = run_facts(lm, items=max(sizes), checkpoints=sizes, methods=[fm], questions_per_checkpoint=samples, probe=False, heldout_only=True, seed=seed,
                    workdir=workdir / "facts" / method, out=workdir / "facts" / f"{method}.json", plot=False, **kw)
    if not res["complete"]:
        raise RuntimeError(f"facts run for {method} stopped: {res.get('stopped')}")
    out = {}
    for e in res["checkpoints"]:
        r = e["methods"].get(fm)
        if e["items"] in sizes and r is not None:
            out[e["items"]] = {"recall": r["recall"], "newest_item": r.get("newest_item"), "first_item": r.get("first_item"), "by_kind": r.get("by_kind"),
                               "by_age_tokens": r.get("by_age_tokens"), "by_age_updates": r.get("by_age_updates"), "updates": e["updates"],
                               "tokens_written": e["tokens_written"], "questions": e["questions"], "modal_answer": r.get("modal_answer")}
    return out


def _editing_cell(lm, method: str, is_design: bool, size: int, seed: int, workdir: Path, opts: dict) -> dict:
    from .editing import run_editing

    em = "memoryllm_sequence" if is_design else EDIT_METHOD[method]  # memoryllm_sequence: any design's memory, edits one after another
    res = run_editing(lm, edits=size, methods=[em], seed=seed, out=workdir / "editing" / f"{method}_{size}.json", plot=False, **opts)
    r = res["methods"][em]
    out = {"generation": dict(r["generation"]), "probability": dict(r["probability"]), "edits": res["edits"], "method": em}
    for k, kind in enumerate(("generation", "probability")):  # the Score's interval: edits resampled
        cols = [[sum(x[k] for x in pe[metric]) / len(pe[metric]) for pe in r["per_edit"]] for metric in ("efficacy", "generalization", "specificity")]
        out[kind]["score_ci"] = metrics.harmonic_mean_ci(cols, seed=seed)
    return out


def _longqa_cell(lm, method: str, is_design: bool, size: int, samples, seed: int, workdir: Path, opts: dict) -> dict:
    from .longqa import run_longqa

    qm = "memoryllm" if is_design else LONGQA_METHOD[method]  # "memoryllm": any design's memory, the paper's chunked protocol
    kw = {"prompt": "plain", "chunk_tokens": LAST_CHUNK_TOKENS, **opts}
    res = run_longqa(lm, lengths=[size], methods=[qm], questions=samples or 30, heldout_only=True, seed=seed, out=workdir / "longqa" / f"{method}_{size}.json", plot=False, **kw)
    r = res["methods"][qm][str(size)]
    return {**r, "questions": res["questions"], "timing": {"seconds_per_question": res["timing"]["seconds_per_question"][qm][str(size)]}}


def measure_cell(task: str, size: int, method: str, lm, *, is_design: bool, samples, seed: int, workdir: Path, opts: dict) -> dict:
    """The result of one task x size x method (facts: see ``_facts_cells``)."""
    m = "memory" if is_design else method
    if task == "editing":
        return _editing_cell(lm, method, is_design, size, seed, workdir, opts)
    if task == "longqa":
        return _longqa_cell(lm, method, is_design, size, samples, seed, workdir, opts)
    if task == "forgetting":
        from .forgetting import measure_forgetting

        return measure_forgetting(lm, size=size, forgets=samples or 5, seed=seed, **opts)
    if task == "perplexity":
        from .perplexity import measure_perplexity

        return measure_perplexity(lm, m, length=size, docs=samples or 8, seed=seed, **opts)
    if task == "needle":
        from .needle import measure_needle

        return measure_needle(lm, m, length=size, needles=samples or 5, seed=seed, **{"chunk_tokens": LAST_CHUNK_TOKENS, **opts})
    if task == "icl":
        from .icl import measure_icl

        return measure_icl(lm, m, size=size, queries=samples or 20, seed=seed, **opts)
    if task == "cost":
        from .cost import measure_cost

        return measure_cost(lm, m, size=size, repeats=samples or 3, seed=seed, **opts)
    raise ValueError(f"unknown compare task {task!r}; choose from {', '.join(TASKS)}")


# ---- the run -------------------------------------------------------------------------------------


def _weights_label(lm) -> str:
    d = lm.info().details
    if "applied_weights" not in d:
        return "as loaded"
    w = d["applied_weights"]
    if w is None:
        return "untrained"
    sha = w.get("sha256", "") if isinstance(w, dict) else ""
    return f"trained (shipped{', sha256 ' + sha[:8] if sha else ''})"


def run_compare(
    *,
    designs="memoryllm,longmem,larimar",
    baselines=BASELINES,
    tasks=TASKS,
    variants: str = "all",
    quick: bool = False,
    sizes=None,
    samples=None,
    task_options: dict | None = None,
    model=None,
    loader=None,
    baseline_lm=None,
    out=None,
    workdir=None,
    resume: bool = True,
    seed: int = 0,
    threads: int | None = None,
    max_seconds: float | None = None,
    plot: bool = True,
    progress: bool = True,
    **_ignored,
) -> dict:
    """Run (or continue) the comparison; returns the results (also in ``<out>/compare.json``).

    ``loader(design, options) -> MemoryModel`` builds a design variant (default:
    ``latentmem.load(model, design=design, **options)``); ``baseline_lm`` is the model the
    baselines run on without memory (default: the base model, ``latentmem.load(model,
    trained=False)``, where no memory weight touches the backbone). ``task_options``: extra
    keyword arguments per task (``{"facts": {"max_passage_tokens": 200}}``)."""
    set_threads(threads)
    t_start = time.perf_counter()
    preset = "quick" if quick else "full"
    tasks, methods, bases, size_of, samples_of, task_options = _plan(tasks, designs, baselines, variants, preset, sizes, samples, task_options)
    out = Path(out) if out is not None else Path("results") / "eval" / "compare" / preset
    path = out if out.suffix == ".json" else out / RESULTS
    folder = path.parent
    workdir = Path(workdir) if workdir else Path("runs") / "eval" / f"{'compare_quick' if quick else 'compare'}_seed{seed}"
    ident = {"seed": seed, "model": None if model is None else str(model), "samples": {t: samples_of[t] for t in TASKS}, "task_options": task_options}
    res = _open_results(path, ident, resume)
    _merge_plan(res, preset, tasks, size_of, [m for m, _, _ in methods] + bases)
    cells = res["cells"]
    clock = lambda: time.perf_counter() - t_start  # noqa: E731
    todo_total = sum(len(size_of[t]) for t in tasks) * len(methods) + sum(len(size_of[t]) for t in tasks for b in bases if b in TASK_BASELINES[t])
    state = {"done": 0, "stopped": "done"}

    def log(msg: str) -> None:
        if progress:
            print(f"[compare] {msg} ({clock():.0f} s)", file=sys.stderr, flush=True)

    def save(complete: bool = False) -> None:
        res["complete"] = complete
        res["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        res["env"] = environment()
        write_json(path, res)

    def record(task, size, method, result, seconds) -> None:
        cells[cell_key(task, size, method)] = {"task": task, "size": size, "method": method, "result": result, "seconds": round(seconds, 3)}
        state["done"] += 1
        log(f"{state['done']}/{todo_total} {task} {size} {method}: {headline_text(task, result)}")
        save()

    def over_time() -> bool:
        return max_seconds is not None and clock() >= max_seconds

    def run_method(method: str, lm, is_design: bool, wanted) -> bool:
        """Every cell of one method; False when stopped by max_seconds."""
        for task in tasks:
            if not wanted(task):
                continue
            opts = task_options.get(task, {})
            if task == "facts":
                missing = [s for s in size_of[task] if cell_key(task, s, method) not in cells]
                if not missing:
                    state["done"] += len(size_of[task])
                    continue
                if over_time():
                    return False
                t0 = time.perf_counter()
                got = _facts_cells(lm, method, is_design, size_of[task], samples_of[task], seed, workdir, opts)
                dt = (time.perf_counter() - t0) / max(1, len(got))
                for s in size_of[task]:
                    if cell_key(task, s, method) in cells:
                        state["done"] += 1
                    elif s in got:
                        record(task, s, method, got[s], dt)
                continue
            for size in size_of[task]:
                if cell_key(task, size, method) in cells:
                    state["done"] += 1
                    continue
                if over_time():
                    return False
                t0 = time.perf_counter()
                r = measure_cell(task, size, method, lm, is_design=is_design, samples=samples_of[task], seed=seed, workdir=workdir, opts=opts)
                record(task, size, method, r, time.perf_counter() - t0)
        return True

    def needs(method: str, wanted) -> bool:
        return any(cell_key(t, s, method) not in cells for t in tasks if wanted(t) for s in size_of[t])

    if loader is None:
        from .. import load

        def loader(design, options):  # noqa: F811
            return load(model, design=design, **options)

    session_from = len(cells)
    try:
        for method, design, options in methods:
            if not needs(method, lambda t: True):
                state["done"] += sum(len(size_of[t]) for t in tasks)
                continue
            log(f"loading {method} ({design}{', ' + json.dumps(options) if options else ''})")
            lm = loader(design, dict(options))
            res["methods"][method] = {"kind": "design", "design": design, "options": options, "weights": _weights_label(lm), "model": model_info(lm)}
            ok = run_method(method, lm, True, lambda t: True)
            del lm
            gc.collect()
            if not ok:
                state["stopped"] = "max_seconds"
                break
        if state["stopped"] == "done" and bases:
            blm = None
            for b in bases:
                wanted = lambda t, b=b: b in TASK_BASELINES[t]  # noqa: E731
                if not needs(b, wanted):
                    state["done"] += sum(len(size_of[t]) for t in tasks if wanted(t))
                    continue
                if blm is None:
                    blm = baseline_lm if baseline_lm is not None else _base_model(model)
                res["methods"][b] = {"kind": "baseline", "weights": "base model, no memory", "model": model_info(blm)}
                if not run_method(b, blm, False, wanted):
                    state["stopped"] = "max_seconds"
                    break
    except KeyboardInterrupt:
        state["stopped"] = "interrupted"
    res["sessions"].append({"cells_before": session_from, "cells_after": len(cells), "seconds": round(clock(), 1), "stopped": state["stopped"], "argv": environment()["argv"]})
    complete = all(cell_key(t, s, m) in cells for t in tasks for s in size_of[t] for m in [x for x, _, _ in methods] + [b for b in bases if b in TASK_BASELINES[t]])
    save(complete)
    res["json_path"] = str(path)
    res.update(render_outputs(res, folder, plot))
    log(f"{len(cells)} cells in {path} ({'complete' if complete else 'incomplete: ' + state['stopped']})")
    return res


def _plan(tasks, designs, baselines, variants, preset, sizes, samples, task_options):
    """The checked options: (tasks, design methods, baselines, sizes per task, samples per task,
    extra options per task)."""
    tasks = as_list(tasks)
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise ValueError(f"unknown compare task(s) {bad}; choose from {', '.join(TASKS)}")
    methods, bases = resolve_methods(designs, baselines, variants)
    if not methods and not bases:
        raise ValueError("nothing to compare: no design and no baseline")
    size_of = {**PRESETS[preset]["sizes"], **parse_task_values(sizes, _sizes, "sizes")}
    samples_of = {**PRESETS[preset]["samples"], **parse_task_values(samples, _samples, "samples")}
    task_options = {k: dict(v) for k, v in (task_options or {}).items()}
    unknown = sorted(set(task_options) - set(TASKS))
    if unknown:
        raise ValueError(f"task_options for unknown task(s) {unknown}")
    return tasks, methods, bases, size_of, samples_of, task_options


def _open_results(path: Path, ident: dict, resume: bool) -> dict:
    """The results so far (refused when measured with other settings), or a new record."""
    if resume and path.is_file():
        res = json.loads(path.read_text())
        if res.get("ident") != ident:
            raise ValueError(f"{path} holds a comparison with other settings {res.get('ident')} (now {ident}); use another --out or --no-resume")
        return res
    return {"task": "compare", "ident": ident, "methods": {}, "cells": {}, "sessions": []}


def _merge_plan(res: dict, preset: str, tasks: list[str], size_of: dict, order: list[str]) -> None:
    """What the page shows: the tasks, sizes and methods of this run and of the earlier ones on
    the same file (a rerun with fewer tasks or designs adds cells, it does not hide any)."""
    had_tasks, had_sizes, had_order = res.get("tasks", []), res.get("sizes", {}), res.get("order", [])
    res["preset"] = preset
    res["tasks"] = [t for t in TASKS if t in tasks or t in had_tasks]
    res["sizes"] = {t: sorted(set(size_of[t] if t in tasks else []) | set(had_sizes.get(t, []))) for t in res["tasks"]}
    canonical = [v for vs in DESIGN_VARIANTS.values() for v in vs] + list(BASELINES)
    res["order"] = [m for m in canonical if m in order or m in had_order]
    res.update({"size_means": SIZE_MEANS, "samples_mean": SAMPLES_MEAN, "baselines_of": {t: list(TASK_BASELINES[t]) for t in res["tasks"]}})


def render_outputs(res: dict, folder: str | Path, plot: bool = True) -> dict:
    """The plots and the page ``compare.md`` of a comparison, from its results (also what
    ``rerender`` redoes from a results file); returns their paths."""
    from .common import atomic_write_bytes
    from .plots import plot_compare_editing, plot_compare_facts
    from .report import render_compare

    folder = Path(folder)
    paths: dict = {"png_paths": {}}
    tasks_in = {c["task"] for c in res["cells"].values()}
    if plot:
        if "facts" in tasks_in:
            paths["png_paths"]["facts"] = str(plot_compare_facts(res, folder / "compare_facts.png"))
        if "editing" in tasks_in:
            paths["png_paths"]["editing"] = str(plot_compare_editing(res, folder / "compare_editing.png"))
    page = folder / "compare.md"
    atomic_write_bytes(page, render_compare(res, folder).encode())
    paths["md_path"] = str(page)
    return paths


def rerender(folder: str | Path) -> dict:
    """Redo the plots and the page of ``<folder>/compare.json`` (nothing is measured)."""
    folder = Path(folder)
    return render_outputs(json.loads((folder / RESULTS).read_text()), folder)


def _base_model(model):
    """The baselines' model: the backbone with no memory weight applied."""
    from .. import load

    return load(model, design="memoryllm", trained=False) if model is None else load(model, design="memoryllm")


# ---- headline figures (the progress line, the README's job table) ----------------------------


def headline(task: str, r: dict) -> tuple[str, dict | None, bool]:
    """(metric name, {"mean", "ci95"} or None, higher is better) of one cell's result."""
    if task == "facts":
        return "recall", r["recall"], True
    if task == "editing":
        p = r["probability"]
        return "Score (probability)", p.get("score_ci") or {"mean": p["score"], "ci95": None}, True
    if task == "forgetting":
        return "verified exact", r["verified_exact"], True
    if task == "perplexity":
        return "perplexity", r["perplexity"], False
    if task == "longqa":
        return "F1", r["f1"], True
    if task == "needle":
        return "hit", r["hit"], True
    if task == "icl":
        return "accuracy", r["accuracy"], True
    if task == "cost":
        return "write s/token", {"mean": r["timing"]["write_seconds_per_token"], "ci95": None}, False
    return "?", None, True


def headline_text(task: str, r: dict) -> str:
    name, v, _ = headline(task, r)
    if v is None:
        return name
    ci = v.get("ci95")
    return f"{name} {v['mean']:.4g}" + (f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else "")
