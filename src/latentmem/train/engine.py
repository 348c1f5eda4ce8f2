"""The training engine: one process on a CPU, or many under ``torchrun`` (DistributedDataParallel,
gloo on CPU, nccl on CUDA) with the same command.

    memoryllm train --config configs/train_default.toml steps=200
    torchrun --nproc-per-node 2 -m latentmem train --config configs/train_default.toml

A step is ``grad_accum`` micro-batches per process; micro-batch ``(step * grad_accum + m) *
world + rank`` is built from that global index alone (routines.build_batch), so a run is the
same on one process with grad_accum = W * a as on W processes with a, and after a resume.
After the optimizer step the step's contexts, gathered from every process in index order, are
written into the training pool (the integrity rule), so every process holds the same pool.

Checkpoints (``out_dir/checkpoints/step-NNNNNN.pt``, written atomically, the last
``keep_checkpoints`` kept): trained tensors, optimizer, scheduler, loss scaler, RNG states, data
position (the step) and the training pool. ``export_weights`` writes the compact file the
default model loads (LoRA factors + bos_embedding + new_memory_positional_emb).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import random
import re
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..files import atomic_write
from .config import ConfigError, TrainConfig
from .data import TrainData, load_train_data
from .routines import RoutineModule, TrainPool, build_batch, memory_loss, validation_batches

EXPORT_FORMAT = "memoryllm-trained/1"
METRICS_FIELDS = ["step", "loss", "routine", "lr", "grad_norm", "tokens", "tokens_per_s", "seconds", "pool_updates"]
EVAL_FIELDS = ["step", "set", "loss", "tokens", "seconds"]
# Checkpoint fields that change the shape of what is trained: a resume with other values is refused.
STRUCTURAL = ("model", "num_tokens", "num_blocks", "lora_r", "lora_alpha", "lora_targets", "full_finetune", "train_embeddings")


# --------------------------------------------------------------------------------------------
# Model and trainable parameters
# --------------------------------------------------------------------------------------------


def load_model(cfg: TrainConfig):
    """(model, tokenizer) named by the config, memory shape num_tokens x num_blocks."""
    from ..memoryllm import checkpoint as loading

    if cfg.model is None:
        return loading.load_default(num_tokens=cfg.num_tokens, num_blocks=cfg.num_blocks, trained=cfg.trained_start)
    return loading.load(cfg.model, num_tokens=cfg.num_tokens, num_blocks=cfg.num_blocks)


def prepare_trainable(model: nn.Module, cfg: TrainConfig) -> list[str]:
    """Freeze the base, add LoRA (peft) on cfg.lora_targets, unfreeze the memory embeddings.
    Returns the names of the trained parameters. LoRA's init draws from torch's global RNG,
    seeded here so every process (and a resumed run) starts from the same adapters."""
    torch.manual_seed(cfg.seed)
    if cfg.full_finetune:
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        from peft import LoraConfig, inject_adapter_in_model

        for p in model.parameters():
            p.requires_grad_(False)
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=list(cfg.lora_targets))
        if cfg.separate_adapters:
            with warnings.catch_warnings():  # peft warns that a second adapter is a second adapter
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                inject_adapter_in_model(lora, model, adapter_name=WRITE)
                inject_adapter_in_model(lora, model, adapter_name=READ)
            model.set_adapter_roles(WRITE, READ)
        else:
            inject_adapter_in_model(lora, model)
        for name, p in model.named_parameters():
            p.requires_grad_(".lora_" in name)
    for name in ("bos_embedding", "new_memory_positional_emb"):
        p = getattr(model, name, None)
        if p is not None:
            p.requires_grad_(cfg.train_embeddings or cfg.full_finetune)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise ConfigError("nothing to train: lora_r / train_embeddings / full_finetune select no parameter")
    if cfg.init_from is not None:
        init_from_export(model, cfg)
    return names


def init_from_export(model: nn.Module, cfg: TrainConfig) -> None:
    """Seed the freshly injected adapters and the embeddings with an export's tensors, so a
    second run continues the first one's adapters (and its export stays one LoRA of rank
    lora_r) instead of merging them into the base and stacking another. Every tensor is
    checked before the first copy."""
    from safetensors import safe_open

    from ..memoryllm import checkpoint as loading

    path = loading.SHIPPED_WEIGHTS if cfg.init_from == "default" else Path(cfg.init_from)
    if not Path(path).is_file():
        raise ConfigError(f"init_from: file not found: {path}")
    if cfg.trained_start:
        raise ConfigError("init_from and trained_start both start from trained weights: choose one")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for key, mine in (("lora_r", cfg.lora_r), ("lora_alpha", cfg.lora_alpha)):
        if key in meta and float(meta[key]) != float(mine):
            raise ConfigError(f"init_from: {path} has {key}={meta[key]}, this config {mine}")
    params = dict(model.named_parameters())
    # a one-adapter export seeds both adapters of a separate_adapters run (they then diverge)
    adapters = [WRITE, READ] if cfg.separate_adapters else ["default"]
    targets = {}
    for name, t in tensors.items():
        dests = [_PEFT_SAVED.sub(rf".lora_\1.{a}.weight", name) for a in adapters] if _PEFT_SAVED.search(name) else [name]
        for dest in dests:
            if dest not in params or not params[dest].requires_grad:
                raise ConfigError(f"init_from: {path} holds {name!r}, which this run does not train")
            if tuple(params[dest].shape) != tuple(t.shape):
                raise ConfigError(f"init_from: {name!r} has shape {tuple(t.shape)}, this model {tuple(params[dest].shape)}")
            targets[dest] = t
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in targets)
    if missing:
        raise ConfigError(f"init_from: {path} lacks {len(missing)} trained tensors, e.g. {missing[:3]}")
    with torch.no_grad():
        for dest, t in targets.items():
            params[dest].copy_(t.to(params[dest].dtype))


def trained_tensors(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


_PEFT_ADAPTER = re.compile(r"\.lora_([AB])\.default\.weight$")
_PEFT_SAVED = re.compile(r"\.lora_([AB])\.weight$")
WRITE, READ = "write", "read"  # adapter names with separate_adapters (exported under these names)


def export_weights(model: nn.Module, cfg: TrainConfig, path: str | Path, extra_meta: dict | None = None) -> Path:
    """The compact trained weights: LoRA factors in PEFT's saved naming
    (``<module>.lora_A.weight``), bos_embedding and new_memory_positional_emb, fp32, with the
    LoRA scale and the training config in the metadata. loading._apply_shipped_weights merges
    them into a base model (W += B A * alpha / r)."""
    from safetensors.torch import save_file

    tensors = {}
    for name, t in trained_tensors(model).items():
        tensors[_PEFT_ADAPTER.sub(r".lora_\1.weight", name)] = t.float().contiguous()
    adapters = (model.adapter_roles or {}) if hasattr(model, "adapter_roles") else {}
    meta = {
        "format": EXPORT_FORMAT,
        **({"adapter_write": adapters["write"], "adapter_read": adapters["read"]} if adapters else {}),
        "lora_r": str(cfg.lora_r),
        "lora_alpha": str(cfg.lora_alpha),
        "num_tokens": str(cfg.num_tokens),
        "num_blocks": str(cfg.num_blocks),
        "train_config": json.dumps(cfg.to_dict(), sort_keys=True),
        **{k: str(v) for k, v in (extra_meta or {}).items()},
    }
    path = Path(path)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta), mode=0o644)  # meant to be shipped
    return path


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


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def _train_scalars(row: dict) -> dict[str, float]:
    return {k: float(row[k]) for k in ("loss", "lr", "tokens_per_s")}


def _eval_scalars(row: dict) -> dict[str, float]:
    return {f"eval/{row['set']}": float(row["loss"])}


class MetricsCSV:
    """metrics.csv (or eval.csv) in out_dir; on resume, rows after the resumed step are dropped
    (they belong to the interrupted run and will be recomputed identically)."""

    def __init__(self, path: Path, resume_step: int, fields: list[str] = METRICS_FIELDS, scalars=_train_scalars):
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
def validate(model: nn.Module, sets: dict, pool: TrainPool, pad: int, rank: int, world: int, amp) -> dict[str, tuple[float, int, float]]:
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
                    sums, counts = memory_loss(model, batch, pool, pad, per_row=True)
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
    """Run (or resume) a training run; returns a summary (losses per step, final state).

    model / tokenizer / data (and eval_data, the held-out rows validated every ``eval_every``
    steps) default to what the config names (tests pass tiny ones). The run
    writes nothing to out_dir when checkpoint_every is 0 and export is None, except metrics.csv.
    ``cfg.stop_at``: return after that step (checkpointed) as if interrupted.
    """
    rank, world, device = init_distributed(cfg.device)
    if cfg.precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision fp16 needs CUDA; use bf16 or fp32 on a CPU")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if model is None:
        model, tokenizer = load_model(cfg)
    if tokenizer is None:
        raise ValueError("a tokenizer is needed (pass one with the model)")
    if cfg.eval_every and eval_data is None:
        if data is not None:
            raise ValueError("eval_every > 0 with training data passed in needs eval_data (the held-out rows) too")
        eval_data = load_train_data(cfg, tokenizer, "heldout")
    if data is None:
        data = load_train_data(cfg, tokenizer, "train")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    names = prepare_trainable(model, cfg)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    use_scaler = cfg.precision == "fp16" and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    pool = TrainPool(model, cfg.seed)

    module: nn.Module = RoutineModule(model, pad)
    if world > 1:
        # find_unused_parameters: routines leave parts unused (process B never touches
        # new_memory_positional_emb). Buffers (the model's own 140 MB pool) are never synced.
        module = nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True, broadcast_buffers=False)

    start = 0
    ckpt = latest_checkpoint(cfg) if cfg.resume else None
    if ckpt is not None:
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        saved = state["config"]
        changed = [k for k in STRUCTURAL if saved.get(k) != getattr(cfg, k)]
        if changed:
            raise ConfigError(f"{ckpt}: cannot resume, the config changed {changed} (use another out_dir or resume=false)")
        named = dict(model.named_parameters())
        with torch.no_grad():
            for n, t in state["trained"].items():
                named[n].copy_(t)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        pool.load_state_dict(state["pool"])
        _set_rng_state(state["rng"])
        start = int(state["step"])
    elif not pool.initialized:
        # The routines read and extend an initialised pool; fill it with held-in text first.
        rng = random.Random(f"{cfg.seed}:warmup")
        contexts = []
        for _ in range(cfg.pool_warmup_contexts):
            if data.docs:
                contexts.append(data.segments(rng, [rng.randint(cfg.segment_min, cfg.segment_max)])[1][0])
            else:
                contexts.append(data.qa[rng.randrange(len(data.qa))].context)
        pool.write(model, contexts, pad)

    metrics = MetricsCSV(Path(cfg.out_dir) / "metrics.csv", start) if rank == 0 else None
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype is not None else contextlib.nullcontext
    val_sets = validation_batches(cfg, eval_data) if cfg.eval_every else {}
    val_csv = MetricsCSV(Path(cfg.out_dir) / "eval.csv", start, EVAL_FIELDS, _eval_scalars) if rank == 0 and val_sets else None
    validations: list[dict] = []

    def run_validation(at_step: int) -> None:
        res = validate(model, val_sets, pool, pad, rank, world, autocast)
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
        opt.zero_grad(set_to_none=True)
        step_loss, tokens, routines, contexts = 0.0, 0, [], []
        for m in range(cfg.grad_accum):
            index = (step * cfg.grad_accum + m) * world + rank
            batch = build_batch(cfg, data, index, step, cfg.grad_accum * world)
            sync = contextlib.nullcontext() if world == 1 or m == cfg.grad_accum - 1 else module.no_sync()
            with sync:
                with autocast():
                    loss, _ = module(batch, pool)
                scaler.scale(loss / cfg.grad_accum).backward()
            step_loss += loss.item() / cfg.grad_accum
            tokens += batch.num_tokens()
            routines.append(batch.routine)
            written = batch.contexts[0] if batch.contexts else []  # an across-steps forgetting batch injects nothing
            contexts.append((index, written[: cfg.integrity_contexts]))
        scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else torch.tensor(0.0)
        scaler.step(opt)
        scaler.update()
        sched.step()
        # integrity rule: every process writes the same contexts, in global index order
        gathered = sorted((item for part in _gather(contexts, world) for item in part), key=lambda x: x[0])
        pool.write(model, [c for _, cs in gathered for c in cs], pad)
        if world > 1:
            t = torch.tensor([step_loss, float(tokens)], dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
            dist.all_reduce(t)
            step_loss, tokens = t[0].item() / world, int(t[1].item())
        losses.append(step_loss)
        seconds = time.perf_counter() - t0
        if rank == 0:
            row = {"step": step + 1, "loss": f"{step_loss:.5f}", "routine": "+".join(routines), "lr": f"{sched.get_last_lr()[0]:.3e}", "grad_norm": f"{float(grad_norm):.4f}", "tokens": tokens, "tokens_per_s": f"{tokens / seconds:.1f}", "seconds": f"{seconds:.2f}", "pool_updates": pool.updates}
            if (step + 1) % cfg.log_every == 0:
                metrics.write(row)
            if bar is not None:
                bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{tokens / seconds:.0f}")
                bar.update(1)
        done = step + 1 == cfg.steps
        out_of_time = cfg.max_seconds is not None and time.perf_counter() - t_start > cfg.max_seconds
        if world > 1:  # every process must agree to stop at the same step
            flag = torch.tensor([float(out_of_time)])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            out_of_time = bool(flag.item())
        stopping = cfg.stop_at is not None and step + 1 >= cfg.stop_at
        if val_sets and ((step + 1) % cfg.eval_every == 0 or done or out_of_time):
            run_validation(step + 1)
        if cfg.checkpoint_every and ((step + 1) % cfg.checkpoint_every == 0 or done or out_of_time or stopping):
            last_ckpt = _checkpoint(cfg, rank, world, step + 1, model, opt, sched, scaler, pool)
        if out_of_time or stopping:
            break
    if bar is not None:
        bar.close()
    end = start + len(losses)
    # exported when the run ends (all steps, or max_seconds), not when stopped at stop_at
    if cfg.export and rank == 0 and (cfg.stop_at is None or end >= cfg.steps):
        export_weights(model, cfg, cfg.export, {"steps": end})
    if world > 1:
        dist.barrier()
    return {"losses": losses, "validation": validations, "start_step": start, "end_step": end, "trained": names, "model": model, "pool": pool, "checkpoint": last_ckpt, "seconds": time.perf_counter() - t_start}


def _checkpoint(cfg, rank, world, step, model, opt, sched, scaler, pool) -> Path:
    path = checkpoint_dir(cfg) / f"step-{step:06d}.pt"
    if rank == 0:
        state = {
            "step": step,
            "config": cfg.to_dict(),
            "trained": trained_tensors(model),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(),
            "pool": pool.state_dict(),
            "rng": _rng_state(),
            "world_size": world,
        }
        save_checkpoint(path, state)
        for old in sorted(checkpoint_dir(cfg).glob("step-*.pt"))[: -cfg.keep_checkpoints]:
            old.unlink(missing_ok=True)
    if world > 1:
        dist.barrier()
    return path
