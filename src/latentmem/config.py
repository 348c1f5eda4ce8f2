"""One typed config: the Llama-family base model fields plus the memory pool's shape and policies.

Field names follow Hugging Face's ``LlamaConfig`` and the published MemoryLLM ``config.json``
(``num_tokens``, ``num_blocks``, ``add_bos_embedding``, ``drop_memory_per_layer``), so a config
round-trips through either format.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

PositionScaling = Literal["none", "interpolate", "linear"]


@dataclass
class MemoryLLMConfig:
    # ---- base model (Llama family: Llama 2/3, SmolLM2, Mistral, Qwen2) ----
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # The base model's own RoPE scaling (HF format: {"rope_type": "linear"|"llama3", ...}).
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    attention_bias: bool = False  # bias on q/k/v/o (Llama option)
    qkv_bias: bool = False  # bias on q/k/v only (Qwen2)
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None

    # ---- memory pool ----
    num_tokens: int = 256  # K: memory tokens written per update
    num_blocks: int = 10  # N = num_blocks * num_tokens
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
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.num_tokens < 1 or self.num_blocks < 1:
            raise ValueError(f"num_tokens and num_blocks must be >= 1, got {self.num_tokens}, {self.num_blocks}")
        if self.position_scaling not in ("none", "interpolate", "linear"):
            raise ValueError(f"position_scaling must be none, interpolate or linear, got {self.position_scaling!r}")
        if self.hidden_act not in ("silu", "swish"):
            raise ValueError(f"only SiLU-gated MLPs (Llama family) are supported, got hidden_act={self.hidden_act!r}")

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

    def replace(self, **changes: Any) -> "MemoryLLMConfig":
        return dataclasses.replace(self, **changes)

    # ---- (de)serialisation ----
    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides: Any) -> "MemoryLLMConfig":
        """Build from an HF Llama/Mistral/Qwen2 config dict or a published MemoryLLM config."""
        d = {**d, **overrides}
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in known}
        model_type = d.get("model_type", "llama")
        if model_type == "qwen2":
            kwargs["qkv_bias"] = True
        # transformers >= 5 nests rope settings in "rope_parameters"
        rope = d.get("rope_parameters")
        if isinstance(rope, dict):
            kwargs.setdefault("rope_theta", rope.get("rope_theta", kwargs.get("rope_theta", 10000.0)))
            if rope.get("rope_type", "default") != "default":
                kwargs["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        if isinstance(kwargs.get("rope_scaling"), dict):
            rs = dict(kwargs["rope_scaling"])
            rs.setdefault("rope_type", rs.get("type", "default"))
            kwargs["rope_scaling"] = None if rs["rope_type"] == "default" else rs
        kwargs["model_type"] = "memoryllm"
        kwargs.pop("num_memory_tokens", None)
        extra = {k: v for k, v in d.items() if k not in known and k not in ("rope_parameters",)}
        return cls(**kwargs, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d["num_memory_tokens"] = self.num_memory_tokens
        d["architectures"] = ["MemoryLLM"]
        return d

    @classmethod
    def from_json(cls, path: str | Path, **overrides: Any) -> "MemoryLLMConfig":
        return cls.from_dict(json.loads(Path(path).read_text()), **overrides)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def fingerprint(self) -> dict[str, Any]:
        """What a saved memory state must agree with to be loaded into this model."""
        return {
            "num_hidden_layers": self.num_hidden_layers,
            "hidden_size": self.hidden_size,
            "num_tokens": self.num_tokens,
            "num_blocks": self.num_blocks,
            "vocab_size": self.vocab_size,
        }
