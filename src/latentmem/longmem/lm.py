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
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import ClassVar

import torch
from torch import Tensor

from ..api import ForgetResult, Generation, InjectionError, InjectResult, MemoryFormatError, MemoryInfo
from ..generate import RepetitionGuard, SamplingParams, TextStream, decode
from ..text import left_pad, pad_token_id, plain_prompt
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


class LongMemLM:
    """LongMem's implementation of ``latentmem.api.MemoryModel``."""

    design: ClassVar[str] = "longmem"
    # a chunk's keys depend only on its own segment, so removing an injection's chunks leaves
    # the bank one that never received it (ForgetResult.exact is False only after evictions)
    forget_exact: ClassVar[bool] = True

    def __init__(self, model: LongMem, tokenizer, name: str = "model"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.config = model.config
        self.model_id = model_fingerprint(model)

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

    # ---- tokenisation ----
    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def chat_prompt(self, prompt: str | list[dict], chat: bool | None) -> str:
        """The text ``generate`` reads: ``chat=None`` the plain form (``text.plain_prompt``: a bare
        question asked as ``Question: ... Answer:``); ``chat=False`` the string as given;
        ``chat=True``, or a list of messages, the tokenizer's chat template (as every design)."""
        return self._prompt(prompt, chat)[0]

    def _prompt(self, prompt: str | list[dict], chat: bool | None) -> tuple[str, list[str]]:
        """(prompt text, the stop strings its form implies: a newline for the QA form)."""
        if isinstance(prompt, list) or chat:
            if getattr(self.tokenizer, "chat_template", None) is None:
                raise ValueError("this tokenizer has no chat template; pass a plain string prompt" if isinstance(prompt, list) else "chat=True but this tokenizer has no chat template")
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), []
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be str or a list of chat messages, got {type(prompt).__name__}")
        return plain_prompt(prompt) if chat is None else (prompt, [])

    # ---- writing ----
    def _tokens_for_injection(self, text, allow_short: bool) -> list[int]:
        if not isinstance(text, str):
            raise InjectionError(f"text must be str, got {type(text).__name__}")
        if not text.strip():
            raise InjectionError("text is empty or whitespace only: nothing to inject")
        ids = self.encode(text)
        if len(ids) < self.config.min_inject_tokens and not allow_short:
            raise InjectionError(f"text has {len(ids)} tokens, fewer than one chunk ({self.config.min_inject_tokens}); pass allow_short=True to inject anyway")
        if not ids:
            raise InjectionError("text encodes to no tokens")
        return ids

    @torch.no_grad()
    def inject(self, memory, text, *, allow_short: bool = False, progress: bool | None = None, injection_id=None):
        """Write text into the bank: one backbone pass per segment, segments in order; with lists,
        bank i receives text i, one pass per round of segments. Everything is validated first and
        a failure part-way undoes every write of the call."""
        single = isinstance(memory, LongMemState)
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
        c = self.config
        segs = [segments(self._tokens_for_injection(t, allow_short), c.max_inject_tokens, c.chunk_size) for t in texts]
        new_ids = [s.last_injection_id + 1 if ids_given[i] is None else int(ids_given[i]) for i, s in enumerate(states)]
        start = time.perf_counter()
        rounds = max(map(len, segs))
        bar = None
        if progress or (progress is None and rounds > 8):
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(map(len, segs)), desc="injecting", unit="segment")
        undo: list = []
        try:
            for r in range(rounds):
                rows = [i for i, sg in enumerate(segs) if r < len(sg)]
                self._write([states[i] for i in rows], [segs[i][r] for i in rows], [new_ids[i] for i in rows], undo)
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
        for s, sg, i in zip(states, segs, new_ids):
            s.last_injection_id = max(s.last_injection_id, i)
            results.append(InjectResult(i, sum(map(len, sg)), len(sg), seconds))
        return results[0] if single else results

    def _write(self, states: list[LongMemState], segs: list[list[int]], injection_ids: list[int], undo: list) -> list:
        """One segment into each bank (``write_segments``)."""
        return write_segments(self.model, states, segs, injection_ids, pad_token_id(self.tokenizer), undo)

    # ---- reading ----
    def reader(self, states: Sequence[LongMemState | None]):
        """The memory read of a batch of banks (None when none holds anything)."""
        c = self.config
        return read_banks(list(states), c.chunk_size, c.memory_chunks, c.retrieval, c.faiss_min_chunks)

    def stream(self, memory, prompt, *, chat=None, **sampling) -> Iterator[str]:
        yield from self._run([memory], [prompt], chat, SamplingParams(**sampling), stream=True)

    def generate(self, memory, prompt, *, chat=None, **sampling) -> Generation:
        return next(self._run([memory], [prompt], chat, SamplingParams(**sampling), stream=False))

    def generate_batch(self, memories, prompts, *, chat=None, **sampling) -> list[Generation]:
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
        # each row's stop strings: the caller's plus those its prompt form implies (QA: newline)
        texts = [TextStream(self.tokenizer, params.stop + [x for x in implied if x not in params.stop]) for _, implied in built]
        guards = [RepetitionGuard(params.repeat_ngram, params.repeat_limit) for _ in encoded]
        finish = ["length"] * len(encoded)
        t0 = time.perf_counter()
        decoder = self.model.decoder(self.reader(states))

        def stopped(tokens: Tensor) -> Tensor:
            return torch.tensor([t.stopped or f == "repetition" for t, f in zip(texts, finish)], device=tokens.device)

        t_first = None
        for tokens, active in decode(decoder, None, input_ids.to(dev), None if bool(mask.all()) else mask.to(dev), params, eos_ids, stopped):
            if t_first is None:
                t_first = time.perf_counter()
            for b, (tok, act) in enumerate(zip(tokens.tolist(), active.tolist())):
                if not act:
                    continue
                if tok in eos_ids:
                    finish[b] = "stop"
                    continue
                piece = texts[b].push(tok)
                if texts[b].stopped:
                    finish[b] = "stop"
                elif guards[b].push(tok):  # a degenerate loop: end the row (its text is kept)
                    finish[b] = "repetition"
                if stream and piece:
                    yield piece
        t_end = time.perf_counter()
        t_first = t_first or t_end
        if stream:
            tail = texts[0].finish()
            if tail:
                yield tail
            return
        for b, t in enumerate(texts):
            t.finish()
            yield Generation(t.text, t.ids, len(encoded[b]), t_first - t0, t_end - t_first, finish[b])

    @torch.inference_mode()
    def score(self, memories, prompts, answers) -> list[tuple[float, int]]:
        """Teacher-forced log P(answer | memory, prompt) per row (sum of token log-probs, tokens);
        the answer tokenised as it continues the prompt (as MemoryLLM's ``score``)."""
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
            a_ids = full[len(p_ids) :] if full[: len(p_ids)] == p_ids and len(full) > len(p_ids) else self.encode(sep + a)
            if not a_ids:
                raise ValueError(f"answer {a!r} encodes to no tokens")
            seqs.append(p_ids + a_ids)
            spans.append(len(a_ids))
        ids, mask = left_pad(seqs, pad_token_id(self.tokenizer))
        T, dev = ids.shape[1], self.model.device
        logits = self.model(ids.to(dev), None if bool(mask.all()) else mask.to(dev), read=self.reader(list(memories)))
        logp = torch.log_softmax(logits.float(), -1)
        out = []
        for b, n in enumerate(spans):
            tgt = ids[b, T - n :].to(dev)
            out.append((logp[b, T - n - 1 : T - 1].gather(-1, tgt[:, None]).sum().item(), n))
        return out

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
        added, removed = Counter(), Counter()
        for (_, _, o), n in plus.items():
            added[o] += n
        for (_, _, o), n in minus.items():
            removed[o] += n
        return {
            "changed_units": sum(plus.values()),
            "added": sum(plus.values()),
            "removed": sum(minus.values()),
            "added_by_injection": {int(k): v for k, v in sorted(added.items())},
            "removed_by_injection": {int(k): v for k, v in sorted(removed.items())},
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

    def editable_weight(self, layer: int) -> Tensor:
        layers = self.model.model.layers
        if not 0 <= layer < len(layers):
            raise ValueError(f"layer must be in [0, {len(layers) - 1}], got {layer}")
        return layers[layer].mlp.down_proj.weight

    def backbone_logits(self, ids: Sequence[int]) -> Tensor:
        with torch.enable_grad():
            return self.model.backbone_logits(torch.tensor([list(ids)], device=self.model.device))[0]


def load(path=None, **kwargs) -> LongMemLM:
    """A LongMemLM over a local Llama-family folder, or the embedded SmolLM2-135M when path is None."""
    from . import checkpoint

    model, tokenizer = checkpoint.load(path, **kwargs)
    return LongMemLM(model, tokenizer, name=str(path) if path else "SmolLM2-135M-Instruct (embedded default)")
