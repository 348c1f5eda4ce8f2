"""Evaluations of MemoryLLM as in the paper (sections 4.3-4.6), each writing JSON and a PNG.

    from latentmem.eval import run
    run("retention", dataset="counterfactual_qa", rows=50, steps=20)
    run("integrity", max_updates=1_000_000, workdir="runs/integrity")   # resumable
    run("editing", edits=100)
    run("longqa", questions=30, lengths=[2048, 4096, 8192])
    run("longbench", data=["hotpotqa.jsonl"])                          # local LongBench files
    run("facts", items=100, checkpoints=[10, 100])                     # many facts in one memory; resumable
    run("longbench-score", predictions=["pred/hotpotqa.jsonl"])
    run("compare", quick=True, designs="memoryllm,larimar")             # every design x task, side by side; resumable

Every task takes ``lm=`` (any loaded ``latentmem.api.MemoryModel``: the tasks use that interface
only) or ``model=`` (a folder; None = the embedded default) plus ``num_tokens`` / ``num_blocks``;
``out=`` a folder or .json path (default results/eval); ``seed=``; ``threads=``. Command line: ``memoryllm eval <task> --help``.
"""

from __future__ import annotations

from . import metrics
from .data import DataError

TASKS = ("retention", "integrity", "editing", "longqa", "longbench", "longbench-score", "facts", "compare")


def run(task: str, **options) -> dict:
    """Run one evaluation; returns its results (also written to JSON, plus a PNG where it has one)."""
    if task == "retention":
        from .retention import run_retention as f
    elif task == "integrity":
        from .integrity import run_integrity as f
    elif task == "editing":
        from .editing import run_editing as f
    elif task == "longqa":
        from .longqa import run_longqa as f
    elif task == "longbench":
        from .longqa import run_longbench as f
    elif task == "facts":
        from .facts import run_facts as f
    elif task == "compare":
        from .compare import run_compare as f
    elif task in ("longbench-score", "longbench_score"):
        from .longqa import score_longbench

        return score_longbench(options.pop("predictions"), **options)
    else:
        raise ValueError(f"unknown evaluation task {task!r}; choose from {', '.join(TASKS)}")
    return f(**options)


__all__ = ["run", "TASKS", "metrics", "DataError"]
