"""Start-up cost: importing latentmem, the CLI's fast paths, and loading the default model.

    .venv/bin/python benchmarks/bench_load.py                  # warm loads only (~1 min on 2 cores)
    .venv/bin/python benchmarks/bench_load.py --cold           # also a cold load: a fresh cache, GGUF conversion (~30 s more)
    .venv/bin/python benchmarks/bench_load.py --src /tmp/old/src --label before   # another source tree, as its own column

Every figure is the wall time of a fresh Python process (``python -c ...``), so nothing is
cached in-process; a figure is the median of ``--repeat`` runs (cold: one run). Rows:

* ``import latentmem``: the package and its interface types (no model code);
* ``memoryllm --help`` / ``--version``: the whole command line's parser (must not import torch);
* ``memoryllm history`` on a small data directory: a verb that needs no model;
* ``import torch`` / ``import transformers`` / ``import peft``: what the load below imports first;
* ``latentmem.load()`` warm: the embedded default from the converted cache + the shipped memory
  weights, timed inside the process after ``import latentmem`` (the phases: time to the loaded
  model with the libraries above already imported, i.e. the load's own work);
* ``memoryllm ask`` on an empty data directory: a user's first answer from the command line
  (import, load, a new memory, 8 tokens);
* ``latentmem.load()`` cold: the same with an empty cache directory (XDG_CACHE_HOME), which
  converts the GGUF weights first.

Results go to results/benchmarks/load.md and load.json (the command and the date included);
runs with other ``--label`` values already in load.json are kept as further columns.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "benchmarks"

TIMED = "import time, json, sys\nt0 = time.perf_counter()\n{body}\nprint(json.dumps({{'seconds': time.perf_counter() - t0{extra}}}))"

LOAD = """
import torch
torch.set_num_threads({threads})
import latentmem
t_import = time.perf_counter() - t0
{preload}
t1 = time.perf_counter()
lm = latentmem.load()
t_load = time.perf_counter() - t1
"""


def child(code: str, env: dict, timeout: float = 600) -> dict:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"child failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def wall(argv: list[str], env: dict, timeout: float = 120) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"{argv} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def median(f, repeat: int) -> float:
    return statistics.median(f() for _ in range(repeat))


def small_store(env: dict, tmp: Path) -> Path:
    """A data directory with one memory of a tiny model (history reads only its ledger)."""
    data = tmp / "data"
    code = f"""
import sys
sys.path.insert(0, {str(ROOT / 'tests')!r})
from conftest import tiny_lm, CORPUS
from latentmem.store import MemoryStore
with MemoryStore({str(data)!r}, tiny_lm()) as s:
    s.create("default", seed=0)
    s.inject("default", CORPUS[:3])
print('{{}}')
"""
    child(code, env)
    return data


def measure(src: Path, threads: int, repeat: int, cold: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src), PYTHONDONTWRITEBYTECODE="1")
    py = sys.executable
    rows: dict[str, float | None] = {}
    rows["import latentmem"] = median(lambda: child(TIMED.format(body="import latentmem", extra=""), env)["seconds"], repeat)
    rows["memoryllm --help (wall)"] = median(lambda: wall([py, "-m", "latentmem", "--help"], env), repeat)
    try:
        rows["memoryllm --version (wall)"] = median(lambda: wall([py, "-m", "latentmem", "--version"], env), repeat)
    except RuntimeError:  # a tree without --version
        rows["memoryllm --version (wall)"] = None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            data = small_store(env, Path(tmp))
            rows["memoryllm history, no model (wall)"] = median(lambda: wall([py, "-m", "latentmem", "history", "--data", str(data)], env), repeat)
        except RuntimeError:  # a tree without the verb
            rows["memoryllm history, no model (wall)"] = None
    for mod in ("torch", "transformers", "peft"):
        rows[f"import {mod}"] = median(lambda mod=mod: child(TIMED.format(body=f"import {mod}", extra=""), env)["seconds"], repeat)

    def load_run(extra_env: dict, preload: bool) -> dict:
        body = LOAD.format(threads=threads, preload="import transformers, peft" if preload else "")
        return child(TIMED.format(body=body, extra=", 'import': t_import, 'load': t_load"), {**env, **extra_env})

    runs = [load_run({}, False) for _ in range(repeat)]
    rows["latentmem.load() warm: process total"] = statistics.median(r["seconds"] for r in runs)
    rows["latentmem.load() warm: the load() call"] = statistics.median(r["load"] for r in runs)
    rows["latentmem.load() warm: load() after importing transformers+peft"] = statistics.median(load_run({}, True)["load"] for _ in range(repeat))
    with tempfile.TemporaryDirectory() as tmp:  # a whole CLI answer: import, load, create, first answer
        ask = [py, "-m", "latentmem", "ask", "When is the launch?", "--data", str(Path(tmp) / "data"), "--max-new-tokens", "8", "--threads", str(threads)]
        try:
            rows["memoryllm ask, default model, new memory (wall)"] = median(lambda: wall(ask, env, timeout=300), repeat)
        except RuntimeError:  # a tree whose ask cannot run on an empty data directory
            rows["memoryllm ask, default model, new memory (wall)"] = None
    rows["latentmem.load() cold (fresh cache: conversion)"] = None
    if cold:
        with tempfile.TemporaryDirectory() as cache:
            rows["latentmem.load() cold (fresh cache: conversion)"] = load_run({"XDG_CACHE_HOME": cache}, False)["load"]
    return {k: None if v is None else round(v, 3) for k, v in rows.items()}


def render(doc: dict) -> str:
    labels = list(doc["runs"])
    keys = list(dict.fromkeys(k for run in doc["runs"].values() for k in run["rows"]))
    lines = [
        "# Start-up and load time (benchmarks/bench_load.py)",
        "",
        "Seconds, wall time of fresh processes (median of the repeats; cold: one run). "
        "`--help`, `--version` and `history` are whole CLI processes; `load()` rows time the call inside the process.",
        "",
        "| measurement | " + " | ".join(labels) + " |",
        "|---|" + "---:|" * len(labels),
    ]
    for k in keys:
        cells = []
        for lab in labels:
            v = doc["runs"][lab]["rows"].get(k)
            cells.append("—" if v is None else f"{v:.2f}")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines.append("")
    for lab in labels:
        r = doc["runs"][lab]
        lines.append(f"- **{lab}**: `{r['command']}` on {r['date']} ({r['machine']}; source {r['src']}; torch threads {r['threads']}; {r['repeat']} repeats)")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--src", default=str(ROOT / "src"), help="source tree to import latentmem from")
    ap.add_argument("--label", default="now", help="column name in the table")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads in the load runs")
    ap.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    ap.add_argument("--cold", action="store_true", help="also load once from an empty cache (converts the GGUF, ~30 s)")
    ap.add_argument("--out", default=str(OUT), help="folder for load.md and load.json")
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    rows = measure(Path(args.src), args.threads, args.repeat, args.cold)
    load_avg = f"load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "load.json"
    doc = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    doc["runs"][args.label] = {
        "rows": rows, "command": " ".join([Path(sys.executable).name, *sys.argv]), "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, {load_avg}", "src": args.src,
        "threads": args.threads, "repeat": args.repeat,
    }
    path.write_text(json.dumps(doc, indent=1) + "\n")
    (out / "load.md").write_text(render(doc))
    print(render(doc))


if __name__ == "__main__":
    main()
