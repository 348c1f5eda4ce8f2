"""MemoryLLM's typed config: the base model's fields plus the memory pool's shape and policies.

Field names follow the published MemoryLLM ``config.json`` (``num_tokens``, ``num_blocks``,
``add_bos_embedding``, ``drop_memory_per_layer``), so a config round-trips through either format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from ..config import BackboneConfig

PositionScaling = Literal["none", "interpolate", "linear"]

# The one default memory shape (K new tokens per update, N = K * num_blocks per layer): the shape
# the shipped default weights were trained with, used for any model unless its checkpoint or
# trained-weights file names another (published MemoryLLM checkpoints carry their own).
DEFAULT_NUM_TOKENS, DEFAULT_NUM_BLOCKS = 128, 4


@dataclass
class MemoryLLMConfig(BackboneConfig):
    num_tokens: int = DEFAULT_NUM_TOKENS  # K: memory tokens written per update
    num_blocks: int = DEFAULT_NUM_BLOCKS  # N = num_blocks * num_tokens
    add_bos_embedding: bool = True
    drop_memory_per_layer: bool = False  # 8B release: independent drop indices per layer
    # How memory positions are kept inside the base model's trained range:
    # "interpolate" (7B release): positions *= max_position_embeddings / ((num_blocks + 1) * num_tokens)
    # "linear" (8B release): positions /= (N + max_input_tokens) / max_position_embeddings
    position_scaling: PositionScaling = "none"
    max_input_tokens: int = 2048  # the input budget the "linear" scaling reserves after memory
    min_inject_tokens: int = 16  # the releases warn that shorter contexts disturb memory
    max_inject_tokens: int = 512  # chunk limit: longer text is split and injected in order

    # LoRA settings of a published checkpoint (kept for round-tripping; see loading.py)
    add_decoder_lora: bool = False
    lora_config: dict[str, Any] | None = None
    model_type: str = "memoryllm"

    model_type_name: ClassVar[str] = "memoryllm"
    architectures_name: ClassVar[tuple[str, ...]] = ("MemoryLLM",)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_tokens < 1 or self.num_blocks < 1:
            raise ValueError(f"num_tokens and num_blocks must be >= 1, got {self.num_tokens}, {self.num_blocks}")
        if self.position_scaling not in ("none", "interpolate", "linear"):
            raise ValueError(f"position_scaling must be none, interpolate or linear, got {self.position_scaling!r}")

    # ---- derived sizes ----
    @property
    def num_memory_tokens(self) -> int:
        """N: memory tokens per layer."""
        return self.num_tokens * self.num_blocks

    @property
    def position_factor(self) -> float:
        """Multiplier applied to every RoPE position (bos, memory and input alike)."""
        if self.position_scaling == "interpolate":
            return min(1.0, self.max_position_embeddings / ((self.num_blocks + 1) * self.num_tokens))
        if self.position_scaling == "linear":
            return min(1.0, self.max_position_embeddings / (self.num_memory_tokens + self.max_input_tokens))
        return 1.0

    def derived_fields(self) -> dict[str, Any]:
        return {"num_memory_tokens": self.num_memory_tokens}

    def fingerprint(self) -> dict[str, Any]:
        """What a saved memory state must agree with to be loaded into this model."""
        return {
            "num_hidden_layers": self.num_hidden_layers,
            "hidden_size": self.hidden_size,
            "num_tokens": self.num_tokens,
            "num_blocks": self.num_blocks,
            "vocab_size": self.vocab_size,
        }
