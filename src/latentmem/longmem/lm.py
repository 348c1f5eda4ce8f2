"""LongMem behind the shared interface (``latentmem.api.MemoryModel``).

    lm = latentmem.load(design="longmem")     # the embedded SmolLM2-135M as the frozen backbone
    mem = lm.new_memory(seed=0)
    lm.inject(mem, "The launch moved to 14 March, after the board meeting in Oslo.")
    print(lm.generate(mem, "Question: When is the launch? Answer:", chat=False, max_new_tokens=8).text)

``inject`` runs the frozen backbone over each segment of the text (at most ``max_inject_tokens``)
and appends its memory-layer keys/values to the bank in chunks tagged with the injection;
``generate``/``score`` run backbone + SideNet, every token (prompt and generated alike, one
retrieval per decoding step) retrieving its top chunks. Lists of memories are read and written in
one forward pass. ``forget`` removes exactly the injection's chunks (``forget_exact``).
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from ..api import ForgetResult, InjectionError, MemoryFormatError, MemoryInfo
from ..design import DesignLM, by_injection
from ..text import left_pad, pad_token_id
from .bank import FREE, LongMemState, read_banks, to_chunks
from .model import LongMem


def model_fingerprint(model: LongMem) -> str:
    """A short id of what a bank depends on: the backbone's weights up to the memory layer and
    the chunking (bf16-rounded samples, so fp32/fp16/bf16 copies share it). The SideNet is not in
    it: training the SideNet keeps every bank valid."""
    cfg = model.config
    h = hashlib.sha256(repr(sorted(cfg.fingerprint().items())).encode())
    named = dict(model.named_parameters())
    ml = cfg.memory_layer
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", f"model.layers.{ml}.self_attn.k_proj.weight",
                 f"model.layers.{ml}.self_attn.v_proj.weight", f"model.layers.{ml}.input_layernorm.weight"):
        sample = named[name].detach().reshape(-1)[:4096].to("cpu", torch.bfloat16).view(torch.int16)
        h.update(sample.numpy().tobytes())
    return f"longmem-L{cfg.num_hidden_layers}-m{ml}-c{cfg.chunk_size}-d{cfg.hidden_size}-{h.hexdigest()[:16]}"


def segments(ids: list[int], limit: int, chunk: int) -> list[list[int]]:
    """Near-equal consecutive segments of at most ``limit`` tokens whose lengths are multiples of
    ``chunk`` (but the last), so only a text's last chunk can be partial."""
    n = max(1, math.ceil(len(ids) / limit))
    size = min(limit, math.ceil(math.ceil(len(ids) / n) / chunk) * chunk)
    return [ids[i : i + size] for i in range(0, len(ids), size)] or [ids]


@torch.no_grad()
def write_segments(model: LongMem, states: Sequence[LongMemState], segs: list[list[int]], injection_ids: list[int], pad: int, undo: list | None = None) -> list:
    """The write: one segment into each bank, in place, in one backbone pass: the memory layer's
    keys/values, chunked (``to_chunks``) and appended with FIFO eviction. Each bank's undo record
    is appended to ``undo`` as soon as it is written (so a failure part-way can be undone).
    The library's ``inject`` and training's segment-by-segment reading share it."""
    undo = [] if undo is None else undo
    input_ids, mask = left_pad(segs, pad, model.device)
    keys, values = model.memory_entries(input_ids, mask)
    T, c = input_ids.shape[1], model.config
    for b, (s, seg) in enumerate(zip(states, segs)):
        n = len(seg)
        k, v, valid = to_chunks(keys[b, T - n :], values[b, T - n :], c.chunk_size)
        undo.append((s, s.append_(k.to(s.keys.device), v.to(s.keys.device), valid, injection_ids[b], c.capacity_chunks)))
    return undo


class LongMemLM(DesignLM):
    """LongMem's implementation of ``latentmem.api.MemoryModel`` (the loops around its steps:
    ``latentmem.design.DesignLM``)."""

    design: ClassVar[str] = "longmem"
    # a chunk's keys depend only on its own segment, so removing an injection's chunks leaves
    # the bank one that never received it (ForgetResult.exact is False only after evictions)
    forget_exact: ClassVar[bool] = True
    state_type: ClassVar[type] = LongMemState
    inject_unit: ClassVar[str] = "segment"

    def __init__(self, model: LongMem, tokenizer, name: str = "model"):
        super().__init__(model, tokenizer, name, model_fingerprint(model))

    # ---- memories ----
    def _bank_shape(self) -> tuple[int, int, int]:
        c = self.config
        return (c.num_key_value_heads, c.chunk_size, c.head_dim)

    def new_memory(self, seed: int = 0) -> LongMemState:
        Hkv, cs, hd = self._bank_shape()
        return LongMemState.empty(Hkv, cs, hd, seed=seed, model_id=self.model_id, dtype=self.model.dtype, device=self.model.device)

    def load_memory(self, path) -> LongMemState:
        return LongMemState.load(path, expect_shape=self._bank_shape(), expect_model_id=self.model_id, capacity_chunks=self.config.capacity_chunks, device=self.model.device, dtype=self.model.dtype)

    def _check_state(self, s) -> None:
        if not isinstance(s, LongMemState):
            raise MemoryFormatError(f"not a LongMem memory: {type(s).__name__}")
        if s.shape != self._bank_shape():
            raise MemoryFormatError(f"bank of shape {s.shape} does not fit this model {self._bank_shape()}")
        if s.model_id != self.model_id:
            raise MemoryFormatError(f"memory was made for model {s.model_id!r}, this model is {self.model_id!r}")

    # ---- writing (encode, chat_prompt, inject, generate, stream, score: DesignLM's) ----
    def _too_short(self, n: int) -> str:
        return f"text has {n} tokens, fewer than one chunk ({self.config.min_inject_tokens}); pass allow_short=True to inject anyway"

    def _units(self, text, allow_short: bool) -> tuple[list[list[int]], int, int]:
        """``inject`` writes a text as one backbone pass per segment, segments in order."""
        ids = self._text_ids(text, allow_short)
        if not ids:
            raise InjectionError("text encodes to no tokens")
        segs = segments(ids, self.config.max_inject_tokens, self.config.chunk_size)
        return segs, sum(map(len, segs)), len(segs)

    def _write_round(self, states, segs, injection_ids, undo) -> None:
        self._write(states, segs, injection_ids, undo)

    def _write(self, states: list[LongMemState], segs: list[list[int]], injection_ids: list[int], undo: list) -> list:
        """One segment into each bank (``write_segments``)."""
        return write_segments(self.model, states, segs, injection_ids, pad_token_id(self.tokenizer), undo)

    # ---- reading ----
    def reader(self, states: Sequence[LongMemState | None]):
        """The memory read of a batch of banks (None when none holds anything)."""
        c = self.config
        return read_banks(list(states), c.chunk_size, c.memory_chunks, c.retrieval, c.faiss_min_chunks)

    def _decoder(self, states, prompts):
        return self.model.decoder(self.reader(states)), None

    def _logits(self, ids: Tensor, mask: Tensor | None, memories, prompts) -> Tensor:
        return self.model(ids, mask, read=self.reader(memories))

    # ---- forgetting, attribution, comparison ----
    def forget(self, memory: LongMemState, injection_id: int) -> ForgetResult:
        """Remove exactly the chunks the injection wrote. Exact unless chunks were evicted at or
        after its write (a bank that never received it would have kept some of them)."""
        self._check_state(memory)
        removed, exact = memory.forget_(int(injection_id))
        note = "" if exact else "chunks were evicted (FIFO) at or after this injection's write; a bank that never received it would still hold some of them"
        return ForgetResult(int(injection_id), exact=exact, removed_units=removed, note=note)

    def owners(self, memory: LongMemState) -> Tensor:
        """[C] injection id of each stored chunk, oldest first."""
        return memory.logical()["owner"].cpu()

    def differences(self, a: LongMemState, b: LongMemState) -> list[str]:
        """What differs between two banks in what they hold and evict (empty when ``a.equal(b)``)."""
        out = []
        la, lb = a.logical(), b.logical()
        if la["keys"].shape != lb["keys"].shape:
            return [f"bank holds {la['keys'].shape[0]} chunks vs replay {lb['keys'].shape[0]}"]
        for k in ("keys", "values", "valid"):
            rows = (la[k].cpu() != lb[k].cpu()).flatten(1).any(-1)
            if rows.any():
                out.append(f"{k}: {int(rows.sum())} chunks differ")
        if not torch.equal(la["owner"].cpu(), lb["owner"].cpu()):
            out.append("chunk owners differ")
        for f, va, vb in (("model_id", a.model_id, b.model_id), ("seed", a.seed, b.seed), ("evicted_chunks", a.evicted_chunks, b.evicted_chunks), ("settled chunks", a.settled_count(), b.settled_count())):
            if va != vb:
                out.append(f"{f}: live {va!r} vs replay {vb!r}")
        return out

    def diff(self, a: LongMemState, b: LongMemState) -> dict:
        """Chunks in b and not in a (``added``) and the reverse, as a multiset of (keys, values,
        validity, owner), with the injections that wrote them."""
        def rows(s):
            lg = s.logical()
            C = lg["keys"].shape[0]
            raw = torch.cat([lg["keys"].reshape(C, lg["keys"][0].numel() if C else 0), lg["values"].reshape(C, lg["values"][0].numel() if C else 0)], 1).cpu().contiguous()
            return Counter(zip(map(bytes, raw.view(torch.uint8).numpy()), map(bytes, lg["valid"].cpu().numpy()), lg["owner"].tolist()))

        ra, rb = rows(a), rows(b)
        plus, minus = rb - ra, ra - rb
        added_by, removed_by = by_injection(plus, minus, lambda key: key[2])
        return {
            "changed_units": sum(plus.values()),
            "added": sum(plus.values()),
            "removed": sum(minus.values()),
            "added_by_injection": added_by,
            "removed_by_injection": removed_by,
        }

    def info(self, memory: LongMemState | None = None) -> MemoryInfo:
        c = self.config
        item = self.model.dtype.itemsize
        used = memory.num_chunks if memory is not None else 0
        index_bytes = used * c.num_key_value_heads * c.head_dim * item  # the search index's mean keys
        bank_bytes = memory.nbytes() if memory is not None else 0
        details = {
            "layers": c.num_hidden_layers,
            "hidden_size": c.hidden_size,
            "memory_layer": c.memory_layer,
            "side_layers": c.side_layers,
            "side_memory_layer": c.side_memory_layer,
            "reduction_factor": c.reduction_factor,
            "chunk_size": c.chunk_size,
            "memory_topk": c.memory_topk,
            "capacity_tokens": c.capacity_chunks * c.chunk_size,
            "retrieval": c.retrieval,
            "stored_tokens": int(memory.valid[memory.owner != FREE].sum()) if memory is not None else 0,
            "evicted_chunks": memory.evicted_chunks if memory is not None else 0,
            "bytes_per_token": 2 * c.num_key_value_heads * c.head_dim * item,
            "gate": [round(float(g), 4) for g in torch.sigmoid(self.model.sidenet.layers[c.side_memory_layer].self_attn.memory_bias.detach().float())],
            # capacity: the bank holds its newest capacity_tokens tokens (FIFO), i.e. about
            # capacity_updates full segments of max_inject_tokens
            "capacity_updates": (c.capacity_chunks * c.chunk_size) // c.max_inject_tokens,
            "min_inject_tokens": c.min_inject_tokens,
            "max_inject_tokens": c.max_inject_tokens,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "sidenet_parameters": sum(p.numel() for p in self.model.sidenet.parameters()),
            "dtype": str(self.model.dtype).replace("torch.", ""),
            "device": str(self.model.device),
            "context_window": c.max_position_embeddings,
            "weights_bytes": sum(t.numel() * t.element_size() for t in [*self.model.parameters(), *self.model.buffers()]),
            "kv_bytes_per_token": 2 * (c.num_hidden_layers + c.side_layers) * c.num_key_value_heads * c.head_dim * item,
            "read_cache_bytes": index_bytes,
            "read_state_bytes": bank_bytes + index_bytes if used else 0,
            "applied_weights": getattr(self.model, "applied_weights", None),
        }
        return MemoryInfo(
            design=self.design, model=self.name, model_id=self.model_id, unit="bank chunk",
            capacity_units=c.capacity_chunks, used_units=used, memory_bytes=bank_bytes,
            update_count=memory.update_count if memory is not None else 0,
            last_injection_id=memory.last_injection_id if memory is not None else 0, details=details,
        )

    # ---- diagnostics and backbone-editing baselines ----
    def health(self, memory: LongMemState, previous=None, *, since_injection: int = 0) -> tuple[dict, dict]:
        """Numbers of a bank under long runs of writes: NaN/Inf count, mean norm of a chunk's mean
        key, largest magnitude; with ``previous``, ``drift`` (relative change of the bank's average
        chunk key) and the share of chunks written since; the share written after
        ``since_injection``. Stored chunks are never rewritten, only added, evicted or forgotten
        (``rewritten_since_last_check`` counts chunks written since, by write order, which a
        save/load renumbers: pass snapshots of the same in-process memory)."""
        self._check_state(memory)
        lg = memory.logical()
        k = lg["keys"].detach().double()
        v = lg["values"].detach().double()
        finite = torch.isfinite(k).all() & torch.isfinite(v).all()
        nonfinite = int((~torch.isfinite(k)).sum() + (~torch.isfinite(v)).sum())
        used = memory.owner != FREE
        means = memory.means[used].detach().double()
        means = torch.where(torch.isfinite(means), means, torch.zeros_like(means))
        avg = means.mean(0) if len(means) else None
        seqs = set(memory.seq[used].tolist())
        drift = rewritten = None
        if previous is not None:
            if previous["avg"] is not None and avg is not None and float(previous["avg"].norm()) > 0:
                drift = float((avg - previous["avg"]).norm() / previous["avg"].norm())
            rewritten = len(seqs - previous["seqs"]) / max(len(seqs), 1)  # write-order numbers: in-process
        owners = lg["owner"]
        both = torch.cat([k.reshape(-1), v.reshape(-1)])
        both = both[torch.isfinite(both)]
        return {
            "nonfinite": nonfinite,
            "finite": bool(finite),
            "mean_norm": round(float(means.norm(dim=-1).mean()), 5) if len(means) else 0.0,
            "max_abs": round(float(both.abs().max()), 5) if both.numel() else 0.0,
            "drift": None if drift is None else round(drift, 6),
            "rewritten_since_last_check": None if rewritten is None else round(rewritten, 6),
            "replaced_since_start": round(float((owners > since_injection).float().mean()), 6) if len(owners) else 0.0,
            "chunks": len(owners),
        }, {"avg": avg, "seqs": seqs}

    def backbone_logits(self, ids: Sequence[int]) -> Tensor:
        with torch.enable_grad():
            return self.model.backbone_logits(torch.tensor([list(ids)], device=self.model.device))[0]


def load(path=None, **kwargs) -> LongMemLM:
    """A LongMemLM over a local Llama-family folder, or the embedded SmolLM2-135M when path is None."""
    from . import checkpoint

    model, tokenizer = checkpoint.load(path, **kwargs)
    return LongMemLM(model, tokenizer, name=str(path) if path else "SmolLM2-135M-Instruct (embedded default)")
