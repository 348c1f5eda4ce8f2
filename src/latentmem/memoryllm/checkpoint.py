"""MemoryLLM's weights in and out: a plain Llama-family folder (fresh memory parts), the embedded
default with its shipped trained weights, and the published MemoryLLM checkpoint layout.

Weights are read with safetensors straight into ``MemoryLLM`` (its parameter names are those of
HF's ``LlamaForCausalLM``); see ``latentmem.loading`` for the shared folder reading.

Public API::

    load(path=None, **kw)                    # None -> default model; a folder -> by model_type
    load_hf_folder(path, *, num_tokens, num_blocks, dtype, device, **memory_overrides)
    load_default(*, num_tokens=None, num_blocks=None, dtype, device, trained=True, **memory_overrides)
    apply_trained_weights(model, path=None)  # `memoryllm train`'s export (LoRA merged)
    load_memoryllm_checkpoint(path, *, dtype, device, **overrides)
    save_memoryllm_checkpoint(model, path, tokenizer=None, max_shard_size="2GB", memory=None)
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from ..api import CheckpointError
from ..backbone import build_empty, rope_inv_freq
from ..files import write_folder
from ..loading import SUPPORTED_MODEL_TYPES, TensorSource, check_folder, default_model_dir, load_tokenizer, parse_size, read_config, weight_files
from ..lora import LORA_KEY, attach_adapters, unmerge_read
from .config import DEFAULT_NUM_BLOCKS, DEFAULT_NUM_TOKENS, RELEASE_8B_KEYS, MemoryLLMConfig, lineage_fields
from .model import MemoryLLM
from .state import MemoryState

MEMORYLLM_MODEL_TYPE = "memoryllm"
# Parameters MemoryLLM adds to the base model: a plain HF folder has none of them.
MEMORY_KEYS = ("bos_embedding", "new_memory_positional_emb")
# The pool a published checkpoint stores beside its weights. It is not part of the model: it
# becomes a memory state (MemoryLM.memory_from_model) and a save writes the state it is given.
POOL_KEYS = ("memory", "initialized")
# Trained MemoryLLM weights (bos_embedding, LoRA-merged layers, ...) for the default model, if
# the package ships them: applied on top of the converted base model by load_default().
SHIPPED_WEIGHTS = Path(__file__).parent.parent / "assets" / "default_memoryllm.safetensors"


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def load(path: str | os.PathLike | None = None, **kw: Any) -> tuple[MemoryLLM, Any]:
    """(model, tokenizer) from the default model (path None) or a folder, by its model_type."""
    if path is None:
        return load_default(**kw)
    return load_hf_folder(path, **kw)  # dispatches published MemoryLLM checkpoints itself


def load_hf_folder(
    path: str | os.PathLike,
    *,
    num_tokens: int | None = None,
    num_blocks: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    **memory_overrides: Any,
) -> tuple[MemoryLLM, Any]:
    """A local HF folder of a Llama-family model (config.json, safetensors, tokenizer files).

    The memory pool shape is num_tokens x num_blocks (``MemoryLLMConfig``'s defaults when None);
    other config fields (position_scaling, drop_memory_per_layer, ...) go in memory_overrides.
    The pool starts uninitialised, so the model computes exactly the base model until the first
    injection. A published MemoryLLM checkpoint (model_type "memoryllm") is passed on to
    ``load_memoryllm_checkpoint``.
    """
    path = check_folder(path)
    raw = read_config(path)
    shape = {k: v for k, v in (("num_tokens", num_tokens), ("num_blocks", num_blocks)) if v is not None}
    _refuse_mplus(raw, path)
    if _is_memoryllm_config(raw):
        return load_memoryllm_checkpoint(path, dtype=dtype, device=device, **shape, **memory_overrides)
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{path}: model_type {model_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama family) and {MEMORYLLM_MODEL_TYPE!r} checkpoints"
        )
    window = raw.get("sliding_window")
    if window and raw.get("use_sliding_window", model_type == "mistral"):
        warnings.warn(f"{path}: sliding_window={window} is not implemented; attention is full (identical up to {window} tokens)", stacklevel=2)
    with TensorSource(weight_files(path)) as source:
        if source.loras:
            raise CheckpointError(f"{path}: LoRA tensors in a plain {model_type} folder; merge the adapter first")
        overrides = {**shape, **memory_overrides}
        if "lm_head.weight" not in source.keys:
            overrides["tie_word_embeddings"] = True  # HF omits lm_head when it is the embedding
        cfg = _config(raw, overrides, path)
        model = _build_model(cfg, source, dtype, device, path, optional=MEMORY_KEYS)
    return model, load_tokenizer(path, required=True)


def load_default(
    *,
    num_tokens: int | None = None,
    num_blocks: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trained: bool = True,
    **memory_overrides: Any,
) -> tuple[MemoryLLM, Any]:
    """The embedded SmolLM2-135M-Instruct (converted once into the cache), plus the shipped
    trained memory weights (SHIPPED_WEIGHTS; ``trained=False`` gives the untrained base).

    The memory shape defaults to the one the shipped weights were trained with (their metadata),
    else the library default (K=128, N=512). ``model.applied_weights`` records what was applied (file, sha256,
    tensors), or None."""
    shape = trained_shape(SHIPPED_WEIGHTS) if trained else {}
    num_tokens = num_tokens or shape.get("num_tokens", DEFAULT_NUM_TOKENS)
    num_blocks = num_blocks or shape.get("num_blocks", DEFAULT_NUM_BLOCKS)
    # The trained weights are applied in fp32 and the result cast once: merging LoRA factors into
    # bf16/fp16 weights would round twice, and the model id (bf16 samples of the weights) of a
    # half-precision load would then differ from the fp32 one, refusing its memories.
    model, tokenizer = load_hf_folder(
        default_model_dir(), num_tokens=num_tokens, num_blocks=num_blocks, dtype=torch.float32 if trained else dtype, device=device, **memory_overrides
    )
    model.applied_weights = apply_trained_weights(model) if trained else None
    if model.dtype != dtype:
        model.to(dtype)
    return model, tokenizer


def trained_shape(path: Path) -> dict[str, int]:
    """num_tokens / num_blocks recorded in a trained-weights file ({} when absent)."""
    if not path.is_file():
        return {}
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return {k: int(meta[k]) for k in ("num_tokens", "num_blocks") if k in meta}


# --------------------------------------------------------------------------------------------
# Reading folders
# --------------------------------------------------------------------------------------------


def _is_memoryllm_config(raw: dict[str, Any]) -> bool:
    # The authors' configs may say model_type "llama" while naming the MemoryLLM architecture.
    archs = raw.get("architectures") or []
    return raw.get("model_type") == MEMORYLLM_MODEL_TYPE or any("memoryllm" in str(a).lower() for a in archs)


def _config(raw: dict[str, Any], overrides: dict[str, Any], path: Path, *, published: bool = False) -> MemoryLLMConfig:
    """The typed config of a folder; ``published``: a MemoryLLM config.json, whose lineage
    (7B or 8B release, see ``lineage_fields``) supplies the fields it implies. Overrides win."""
    known = {f.name for f in dataclasses.fields(MemoryLLMConfig)} - {"extra", "model_type"}
    unknown = sorted(set(overrides) - known)
    if unknown:  # from_dict would file typos under `extra` silently
        raise TypeError(f"unknown config fields {unknown}; valid: {', '.join(sorted(known))}")
    try:
        cfg = MemoryLLMConfig.from_dict({**raw, **lineage_fields(raw)} if published else raw, **overrides)
        rope_inv_freq(cfg)  # an unsupported rope_scaling is this folder's fault: say so here
        return cfg
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}/config.json: {e}") from e


def _build_model(cfg: MemoryLLMConfig, source: TensorSource, dtype: torch.dtype, device, path: Path, *, optional: tuple[str, ...] = (), lora_scale: float | None = None, merge_lora: bool = True) -> MemoryLLM:
    """MemoryLLM with every tensor taken from `source`, except `optional` ones it lacks (fresh)."""
    # No random init: it would be thrown away (and takes minutes at 7B); storage allocated once.
    model = build_empty(lambda: MemoryLLM(cfg), dtype, device)
    loras = source.lora_factors() if source.loras and merge_lora else {}
    expected = model.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in source.keys and k not in optional and not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing:
        shown = ", ".join(missing[:8]) + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise CheckpointError(f"{path}: missing tensors: {shown}")
    unexpected = sorted(source.keys - set(expected) - set(POOL_KEYS))
    if unexpected:
        shown = ", ".join(unexpected[:8]) + (f" ... ({len(unexpected)} in all)" if len(unexpected) > 8 else "")
        raise CheckpointError(f"{path}: tensors this {cfg.num_hidden_layers}-layer model has no place for: {shown}")
    unused = sorted(set(loras) - {k.removesuffix(".weight") for k in expected})
    if unused:
        raise CheckpointError(f"{path}: LoRA factors for modules the model lacks: {unused[:8]}")
    with torch.no_grad():
        for name, dst in expected.items():
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # the embedding, filled under its own name
            if name not in source.keys:
                _init_memory_part(model, name)
                continue
            src = source.get(name)
            if src.shape != dst.shape:
                raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(src.shape)}, the config gives {tuple(dst.shape)}")
            module = name.removesuffix(".weight")
            if module in loras:  # W += B @ A * alpha / r, computed in fp32
                a, b = loras[module]
                src = src.float() + (b.float() @ a.float()) * lora_scale
            dst.copy_(src)
    if "memory" in source.keys:
        model.checkpoint_pool = _read_pool(cfg, source, dtype, device, path)
    return model.eval()


def _read_pool(cfg: MemoryLLMConfig, source: TensorSource, dtype: torch.dtype, device, path: Path) -> tuple[Tensor, bool]:
    """The checkpoint's own pool (memory [L, N, d], initialized), checked against the config. Kept
    on the model only until MemoryLM takes it (``model.checkpoint_pool``), which removes it."""
    memory = source.get("memory")
    shape = (cfg.num_hidden_layers, cfg.num_memory_tokens, cfg.hidden_size)
    if tuple(memory.shape) != shape:
        raise CheckpointError(f"{path}: tensor 'memory' has shape {tuple(memory.shape)}, the config gives {shape} (num_blocks * num_tokens memory rows)")
    flag = source.get("initialized") if "initialized" in source.keys else torch.tensor(1)
    if flag.numel() != 1:
        raise CheckpointError(f"{path}: tensor 'initialized' must hold one value, it has shape {tuple(flag.shape)}")
    return memory.to(device=device, dtype=dtype), bool(flag.reshape(()).item())


def _init_memory_part(model: MemoryLLM, name: str) -> None:
    """The values MemoryLLM.__init__ gives the parts a base-model folder does not have."""
    t = getattr(model, name)
    if name == "bos_embedding":
        # Seeded: every load must give the same values, or the model id (a fingerprint of the
        # weights, bos included) changes and memory files saved earlier no longer load.
        t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(0)) * 0.02)
    else:  # new_memory_positional_emb starts at zero
        t.zero_()


# --------------------------------------------------------------------------------------------
# The published MemoryLLM layout
# --------------------------------------------------------------------------------------------


def load_memoryllm_checkpoint(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    merge_read: bool = True,
    **overrides: Any,
) -> tuple[MemoryLLM, Any]:
    """(model, tokenizer or None) from a MemoryLLM folder: config.json with model_type "memoryllm"
    and the memory fields, safetensors with ``memory``, ``bos_embedding``, ... beside the Llama
    weights. LoRA factors in PEFT naming are merged into the weights (W += B A * alpha / r).
    Separate write/read adapters (add_decoder_lora) are attached as LoRA layers (``lora.RoleLoRALinear``); ``merge_read``
    (default) then folds the reader into the weights (``MemoryLLM.merge_read_adapter``)."""
    path = check_folder(path)
    raw = read_config(path)
    _refuse_mplus(raw, path)
    cfg = _config(raw, overrides, path, published=True)
    with TensorSource(weight_files(path)) as source:
        scale, roles = None, None
        if raw.get("add_decoder_lora"):
            # the 8B release: PEFT's "default" adapter writes (inject), "decoder_adapter" reads
            roles = {"write": "default", "read": "decoder_adapter"}
            if source.adapters != set(roles.values()):
                raise CheckpointError(f"{path}: add_decoder_lora needs LoRA adapters {sorted(roles.values())}, found {sorted(source.adapters) or 'none'}")
        elif len(source.adapters) > 1:
            raise CheckpointError(
                f"{path}: unsupported adapter layout: {len(source.adapters)} LoRA adapters {sorted(source.adapters)} without add_decoder_lora; "
                "only a single adapter can be merged, and separate adapters must be the release's write/read pair ('default', 'decoder_adapter') with add_decoder_lora: true"
            )
        if source.loras:
            scale = _lora_scale(cfg.lora_config, source, path)
        if "lm_head.weight" not in source.keys and not cfg.tie_word_embeddings:
            cfg = cfg.replace(tie_word_embeddings=True)
        absent = [k for k in POOL_KEYS if k not in source.keys]
        if absent:  # the published layout always stores the pool beside the weights
            raise CheckpointError(f"{path}: missing tensors: {', '.join(absent)} (a MemoryLLM checkpoint stores its memory pool)")
        model = _build_model(cfg, source, dtype, device, path, lora_scale=scale, merge_lora=roles is None)
        if roles is not None:  # two adapters cannot be merged into one weight: attach them unmerged
            lora = cfg.lora_config or {}
            meta = {"lora_r": str(lora.get("r")), "lora_alpha": str(lora.get("lora_alpha", lora.get("r"))), "use_rslora": bool(lora.get("use_rslora"))}
            attach_adapters(model, source.adapter_factors(), meta, roles, merge_read=merge_read)
    return model, load_tokenizer(path, required=False, own_config=True)


def _refuse_mplus(raw: dict[str, Any], path: Path) -> None:
    """M+ (modeling_mplus.py's MPlus) shares the 8B layout for its short-term pool, but reads a
    long-term memory through a learned retriever that this loader does not implement."""
    archs = [str(a) for a in raw.get("architectures") or []]
    mplus = [k for k in ("num_ltm_blocks", "ltm_initial_size", "add_selector", "selector_layers") if k in raw]
    if mplus or any(a.lower() == "mplus" for a in archs):
        raise CheckpointError(
            f"{path}: unsupported: an M+ checkpoint (architectures {archs}, {', '.join(mplus) or 'M+ fields'}): "
            "its long-term memory and retriever (ltm, ltm_keys, query/key projections) are not implemented; only MemoryLLM 7B/8B checkpoints load"
        )


def _lora_scale(lora_config: dict[str, Any] | None, source: TensorSource, path: Path) -> float:
    if not lora_config:
        raise CheckpointError(f"{path}: LoRA tensors present but config.json has no lora_config (r, lora_alpha)")
    ranks = {source._read(*ab["A"]).shape[0] for ab in source.loras.values() if "A" in ab}
    r = int(lora_config.get("r", next(iter(ranks))))
    if ranks != {r}:
        raise CheckpointError(f"{path}: lora_config r={r} but the LoRA factors have ranks {sorted(ranks)}")
    alpha = float(lora_config.get("lora_alpha", r))
    # rsLoRA (PEFT's use_rslora) scales by alpha / sqrt(r)
    return alpha / r**0.5 if lora_config.get("use_rslora") else alpha / r


def _release_adapter_layout(model: MemoryLLM, tensors: dict[str, Tensor], config: dict) -> tuple[dict[str, Tensor], dict]:
    """Separate write/read adapters as the 8B release stores them: the model's own (LoRA-layer)
    state-dict names, ``<module>.base_layer.weight`` for the wrapped weights and
    ``<module>.lora_{A,B}.<adapter>.weight`` with "default" writing and "decoder_adapter"
    reading, plus add_decoder_lora and a lora_config its modeling file can build from
    (inference_mode, r, lora_alpha, lora_dropout, target_modules)."""
    if model.merged_read is not None:
        tensors = unmerge_read(model, tensors)
    roles = model.merged_read or model.adapter_roles
    if roles["write"] is None or roles["read"] is None:
        raise CheckpointError(f"the release layout needs a write and a read adapter, this model's roles are {roles}")
    rename = {roles["write"]: "default", roles["read"]: "decoder_adapter"}
    out = {}
    for k, v in tensors.items():
        m = LORA_KEY.match(k)
        if m and m["adapter"] in rename:
            k = f"{m['module']}.lora_{m['ab']}.{rename[m['adapter']]}.weight"
        out[k] = v
    wrapped = {id(m) for m in model.lora_layers()}
    targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if id(m) in wrapped})
    # one lora_config serves both adapters, and the release's LoraConfig has no use_rslora:
    # r and lora_alpha = scale * r reproduce each adapter's scale exactly
    if model.merged_read is not None:
        info = model.merged_read
        r, scales = info["r_read"], {(info["r_write"], info["scale_write"]), (info["r_read"], info["scale_read"])}
    else:
        scales = {(int(layer.r[n]), float(layer.scaling[n])) for layer in model.lora_layers() for n in (roles["write"], roles["read"])}
        r = next(iter(scales))[0]
    if len(scales) != 1:
        raise CheckpointError(f"the release layout has one lora_config for both adapters; their (rank, scale) differ: {sorted(scales)}")
    (r, scale), = scales
    dropout = _lora_dropout(model.lora_layers()[0], roles["read"])
    given = {k: v for k, v in (model.config.lora_config or {}).items() if k not in ("r", "lora_alpha", "use_rslora", "target_modules")}
    lora = {"inference_mode": True, "lora_dropout": dropout, **given, "r": r, "lora_alpha": scale * r, "target_modules": targets}
    config = {**config, "add_decoder_lora": True, "lora_config": lora}
    return out, config


def _lora_dropout(layer, adapter: str) -> float:
    """The dropout probability of `adapter` on a LoRA layer (0 when it has none)."""
    drops = getattr(layer, "lora_dropout", None)
    return float(getattr(drops[adapter], "p", 0.0)) if drops is not None and adapter in drops else 0.0


def _release_config(model: MemoryLLM, config: dict[str, Any]) -> dict[str, Any]:
    """config.json in the form of the release whose rule the model follows
    (``empty_pool_write``), so the authors' modeling file of that release loads the folder and
    computes what this model computes; this project's own fields stay beside, and win on load.

    * rope_scaling as the releases' configuration validates it: exactly ``type`` and a float
      ``factor`` (a factor-1 linear scaling is none at all).
    * Nothing left unmerged: ``add_decoder_lora: false`` and no ``lora_config`` (a merged
      adapter's lora_config would make their file wrap the weights in a fresh LoRA).
    * "7b": ``interpolate_position_ids`` says whether positions are interpolated, and the
      8B-only keys (add_decoder_lora, lora_config) are left out: they mark the other lineage.
    """
    cfg = model.config
    rs = config.get("rope_scaling")
    if rs:
        kind = rs.get("type", rs.get("rope_type"))
        if kind in ("linear", "dynamic"):
            factor = float(rs["factor"])
            config["rope_scaling"] = None if kind == "linear" and factor == 1.0 else {"type": kind, "factor": factor}
    if model.adapter_roles is None:
        config.update(add_decoder_lora=False, lora_config=None)
    if cfg.empty_pool_write == "7b":
        config["interpolate_position_ids"] = cfg.position_scaling == "interpolate"
        if not config["add_decoder_lora"]:
            for key in RELEASE_8B_KEYS:
                config.pop(key)
    return config


def _pool_tensors(cfg: MemoryLLMConfig, memory) -> dict[str, Tensor]:
    """The published layout's ``memory`` (fp32, logical order) and ``initialized`` (uint8) tensors."""
    shape = (cfg.num_hidden_layers, cfg.num_memory_tokens, cfg.hidden_size)
    if memory is None:
        pool, initialized = torch.zeros(shape), False
    elif isinstance(memory, tuple):
        pool, initialized = memory
    else:  # a MemoryState
        pool, initialized = memory.logical_memory(), memory.initialized
    if tuple(pool.shape) != shape:
        raise ValueError(f"memory of shape {tuple(pool.shape)} does not fit this model {shape}")
    return {"memory": pool.detach().to("cpu", torch.float32).contiguous().clone(), "initialized": torch.tensor(int(bool(initialized)), dtype=torch.uint8)}


def save_memoryllm_checkpoint(
    model: MemoryLLM,
    path: str | os.PathLike,
    tokenizer: Any = None,
    max_shard_size: int | str = "2GB",
    memory: "MemoryState | tuple[Tensor, bool] | None" = None,
) -> Path:
    """Write `model` in the published layout (fp32 safetensors, sharded with an index json when
    larger than max_shard_size), with ``memory`` as the checkpoint's pool (a memory state, or a
    (pool [L, N, d], initialized) pair; None: an empty pool). The folder is built beside `path` and renamed into place, so a
    failure never leaves a half-written checkpoint at `path` (the old one is kept, or put back; a
    process killed between the two renames leaves it in `.<name>.old-*`). An existing `path` is
    replaced only if it is empty or a MemoryLLM checkpoint itself."""
    path = Path(path).expanduser()
    if path.exists() and not _replaceable(path):
        raise FileExistsError(f"{path} exists and is not a MemoryLLM checkpoint; refusing to replace it")
    limit = parse_size(max_shard_size)
    # clone(): safetensors refuses tensors sharing storage (the tied lm_head), and the tied
    # lm_head.weight is still written so loaders that expect it find it.
    tensors = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous().clone() for k, v in model.state_dict().items()}
    tensors.update(_pool_tensors(model.config, memory))
    config = model.config.to_dict()
    if model.adapter_roles is not None:  # unmerged write/read adapters: the 8B release's layout
        tensors, config = _release_adapter_layout(model, tensors, config)
    config = _release_config(model, config)
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes

    def write(tmp: Path) -> None:
        config["dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, fname))
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    write_folder(path, write)
    return path


def _replaceable(path: Path) -> bool:
    if path.is_dir() and not any(path.iterdir()):
        return True
    try:
        return path.is_dir() and _is_memoryllm_config(read_config(path))
    except (FileNotFoundError, CheckpointError):
        return False


def apply_trained_weights(model: MemoryLLM, path: str | os.PathLike | None = None, *, merge_read: bool = True) -> dict | None:
    """Apply trained MemoryLLM weights (``memoryllm train``'s export; SHIPPED_WEIGHTS by default)
    to a base model in place: plain tensors (bos_embedding, new_memory_positional_emb, ...) are
    copied, LoRA factors merged (W += B A * lora_alpha / lora_r, the scale from the file's
    metadata). An export with separate write/read adapters (``<module>.lora_A.<adapter>.weight``,
    ``adapter_write`` / ``adapter_read`` in the metadata) cannot be merged into one weight: its
    adapters are attached unmerged (``lora.RoleLoRALinear``) and the model switches between them
    (``MemoryLLM.adapter_roles``); ``merge_read`` (default) then folds the read adapter into the
    weights, so reading runs no LoRA branch (``MemoryLLM.merge_read_adapter``). Returns what was applied, or None when the default file is
    absent. Every check comes before the first write: a bad file changes nothing."""
    import hashlib

    path = SHIPPED_WEIGHTS if path is None else Path(path)
    if not path.is_file():
        if path == SHIPPED_WEIGHTS:
            return None
        raise FileNotFoundError(f"trained weights not found: {path}")
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    expected = model.state_dict()
    plain, loras = {}, {}
    for name, t in tensors.items():
        m = LORA_KEY.match(name)
        if m:
            loras.setdefault(m["adapter"] or "", {}).setdefault(m["module"], {})[m["ab"]] = t
        else:
            plain[name] = t
    roles = {"write": meta.get("adapter_write"), "read": meta.get("adapter_read")}
    named = sorted(a for a in loras if a)
    if named and (set(named) != {roles["write"], roles["read"]} or "" in loras):
        raise CheckpointError(f"{path}: LoRA adapters {sorted(loras)} do not match the metadata's write/read adapters {roles}")
    modules = {m for per in loras.values() for m in per}
    unexpected = sorted(set(plain) - set(expected)) + sorted(m for m in modules if f"{m}.weight" not in expected)
    if unexpected:
        raise CheckpointError(f"{path}: tensors this model has no place for: {unexpected[:8]}")
    for k, v in plain.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(f"{path}: tensor {k!r} has shape {tuple(v.shape)}, the model has {tuple(expected[k].shape)}")
    if loras and not {"lora_r", "lora_alpha"} <= set(meta):
        raise CheckpointError(f"{path}: LoRA factors without lora_r / lora_alpha in the metadata")
    for per in loras.values():
        for module, ab in per.items():
            if set(ab) != {"A", "B"}:
                raise CheckpointError(f"{path}: LoRA of {module!r} lacks lora_{'B' if 'A' in ab else 'A'}")
            w_shape = tuple(expected[f"{module}.weight"].shape)
            if ab["B"].dim() != 2 or ab["A"].dim() != 2 or (ab["B"].shape[0], ab["A"].shape[1]) != w_shape or ab["B"].shape[1] != ab["A"].shape[0]:
                raise CheckpointError(f"{path}: LoRA of {module!r} has B {tuple(ab['B'].shape)} and A {tuple(ab['A'].shape)}, the weight is {w_shape}")
    if named and len({frozenset(per) for per in loras.values()}) != 1:
        raise CheckpointError(f"{path}: the write and read adapters cover different modules")
    scale = float(meta["lora_alpha"]) / float(meta["lora_r"]) if loras else 0.0
    with torch.no_grad():
        for k, v in plain.items():
            expected[k].copy_(v)
        if named:
            attach_adapters(model, loras, meta, roles, merge_read=merge_read)
        for module, ab in loras.get("", {}).items():
            w = expected[f"{module}.weight"]
            w.copy_((w.float() + (ab["B"].float() @ ab["A"].float()) * scale).to(w.dtype))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    info = {"path": str(path), "sha256": digest, "tensors": sorted(plain), "lora_modules": len(modules), "lora_scale": scale, "trained_steps": meta.get("steps")}
    if named:
        info["adapters"] = roles
    return info
