"""Measure a trained MemoryLLM on held-out rows (``is_heldout``), against its untrained base.

    python -m latentmem.train.measure --weights runs/train_default/default_memoryllm.safetensors \
        --qa-rows 200 --lm-pairs 100 --out results/training/metrics.json

Recall (counterfactual_qa: the answer exists only in the row's context), per row the answer's
teacher-forced log-likelihood (per token) and a greedy 10-token hit, for:
  none_base     base model, no context            (a)
  memory_base   untrained base, context in memory (b)
  memory_trained trained model, context in memory (c)
  prompt_base   base model, context in the prompt (d)
  prompt_base_chat  (d) in the base model's chat template ("<context> Answer briefly: <question>")
  none_trained / prompt_trained: the trained model without memory (does training hurt the base?)
Language modelling on held-out (x1, x2) pairs of wikipedia/news: loss on x2 with memory of x1
(trained, untrained), with x1 in the prompt (base), and alone; and continuous contexts: loss on
xn with memory of x1..x(n-1) vs the base with only x(n-1) in its window, or none. Each loss
has a bootstrap interval over examples, and conditions measured on the same examples are
compared pairwise (``lm_pairs_compare``, ``continuous_compare``: paired bootstrap intervals of
the difference, which are much tighter than the two losses' own intervals).
Conditions already in the output file are kept (``--conditions`` runs a subset), so the base
rows can be measured while the model trains.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from ..eval import metrics
from ..eval.common import generate, model_info, write_json
from ..eval.data import HELDOUT_PERCENT, is_heldout, load_qa
from ..text import pad_token_id, qa_prompt
from .config import TrainConfig
from .data import load_train_data
from .routines import Batch, memory_loss, prompt_loss

QA_CONDITIONS = ("none_base", "memory_base", "memory_trained", "prompt_base", "prompt_base_chat", "none_trained", "prompt_trained")
# none / prompt_last / prompt_all: the base model; *_trained: the trained model (its LoRA also
# acts without memory, so none_trained shows what training did to plain language modelling)
LM_CONDITIONS = ("none", "memory_base", "memory_trained", "prompt_last", "prompt_all", "none_trained", "prompt_last_trained")


def load_lms(weights: str | None, num_tokens: int, num_blocks: int, need_trained: bool):
    from ..memoryllm.checkpoint import apply_trained_weights, load_default
    from ..memoryllm.lm import MemoryLM

    model, tok = load_default(num_tokens=num_tokens, num_blocks=num_blocks, trained=False)
    base = MemoryLM(model, tok, name="SmolLM2-135M-Instruct (untrained memory)")
    trained = None
    if need_trained:
        model2, _ = load_default(num_tokens=num_tokens, num_blocks=num_blocks, trained=weights is None)
        if weights is not None:
            model2.applied_weights = apply_trained_weights(model2, weights)
        if model2.applied_weights is None:
            raise SystemExit("no trained weights: pass --weights or ship src/latentmem/assets/default_memoryllm.safetensors")
        trained = MemoryLM(model2, tok, name="SmolLM2-135M-Instruct (trained memory)")
    return base, trained


def _passage_key(row: dict) -> str:
    """The passage with its (swapped-in) answer masked: rows built from one Natural Questions
    passage share it even when their ids, questions and answers differ."""
    return row["context"].replace(row["answer"], "#")[:200]


def qa_rows(lm, n: int, max_context_tokens: int, max_answer_tokens: int, seed: int, strict: bool = False) -> list[dict]:
    """The first n held-out counterfactual_qa rows (seeded order) within the training limits;
    strict: only rows whose passage no training row shares (see _passage_key)."""
    out = []
    rows = load_qa("counterfactual_qa", seed=seed)
    seen = {_passage_key(r) for r in rows if not is_heldout(r["id"])} if strict else set()
    for r in rows:
        if not is_heldout(r["id"]) or _passage_key(r) in seen:
            continue
        if not 16 <= len(lm.encode(r["context"])) <= max_context_tokens or len(lm.encode(" " + r["answer"])) > max_answer_tokens:
            continue
        out.append(r)
        if len(out) == n:
            break
    return out


def measure_qa(base, trained, rows: list[dict], conditions, batch: int, log, done=lambda res: None) -> dict:
    """Each condition's result goes to `done` as soon as it exists (a long run saves as it goes)."""
    res = {}
    for cond in conditions:
        lm = trained if cond.endswith("trained") else base
        # the instruct base answers better in its chat template ("Answer briefly: ..."): the
        # *_chat condition gives the in-prompt baseline its best prompt, not only ours
        style = "chat" if cond.endswith("_chat") else "plain"
        lps, hits, gens = [], [], []
        t0 = time.perf_counter()
        for s in range(0, len(rows), batch):
            part = rows[s : s + batch]
            if cond.startswith("prompt"):
                prompts = [qa_prompt(lm, r["question"], style, r["context"]) for r in part]
            else:
                prompts = [qa_prompt(lm, r["question"], style) for r in part]
            memories = [None] * len(part)
            if cond.startswith("memory"):
                memories = [lm.new_memory(seed=i) for i in range(len(part))]
                lm.inject(memories, [r["context"] for r in part])
            out = generate(lm, memories, prompts, 10)
            lp = lm.score(memories, prompts, [r["answer"] for r in part])
            gens += out
            hits += [metrics.hit(g, r["answers"]) for g, r in zip(out, part)]
            lps += [a / n for a, n in lp]
        res[cond] = {"hit": metrics.rate(hits), "answer_logprob_per_token": metrics.mean_ci(lps), "rows": len(rows), "seconds": round(time.perf_counter() - t0, 1), "examples": [{"id": r["id"], "answer": r["answer"], "generated": g} for r, g in zip(rows[:5], gens[:5])]}
        log(f"qa {cond}: hit {res[cond]['hit']['mean']:.3f} logprob/token {res[cond]['answer_logprob_per_token']['mean']:.3f} ({res[cond]['seconds']} s)")
        done({cond: res[cond]})
    return res


def lm_examples(cfg: TrainConfig, tokenizer, n: int, segments: int, seed: int) -> list[list[list[int]]]:
    """n held-out documents cut into `segments` consecutive pieces of segment_min..segment_max tokens."""
    data = load_train_data(cfg, tokenizer, "heldout")
    data.qa = []
    rng = random.Random(f"{seed}:lm:{segments}")
    return [data.segments(rng, [rng.randint(cfg.segment_min, cfg.segment_max) for _ in range(segments)])[1] for _ in range(n)]


@torch.no_grad()
def measure_lm(base, trained, examples: list[list[list[int]]], conditions, batch: int, log) -> dict:
    """Per condition: the token-weighted loss on each example's last segment, its bootstrap
    interval, and each example's (summed loss, tokens), which ``compare_lm`` pairs up."""
    pad = pad_token_id(base.tokenizer)
    res = {}
    for cond in conditions:
        lm = trained if cond.endswith("trained") else base
        rows: list[tuple[float, int]] = []
        t0 = time.perf_counter()
        for s in range(0, len(examples), batch):
            part = examples[s : s + batch]
            rounds = [[ex[r] for ex in part] for r in range(len(part[0]) - 1)]
            b = Batch("eval", rounds, [ex[-1] for ex in part], [1] * len(part), False, False, True, s)
            if cond.startswith("memory"):
                sums, counts = memory_loss(lm.model, b, None, pad, per_row=True)  # each example into an empty pool
            elif cond.startswith("prompt_last"):  # the window truncated to the last context segment
                sums, counts = prompt_loss(lm.model, b, pad, [ex[-2] for ex in part], per_row=True)
            elif cond.startswith("prompt_all"):
                sums, counts = prompt_loss(lm.model, b, pad, [sum(ex[:-1], []) for ex in part], per_row=True)
            else:
                sums, counts = prompt_loss(lm.model, b, pad, per_row=True)
            rows += [(float(x), int(c)) for x, c in zip(sums.tolist(), counts.tolist())]
        ci = metrics.token_mean_ci(rows)
        res[cond] = {"loss": round(ci["mean"], 4), "ci95": [round(x, 4) for x in ci["ci95"]], "tokens": sum(c for _, c in rows), "pairs": len(examples), "seconds": round(time.perf_counter() - t0, 1), "per_example": [[round(x, 4), c] for x, c in rows]}
        log(f"lm {len(examples[0])} segments {cond}: loss {res[cond]['loss']} {res[cond]['ci95']} ({res[cond]['seconds']} s)")
    return res


# (trained condition, its reference): the targets and the memory-off baseline
LM_COMPARISONS = (("memory_trained", "prompt_last"), ("memory_trained", "prompt_all"), ("memory_trained", "none"), ("memory_trained", "none_trained"), ("memory_trained", "memory_base"))


def compare_lm(section: dict) -> dict:
    """Paired differences (trained minus reference, negative = the trained memory is better)
    for every LM_COMPARISONS pair measured on the same examples in ``section`` (one results
    block: condition -> result)."""
    out = {}
    for a, b in LM_COMPARISONS:
        ra, rb = section.get(a, {}).get("per_example"), section.get(b, {}).get("per_example")
        if not ra or not rb or len(ra) != len(rb):
            continue
        d = metrics.paired_loss_difference(ra, rb)
        out[f"{a} - {b}"] = {k: [round(x, 4) for x in v] if k == "ci95" else round(v, 4) if isinstance(v, float) else v for k, v in d.items()}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m latentmem.train.measure", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/train_default.toml", help="the training config (shape, data, segment lengths)")
    p.add_argument("--weights", default=None, help="trained weights (default: the shipped ones)")
    p.add_argument("--qa-rows", type=int, default=200)
    p.add_argument("--lm-pairs", type=int, default=100)
    p.add_argument("--continuous", default="4,10", help="numbers of segments n for the continuous-context loss")
    p.add_argument("--continuous-docs", type=int, default=24)
    p.add_argument("--conditions", default="all", help="comma list of condition names, 'base' (untrained only) or 'all'")
    p.add_argument("--strict", action="store_true", help="QA rows whose passage appears in no training row (a stricter split than by id)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/training/metrics.json")
    p.add_argument("--set", nargs="*", default=[], metavar="key=value", help="config overrides (e.g. the segment lengths of the LM pairs)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = TrainConfig.load(args.config, args.set)
    wanted = set(QA_CONDITIONS) | set(LM_CONDITIONS)
    if args.conditions == "base":
        wanted = {c for c in wanted if not c.endswith("trained")}
    elif args.conditions != "all":
        wanted = set(args.conditions.split(","))
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else {}
    clock = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[measure {time.perf_counter() - clock:6.0f}s] {msg}", file=sys.stderr, flush=True)

    base, trained = load_lms(args.weights, cfg.num_tokens, cfg.num_blocks, any(c.endswith("trained") for c in wanted))
    info = {"base": model_info(base)}
    if trained is not None:
        info["trained"] = model_info(trained)
    result.setdefault("models", {}).update(info)
    result["split"] = f"held-out rows: latentmem.eval.data.is_heldout(id) (sha256 of the id, {HELDOUT_PERCENT}%)"
    result.setdefault("commands", []).append(" ".join(["python -m latentmem.train.measure", *(argv if argv is not None else sys.argv[1:])]))

    def save():
        write_json(out, result)

    rows = qa_rows(base, args.qa_rows, cfg.qa_max_context_tokens, cfg.qa_max_answer_tokens, args.seed, args.strict) if args.qa_rows else []
    if rows:
        result["qa_rows"] = {"n": len(rows), "filter": f"held-out{' (strict: passage in no training row)' if args.strict else ''}, context 16..{cfg.qa_max_context_tokens} tokens, answer <= {cfg.qa_max_answer_tokens} tokens (the training limits)", "prompt": "plain 'Question: ... Answer:' (context in prompt: 'Context: ...\\n' before it)", "generation": "greedy, 10 new tokens, hit = normalised answer in the output"}

        def save_qa(part: dict) -> None:
            result.setdefault("qa", {}).update(part)
            save()

        measure_qa(base, trained, rows, [c for c in QA_CONDITIONS if c in wanted], args.batch_size, log, save_qa)
    lm_conds = [c for c in LM_CONDITIONS if c in wanted]
    if args.lm_pairs:
        pairs = lm_examples(cfg, base.tokenizer, args.lm_pairs, 2, args.seed)
        pair_conds = [c for c in lm_conds if c != "prompt_all"]  # with two segments prompt_all is prompt_last
        result.setdefault("lm_pairs", {}).update(measure_lm(base, trained, pairs, pair_conds, args.batch_size, log))
        result["lm_pairs_compare"] = compare_lm(result["lm_pairs"])
        save()
    for n in [int(x) for x in args.continuous.split(",") if x]:
        docs = lm_examples(cfg, base.tokenizer, args.continuous_docs, n, args.seed)
        result.setdefault("continuous", {}).setdefault(str(n), {}).update(measure_lm(base, trained, docs, lm_conds, max(1, args.batch_size // 2), log))
        result.setdefault("continuous_compare", {})[str(n)] = compare_lm(result["continuous"][str(n)])
        save()
    log(f"done -> {out}")
    return 0



def plot_loss(metrics_csv: str | Path, png: str | Path, window: int = 10, marks: dict[int, str] | None = None) -> Path:
    """The training loss per step, one colour per routine, with a moving average per routine;
    ``marks``: {step: label} drawn as vertical lines (e.g. a config change at a resume)."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(Path(metrics_csv).open()))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    by_routine: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        by_routine.setdefault(r["routine"].split("+")[0], []).append((int(r["step"]), float(r["loss"])))
    for name, pts in sorted(by_routine.items()):
        steps, losses = zip(*pts)
        line = ax.plot(steps, losses, ".", alpha=0.35)[0]
        avg = [sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]
        ax.plot(steps, avg, "-", color=line.get_color(), label=f"{name} (moving mean of {window})")
    for step, label in (marks or {}).items():
        ax.axvline(step, color="grey", ls="--", lw=1)
        ax.text(step, ax.get_ylim()[1], f" {label}", va="top", fontsize=8, color="grey")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean next-token NLL of the scored tokens)")
    ax.set_title("MemoryLLM training of the default model (SmolLM2-135M, LoRA r=8)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


if __name__ == "__main__":
    sys.exit(main())
