"""MemoryLLM behind the shared interface (``latentmem.api.MemoryModel``): the model plus its
tokenizer, with text in and text out.

    lm = latentmem.load()                     # the embedded SmolLM2-135M default
    mem = lm.new_memory(seed=0)
    lm.inject(mem, "The Eiffel Tower was painted green in 2031 ...")
    print(lm.generate(mem, "What colour is the Eiffel Tower?").text)   # asked as "Question: ... Answer:"
    mem.save("alice.mem.safetensors")

``inject`` is the paper's self-update (one update per chunk of at most ``max_inject_tokens``
tokens); ``generate`` reads the memory through keys/values cached per memory version.
Every function also takes lists, so B users' pools are written or read in one forward pass.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from ..api import ForgetResult, InjectionError, MemoryInfo  # noqa: F401 (InjectionError: importable from here, as always)
from ..backbone import KV
from ..design import DesignLM, by_injection
from ..text import chunk_ids, pad_token_id
from .model import MemoryLLM, self_update
from .state import NEVER_WRITTEN, MemoryState, MemoryStateError


@dataclass
class _PrefixCache:
    key: tuple
    kv: KV = field(repr=False)


def model_fingerprint(model: MemoryLLM) -> str:
    """A short id of the weights and memory shape a pool belongs to.

    Samples of a few tensors are rounded to bf16 first, so the same model in fp32, fp16 or
    bf16 has the same id while a different (or differently trained) model does not.
    """
    cfg = model.config
    h = hashlib.sha256(repr(sorted(cfg.fingerprint().items())).encode())
    named = dict(model.named_parameters())
    # under separate write/read adapters peft holds the projection's weight as base_layer (the
    # reader folded in after merge_read_adapter, so merge_read=False loads give another id)
    q_proj = "model.layers.0.self_attn.q_proj"
    q_proj = q_proj + (".base_layer.weight" if f"{q_proj}.base_layer.weight" in named else ".weight")
    for name in ("model.embed_tokens.weight", q_proj, "bos_embedding", "new_memory_positional_emb", "model.norm.weight"):
        t = named.get(name)
        if t is not None:
            sample = t.detach().reshape(-1)[:4096].to("cpu", torch.bfloat16).view(torch.int16)
            h.update(sample.numpy().tobytes())
    return f"L{cfg.num_hidden_layers}-N{cfg.num_memory_tokens}-K{cfg.num_tokens}-d{cfg.hidden_size}-{h.hexdigest()[:16]}"


class CapacityWarning(UserWarning):
    """``inject`` was given a text that needs more updates than the memory keeps."""


class MemoryLM(DesignLM):
    """MemoryLLM's implementation of ``latentmem.api.MemoryModel`` (the loops around its steps:
    ``latentmem.design.DesignLM``)."""

    design: ClassVar[str] = "memoryllm"
    # forget() resets the injection's slots, but later injections read those slots while they
    # were written, so traces may remain in theirs: exactness needs a replay (the store's job)
    forget_exact: ClassVar[bool] = False
    state_type: ClassVar[type] = MemoryState
    inject_unit: ClassVar[str] = "chunk"

    def __init__(self, model: MemoryLLM, tokenizer, name: str = "model"):
        super().__init__(model, tokenizer, name, model_fingerprint(model))
        # the checkpoint's own pool, taken off the model so that it holds no copy of any pool
        self.checkpoint_pool: tuple[Tensor, bool] | None = model.__dict__.pop("checkpoint_pool", None)

    # ---- memory pools ----
    def new_memory(self, seed: int = 0) -> MemoryState:
        c = self.config
        return MemoryState.empty(c.num_hidden_layers, c.num_memory_tokens, c.hidden_size, seed=seed, model_id=self.model_id, dtype=self.model.dtype, device=self.model.device)

    def load_memory(self, path) -> MemoryState:
        c = self.config
        state = MemoryState.load(path, expect_shape=(c.num_hidden_layers, c.num_memory_tokens, c.hidden_size), expect_model_id=self.model_id, device=self.model.device, dtype=self.model.dtype)
        return state

    def memory_from_model(self, seed: int = 0) -> MemoryState:
        """A memory state holding the pool the loaded checkpoint carried (published MemoryLLM
        checkpoints store one beside the weights); an empty memory when it carried none."""
        state = self.new_memory(seed)
        if self.checkpoint_pool is not None:
            pool, initialized = self.checkpoint_pool
            state.memory = pool.detach().clone().to(self.model.device, self.model.dtype)
            state.initialized = initialized
        return state

    # encode, chat_prompt, inject, generate, stream, score: DesignLM's (``encode`` adds no BOS:
    # the learned per-layer bos_embedding plays that role)

    # ---- writing (self-update) ----
    def chunk(self, ids: list[int]) -> list[list[int]]:
        """Split into near-equal chunks of at most max_inject_tokens (so no tiny last chunk)."""
        return chunk_ids(ids, self.config.max_inject_tokens)

    def _too_short(self, n: int) -> str:
        return (
            f"text has {n} tokens, fewer than the {self.config.min_inject_tokens}-token minimum "
            "(shorter contexts disturb the memory, as the MemoryLLM releases warn); pass allow_short=True to inject anyway"
        )

    def _units(self, text, allow_short: bool) -> tuple[list[list[int]], int, int]:
        """``inject`` writes a text as one self-update per chunk, chunks in order."""
        chunks = self.chunk(self._text_ids(text, allow_short))
        return chunks, sum(map(len, chunks)), len(chunks)

    def _check_units(self, states: list[MemoryState], chunks: list[list[list[int]]]) -> None:
        self._warn_capacity(max(map(len, chunks)), max(sum(map(len, c)) for c in chunks), len(chunks))

    def _warn_capacity(self, chunks: int, tokens: int, texts: int) -> None:
        """Warn (issue 15) when a text takes more updates than the pool keeps: every update drops
        K of the N slots at random, so a chunk's expected surviving share after m later updates
        is (1 - K/N)^m (the paper's Eq. 5) and about the last N/K chunks are what is kept."""
        c = self.config
        keep = c.num_memory_tokens // c.num_tokens
        if chunks <= keep:
            return
        import warnings

        share = (1 - c.num_tokens / c.num_memory_tokens) ** (chunks - 1)
        which = "a text" if texts == 1 else f"the longest of {texts} texts"
        warnings.warn(
            f"{which} ({tokens} tokens) takes {chunks} memory updates of at most {c.max_inject_tokens} tokens, "
            f"but this pool (N={c.num_memory_tokens} slots, K={c.num_tokens} per update) keeps about its last "
            f"N/K={keep} updates: after the {chunks - 1} later writes an expected {100 * share:.1f}% of the first "
            f"chunk's slots remain ((1 - K/N)^{chunks - 1}, the paper's Eq. 5), so mostly the last {keep} chunks "
            f"(about the last {keep * c.max_inject_tokens} tokens) can be recalled; inject long texts in parts you "
            f"query before writing more",
            CapacityWarning,
            stacklevel=5,  # the caller of inject (past _check_units, inject and its no_grad wrapper)
        )

    def _update(self, states: list[MemoryState], chunk_ids: list[list[int]], injection_ids: list[int], undo: list | None = None) -> list[tuple[MemoryState, tuple]]:
        """One self-update of each pool, in place (``model.self_update``): a round of ``inject``."""
        return self_update(self.model, states, chunk_ids, injection_ids, pad_token_id(self.tokenizer), undo)

    def _write_round(self, states, chunk_ids, injection_ids, undo) -> None:
        self._update(states, chunk_ids, injection_ids, undo)

    def _check_state(self, s: MemoryState) -> None:
        c = self.config
        if s.shape != (c.num_hidden_layers, c.num_memory_tokens, c.hidden_size):
            raise MemoryStateError(f"memory of shape {s.shape} does not fit this model ({c.num_hidden_layers}, {c.num_memory_tokens}, {c.hidden_size})")
        if s.model_id and s.model_id != self.model_id:
            raise MemoryStateError(f"memory was made for model {s.model_id!r}, this model is {self.model_id!r}")

    # ---- reading (generation) ----
    @torch.no_grad()  # cached for reuse: must not hold an autograd graph of the whole pool
    def prefix(self, states: Sequence[MemoryState | None]) -> KV | None:
        """Memory keys/values for a batch, each pool's computed once per version and cached."""
        if all(s is None or not s.initialized for s in states):
            return None
        parts = []
        for s in states:
            if s is None or not s.initialized:
                s_kv = None
            else:
                key = (s.version, id(s.memory), self.model.dtype, str(self.model.device))
                if s.cache is None or s.cache.key != key:
                    kv = self.model.memory_prefix(s.memory[None].to(self.model.dtype), True, s.positions()[None])
                    s.cache = _PrefixCache(key, kv)
                s_kv = s.cache.kv
            parts.append(s_kv)
        ref = next(p for p in parts if p is not None)
        filled = [p if p is not None else KV([torch.zeros_like(k) for k in ref.k], [torch.zeros_like(v) for v in ref.v], torch.zeros_like(ref.valid), torch.zeros_like(ref.next_pos)) for p in parts]
        if len(filled) == 1:
            return filled[0]
        return KV(
            [torch.cat([p.k[l] for p in filled]) for l in range(len(ref.k))],
            [torch.cat([p.v[l] for p in filled]) for l in range(len(ref.v))],
            torch.cat([p.valid for p in filled]),
            torch.cat([p.next_pos for p in filled]),
        )

    def _decoder(self, states, prompts) -> tuple[MemoryLLM, KV | None]:
        return self.model, self.prefix(states)

    # ---- scoring (``score``: DesignLM's) ----
    def _logits(self, ids: Tensor, mask: Tensor | None, memories, prompts) -> Tensor:
        return self.model(ids, mask, memory=self.prefix(memories))

    # ---- forgetting, attribution, comparison ----
    def forget(self, memory: MemoryState, injection_id: int) -> ForgetResult:
        """Reset every slot written by ``injection_id`` in place (zeroed, marked never written);
        a pool left with no written slot is empty again (the next injection tiles it). Not
        exact: later injections read those slots while they were written."""
        self._check_state(memory)
        mask = memory.provenance == injection_id
        removed = int(mask.sum())
        if memory.shares_tensors:  # a shallow clone's tensors: copy before writing
            memory.memory, memory.provenance, memory.shares_tensors = memory.memory.clone(), memory.provenance.clone(), False
        memory.memory[mask.to(memory.memory.device)] = 0
        memory.provenance[mask] = NEVER_WRITTEN
        if bool((memory.provenance == NEVER_WRITTEN).all()):
            memory.initialized = False
        memory.version += 1
        memory.cache = None
        later = int((memory.provenance > injection_id).sum())
        note = f"{later} slots of later injections were written while it was in memory and may hold traces of it" if later else ""
        return ForgetResult(int(injection_id), exact=False, removed_units=removed, note=note)

    def owners(self, memory: MemoryState) -> Tensor:
        """[L, N] injection id of each memory slot in logical order (-1: never written)."""
        return memory.logical_provenance()

    def differences(self, a: MemoryState, b: MemoryState) -> list[str]:
        """What differs between two memories (empty when bit-identical in everything that
        determines future behaviour), for ``verify``: a replay against the live pool."""
        out = []
        ma, mb = a.logical_memory().cpu(), b.logical_memory().cpu()
        if ma.shape != mb.shape:
            return [f"shape {tuple(ma.shape)} vs replay {tuple(mb.shape)}"]
        rows = (ma != mb).any(-1)
        if rows.any():
            out.append(f"memory: {int(rows.sum())} slots differ (per layer {rows.sum(1).tolist()})")
        if not torch.equal(a.logical_provenance(), b.logical_provenance()):
            out.append("slot provenance differs")
        if not torch.equal(a.generator.get_state(), b.generator.get_state()):
            out.append("drop generator state differs")
        for f in ("initialized", "update_count", "last_injection_id", "model_id"):
            if getattr(a, f) != getattr(b, f):
                out.append(f"{f}: live {getattr(a, f)!r} vs replay {getattr(b, f)!r}")
        return out

    def diff(self, a: MemoryState, b: MemoryState) -> dict:
        """Which slots differ between two memories, per layer, and which injections wrote them:
        ``added`` = in b, not in a; ``removed`` the reverse. Slots are compared as a multiset of
        (vector, provenance) rows per layer, since an update moves the logical positions of the
        tokens it keeps."""
        ma, mb = a.logical_memory().cpu(), b.logical_memory().cpu()
        pa, pb = a.logical_provenance(), b.logical_provenance()
        layers, added, removed = [], Counter(), Counter()
        for layer in range(ma.shape[0]):
            ra = Counter(zip(map(bytes, ma[layer].contiguous().view(torch.uint8).numpy()), pa[layer].tolist()))
            rb = Counter(zip(map(bytes, mb[layer].contiguous().view(torch.uint8).numpy()), pb[layer].tolist()))
            plus, minus = rb - ra, ra - rb
            layers.append({"layer": layer, "added": sum(plus.values()), "removed": sum(minus.values())})
            added.update({(layer, *k): n for k, n in plus.items()})
            removed.update({(layer, *k): n for k, n in minus.items()})
        added_by, removed_by = by_injection(added, removed, lambda key: key[2])  # -1: reset / never written
        return {
            "changed_units": sum(x["added"] for x in layers),
            "layers": layers,
            "added_by_injection": added_by,
            "removed_by_injection": removed_by,
        }

    def info(self, memory: MemoryState | None = None) -> MemoryInfo:
        """Capacity and sizes; with a memory, also what it holds."""
        c = self.config
        mem = memory
        used = int((mem.provenance != NEVER_WRITTEN).any(0).sum()) if mem is not None else 0
        nbytes = (mem.memory.numel() * mem.memory.element_size() + (mem.provenance.numel() + mem.order.numel()) * 8) if mem is not None else 0
        params = sum(p.numel() for p in self.model.parameters())
        details = {
            "layers": c.num_hidden_layers,
            "hidden_size": c.hidden_size,
            "N": c.num_memory_tokens,
            "K": c.num_tokens,
            "num_blocks": c.num_blocks,
            "min_inject_tokens": c.min_inject_tokens,
            "max_inject_tokens": c.max_inject_tokens,
            "memory_values": c.num_hidden_layers * c.num_memory_tokens * c.hidden_size,  # numbers in one pool
            "parameters": params,
            "dtype": str(self.model.dtype).replace("torch.", ""),
            "device": str(self.model.device),
            "initialized": bool(mem.initialized) if mem is not None else False,
            # capacity (issue 15): each update writes K of the N slots and drops K at random, so
            # about the last N/K updates (each a chunk of at most max_inject_tokens) are held
            "capacity_updates": c.num_memory_tokens // c.num_tokens,
            "capacity_tokens": (c.num_memory_tokens // c.num_tokens) * c.max_inject_tokens,
            **self._size_details(mem),
        }
        return MemoryInfo(
            design=self.design, model=self.name, model_id=self.model_id, unit="memory slot",
            capacity_units=c.num_memory_tokens, used_units=used, memory_bytes=nbytes,
            update_count=mem.update_count if mem is not None else 0,
            last_injection_id=mem.last_injection_id if mem is not None else 0, details=details,
        )

    # ---- sizes, diagnostics and backbone-editing baselines (what evaluations and benchmarks
    # need beyond reading and writing; see latentmem.api) ----
    def _size_details(self, mem: MemoryState | None) -> dict:
        """The size facts of ``MemoryInfo.details`` every design provides (computed from shapes)."""
        c, item = self.config, self.model.dtype.itemsize
        kv_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * item
        written = mem is not None and mem.initialized
        read_cache = (c.num_memory_tokens + int(c.add_bos_embedding)) * kv_per_token if written else 0  # bos + N keys/values per layer
        out = {
            "context_window": c.max_position_embeddings,
            "weights_bytes": sum(t.numel() * t.element_size() for t in [*self.model.parameters(), *self.model.buffers()]),
            "kv_bytes_per_token": kv_per_token,
            "read_cache_bytes": read_cache,
            "read_state_bytes": mem.memory.numel() * mem.memory.element_size() + read_cache if written else 0,
        }
        if hasattr(self.model, "applied_weights"):  # set by checkpoint.load_default: the trained weights applied
            out["applied_weights"] = self.model.applied_weights
        return out

    def health(self, memory: MemoryState, previous: tuple | None = None, *, since_injection: int = 0) -> tuple[dict, tuple]:
        """The pool's numbers, for long runs of updates (the integrity evaluation): per-layer mean
        slot norm, NaN/Inf count, largest magnitude; with ``previous`` (the snapshot an earlier
        call returned) the relative change since then (drift) and the share of slots rewritten;
        the share of slots written by injections after ``since_injection``.
        Returns (a JSON-able dict, the snapshot to pass as ``previous`` next time)."""
        self._check_state(memory)
        # float64 and a contiguous copy: the reductions below then give the same digits for the same
        # pool whether it was computed in-process or loaded from a checkpoint (strides change the
        # float32 summation order, which moved the 5th decimal in resume-equality checks)
        mem = memory.memory.detach().to(torch.float64).contiguous()
        finite = torch.isfinite(mem)
        safe = torch.where(finite, mem, torch.zeros_like(mem))
        layer_norm = safe.norm(dim=-1).mean(dim=1)  # [L]
        drift = rewritten = None
        if previous is not None:
            prev_mem, prev_prov = previous
            if float(prev_mem.norm()) > 0:  # no relative change from an empty (all-zero) pool
                drift = float((safe - prev_mem).norm() / prev_mem.norm())
            rewritten = float((memory.provenance != prev_prov).float().mean())  # physical slots: a slot keeps its place
        replaced = float((memory.provenance > since_injection).float().mean())
        return {
            "layer_norm": [round(float(x), 5) for x in layer_norm],
            "mean_norm": round(float(layer_norm.mean()), 5),
            "max_abs": round(float(safe.abs().max()), 5),
            "nonfinite": int((~finite).sum()),
            "drift": None if drift is None else round(drift, 6),
            "replaced_since_start": round(replaced, 6),
            "rewritten_since_last_check": None if rewritten is None else round(rewritten, 6),
        }, (safe, memory.provenance.clone())

    def backbone_logits(self, ids: Sequence[int]) -> Tensor:
        """For baselines that edit the backbone: logits [T, V] of one token sequence read with no
        memory (the base model), under autograd, so a loss over them back-propagates into an
        ``editable_weight`` that requires grad."""
        with torch.enable_grad():
            return self.model(torch.tensor([list(ids)], device=self.model.device))[0]


def load(path=None, *, weights=None, **kwargs) -> MemoryLM:
    """A MemoryLM from a local folder (HF Llama-family model or MemoryLLM checkpoint), or the
    embedded SmolLM2-135M default when path is None (with its shipped trained weights unless
    ``trained=False``, or the trained-weights file ``weights``, `memoryllm train`'s export, in
    their place: the memory shape recorded in that file unless num_tokens/num_blocks are given)."""
    from pathlib import Path

    from . import checkpoint

    if weights is None:
        model, tokenizer = checkpoint.load(path, **kwargs)
        return MemoryLM(model, tokenizer, name=str(path) if path else "SmolLM2-135M-Instruct (embedded default)")
    if path is not None:
        raise ValueError("trained weights (weights=, --weights) apply to the embedded default model only")
    if kwargs.pop("trained", None) is False:
        raise ValueError("trained=False (--untrained) and weights= (--weights) contradict each other")
    shape = checkpoint.trained_shape(Path(weights))
    model, tokenizer = checkpoint.load_default(**{**shape, **kwargs}, trained=False)
    model.applied_weights = checkpoint.apply_trained_weights(model, weights)
    return MemoryLM(model, tokenizer, name=f"SmolLM2-135M-Instruct + {Path(weights).name}")
