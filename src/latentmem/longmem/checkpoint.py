"""LongMem's weights in: a Llama-family HF folder or the embedded default as the frozen backbone,
the SideNet initialised from its layers (``LongMem.init_sidenet_from_backbone``).

No trained SideNet ships yet: ``applied_weights`` is None (the untrained model: SideNet =
backbone copies, gates at 0.5). ``weights=`` applies a ``longmem train`` export
(``apply_trained_weights``: LoRA factors merged into the SideNet, gates and other SideNet tensors copied).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from ..api import CheckpointError
from ..backbone import build_empty, rope_inv_freq
from ..loading import (
    SUPPORTED_MODEL_TYPES,
    TensorSource,
    check_folder,
    default_model_dir,
    load_tokenizer,
    read_config,
    weight_files,
)
from .config import LongMemConfig
from .model import LongMem


def load(path: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", trained: bool = True, weights: str | os.PathLike | None = None, **overrides: Any) -> tuple[LongMem, Any]:
    """(model, tokenizer) over the default model (path None) or a local HF Llama-family folder.
    ``overrides``: LongMemConfig fields (memory_layer, chunk_size, memory_topk, capacity_tokens, ...)."""
    folder = default_model_dir() if path is None else check_folder(path)
    raw = read_config(folder)
    if raw.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"{folder}: model_type {raw.get('model_type')!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    known = {f.name for f in dataclasses.fields(LongMemConfig)} - {"extra", "model_type"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown config fields {unknown}; valid: {', '.join(sorted(known))}")
    with TensorSource(weight_files(folder)) as source:
        if source.loras:
            raise CheckpointError(f"{folder}: LoRA tensors in a plain folder; merge the adapter first")
        if "lm_head.weight" not in source.keys:
            overrides["tie_word_embeddings"] = True
        try:
            cfg = LongMemConfig.from_dict(raw, **overrides)
            rope_inv_freq(cfg)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{folder}/config.json: {e}") from e
        model = build(cfg, source, dtype, device, folder)
    model.applied_weights = apply_trained_weights(model, weights) if weights is not None else None  # none ships yet
    return model, load_tokenizer(folder, required=True)


def apply_trained_weights(model: LongMem, path: str | os.PathLike) -> dict:
    """Apply a training export (``latentmem.train.longmem``, format longmem-trained/1) in place:
    W += B A * alpha / r for each LoRA pair on a SideNet module, other tensors copied by name
    (only SideNet tensors are accepted: the backbone is frozen). Every tensor is checked first."""
    import hashlib
    import re
    from pathlib import Path

    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"trained weights not found: {path}")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != "longmem-trained/1":
        raise CheckpointError(f"{path}: format {meta.get('format')!r} is not longmem-trained/1")
    scale = float(meta.get("lora_alpha", 1)) / float(meta.get("lora_r", 1))
    params = dict(model.named_parameters())
    lora = re.compile(r"^(.*)\.lora_([AB])\.weight$")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    plain = {}
    for name, t in tensors.items():
        if not name.startswith("sidenet."):
            raise CheckpointError(f"{path}: {name!r} is not a SideNet tensor (the backbone is frozen)")
        m = lora.match(name)
        if m:
            pairs.setdefault(m[1], {})[m[2]] = t
        elif name in params and params[name].shape == t.shape:
            plain[name] = t
        else:
            raise CheckpointError(f"{path}: {name!r} does not fit this model")
    for module, ab in pairs.items():
        w = params.get(f"{module}.weight")
        if set(ab) != {"A", "B"} or w is None or tuple(w.shape) != (ab["B"].shape[0], ab["A"].shape[1]):
            raise CheckpointError(f"{path}: LoRA of {module!r} does not fit this model")
    with torch.no_grad():
        for module, ab in pairs.items():
            w = params[f"{module}.weight"]
            w += (ab["B"].double() @ ab["A"].double() * scale).to(w.dtype)
        for name, t in plain.items():
            params[name].copy_(t.to(params[name].dtype))
    return {"file": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "tensors": len(tensors), "steps": meta.get("steps")}


def build(cfg: LongMemConfig, source: TensorSource, dtype, device, where) -> LongMem:
    """LongMem with the backbone from ``source`` and the SideNet copied from it."""
    model = build_empty(lambda: LongMem(cfg), dtype, device)
    backbone = {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.startswith("sidenet.")}
    missing = [k for k in backbone if k not in source.keys and not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing:
        raise CheckpointError(f"{where}: missing tensors: {', '.join(missing[:8])}")
    unexpected = sorted(source.keys - set(backbone))
    if unexpected:
        raise CheckpointError(f"{where}: tensors this {cfg.num_hidden_layers}-layer model has no place for: {', '.join(unexpected[:8])}")
    with torch.no_grad():
        for name, dst in backbone.items():
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            src = source.get(name)
            if src.shape != dst.shape:
                raise CheckpointError(f"{where}: tensor {name!r} has shape {tuple(src.shape)}, the config gives {tuple(dst.shape)}")
            dst.copy_(src.to(dtype))
    model.init_sidenet_from_backbone()
    model.freeze_backbone()
    return model.eval()
