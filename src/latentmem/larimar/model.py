"""Larimar's networks: a Llama-family decoder conditioned on a memory readout, the encoder to
latents, and the memory prior (the matrices' algebra is in ``memory.py``).

* Encoder (paper Fig. 1, e): text -> sentence embedding e [D] (mean-pooled, unit length: MiniLM
  by default, or the decoder's own final states) -> latent z = head(e) [C]. ``head`` is
  identity-initialised when D == C. The unit embedding e also serves the scope detector.
* Decoder conditioning (the release's Optimus-style ``past_key_values``): the readout z_r is
  projected into P key/value rows per layer (keys carry no rotary position). Each layer's
  queries attend those rows in a softmax of their own, added to the ordinary causal attention
  through a per-layer gate tanh(g_l) with g_l = 0 at initialisation (Flamingo's gated
  cross-attention): an untrained model is *exactly* the base model, and training opens the
  gates (d loss / d g_l != 0 at g = 0). Token positions start at 0 as in the base model.
* Memory prior: ``memory_mean`` M0 [K, C] = eye(K, C), learned.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbone import KV, Backbone, KVCache, apply_rope, attention_mask_for, rope_inv_freq
from .config import LarimarConfig


class Larimar(nn.Module):
    def __init__(self, cfg: LarimarConfig, encoder: nn.Module | None = None):
        super().__init__()
        self.config = cfg
        L, P, C = cfg.num_hidden_layers, cfg.prefix_tokens, cfg.latent_size
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.encoder = encoder  # a BertModel-like module (None: the decoder's pooled states)
        D = cfg.hidden_size if cfg.encoder == "decoder" else cfg.encoder_size
        self.encoder_head = nn.Linear(D, C)
        with torch.no_grad():
            self.encoder_head.weight.copy_(torch.eye(C, D))
            self.encoder_head.bias.zero_()
        self.memory_mean = nn.Parameter(torch.eye(cfg.memory_slots, C))
        self.prefix_proj = nn.Linear(C, L * 2 * P * cfg.num_key_value_heads * cfg.head_dim)
        nn.init.normal_(self.prefix_proj.weight, std=0.02)
        nn.init.zeros_(self.prefix_proj.bias)
        self.prefix_gate = nn.Parameter(torch.zeros(L))
        # log-variance of the addressing weights w around z M^+ in training (the release's
        # w_logvar, one shared value); reads at inference use the mean
        self.w_logvar = nn.Parameter(torch.zeros(1))
        self._inv_freq = rope_inv_freq(cfg)  # fp32, kept out of the buffers (see memoryllm.model)

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        # the compute dtype; read off a norm, which stays float when the linears are int8 (quantize.py)
        return self.model.norm.weight.dtype

    def rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if self._inv_freq.device != positions.device:
            self._inv_freq = self._inv_freq.to(positions.device)
        freqs = positions.float()[..., None] * self._inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    # ---- encoder ----
    def embed(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Unit sentence embeddings e [B, D] (float32): masked mean of the encoder's last states."""
        if self.config.encoder == "decoder":
            states = self.hidden_states(input_ids, attention_mask)
        else:
            states = self.encoder(input_ids=input_ids, attention_mask=attention_mask.long()).last_hidden_state
        m = attention_mask.to(states.dtype)[..., None]
        pooled = (states * m).sum(1) / m.sum(1).clamp(min=1)
        return F.normalize(pooled.float(), dim=-1)

    def latent(self, e: Tensor) -> Tensor:
        """z = head(e) [B, C]."""
        return self.encoder_head(e.to(self.encoder_head.weight.dtype))

    # ---- decoder conditioning ----
    def memory_prefix(self, z_r: Tensor, valid: Tensor) -> KV:
        """Per-layer key/value rows [B, Hkv, P, hd] of readouts z_r [B, C]; rows with valid False
        read nothing (their gate contribution is zeroed)."""
        cfg = self.config
        B = z_r.shape[0]
        kv = self.prefix_proj(z_r.to(self.dtype)).view(B, cfg.num_hidden_layers, 2, cfg.num_key_value_heads, cfg.prefix_tokens, cfg.head_dim)
        valid = valid.to(self.device, torch.bool)
        kv = kv * valid[:, None, None, None, None, None]
        return KV(list(kv[:, :, 0].unbind(1)), list(kv[:, :, 1].unbind(1)), valid, torch.zeros(B, dtype=torch.long, device=self.device))

    def _attention(self, l: int, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, prefix: tuple[Tensor, Tensor, Tensor] | None, cache: KVCache | None, P: int) -> Tensor:
        att = self.model.layers[l].self_attn
        B, T, _ = x.shape
        q = apply_rope(att.q_proj(x).view(B, T, att.n_heads, att.head_dim).transpose(1, 2), cos, sin)
        k, v = att.kv(x, cos, sin)
        if cache is not None:
            k, v = cache.write(l, k, v)
            k, v = k[:, :, P:], v[:, :, P:]
        gqa = att.n_heads != att.n_kv
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        if prefix is not None:
            pk, pv, valid = prefix
            read = F.scaled_dot_product_attention(q, pk, pv, enable_gqa=gqa)
            gate = torch.tanh(self.prefix_gate[l]).to(out.dtype) * valid.to(out.dtype)
            out = out + gate[:, None, None, None] * read
        return att.o_proj(out.transpose(1, 2).reshape(B, T, -1))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, memory: KV | None = None, cache: KVCache | None = None, logits_to_keep: int = 0, hidden: bool = False) -> Tensor:
        """Logits [B, T, V] (or final normed states with ``hidden``). ``memory``: a readout
        prefix (``memory_prefix``); ``cache``: a decode cache whose first rows are that prefix
        (``latentmem.generate.decode`` builds it). Without either it is the base model."""
        B, T = input_ids.shape
        dev = input_ids.device
        new_valid = torch.ones(B, T, dtype=torch.bool, device=dev) if attention_mask is None else attention_mask.bool()
        P = 0
        if cache is not None:
            if not hasattr(cache, "prefix_len"):  # first call: the cache holds only the prefix
                cache.prefix_len = cache.length
                cache.prefix_valid = cache.key_valid[:, 0].clone() if cache.length else None
            P = cache.prefix_len
            start, past_valid = cache.next_pos, cache.key_valid[:, P : cache.length]
        else:
            start, past_valid = torch.zeros(B, dtype=torch.long, device=dev), new_valid[:, :0]
        positions = start[:, None] + (new_valid.long().cumsum(1) - 1).clamp(min=0)
        mask = None if T == 1 and bool(past_valid.all()) and bool(new_valid.all()) else attention_mask_for(past_valid, new_valid)
        h = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(positions, h.dtype)
        for l, layer in enumerate(self.model.layers):
            if cache is not None and P:
                prefix = (cache.k[l][:, :, :P], cache.v[l][:, :, :P], cache.prefix_valid)
            elif memory is not None:
                prefix = (memory.k[l], memory.v[l], memory.valid)
            else:
                prefix = None
            h = h + self._attention(l, layer.input_layernorm(h), cos, sin, mask, prefix, cache, P)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        if cache is not None:
            cache.key_valid[:, cache.length : cache.length + T] = new_valid
            cache.length += T
            cache.next_pos = cache.next_pos + new_valid.long().sum(1)
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        h = self.model.norm(h)
        return h if hidden else self.lm_head(h)

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The base decoder's final normed states [B, T, d] (the "decoder" encoder's input)."""
        return self.forward(input_ids, attention_mask, hidden=True)
