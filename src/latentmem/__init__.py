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
    ``trained`` for MemoryLLM; see the design's ``load``)."""
    if design not in DESIGNS:
        raise ValueError(f"unknown design {design!r}; available: {', '.join(sorted(DESIGNS))}")
    return importlib.import_module(DESIGNS[design]).load(path, **options)


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
