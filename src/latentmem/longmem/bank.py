"""One user's LongMem memory: the bank of cached keys/values in chunks, its search, atomic save/load.

Storage is per chunk slot: ``keys``/``values`` [S, Hkv, chunk_size, hd] (keys before RoPE, see
``model.py``), ``valid`` [S, chunk_size] (a text's last chunk may be partial), ``means``
[S, Hkv, hd] (the chunk's retrieval key, kept beside it), ``owner`` [S] (the injection that wrote
it; -1 free) and ``seq`` [S] (write order). Writes fill free slots, growing the storage
geometrically up to the capacity; at capacity the oldest chunks are evicted first (FIFO).
``forget`` frees exactly an injection's slots. Files hold the chunks in write order (oldest first),
so equal banks give equal files whatever their slots.

Forgetting is exact (the bank equals one that never received the injection) because a chunk's
keys depend only on its own text (the frozen backbone reads each segment alone, and keys are
position-free); the one exception is eviction: when chunks were evicted at or after the
injection's write, a bank that never received it would still hold some of them. The bank records
the write order up to the last eviction (``settled``) so ``forget`` can say which case it is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import statefile
from ..api import MemoryFormatError
from .model import chunk_means, top_chunks

FORMAT = "longmem-bank/1"
FREE = -1
MIN_SLOTS = 64


def to_chunks(keys: Tensor, values: Tensor, chunk_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """One segment's entries [n, Hkv, hd] -> chunks [C, Hkv, c, hd] of consecutive tokens and their
    validity [C, c] (the last chunk padded with zeros when n is not a multiple of c)."""
    n, Hkv, hd = keys.shape
    C = -(-n // chunk_size)
    pad = C * chunk_size - n
    valid = torch.ones(C * chunk_size, dtype=torch.bool, device=keys.device)
    if pad:
        keys = torch.cat([keys, keys.new_zeros(pad, Hkv, hd)])
        values = torch.cat([values, values.new_zeros(pad, Hkv, hd)])
        valid[n:] = False
    shape = (C, chunk_size, Hkv, hd)
    return keys.reshape(shape).transpose(1, 2).contiguous(), values.reshape(shape).transpose(1, 2).contiguous(), valid.view(C, chunk_size)


@dataclass
class _Index:
    key: tuple
    slots: Tensor  # [C] physical slot of each indexed chunk, in write order
    means: Tensor  # [Hkv, C, hd] compact copy of their mean keys, per kv head
    faiss: list | None = None  # one IndexFlatIP per kv head, built on first use


@dataclass
class LongMemState:
    keys: Tensor
    values: Tensor
    valid: Tensor
    means: Tensor
    owner: Tensor
    seq: Tensor
    seed: int = 0
    model_id: str = ""
    version: int = 0  # bumped on every change; keys the search index
    update_count: int = 0  # writes applied (one per segment)
    last_injection_id: int = 0
    next_seq: int = 0
    evicted_chunks: int = 0
    settled_seq: int = -1  # chunks with seq <= this were in the bank when a write last evicted
    cache: object = field(default=None, repr=False, compare=False)
    shares_tensors: bool = field(default=False, repr=False, compare=False)

    _TENSORS = ("keys", "values", "valid", "means", "owner", "seq")

    @classmethod
    def empty(cls, num_kv_heads: int, chunk_size: int, head_dim: int, *, seed: int = 0, model_id: str = "", dtype=torch.float32, device="cpu") -> LongMemState:
        z = lambda *s, **k: torch.zeros(*s, device=device, **k)
        return cls(
            keys=z(0, num_kv_heads, chunk_size, head_dim, dtype=dtype), values=z(0, num_kv_heads, chunk_size, head_dim, dtype=dtype),
            valid=z(0, chunk_size, dtype=torch.bool), means=z(0, num_kv_heads, head_dim, dtype=dtype),
            owner=z(0, dtype=torch.long), seq=z(0, dtype=torch.long), seed=seed, model_id=model_id,
        )

    # ---- shape and views ----
    @property
    def shape(self) -> tuple[int, int, int]:
        """(kv heads, chunk size, head dim): what a model must agree with."""
        return tuple(self.keys.shape[1:])  # type: ignore[return-value]

    @property
    def num_chunks(self) -> int:
        return int((self.owner != FREE).sum())

    def order(self) -> Tensor:
        """Physical slots of the stored chunks in write order (oldest first)."""
        used = (self.owner != FREE).nonzero().view(-1)
        return used[self.seq[used].argsort()]

    def logical(self) -> dict[str, Tensor]:
        o = self.order()
        return {"keys": self.keys[o], "values": self.values[o], "valid": self.valid[o], "owner": self.owner[o]}

    def settled_count(self) -> int:
        used = self.owner != FREE
        return int((used & (self.seq <= self.settled_seq)).sum())

    def nbytes(self) -> int:
        return sum(getattr(self, n).numel() * getattr(self, n).element_size() for n in self._TENSORS)

    # ---- copies ----
    def clone(self, deep: bool = True) -> LongMemState:
        """A copy; deep=False shares the tensors until either side writes (copy on write)."""
        tensors = {n: getattr(self, n).clone() if deep else getattr(self, n) for n in self._TENSORS}
        self.shares_tensors = self.shares_tensors or not deep
        return LongMemState(**tensors, seed=self.seed, model_id=self.model_id, version=self.version, update_count=self.update_count,
                            last_injection_id=self.last_injection_id, next_seq=self.next_seq, evicted_chunks=self.evicted_chunks,
                            settled_seq=self.settled_seq, shares_tensors=not deep)

    def _own_tensors(self) -> None:
        if self.shares_tensors:
            for n in self._TENSORS:
                setattr(self, n, getattr(self, n).clone())
            self.shares_tensors = False

    def equal(self, other: LongMemState) -> bool:
        """Bit-exact equality of what the bank holds and of what decides its future (chunks in
        write order, owners, eviction record). Counters (update_count, last_injection_id,
        version) are bookkeeping: after an exact forget they differ from a bank that never
        received the injection while everything it reads and evicts is the same."""
        if self.shape != other.shape or self.num_chunks != other.num_chunks:
            return False
        a, b = self.logical(), other.logical()
        return (
            all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)
            and (self.seed, self.model_id, self.evicted_chunks, self.settled_count())
            == (other.seed, other.model_id, other.evicted_chunks, other.settled_count())
        )

    # ---- writing ----
    def append_(self, keys: Tensor, values: Tensor, valid: Tensor, injection_id: int, capacity_chunks: int) -> tuple:
        """Add one segment's chunks (``to_chunks``) in place, evicting the oldest chunks when the
        bank would exceed ``capacity_chunks``. Returns an undo record for ``undo_``."""
        self._own_tensors()
        counters = (self.version, self.update_count, self.next_seq, self.evicted_chunks, self.settled_seq)
        S_before, dev = self.owner.shape[0], self.owner.device
        n = keys.shape[0]
        dropped = max(n - capacity_chunks, 0)  # a segment larger than the bank keeps its newest chunks
        keys, values, valid = keys[dropped:], values[dropped:], valid[dropped:]
        first_seq = self.next_seq + dropped
        n -= dropped
        free = (self.owner == FREE).nonzero().view(-1)
        if len(free) < n and S_before < capacity_chunks:
            self._grow(min(capacity_chunks, max(2 * S_before, S_before + n - len(free), MIN_SLOTS)))
            free = (self.owner == FREE).nonzero().view(-1)
        evict = n - len(free)
        if evict > 0:  # FIFO: the oldest chunks give their slots
            oldest = self.order()[:evict]
            free = torch.cat([free, oldest]).sort().values
        slots = free[:n]
        record = (slots, *(getattr(self, k)[slots].clone() for k in self._TENSORS), S_before, counters)
        self.keys[slots], self.values[slots] = keys.to(self.keys), values.to(self.values)
        self.valid[slots] = valid.to(dev)
        self.means[slots] = chunk_means(self.keys[slots], self.valid[slots])
        self.owner[slots] = int(injection_id)
        self.seq[slots] = torch.arange(first_seq, first_seq + n, device=dev)
        self.next_seq = first_seq + n
        if evict > 0 or dropped:
            self.evicted_chunks += max(evict, 0) + dropped
            self.settled_seq = self.next_seq - 1
        self.update_count += 1
        self.version += 1
        self.cache = None
        return record

    def _grow(self, slots: int) -> None:
        extra = slots - self.owner.shape[0]
        for name in self._TENSORS:
            t = getattr(self, name)
            fill = FREE if name in ("owner", "seq") else 0
            setattr(self, name, torch.cat([t, torch.full((extra, *t.shape[1:]), fill, dtype=t.dtype, device=t.device)]))

    def undo_(self, record: tuple) -> None:
        slots, *rows, S_before, counters = record
        for name, old in zip(self._TENSORS, rows):
            getattr(self, name)[slots] = old
        for name in self._TENSORS:
            setattr(self, name, getattr(self, name)[:S_before].contiguous())
        self.version, self.update_count, self.next_seq, self.evicted_chunks, self.settled_seq = counters
        self.version += 1  # contents are as before; a new version drops any search index built meanwhile
        self.cache = None

    def forget_(self, injection_id: int) -> tuple[int, bool]:
        """Free every chunk the injection wrote. Returns (chunks removed, exact)."""
        self._own_tensors()
        mask = self.owner == injection_id
        removed = int(mask.sum())
        if removed:
            exact = int(self.seq[mask].min()) > self.settled_seq
        else:
            exact = self.evicted_chunks == 0  # never here, or evicted already (then not exact)
        for name in self._TENSORS:
            t = getattr(self, name)
            t[mask] = FREE if name in ("owner", "seq") else 0
        self.version += 1
        self.cache = None
        return removed, exact

    # ---- search ----
    def index(self) -> _Index:
        """The chunks' mean keys in write order, built once per version."""
        key = (self.version, id(self.means))
        if not isinstance(self.cache, _Index) or self.cache.key != key:
            slots = self.order()
            self.cache = _Index(key, slots, self.means[slots].transpose(0, 1).contiguous())
        return self.cache

    def search(self, queries: Tensor, n: int, backend: str) -> Tensor:
        """Physical slots [H, T, min(n, C)] of the top chunks for queries [H, T, hd] (before
        RoPE), best first: exact inner-product search with torch or faiss (IndexFlatIP)."""
        idx = self.index()
        if backend == "faiss":
            local = faiss_top_chunks(idx, queries, n)
        else:
            local = top_chunks(queries, idx.means.to(queries.dtype), n)
        return idx.slots[local.to(idx.slots.device)]

    # ---- persistence ----
    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (the chunks in write order); checksummed."""
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.logical().items()}
        meta = {
            "format": FORMAT, "seed": str(self.seed), "model_id": self.model_id, "version": str(self.version),
            "update_count": str(self.update_count), "last_injection_id": str(self.last_injection_id),
            "evicted_chunks": str(self.evicted_chunks), "settled_chunks": str(self.settled_count()),
        }
        statefile.write(path, tensors, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, *, expect_shape: tuple[int, int, int], expect_model_id: str | None, capacity_chunks: int, device="cpu", dtype=None) -> LongMemState:
        path, tensors, meta = statefile.read(path, FORMAT, ("keys", "values", "valid", "owner"), what="LongMem bank", file_what="memory")
        k, v, valid, owner = (tensors[n] for n in ("keys", "values", "valid", "owner"))
        C = k.shape[0]
        if k.dim() != 4 or v.shape != k.shape or tuple(valid.shape) != (C, k.shape[2]) or tuple(owner.shape) != (C,):
            raise MemoryFormatError(f"{path}: inconsistent shapes keys {tuple(k.shape)} values {tuple(v.shape)} valid {tuple(valid.shape)} owner {tuple(owner.shape)}")
        if tuple(k.shape[1:]) != tuple(expect_shape):
            raise MemoryFormatError(f"{path}: bank of (kv heads, chunk size, head dim) {tuple(k.shape[1:])} does not fit this model {tuple(expect_shape)}")
        statefile.check_model(path, meta, expect_model_id)
        if C > capacity_chunks:
            raise MemoryFormatError(f"{path}: holds {C} chunks, more than this model's capacity of {capacity_chunks}")
        try:
            ints = {n: int(meta[n]) for n in ("seed", "version", "update_count", "last_injection_id", "evicted_chunks", "settled_chunks")}
        except (KeyError, ValueError) as e:
            raise MemoryFormatError(f"{path}: bad metadata: {e}") from e
        dtype = dtype or k.dtype
        k, v, valid = k.to(device, dtype), v.to(device, dtype), valid.to(device, torch.bool)
        return cls(
            keys=k, values=v, valid=valid, means=chunk_means(k, valid), owner=owner.long().to(device),
            seq=torch.arange(C, device=device), seed=ints["seed"], model_id=meta.get("model_id", ""), version=ints["version"],
            update_count=ints["update_count"], last_injection_id=ints["last_injection_id"], next_seq=C,
            evicted_chunks=ints["evicted_chunks"], settled_seq=ints["settled_chunks"] - 1,
        )


def faiss_top_chunks(idx: _Index, queries: Tensor, n: int) -> Tensor:
    """The search of ``top_chunks`` with one faiss IndexFlatIP per kv head (the release's index;
    exact inner products, so it returns the same chunks). Indices into idx.means."""
    import faiss  # optional: pip install faiss-cpu

    Hkv, C, hd = idx.means.shape
    if idx.faiss is None:
        means = idx.means.detach().float().cpu()
        idx.faiss = []
        for j in range(Hkv):
            index = faiss.IndexFlatIP(hd)
            index.add(means[j].contiguous().numpy())
            idx.faiss.append(index)
    H, T, _ = queries.shape
    g, k = H // Hkv, min(n, C)
    q = queries.detach().float().cpu().reshape(Hkv, g * T, hd)
    out = [torch.from_numpy(idx.faiss[j].search(q[j].contiguous().numpy(), k)[1]) for j in range(Hkv)]
    return torch.stack(out).view(H, T, k).to(queries.device)


def faiss_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("faiss") is not None


def read_banks(states: list[LongMemState | None], chunk_size: int, n: int, backend: str, faiss_min_chunks: int):
    """The ``Read`` of a batch (row b reads states[b]; None or empty: no memory), or None when
    no row has memory. Per row, head and query token: the top n chunks' token keys/values.
    ``backend`` "auto": faiss for multi-token reads of CPU banks of at least ``faiss_min_chunks``
    chunks (when installed), else torch; both are exact."""
    if all(s is None or s.num_chunks == 0 for s in states):
        return None

    def read(q: Tensor):
        B, H, T, hd = q.shape
        M = n * chunk_size
        k_out = q.new_zeros(B, H, T, M, hd)
        v_out = q.new_zeros(B, H, T, M, hd)
        valid = torch.zeros(B, H, T, M, dtype=torch.bool, device=q.device)
        has = torch.zeros(B, dtype=torch.bool, device=q.device)
        for b, s in enumerate(states):
            if s is None or s.num_chunks == 0:
                continue
            use = backend
            if use == "auto":
                # measured on 2 CPU cores: torch's matmul + topk wins for one query token (a decode
                # step: 26 ms vs faiss 50 ms at 262k chunks), faiss for many (prefill, scoring:
                # 320 vs 384 ms for 16 tokens) on large banks
                use = "faiss" if q.device.type == "cpu" and T > 1 and s.num_chunks >= faiss_min_chunks and faiss_available() else "torch"
            with torch.no_grad():  # the search is not differentiable (the paper's non-differentiable memory)
                slots = s.search(q[b].detach(), n, use)  # [H, T, n'] physical
            Hkv = s.keys.shape[1]
            kv_head = (torch.arange(H, device=slots.device) // (H // Hkv))[:, None, None].expand_as(slots)
            m = slots.shape[-1] * chunk_size
            k_out[b, :, :, :m] = s.keys[slots, kv_head].reshape(H, T, m, hd).to(q.dtype)
            v_out[b, :, :, :m] = s.values[slots, kv_head].reshape(H, T, m, hd).to(q.dtype)
            valid[b, :, :, :m] = s.valid[slots].reshape(H, T, m)
            has[b] = True
        return k_out, v_out, valid, has

    return read

