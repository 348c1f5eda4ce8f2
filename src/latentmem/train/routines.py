"""The paper's training routines (section 3.2, appendix B.1), one short function each, plus QA.

Every routine describes one micro-batch as a ``Batch``: contexts to inject (round by round, one
per row per round), the sequence then read with memory, and where its loss starts. One function,
``memory_loss``, runs any Batch, so the routines differ only in what they inject, whether the
gradient flows through the injection, and what the prediction reads:

routine                          injects                      grad through it   reads
new_knowledge, process A (Fig 2) x1                           yes               bos + the K new tokens
new_knowledge, process B (Fig 2) x1                           no                the whole updated pool
continuous                       x1 .. x(n-1)                 no                the whole pool
forgetting (Alg. 1)              x1, then g unrelated docs    no                the whole pool
  across steps (the paper's way)   nothing: x1 was written g steps ago by the integrity rule
qa                               the row's context            configurable      the whole pool

The LM routines start from the evolving training pool (a ``MemoryState``, the library's pool
type, made by ``training_pool``); after each optimizer step the step's contexts are written into
it without gradient by ``write_contexts`` (the integrity rule), so new memory keeps the
distribution of old memory. All randomness of a micro-batch comes from its global
index, so a run is the same on one process, on many (DDP), and after a resume.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..memoryllm.model import MemoryLLM, self_update, update_pool
from ..memoryllm.state import MemoryState, draw_keep
from ..text import left_pad
from .data import TrainData


@dataclass
class Batch:
    routine: str
    contexts: list[list[list[int]]]  # [round][row]: injected in order
    targets: list[list[int]]  # [row]: read with memory
    loss_start: list[int]  # [row]: first target position whose token is scored
    grad_through_injection: bool
    read_new_only: bool  # process A: the prediction sees bos + the K new tokens only
    fresh_pool: bool  # start from an empty pool instead of the training pool
    seed: int  # drop indices of this micro-batch's pool copies

    def num_tokens(self) -> int:
        return sum(len(c) for rnd in self.contexts for c in rnd) + sum(map(len, self.targets))


def _lengths(rng: random.Random, cfg, n: int) -> list[int]:
    return [rng.randint(cfg.segment_min, cfg.segment_max) for _ in range(n)]


def _fresh_pool(rng: random.Random, cfg) -> bool:
    # drawn last, and only when enabled, so a config without it samples the same batches
    return cfg.lm_fresh_pool_prob > 0 and rng.random() < cfg.lm_fresh_pool_prob


def new_knowledge(data: TrainData, rng: random.Random, cfg, step: int) -> Batch:
    """Routine 1: a document split into (x1, x2); inject x1, predict x2. Process A (share
    process_a_prob) backpropagates through the injection and reads only the K new tokens;
    process B injects without gradient and reads the whole updated pool."""
    pairs = [data.segments(rng, _lengths(rng, cfg, 2))[1] for _ in range(cfg.batch_size)]
    a = rng.random() < cfg.process_a_prob
    seed = rng.getrandbits(63)
    return Batch("new_knowledge_A" if a else "new_knowledge_B", [[p[0] for p in pairs]], [p[1] for p in pairs], [1] * len(pairs), a, a, _fresh_pool(rng, cfg), seed)


def continuous(data: TrainData, rng: random.Random, cfg, step: int) -> Batch:
    """Routine 2: a document split into x1..xn; inject x1..x(n-1) without gradient, loss on xn.
    n grows over training from continuous_min_segments to continuous_max_segments."""
    ramp = min(1.0, step / max(1, cfg.continuous_ramp_steps))
    n_max = round(cfg.continuous_min_segments + ramp * (cfg.continuous_max_segments - cfg.continuous_min_segments))
    n = rng.randint(cfg.continuous_min_segments, n_max)
    docs = [data.segments(rng, _lengths(rng, cfg, n))[1] for _ in range(cfg.batch_size)]
    rounds = [[d[r] for d in docs] for r in range(n - 1)]
    seed = rng.getrandbits(63)
    return Batch("continuous", rounds, [d[-1] for d in docs], [1] * len(docs), False, False, _fresh_pool(rng, cfg), seed)


def forgetting(data: TrainData, rng: random.Random, cfg, step: int) -> Batch:
    """Routine 3 (Algorithm 1): cache a target (x1, x2), inject x1, then g unrelated documents
    (1 <= g <= forgetting_max_gap), then predict the cached x2 from what survived."""
    gap = rng.randint(1, cfg.forgetting_max_gap)
    rows = []
    for _ in range(cfg.batch_size):
        doc, (x1, x2) = data.segments(rng, _lengths(rng, cfg, 2))
        unrelated = [data.segments(rng, _lengths(rng, cfg, 1), exclude=doc)[1][0] for _ in range(gap)]
        rows.append(([x1, *unrelated], x2))
    rounds = [[r[0][k] for r in rows] for k in range(gap + 1)]
    return Batch("forgetting", rounds, [r[1] for r in rows], [1] * len(rows), False, False, False, rng.getrandbits(63))


def qa(data: TrainData, rng: random.Random, cfg, step: int) -> Batch:
    """Contextual QA (the 8B release also trained on it): inject the row's context, score the
    answer given "Question: ... Answer:". Language modelling alone did not teach the 135M
    default to answer from memory (issue 5), hence this routine."""
    if not data.qa:
        raise ValueError("ratio_qa > 0 but there are no QA training rows (qa_data)")
    rows = [data.qa[rng.randrange(len(data.qa))] for _ in range(cfg.batch_size)]
    seed = rng.getrandbits(63)
    # drawn last, and only when enabled, so a config without it samples the same batches
    fresh = cfg.qa_fresh_pool and not (cfg.qa_training_pool_prob > 0 and rng.random() < cfg.qa_training_pool_prob)
    return Batch("qa", [[r.context for r in rows]], [r.prompt + r.answer for r in rows], [len(r.prompt) for r in rows], cfg.qa_grad_through_injection, False, fresh, seed)


ROUTINE_FNS = {"new_knowledge": new_knowledge, "continuous": continuous, "forgetting": forgetting, "qa": qa}


def _routine(cfg, index: int) -> tuple[random.Random, str]:
    rng = random.Random(f"{cfg.seed}:{index}")
    names, weights = zip(*cfg.ratios().items())
    return rng, rng.choices(names, weights)[0]


def build_batch(cfg, data: TrainData, index: int, step: int, per_step: int | None = None) -> Batch:
    """The micro-batch with global index ``index`` (a function of seed and index only).
    ``per_step``: micro-batches per optimizer step over all processes (grad_accum * world);
    step s holds indices [s * per_step, (s + 1) * per_step) whatever the process layout."""
    rng, routine = _routine(cfg, index)
    if routine == "forgetting" and cfg.forgetting_across_steps:
        batch = forgetting_across_steps(cfg, data, rng, index, per_step or cfg.grad_accum)
        if batch is not None:
            return batch
    return ROUTINE_FNS[routine](data, rng, cfg, step)


def validation_batches(cfg, data: TrainData) -> dict[str, list[Batch]]:
    """Fixed held-out micro-batches (``data``: the held-out split), the same at every
    validation and on any number of processes: new-knowledge pairs (process B) and continuous
    contexts at the schedule's largest n, both injected into an empty pool as the held-out
    measurement and a new user's memory are, and QA into an empty pool; only the sets whose
    routine the mix trains. None of them reads the training pool, so the numbers of two steps
    differ by the weights alone."""
    fixed = dataclasses.replace(cfg, process_a_prob=0.0, lm_fresh_pool_prob=1.0, qa_fresh_pool=True, continuous_min_segments=cfg.continuous_max_segments)
    sets = {"pairs": (new_knowledge, cfg.ratio_new_knowledge > 0 and bool(data.docs)), "continuous": (continuous, cfg.ratio_continuous > 0 and bool(data.docs)), "qa": (qa, cfg.ratio_qa > 0 and bool(data.qa))}
    return {name: [fn(data, random.Random(f"{cfg.seed}:validation:{name}:{i}"), fixed, cfg.continuous_ramp_steps) for i in range(cfg.eval_batches)] for name, (fn, used) in sets.items() if used}


def written_context(batch: Batch, b: int) -> tuple[list[int], list[int]] | None:
    """(context the integrity rule writes for row b of a language-modelling batch, the segment
    that follows it in its document), or None for batches whose written context has no
    continuation to predict (QA)."""
    if batch.routine.startswith("new_knowledge") or batch.routine == "forgetting":
        return batch.contexts[0][b], batch.targets[b]
    if batch.routine == "continuous":
        return batch.contexts[0][b], batch.contexts[1][b]
    return None


def forgetting_across_steps(cfg, data: TrainData, rng: random.Random, index: int, per_step: int) -> Batch | None:
    """Routine 3 as Algorithm 1 runs it: a context x1 that an earlier step's integrity write put
    into the training pool 1..forgetting_max_gap steps ago is the cache; this batch predicts
    the segment that followed it from the pool as it is now, after the writes of the steps in
    between (no injection, so the batch costs one read). Earlier micro-batches are rebuilt
    from their indices, so this needs no state beyond the pool. None when no earlier step has
    a language-modelling context (the first step): the caller then falls back to the
    within-step routine."""
    step = index // per_step
    candidates = []
    for gap in range(1, min(cfg.forgetting_max_gap, step) + 1):
        for j in range((step - gap) * per_step, (step - gap + 1) * per_step):
            if _routine(cfg, j)[1] not in ("new_knowledge", "continuous"):
                continue  # QA contexts have no continuation; forgetting batches write little
            earlier = build_batch(cfg, data, j, step - gap, per_step)
            for b in range(min(cfg.integrity_contexts, len(earlier.targets))):
                candidates.append(written_context(earlier, b))
    if not candidates:
        return None
    rows = rng.sample(candidates, min(cfg.batch_size, len(candidates)))
    # the loss is scored from the target's second token, as in the other LM routines
    return Batch("forgetting_across", [], [t for _, t in rows], [1] * len(rows), False, False, False, rng.getrandbits(63))


# --------------------------------------------------------------------------------------------
# Running a Batch
# --------------------------------------------------------------------------------------------


def training_pool(model: MemoryLLM, seed: int) -> MemoryState:
    """The empty pool that evolves through training: fp32 on the CPU whatever the model's
    dtype and device (it is read onto the device per micro-batch), drops drawn from ``seed``."""
    cfg = model.config
    return MemoryState.empty(cfg.num_hidden_layers, cfg.num_memory_tokens, cfg.hidden_size, seed=seed)


@torch.no_grad()
def write_contexts(model: MemoryLLM, pool: MemoryState, contexts: list[list[int]], pad: int) -> None:
    """The integrity rule: each context, in order, one self-update of the training pool without
    gradient. It is the library's write (``MemoryLM.inject`` of one chunk): new tokens from
    ``new_memory_tokens`` on the pool's last K tokens, then ``MemoryState.write_update_``, whose
    drops come from the pool's own generator; each context counts as one injection."""
    for ctx in contexts:
        pool.last_injection_id += 1
        self_update(model, [pool], [ctx], [pool.last_injection_id], pad)


def inject(model: MemoryLLM, memory: Tensor, init: Tensor, rows: list[list[int]], gen: torch.Generator, pad: int) -> tuple[Tensor, Tensor, Tensor]:
    """One self-update of each pool in a batch (memory [B, L, N, d], logical order); gradient
    flows when grad mode is on. Returns (updated pools, all-initialised flags, new tokens).
    The functional twin of ``write_contexts`` (a batch of pool copies inside a micro-batch,
    differentiable), with the same drop rule (``draw_keep``) and tiling (``update_pool``)."""
    ids, mask = left_pad(rows, pad, memory.device)
    new, count = model.new_memory_tokens(memory, init, ids, mask)
    L, N = memory.shape[1], memory.shape[2]
    per_layer = model.config.drop_memory_per_layer
    keep = [draw_keep(gen, L, N, int(count[b]), per_layer) if bool(init[b]) else None for b in range(len(rows))]
    return update_pool(memory, init, new, count, keep), torch.ones_like(init), new


def memory_loss(model: MemoryLLM, batch: Batch, pool: MemoryState | None, pad: int, per_row: bool = False):
    """Mean next-token loss over the batch's scored target tokens, reading memory that the
    batch's contexts were injected into (each row into its own copy of ``pool``, in logical
    order; None: an empty pool). Returns (loss, number of scored tokens); with ``per_row``
    (measurements) each row's summed loss [B] and its scored tokens [B] instead."""
    cfg, dev = model.config, model.device
    B = len(batch.targets)
    L, N, d = cfg.num_hidden_layers, cfg.num_memory_tokens, cfg.hidden_size
    gen = torch.Generator().manual_seed(batch.seed)
    if batch.fresh_pool or pool is None or not pool.initialized:
        memory = torch.zeros(B, L, N, d, dtype=model.dtype, device=dev)
        init = torch.zeros(B, dtype=torch.bool, device=dev)
    else:
        memory = pool.logical_memory().to(dev, model.dtype)[None].expand(B, -1, -1, -1)
        init = torch.ones(B, dtype=torch.bool, device=dev)
    new = None
    with torch.set_grad_enabled(batch.grad_through_injection and torch.is_grad_enabled()):
        for rows in batch.contexts:
            memory, init, new = inject(model, memory, init, rows, gen, pad)
    if batch.read_new_only:
        if not bool(init.all()) or new is None:
            raise ValueError("reading only the new tokens needs an initialised pool")
        memory = new  # [B, L, K, d]: the prediction sees bos + the K new memory tokens

    return _scored_loss(model, batch, memory, init, pad, per_row)


def _scored_loss(model: MemoryLLM, batch: Batch, memory: Tensor | None, init: Tensor | None, pad: int, per_row: bool = False):
    B, dev = len(batch.targets), model.device
    ids, mask = left_pad(batch.targets, pad, dev)
    T = ids.shape[1]
    labels = torch.full((B, T), -100, dtype=torch.long)
    for b, (t, s) in enumerate(zip(batch.targets, batch.loss_start)):
        labels[b, T - len(t) + s :] = torch.tensor(t[s:], dtype=torch.long)
    # logits only for the positions that predict a scored token (targets are left-padded, so the
    # scored tokens are at the end): saves the vocabulary projection of QA prompts
    keep = max(len(t) - s for t, s in zip(batch.targets, batch.loss_start)) + 1
    keep = min(keep, T)
    logits = model(ids, mask, memory=memory, initialized=True if init is None else init, logits_to_keep=keep)
    lab = labels[:, T - keep + 1 :].to(dev)
    if per_row:
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), lab, ignore_index=-100, reduction="none")
        return nll.sum(1), (lab != -100).sum(1)
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), lab.reshape(-1), ignore_index=-100)
    return loss, int((lab != -100).sum())


def prompt_loss(model: MemoryLLM, batch: Batch, pad: int, prompt: list[list[int]] | None = None, per_row: bool = False):
    """The same scored tokens as ``memory_loss`` without memory: the target alone (prompt None,
    the memory-off baseline) or after ``prompt[b]`` in the context window (the base model given
    the context in its prompt)."""
    prompt = prompt or [[] for _ in batch.targets]
    rows = [p + t for p, t in zip(prompt, batch.targets)]
    starts = [len(p) + s for p, s in zip(prompt, batch.loss_start)]
    plain = Batch(batch.routine, [], rows, starts, False, False, True, batch.seed)
    return _scored_loss(model, plain, None, None, pad, per_row)


class RoutineModule(nn.Module):
    """MemoryLLM behind one forward(batch) -> loss, so DistributedDataParallel sees every
    micro-batch as a single forward call (its gradient hooks are prepared there). It reads the
    training pool it was given, which the integrity rule updates in place between steps."""

    def __init__(self, model: MemoryLLM, pool: MemoryState, pad: int):
        super().__init__()
        self.model = model
        self.pool = pool
        self.pad = pad

    def forward(self, batch: Batch) -> tuple[Tensor, int]:
        return memory_loss(self.model, batch, self.pool, self.pad)
