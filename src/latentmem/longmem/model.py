"""LongMem: a frozen Llama-family backbone, a bank of its cached keys/values, and a SideNet that
reads the bank (Wang et al., "Augmenting Language Models with Long-Term Memory", NeurIPS 2023).

* Writing (paper Fig. 2, left): the frozen backbone reads a segment; the attention keys and values
  of one layer (``memory_layer``) are the segment's bank entries (``memory_entries``), grouped in
  chunks of ``chunk_size`` tokens by ``latentmem.longmem.bank``.
* Reading (Fig. 2, right, and Fig. 3): the backbone runs as usual and hands its hidden states to
  the SideNet. SideNet layer i (a copy of backbone layer 2i + 1 at initialisation, for r = 2)
  gets a cross-network residual of backbone hidden states: the release adds
  H[r*i + r] - H[r*i] to the layer's output (``cross_residual="release"``); the default
  ("aligned") adds H[r*i + r - 1] - H[r*i], the update of the backbone layers the SideNet skips,
  to the layer's *input*, so that at initialisation the SideNet without memory reproduces the
  backbone exactly (x_i = H[r*i] gives layer_i(H[r*i + r - 1]) = H[r*i + r]), and the untrained
  model differs from its backbone only by what memory adds. In the memory-augmented layer every query token
  retrieves, per head, the top ``memory_topk / chunk_size`` chunks by the inner product of its
  query with each chunk's mean key (token-to-chunk retrieval) and attends to their tokens with a
  softmax of its own; a per-head gate g = sigmoid(memory_bias) mixes
  ``(1 - g) * local + g * memory`` (joint attention). Embeddings and output head are the
  backbone's.
* Positions (the release's ALiBi biases local attention only): memory keys are cached *before*
  RoPE and read with the query *before* RoPE, i.e. every memory token sits at relative distance
  0 from its reader (R(0) = identity). Retrieval and memory attention are then by content alone,
  a chunk reads the same wherever and whenever it was written, a bank of millions of tokens
  never leaves the backbone's trained position range, and the bank of a text does not depend on
  what was written before it (forgetting is exact, batched writes equal sequential ones).
  Local attention keeps RoPE at the usual positions.

Hidden states: H[0] = embeddings, H[l] = output of layer l; under "release" the last one is taken
after the final norm, the Hugging Face convention the release reads (``return_all_hiddens``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbone import (
    Attention,
    Backbone,
    DecoderLayer,
    KVCache,
    RMSNorm,
    apply_rope,
    attention_mask_for,
    rope_inv_freq,
)
from .config import LongMemConfig

# (queries [B, H, T, hd] before RoPE) -> (keys [B, H, T, M, hd], values, valid [B, H, T, M], has_memory [B])
Read = Callable[[Tensor], tuple[Tensor, Tensor, Tensor, Tensor]]


# --------------------------------------------------------------------------------------------
# Retrieval and joint attention: short functions in the paper's terms
# --------------------------------------------------------------------------------------------


def chunk_means(keys: Tensor, valid: Tensor) -> Tensor:
    """A chunk's retrieval key: the mean of its (valid) token keys. keys [C, Hkv, c, hd], valid
    [C, c] -> [C, Hkv, hd]."""
    w = valid.to(keys.dtype)[:, None, :, None]
    return (keys * w).sum(2) / w.sum(2).clamp(min=1)


def top_chunks(queries: Tensor, means: Tensor, n: int) -> Tensor:
    """Exact token-to-chunk search: for every head h and query token, the n chunks (fewer when
    the bank holds fewer) whose mean key has the largest inner product with the query, best
    first. queries [H, T, hd]; means [Hkv, C, hd] per kv head (query head h reads kv head
    h // (H / Hkv)) -> indices [H, T, min(n, C)] into the chunks."""
    H, T, hd = queries.shape
    Hkv, C, _ = means.shape
    grouped = queries.reshape(Hkv, (H // Hkv) * T, hd)  # the query heads sharing a kv head, together
    scores = torch.bmm(means, grouped.transpose(1, 2))  # [Hkv, C, g*T]: the bank as the GEMM's left operand
    return scores.topk(min(n, C), dim=1).indices.transpose(1, 2).reshape(H, T, -1)


def memory_attention(q: Tensor, k: Tensor, v: Tensor, valid: Tensor) -> Tensor:
    """Each query's own softmax over its retrieved tokens. q [B, H, T, hd]; k, v [B, H, T, M, hd];
    valid [B, H, T, M] -> [B, H, T, hd] (zeros for a query with nothing retrieved)."""
    scores = torch.einsum("bhtd,bhtmd->bhtm", q, k) * q.shape[-1] ** -0.5
    some = valid.any(-1, keepdim=True)
    # a query with nothing retrieved gets finite scores (no NaN, not even in the backward) and weight 0
    scores = scores.masked_fill(~valid & some, float("-inf")).masked_fill(~some, 0.0)
    probs = torch.where(some, scores.softmax(-1), torch.zeros_like(scores))
    return torch.einsum("bhtm,bhtmd->bhtd", probs, v)


def joint_attention(local: Tensor, memory: Tensor, gate: Tensor) -> Tensor:
    """(1 - g) * local + g * memory per head: local, memory [B, H, T, hd]; gate [B, H] (0 for
    rows without memory, which then read exactly their local attention)."""
    g = gate[:, :, None, None].to(local.dtype)
    return (1 - g) * local + g * memory


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class JointAttention(Attention):
    """Backbone attention plus a memory read and a per-head gate (the release's
    ``JointMultiheadAttentionWeightedSum``)."""

    def __init__(self, cfg: LongMemConfig):
        super().__init__(cfg)
        self.memory_bias = nn.Parameter(torch.full((cfg.num_attention_heads,), float(cfg.memory_bias_init)))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, past, cache: KVCache | None, layer: int, read: Read | None = None) -> Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # before RoPE
        k, v = self.kv(x, cos, sin)
        if cache is not None:
            k, v = cache.write(layer, k, v)
        local = F.scaled_dot_product_attention(apply_rope(q, cos, sin), k, v, attn_mask=mask, enable_gqa=self.n_heads != self.n_kv)
        out = local
        if read is not None:
            mem_k, mem_v, mem_valid, has = read(q)
            gate = torch.sigmoid(self.memory_bias)[None].to(q.dtype) * has[:, None].to(q.dtype)
            out = joint_attention(local, memory_attention(q, mem_k.to(q.dtype), mem_v.to(q.dtype), mem_valid), gate)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MemoryDecoderLayer(DecoderLayer):
    """A decoder layer whose attention is joint attention."""

    def __init__(self, cfg: LongMemConfig):
        super().__init__(cfg)
        self.self_attn = JointAttention(cfg)

    def forward(self, h, cos, sin, mask, past=None, cache=None, layer=0, read: Read | None = None):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, past, cache, layer, read)
        return h + self.mlp(self.post_attention_layernorm(h))


class SideNet(nn.Module):
    def __init__(self, cfg: LongMemConfig):
        super().__init__()
        m = cfg.side_memory_layer
        self.layers = nn.ModuleList(MemoryDecoderLayer(cfg) if i == m else DecoderLayer(cfg) for i in range(cfg.side_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LongMem(nn.Module):
    """Backbone (``model``, ``lm_head``: HF names, frozen) + ``sidenet``."""

    def __init__(self, cfg: LongMemConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.sidenet = SideNet(cfg)
        self._inv_freq = rope_inv_freq(cfg)  # fp32, outside the buffers (see MemoryLLM)

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        # the compute dtype; read off a norm, which stays float when the linears are int8 (quantize.py)
        return self.model.norm.weight.dtype

    @torch.no_grad()
    def init_sidenet_from_backbone(self) -> None:
        """SideNet layer i <- backbone layer ``config.source_layer(i)`` (2i + 1 for r = 2, the
        release's ``reload_ptm_layer``), its final
        norm <- the backbone's, gates at sigmoid(memory_bias_init) (0.5)."""
        for i, layer in enumerate(self.sidenet.layers):
            src = self.model.layers[self.config.source_layer(i)]
            missing, unexpected = layer.load_state_dict(src.state_dict(), strict=False)
            assert not unexpected and set(missing) <= {"self_attn.memory_bias"}, (missing, unexpected)
            if isinstance(layer, MemoryDecoderLayer):
                layer.self_attn.memory_bias.fill_(self.config.memory_bias_init)
        self.sidenet.norm.load_state_dict(self.model.norm.state_dict())

    def freeze_backbone(self) -> None:
        for p in [*self.model.parameters(), *self.lm_head.parameters()]:
            p.requires_grad_(False)

    def rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if self._inv_freq.device != positions.device:
            self._inv_freq = self._inv_freq.to(positions.device)
        freqs = positions.float()[..., None] * self._inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def _frame(self, input_ids: Tensor, attention_mask: Tensor | None, cache: KVCache | None):
        """Positions (padding consumes none), RoPE and the attention mask of a (left-padded) batch."""
        B, T = input_ids.shape
        new_valid = torch.ones(B, T, dtype=torch.bool, device=input_ids.device) if attention_mask is None else attention_mask.bool()
        if cache is not None:
            start, key_valid = cache.next_pos, cache.key_valid[:, : cache.length]
        else:
            start, key_valid = torch.zeros(B, dtype=torch.long, device=input_ids.device), new_valid[:, :0]
        positions = start[:, None] + (new_valid.long().cumsum(1) - 1).clamp(min=0)
        one_step = T == 1 and bool(key_valid.all()) and bool(new_valid.all())
        mask = None if one_step else attention_mask_for(key_valid, new_valid)
        cos, sin = self.rope(positions, self.dtype)
        return new_valid, cos, sin, mask

    # ---- writing ----
    def memory_entries(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The bank entries of a segment: keys (before RoPE) and values of the backbone's memory
        layer, [B, T, Hkv, hd] each. Only the layers below the memory layer run."""
        _, cos, sin, mask = self._frame(input_ids, attention_mask, None)
        h = self.model.embed_tokens(input_ids)
        for layer in self.model.layers[: self.config.memory_layer]:
            h = layer(h, cos, sin, mask)
        att = self.model.layers[self.config.memory_layer].self_attn
        x = self.model.layers[self.config.memory_layer].input_layernorm(h)
        B, T, _ = x.shape
        return att.k_proj(x).view(B, T, att.n_kv, att.head_dim), att.v_proj(x).view(B, T, att.n_kv, att.head_dim)

    # ---- reading ----
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, read: Read | None = None, cache: KVCache | None = None, logits_to_keep: int = 0) -> Tensor:
        """Logits [B, T, V] of the SideNet's output; ``read`` retrieves each row's memory (None:
        no memory, local attention only). ``cache`` holds L backbone + L / r SideNet layers."""
        cfg = self.config
        L, r, m = cfg.num_hidden_layers, cfg.reduction_factor, cfg.side_memory_layer
        new_valid, cos, sin, mask = self._frame(input_ids, attention_mask, cache)
        with torch.no_grad():  # the frozen backbone: its hidden states H[0..L]
            h = self.model.embed_tokens(input_ids)
            hidden = [h]
            for l, layer in enumerate(self.model.layers):
                h = layer(h, cos, sin, mask, None, cache, l)
                hidden.append(h)
        release = cfg.cross_residual == "release"
        if release:  # the release reads HF-style hidden states: the last one after the final norm
            hidden[L] = self.model.norm(hidden[L])
        x = hidden[0]
        for i, layer in enumerate(self.sidenet.layers):
            args = (cos, sin, mask, None, cache, L + i) + ((read,) if i == m else ())
            if release:
                x = layer(x, *args) + (hidden[r * i + r] - hidden[r * i])
            else:
                x = layer(x + (hidden[r * i + r - 1] - hidden[r * i]), *args)
        if not release and len(self.sidenet.layers) * r < L:  # backbone layers past the SideNet's last
            x = x + (hidden[L] - hidden[len(self.sidenet.layers) * r])
        if cache is not None:
            T = input_ids.shape[1]
            cache.key_valid[:, cache.length : cache.length + T] = new_valid
            cache.length += T
            cache.next_pos = cache.next_pos + new_valid.long().sum(1)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self.lm_head(self.sidenet.norm(x))

    def backbone_logits(self, input_ids: Tensor) -> Tensor:
        """The base model's logits [B, T, V] (no SideNet, no memory)."""
        _, cos, sin, mask = self._frame(input_ids, None, None)
        h = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            h = layer(h, cos, sin, mask)
        return self.lm_head(self.model.norm(h))

    def decoder(self, read: Read | None) -> Decoder:
        return Decoder(self, read)


class Decoder:
    """What ``latentmem.generate.decode`` drives: the model with its rows' memory read bound, and
    a config whose layer count sizes the KV cache for backbone + SideNet layers."""

    def __init__(self, model: LongMem, read: Read | None):
        self.model, self.read = model, read
        cfg = model.config
        self.config = cfg.replace(num_hidden_layers=cfg.num_hidden_layers + cfg.side_layers, memory_layer=cfg.memory_layer)
        self.dtype = model.dtype

    def __call__(self, input_ids, attention_mask=None, cache=None, logits_to_keep=0):
        return self.model(input_ids, attention_mask, self.read, cache, logits_to_keep)
