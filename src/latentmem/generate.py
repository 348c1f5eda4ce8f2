"""Decoding with memory: the prefix keys/values of a memory version are computed once
(``MemoryLLM.memory_prefix``) and copied into a preallocated KV cache per call; each step then
attends to [bos, memory, prompt, generated so far] with one query per row.

A row ends on EOS or a stop string (``finish_reason`` "stop"), at ``max_new_tokens``
("length"), or when the repetition guard sees a degenerate loop ("repetition"; see
``SamplingParams``). Which prompt form a design reads (plain, QA, chat template) is the design's
``chat_prompt``; the stop strings a form implies are added there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .backbone import KV, KVCache


@dataclass
class SamplingParams:
    """How an answer is decoded.

    ``repeat_ngram`` / ``repeat_limit`` guard against degenerate loops (the shipped SmolLM2
    weights otherwise answer ``14 March, 15 March, 16 March, ...`` up to ``max_new_tokens``):
    a row stops with ``finish_reason == "repetition"`` as soon as the newest ``repeat_ngram``
    tokens of its answer have occurred ``repeat_limit`` times in the answer (the prompt is not
    counted). ``repeat_limit=0`` turns the guard off. The guard only ends rows early; it never
    changes which token is chosen, so an answer is a prefix of the unguarded one.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None  # seeds sampling; None draws from torch's global generator
    stop: list[str] = field(default_factory=list)  # stop strings (the match is cut off the text)
    repeat_ngram: int = 4  # n-gram length the repetition guard watches
    repeat_limit: int = 3  # stop when the newest n-gram has occurred this many times; 0 = off

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:  # NaN passes a `< 0` test
            raise ValueError(f"temperature must be >= 0 and finite, got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if self.repeat_ngram < 1:
            raise ValueError(f"repeat_ngram must be >= 1, got {self.repeat_ngram}")
        if self.repeat_limit < 0 or self.repeat_limit == 1:
            raise ValueError(f"repeat_limit must be 0 (off) or >= 2, got {self.repeat_limit}")


class RepetitionGuard:
    """Counts the n-grams of one row's answer; ``push`` says when the newest one has now
    occurred ``limit`` times (a degenerate loop). ``limit=0``: never."""

    def __init__(self, n: int, limit: int):
        self.n, self.limit = n, limit
        self.tokens: list[int] = []
        self.counts: dict[tuple[int, ...], int] = {}

    def push(self, token: int) -> bool:
        if not self.limit:
            return False
        self.tokens.append(token)
        if len(self.tokens) < self.n:
            return False
        gram = tuple(self.tokens[-self.n :])
        self.counts[gram] = self.counts.get(gram, 0) + 1
        return self.counts[gram] >= self.limit


def repetition_stop(tokens: list[int], n: int = 4, limit: int = 3) -> int | None:
    """The number of tokens after which the repetition guard stops ``tokens``, or None."""
    guard = RepetitionGuard(n, limit)
    return next((i + 1 for i, t in enumerate(tokens) if guard.push(t)), None)


def sample_next(logits: Tensor, p: SamplingParams, generator: torch.Generator | None) -> Tensor:
    """Next token per row from logits [B, V]: greedy, or temperature / top-k / top-p sampling."""
    if p.temperature == 0:
        return logits.argmax(-1)
    # the best logit is moved to 0 before dividing, in float64 (where 1e-300 is not 0): a tiny
    # temperature then gives 0 and -inf (greedy in effect), never NaN probabilities (issue 17)
    logits = logits.double()
    logits = ((logits - logits.amax(-1, keepdim=True)) / p.temperature).float()
    if p.top_k:
        kth = logits.topk(min(p.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (always keep the first)
        drop = probs.cumsum(-1) - probs >= p.top_p
        drop[..., 0] = False  # a top_p below float32's resolution (1e-300 reads as 0) would drop all
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu() if generator is not None else probs, 1, generator=generator).view(-1).to(logits.device)


@torch.inference_mode()
def decode(
    model: nn.Module,
    prefix: KV | None,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    params: SamplingParams,
    eos_ids: set[int],
    should_stop: Callable[[Tensor], Tensor] | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (tokens [B], active [B]) per step; a row is inactive after EOS or should_stop.

    ``should_stop(tokens)`` lets the caller end rows on stop strings (it sees text, we see ids).
    """
    B, T = input_ids.shape
    cache = KVCache(prefix, B, T + params.max_new_tokens, model.config, input_ids.device, model.dtype)
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(params.seed)
    logits = model(input_ids, attention_mask, cache=cache, logits_to_keep=1)[:, -1]
    active = torch.ones(B, dtype=torch.bool, device=input_ids.device)
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=input_ids.device)
    for step in range(params.max_new_tokens):
        tokens = sample_next(logits, params, generator)
        yield tokens, active.clone()
        active &= ~torch.isin(tokens, eos)
        if should_stop is not None:
            active &= ~should_stop(tokens)
        if not bool(active.any()) or step == params.max_new_tokens - 1:
            return
        logits = model(tokens[:, None], cache=cache)[:, -1]


class TextStream:
    """Incremental detokenisation with stop strings for one row.

    Text is released only when it can no longer turn into a stop string, so a streaming caller
    never sees characters that the final answer will not contain.
    """

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for more
            return ""
        self.text = text
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
            return self._release(len(self.text))
        # hold back a tail that is a prefix of some stop string
        safe = len(text)
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    safe = min(safe, len(text) - k)
                    break
        return self._release(safe)

    def finish(self) -> str:
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        out = self.text[self.emitted : upto]
        self.emitted = upto
        return out


class Rows:
    """What decoding tracks per row besides its tokens: the text with its stop strings (the
    caller's plus those the row's prompt form implies, e.g. the QA form's newline), the
    repetition guard, and why the row finished. A design's generate loop feeds it every active
    row's token (``push``) and passes ``stopped`` to ``decode``, so rows end alike in every design."""

    def __init__(self, tokenizer, params: SamplingParams, implied_stops: Sequence[Sequence[str]], eos_ids: set[int]):
        self.texts = [TextStream(tokenizer, params.stop + [s for s in implied if s not in params.stop]) for implied in implied_stops]
        self.guards = [RepetitionGuard(params.repeat_ngram, params.repeat_limit) for _ in implied_stops]
        self.finish = ["length"] * len(implied_stops)  # "stop" | "length" | "repetition"
        self.eos_ids = eos_ids

    def push(self, b: int, token: int) -> str:
        """Row ``b``'s next token; returns the text it releases (never a stop string)."""
        if token in self.eos_ids:
            self.finish[b] = "stop"
            return ""
        piece = self.texts[b].push(token)
        if self.texts[b].stopped:
            self.finish[b] = "stop"
        elif self.guards[b].push(token):  # a degenerate loop: end the row (its text is kept)
            self.finish[b] = "repetition"
        return piece

    def stopped(self, tokens: Tensor) -> Tensor:
        """``decode``'s should_stop: rows ended by a stop string or the guard."""
        return torch.tensor([t.stopped or f == "repetition" for t, f in zip(self.texts, self.finish)], device=tokens.device)
