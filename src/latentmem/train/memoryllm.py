"""MemoryLLM's training recipe (``design = "memoryllm"``): LoRA adapters (and the two memory
embeddings) on a MemoryLLM, the paper's routines plus QA (``routines.py``), and the single
training pool that evolves through the run.

The training pool is a ``latentmem.memoryllm.state.MemoryState``, the library's pool type. The
routines read copies of it; after each optimizer step the step's contexts, gathered from every
process in global index order, are written into it (the integrity rule, ``write_contexts``), so
every process holds the same pool. Its whole state (tensor, layout, drop generator, counters)
goes into the training checkpoints.

``export_weights`` writes the compact file the default model loads (LoRA factors +
bos_embedding + new_memory_positional_emb; ``checkpoint.apply_trained_weights`` merges them).
"""

from __future__ import annotations

import json
import random
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ..files import atomic_write
from ..memoryllm.state import NEVER_WRITTEN, MemoryState
from ..text import pad_token_id
from .config import ConfigError, TrainConfig
from .data import TrainData
from .recipe import Recipe, trained_tensors
from .routines import Batch, RoutineModule, build_batch, memory_loss, training_pool, validation_batches, write_contexts

EXPORT_FORMAT = "memoryllm-trained/1"
POOL_FORMAT = "memoryllm-train-pool/2"  # the training checkpoints' pool entry
WRITE, READ = "write", "read"  # adapter names with separate_adapters (exported under these names)
_PEFT_ADAPTER = re.compile(r"\.lora_([AB])\.default\.weight$")
_PEFT_SAVED = re.compile(r"\.lora_([AB])\.weight$")


class MemoryLLMRecipe(Recipe):
    design = "memoryllm"
    structural = ("model", "num_tokens", "num_blocks", "lora_r", "lora_alpha", "lora_targets", "full_finetune", "train_embeddings")
    metric_fields = ("pool_updates",)

    def load_model(self):
        return load_model(self.cfg)

    def prepare_trainable(self, model: nn.Module) -> list[str]:
        return prepare_trainable(model, self.cfg)

    def setup(self, model: nn.Module, tokenizer, data: TrainData) -> None:
        self.model, self.data, self.pad = model, data, pad_token_id(tokenizer)
        self.pool = training_pool(model, self.cfg.seed)

    def begin(self) -> None:
        # the routines read and extend an initialised pool: fill it with held-in text first
        write_contexts(self.model, self.pool, warmup_contexts(self.cfg, self.data), self.pad)

    def batch(self, index: int, step: int, per_step: int) -> Batch:
        return build_batch(self.cfg, self.data, index, step, per_step)

    def loss_module(self) -> nn.Module:
        return RoutineModule(self.model, self.pool, self.pad)

    def step_record(self, batch: Batch) -> list[list[int]]:
        # the contexts the integrity rule writes (an across-steps forgetting batch injects none)
        written = batch.contexts[0] if batch.contexts else []
        return written[: self.cfg.integrity_contexts]

    def after_step(self, records: Sequence[list[list[int]]]) -> None:
        write_contexts(self.model, self.pool, [c for contexts in records for c in contexts], self.pad)

    def step_metrics(self) -> dict:
        return {"pool_updates": self.pool.update_count}

    def validation_sets(self, eval_data: TrainData) -> dict[str, list[Batch]]:
        return validation_batches(self.cfg, eval_data)

    def validation_loss(self, batch: Batch) -> tuple[Tensor, Tensor]:
        return memory_loss(self.model, batch, self.pool, self.pad, per_row=True)

    def state_dict(self) -> dict:
        return {"pool": pool_state(self.pool)}

    def load_state_dict(self, state: dict) -> None:
        # in place: the loss module holds this very pool
        self.pool.assign(pool_from_state(state["pool"], self.cfg.seed))

    def export(self, model: nn.Module, path: str | Path, extra_meta: dict | None = None) -> Path:
        return export_weights(model, self.cfg, path, extra_meta)

    def results(self) -> dict:
        return {"pool": self.pool}


def warmup_contexts(cfg: TrainConfig, data: TrainData) -> list[list[int]]:
    """``pool_warmup_contexts`` held-in segments (QA contexts when there is no text) that
    initialise the training pool before step 1."""
    rng = random.Random(f"{cfg.seed}:warmup")
    contexts = []
    for _ in range(cfg.pool_warmup_contexts):
        if data.docs:
            contexts.append(data.segments(rng, [rng.randint(cfg.segment_min, cfg.segment_max)])[1][0])
        else:
            contexts.append(data.qa[rng.randrange(len(data.qa))].context)
    return contexts


# --------------------------------------------------------------------------------------------
# The training pool in checkpoints
# --------------------------------------------------------------------------------------------


def pool_state(pool: MemoryState) -> dict:
    """Everything that makes the pool's future, physical layout included (so a resumed run's
    pool equals an uninterrupted one's slot for slot, not only in logical order)."""
    return {
        "format": POOL_FORMAT,
        "memory": pool.memory.detach().cpu().clone(),
        "provenance": pool.provenance.clone(),
        "order": pool.order.clone(),
        "generator": pool.generator.get_state(),
        **{k: getattr(pool, k) for k in ("seed", "initialized", "update_count", "last_injection_id", "version")},
    }


def pool_from_state(state: dict, seed: int) -> MemoryState:
    """The pool of a training checkpoint: ``pool_state``'s layout, or the layout before the
    training pool was a MemoryState ({memory (logical order), initialized, updates, generator};
    its provenance is unknown: slots read as written by injection 0, each update one injection)."""
    generator = torch.Generator(device="cpu")
    generator.set_state(state["generator"])
    if "order" in state:
        counters = {k: state[k] for k in ("seed", "initialized", "update_count", "last_injection_id", "version")}
        return MemoryState(state["memory"].float(), state["provenance"].long(), generator, order=state["order"].long(), **counters)
    memory, initialized, updates = state["memory"].float(), bool(state["initialized"]), int(state["updates"])
    provenance = torch.full(memory.shape[:2], 0 if initialized else NEVER_WRITTEN, dtype=torch.long)
    return MemoryState(memory, provenance, generator, seed, initialized, updates, updates, version=updates)


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
        _add_lora(model, cfg)
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


def _add_lora(model: nn.Module, cfg: TrainConfig) -> None:
    """Freeze everything, then add the adapters (one, or a writer and a reader) trained alone."""
    from peft import LoraConfig, inject_adapter_in_model

    if getattr(model, "adapter_roles", None) is not None or getattr(model, "merged_read", None) is not None:
        # attached write/read adapters (RoleLoRALinear) cannot take peft's layers on top, and a
        # writer and a reader cannot be merged into one base weight
        raise ConfigError("the starting weights carry separate write/read adapters (trained_start with such weights): start from them with init_from = \"default\" (or the file) instead")
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


def export_weights(model: nn.Module, cfg: TrainConfig, path: str | Path, extra_meta: dict | None = None) -> Path:
    """The compact trained weights: LoRA factors in PEFT's saved naming
    (``<module>.lora_A.weight``), bos_embedding and new_memory_positional_emb, fp32, with the
    LoRA scale and the training config in the metadata. checkpoint.apply_trained_weights merges
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
