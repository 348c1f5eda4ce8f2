"""Model editing (paper section 4.3, Table 1) on counterfactual edits built from wikidata_facts.

An edit replaces a fact's true target with another target of the same relation ("The country
of 2000 Summer Olympics is Japan"), so the new fact is false in the world. Metrics per edit:

* efficacy: the edit's own prompt;
* generalization: paraphrases of the prompt (never the injected wording);
* specificity: unrelated facts (other subjects) keep their true target;

each measured two ways: *generation* (greedy continuation contains the target: new target
for efficacy/generalization, the neighbour's true target for specificity) and *probability*
(teacher-forced mean token log P(new) > P(old); for specificity P(true) > P(new), CounterFact's
neighbourhood score). Score = harmonic mean of the three.

Methods (same base model): ``no_edit``; ``memoryllm`` (the edit statement injected into a fresh
pool, one pool per edit); ``memoryllm_sequence`` (all edits injected one after another into one
pool, then all evaluated: later edits push earlier ones out at rate (1-K/N) per update);
``ike`` (the edit in the prompt with two demonstrations, IKE-style); ``ft_l`` (fine-tuning one
MLP's down projection on the new target with an L-infinity bound ``ft_eps`` on the change of the
base weights, Zhu et al. 2020 as used by ROME/EasyEdit; weights restored after each edit) and
``ft_l_sequence`` (the same edits applied cumulatively, evaluated at the end).
"""

from __future__ import annotations

import sys

import torch

from . import metrics
from .common import Timer, as_list, environment, finish, generate, model_info, start_task
from .data import build_edits, load_facts

ALL_METHODS = ("no_edit", "memoryllm", "memoryllm_sequence", "ike", "ft_l", "ft_l_sequence")


def edit_statement(e: dict) -> str:
    return f"{e['prompt']} {e['new']}."


def edit_text(lm, e: dict) -> str:
    """The statement, repeated until it reaches the model's minimum injection length (the
    releases warn that contexts under 16 tokens disturb the memory); no paraphrase is added,
    so generalization is still measured on unseen wordings."""
    s = edit_statement(e)
    text = s
    min_tokens = lm.info().details["min_inject_tokens"]
    while len(lm.encode(text)) < min_tokens:
        text = f"{text} {s}"
    return text


def ike_prefix(e: dict, demos: list[dict]) -> str:
    """IKE-style in-context edit: demonstrations of using a new fact (copy) and of ignoring it
    for an unrelated prompt (retain), then the new fact."""
    lines = []
    for d in demos:
        lines.append(f"New fact: {edit_statement(d)}\nPrompt: {d['prompt']} {d['new']}.")
        nb = d["neighbours"][0]
        lines.append(f"New fact: {edit_statement(d)}\nPrompt: {nb['prompt']} {nb['target']}.")
    lines.append(f"New fact: {edit_statement(e)}\nPrompt:")
    return "\n\n".join(lines) + " "


def _queries(e: dict) -> list[tuple[str, str, str, str]]:
    """(kind, prompt, wanted, competitor) per query of one edit."""
    q = [("efficacy", e["prompt"], e["new"], e["old"])]
    q += [("generalization", p, e["new"], e["old"]) for p in e["paraphrases"]]
    q += [("specificity", nb["prompt"], nb["target"], e["new"]) for nb in e["neighbours"]]
    return q


def _evaluate(lm, items: list[tuple[object, str, dict]], batch_size: int, max_new_tokens: int) -> list[dict]:
    """items: (memory or None, prompt prefix, edit). Returns per edit {kind: [(gen_ok, prob_ok)]}."""
    rows = []  # (item index, kind, full prompt, wanted, competitor, memory)
    for i, (mem, prefix, e) in enumerate(items):
        for kind, p, want, comp in _queries(e):
            rows.append((i, kind, prefix + p, want, comp, mem))
    out = [{"efficacy": [], "generalization": [], "specificity": []} for _ in items]
    for s in range(0, len(rows), batch_size):
        chunk = rows[s : s + batch_size]
        mems = [r[5] for r in chunk]
        prompts = [r[2] for r in chunk]
        gens = generate(lm, mems, prompts, max_new_tokens)
        lw = lm.score(mems, prompts, [r[3] for r in chunk])  # memory keys cached per version: computed once
        lc = lm.score(mems, prompts, [r[4] for r in chunk])
        for r, g, (a, na), (b, nb) in zip(chunk, gens, lw, lc):
            out[r[0]][r[1]].append((bool(metrics.hit(g, r[3])), bool(a / na > b / nb)))
    return out


def _aggregate(per_edit: list[dict], seed: int) -> dict:
    res = {}
    for k_i, kind in enumerate(("generation", "probability")):
        m = {}
        for metric in ("efficacy", "generalization", "specificity"):
            # one value per edit (the mean over its prompts), so every edit weighs the same
            vals = [sum(x[k_i] for x in pe[metric]) / len(pe[metric]) for pe in per_edit]
            m[metric] = metrics.mean_ci(vals, seed=seed)
        m["score"] = metrics.harmonic_mean([m[x]["mean"] for x in ("efficacy", "generalization", "specificity")])
        res[kind] = m
    return res


class FTL:
    """Fine-tuning with an L-infinity constraint on one MLP's down projection (FT-L), through the
    interface's hook for baselines that edit the backbone (``editable_weight``, ``backbone_logits``)."""

    def __init__(self, lm, layer: int, steps: int, lr: float, eps: float):
        self.lm, self.steps, self.lr, self.eps = lm, steps, lr, eps
        self.weight = lm.editable_weight(layer)
        self.base = self.weight.detach().clone()

    def restore(self) -> None:
        with torch.no_grad():
            self.weight.copy_(self.base)

    def apply(self, e: dict) -> float:
        lm = self.lm
        p_ids = lm.encode(e["prompt"])
        full = lm.encode(e["prompt"] + " " + e["new"])
        a_ids = full[len(p_ids) :] if full[: len(p_ids)] == p_ids else lm.encode(" " + e["new"])
        n = len(a_ids)
        target = torch.tensor(a_ids, device=self.weight.device)
        flag = self.weight.requires_grad
        self.weight.requires_grad_(True)
        opt = torch.optim.Adam([self.weight], lr=self.lr)
        loss_v = float("nan")
        try:
            with torch.enable_grad():
                for _ in range(self.steps):
                    logits = lm.backbone_logits(p_ids + a_ids)[-n - 1 : -1]
                    loss = torch.nn.functional.cross_entropy(logits.float(), target)
                    loss_v = float(loss.detach())
                    if loss_v < 1e-2:
                        break
                    opt.zero_grad()
                    # the gradient of this one weight only: the rest of the model is left alone
                    (self.weight.grad,) = torch.autograd.grad(loss, [self.weight])
                    opt.step()
                    with torch.no_grad():
                        self.weight.copy_(self.base + (self.weight - self.base).clamp(-self.eps, self.eps))
        finally:
            self.weight.grad = None
            self.weight.requires_grad_(flag)
        return loss_v


def run_editing(
    lm=None,
    *,
    facts: str = "wikidata_facts",
    edits: int = 100,
    methods: tuple[str, ...] | list[str] | str = ALL_METHODS,
    batch_size: int = 8,
    max_new_tokens: int = 8,
    ft_layer: int | None = None,
    ft_steps: int = 10,
    ft_lr: float = 1e-3,
    ft_eps: float = 2e-3,
    seed: int = 0,
    out=None,
    plot: bool = True,
    threads: int | None = None,
    progress: bool = False,
    **model_options,
) -> dict:
    lm, clock = start_task(lm, threads, model_options)
    methods = as_list(methods)
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad:
        raise ValueError(f"unknown editing method(s) {bad}; choose from {', '.join(ALL_METHODS)}")
    all_facts = load_facts(facts)
    es = build_edits(all_facts, edits + 2, seed=seed)
    demos, es = es[:2], es[2:]
    L = lm.info().details["layers"]
    ft_layer = max(0, round(L * 5 / 28)) if ft_layer is None else int(ft_layer)
    if not 0 <= ft_layer < L:
        raise ValueError(f"ft_layer must be in [0, {L - 1}], got {ft_layer}")
    results, timings, extra = {}, {}, {}
    group = max(1, batch_size // 6)  # edits whose queries fill about one batch

    def log(msg):
        if progress:
            print(f"[editing] {msg} ({clock():.0f} s)", file=sys.stderr, flush=True)

    for m in methods:
        t0 = Timer()
        per_edit: list[dict] = []
        if m == "no_edit":
            per_edit = _evaluate(lm, [(None, "", e) for e in es], batch_size, max_new_tokens)
        elif m == "ike":
            per_edit = _evaluate(lm, [(None, ike_prefix(e, demos), e) for e in es], batch_size, max_new_tokens)
        elif m == "memoryllm":
            for s in range(0, len(es), group):
                part = es[s : s + group]
                pools = [lm.new_memory(seed=seed * 1_000_003 + s + j) for j in range(len(part))]
                lm.inject(pools, [edit_text(lm, e) for e in part], allow_short=True, progress=False)
                per_edit += _evaluate(lm, [(p, "", e) for p, e in zip(pools, part)], batch_size, max_new_tokens)
        elif m == "memoryllm_sequence":
            pool = lm.new_memory(seed=seed)
            for e in es:
                lm.inject(pool, edit_text(lm, e), allow_short=True, progress=False)
            per_edit = _evaluate(lm, [(pool, "", e) for e in es], batch_size, max_new_tokens)
            extra[m] = {"updates": pool.update_count, "note": "edit i was followed by len(edits)-1-i later updates; survival (1-K/N)^age"}
        elif m in ("ft_l", "ft_l_sequence"):
            ft = FTL(lm, ft_layer, ft_steps, ft_lr, ft_eps)
            losses = []
            try:
                if m == "ft_l":
                    for e in es:
                        losses.append(ft.apply(e))
                        per_edit += _evaluate(lm, [(None, "", e)], batch_size, max_new_tokens)
                        ft.restore()
                else:
                    for e in es:
                        losses.append(ft.apply(e))
                    per_edit = _evaluate(lm, [(None, "", e) for e in es], batch_size, max_new_tokens)
            finally:
                ft.restore()
            extra[m] = {"layer": ft_layer, "steps": ft_steps, "lr": ft_lr, "eps": ft_eps, "final_loss_mean": sum(losses) / len(losses)}
        results[m] = _aggregate(per_edit, seed)
        results[m]["per_edit"] = [{k: [list(x) for x in v] for k, v in pe.items()} for pe in per_edit]
        timings[m] = round(t0(), 2)
        log(f"{m}: score gen {results[m]['generation']['score']:.3f}, prob {results[m]['probability']['score']:.3f}")
    if "memoryllm_sequence" in results:
        pe = results["memoryllm_sequence"]["per_edit"]
        n = len(pe)
        buckets = {}
        for i, rec in enumerate(pe):
            age = n - 1 - i
            b = "0-15" if age < 16 else "16-63" if age < 64 else "64+"
            buckets.setdefault(b, []).append(rec["efficacy"][0][1])
        extra["memoryllm_sequence"]["efficacy_prob_by_age"] = {b: metrics.rate(v) for b, v in buckets.items()}

    result = {
        "task": "editing",
        "facts": str(facts),
        "edits": len(es),
        "options": {"methods": methods, "batch_size": batch_size, "max_new_tokens": max_new_tokens, "seed": seed},
        "model": model_info(lm),
        "methods": results,
        "method_details": extra,
        "examples": [{k: e[k] for k in ("prompt", "old", "new", "paraphrases", "neighbours")} for e in es[:3]],
        "edit_text_example": edit_text(lm, es[0]),
        "timing": {"seconds": round(clock(), 2), "per_method_seconds": timings},
        "env": environment(),
    }
    from .plots import plot_editing

    return finish(result, out, "editing", None, plot_editing if plot else None)
