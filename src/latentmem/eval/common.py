"""Shared plumbing of the evaluations: loading the model, prompts, batched teacher-forced
log-likelihoods, filler texts of an exact token length, atomic result files and metadata."""

from __future__ import annotations

import json
import os
import platform
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..files import atomic_write
from ..text import PLAIN_QA, format_prompt  # noqa: F401  (re-exported for the tasks)

def get_lm(options: dict):
    """The MemoryLM named by options: ``lm`` (an object), else ``model`` (a folder or None for
    the embedded default) with optional ``num_tokens`` / ``num_blocks``."""
    if options.get("lm") is not None:
        return options["lm"]
    from .. import load

    # An untrained default has a randomly initialised bos_embedding: seed torch so that every
    # evaluation (and a resumed integrity run) sees the same model.
    torch.manual_seed(0)
    kw = {k: int(options[k]) for k in ("num_tokens", "num_blocks") if options.get(k) is not None}
    if options.get("trained") is False:
        kw["trained"] = False
    if options.get("weights") is not None:
        kw["weights"] = options["weights"]
    if options.get("trained") is False and options.get("model") is not None:
        raise ValueError("--untrained applies to the embedded default model only")
    return load(options.get("model"), design=options.get("design") or "memoryllm", **kw)


def start_task(lm, threads: int | None, model_options: dict):
    """What every task does first: the thread count, the clock (model loading included), the
    model (``lm`` if given, else the one ``model_options`` name). Returns (lm, clock)."""
    set_threads(threads)
    clock = Timer()
    return (lm if lm is not None else get_lm(model_options)), clock


def as_list(value, cast=str) -> list:
    """A list option given as a list or as a comma-separated string ("a,b" / "10,100")."""
    if isinstance(value, str):
        return [cast(x.strip()) for x in value.split(",") if x.strip()]
    return [cast(x) for x in value]


def set_threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(int(n))


def model_info(lm) -> dict:
    """The model facts every result records, from ``lm.info()`` (design facts such as MemoryLLM's
    N and K where the design has them)."""
    mi = lm.info()
    d = mi.details
    info = {"name": lm.name, "model_id": lm.model_id}
    info.update({k: d[k] for k in ("layers", "hidden_size", "N", "K", "max_inject_tokens") if k in d})
    info.update(parameters_M=round(d["parameters"] / 1e6, 2), dtype=d["dtype"], design=mi.design)
    if "applied_weights" in d:  # a design's default with shipped trained weights: what was applied
        info["trained_memory_weights"] = d["applied_weights"] is not None
        info["applied_weights"] = d["applied_weights"]
    return info


def environment() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(), "platform": platform.platform(), "argv": " ".join(sys.argv)}


def generate(lm, memories: Sequence, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy answers; prompts are already formatted (no chat template is applied here)."""
    gens = lm.generate_batch(list(memories), list(prompts), chat=False, max_new_tokens=max_new_tokens, temperature=0.0)
    return [g.text for g in gens]


def cut_tokens(lm, text: str, n_tokens: int) -> str | None:
    """A piece of ``text`` that encodes to at most ``n_tokens`` tokens (and as close as possible);
    None when the text is too short."""
    ids = lm.encode(text)
    if len(ids) < n_tokens:
        return None
    n = n_tokens
    for _ in range(8):
        piece = lm.tokenizer.decode(ids[:n], skip_special_tokens=True)
        m = len(lm.encode(piece))
        if m <= n_tokens:
            return piece
        n -= m - n_tokens
    return lm.tokenizer.decode(ids[: max(1, n_tokens // 2)], skip_special_tokens=True)


def filler_pool(lm, texts: Sequence[str], n_tokens: int, count: int, seed: int) -> list[str]:
    """``count`` unrelated pieces of (at most, and nearly) ``n_tokens`` tokens: the texts, in a
    seeded random order, are run together and cut into consecutive pieces (short news articles
    join the next one; long Wikipedia articles give several pieces)."""
    rng = random.Random(seed)
    order = list(range(len(texts)))
    rng.shuffle(order)
    out: list[str] = []
    buf = ""
    for i in order:
        buf += texts[i].strip() + "\n\n"
        while len(out) < count:
            piece = cut_tokens(lm, buf[: n_tokens * 12], n_tokens)
            if piece is None or not piece.strip():
                break
            out.append(piece.strip())
            buf = buf[len(piece) :]
        if len(out) >= count:
            break
    if not out:
        raise ValueError(f"the filler texts hold fewer than {n_tokens} tokens in all")
    while len(out) < count:  # recycle when the corpus is too small
        out.append(out[rng.randrange(len(out))])
    return out[:count]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), mode=0o644)  # results are meant to be read by others


def _json_default(o):
    if isinstance(o, (torch.Tensor,)):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, float):
        return o
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, default=_json_default, allow_nan=True) + "\n").encode())


def results_path(out: str | os.PathLike | None, task: str, tag: str | None = None) -> Path:
    """``out`` may be a folder (results/eval by default) or a .json file."""
    if out is not None and str(out).endswith(".json"):
        return Path(out)
    folder = Path(out) if out is not None else Path("results") / "eval"
    return folder / (f"{task}_{tag}.json" if tag else f"{task}.json")


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


def finish(result: dict, out, task: str, tag: str | None, plotter=None) -> dict:
    """Write the results JSON atomically (and the PNG beside it); add their paths to ``result``."""
    path = results_path(out, task, tag)
    write_json(path, result)
    result["json_path"] = str(path)
    if plotter is not None:
        result["png_path"] = str(plotter(result, path.with_suffix(".png")))
    return result
