"""``memoryllm eval <task> [options]``: registered by ``add_parser(subparsers)`` from the main CLI."""

from __future__ import annotations

import argparse
import json
import sys


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="local model folder (default: the embedded default model)")
    p.add_argument("--num-tokens", type=int, default=None, help="K (new models only)")
    p.add_argument("--num-blocks", type=int, default=None, help="N = num_blocks * K (new models only)")
    p.add_argument("--untrained", dest="trained", action="store_false", help="the embedded default without its shipped trained memory weights (the base model)")
    p.add_argument("--weights", default=None, help="trained memory weights (memoryllm train's export) to apply to the embedded default instead of the shipped ones")
    p.add_argument("--out", default=None, help="results folder or .json file (default: results/eval)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared machine)")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="skip the PNG")
    p.add_argument("--quiet", dest="progress", action="store_false", help="no progress lines on stderr")


def add_parser(subparsers) -> argparse.ArgumentParser:
    ev = subparsers.add_parser("eval", help="paper evaluations: retention, integrity, editing, longqa, longbench; facts (many facts in one memory); compare (every design side by side)")
    sub = ev.add_subparsers(dest="eval_task", required=True)

    p = sub.add_parser("retention", help="knowledge retention curve vs the paper's Eq. 5 (section 4.5)")
    _common(p)
    p.add_argument("--dataset", default="counterfactual_qa", help="counterfactual_qa, squad_disfluent_qa, or a local SQuAD/NQ file")
    p.add_argument("--rows", type=int, default=50)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--filler", default="news_articles", help="news_articles, wikipedia_articles, or a jsonl with 'text'")
    p.add_argument("--filler-tokens", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8, help="pools processed together")
    p.add_argument("--max-new-tokens", type=int, default=10)
    p.add_argument("--prompt", default="plain", choices=["plain", "chat", "auto"])
    p.add_argument("--max-answer-tokens", default="auto", help="answer length filter (auto: 3 for SQuAD, else 4; 0: none)")
    p.add_argument("--no-context-in-prompt", dest="context_in_prompt", action="store_false")

    p = sub.add_parser("integrity", help="endless injection stream: accuracy on the latest context + memory health (section 4.6); resumable")
    _common(p)
    p.add_argument("--dataset", default="counterfactual_qa")
    p.add_argument("--max-updates", type=int, default=1000, help="stop when the pool has this many updates (over all resumed runs)")
    p.add_argument("--max-seconds", type=float, default=None, help="stop this invocation after this long")
    p.add_argument("--window", type=int, default=1000, help="sliding window of answers (paper: 1004 NQ, 2250 SQuAD)")
    p.add_argument("--eval-every", type=int, default=1)
    p.add_argument("--health-every", type=int, default=100)
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--workdir", default=None, help="checkpoint folder (default runs/eval/integrity_<dataset>_seed<seed>)")
    p.add_argument("--no-resume", dest="resume", action="store_false")
    p.add_argument("--max-new-tokens", type=int, default=10)
    p.add_argument("--prompt", default="plain", choices=["plain", "chat", "auto"])

    p = sub.add_parser("editing", help="model editing: efficacy / generalization / specificity / score vs baselines (section 4.3)")
    _common(p)
    p.add_argument("--facts", default="wikidata_facts")
    p.add_argument("--edits", type=int, default=100)
    p.add_argument("--methods", default="no_edit,memoryllm,memoryllm_sequence,ike,ft_l,ft_l_sequence")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--ft-layer", type=int, default=None)
    p.add_argument("--ft-steps", type=int, default=10)
    p.add_argument("--ft-lr", type=float, default=1e-3)
    p.add_argument("--ft-eps", type=float, default=2e-3)

    p = sub.add_parser("longqa", help="long-context QA: memory vs truncation vs full context vs BM25 (section 4.4)")
    _common(p)
    p.add_argument("--dataset", default="squad_disfluent_qa")
    p.add_argument("--questions", type=int, default=30)
    p.add_argument("--lengths", default="2048,4096,8192")
    p.add_argument("--methods", default="memoryllm,truncated,full,bm25")
    p.add_argument("--window", type=int, default=None, help="base model window for 'truncated' (default 2048)")
    p.add_argument("--chunk-tokens", type=int, default=None)
    p.add_argument("--bm25-tokens", type=int, default=None)
    p.add_argument("--bm25-chunk-tokens", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--prompt", default="auto", choices=["plain", "chat", "auto"])
    p.add_argument("--batch-size", type=int, default=4)

    p = sub.add_parser("longbench", help="run a method on local LongBench jsonl files, write predictions, score them")
    _common(p)
    p.add_argument("data", nargs="+", help="LongBench jsonl files (hotpotqa.jsonl, ...)")
    p.add_argument("--method", default="memoryllm", choices=["memoryllm", "truncated", "full", "bm25"])
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--predictions-dir", default="results/eval/longbench_pred")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: LongBench's per-dataset budget")
    p.add_argument("--window", type=int, default=None)
    p.add_argument("--prompt", default="auto", choices=["plain", "chat", "auto"])
    p.add_argument("--batch-size", type=int, default=2)

    p = sub.add_parser("facts", help="many facts in one memory: recall vs age at checkpoints, vs prompt-window and BM25 baselines (issue 15); resumable")
    _common(p)
    p.add_argument("--items", type=int, default=100, help="facts and passages in the stream")
    p.add_argument("--checkpoints", default="10,100,1000", help="ask every item's question after this many items (the last item always)")
    p.add_argument("--methods", default="memory,none,window,bm25,fresh")
    p.add_argument("--passage-share", type=float, default=0.5, help="share of items that are counterfactual_qa passages (the rest synthetic facts)")
    p.add_argument("--dataset", default="counterfactual_qa")
    p.add_argument("--min-passage-tokens", type=int, default=16)
    p.add_argument("--max-passage-tokens", type=int, default=512)
    p.add_argument("--filler", default="news_articles")
    p.add_argument("--filler-rate", type=float, default=0.5, help="unrelated filler texts per item")
    p.add_argument("--filler-tokens", type=int, default=128)
    p.add_argument("--questions-per-checkpoint", type=int, default=None, help="ask an evenly spaced sample (first and newest kept) instead of every item")
    p.add_argument("--no-probe", dest="probe", action="store_false", help="do not ask each item's question right after writing it")
    p.add_argument("--window-tokens", type=int, default=None, help="prompt budget of the 'window' baseline (default: the model's context window)")
    p.add_argument("--bm25-tokens", type=int, default=512)
    p.add_argument("--max-new-tokens", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--checkpoint-every", type=int, default=25, help="save the memory every this many stream texts")
    p.add_argument("--workdir", default=None, help="progress folder (default runs/eval/facts_<dataset>_<items>_seed<seed>)")
    p.add_argument("--no-resume", dest="resume", action="store_false")
    p.add_argument("--max-seconds", type=float, default=None, help="stop this invocation after this long (what was measured is kept)")

    p = sub.add_parser("compare", help="every design (and variant) and the baselines side by side on the same held-out rows: facts, editing, forgetting, perplexity, longqa, needle, icl, cost (issue 20); resumable")
    p.add_argument("--model", default=None, help="local model folder every design is built on (default: the embedded default model)")
    p.add_argument("--designs", default="memoryllm,longmem,larimar", help="designs (all their variants) or variant names: memoryllm, longmem, longmem-release, larimar, larimar-sequential")
    p.add_argument("--variants", default="all", choices=["all", "default"], help="a design named in --designs runs all its variants, or its default only")
    p.add_argument("--baselines", default="none,prompt,bm25,ft_l", help="none (no memory / no edit), prompt (text in the prompt; IKE for edits), bm25, ft_l (edits)")
    p.add_argument("--tasks", default="facts,editing,forgetting,perplexity,longqa,needle,icl,cost")
    p.add_argument("--quick", action="store_true", help="the small preset (sizes and samples for minutes on a CPU) instead of the full one")
    p.add_argument("--sizes", action="append", default=None, metavar="TASK=N,N", help="sizes of one task, e.g. facts=10,100 or editing=1,10,100 (repeatable)")
    p.add_argument("--samples", action="append", default=None, metavar="TASK=N", help="samples per cell of one task, e.g. needle=10 (repeatable)")
    p.add_argument("--out", default=None, help="results folder (default results/eval/compare/full, or results/eval/compare/quick with --quick)")
    p.add_argument("--workdir", default=None, help="the sub-runs' folder (default runs/eval/compare[_quick]_seed<seed>)")
    p.add_argument("--no-resume", dest="resume", action="store_false")
    p.add_argument("--max-seconds", type=float, default=None, help="stop after the cell running at this time (what was measured is kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared machine)")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="skip the PNGs")
    p.add_argument("--quiet", dest="progress", action="store_false", help="no progress lines on stderr")

    p = sub.add_parser("longbench-score", help="LongBench QA F1 of prediction jsonl files (pred, answers[, length])")
    p.add_argument("predictions", nargs="+")
    p.add_argument("--out", default=None)
    ev.set_defaults(handler=cmd_eval)
    return ev


_MODEL_KEYS = ("model", "num_tokens", "num_blocks", "trained")


def cmd_eval(args) -> int:
    from . import run
    from .data import DataError

    opts = {k: v for k, v in vars(args).items() if k not in ("command", "eval_task", "handler")}
    task = args.eval_task
    if task == "retention" and opts.get("max_answer_tokens") not in (None, "auto"):
        opts["max_answer_tokens"] = int(opts["max_answer_tokens"]) or None
    try:
        res = run(task, **opts)
    except (DataError, ValueError, FileNotFoundError) as e:
        print(f"memoryllm eval {task}: error: {e}", file=sys.stderr)
        return 2
    summary = {k: res[k] for k in ("json_path", "png_path", "png_paths", "md_path", "complete") if k in res}
    if task == "longbench-score" or task == "longbench":
        summary["scores"] = res["scores"]
    print(json.dumps(summary, indent=1))
    return 0
