"""Decoding with memory: the prefix keys/values of a memory version are computed once
(``MemoryLLM.memory_prefix``) and copied into a preallocated KV cache per call; each step then
attends to [bos, memory, prompt, generated so far] with one query per row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from torch import nn

from .backbone import KV, KVCache


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    seed: int | None = None  # seeds sampling; None draws from torch's global generator
    stop: list[str] = field(default_factory=list)  # stop strings (the match is cut off the text)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")


def sample_next(logits: Tensor, p: SamplingParams, generator: torch.Generator | None) -> Tensor:
    """Next token per row from logits [B, V]: greedy, or temperature / top-k / top-p sampling."""
    if p.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / p.temperature
    if p.top_k:
        kth = logits.topk(min(p.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (always keep the first)
        drop = probs.cumsum(-1) - probs >= p.top_p
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
