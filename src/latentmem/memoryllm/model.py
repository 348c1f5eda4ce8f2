"""MemoryLLM: a Llama-family decoder plus a memory pool in its latent space (read and write).

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
read (memory keys, prediction) with the "read" adapter (``latentmem.lora``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..backbone import KV, Backbone, KVCache, attention_mask_for, rope_inv_freq
from ..lora import AdapterRoles, adapter_role
from ..text import left_pad
from .config import MemoryLLMConfig
from .state import tile_to


class MemoryLLM(AdapterRoles, nn.Module):

    def __init__(self, cfg: MemoryLLMConfig):
        super().__init__()
        self.config = cfg
        L, d = cfg.num_hidden_layers, cfg.hidden_size
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # Learned: a per-layer BOS state in front of the memory, and an embedding marking the
        # positions whose outputs become new memory (zero-initialised as in the releases).
        # (no random draw on the meta device, where a checkpoint load fills it: see Backbone)
        bos = torch.empty(L, 1, d) if torch.empty(0).is_meta else torch.randn(L, 1, d) * 0.02
        self.bos_embedding = nn.Parameter(bos) if cfg.add_bos_embedding else None
        self.new_memory_positional_emb = nn.Parameter(torch.zeros(1, 1, d))
        # No pool here: every pool is a MemoryState passed in explicitly (a published
        # checkpoint's own pool becomes one at load, see checkpoint.py).
        # Kept out of the module's buffers on purpose: a model.to(bfloat16) would round the
        # frequencies and garble positions in the thousands. Always fp32, moved on demand.
        self._inv_freq = rope_inv_freq(cfg)

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        # the compute dtype; read off a norm, which stays float when the linears are int8 (quantize.py)
        return self.model.norm.weight.dtype

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
    @adapter_role("read")
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

    @adapter_role("read")
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
    @adapter_role("write")
    def new_memory_tokens(self, memory: Tensor, initialized: Tensor | bool, input_ids: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Self-update's forward pass (paper Fig. 1b and Fig. 8) for a batch of pools.

        memory [B, L, N, d]; input_ids [B, T] left-padded (attention_mask [B, T]).
        Returns (new_tokens [B, L, K, d], count [B]): row b's new memory is the last count[b]
        rows (K, or the context length when an empty pool is written with fewer than K tokens).

        Layout per row: [pad..., bos, memory[-K:], context]. Padding goes in front of
        everything so that "the last K positions" means the same in every row. Rows whose pool
        is still empty run the context alone (bos and memory masked), as the releases do; where
        new_memory_positional_emb goes in them follows ``config.empty_pool_write``
        (``positional_emb_weights``).
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
        # new_memory_positional_emb on the last K positions of every layer's input, and on the
        # new tokens of every layer but the last, per row (see positional_emb_weights)
        on_input, on_new = (w.to(self.dtype)[:, None, None] for w in self.positional_emb_weights(init))
        mark = torch.zeros(B, P + T, 1, dtype=self.dtype, device=dev)
        mark[:, -K:] = 1.0
        mark = mark * on_input

        ctx = self.model.embed_tokens(input_ids)
        emb = self.new_memory_positional_emb.to(ctx.dtype)
        extra = on_new * emb if bool(on_new.any()) else None  # only "8b" rows with an empty pool
        outs = []
        tails = memory[:, :, -K:].unbind(1) if any_init else None  # unbind: see memory_prefix
        last = len(self.model.layers) - 1
        for l, layer in enumerate(self.model.layers):
            prefix = self._with_bos(l, tails[l].to(ctx.dtype)) if any_init else ctx[:, :0]
            frame = torch.cat([prefix, ctx], dim=1).gather(1, gather[..., None].expand(-1, -1, ctx.shape[-1]))
            frame = frame + mark * emb
            out = layer(frame, cos, sin, mask)
            if out.shape[1] < K:  # a short context and no prefix: left-pad to K rows (count says which are real)
                new = torch.cat([out.new_zeros(B, K - out.shape[1], out.shape[2]), out], dim=1)
            else:
                new = out[:, -K:]
            outs.append(new + extra if extra is not None and l < last else new)
            # only context positions go on: undo the permutation for the context slots
            ctx = out.gather(1, self._context_slots(pads, P, T)[..., None].expand(-1, -1, out.shape[-1]))
        count = torch.where(init, K, n_ctx.clamp(max=K))
        return torch.stack(outs, dim=1), count

    def positional_emb_weights(self, initialized: Tensor) -> tuple[Tensor, Tensor]:
        """Where a self-update adds new_memory_positional_emb, per row: (on the last K positions
        of every layer's input, on the new tokens of every layer but the last), as 0/1 [B].

        An initialised pool: the input only (both releases). An empty pool depends on the
        release (``config.empty_pool_write``):

        * "7b" (7B-branch file): nowhere; the context runs as plain text.
        * "8b" (main-branch file): the input too (its last min(K, n) positions: with an empty
          pool the frame is the context alone). That file adds it in place to the tensor the
          previous layer returned, which is also the tensor it keeps as that layer's new
          tokens, so those carry the embedding once more: new_l = out_l[-K:] + emb for every
          layer l but the last, whose output no later layer touches.
        """
        init = initialized.bool()
        eight_b = torch.full_like(init, self.config.empty_pool_write == "8b")
        return init | eight_b, ~init & eight_b

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


@torch.no_grad()
def self_update(model: MemoryLLM, states: Sequence, chunk_ids: list[list[int]], injection_ids: list[int], pad: int, undo: list | None = None) -> list:
    """One self-update of each pool (``MemoryState``s, in place) with one chunk of token ids each:
    the library's write (``MemoryLM.inject``) and training's integrity rule alike. New tokens come
    from ``new_memory_tokens`` on each pool's last K tokens; ``write_update_`` drops K old ones
    with the pool's own generator. Each write's undo record is appended to ``undo`` (returned)
    as soon as it is made, so a failure part-way through a batch can be undone too."""
    undo = [] if undo is None else undo
    K, dev = model.config.num_tokens, model.device
    input_ids, mask = left_pad(chunk_ids, pad, dev)
    init = torch.tensor([s.initialized for s in states], device=dev)
    tails = torch.stack([s.tail(K).to(dev) for s in states])
    new_tokens, count = model.new_memory_tokens(tails, init, input_ids, mask)
    for b, s in enumerate(states):
        new = new_tokens[b, :, K - int(count[b]) :].to(s.memory.device)
        undo.append((s, s.write_update_(new, injection_ids[b], model.config.drop_memory_per_layer)))
    return undo
