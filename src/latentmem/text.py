"""Text and token helpers shared by every design: padding, chunking, the QA prompt and the
default prompt (``plain_prompt``: what ``generate`` reads when ``chat`` is None).

Written once here so that writing, reading, scoring, training and evaluation all pad, chunk
and prompt the same way.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# The plain question form the shipped memory weights were trained on (the paper's QA format).
PLAIN_QA = "Question: {question} Answer:"
# An answer in that form is one line: generation stops at the first newline.
QA_STOP = ["\n"]


def is_question(text: str) -> bool:
    """Whether ``text`` is a bare question the default prompt wraps in PLAIN_QA: one line that
    ends with '?' and does not already start the QA form."""
    t = text.strip()
    return t.endswith("?") and "\n" not in t and not t.startswith("Question:")


def plain_prompt(text: str) -> tuple[str, list[str]]:
    """The default prompt (``chat=None``) for ``text`` and the stop strings it implies: a bare
    question becomes ``Question: ... Answer:`` with a newline stop, text already ending in
    ``Answer:`` keeps its form and gets the newline stop, anything else is read as given."""
    if is_question(text):
        return PLAIN_QA.format(question=text.strip()), list(QA_STOP)
    if text.rstrip().endswith("Answer:"):
        return text, list(QA_STOP)
    return text, []


def prompt_for(tokenizer, prompt, chat: bool | None) -> tuple[str, list[str]]:
    """What every design's ``generate`` reads, and the stop strings that form implies:
    ``chat=None`` (the default) the plain form the shipped weights were trained on
    (``plain_prompt``: a bare question as ``Question: ... Answer:``, ending at a newline);
    ``chat=False`` the string exactly as given; ``chat=True``, or a list of chat messages, the
    tokenizer's chat template."""
    if isinstance(prompt, list) or chat:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("this tokenizer has no chat template; pass a plain string prompt" if isinstance(prompt, list) else "chat=True but this tokenizer has no chat template")
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), []
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be str or a list of chat messages, got {type(prompt).__name__}")
    return plain_prompt(prompt) if chat is None else (prompt, [])


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
