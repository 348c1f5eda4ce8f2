"""Design-local helpers for benchmarks: what a benchmark can only set up inside MemoryLLM.
The measuring itself stays in ``benchmarks/`` and goes through the shared interface."""

from __future__ import annotations

import torch

from ..lora import attach_adapters
from .lm import MemoryLM

# every linear layer of a Llama block, as the 8B release's adapters cover them
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def with_random_adapters(lm: MemoryLM, *, merge_read: bool, rank: int = 8, alpha: int = 16, seed: int = 0) -> MemoryLM:
    """``lm``'s model with separate random write/read LoRA adapters (rank ``rank`` on every linear
    layer of each block, factors ~ N(0, 0.01^2)) attached in place as LoRA branches, switched by
    role as the 8B release's ``add_decoder_lora``; with ``merge_read`` the reader is folded into
    the weights (what loading does by default). Returns a MemoryLM over the changed model;
    ``lm`` must not be used afterwards."""
    g = torch.Generator().manual_seed(seed)
    modules = [(name, m) for name, m in lm.model.named_modules() if name.rsplit(".", 1)[-1] in LORA_TARGETS]
    loras = {
        role: {name: {"A": torch.randn(rank, m.in_features, generator=g) * 0.01, "B": torch.randn(m.out_features, rank, generator=g) * 0.01} for name, m in modules}
        for role in ("write", "read")
    }
    attach_adapters(lm.model, loras, {"lora_r": str(rank), "lora_alpha": str(alpha)}, {"write": "write", "read": "read"}, merge_read=merge_read)
    return MemoryLM(lm.model, lm.tokenizer, name=f"{lm.name} + random write/read adapters (r={rank}{', reader merged' if merge_read else ''})")
