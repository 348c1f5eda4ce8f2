"""MemoryLLM in one file: a Llama-family decoder plus a memory pool in its latent space.

Paper: Wang et al., "MemoryLLM: Towards Self-Updatable Large Language Models", ICML 2024.

* Reading (Fig. 1a): at layer l the sequence is [bos_l, memory_l (N rows), input]. Only input
  positions are queries; memory keys/values come from the layer's own input norm and k/v
  projections, with RoPE at positions 1..N. They depend only on the memory, so
  ``memory_prefix`` computes them once per memory version and generation reuses them.
* Writing (Fig. 1b, Fig. 8): per layer, [bos_l, memory_l[-K:], context] goes through the layer;
  the outputs at the last K positions are the new memory tokens of layer l; only the context
  positions go on to the next layer. ``update_pool`` then drops K old tokens (order kept) and
  appends the new ones (or tiles them into an empty pool).

Every function takes a *batch* of independent pools ``memory[B, L, N, d]`` so B users are read
or written in one forward pass. Parameter names match Hugging Face's LlamaForCausalLM and the
published MemoryLLM checkpoints, so state dicts load without renaming.

Separate LoRA adapters for writing and reading (the 8B release's ``add_decoder_lora``): when
``adapter_roles`` names them, every self-update runs with the "write" adapter active and every
read (memory keys, prediction) with the "read" adapter. For inference ``merge_read_adapter``
folds the read adapter into the weights, so generation runs no LoRA branch.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import MemoryLLMConfig

# --------------------------------------------------------------------------------------------
# Llama building blocks
# --------------------------------------------------------------------------------------------


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


def rope_inv_freq(cfg: MemoryLLMConfig) -> Tensor:
    """Inverse RoPE frequencies, including the base model's own scaling (linear or llama3)."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
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


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, H, T, hd]; cos/sin: [B, T, hd]."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


class Attention(nn.Module):
    def __init__(self, cfg: MemoryLLMConfig):
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
    def __init__(self, cfg: MemoryLLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: MemoryLLMConfig):
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

    def __init__(self, cfg: MemoryLLMConfig):
        super().__init__()
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

    def __init__(self, prefix: KV | None, batch: int, capacity: int, cfg: MemoryLLMConfig, device, dtype):
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


# --------------------------------------------------------------------------------------------
# The memory-augmented model
# --------------------------------------------------------------------------------------------


def _adapter_role(role: str) -> Callable:
    """Run the method with the LoRA adapter serving `role` active (a no-op without roles)."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(self: "MemoryLLM", *args, **kwargs):
            if self.adapter_roles is None:
                return fn(self, *args, **kwargs)
            with self.adapter_for(role):
                return fn(self, *args, **kwargs)

        return run

    return wrap


class MemoryLLM(nn.Module):
    # {"write": adapter name, "read": adapter name} when the model carries separate LoRA
    # adapters (peft layers, unmerged); None: one set of weights does both
    adapter_roles: dict[str, str | None] | None = None
    # set by merge_read_adapter: what was folded into the weights, so a save can undo it
    merged_read: dict | None = None

    def __init__(self, cfg: MemoryLLMConfig):
        super().__init__()
        self.config = cfg
        L, N, d = cfg.num_hidden_layers, cfg.num_memory_tokens, cfg.hidden_size
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Learned: a per-layer BOS state in front of the memory, and an embedding marking the
        # positions whose outputs become new memory (zero-initialised as in the releases).
        self.bos_embedding = nn.Parameter(torch.randn(L, 1, d) * 0.02) if cfg.add_bos_embedding else None
        self.new_memory_positional_emb = nn.Parameter(torch.zeros(1, 1, d))
        # The instance's own pool (what the published checkpoints store); per-user pools live in
        # MemoryState objects and are passed in explicitly.
        self.register_buffer("memory", torch.zeros(L, N, d), persistent=True)
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8), persistent=True)
        # Kept out of the module's buffers on purpose: a model.to(bfloat16) would round the
        # frequencies and garble positions in the thousands. Always fp32, moved on demand.
        self._inv_freq = rope_inv_freq(cfg)

    # ---- small helpers ----
    def set_adapter_roles(self, write: str | None, read: str | None) -> None:
        """Name the LoRA adapters (already injected, e.g. by peft) that serve writing and reading;
        (None, None): one set of weights does both; a role named None runs with no adapter."""
        self.adapter_roles = None if write is None and read is None else {"write": write, "read": read}
        self.__dict__.pop("_lora_layers", None)

    def lora_layers(self) -> list[nn.Module]:
        """The LoRA-wrapped linear layers (peft's, duck-typed), found once per set of roles."""
        layers = self.__dict__.get("_lora_layers")
        if layers is None:
            layers = [m for m in self.modules() if hasattr(m, "lora_A") and hasattr(m, "_active_adapter")]
            self.__dict__["_lora_layers"] = layers
        return layers

    @contextlib.contextmanager
    def adapter_for(self, role: str):
        """Activate adapter_roles[role] on every LoRA layer for the duration of the block.
        Duck-typed on peft's LoRA layers; their ``_active_adapter`` is set directly because
        peft's ``set_adapter`` also flips ``requires_grad``, which would freeze the other
        adapter in the middle of a training step whose graph uses both."""
        if self.adapter_roles is None:
            yield
            return
        name = self.adapter_roles[role]
        layers = self.lora_layers()
        before = [m._active_adapter for m in layers]
        for m in layers:
            m._active_adapter = [name] if name is not None else []
        try:
            yield
        finally:
            for m, b in zip(layers, before):
                m._active_adapter = b

    @torch.no_grad()
    def merge_read_adapter(self) -> None:
        """Fold the read adapter into the base weights, W' = W + s_r B_r A_r, and turn the write
        adapter into the difference: A = [A_w; A_r], B = [s_w B_w, -s_r B_r], scale 1, so a
        self-update still computes W + s_w B_w A_w. Reads (every generated token) then run with
        no LoRA branch at all; only writes pay for one, of rank r_w + r_r. The sums are in fp32."""
        roles = self.adapter_roles
        if roles is None or roles["read"] is None or roles["write"] is None:
            raise ValueError(f"merge_read_adapter needs separate write and read adapters, the roles are {roles}")
        write, read = roles["write"], roles["read"]
        layers = self.lora_layers()
        if any(write not in m.lora_A or read not in m.lora_A for m in layers):
            raise ValueError("merge_read_adapter needs both adapters on every LoRA layer")
        ranks = {(m.r[write], m.r[read], float(m.scaling[write]), float(m.scaling[read])) for m in layers}
        if len(ranks) != 1:  # checked before the first write: a refusal leaves the model as it was
            raise ValueError(f"merge_read_adapter needs one rank and scale per adapter across layers, found {sorted(ranks)[:4]}")
        (r_w, r_r, s_w, s_r), = ranks
        for m in layers:
            base = m.get_base_layer().weight
            a_w, b_w = m.lora_A[write].weight.float(), m.lora_B[write].weight.float()
            a_r, b_r = m.lora_A[read].weight.float(), m.lora_B[read].weight.float()
            base.copy_((base.float() + s_r * (b_r @ a_r)).to(base.dtype))
            a, b = torch.cat([a_w, a_r], 0), torch.cat([s_w * b_w, -s_r * b_r], 1)
            dtype, device = m.lora_A[write].weight.dtype, base.device
            m.lora_A[write] = nn.Linear(a.shape[1], a.shape[0], bias=False, dtype=dtype, device=device).requires_grad_(False)
            m.lora_B[write] = nn.Linear(b.shape[1], b.shape[0], bias=False, dtype=dtype, device=device).requires_grad_(False)
            m.lora_A[write].weight.copy_(a)
            m.lora_B[write].weight.copy_(b)
            m.r[write], m.lora_alpha[write], m.scaling[write] = r_w + r_r, r_w + r_r, 1.0
            m._active_adapter = [write]  # deleting an inactive adapter: peft picks no new one
            m.delete_adapter(read)
        self.merged_read = {"write": write, "read": read, "r_write": r_w, "r_read": r_r, "scale_write": s_w, "scale_read": s_r}
        self.set_adapter_roles(write, None)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos/sin [B, T, hd] for integer positions [B, T], scaled by the config's position factor."""
        pos = positions.float() * self.config.position_factor
        if self._inv_freq.device != pos.device:
            self._inv_freq = self._inv_freq.to(pos.device)
        freqs = pos[..., None] * self._inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def bos_states(self, layer: int, batch: int) -> Tensor | None:
        if self.bos_embedding is None:
            return None
        return self.bos_embedding[layer][None].expand(batch, -1, -1)

    def _with_bos(self, layer: int, rows: Tensor) -> Tensor:
        bos = self.bos_states(layer, rows.shape[0])
        return rows if bos is None else torch.cat([bos.to(rows.dtype), rows], dim=1)

    # ---- reading ----
    @_adapter_role("read")
    def memory_prefix(self, memory: Tensor, initialized: Tensor | bool = True, positions: Tensor | None = None) -> KV:
        """Keys/values of [bos_l, memory_l] for every layer: computed once per memory version.

        memory: [B, L, M, d] (M = N for a pool; training also reads just the K new tokens).
        positions: [B, L, M] logical index (0 = oldest) of each row when the rows are stored
        out of order (see MemoryState); RoPE position = 1 + logical index, bos at 0.
        """
        B, L, M, _ = memory.shape
        dev = memory.device
        valid = torch.as_tensor(initialized, dtype=torch.bool, device=dev).expand(B).clone()
        has_bos = self.bos_embedding is not None
        P = M + has_bos
        if positions is None:
            positions = torch.arange(M, device=dev).expand(B, L, M)
        positions = positions.to(dev) + has_bos
        bos_pos = torch.zeros(B, L, int(has_bos), dtype=positions.dtype, device=dev)
        ks, vs = [], []
        # unbind once: indexing memory[:, l] per layer would make backward fill a full-size zero
        # gradient for every layer (training reads pools with gradient)
        per_layer = memory.unbind(1)
        for l, layer in enumerate(self.model.layers):
            cos, sin = self.rope(torch.cat([bos_pos[:, l], positions[:, l]], dim=1), memory.dtype)
            x = layer.input_layernorm(self._with_bos(l, per_layer[l]))
            k, v = layer.self_attn.kv(x, cos, sin)
            ks.append(k)
            vs.append(v)
        next_pos = torch.where(valid, P, 0).long()
        return KV(ks, vs, valid, next_pos)

    @_adapter_role("read")
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        memory: Tensor | KV | None = None,
        initialized: Tensor | bool = True,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
    ) -> Tensor:
        """Logits [B, T, V] for input_ids [B, T] (left padding allowed via attention_mask).

        ``memory``: a pool batch [B, L, M, d] (keys computed here, with gradient) or a
        precomputed ``KV`` prefix; ``None`` reads no memory, which is exactly the base model.
        ``cache``: a KVCache for incremental decoding (then ``memory`` must be None: the cache
        already holds the prefix).
        """
        B, T = input_ids.shape
        dev = input_ids.device
        new_valid = torch.ones(B, T, dtype=torch.bool, device=dev) if attention_mask is None else attention_mask.bool()
        past = memory if isinstance(memory, KV) or memory is None else self.memory_prefix(memory, initialized)
        if cache is not None:
            start = cache.next_pos
            key_valid = cache.key_valid[:, : cache.length]
        elif past is not None:
            start, key_valid = past.next_pos, past.key_mask()
        else:
            start, key_valid = torch.zeros(B, dtype=torch.long, device=dev), new_valid[:, :0]
        # padding tokens do not consume positions: position = start + number of real tokens before
        positions = start[:, None] + (new_valid.long().cumsum(1) - 1).clamp(min=0)
        if T == 1 and bool(key_valid.all()) and bool(new_valid.all()):
            mask = None  # one query that may see everything: the fast path of decoding
        else:
            mask = attention_mask_for(key_valid, new_valid)
        h = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(positions, h.dtype)
        for l, layer in enumerate(self.model.layers):
            h = layer(h, cos, sin, mask, past, cache, l)
        if cache is not None:
            cache.key_valid[:, cache.length : cache.length + T] = new_valid
            cache.length += T
            cache.next_pos = cache.next_pos + new_valid.long().sum(1)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        return self.lm_head(self.model.norm(h))

    # ---- writing ----
    @_adapter_role("write")
    def new_memory_tokens(self, memory: Tensor, initialized: Tensor | bool, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Self-update's forward pass (paper Fig. 1b and Fig. 8) for a batch of pools.

        memory [B, L, N, d]; input_ids [B, T] left-padded (attention_mask [B, T]).
        Returns (new_tokens [B, L, K, d], count [B]): row b's new memory is the last count[b]
        rows (K, or the context length when an empty pool is written with fewer than K tokens).

        Layout per row: [pad..., bos, memory[-K:], context]. Padding goes in front of
        everything so that "the last K positions" means the same in every row. Rows whose pool
        is still empty run the context alone (bos and memory masked), as the releases do.
        """
        cfg = self.config
        B, T = input_ids.shape
        K, dev = cfg.num_tokens, input_ids.device
        ctx_valid = torch.ones(B, T, dtype=torch.bool, device=dev) if attention_mask is None else attention_mask.bool()
        init = torch.as_tensor(initialized, dtype=torch.bool, device=dev).expand(B)
        n_ctx = ctx_valid.sum(1)
        if bool((n_ctx == 0).any()):
            raise ValueError("cannot write an empty context into memory")
        has_bos = self.bos_embedding is not None
        any_init = bool(init.any())
        # An empty pool's row runs its context alone; when no row has a pool, the (fully masked)
        # prefix is left out of the frame: the same outputs for a fraction of the compute.
        P = K + has_bos if any_init else 0  # prefix slots in the frame
        # key validity and positions in the frame [B, P + T]
        prefix_valid = init[:, None].expand(B, P)
        key_valid = torch.cat([prefix_valid, ctx_valid], dim=1)
        # left padding of the context is moved in front of the prefix: permute the frame so that
        # row b reads [pads, bos, mem, real context]. Built as a gather index over [prefix, ctx].
        pads = T - n_ctx
        order = torch.arange(P + T, device=dev)[None].expand(B, -1)
        # positions j < pads[b] take context pad slots (P + j); then prefix (j - pads); then ctx
        j = order
        gather = torch.where(j < pads[:, None], P + j, torch.where(j < pads[:, None] + P, j - pads[:, None], j))
        frame_valid = key_valid.gather(1, gather)
        positions = (frame_valid.long().cumsum(1) - 1).clamp(min=0)
        mask = attention_mask_for(frame_valid[:, :0], frame_valid)
        cos, sin = self.rope(positions, self.dtype)
        # new_memory_positional_emb marks the last K positions of initialised rows
        mark = torch.zeros(B, P + T, 1, dtype=self.dtype, device=dev)
        mark[:, -K:] = 1.0
        mark = mark * init[:, None, None].to(self.dtype)

        ctx = self.model.embed_tokens(input_ids)
        outs = []
        tails = memory[:, :, -K:].unbind(1) if any_init else None  # unbind: see memory_prefix
        for l, layer in enumerate(self.model.layers):
            prefix = self._with_bos(l, tails[l].to(ctx.dtype)) if any_init else ctx[:, :0]
            frame = torch.cat([prefix, ctx], dim=1).gather(1, gather[..., None].expand(-1, -1, ctx.shape[-1]))
            frame = frame + mark * self.new_memory_positional_emb.to(ctx.dtype)
            out = layer(frame, cos, sin, mask)
            if out.shape[1] < K:  # a short context and no prefix: left-pad to K rows (count says which are real)
                out_k = torch.cat([out.new_zeros(B, K - out.shape[1], out.shape[2]), out], dim=1)
                outs.append(out_k)
            else:
                outs.append(out[:, -K:])
            # only context positions go on: undo the permutation for the context slots
            ctx = out.gather(1, self._context_slots(pads, P, T)[..., None].expand(-1, -1, out.shape[-1]))
        count = torch.where(init, K, n_ctx.clamp(max=K))
        return torch.stack(outs, dim=1), count

    @staticmethod
    def _context_slots(pads: Tensor, P: int, T: int) -> Tensor:
        """Frame index of each (left-padded) context slot: pads sit at the front of the frame."""
        j = torch.arange(T, device=pads.device)[None]
        return torch.where(j < pads[:, None], j, j + P)


def update_pool(memory: Tensor | Sequence[Tensor], initialized: Tensor, new_tokens: Tensor, count: Tensor, keep: Sequence[Tensor | None]) -> Tensor | list[Tensor]:
    """Drop old tokens and append new ones (paper section 3.1.2) for each pool in a batch.

    memory: [B, L, N, d] or a list of B pools [L, N, d] (returned in the same form);
    new_tokens [B, L, K, d] with the last count[b] rows valid; keep[b]: sorted indices
    [L or 1, N - count[b]] of surviving old tokens (None for an empty pool, which is filled by
    tiling the new tokens, the last ones winning any remainder).
    """
    rows = []
    pools = memory.unbind(0) if isinstance(memory, Tensor) else memory  # unbind: see memory_prefix
    for b in range(len(memory)):
        pool = pools[b]
        L, N, d = pool.shape
        new = new_tokens[b, :, new_tokens.shape[2] - int(count[b]) :].to(pool.dtype)
        if not bool(initialized[b]):
            rows.append(tile_to(new, N))
            continue
        idx = keep[b].to(pool.device)
        idx = idx.expand(L, -1) if idx.shape[0] == 1 else idx
        survivors = pool.gather(1, idx[..., None].expand(-1, -1, d))
        rows.append(torch.cat([survivors, new], dim=1))
    return torch.stack(rows) if isinstance(memory, Tensor) else rows


def tile_to(rows: Tensor, n: int) -> Tensor:
    """[L, k, ...] -> [L, n, ...]: repeat whole copies, then the last n % k rows (the releases' rule)."""
    k = rows.shape[1]
    reps, rem = divmod(n, k)
    parts = [rows] * reps + ([rows[:, k - rem :]] if rem else [])
    return torch.cat(parts, dim=1)
