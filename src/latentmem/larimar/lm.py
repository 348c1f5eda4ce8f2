"""Larimar behind the shared interface (``latentmem.api.MemoryModel``): text in, text out.

    lm = latentmem.load(design="larimar")        # SmolLM2-135M decoder + all-MiniLM-L6-v2 encoder
    mem = lm.new_memory(seed=0)
    lm.inject(mem, "The Eiffel Tower is located in Rome.")
    lm.generate(mem, "Where is the Eiffel Tower?")
    lm.forget(mem, 1)                              # exact: the memory rewritten without the fact

Writing (``inject``): each text is cut into rows of at most ``max_inject_tokens`` decoder tokens;
each row is encoded to a latent z and written: one-shot (M = W0^+ Z' over every row the memory
holds, the release's direct writing) or sequentially (the Kanerva update per row), as the config
says. Reading (``generate``, ``score``): the prompt is encoded to z_q; when the scope detector
finds it near a written fact, w = z_q M^+, z_r = w M conditions the decoder through per-layer
key/value rows; otherwise the decoder answers without memory.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor

from ..api import ForgetResult, InjectionError, InjectResult, MemoryFormatError, MemoryInfo
from ..backbone import KV
from ..design import DesignLM, by_injection
from ..text import chunk_ids
from . import memory as mm
from .model import Larimar
from .state import LarimarState


def model_fingerprint(model: Larimar) -> str:
    """A short id of the weights and memory shape a memory belongs to (bf16-rounded samples, so
    the same model in another float dtype keeps its id)."""
    cfg = model.config
    h = hashlib.sha256(repr(sorted(cfg.fingerprint().items())).encode())
    tensors = [model.model.embed_tokens.weight, model.model.layers[0].self_attn.q_proj.weight, model.memory_mean, model.encoder_head.weight, model.prefix_proj.weight, model.prefix_gate]
    if model.encoder is not None:
        tensors.append(next(model.encoder.parameters()))
    for t in tensors:
        h.update(t.detach().reshape(-1)[:4096].to("cpu", torch.bfloat16).view(torch.int16).numpy().tobytes())
    return f"larimar-L{cfg.num_hidden_layers}-K{cfg.memory_slots}-C{cfg.latent_size}-{h.hexdigest()[:16]}"


class LarimarLM(DesignLM):
    """Larimar's implementation of ``latentmem.api.MemoryModel`` (the loops around its steps:
    ``latentmem.design.DesignLM``)."""

    design: ClassVar[str] = "larimar"
    # forget() rewrites the memory from the rows it keeps: it then equals, bit for bit, a memory
    # that never received the injection (rows carry their own noise; see memory.row_noise)
    forget_exact: ClassVar[bool] = True
    state_type: ClassVar[type] = LarimarState
    # a text is written in one round (every row of it at once), so inject shows no progress bar

    def __init__(self, model: Larimar, tokenizer, encoder_tokenizer=None, name: str = "model"):
        super().__init__(model, tokenizer, name, model_fingerprint(model))
        self.encoder_tokenizer = encoder_tokenizer if encoder_tokenizer is not None else tokenizer
        model.encoder_tokenizer = self.encoder_tokenizer  # for training recipes, which get the module
        self._pinv = mm.pinv_fn(self.config.pinv, self.config.pinv_steps, self.config.pinv_alpha)
        self._M0_cache: tuple | None = None
        enc_cfg = getattr(model.encoder, "config", None)
        self.encoder_max_length = min(256, getattr(enc_cfg, "max_position_embeddings", None) or self.config.max_position_embeddings)
        self.last_reads: list[dict] = []
        self._embed_cache: dict = {}  # text -> e (a query is asked of many memories)  # per row of the last read: query, distance to the nearest fact, read or not

    # ---- the prior ----
    def prior(self) -> tuple[Tensor, Tensor, Tensor]:
        """(M0, M0^+, U0) in float64; M0^+ is computed once per value of the prior."""
        p = self.model.memory_mean
        key = (p.data_ptr(), p._version)
        if self._M0_cache is None or self._M0_cache[0] != key:
            M0 = p.detach().to("cpu", torch.float64).clone()
            K = M0.shape[0]
            U0 = torch.eye(K, dtype=torch.float64) * self.config.prior_variance if self.config.write_mode == "sequential" else torch.zeros(0, 0, dtype=torch.float64)
            self._M0_cache = (key, M0, self._pinv(M0), U0)
        return self._M0_cache[1:]

    # ---- memories ----
    def new_memory(self, seed: int = 0) -> LarimarState:
        M0, _, U0 = self.prior()
        return LarimarState.empty(M0, U0, self._encoder_size, seed=seed, model_id=self.model_id)

    @property
    def _encoder_size(self) -> int:
        return self.model.encoder_head.in_features

    def load_memory(self, path) -> LarimarState:
        c = self.config
        return LarimarState.load(path, expect_shape=(c.memory_slots, c.latent_size, self._encoder_size), expect_model_id=self.model_id)

    def _check_state(self, s) -> None:
        if not isinstance(s, LarimarState):
            raise MemoryFormatError(f"not a Larimar memory: {type(s).__name__}")
        c = self.config
        if tuple(s.M.shape) != (c.memory_slots, c.latent_size):
            raise MemoryFormatError(f"memory of shape {tuple(s.M.shape)} does not fit this model ({c.memory_slots}, {c.latent_size})")
        if s.model_id != self.model_id:
            raise MemoryFormatError(f"memory was made for model {s.model_id!r}, this model is {self.model_id!r}")

    # encode, chat_prompt, inject, generate, stream, score: DesignLM's

    # ---- the encoder ----
    @torch.no_grad()
    def embed(self, texts: Sequence[str]) -> Tensor:
        """Unit sentence embeddings e [n, D] (float32, CPU) of texts, encoded one at a time (the
        same text always gives the same bits, batched or not)."""
        out = []
        key = (self.model.encoder_head.weight._version, str(self.model.device), self.model.dtype)
        if self._embed_cache.get("key") != key:  # weights changed (training): forget old results
            self._embed_cache = {"key": key}
        for t in texts:
            e = self._embed_cache.get(t)
            if e is None:
                enc = self.encoder_tokenizer([t], return_tensors="pt", truncation=True, max_length=self.encoder_max_length, padding=False)
                ids = enc["input_ids"].to(self.model.device)
                e = self.model.embed(ids, torch.ones_like(ids, dtype=torch.bool)).cpu()
                if len(self._embed_cache) > 4096:  # bounded: queries repeat across memories, texts rarely
                    self._embed_cache = {"key": key}
                self._embed_cache[t] = e
            out.append(e)
        return torch.cat(out) if out else torch.zeros(0, self._encoder_size)

    @torch.no_grad()
    def latents(self, e: Tensor) -> Tensor:
        """z = head(e) [n, C], float64."""
        return self.model.latent(e.to(self.model.device)).to("cpu", torch.float64)

    # ---- writing ----
    def chunk_texts(self, text: str, allow_short: bool) -> tuple[list[str], int]:
        """(rows' texts, decoder tokens): one row per chunk of at most max_inject_tokens."""
        ids = self._text_ids(text, allow_short)
        chunks = chunk_ids(ids, self.config.max_inject_tokens)
        texts = [text] if len(chunks) == 1 else [self.tokenizer.decode(c) for c in chunks]
        return texts, len(ids)

    def _too_short(self, n: int) -> str:
        return f"text has {n} tokens, fewer than the {self.config.min_inject_tokens}-token minimum of a fact; pass allow_short=True to inject anyway"

    def _units(self, text, allow_short: bool) -> tuple[list[list[str]], int, int]:
        """``inject`` writes a text's rows (one per chunk) in one write: a single unit."""
        rows, tokens = self.chunk_texts(text, allow_short)
        return [rows], tokens, len(rows)

    def _check_units(self, states: list[LarimarState], units: list[list[list[str]]]) -> None:
        for s, (r,) in zip(states, units):
            if s.rows + len(r) > self.config.max_rows:
                raise InjectionError(f"memory holds {s.rows} rows; {len(r)} more exceed max_rows={self.config.max_rows} (forget some, or load with a larger max_rows)")

    def _write_round(self, states: list[LarimarState], rows: list[list[str]], injection_ids: list[int], undo: list) -> None:
        """Each memory's rows encoded, noised and written (``_write``), then committed; the
        memory before is the undo record."""
        for s, r, i in zip(states, rows, injection_ids):
            e = self.embed(r)
            z = self.latents(e)
            z = z + torch.stack([mm.row_noise(s.seed, i, k, z.shape[1], self.config.write_noise_std) for k in range(len(r))])
            new = self._write(s, z, e, i)
            undo.append((s, s.clone(deep=False)))
            s.assign(new)

    def _write(self, state: LarimarState, z: Tensor, keys: Tensor, injection_id: int) -> LarimarState:
        """A new state: ``state`` plus rows z [m, C] (noised) with embeddings keys [m, D], written
        by the config's rule. ``state`` itself is not changed."""
        new = state.clone(deep=False)
        m = z.shape[0]
        new.z = torch.cat([state.z, z])
        new.keys = torch.cat([state.keys, keys.to(state.keys.dtype)])
        new.owners = torch.cat([state.owners, torch.full((m,), injection_id, dtype=torch.long)])
        new.chunks = torch.cat([state.chunks, torch.arange(m, dtype=torch.long)])
        if self.config.write_mode == "sequential":
            new.M, new.U, W = mm.write_sequential(state.M, state.U, z, self.config.observation_noise_std**2, self._pinv)
            new.w = torch.cat([state.w, W])
        else:
            new.M, new.w = self._oneshot(new.z)
        new.update_count = state.update_count + m
        new.last_injection_id = max(state.last_injection_id, injection_id)
        new.version = state.version + 1
        return new

    def _oneshot(self, Z: Tensor) -> tuple[Tensor, Tensor]:
        M0, M0_pinv, _ = self.prior()
        return mm.write_oneshot(M0, Z, self._pinv, M0_pinv), Z @ M0_pinv

    def rewrite(self, state: LarimarState, keep: Tensor) -> LarimarState:
        """A new state holding only the rows where ``keep`` [n] is True, written from the prior
        again as if the others had never been (one-shot: one solve; sequential: the kept rows'
        updates in their order)."""
        M0, _, U0 = self.prior()
        new = state.clone(deep=False)
        new.z, new.keys, new.owners, new.chunks = state.z[keep], state.keys[keep], state.owners[keep], state.chunks[keep]
        if self.config.write_mode == "sequential":
            new.M, new.U, new.w = mm.write_sequential(M0, U0, new.z, self.config.observation_noise_std**2, self._pinv)
        else:
            new.M, new.w = self._oneshot(new.z)
        new.update_count = int(new.owners.shape[0])
        new.last_injection_id = int(new.owners.max()) if new.owners.numel() else 0
        new.version = state.version + 1
        return new

    # ---- forgetting ----
    def forget(self, memory: LarimarState, injection_id: int) -> ForgetResult:
        """Exact selective forgetting: the memory rewritten without the injection's rows. It then
        equals a memory that never received it (``last_injection_id`` is the newest id it still
        holds, as in that memory)."""
        self._check_state(memory)
        drop = memory.owners == injection_id
        removed = int(drop.sum())
        memory.assign(self.rewrite(memory, ~drop))
        return ForgetResult(int(injection_id), exact=True, removed_units=removed)

    def forget_fast(self, memory: LarimarState, injection_id: int) -> ForgetResult:
        """The paper's negative-weight update (sequential writing): each of the injection's rows is
        written again with alpha = -1 and the addressing it was written with, newest first. What
        it leaves behind: rounding, and the rows written after it were addressed through a memory
        that held it (their w and updates differ from a memory that never had it). With one-shot
        writing the rewrite is a single solve, so this is ``forget``."""
        self._check_state(memory)
        if self.config.write_mode != "sequential":
            return self.forget(memory, injection_id)
        drop = memory.owners == injection_id
        M, U = memory.M, memory.U
        for r in reversed(drop.nonzero()[:, 0].tolist()):
            M, U = mm.sequential_update(M, U, memory.w[r], memory.z[r], self.config.observation_noise_std**2, alpha=-1.0)
        new = memory.clone(deep=False)
        keep = ~drop
        new.M, new.U = M, U
        new.z, new.keys, new.w, new.owners, new.chunks = memory.z[keep], memory.keys[keep], memory.w[keep], memory.owners[keep], memory.chunks[keep]
        new.update_count, new.version = int(keep.sum()), memory.version + 1
        later = int((memory.owners[keep] > injection_id).sum())
        memory.assign(new)
        note = "negative-weight update: rounding remains" + (f"; {later} later rows were addressed through a memory that held it" if later else "")
        return ForgetResult(int(injection_id), exact=False, removed_units=int(drop.sum()), note=note)

    def redact(self, memory: LarimarState, injection_id: int, replacement: str, *, allow_short: bool = False) -> InjectResult:
        """Leakage prevention: forget an injection and write a replacement ("censored") answer in
        its place, as one change (the memory is unchanged when either step fails)."""
        self._check_state(memory)
        work = memory.clone()
        self.forget(work, injection_id)
        result = self.inject(work, replacement, allow_short=allow_short)
        memory.assign(work)
        return result

    # ---- the scope detector and the read ----
    def scope(self, memory: LarimarState, query: str) -> tuple[bool, float]:
        """(in scope, cosine distance of the query's embedding to the nearest written fact)."""
        self._check_state(memory)
        return self._scope(memory, self.embed([query])[0])

    def _scope(self, memory: LarimarState, e_q: Tensor) -> tuple[bool, float]:
        if memory.rows == 0:
            return False, float("inf")
        dist = float(1 - (memory.keys.double() @ e_q.double()).max())
        t = self.config.scope_threshold
        return (t is None or dist < t), dist

    def m_pinv(self, memory: LarimarState) -> Tensor:
        """M^+ of this memory version (computed once per version)."""
        if memory.cache is None or memory.cache[0] != (memory.version, id(memory.M)):
            memory.cache = ((memory.version, id(memory.M)), self._pinv(memory.M))
        return memory.cache[1]

    @torch.no_grad()
    def readout(self, memory: LarimarState, query: str) -> Tensor:
        """z_r [C] (float64) of a query: w = z_q M^+, z_r = w M (or the recursive search)."""
        return self._read(memory, self.latents(self.embed([query]))[0])

    def _read(self, memory: LarimarState, z_q: Tensor) -> Tensor:
        c = self.config
        group = c.recursive_group or c.memory_slots
        if c.read_mode == "recursive" and memory.rows > group:
            M0, M0_pinv, _ = self.prior()
            return mm.read_recursive(z_q, memory.z, M0, self._pinv, group, M0_pinv)
        return mm.read(z_q, memory.M, self.m_pinv(memory))

    @torch.no_grad()
    def prefix(self, states: Sequence[LarimarState | None], queries: Sequence[str]) -> KV | None:
        """The decoder's memory rows for a batch: row b reads states[b] with queries[b] when in scope."""
        reads = []
        z_r = torch.zeros(len(states), self.config.latent_size, dtype=torch.float64)
        valid = torch.zeros(len(states), dtype=torch.bool)
        for b, (s, q) in enumerate(zip(states, queries)):
            info = {"query": q, "distance": None, "read": False}
            if s is not None and s.rows:
                e_q = self.embed([q])
                info["read"], info["distance"] = self._scope(s, e_q[0])
                if info["read"]:
                    z_r[b] = self._read(s, self.latents(e_q)[0])
                    valid[b] = True
            reads.append(info)
        self.last_reads = reads
        if not bool(valid.any()):
            return None
        return self.model.memory_prefix(z_r.to(self.model.device), valid)

    @staticmethod
    def _query_text(prompt: str | list[dict]) -> str:
        if isinstance(prompt, list):
            users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
            return users[-1] if users else (prompt[-1].get("content", "") if prompt else "")
        return prompt

    # ---- generation and scoring: the read's query is what the user asked (not the template
    # around it) ----
    def _decoder(self, states, prompts):
        return self.model, self.prefix(states, [self._query_text(p) for p in prompts])

    def _logits(self, ids: Tensor, mask: Tensor | None, memories, prompts) -> Tensor:
        return self.model(ids, mask, memory=self.prefix(memories, prompts))

    # ---- attribution, comparison, sizes ----
    def owners(self, memory: LarimarState) -> Tensor:
        """[n] the injection id of each written row, in writing order."""
        return memory.owners.clone()

    def differences(self, a: LarimarState, b: LarimarState) -> list[str]:
        out = []
        for name in ("z", "keys", "w", "owners", "chunks", "M", "U"):
            ta, tb = getattr(a, name), getattr(b, name)
            if ta.shape != tb.shape:
                out.append(f"{name}: shape {tuple(ta.shape)} vs replay {tuple(tb.shape)}")
            elif not torch.equal(ta, tb):
                out.append(f"{name}: {int((ta != tb).reshape(ta.shape[0], -1).any(-1).sum()) if ta.dim() else 1} rows differ (max |diff| {float((ta.double() - tb.double()).abs().max()):.3g})")
        for f in ("seed", "update_count", "last_injection_id", "model_id"):
            if getattr(a, f) != getattr(b, f):
                out.append(f"{f}: live {getattr(a, f)!r} vs replay {getattr(b, f)!r}")
        return out

    def diff(self, a: LarimarState, b: LarimarState) -> dict:
        """Rows in b and not in a (added) and the reverse (removed), by injection, and how much M
        moved (a one-shot write changes every slot of M)."""
        def rows(s):
            return Counter(zip(s.owners.tolist(), s.chunks.tolist(), map(bytes, s.z.contiguous().view(torch.uint8).reshape(s.rows, -1).numpy())))
        ra, rb = rows(a), rows(b)
        plus, minus = rb - ra, ra - rb
        added_by, removed_by = by_injection(plus, minus, lambda key: key[0])
        base = float(a.M.norm())
        return {
            "changed_units": sum(plus.values()) + sum(minus.values()),
            "added_by_injection": added_by,
            "removed_by_injection": removed_by,
            "memory_change": float((b.M - a.M).norm() / base) if base else None,  # relative Frobenius change of M
        }

    def info(self, memory: LarimarState | None = None) -> MemoryInfo:
        c = self.config
        if memory is not None:
            self._check_state(memory)
        nbytes = sum(t.numel() * t.element_size() for t in memory.tensors().values()) if memory is not None else 0
        item = self.model.dtype.itemsize
        kv_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * item
        written = memory is not None and memory.rows > 0
        read_cache = c.prefix_tokens * kv_per_token if written else 0
        details = {
            "layers": c.num_hidden_layers,
            "hidden_size": c.hidden_size,
            "K": c.memory_slots,
            "C": c.latent_size,
            "D": self._encoder_size,
            "encoder": c.encoder,
            "write_mode": c.write_mode,
            "pinv": c.pinv,
            "pinv_steps": c.pinv_steps,
            "prefix_tokens": c.prefix_tokens,
            "scope_threshold": c.scope_threshold,
            "min_inject_tokens": c.min_inject_tokens,
            "max_inject_tokens": c.max_inject_tokens,
            # a one-shot write reproduces up to K rows exactly (E <= K: W0 M = Z'); beyond K the
            # least-squares fit shares the K slots, and max_rows is the hard limit
            "capacity_updates": min(c.memory_slots, c.max_rows),
            "capacity_tokens": min(c.memory_slots, c.max_rows) * c.max_inject_tokens,
            "max_rows": c.max_rows,
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "dtype": str(self.model.dtype).replace("torch.", ""),
            "device": str(self.model.device),
            "context_window": c.max_position_embeddings,
            "weights_bytes": sum(t.numel() * t.element_size() for t in [*self.model.parameters(), *self.model.buffers()]),
            "kv_bytes_per_token": kv_per_token,
            "read_cache_bytes": read_cache,
            # M and M^+ (float64) besides the prefix rows
            "read_state_bytes": 2 * memory.M.numel() * 8 + read_cache if written else 0,
            "applied_weights": getattr(self.model, "applied_weights", None),
        }
        return MemoryInfo(
            design=self.design, model=self.name, model_id=self.model_id, unit="memory row",
            capacity_units=c.max_rows, used_units=memory.rows if memory is not None else 0, memory_bytes=nbytes,
            update_count=memory.update_count if memory is not None else 0,
            last_injection_id=memory.last_injection_id if memory is not None else 0, details=details,
        )

    def health(self, memory: LarimarState, previous=None, *, since_injection: int = 0) -> tuple[dict, tuple]:
        """Numbers of M under long runs of writes: NaN/Inf count, mean slot norm, largest value,
        relative drift since ``previous``, share of rows new since then, share of rows by
        injections after ``since_injection``; plus the condition of M's written part."""
        self._check_state(memory)
        M = memory.M.double()
        finite = torch.isfinite(M)
        safe = torch.where(finite, M, torch.zeros_like(M))
        drift = rewritten = None
        keys = set(zip(memory.owners.tolist(), memory.chunks.tolist()))
        if previous is not None:
            prev_M, prev_keys = previous
            if float(prev_M.norm()) > 0 and len(prev_keys):
                drift = float((safe - prev_M).norm() / prev_M.norm())
            rewritten = (len(keys - prev_keys) / len(keys)) if keys else 0.0
        replaced = float((memory.owners > since_injection).double().mean()) if memory.rows else 0.0
        s = torch.linalg.svdvals(safe) if memory.rows else torch.zeros(1, dtype=torch.float64)
        return {
            "mean_norm": round(float(safe.norm(dim=-1).mean()), 6),
            "max_abs": round(float(safe.abs().max()), 6),
            "nonfinite": int((~finite).sum()),
            "drift": None if drift is None else round(drift, 6),
            "rewritten_since_last_check": None if rewritten is None else round(rewritten, 6),
            "replaced_since_start": round(replaced, 6),
            "rows": memory.rows,
            "singular_max": round(float(s.max()), 6),
            "rank": int((s > s.max() * mm.EXACT_RTOL).sum()) if memory.rows else 0,
        }, (safe.clone(), keys)

    def backbone_logits(self, ids: Sequence[int]) -> Tensor:
        with torch.enable_grad():
            return self.model(torch.tensor([list(ids)], device=self.model.device))[0]


def load(path=None, **options) -> LarimarLM:
    """Larimar over a local HF Llama-family folder, or the embedded SmolLM2-135M default when
    path is None; the encoder is all-MiniLM-L6-v2 (``encoder="decoder"``: the decoder's pooled
    states). See ``latentmem.larimar.loading.load`` for the options."""
    from .loading import load_model

    model, tokenizer, enc_tokenizer, name = load_model(path, **options)
    return LarimarLM(model, tokenizer, enc_tokenizer, name=name)
