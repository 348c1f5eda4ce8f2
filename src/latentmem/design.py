"""The plumbing every design's ``MemoryModel`` shares, written once: ``DesignLM``.

A design's ``lm.py`` subclasses it and supplies its own steps; this module supplies the loops
around them, so that every design validates, writes, decodes and scores alike:

- ``inject``: every input checked first (memories, texts, ids), each text split into write units
  (``_units``), then rounds of batched writes (``_write_round``: unit r of every text that has
  one, in place, each memory's undo record appended as written), every record undone on any
  error, a progress bar for long texts (``inject_unit``), one ``InjectResult`` per text.
- ``generate`` / ``stream`` / ``generate_batch``: the prompt forms of ``latentmem.text``, left
  padding, ``generate.decode`` over what the design reads with (``_decoder``: the module and KV
  prefix for a batch of memories), stop strings, EOS and the repetition guard
  (``generate.Rows``), streamed pieces, ``Generation`` results; ``stream`` returns its
  ``Generation`` when exhausted (the generator's return value).
- ``score``: the answer tokenised as it continues the prompt, left padding, the log-softmax
  gather over the design's logits (``_logits``).

What stays with the design: its memory type and checks (``state_type``, ``_check_state``), how a
text becomes write units and what one write does (the paper's write), what a batch reads with
(the paper's read), forgetting, attribution, comparison, sizes and diagnostics.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from .api import Generation, InjectionError, InjectResult
from .generate import Rows, SamplingParams, decode
from .text import left_pad, pad_token_id, prompt_for


class DesignLM:
    """The shared half of a design's ``MemoryModel``; the design sets ``model``, ``tokenizer`` and
    ``config`` and implements the hooks below the line in each section."""

    design: ClassVar[str]
    forget_exact: ClassVar[bool]
    state_type: ClassVar[type]  # the design's memory: inject(one of these, text) is one write
    inject_unit: ClassVar[str | None] = None  # what the progress bar counts (None: no bar)

    def __init__(self, model, tokenizer, name: str, model_id: str):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.config = model.config
        self.model_id = model_id  # the design's fingerprint of the weights its memories belong to

    def _check_state(self, state) -> None:
        """Raise ``MemoryFormatError`` when ``state`` is not a memory of this model."""
        raise NotImplementedError

    # ---- tokenisation ----
    def encode(self, text: str) -> list[int]:
        """Token ids of text, no special tokens (a design that needs a BOS adds its own)."""
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

    # ---- writing ----
    def _text_ids(self, text, allow_short: bool) -> list[int]:
        """The tokens of one text to inject, or ``InjectionError`` (not a string, blank, shorter
        than ``config.min_inject_tokens`` unless ``allow_short``: ``_too_short`` says why)."""
        if not isinstance(text, str):
            raise InjectionError(f"text must be str, got {type(text).__name__}")
        if not text.strip():
            raise InjectionError("text is empty or whitespace only: nothing to inject")
        ids = self.encode(text)
        if len(ids) < self.config.min_inject_tokens and not allow_short:
            raise InjectionError(self._too_short(len(ids)))
        return ids

    def _too_short(self, n: int) -> str:
        return f"text has {n} tokens, fewer than the {self.config.min_inject_tokens}-token minimum; pass allow_short=True to inject anyway"

    @torch.no_grad()  # not inference_mode: memories made in it could never be written in place outside it
    def inject(self, memory, text, *, allow_short: bool = False, progress: bool | None = None, injection_id: int | Sequence[int] | None = None) -> InjectResult | list[InjectResult]:
        """Write text into memory, no back-propagation. With lists, memory i receives text i, one
        batched write per round of units. All inputs are validated before anything changes, and
        a failure part-way undoes every write of the call, so an error leaves memories as they were."""
        single = isinstance(memory, self.state_type)
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
        plans = [self._units(t, allow_short) for t in texts]  # (units, tokens, writes) per text
        units = [p[0] for p in plans]
        self._check_units(states, units)
        new_ids = [s.last_injection_id + 1 if g is None else int(g) for s, g in zip(states, ids_given)]

        start = time.perf_counter()
        rounds = max(map(len, units))
        bar = None
        if self.inject_unit is not None and (progress or (progress is None and rounds > 8)):
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(map(len, units)), desc="injecting", unit=self.inject_unit)
        undo: list[tuple[Any, Any]] = []  # (memory, record): writes are in place; this restores them on error
        try:
            for r in range(rounds):
                rows = [i for i, u in enumerate(units) if r < len(u)]
                self._write_round([states[i] for i in rows], [units[i][r] for i in rows], [new_ids[i] for i in rows], undo)
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
        for s, (_, tokens, writes), i in zip(states, plans, new_ids):
            s.last_injection_id = max(s.last_injection_id, i)
            results.append(InjectResult(i, tokens, writes, seconds))
        return results[0] if single else results

    def _units(self, text, allow_short: bool) -> tuple[list, int, int]:
        """One text's write units, in order (unit r is written in round r), its token count and
        the number of writes ``InjectResult.num_chunks`` reports; ``InjectionError`` if it cannot be written."""
        raise NotImplementedError

    def _check_units(self, states: list, units: list[list]) -> None:
        """A last look at a whole call before anything is written (refuse, or warn)."""

    def _write_round(self, states: list, units: list, injection_ids: list[int], undo: list) -> None:
        """Write units[i] into states[i] for every i, in place, appending each memory's
        (memory, undo record) to ``undo`` as soon as it is written (``memory.undo_(record)``)."""
        raise NotImplementedError

    # ---- reading (generation) ----
    def stream(self, memory, prompt: str | list[dict], *, chat: bool | None = None, **sampling) -> Iterator[str]:
        """Yield the answer's text piece by piece (stop strings never leak into the stream);
        exhausted, the generator returns the answer's ``Generation`` (``StopIteration.value``:
        token ids, prompt tokens, finish reason)."""
        return (yield from self._run([memory], [prompt], chat, SamplingParams(**sampling), stream=True))

    def generate(self, memory, prompt: str | list[dict], *, chat: bool | None = None, **sampling) -> Generation:
        return next(self._run([memory], [prompt], chat, SamplingParams(**sampling), stream=False))

    def generate_batch(self, memories, prompts, *, chat: bool | None = None, **sampling) -> list[Generation]:
        """Row i answers prompts[i] from memories[i]; one forward pass per step for all rows."""
        if len(memories) != len(prompts):
            raise ValueError(f"{len(memories)} memories but {len(prompts)} prompts")
        return list(self._run(list(memories), list(prompts), chat, SamplingParams(**sampling), stream=False))

    def _run(self, states, prompts, chat, params: SamplingParams, stream: bool):
        """Decode a batch: with ``stream`` yield row 0's pieces and return its ``Generation``,
        else yield every row's ``Generation``."""
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
        module, prefix = self._decoder(states, prompts)
        t_first = None
        # decode() runs the model in inference mode around each step; no `with` here, or the
        # caller would run in inference mode between the pieces of a stream
        for tokens, active in decode(module, prefix, input_ids.to(dev), None if bool(mask.all()) else mask.to(dev), params, eos_ids, rows.stopped):
            if t_first is None:
                t_first = time.perf_counter()
            for b, (tok, act) in enumerate(zip(tokens.tolist(), active.tolist())):
                if act:
                    piece = rows.push(b, tok)
                    if stream and piece:
                        yield piece
        t_end = time.perf_counter()
        t_first = t_first or t_end
        results = []
        for b, t in enumerate(rows.texts):
            tail = t.finish()
            if stream and b == 0 and tail:
                yield tail
            results.append(Generation(t.text, t.ids, len(encoded[b]), t_first - t0, t_end - t_first, rows.finish[b]))
        if stream:
            return results[0]
        yield from results

    def _decoder(self, states: list, prompts: list) -> tuple[torch.nn.Module, Any]:
        """What a batch decodes with: (the module ``decode`` steps, the KV prefix it starts from,
        or None), row b reading states[b] (None: no memory) for prompts[b]."""
        raise NotImplementedError

    # ---- scoring ----
    @torch.inference_mode()
    def score(self, memories, prompts: Sequence[str], answers: Sequence[str]) -> list[tuple[float, int]]:
        """Teacher-forced log P(answer | memory, prompt) per row: (sum of token log-probs, token count).

        The answer is tokenised as it continues the prompt (``encode(prompt + " " + answer)`` minus
        the prompt's tokens, falling back to encoding " answer" alone when tokenisation merges across
        the boundary). Rows are left-padded and read their own memory in one forward pass.
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
        logits = self._logits(ids.to(dev), None if bool(mask.all()) else mask.to(dev), list(memories), list(prompts))
        logp = torch.log_softmax(logits.float(), -1)
        out = []
        for b, n in enumerate(spans):
            tgt = ids[b, T - n :].to(dev)
            out.append((logp[b, T - n - 1 : T - 1].gather(-1, tgt[:, None]).sum().item(), n))
        return out

    def _logits(self, ids: Tensor, mask: Tensor | None, memories: list, prompts: list) -> Tensor:
        """Logits [B, T, V] of left-padded rows ids [B, T] (mask None: no padding), row b reading
        memories[b] (None: no memory) with prompts[b] its prompt."""
        raise NotImplementedError

    # ---- backbone-editing baselines ----
    def editable_weight(self, layer: int) -> Tensor:
        """For baselines that edit the backbone (FT-L): the live weight [hidden, intermediate] of
        decoder layer ``layer``'s MLP output projection (Llama's ``down_proj``). Writes to it
        change every later call; the caller restores it."""
        layers = self.model.model.layers
        if not 0 <= layer < len(layers):
            raise ValueError(f"layer must be in [0, {len(layers) - 1}], got {layer}")
        return layers[layer].mlp.down_proj.weight


def by_injection(added: Counter, removed: Counter, owner: Callable[[Any], int]) -> tuple[dict[int, int], dict[int, int]]:
    """For ``diff``: the units added and removed (multisets of unit keys) counted per injection
    id (``owner(key)``), in id order: (added_by_injection, removed_by_injection)."""
    per_added, per_removed = Counter(), Counter()
    for key, n in added.items():
        per_added[owner(key)] += n
    for key, n in removed.items():
        per_removed[owner(key)] += n
    return {int(k): v for k, v in sorted(per_added.items())}, {int(k): v for k, v in sorted(per_removed.items())}
