"""The Llama-family base model's fields, shared by every memory design's typed config.

Field names follow Hugging Face's ``LlamaConfig`` (and Mistral's, Qwen2's), so a config dict
round-trips. Each design's config (``MemoryLLMConfig``, ...) extends ``BackboneConfig`` with its own
memory fields; ``from_dict`` reads an HF config.json (or a design's own) into any of them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self



@dataclass
class BackboneConfig:
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
    model_type: str = "llama"
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    # written as model_type / architectures by to_dict (a design's config overrides them)
    model_type_name: ClassVar[str] = "llama"
    architectures_name: ClassVar[tuple[str, ...]] = ("LlamaForCausalLM",)

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
        if self.hidden_act not in ("silu", "swish"):
            raise ValueError(f"only SiLU-gated MLPs (Llama family) are supported, got hidden_act={self.hidden_act!r}")

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)

    # ---- (de)serialisation ----
    @classmethod
    def from_dict(cls, d: dict[str, Any], **overrides: Any) -> Self:
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
        kwargs["model_type"] = cls.model_type_name
        extra = {k: v for k, v in d.items() if k not in known and k not in ("rope_parameters",)}
        return cls(**kwargs, extra=extra)

    def derived_fields(self) -> dict[str, Any]:
        """Derived values written beside the fields (and ignored when read back)."""
        return {}

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d.update(self.derived_fields())
        d["architectures"] = list(self.architectures_name)
        return d

    @classmethod
    def from_json(cls, path: str | Path, **overrides: Any) -> Self:
        return cls.from_dict(json.loads(Path(path).read_text()), **overrides)

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
