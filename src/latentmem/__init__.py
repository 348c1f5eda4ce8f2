"""latentmem: language models with a memory inside their latent space.

Text is written into memory without back-propagation, recalled later and forgotten on request.
Each memory design is a subpackage behind one interface (``latentmem.api.MemoryModel``):

    memoryllm   MemoryLLM (ICML 2024): a fixed-size pool of hidden states per layer, self-updated
    larimar     Larimar (ICML 2024): an episodic memory matrix written in one shot, forgettable per fact
    longmem     LongMem (NeurIPS 2023): a bank of cached keys/values, read by a SideNet through retrieval

    import latentmem
    lm = latentmem.load()                    # the embedded SmolLM2-135M default, design="memoryllm"
    mem = lm.new_memory(seed=0)
    lm.inject(mem, "The launch moved to 14 March, after the board meeting in Oslo.")
    print(lm.generate(mem, "Question: When is the launch? Answer:", max_new_tokens=8).text)
"""

from __future__ import annotations

import importlib
from typing import Any

from .api import (
    CheckpointError,
    ForgetResult,
    Generation,
    InjectionError,
    InjectResult,
    Memory,
    MemoryFormatError,
    MemoryInfo,
    MemoryModel,
)

__version__ = "0.2.0"

# design name -> the module whose load(path, **options) returns a MemoryModel
DESIGNS: dict[str, str] = {"memoryllm": "latentmem.memoryllm", "longmem": "latentmem.longmem", "larimar": "latentmem.larimar"}


def load(path: Any = None, design: str = "memoryllm", **options: Any) -> MemoryModel:
    """A memory model of the given design over a local Hugging Face folder (Llama family) or a
    design's own checkpoint, or over the embedded SmolLM2-135M default when ``path`` is None.
    ``options`` are the design's (e.g. ``num_tokens``, ``num_blocks``, ``dtype``, ``device``,
    ``trained`` for MemoryLLM; see the design's ``load``).

    ``quantize="int8"``: int8 weight-only linear layers (bf16 activations into the kernel, all
    else fp32), a CPU path for less memory (``latentmem.quantize``). The model is loaded in fp32
    (scales from the fp32 weights; the model id and the memories' dtype stay the fp32 model's,
    so its memories load), so ``dtype`` must be left out."""
    if design not in DESIGNS:
        raise ValueError(f"unknown design {design!r}; available: {', '.join(sorted(DESIGNS))}")
    quantize = options.pop("quantize", None)
    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    if quantize:
        import torch

        if options.setdefault("dtype", torch.float32) != torch.float32:
            raise ValueError(f"quantize='int8' quantises the fp32 weights and computes the rest in fp32; leave dtype out (got {options['dtype']})")
        if str(options.get("device", "cpu")).split(":")[0] != "cpu":
            raise ValueError("quantize='int8' is a CPU path; on a GPU load with dtype=torch.bfloat16 instead")
    lm = importlib.import_module(DESIGNS[design]).load(path, **options)
    if quantize:
        from .quantize import quantize_int8

        quantize_int8(lm.model)  # after the model id is taken: memories stay exchangeable
        lm.name += " (int8 weights)"
    return lm


__all__ = [
    "DESIGNS",
    "CheckpointError",
    "ForgetResult",
    "Generation",
    "InjectResult",
    "InjectionError",
    "Memory",
    "MemoryFormatError",
    "MemoryInfo",
    "MemoryModel",
    "load",
]
