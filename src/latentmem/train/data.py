"""Training data: local text corpora and QA rows, tokenised once, sampled deterministically.

Sources (``text_data`` / ``qa_data`` in the config) are a shared dataset name
(``wikipedia_articles``), a ``.jsonl`` / ``.json`` file, a ``.txt`` file (documents separated by
blank lines), a ``.parquet`` file, or a folder saved with Hugging Face ``datasets``
(``Dataset.save_to_disk``). Text rows use the field ``text`` (else ``content``); QA rows
``question`` / ``context`` / ``answer``.

Rows whose id is held out (``latentmem.eval.data.is_heldout``) are never trained on; the
evaluation of the trained model uses exactly those rows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from ..text import PLAIN_QA
from ..eval.data import DataError, is_heldout, read_jsonl, resolve, row_answers

MIN_CONTEXT_TOKENS = 16  # the releases warn that shorter contexts disturb the memory


@dataclass
class QARow:
    id: str
    context: list[int]  # injected into memory
    prompt: list[int]  # "Question: ... Answer:" (read with memory)
    answer: list[int]  # the tokens the loss is on


@dataclass
class TrainData:
    """Tokenised documents (for the language-modelling routines) and QA rows."""

    docs: list[list[int]] = field(default_factory=list)
    qa: list[QARow] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._long_enough: dict[int, tuple[list[int], list[int]]] = {}

    def segments(self, rng: random.Random, lengths: list[int], exclude: int | None = None) -> tuple[int, list[list[int]]]:
        """(doc index, consecutive pieces of the given lengths) from one document, drawn with
        probability proportional to its length (every token equally likely to start a piece)."""
        need = sum(lengths)
        if need not in self._long_enough:
            idx = [i for i, d in enumerate(self.docs) if len(d) >= need]
            self._long_enough[need] = (idx, [len(self.docs[i]) - need + 1 for i in idx])
        idx, weights = self._long_enough[need]
        if not idx or (exclude is not None and idx == [exclude]):
            raise DataError(f"no training document has the {need} tokens this routine needs; lower segment_max or the number of segments")
        while True:
            i = rng.choices(idx, weights)[0]
            if i != exclude:
                break
        start = rng.randrange(len(self.docs[i]) - need + 1)
        pieces, pos = [], start
        for n in lengths:
            pieces.append(self.docs[i][pos : pos + n])
            pos += n
        return i, pieces


def _rows(source: str) -> list[dict]:
    """Rows of a local source as dicts; an ``id`` is made up when the source has none."""
    path = Path(source)
    if path.is_dir():
        try:
            from datasets import load_from_disk
        except ImportError as e:
            raise DataError(f"{path} is a folder: reading a Hugging Face dataset needs `pip install datasets`") from e
        ds = load_from_disk(str(path))
        if hasattr(ds, "keys") and "train" in ds:
            ds = ds["train"]
        rows = [dict(r) for r in ds]
    elif path.suffix == ".txt":
        blocks = [b.strip() for b in path.read_text(encoding="utf-8").split("\n\n")]
        rows = [{"text": b} for b in blocks if b]
    elif path.suffix == ".parquet":
        try:
            import pandas as pd
        except ImportError as e:
            raise DataError(f"reading {path} needs pandas and pyarrow") from e
        rows = pd.read_parquet(path).to_dict("records")
    else:
        rows = read_jsonl(resolve(source))
    stem = path.stem
    return [{**r, "id": str(r.get("id", r.get("_id", f"{stem}:{i}")))} for i, r in enumerate(rows)]


def load_train_data(cfg, tokenizer, split: str = "train") -> TrainData:
    """Tokenised training rows (split "train") or the held-out rows (split "heldout")."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be train or heldout, got {split!r}")
    keep = (lambda rid: not is_heldout(rid)) if split == "train" else is_heldout

    def enc(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    data = TrainData()
    for source in cfg.text_data:
        texts = [(r["id"], r.get("text") or r.get("content")) for r in _rows(source)]
        texts = [(i, t) for i, t in texts if isinstance(t, str) and t.strip() and keep(i)]
        if not texts:
            raise DataError(f"{source}: no {split} rows with a 'text' (or 'content') field")
        data.docs += [d for d in (enc(t) for _, t in texts) if len(d) >= 2 * cfg.segment_min]
    for source in cfg.qa_data:
        for r in _rows(source):
            answers = row_answers(r)
            if not (answers and isinstance(r.get("question"), str) and isinstance(r.get("context"), str)) or not keep(r["id"]):
                continue
            context = enc(r["context"])
            prompt_text = PLAIN_QA.format(question=r["question"])
            prompt = enc(prompt_text)
            full = enc(prompt_text + " " + answers[0])
            # the answer as it continues the prompt (the evaluation scores the same tokens)
            answer = full[len(prompt) :] if full[: len(prompt)] == prompt else enc(" " + answers[0])
            if MIN_CONTEXT_TOKENS <= len(context) <= cfg.qa_max_context_tokens and 0 < len(answer) <= cfg.qa_max_answer_tokens:
                data.qa.append(QARow(r["id"], context, prompt, answer))
    return data
