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
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from ..api import ForgetResult, Generation, InjectionError, InjectResult, MemoryInfo
from ..backbone import KV
from ..generate import Rows, SamplingParams, decode
from ..text import chunk_ids, left_pad, pad_token_id, prompt_for
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


class MemoryLM:
    """MemoryLLM's implementation of ``latentmem.api.MemoryModel``."""

    design: ClassVar[str] = "memoryllm"
    # forget() resets the injection's slots, but later injections read those slots while they
    # were written, so traces may remain in theirs: exactness needs a replay (the store's job)
    forget_exact: ClassVar[bool] = False

    def __init__(self, model: MemoryLLM, tokenizer, name: str = "model"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.config = model.config
        self.model_id = model_fingerprint(model)
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

    # ---- tokenisation ----
    def encode(self, text: str) -> list[int]:
        # The tokenizer's BOS is not added: the learned per-layer bos_embedding plays that role.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def chat_prompt(self, prompt: str | list[dict], chat: bool | None) -> str:
        """The text ``generate`` reads: ``chat=None`` (the default) the plain form the shipped
        weights were trained on (``text.plain_prompt``: a bare question is asked as
        ``Question: ... Answer:``); ``chat=False`` the string exactly as given; ``chat=True``, or a
        list of messages, the tokenizer's chat template."""
        return self._prompt(prompt, chat)[0]

    def _prompt(self, prompt: str | list[dict], chat: bool | None) -> tuple[str, list[str]]:
        """(prompt text, the stop strings its form implies: a newline for the QA form)."""
        return prompt_for(self.tokenizer, prompt, chat)

    # ---- writing (self-update) ----
    def chunk(self, ids: list[int]) -> list[list[int]]:
        """Split into near-equal chunks of at most max_inject_tokens (so no tiny last chunk)."""
        return chunk_ids(ids, self.config.max_inject_tokens)

    def _tokens_for_injection(self, text: str, allow_short: bool) -> list[int]:
        if not isinstance(text, str):
            raise InjectionError(f"text must be str, got {type(text).__name__}")
        if not text.strip():
            raise InjectionError("text is empty or whitespace only: nothing to inject")
        ids = self.encode(text)
        if len(ids) < self.config.min_inject_tokens and not allow_short:
            raise InjectionError(
                f"text has {len(ids)} tokens, fewer than the {self.config.min_inject_tokens}-token minimum "
                "(shorter contexts disturb the memory, as the MemoryLLM releases warn); pass allow_short=True to inject anyway"
            )
        return ids

    @torch.no_grad()  # not inference_mode: pools made in it could never be written in place outside it
    def inject(self, memory: MemoryState | Sequence[MemoryState], text: str | Sequence[str], *, allow_short: bool = False, progress: bool | None = None, injection_id: int | Sequence[int] | None = None) -> InjectResult | list[InjectResult]:
        """Write text into memory: one self-update per chunk, chunks in order.

        With lists, pool i receives text i; pools are updated together, one forward pass per
        round of chunks. All inputs are validated before anything changes, and pools are
        committed only after every update succeeded, so an error leaves them untouched.
        """
        single = isinstance(memory, MemoryState)
        states = [memory] if single else list(memory)
        texts = [text] if isinstance(text, str) or single else list(text)
        if len(states) != len(texts):
            raise InjectionError(f"{len(states)} memories but {len(texts)} texts")
        if len({id(s) for s in states}) != len(states):
            raise InjectionError("the same memory appears twice in one batch; inject its texts in sequence")
        ids_given = [injection_id] * len(states) if injection_id is None or isinstance(injection_id, int) else list(injection_id)
        if len(ids_given) != len(states):
            raise InjectionError(f"{len(states)} memories but {len(ids_given)} injection ids")
        for s in states:
            self._check_state(s)
        chunks = [self.chunk(self._tokens_for_injection(t, allow_short)) for t in texts]
        self._warn_capacity(max(map(len, chunks)), max(sum(map(len, c)) for c in chunks), len(chunks))
        new_ids = [s.last_injection_id + 1 if ids_given[i] is None else int(ids_given[i]) for i, s in enumerate(states)]

        start = time.perf_counter()
        rounds = max(len(c) for c in chunks)
        bar = None
        if progress or (progress is None and rounds > 8):
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(len(c) for c in chunks), desc="injecting", unit="chunk")
        undo: list[tuple[MemoryState, tuple]] = []  # updates are in place; this restores them on error
        try:
            for r in range(rounds):
                rows = [i for i, c in enumerate(chunks) if r < len(c)]
                self._update([states[i] for i in rows], [chunks[i][r] for i in rows], [new_ids[i] for i in rows], undo)
                if bar is not None:
                    bar.update(len(rows))
        except BaseException:
            for state, record in reversed(undo):
                state.undo_(record)
            raise
        finally:
            if bar is not None:
                bar.close()
        seconds = time.perf_counter() - start
        results = []
        for s, c, i in zip(states, chunks, new_ids):
            s.last_injection_id = max(s.last_injection_id, i)
            results.append(InjectResult(i, sum(map(len, c)), len(c), seconds))
        return results[0] if single else results

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
            stacklevel=4,  # the caller of inject (past the no_grad wrapper)
        )

    def _update(self, states: list[MemoryState], chunk_ids: list[list[int]], injection_ids: list[int], undo: list | None = None) -> list[tuple[MemoryState, tuple]]:
        """One self-update of each pool, in place (``model.self_update``)."""
        return self_update(self.model, states, chunk_ids, injection_ids, pad_token_id(self.tokenizer), undo)

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

    def stream(self, memory: MemoryState | None, prompt: str | list[dict], *, chat: bool | None = None, **sampling) -> Iterator[str]:
        """Yield the answer's text piece by piece (stop strings never leak into the stream)."""
        yield from self._run([memory], [prompt], chat, SamplingParams(**sampling), stream=True)

    def generate(self, memory: MemoryState | None, prompt: str | list[dict], *, chat: bool | None = None, **sampling) -> Generation:
        return next(self._run([memory], [prompt], chat, SamplingParams(**sampling), stream=False))

    def generate_batch(self, memories: Sequence[MemoryState | None], prompts: Sequence[str | list[dict]], *, chat: bool | None = None, **sampling) -> list[Generation]:
        """Row i answers prompts[i] from memories[i]; one forward pass per step for all rows."""
        if len(memories) != len(prompts):
            raise ValueError(f"{len(memories)} memories but {len(prompts)} prompts")
        return list(self._run(list(memories), list(prompts), chat, SamplingParams(**sampling), stream=False))

    def _run(self, states, prompts, chat, params: SamplingParams, stream: bool):
        for s in states:
            if s is not None:
                self._check_state(s)
        built = [self._prompt(p, chat) for p in prompts]
        encoded = [self.encode(text) for text, _ in built]
        if any(len(e) == 0 for e in encoded):
            raise ValueError("prompt is empty")
        dev = self.model.device
        input_ids, mask = left_pad(encoded, pad_token_id(self.tokenizer))
        eos = self.config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        rows = Rows(self.tokenizer, params, [implied for _, implied in built], eos_ids)  # stop strings, loop guard, finish reasons
        t0 = time.perf_counter()
        prefix = self.prefix(states)
        t_first = None
        # decode() runs the model in inference mode around each step; no `with` here, or the
        # caller would run in inference mode between the pieces of a stream
        for tokens, active in decode(self.model, prefix, input_ids.to(dev), None if bool(mask.all()) else mask.to(dev), params, eos_ids, rows.stopped):
            if t_first is None:
                t_first = time.perf_counter()
            for b, (tok, act) in enumerate(zip(tokens.tolist(), active.tolist())):
                if act:
                    piece = rows.push(b, tok)
                    if stream and piece:
                        yield piece
        t_end = time.perf_counter()
        t_first = t_first or t_end
        if stream:
            tail = rows.texts[0].finish()
            if tail:
                yield tail
            return
        for b, t in enumerate(rows.texts):
            t.finish()
            yield Generation(t.text, t.ids, len(encoded[b]), t_first - t0, t_end - t_first, rows.finish[b])


    # ---- scoring ----
    @torch.inference_mode()
    def score(self, memories: Sequence[MemoryState | None], prompts: Sequence[str], answers: Sequence[str]) -> list[tuple[float, int]]:
        """Teacher-forced log P(answer | memory, prompt) per row: (sum of token log-probs, token count).

        The answer is tokenised as it continues the prompt (``encode(prompt + " " + answer)`` minus
        the prompt's tokens, falling back to encoding " answer" alone when tokenisation merges across
        the boundary). Rows are left-padded and read their own pool's memory in one forward pass.
        """
        if not len(memories) == len(prompts) == len(answers):
            raise ValueError(f"{len(memories)} memories, {len(prompts)} prompts and {len(answers)} answers")
        for s in memories:
            if s is not None:
                self._check_state(s)
        seqs, spans = [], []
        for p, a in zip(prompts, answers):
            p_ids = self.encode(p)
            sep = "" if p.endswith((" ", "\n")) else " "
            full = self.encode(p + sep + a)
            if full[: len(p_ids)] == p_ids and len(full) > len(p_ids):
                a_ids = full[len(p_ids) :]
            else:
                a_ids = self.encode(sep + a)
            if not a_ids:
                raise ValueError(f"answer {a!r} encodes to no tokens")
            seqs.append(p_ids + a_ids)
            spans.append(len(a_ids))
        ids, mask = left_pad(seqs, pad_token_id(self.tokenizer))
        T, dev = ids.shape[1], self.model.device
        logits = self.model(ids.to(dev), None if bool(mask.all()) else mask.to(dev), memory=self.prefix(list(memories)))
        logp = torch.log_softmax(logits.float(), -1)
        out = []
        for b, n in enumerate(spans):
            tgt = ids[b, T - n :].to(dev)
            out.append((logp[b, T - n - 1 : T - 1].gather(-1, tgt[:, None]).sum().item(), n))
        return out

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
            for (_, prov), n in plus.items():
                added[prov] += n
            for (_, prov), n in minus.items():
                removed[prov] += n
        return {
            "changed_units": sum(x["added"] for x in layers),
            "layers": layers,
            "added_by_injection": {int(k): v for k, v in sorted(added.items())},  # -1: reset / never written
            "removed_by_injection": {int(k): v for k, v in sorted(removed.items())},
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

    def editable_weight(self, layer: int) -> Tensor:
        """For baselines that edit the backbone (FT-L): the live weight [hidden, intermediate] of
        decoder layer ``layer``'s MLP output projection (Llama's ``down_proj``). Writes to it
        change every later call; the caller restores it."""
        layers = self.model.model.layers
        if not 0 <= layer < len(layers):
            raise ValueError(f"layer must be in [0, {len(layers) - 1}], got {layer}")
        return layers[layer].mlp.down_proj.weight

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
