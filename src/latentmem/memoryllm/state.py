"""A memory pool's state: the tensor, its drop generator, provenance, counters; atomic save/load.

The drop generator lives with the pool (not in the process) so that the same sequence of
injections from the same starting state gives a bit-identical pool, on any machine: drop
indices are always drawn on the CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import statefile
from ..api import MemoryFormatError

FORMAT = "memoryllm-state/1"
NEVER_WRITTEN = -1


# the shared error type under the name this design has always used
MemoryStateError = MemoryFormatError


def draw_keep(generator: torch.Generator, num_layers: int, n: int, drop: int, per_layer: bool) -> Tensor:
    """The drop rule (paper section 3.1.2): which N - drop of n old tokens survive an update,
    uniformly at random, as sorted indices [L, n - drop] (a draw per layer, the 8B release's
    drop_memory_per_layer) or [1, n - drop] (one draw shared by every layer). The one
    implementation, used by the library's pools and by training alike."""
    rows = [torch.randperm(n, generator=generator)[: n - drop].sort().values for _ in range(num_layers if per_layer else 1)]
    return torch.stack(rows)


def tile_to(rows: Tensor, n: int) -> Tensor:
    """[L, k, ...] -> [L, n, ...]: repeat whole copies, then the last n % k rows (the releases' rule)."""
    k = rows.shape[1]
    reps, rem = divmod(n, k)
    parts = [rows] * reps + ([rows[:, k - rem :]] if rem else [])
    return torch.cat(parts, dim=1)


@dataclass
class MemoryState:
    """One memory pool.

    Storage is *physical*: dropping K of N tokens and appending K new ones would shift O(N)
    rows per layer, which makes an update's cost grow with N (1.5 s at N=16k on a CPU). Instead
    the K new rows overwrite the K dropped rows' slots and ``order[l, i]`` records which slot
    holds logical position i (0 = oldest). Updates then cost O(K) rows (plus O(N) integers),
    independent of N as the paper intends. Reading needs no reordering: attention over memory is
    order-free except through RoPE, so keys get the logical positions (``positions()``).
    ``logical_memory()`` gives the pool in the paper's order; files store that order.
    """

    memory: Tensor  # [L, N, d] physical slots
    provenance: Tensor  # [L, N] int64 physical: id of the injection that wrote each slot (-1: never)
    generator: torch.Generator = field(repr=False)
    seed: int = 0
    initialized: bool = False
    update_count: int = 0  # self-updates applied (one per chunk)
    last_injection_id: int = 0  # ids handed out so far (one per inject call / text)
    model_id: str = ""  # which model (and shape) the pool belongs to
    version: int = 0  # bumped on every change; keys the cached memory keys/values
    cache: object = field(default=None, repr=False, compare=False)  # memory keys/values of this version
    order: Tensor | None = None  # [L, N] int64: physical slot of each logical position
    shares_tensors: bool = field(default=False, repr=False, compare=False)  # clone(deep=False): copy before writing

    def __post_init__(self) -> None:
        if self.order is None:
            L, N = self.provenance.shape
            self.order = torch.arange(N).expand(L, N).clone()

    @classmethod
    def empty(cls, num_layers: int, num_memory_tokens: int, hidden_size: int, *, seed: int = 0, model_id: str = "", dtype=torch.float32, device="cpu") -> "MemoryState":
        g = torch.Generator(device="cpu")
        g.manual_seed(seed)
        return cls(
            memory=torch.zeros(num_layers, num_memory_tokens, hidden_size, dtype=dtype, device=device),
            provenance=torch.full((num_layers, num_memory_tokens), NEVER_WRITTEN, dtype=torch.long),
            generator=g,
            seed=seed,
            model_id=model_id,
        )

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.memory.shape)  # type: ignore[return-value]

    def clone(self, deep: bool = True) -> "MemoryState":
        """A copy with its own generator. deep=False shares the tensors until one of the two is
        updated (self-update writes in place, so the writer copies them first)."""
        g = torch.Generator(device="cpu")
        g.set_state(self.generator.get_state())
        mem, prov = (self.memory.clone(), self.provenance.clone()) if deep else (self.memory, self.provenance)
        self.shares_tensors = self.shares_tensors or not deep
        return MemoryState(mem, prov, g, self.seed, self.initialized, self.update_count, self.last_injection_id, self.model_id, self.version, order=self.order.clone(), shares_tensors=not deep)

    def assign(self, other: "MemoryState") -> None:
        """Replace this state's contents in place (used to commit a finished update)."""
        self.memory, self.provenance, self.order = other.memory, other.provenance, other.order
        self.generator.set_state(other.generator.get_state())
        self.seed, self.initialized, self.update_count = other.seed, other.initialized, other.update_count
        self.last_injection_id, self.model_id, self.version = other.last_injection_id, other.model_id, other.version
        self.cache = None

    def draw_keep_indices(self, num_layers: int, drop: int, per_layer: bool) -> Tensor:
        """Sorted indices of the N - drop survivors, drawn with this pool's generator."""
        return draw_keep(self.generator, num_layers, self.memory.shape[1], drop, per_layer)

    # ---- logical view (the paper's order: oldest first) ----
    def logical_memory(self) -> Tensor:
        return self.memory.gather(1, self.order.to(self.memory.device)[..., None].expand(-1, -1, self.memory.shape[2]))

    def logical_provenance(self) -> Tensor:
        return self.provenance.gather(1, self.order)

    def positions(self) -> Tensor:
        """[L, N]: logical position (0-based) of each physical slot."""
        L, N = self.order.shape
        return torch.empty_like(self.order).scatter_(1, self.order, torch.arange(N).expand(L, N))

    def tail(self, k: int) -> Tensor:
        """The last k logical memory tokens [L, k, d] (the self-update's input)."""
        idx = self.order[:, -k:].to(self.memory.device)
        return self.memory.gather(1, idx[..., None].expand(-1, -1, self.memory.shape[2]))

    def write_update_(self, new: Tensor, injection_id: int, per_layer_drop: bool = False) -> tuple:
        """Apply one self-update in place: drop k = len(new) old tokens chosen uniformly at random
        (with this pool's generator; the same indices in every layer unless per_layer_drop) and
        append ``new`` [L, k, d]; an empty pool is filled by tiling instead.
        Returns an undo record for ``undo_`` (O(k) rows, or the whole pool when tiling)."""
        L, N, d = self.memory.shape
        k = new.shape[1]
        counters = (self.initialized, self.update_count, self.version, self.generator.get_state(), self.last_injection_id)
        new = new.to(self.memory.dtype)
        keep = self.draw_keep_indices(L, k, per_layer_drop) if self.initialized else None
        if keep is None:
            record = ("all", self.memory, self.provenance, self.order, counters)
            self.memory = tile_to(new, N).contiguous()
            self.provenance = torch.full((L, N), injection_id, dtype=torch.long)
            self.order = torch.arange(N).expand(L, N).clone()
        else:
            keep = keep.expand(L, -1)
            dropped_mask = torch.ones(L, N, dtype=torch.bool)
            dropped_mask.scatter_(1, keep, False)
            dropped = dropped_mask.nonzero()[:, 1].view(L, k)  # logical indices, sorted per layer
            freed = self.order.gather(1, dropped)  # their physical slots get the new tokens
            if self.shares_tensors:  # a shallow clone's tensors: copy on first write
                self.memory, self.provenance, self.shares_tensors = self.memory.clone(), self.provenance.clone(), False
            dev_freed = freed.to(self.memory.device)[..., None].expand(-1, -1, d)
            record = ("slots", freed, self.memory.gather(1, dev_freed), self.provenance.gather(1, freed), self.order, counters)
            self.memory.scatter_(1, dev_freed, new)
            self.provenance.scatter_(1, freed, injection_id)
            self.order = torch.cat([self.order.gather(1, keep), freed], dim=1)
        self.initialized = True
        self.update_count += 1
        self.version += 1
        self.cache = None
        return record

    def undo_(self, record: tuple) -> None:
        if record[0] == "all":
            _, self.memory, self.provenance, self.order, counters = record
        else:
            _, freed, rows, prov, self.order, counters = record
            self.memory.scatter_(1, freed.to(self.memory.device)[..., None].expand(-1, -1, self.memory.shape[2]), rows)
            self.provenance.scatter_(1, freed, prov)
        self.initialized, self.update_count, self.version, gen_state, self.last_injection_id = counters
        self.generator.set_state(gen_state)
        self.cache = None

    def equal(self, other: "MemoryState") -> bool:
        """Bit-exact equality of everything that determines future behaviour (in logical order)."""
        return (
            self.shape == other.shape
            and torch.equal(self.logical_memory().cpu(), other.logical_memory().cpu())
            and torch.equal(self.logical_provenance().cpu(), other.logical_provenance().cpu())
            and torch.equal(self.generator.get_state(), other.generator.get_state())
            and (self.initialized, self.update_count, self.last_injection_id, self.model_id)
            == (other.initialized, other.update_count, other.last_injection_id, other.model_id)
        )

    # ---- persistence ----
    def save(self, path: str | os.PathLike) -> None:
        """Write atomically: a crash leaves either the old file or the new one, never a mix."""
        tensors = {
            "memory": self.logical_memory().detach().contiguous().cpu(),
            "provenance": self.logical_provenance().contiguous().cpu(),
            "generator_state": self.generator.get_state(),
        }
        meta = {
            "format": FORMAT,
            "seed": str(self.seed),
            "initialized": str(int(self.initialized)),
            "update_count": str(self.update_count),
            "last_injection_id": str(self.last_injection_id),
            "model_id": self.model_id,
            "version": str(self.version),
        }
        statefile.write(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, *, expect_shape: tuple[int, int, int] | None = None, expect_model_id: str | None = None, device="cpu", dtype=None) -> "MemoryState":
        path, tensors, meta = statefile.read(path, FORMAT, ("memory", "provenance", "generator_state"))
        mem, prov = tensors["memory"], tensors["provenance"]
        if mem.dim() != 3 or prov.shape != mem.shape[:2]:
            raise MemoryStateError(f"{path}: inconsistent shapes memory {tuple(mem.shape)} provenance {tuple(prov.shape)}")
        if expect_shape is not None and tuple(mem.shape) != tuple(expect_shape):
            names = ("layers", "memory tokens N", "hidden size")
            diffs = [f"{n}: file {a} vs model {b}" for n, a, b in zip(names, mem.shape, expect_shape) if a != b]
            raise MemoryStateError(f"{path}: memory shape {tuple(mem.shape)} does not fit this model {tuple(expect_shape)} ({'; '.join(diffs)})")
        statefile.check_model(path, meta, expect_model_id, allow_unmarked=True)
        g = torch.Generator(device="cpu")
        try:
            g.set_state(tensors["generator_state"])
            ints = {k: int(meta[k]) for k in ("seed", "initialized", "update_count", "last_injection_id", "version")}
        except (RuntimeError, KeyError, ValueError) as e:
            raise MemoryStateError(f"{path}: bad generator state or metadata: {e}") from e
        return cls(
            memory=mem.to(device=device, dtype=dtype or mem.dtype),
            provenance=prov.long(),
            generator=g,
            seed=ints["seed"],
            initialized=bool(ints["initialized"]),
            update_count=ints["update_count"],
            last_injection_id=ints["last_injection_id"],
            model_id=meta.get("model_id", ""),
            version=ints["version"],
        )

