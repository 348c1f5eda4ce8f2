"""MemoryLLM's typed config: the base model's fields plus the memory pool's shape and policies.

Field names follow the published MemoryLLM ``config.json`` (``num_tokens``, ``num_blocks``,
``add_bos_embedding``, ``drop_memory_per_layer``), so a config round-trips through either format.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from ..config import BackboneConfig

PositionScaling = Literal["none", "interpolate", "linear"]
EmptyPoolWrite = Literal["7b", "8b"]

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
    # Where new_memory_positional_emb goes when an *empty* pool is written (the two releases
    # differ; initialised pools are written alike). "7b" (7B-branch file): nowhere, the context
    # runs as plain text. "8b" (main-branch file): on the last min(K, n) positions of every
    # layer's input, and once more on every layer's new tokens but the last layer's (see
    # MemoryLLM.positional_emb_weights). A published checkpoint's lineage picks it
    # (lineage_fields); the default model and plain HF folders use "7b".
    empty_pool_write: EmptyPoolWrite = "7b"
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
        if self.empty_pool_write not in ("7b", "8b"):
            raise ValueError(f"empty_pool_write must be '7b' or '8b', got {self.empty_pool_write!r}")

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


# The published configs' own field names for what the fields above say (see lineage_fields).
RELEASE_8B_KEYS = ("add_decoder_lora", "lora_config")  # main-branch MemoryLLMConfig always writes both


def lineage_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """The fields a published MemoryLLM config.json implies without naming them, so that a
    checkpoint behaves as the authors' file that produced it (explicit overrides still win).

    * Saved by this project: ``empty_pool_write`` is stated; a save from before that field
      existed has ``position_scaling`` but not it, and was written under the "7b" rule.
    * Main branch (memoryllm-8b, -8b-chat, M+): its MemoryLLMConfig always writes
      ``add_decoder_lora`` and ``lora_config`` (null when unused) -> "8b". Its modeling file has
      no position interpolation (only ``rope_scaling``, read as the base model's own).
    * Otherwise the 7B branch (memoryllm-7b), whose configuration file has neither key:
      "7b"; ``interpolate_position_ids: true`` -> position_scaling "interpolate" (that file
      ignores the flag when ``rope_scaling`` is set); its file draws one drop for all layers
      and builds RoPE with base 10000 whatever the config says.
    """
    if "empty_pool_write" in raw:
        return {}
    if "position_scaling" in raw:
        return {"empty_pool_write": "7b"}
    if any(k in raw for k in RELEASE_8B_KEYS):
        return {"empty_pool_write": "8b"}
    fields: dict[str, Any] = {"empty_pool_write": "7b", "drop_memory_per_layer": False, "rope_theta": 10000.0}
    if raw.get("interpolate_position_ids") and raw.get("rope_scaling") is None:
        fields["position_scaling"] = "interpolate"
    return fields
