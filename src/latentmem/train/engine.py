"""The training engine, the same for every memory design: one process on a CPU, or many under
``torchrun`` (DistributedDataParallel, gloo on CPU, nccl on CUDA) with the same command.

    memoryllm train --config configs/train_default.toml steps=200
    torchrun --nproc-per-node 2 -m latentmem train --config configs/train_default.toml

What is design-specific (the model, what is trained, the micro-batches and their loss, what
follows an optimizer step, validation, export) comes from the design's recipe
(``recipe.py``; ``TrainConfig.design`` picks it). The engine owns the rest: optimiser, LR
schedule, gradient accumulation, autocast, DDP, checkpoints and resume, metrics, the
validation cadence.

A step is ``grad_accum`` micro-batches per process; micro-batch ``(step * grad_accum + m) *
world + rank`` is built from that global index alone (``recipe.batch``), so a run is the same
on one process with grad_accum = W * a as on W processes with a, and after a resume. After the
optimizer step every micro-batch's ``recipe.step_record``, gathered from every process in index
order, goes to ``recipe.after_step`` (MemoryLLM: the integrity write into the training pool), so
every process does the same.

Checkpoints (``out_dir/checkpoints/step-NNNNNN.pt``, written atomically, the last
``keep_checkpoints`` kept): trained tensors, optimizer, scheduler, loss scaler, RNG states, data
position (the step) and the recipe's state (MemoryLLM: the training pool). ``export_weights``
writes the compact trained weights the design's loader applies.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..files import atomic_write
from .config import ConfigError, TrainConfig
from .data import TrainData
from .recipe import Recipe, recipe_for, trained_tensors

METRICS_FIELDS = ["step", "loss", "routine", "lr", "grad_norm", "tokens", "tokens_per_s", "seconds"]  # + the recipe's metric_fields
EVAL_FIELDS = ["step", "set", "loss", "tokens", "seconds"]


def export_weights(model: nn.Module, cfg: TrainConfig, path: str | Path, extra_meta: dict | None = None) -> Path:
    """The compact trained weights of a model trained with ``cfg``, in its design's format."""
    return recipe_for(cfg).export(model, path, extra_meta)


# --------------------------------------------------------------------------------------------
# Distributed setup
# --------------------------------------------------------------------------------------------


def init_distributed(device_pref: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device). torchrun's environment starts a process group (nccl on CUDA,
    gloo on CPU); without it this is one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device_pref == "auto" else device_pref.startswith("cuda")
    device = torch.device(f"cuda:{local}" if use_cuda else "cpu") if device_pref in ("auto", "cuda") else torch.device(device_pref)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    return rank, world, device


def _gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------------------------
# Optimiser, schedule, checkpoints
# --------------------------------------------------------------------------------------------


@dataclass
class Optimisation:
    """AdamW over the trained parameters, its LR schedule, and the fp16 loss scaler."""

    params: list[nn.Parameter]
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler

    @classmethod
    def create(cls, model: nn.Module, cfg: TrainConfig, device: torch.device) -> "Optimisation":
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        scaler = torch.amp.GradScaler("cuda", enabled=cfg.precision == "fp16" and device.type == "cuda")
        return cls(params, opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)), scaler)

    def step(self, cfg: TrainConfig) -> Tensor:
        """Unscale, clip, step, advance the schedule; returns the gradient norm before clipping."""
        self.scaler.unscale_(self.opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else torch.tensor(0.0)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        return grad_norm

    def state_dict(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


def lr_lambda(cfg: TrainConfig):
    """Linear warm-up, then cosine decay to min_lr_ratio."""

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def checkpoint_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.out_dir) / "checkpoints"


def latest_checkpoint(cfg: TrainConfig) -> Path | None:
    files = sorted(checkpoint_dir(cfg).glob("step-*.pt"))
    return files[-1] if files else None


def save_checkpoint(path: Path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)

    def write(tmp: str) -> None:
        Path(tmp).write_bytes(buf.getvalue())

    atomic_write(path, write)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if s.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def resume(cfg: TrainConfig, recipe: Recipe, model: nn.Module, optim: Optimisation) -> int | None:
    """Restore everything from the latest checkpoint in out_dir and return its step; None when
    there is none to resume (or resume is off)."""
    ckpt = latest_checkpoint(cfg) if cfg.resume else None
    if ckpt is None:
        return None
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    # fields a checkpoint predates (design) take their defaults: such checkpoints are MemoryLLM's
    saved = {**TrainConfig().to_dict(), **state["config"]}
    changed = [k for k in ("design", *recipe.structural) if saved.get(k) != getattr(cfg, k)]
    if changed:
        raise ConfigError(f"{ckpt}: cannot resume, the config changed {changed} (use another out_dir or resume=false)")
    named = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in state["trained"].items():
            named[n].copy_(t)
    optim.load_state_dict(state)
    recipe.load_state_dict(state["recipe"] if "recipe" in state else state)
    _set_rng_state(state["rng"])
    return int(state["step"])


def write_checkpoint(cfg: TrainConfig, rank: int, world: int, step: int, model: nn.Module, optim: Optimisation, recipe: Recipe) -> Path:
    """Rank 0 writes (every rank holds the same state); older checkpoints beyond
    keep_checkpoints are removed."""
    path = checkpoint_dir(cfg) / f"step-{step:06d}.pt"
    if rank == 0:
        state = {
            "step": step,
            "config": cfg.to_dict(),
            "trained": trained_tensors(model),
            **optim.state_dict(),
            "recipe": recipe.state_dict(),
            "rng": _rng_state(),
            "world_size": world,
        }
        save_checkpoint(path, state)
        for old in sorted(checkpoint_dir(cfg).glob("step-*.pt"))[: -cfg.keep_checkpoints]:
            old.unlink(missing_ok=True)
    if world > 1:
        dist.barrier()
    return path


# --------------------------------------------------------------------------------------------
# Metrics and validation
# --------------------------------------------------------------------------------------------


def _train_scalars(row: dict) -> dict[str, float]:
    return {k: float(row[k]) for k in ("loss", "lr", "tokens_per_s")}


def _eval_scalars(row: dict) -> dict[str, float]:
    return {f"eval/{row['set']}": float(row["loss"])}


class MetricsCSV:
    """metrics.csv (or eval.csv) in out_dir; on resume, rows after the resumed step are dropped
    (they belong to the interrupted run and will be recomputed identically)."""

    def __init__(self, path: Path, resume_step: int, fields: list[str], scalars=_train_scalars):
        self.path, self.fields, self.scalars = path, fields, scalars
        rows = []
        if resume_step and path.is_file():
            with path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fields)
            w.writeheader()
            w.writerows(rows)
        self.tb = None
        try:  # TensorBoard only when installed (not a dependency)
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(path.parent / "tensorboard"), filename_suffix=f".{path.stem}")
        except Exception:
            self.tb = None

    def write(self, row: dict) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.fields).writerow(row)
        if self.tb is not None:
            for k, v in self.scalars(row).items():
                self.tb.add_scalar(k, v, int(row["step"]))


@torch.no_grad()
def validate(model: nn.Module, recipe: Recipe, sets: dict, rank: int, world: int, amp) -> dict[str, tuple[float, int, float]]:
    """{set: (token-weighted loss, scored tokens, seconds)} of the fixed held-out batches; with
    many processes each scores every world-th batch and the sums are all-reduced."""
    was_training = model.training
    model.eval()
    out = {}
    for name, batches in sets.items():
        t0 = time.perf_counter()
        total = torch.zeros(2, dtype=torch.float64)
        for i, batch in enumerate(batches):
            if i % world == rank:
                with amp():
                    sums, counts = recipe.validation_loss(batch)
                total += torch.stack([sums.double().sum().cpu(), counts.double().sum().cpu()])
        if world > 1:
            total = total.to(next(model.parameters()).device)
            dist.all_reduce(total)
            total = total.cpu()
        out[name] = (float(total[0] / total[1]), int(total[1]), time.perf_counter() - t0)
    model.train(was_training)
    return out


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def train(cfg: TrainConfig, *, model: nn.Module | None = None, tokenizer=None, data: TrainData | None = None, eval_data: TrainData | None = None) -> dict:
    """Run (or resume) a training run; returns a summary (losses per step, final state, and the
    recipe's results: MemoryLLM's training pool under "pool").

    model / tokenizer / data (and eval_data, the held-out rows validated every ``eval_every``
    steps) default to what the config names (tests pass tiny ones). The run
    writes nothing to out_dir when checkpoint_every is 0 and export is None, except metrics.csv.
    ``cfg.stop_at``: return after that step (checkpointed) as if interrupted.
    """
    recipe = recipe_for(cfg)
    rank, world, device = init_distributed(cfg.device)
    if cfg.precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision fp16 needs CUDA; use bf16 or fp32 on a CPU")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, tokenizer, data, eval_data = _inputs(cfg, recipe, model, tokenizer, data, eval_data)
    names = recipe.prepare_trainable(model)
    model.to(device)
    recipe.setup(model, tokenizer, data)
    optim = Optimisation.create(model, cfg, device)
    module = _parallel(recipe.loss_module(), world, device)
    resumed = resume(cfg, recipe, model, optim)
    if resumed is None:
        recipe.begin()
    start = resumed or 0

    metrics = MetricsCSV(Path(cfg.out_dir) / "metrics.csv", start, METRICS_FIELDS + list(recipe.metric_fields)) if rank == 0 else None
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype is not None else contextlib.nullcontext
    val_sets = recipe.validation_sets(eval_data) if cfg.eval_every else {}
    val_csv = MetricsCSV(Path(cfg.out_dir) / "eval.csv", start, EVAL_FIELDS, _eval_scalars) if rank == 0 and val_sets else None
    validations: list[dict] = []

    def run_validation(at_step: int) -> None:
        res = validate(model, recipe, val_sets, rank, world, autocast)
        validations.append({"step": at_step, **{k: v[0] for k, v in res.items()}})
        if val_csv is not None:
            for name, (loss, n, sec) in res.items():
                val_csv.write({"step": at_step, "set": name, "loss": f"{loss:.5f}", "tokens": n, "seconds": f"{sec:.2f}"})

    if val_sets and start == 0:
        run_validation(0)  # the curve's starting point: the weights before the first step
    bar = None
    if rank == 0 and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    losses: list[float] = []
    t_start = time.perf_counter()
    last_ckpt = None
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        model.train()
        step_loss, tokens, routines, grad_norm = optimizer_step(cfg, recipe, module, optim, step, rank, world, autocast, device)
        losses.append(step_loss)
        seconds = time.perf_counter() - t0
        if rank == 0:
            row = {"step": step + 1, "loss": f"{step_loss:.5f}", "routine": "+".join(routines), "lr": f"{optim.sched.get_last_lr()[0]:.3e}", "grad_norm": f"{float(grad_norm):.4f}", "tokens": tokens, "tokens_per_s": f"{tokens / seconds:.1f}", "seconds": f"{seconds:.2f}", **recipe.step_metrics()}
            if (step + 1) % cfg.log_every == 0:
                metrics.write(row)
            if bar is not None:
                bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tokens / seconds:.0f}")
                bar.update(1)
        done = step + 1 == cfg.steps
        out_of_time = _agree(cfg.max_seconds is not None and time.perf_counter() - t_start > cfg.max_seconds, world, device)
        stopping = cfg.stop_at is not None and step + 1 >= cfg.stop_at
        if val_sets and ((step + 1) % cfg.eval_every == 0 or done or out_of_time):
            run_validation(step + 1)
        if cfg.checkpoint_every and ((step + 1) % cfg.checkpoint_every == 0 or done or out_of_time or stopping):
            last_ckpt = write_checkpoint(cfg, rank, world, step + 1, model, optim, recipe)
        if out_of_time or stopping:
            break
    if bar is not None:
        bar.close()
    end = start + len(losses)
    # exported when the run ends (all steps, or max_seconds), not when stopped at stop_at
    if cfg.export and rank == 0 and (cfg.stop_at is None or end >= cfg.steps):
        recipe.export(model, cfg.export, {"steps": end})
    if world > 1:
        dist.barrier()
    return {"losses": losses, "validation": validations, "start_step": start, "end_step": end, "trained": names, "model": model, "checkpoint": last_ckpt, "seconds": time.perf_counter() - t_start, **recipe.results()}


def optimizer_step(cfg: TrainConfig, recipe: Recipe, module: nn.Module, optim: Optimisation, step: int, rank: int, world: int, autocast, device: torch.device) -> tuple[float, int, list[str], Tensor]:
    """One step: grad_accum micro-batches on this process, the optimizer step, then the
    recipe's after_step with every process's records in global index order. Returns (the
    step's loss averaged over processes, tokens of all processes, this process's routines,
    the gradient norm)."""
    optim.opt.zero_grad(set_to_none=True)
    step_loss, tokens, routines, records = 0.0, 0, [], []
    for m in range(cfg.grad_accum):
        index = (step * cfg.grad_accum + m) * world + rank
        batch = recipe.batch(index, step, cfg.grad_accum * world)
        # DDP all-reduces the gradients on the step's last micro-batch only
        sync = contextlib.nullcontext() if world == 1 or m == cfg.grad_accum - 1 else module.no_sync()
        with sync:
            with autocast():
                loss, _ = module(batch)
            optim.scaler.scale(loss / cfg.grad_accum).backward()
        step_loss += loss.item() / cfg.grad_accum
        tokens += batch.num_tokens()
        routines.append(batch.routine)
        records.append((index, recipe.step_record(batch)))
    grad_norm = optim.step(cfg)
    gathered = sorted((item for part in _gather(records, world) for item in part), key=lambda x: x[0])
    recipe.after_step([record for _, record in gathered])
    if world > 1:
        t = torch.tensor([step_loss, float(tokens)], dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        step_loss, tokens = t[0].item() / world, int(t[1].item())
    return step_loss, tokens, routines, grad_norm


def _inputs(cfg: TrainConfig, recipe: Recipe, model, tokenizer, data, eval_data):
    """(model, tokenizer, training data, held-out data or None): what the caller passed, the
    rest as the config names it."""
    if model is None:
        model, tokenizer = recipe.load_model()
    if tokenizer is None:
        raise ValueError("a tokenizer is needed (pass one with the model)")
    if cfg.eval_every and eval_data is None:
        if data is not None:
            raise ValueError("eval_every > 0 with training data passed in needs eval_data (the held-out rows) too")
        eval_data = recipe.load_data(tokenizer, "heldout")
    if data is None:
        data = recipe.load_data(tokenizer, "train")
    return model, tokenizer, data, eval_data


def _parallel(module: nn.Module, world: int, device: torch.device) -> nn.Module:
    if world == 1:
        return module
    # find_unused_parameters: routines leave parts unused (MemoryLLM's process B never touches
    # new_memory_positional_emb); broadcast_buffers=False: buffers are never synced (no design
    # keeps training state in them)
    return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True, broadcast_buffers=False)


def _agree(flag: bool, world: int, device: torch.device) -> bool:
    """True on every process when it is true on one (so all stop at the same step)."""
    if world == 1:
        return flag
    t = torch.tensor([float(flag)], device=device if device.type == "cuda" else "cpu")  # nccl reduces CUDA tensors only
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
