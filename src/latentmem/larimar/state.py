"""One Larimar memory: the episodic matrix M, its row covariance U (sequential writing), and the
rows written into it, each with its provenance; atomic, checksummed, versioned save/load.

Rows are the storage unit: one per written fact (a chunk of at most ``max_inject_tokens``
decoder tokens). A row keeps its noised latent z' (what the one-shot write solves over), its
unit sentence embedding e (what the scope detector compares queries with), the addressing w it
was written with (what the fast, negative-weight forget subtracts) and the injection that wrote
it. No text is kept. M is recomputable from the rows (``LarimarLM.rewrite``); it is stored so
that loading a memory costs no solve.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import statefile
from ..api import MemoryFormatError

FORMAT = "larimar-state/1"
TENSORS = ("M", "U", "z", "keys", "w", "owners", "chunks")
COUNTERS = ("seed", "update_count", "last_injection_id", "version")


@dataclass
class LarimarState:
    M: Tensor  # [K, C] float64
    U: Tensor  # [K, K] float64 (sequential writing; [0, 0] for one-shot)
    z: Tensor  # [n, C] float64: written latents, noise included
    keys: Tensor  # [n, D] float32: unit sentence embeddings (scope detector)
    w: Tensor  # [n, K] float64: addressing each row was written with
    owners: Tensor  # [n] int64: injection id of each row
    chunks: Tensor  # [n] int64: chunk index of the row within its injection
    seed: int = 0
    update_count: int = 0  # rows written and still in memory
    last_injection_id: int = 0
    model_id: str = ""
    version: int = 0
    cache: object = field(default=None, repr=False, compare=False)  # (version, M^+) of this version

    @classmethod
    def empty(cls, M0: Tensor, U0: Tensor, encoder_size: int, *, seed: int = 0, model_id: str = "") -> "LarimarState":
        K, C = M0.shape
        return cls(M0.clone(), U0.clone(), torch.zeros(0, C, dtype=torch.float64), torch.zeros(0, encoder_size), torch.zeros(0, K, dtype=torch.float64),
                   torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), seed=seed, model_id=model_id)

    @property
    def rows(self) -> int:
        return int(self.owners.shape[0])

    def tensors(self) -> dict[str, Tensor]:
        return {k: getattr(self, k) for k in TENSORS}

    def clone(self, deep: bool = True) -> "LarimarState":
        """A copy (every write replaces tensors instead of writing in place, so a shallow copy is safe)."""
        t = {k: (v.clone() if deep else v) for k, v in self.tensors().items()}
        return LarimarState(**t, seed=self.seed, update_count=self.update_count, last_injection_id=self.last_injection_id, model_id=self.model_id, version=self.version)

    def assign(self, other: "LarimarState") -> None:
        for k, v in other.tensors().items():
            setattr(self, k, v)
        self.seed, self.update_count, self.last_injection_id = other.seed, other.update_count, other.last_injection_id
        self.model_id, self.version, self.cache = other.model_id, other.version, None

    def undo_(self, record: "LarimarState") -> None:
        """Undo a write (``LarimarLM.inject``): the record is the memory before it, whose tensors
        no write changed in place."""
        self.assign(record)

    def equal(self, other: "LarimarState") -> bool:
        """Bit-exact equality of everything that determines future behaviour."""
        return all(a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(self.tensors().values(), other.tensors().values())) and (
            self.seed, self.update_count, self.last_injection_id, self.model_id) == (other.seed, other.update_count, other.last_injection_id, other.model_id)

    # ---- persistence ----
    def save(self, path: str | os.PathLike) -> None:
        """Write atomically: a crash leaves the old file or the new one, never a mix."""
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors().items()}
        meta = {"format": FORMAT, "model_id": self.model_id, **{k: str(getattr(self, k)) for k in COUNTERS}}
        statefile.write(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, *, expect_shape: tuple[int, int, int] | None = None, expect_model_id: str | None = None) -> "LarimarState":
        """expect_shape: (K, C, D) of the model."""
        path, tensors, meta = statefile.read(path, FORMAT, TENSORS, format_hint=" (a memory of another design?)")
        n = tensors["owners"].shape[0]
        K, C = tensors["M"].shape if tensors["M"].dim() == 2 else (-1, -1)
        if K < 0 or any(tensors[k].shape[0] != n for k in ("z", "keys", "w", "chunks")) or tensors["z"].shape[1:] != (C,) or tensors["w"].shape[1:] != (K,):
            raise MemoryFormatError(f"{path}: inconsistent shapes {({k: tuple(v.shape) for k, v in tensors.items()})}")
        if expect_shape is not None and (K, C, tensors["keys"].shape[1]) != tuple(expect_shape):
            raise MemoryFormatError(f"{path}: memory (K, C, D) = {(K, C, tensors['keys'].shape[1])} does not fit this model {tuple(expect_shape)}")
        statefile.check_model(path, meta, expect_model_id)
        try:
            ints = {k: int(meta[k]) for k in COUNTERS}
        except (KeyError, ValueError) as e:
            raise MemoryFormatError(f"{path}: bad metadata: {e}") from e
        return cls(**{k: tensors[k] for k in TENSORS}, model_id=meta.get("model_id", ""), **ints)

