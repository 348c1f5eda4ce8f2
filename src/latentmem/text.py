"""Text and token helpers shared by every design: padding, chunking, the QA prompt.

Written once here so that writing, reading, scoring, training and evaluation all pad, chunk
and prompt the same way.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# The plain question form the shipped memory weights were trained on (the paper's QA format).
PLAIN_QA = "Question: {question} Answer:"


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else 0 (padded positions are masked, so the id is never read)."""
    pad = getattr(tokenizer, "pad_token_id", None)
    return pad if pad is not None else 0


def left_pad(rows: list[list[int]], pad: int, device=None) -> tuple[Tensor, Tensor]:
    """Token rows -> (ids [B, T], mask [B, T] bool), padded on the left so that every row's
    last token sits at position T - 1 (what decoding and "the last K positions" rely on)."""
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, r in enumerate(rows):
        if r:
            ids[b, T - len(r) :] = torch.as_tensor(r, dtype=torch.long)
            mask[b, T - len(r) :] = True
    return (ids, mask) if device is None else (ids.to(device), mask.to(device))


def chunk_ids(ids: list[int], limit: int) -> list[list[int]]:
    """Split into near-equal chunks of at most ``limit`` tokens (so no tiny last chunk)."""
    n = max(1, math.ceil(len(ids) / limit))
    size, extra = divmod(len(ids), n)  # the first `extra` chunks get one token more
    bounds = [i * size + min(i, extra) for i in range(n + 1)]
    return [ids[a:b] for a, b in zip(bounds, bounds[1:])]


def qa_prompt(lm, question: str, style: str = "plain", context: str | None = None) -> str:
    """The question as a model of ``lm`` is asked it: ``plain`` is the trained form
    ("Context: ...\\n" when given, then "Question: ... Answer:"); ``chat`` (or ``auto`` when the
    tokenizer has a chat template) a chat turn asking for a brief answer."""
    if style == "plain":
        return (f"Context: {context}\n" if context else "") + PLAIN_QA.format(question=question)
    return format_prompt(lm, (f"{context}\n\n" if context else "") + f"Answer briefly: {question}", style)


def format_prompt(lm, text: str, style: str) -> str:
    """``plain``: the text as is; ``chat``: the tokenizer's chat template; ``auto``: chat when the
    tokenizer has a template."""
    if style == "plain":
        return text
    has = getattr(lm.tokenizer, "chat_template", None) is not None
    if style == "chat" or (style == "auto" and has):
        return lm.chat_prompt(text, True)
    if style == "auto":
        return text
    raise ValueError(f"prompt style must be plain, chat or auto, got {style!r}")
