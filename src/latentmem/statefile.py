"""Memory files, once for every design: a safetensors file of tensors plus string metadata, with
a sha256 over both (``digest``), written atomically (``write``) and read back checked
(``read``: readable, the design's format, every tensor it needs, the checksum; ``check_model``:
made for this model). What the tensors mean, and the shapes a model needs, stay with the design
(``memoryllm/state.py``, ``longmem/bank.py``, ``larimar/state.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor

from .api import MemoryFormatError
from .files import atomic_write


def digest(tensors: dict[str, Tensor], meta: dict[str, str]) -> str:
    """sha256 of the tensors and the metadata (but its own ``sha256`` entry): a flipped counter
    or flag is as harmful as a flipped memory value."""
    h = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous().cpu()
        h.update(name.encode())
        h.update(json.dumps([str(t.dtype), list(t.shape)]).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def write(path: str | os.PathLike, tensors: dict[str, Tensor], meta: dict[str, str]) -> None:
    """Write tensors (contiguous, on the CPU) and meta atomically, meta's ``sha256`` added:
    a crash leaves the old file or the new one, never a mix."""
    meta["sha256"] = digest(tensors, meta)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read(path: str | os.PathLike, fmt: str, required: Iterable[str], *, what: str = "memory state", file_what: str | None = None,
         format_hint: str = "") -> tuple[Path, dict[str, Tensor], dict[str, str]]:
    """(path, tensors, metadata) of a memory file that exists, reads, has format ``fmt``, holds
    every tensor in ``required`` and matches its checksum; else ``MemoryFormatError``. The errors
    name the file "{file_what} file" when missing (``what`` unless given), "a readable {what}"
    when unreadable; ``format_hint`` follows the unknown-format one."""
    path = Path(path)
    if not path.is_file():
        raise MemoryFormatError(f"{file_what or what} file not found: {path}")
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise MemoryFormatError(f"{path} is not a readable {what} (truncated or corrupted?): {e}") from e
    if meta.get("format") != fmt:
        raise MemoryFormatError(f"{path}: unknown format {meta.get('format')!r}, expected {fmt!r}{format_hint}")
    missing = set(required) - tensors.keys()
    if missing:
        raise MemoryFormatError(f"{path}: missing tensors {sorted(missing)}")
    if meta.get("sha256") != digest(tensors, meta):
        raise MemoryFormatError(f"{path}: checksum mismatch, the file is corrupted")
    return path, tensors, meta


def check_model(path: Path, meta: dict[str, str], expect_model_id: str | None, *, allow_unmarked: bool = False) -> None:
    """Refuse a file made for another model (``expect_model_id`` None: any model;
    ``allow_unmarked``: a file that names no model is accepted, MemoryLLM's files before ids)."""
    if expect_model_id is None or (allow_unmarked and not meta.get("model_id")):
        return
    if meta.get("model_id") != expect_model_id:
        raise MemoryFormatError(f"{path}: made for model {meta.get('model_id')!r}, but this model is {expect_model_id!r}")
