"""Loading evaluation data: the shared jsonl files and users' local copies of SQuAD, Natural
Questions, zsRE-like facts and LongBench, all mapped onto the same few fields.

QA rows: ``{"id", "question", "context", "answer", "answers"}`` (``answers`` lists every
acceptable answer, ``answer`` is the first). Accepted inputs:

* jsonl / json-lines with ``question``, ``context`` and ``answer`` (a string) or ``answers``
  (a list, or SQuAD/HF style ``{"text": [...]}``), e.g. the shared ``counterfactual_qa`` and
  ``squad_disfluent_qa``, or Natural Questions exported with those fields;
* the official SQuAD v1/v2 json (``{"data": [{"paragraphs": [{"context", "qas"}]}]}``),
  unanswerable questions skipped.

Names without a path (``counterfactual_qa``) resolve to the shared data folder: the
``MEMORYLLM_DATA`` environment variable, else ``../shared/data`` from the project root.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from pathlib import Path

SHARED_NAMES = ("counterfactual_qa", "squad_disfluent_qa", "wikidata_facts", "news_articles", "wikipedia_articles")
HELDOUT_PERCENT = 20


def is_heldout(row_id: str) -> bool:
    """The one train / evaluation split of every dataset: a row is held out (never trained on)
    when the first 32 bits of sha256(id) mod 100 fall below HELDOUT_PERCENT. It depends on the id
    alone, so it is the same on every machine, for every file order and every subset of rows."""
    h = int.from_bytes(hashlib.sha256(str(row_id).encode("utf-8")).digest()[:4], "big")
    return h % 100 < HELDOUT_PERCENT


class DataError(ValueError):
    """A data file that is missing or lacks the fields an evaluation needs."""


def data_dir() -> Path:
    env = os.environ.get("MEMORYLLM_DATA")
    if env:
        return Path(env)
    root = Path(__file__).resolve().parents[3]  # src/latentmem/eval -> project root
    for cand in (root.parent / "shared" / "data", root / "shared" / "data"):
        if cand.is_dir():
            return cand
    return root.parent / "shared" / "data"


def resolve(name_or_path: str | os.PathLike) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".jsonl", ".json") or p.exists():
        if not p.is_file():
            raise DataError(f"data file not found: {p}")
        return p
    cand = data_dir() / f"{name_or_path}.jsonl"
    if cand.is_file():
        return cand
    raise DataError(f"unknown dataset {str(name_or_path)!r}: not a file, and {cand} does not exist (shared names: {', '.join(SHARED_NAMES)}; set MEMORYLLM_DATA to the folder holding them)")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    path = Path(path)
    rows = []
    with path.open(encoding="utf-8") as f:
        first = f.read(1)
        f.seek(0)
        if first == "{" or first == "":
            for i, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    if i == 1:  # a single pretty-printed json object (SQuAD official format)
                        f.seek(0)
                        return _as_rows(json.load(f), path)
                    raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        else:
            rows = _as_rows(json.load(f), path)
    return rows


def _as_rows(obj, path) -> list[dict]:
    if isinstance(obj, list):
        return obj
    if isinstance(obj, dict) and "data" in obj:
        return list(_squad_official(obj))
    raise DataError(f"{path}: expected json lines, a json list or the SQuAD json layout")


def _squad_official(obj: dict):
    for article in obj["data"]:
        for para in article.get("paragraphs", []):
            for qa in para.get("qas", []):
                answers = [a["text"] for a in qa.get("answers", [])]
                if qa.get("is_impossible") or not answers:
                    continue
                yield {"id": qa.get("id"), "question": qa["question"], "context": para["context"], "answers": answers}


def row_answers(row: dict) -> list[str]:
    """Every acceptable answer of a QA row, ``answer`` first: ``answers`` may be a list, a string
    or SQuAD/HF style ``{"text": [...]}``; blank entries are dropped. Shared with training
    (``latentmem.train.data``), so both read a row's answers the same way."""
    a = row.get("answers")
    if isinstance(a, dict):
        a = a.get("text")
    if isinstance(a, str):
        a = [a]
    out = [x for x in (a or []) if isinstance(x, str) and x.strip()]
    if isinstance(row.get("answer"), str) and row["answer"].strip():
        out = [row["answer"]] + [x for x in out if x != row["answer"]]
    return out


_answers = row_answers  # the name the evaluation code has used


def eval_rows_only(lm) -> bool:
    """Whether an evaluation must skip rows a model may have trained on: true for a model that
    carries trained memory weights (the shipped default, trained on the rows ``is_heldout``
    rejects). The untrained base may use every row, as the earlier results did."""
    return lm.info().details.get("applied_weights") is not None


def load_qa(name_or_path: str | os.PathLike, *, limit: int | None = None, seed: int = 0, shuffle: bool = True, heldout_only: bool = False) -> list[dict]:
    """QA rows with id/question/context/answer/answers, shuffled with ``seed`` then cut to
    ``limit``; with ``heldout_only`` only the rows ``is_heldout`` keeps for evaluation."""
    path = resolve(name_or_path)
    rows = []
    for i, r in enumerate(read_jsonl(path)):
        answers = row_answers(r)
        q = r.get("question") or r.get("input")
        ctx = r.get("context")
        if not (isinstance(q, str) and isinstance(ctx, str) and answers):
            raise DataError(f"{path}: row {i} lacks question/context/answer(s) (has {sorted(r)})")
        rows.append({"id": str(r.get("id", r.get("_id", i))), "question": q, "context": ctx, "answer": answers[0], "answers": answers, **({"original_answer": r["original_answer"]} if "original_answer" in r else {})})
    if heldout_only:
        rows = [r for r in rows if is_heldout(r["id"])]
    if shuffle:
        random.Random(seed).shuffle(rows)
    return rows[:limit] if limit else rows


def load_texts(name_or_path: str | os.PathLike = "news_articles") -> list[str]:
    """Unrelated filler texts (``text`` field; news or Wikipedia)."""
    path = resolve(name_or_path)
    out = [r["text"] for r in read_jsonl(path) if isinstance(r.get("text"), str) and r["text"].strip()]
    if not out:
        raise DataError(f"{path}: no rows with a non-empty 'text' field")
    return out


# ---- facts (wikidata_facts / zsRE-like) --------------------------------------------------------

_THE_R_OF = re.compile(r"^The (?P<rel>.+?) of (?P<subj>.+) is$")
_X_IS_R = re.compile(r"^(?P<subj>.+?) is (?P<rel>located in or next to body of water|territory claimed by|located in|capital of|facet of|indigenous to|followed by|studied by|.+)$")


def parse_fact_prompt(prompt: str) -> tuple[str, str, str]:
    """(relation, subject, template) of a wikidata fact prompt; the template has ``{}`` for the subject.

    "The country of 2000 Summer Olympics is" -> ("country", "2000 Summer Olympics", "The country of {} is");
    "875 North Michigan Avenue is located in" -> ("located in", "875 North Michigan Avenue", "{} is located in").
    """
    m = _THE_R_OF.match(prompt)
    if m:
        return m["rel"], m["subj"], "The " + m["rel"] + " of {} is"
    m = _X_IS_R.match(prompt)
    if m:
        return m["rel"], m["subj"], "{} is " + m["rel"]
    raise DataError(f"cannot parse the relation of fact prompt {prompt!r}")


def paraphrases(relation: str, subject: str, template: str) -> list[str]:
    """Other ways to ask for the same fact (generalization prompts); never the edit's own wording."""
    if template.startswith("The "):
        return [f"{subject}'s {relation} is", f"What is the {relation} of {subject}? The answer is", f"Regarding {subject}, the {relation} is"]
    return [f"Regarding {subject}, it is {relation}", f"It is known that {subject} is {relation}", f"Fact: {subject} is {relation}"]


def load_facts(name_or_path: str | os.PathLike = "wikidata_facts") -> list[dict]:
    """Fact rows ``{"id", "prompt", "targets", "relation", "subject", "template"}`` (unparseable prompts skipped)."""
    path = resolve(name_or_path)
    out = []
    for i, r in enumerate(read_jsonl(path)):
        prompt, targets = r.get("prompt"), r.get("targets") or ([r["target"]] if "target" in r else None)
        if not isinstance(prompt, str) or not targets:
            raise DataError(f"{path}: row {i} lacks prompt/targets (has {sorted(r)})")
        try:
            rel, subj, tmpl = parse_fact_prompt(prompt.strip())
        except DataError:
            continue
        out.append({"id": str(r.get("id", i)), "prompt": prompt.strip(), "targets": [str(t) for t in targets], "relation": rel, "subject": subj, "template": tmpl})
    return out


def build_edits(facts: list[dict], n: int, *, seed: int = 0, n_neighbours: int = 2) -> list[dict]:
    """Counterfactual edits: a fact's target swapped for another target of the same relation.

    Each edit: ``prompt``, ``old`` (the true target), ``new`` (a target of another subject with
    the same relation, not among this fact's targets, so the new fact is false in the world),
    ``paraphrases`` (generalization prompts) and ``neighbours`` (unrelated facts with their
    true targets, for specificity). Deterministic for a seed.
    """
    rng = random.Random(seed)
    by_rel: dict[str, list[dict]] = {}
    for f in facts:
        by_rel.setdefault(f["relation"], []).append(f)
    targets_by_rel = {rel: sorted({t for f in fs for t in f["targets"]}) for rel, fs in by_rel.items()}
    candidates = [f for f in facts if len(targets_by_rel[f["relation"]]) > 1]
    order = list(range(len(candidates)))
    rng.shuffle(order)
    edits, used_subjects = [], set()
    for i in order:
        f = candidates[i]
        if f["subject"] in used_subjects:
            continue
        pool = [t for t in targets_by_rel[f["relation"]] if t not in f["targets"]]
        if not pool:
            continue
        new = rng.choice(pool)
        neighbours = []
        while len(neighbours) < n_neighbours:
            g = facts[rng.randrange(len(facts))]
            if g["subject"] != f["subject"] and new not in g["targets"]:
                neighbours.append({"prompt": g["prompt"], "target": g["targets"][0]})
        used_subjects.add(f["subject"])
        edits.append({"id": f["id"], "prompt": f["prompt"], "relation": f["relation"], "subject": f["subject"], "old": f["targets"][0], "new": new, "paraphrases": paraphrases(f["relation"], f["subject"], f["template"]), "neighbours": neighbours})
        if len(edits) == n:
            break
    if len(edits) < n:
        raise DataError(f"only {len(edits)} edits could be built, {n} asked")
    return edits


# ---- LongBench -----------------------------------------------------------------------------------

LONGBENCH_QA = ("narrativeqa", "qasper", "multifieldqa_en", "multifieldqa_zh", "hotpotqa", "2wikimqa", "musique", "dureader")


def load_longbench(path: str | os.PathLike, *, limit: int | None = None) -> list[dict]:
    """LongBench rows (``input``, ``context``, ``answers``, optional ``length``, ``dataset``, ``_id``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"LongBench file not found: {path}")
    rows = []
    for i, r in enumerate(read_jsonl(path)):
        if not all(k in r for k in ("input", "context", "answers")):
            raise DataError(f"{path}: row {i} is not a LongBench row (needs input, context, answers; has {sorted(r)})")
        rows.append({"id": str(r.get("_id", i)), "question": r["input"], "context": r["context"], "answers": list(r["answers"]), "answer": r["answers"][0] if r["answers"] else "", "length": r.get("length"), "dataset": r.get("dataset", path.stem.replace("_e", ""))})
    return rows[:limit] if limit else rows
