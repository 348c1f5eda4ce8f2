"""LongMem's typed config: the backbone's fields plus the memory bank, retrieval and SideNet shape.

Defaults are the release's (Wang et al., NeurIPS 2023; ``docs``: ../shared/design/longmem-reference.md):
memory layer at about 3/4 of the depth (18th of 24), chunks of 4 tokens, 64 retrieved tokens
(16 chunks) per query and head, a 65,536-token bank, a SideNet of half the backbone's layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from ..config import BackboneConfig

Retrieval = Literal["auto", "torch", "faiss"]
CrossResidual = Literal["aligned", "release"]


@dataclass
class LongMemConfig(BackboneConfig):
    # backbone layer whose attention keys/values are cached (0-based); None: int(3/4 * L) - 1,
    # the release's 17 of 24, 21 of SmolLM2's 30
    memory_layer: int | None = None
    reduction_factor: int = 2  # SideNet layer i is initialised from backbone layer r*i + 1; L // r layers
    chunk_size: int = 4  # tokens per bank chunk (the release: 4; 2 for in-context learning)
    memory_topk: int = 64  # tokens retrieved per query token and head = memory_topk // chunk_size chunks
    capacity_tokens: int = 65536  # bank capacity (chunk slots x chunk_size); FIFO eviction beyond it
    max_inject_tokens: int = 1024  # one write's segment (the release's 1,024-token samples)
    min_inject_tokens: int | None = None  # None: one chunk (chunk_size tokens)
    # chunk search: "torch" exact matmul + topk, "faiss" IndexFlatIP per kv head (exact too),
    # "auto": faiss on CPU for reads of several tokens (prefill, scoring) from banks of at least
    # faiss_min_chunks chunks when faiss is installed, torch otherwise (decode steps included:
    # faster for one query token, measured in bank.read_banks)
    retrieval: Retrieval = "auto"
    faiss_min_chunks: int = 65536
    memory_bias_init: float = 0.0  # gate = sigmoid(memory_bias): 0.5 at initialisation
    # Where the cross-network residual enters SideNet layer i (see model.py):
    # "release": layer_i(x) + H[r*i + r] - H[r*i] (the release's and the paper's Eq. 3; at
    #   initialisation every SideNet layer adds its copied layer's update once more, so the
    #   untrained model is far from the backbone: on SmolLM2 it answers gibberish);
    # "aligned": layer_i(x + H[r*i + r - 1] - H[r*i]), the residual of the backbone layers the
    #   SideNet skips added before the copied layer: without memory the untrained SideNet *is*
    #   the backbone, and memory is the only change (the default, so the untrained model is usable).
    cross_residual: CrossResidual = "aligned"
    model_type: str = "longmem"

    model_type_name: ClassVar[str] = "longmem"
    architectures_name: ClassVar[tuple[str, ...]] = ("LongMem",)

    def __post_init__(self) -> None:
        super().__post_init__()
        L, r = self.num_hidden_layers, self.reduction_factor
        if r < 1 or L // r < 1:
            raise ValueError(f"reduction_factor must be in [1, {L}], got {r}")
        if self.memory_layer is None:
            self.memory_layer = max(int(0.75 * L) - 1, 0)
        if not 0 <= self.memory_layer < L:
            raise ValueError(f"memory_layer must be in [0, {L - 1}], got {self.memory_layer}")
        if self.memory_layer // r >= L // r:
            raise ValueError(f"memory_layer {self.memory_layer} maps to SideNet layer {self.memory_layer // r}, but the SideNet has {L // r}")
        if self.chunk_size < 1 or self.memory_topk < self.chunk_size:
            raise ValueError(f"need chunk_size >= 1 and memory_topk >= chunk_size, got {self.chunk_size}, {self.memory_topk}")
        if self.capacity_tokens < self.chunk_size:
            raise ValueError(f"capacity_tokens must hold one chunk ({self.chunk_size}), got {self.capacity_tokens}")
        if self.max_inject_tokens < self.chunk_size:
            raise ValueError(f"max_inject_tokens must be >= chunk_size, got {self.max_inject_tokens}")
        if self.min_inject_tokens is None:
            self.min_inject_tokens = self.chunk_size
        if self.cross_residual not in ("aligned", "release"):
            raise ValueError(f"cross_residual must be aligned or release, got {self.cross_residual!r}")
        if self.retrieval not in ("auto", "torch", "faiss"):
            raise ValueError(f"retrieval must be auto, torch or faiss, got {self.retrieval!r}")

    # ---- derived sizes ----
    @property
    def side_layers(self) -> int:
        return self.num_hidden_layers // self.reduction_factor

    def source_layer(self, i: int) -> int:
        """The backbone layer SideNet layer i is initialised from: r*i + 1 in the release (every
        other layer for r = 2); "aligned" takes the last of its r layers, r*i + r - 1 (the same for r = 2)."""
        r = self.reduction_factor
        return min(r * i + 1, self.num_hidden_layers - 1) if self.cross_residual == "release" else r * i + r - 1

    @property
    def side_memory_layer(self) -> int:
        """The SideNet layer with joint attention: the one mirroring the backbone's memory layer."""
        return self.memory_layer // self.reduction_factor

    @property
    def memory_chunks(self) -> int:
        """Chunks retrieved per query token and head."""
        return self.memory_topk // self.chunk_size

    @property
    def capacity_chunks(self) -> int:
        return self.capacity_tokens // self.chunk_size

    def derived_fields(self) -> dict[str, Any]:
        return {"side_layers": self.side_layers, "side_memory_layer": self.side_memory_layer}

    def fingerprint(self) -> dict[str, Any]:
        """What a bank depends on: the backbone's memory layer and the chunking. The SideNet is
        not part of it: the frozen backbone writes the bank, so a bank stays valid when the
        SideNet is trained (the paper's point against memory staleness)."""
        return {
            "num_hidden_layers": self.num_hidden_layers,
            "hidden_size": self.hidden_size,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "memory_layer": self.memory_layer,
            "chunk_size": self.chunk_size,
            "vocab_size": self.vocab_size,
        }
