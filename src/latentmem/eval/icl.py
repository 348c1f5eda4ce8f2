"""Memory-augmented in-context learning (LongMem section 4.3, ``eval compare``): many labelled
demonstrations held in memory, a few in the prompt, then a test sentence to classify.

Rows come from ``icl_classification.jsonl`` (sst2, sst5, mr, subj): demonstrations from the
train split, queries from the test split, both drawn with the seed (queries balanced across
labels as far as the rows allow). A demonstration reads ``Input: <text>\\nLabel: <label name>``;
the prediction is the label name with the highest mean token log-probability (``lm.score``)
after the prompt, so a model is never marked wrong for its wording. Methods, with ``size``
demonstrations available and the same ``prompt_demos`` of them in every prompt:

* ``memory``: the other demonstrations injected into an empty memory, one write each;
* ``none``: the prompt's demonstrations only;
* ``prompt``: as many of the others as fit in the window (``window_tokens``), newest last;
* ``bm25``: the others BM25 ranks best for the query, up to ``bm25_tokens`` tokens.

Accuracy with its Wilson interval; the majority-label rate of the queries is the chance level.
"""

from __future__ import annotations

import random

from . import metrics
from .data import DataError, read_jsonl, resolve

METHODS = ("memory", "none", "prompt", "bm25")


def demo(row: dict) -> str:
    return f"Input: {row['text']}\nLabel: {row['label_name']}"


def query(row: dict) -> str:
    return f"Input: {row['text']}\nLabel:"


def load_icl(name: str, task: str, size: int, queries: int, seed: int) -> tuple[list[dict], list[dict], list[str]]:
    rows = [r for r in read_jsonl(resolve(name)) if r.get("task") == task]
    if not rows:
        raise DataError(f"{name}: no rows of task {task!r}")
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]
    rng = random.Random(f"icl-{task}-{seed}")
    rng.shuffle(train)
    rng.shuffle(test)
    labels = sorted({r["label_name"] for r in rows}, key=lambda n: min(r["label"] for r in rows if r["label_name"] == n))
    by_label = {n: [r for r in test if r["label_name"] == n] for n in labels}
    picked = []  # round robin over labels: balanced as far as the rows allow
    while len(picked) < queries and any(by_label.values()):
        for n in labels:
            if by_label[n] and len(picked) < queries:
                picked.append(by_label[n].pop())
    if len(train) < size or len(picked) < queries:
        raise DataError(f"{name}/{task}: {len(train)} train and {len(test)} test rows, {size} demonstrations and {queries} queries asked")
    return train[:size], picked, labels


def predict(scores: list[tuple[float, int]]) -> int:
    """Index of the best label by mean token log-probability (ties: the first)."""
    means = [lp / n for lp, n in scores]
    return max(range(len(means)), key=lambda i: (means[i], -i))


def measure_icl(lm, method: str, *, size: int, queries: int = 20, task: str = "sst2", dataset: str = "icl_classification", prompt_demos: int = 4,
                window_tokens: int | None = None, bm25_tokens: int = 512, batch_size: int = 8, seed: int = 0) -> dict:
    if method not in METHODS:
        raise ValueError(f"unknown icl method {method!r}; choose from {', '.join(METHODS)}")
    demos, qs, labels = load_icl(dataset, task, size, queries, seed)
    in_prompt, rest = demos[:prompt_demos], demos[prompt_demos:]
    head = "\n\n".join(demo(d) for d in in_prompt)
    window = int(window_tokens or lm.info().details["context_window"])
    mem = None
    if method == "memory" and rest:
        mem = lm.new_memory(seed=seed)
        for d in rest:
            lm.inject(mem, demo(d), allow_short=True, progress=False)
    prompts = []
    for q in qs:
        extra: list[str] = []
        if method == "prompt":
            budget = window - len(lm.encode(head + "\n\n" + query(q))) - 16
            for d in reversed(rest):
                n = len(lm.encode(demo(d))) + 2
                if n > budget:
                    break
                extra.insert(0, demo(d))
                budget -= n
        elif method == "bm25" and rest:
            from .facts import bm25_context

            extra = [bm25_context(lm, [demo(d) for d in rest], q["text"], bm25_tokens).replace("\nInput:", "\n\nInput:")]
        prompts.append("\n\n".join([p for p in extra + [head] if p] + [query(q)]))
    rows = [(i, lab) for i in range(len(qs)) for lab in labels]
    scores: list[tuple[float, int]] = []
    for s in range(0, len(rows), batch_size):
        part = rows[s : s + batch_size]
        scores += lm.score([mem] * len(part), [prompts[i] for i, _ in part], [lab for _, lab in part])
    L = len(labels)
    preds = [labels[predict(scores[i * L : (i + 1) * L])] for i in range(len(qs))]
    correct = [p == q["label_name"] for p, q in zip(preds, qs)]
    majority = max(sum(q["label_name"] == n for q in qs) for n in labels) / len(qs)
    return {"accuracy": metrics.rate(correct), "chance": majority, "labels": labels, "demos_in_memory": len(rest) if method == "memory" else 0,
            "prompt_tokens_mean": sum(len(lm.encode(p)) for p in prompts) / len(prompts), "predictions": [{"id": q["id"], "label": q["label_name"], "pred": p} for q, p in zip(qs, preds)]}
