"""The Llama-family decoder blocks every memory design builds on, and the attention caches.

Parameter names are those of Hugging Face's ``LlamaForCausalLM`` (``model.layers.0.self_attn.q_proj``
...), so HF state dicts and the published memory checkpoints load without renaming. Attention is
PyTorch's SDPA. ``BackboneConfig`` holds the base model's fields; each design's config extends it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import BackboneConfig

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(cfg: BackboneConfig) -> Tensor:
    """Inverse RoPE frequencies, including the base model's own scaling (linear or llama3). Always
    computed on the CPU, also inside a ``torch.device("meta")`` build (real values are needed,
    and meta arithmetic would import torch._dynamo: ~1.7 s of a load)."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    rs = cfg.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / rs["factor"]
    elif kind == "llama3":  # Llama 3.1+: smooth interpolation between low and high frequencies
        factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_ctx = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_ctx / hi) & ~(wavelen > old_ctx / lo)
        inv_freq = torch.where(medium, smoothed, scaled)
    elif kind not in ("default", None):
        raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: linear, llama3)")
    return inv_freq


def build_empty(make: Callable[[], nn.Module], dtype: torch.dtype, device) -> nn.Module:
    """``make()`` with no random init and every tensor's storage allocated once on ``device``,
    floating ones in ``dtype``; contents undefined (a checkpoint load fills them). Tied weights stay
    tied and the fp32 RoPE frequencies (``_inv_freq``, kept out of the buffers) are real values.

    Built on the meta device, then materialised with ``torch.empty(shape)`` rather than
    ``module.to(dtype).to_empty(device)``: meta tensors' ``.to`` / ``empty_like`` run Python
    decompositions whose first call imports torch's symbolic-shapes stack (sympy), ~0.5-1 s of
    every model load."""
    with torch.device("meta"):
        model = make()
    made: dict[int, Tensor] = {}  # id of a meta tensor -> its replacement, so tied stays tied

    def real(t: Tensor) -> Tensor:
        if id(t) not in made:
            empty = torch.empty(t.shape, dtype=dtype if t.is_floating_point() else t.dtype, device=device)
            made[id(t)] = nn.Parameter(empty, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else empty
        return made[id(t)]

    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is not None and t.is_meta:
                    store[name] = real(t)
    if getattr(model, "_inv_freq", None) is not None:
        model._inv_freq = model._inv_freq.to(device)  # computed on the CPU (rope_inv_freq)
    return model


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, H, T, hd]; cos/sin: [B, T, hd]."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qkv_bias = cfg.attention_bias or cfg.qkv_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=cfg.attention_bias)

    def kv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
        """Keys (with RoPE) and values of already-normalised states x [B, T, d] -> [B, Hkv, T, hd]."""
        B, T, _ = x.shape
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        return apply_rope(k, cos, sin), v

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, past: "KV | None", cache: "KVCache | None", layer: int) -> Tensor:
        B, T, _ = x.shape
        q = apply_rope(self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2), cos, sin)
        k, v = self.kv(x, cos, sin)
        if cache is not None:
            k, v = cache.write(layer, k, v)
        elif past is not None:
            k, v = torch.cat([past.k[layer], k], dim=2), torch.cat([past.v[layer], v], dim=2)
        gqa = self.n_heads != self.n_kv
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, past: "KV | None" = None, cache: "KVCache | None" = None, layer: int = 0) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, past, cache, layer)
        return h + self.mlp(self.post_attention_layernorm(h))


class Backbone(nn.Module):
    """Named ``model`` inside MemoryLLM so parameter names match HF (``model.layers.0...``)."""

    def __init__(self, cfg: BackboneConfig):
        super().__init__()
        if torch.empty(0).is_meta:
            # Built on the meta device (a checkpoint load fills every weight afterwards): skip the
            # random init, whose meta normal_ is a Python decomposition that imports
            # torch._dynamo on first use, ~1.7 s of every model load.
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        else:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)



# --------------------------------------------------------------------------------------------
# Attention prefixes and caches
# --------------------------------------------------------------------------------------------


@dataclass
class KV:
    """Per-layer keys/values of a prefix (bos + memory), RoPE already applied.

    k[l], v[l]: [B, Hkv, P, hd]. ``valid`` [B] says which rows attend the prefix at all
    (an uninitialised pool has no prefix). ``next_pos`` [B]: RoPE position of the first
    input token (P for rows with a prefix, 0 otherwise), before position scaling.
    """

    k: list[Tensor]
    v: list[Tensor]
    valid: Tensor
    next_pos: Tensor

    @property
    def length(self) -> int:
        return self.k[0].shape[2] if self.k else 0

    def key_mask(self) -> Tensor:
        return self.valid[:, None].expand(-1, self.length)


class KVCache:
    """Preallocated per-layer key/value buffers for decoding.

    The memory prefix is copied in once per generate call; each step writes its new keys in
    place, so a decode step costs one attention over [prefix + past], with no per-step
    concatenation of the N memory rows.
    """

    def __init__(self, prefix: KV | None, batch: int, capacity: int, cfg: BackboneConfig, device, dtype):
        P = prefix.length if prefix is not None else 0
        shape = (batch, cfg.num_key_value_heads, P + capacity, cfg.head_dim)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.key_valid = torch.zeros(batch, P + capacity, dtype=torch.bool, device=device)
        if prefix is not None and P:
            for l in range(cfg.num_hidden_layers):
                self.k[l][:, :, :P].copy_(prefix.k[l])
                self.v[l][:, :, :P].copy_(prefix.v[l])
            self.key_valid[:, :P] = prefix.key_mask()
            self.next_pos = prefix.next_pos.clone()
        else:
            self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.length = P

    def write(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        T = k.shape[2]
        end = self.length + T
        if end > self.k[layer].shape[2]:
            raise RuntimeError(f"KV cache capacity {self.k[layer].shape[2]} exceeded")
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def attention_mask_for(key_valid: Tensor, new_valid: Tensor) -> Tensor:
    """Boolean mask [B, 1, T, P+T]: every query sees the valid prefix keys and its valid causal
    past. Each query also sees itself so rows of padding never get an all-False row (NaN)."""
    B, T = new_valid.shape
    P = key_valid.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=new_valid.device).tril()
    new_part = causal[None] & new_valid[:, None, :]
    new_part = new_part | torch.eye(T, dtype=torch.bool, device=new_valid.device)[None]
    prefix_part = key_valid[:, None, :].expand(B, T, P)
    return torch.cat([prefix_part, new_part], dim=2)[:, None]
