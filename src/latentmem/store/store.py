"""Named memories on disk for one model of any design: a ledger, versions, replay and forgetting.

    store = MemoryStore("data/", lm)
    store.create("alice")
    store.inject("alice", "Alice's flight leaves Zurich at 7:40 on Friday.", source="chat")
    store.generate("alice", "When does my flight leave?").text
    store.snapshot("alice", "before-trip"); store.rollback("alice", "before-trip")
    store.forget("alice", injection_id=1, mode="exact")
    store.verify("alice").ok          # rebuilt from its starting state + ledger, bit for bit

Layout under ``data_dir``::

    store.db                  SQLite (WAL): pools, the ledger of every pool, snapshots
    pools/<pool id>/<uuid>.safetensors   immutable state files (Memory.save)

State files are never modified once written: an operation writes the new state under a new
name, then one DB transaction points the pool at it (the commit is the linearisation point),
then files that no row references any more are deleted. A process killed at any instant leaves
the DB pointing at a complete file of either the old or the new state; ``recover()`` (run at
open) deletes the orphans. Snapshots, rollback and replay bases are rows referencing files, so
they cost no copy. Pool names never reach the filesystem (directories are numbered).

Replay: the ledger's live injections (with their texts and ids), applied in order to the pool's
*replay base*, give the live pool bit for bit (a memory holds everything its future depends on,
MemoryLLM's drop generator included). The base is the creation state until something makes the
earlier history unreplayable: an injection stored without its text, a fast forget by a design
whose forget is not exact, or an import; then the state right after that event becomes the base
and ``verify`` says why it starts there.

The store meets the model only through ``latentmem.api.MemoryModel`` (new_memory, load_memory,
inject, forget, owners, diff, differences, forget_exact) and memories through ``Memory``
(clone, save, counters), so every design gets the same ledger, versions and forgetting.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import operator
import os
import re
import secrets
import shutil
import sqlite3
import tempfile
import threading
import time
import uuid
import zipfile
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from safetensors import SafetensorError

from ..api import ForgetResult, Memory, MemoryFormatError, MemoryModel
from ..files import atomic_write, fsync_dir

# Names are identifiers, never paths: letters, digits, '_', '-', '.', not starting with '.' or '-'.
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
# /2: deflated; a state equal to the empty memory of the pool's seed is left out (listed in
# "empty"; import rebuilds it) and a base that is the live state is written once ("base_is_live").
# /1 (stored, always both states) still imports.
EXPORT_FORMAT = "memoryllm-pool/2"
EXPORT_FORMATS = ("memoryllm-pool/1", EXPORT_FORMAT)
EXPORT_STATES = ("live", "base")  # members <state>.safetensors
FORGET_MODES = ("fast", "exact")
STAGING = "staging"  # every temporary file of the store and the service (emptied by recover)
SECRET_FILE = "export.key"  # per-server HMAC key of exports (0600): an import must carry its signature
MANIFEST_MAX_BYTES = 64 << 20  # manifest.json of an import, decompressed
DEFAULT_UNPACKED_MAX = 4 << 30  # every member of an import together, decompressed

SCHEMA = """
CREATE TABLE IF NOT EXISTS pools(
  id INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: a deleted pool's directory number is never reused
  tenant TEXT NOT NULL,
  name TEXT NOT NULL,
  seed INTEGER NOT NULL,
  model_id TEXT NOT NULL,
  created_at REAL NOT NULL,
  state_file TEXT NOT NULL,              -- the live state
  base_file TEXT NOT NULL,               -- replay starts from this state ...
  base_seq INTEGER NOT NULL,             -- ... which holds every live injection with seq <= base_seq
  base_reason TEXT NOT NULL,
  next_seq INTEGER NOT NULL,
  next_injection_id INTEGER NOT NULL,    -- ids are never reused, even after forget or rollback
  UNIQUE(tenant, name)
);
CREATE TABLE IF NOT EXISTS ledger(
  pool_id INTEGER NOT NULL REFERENCES pools(id) ON DELETE CASCADE,
  seq INTEGER NOT NULL,                  -- event order within the pool
  kind TEXT NOT NULL,                    -- create | inject | snapshot | rollback | forget | import
  injection_id INTEGER,                  -- inject: slot provenance id; forget: the target
  created_at REAL NOT NULL,
  source TEXT,
  sha256 TEXT,                           -- of the UTF-8 text; kept after forget
  num_tokens INTEGER,
  num_chunks INTEGER,
  allow_short INTEGER,
  text TEXT,                             -- NULL: not stored (store_text=False) or forgotten
  status TEXT NOT NULL,                  -- inject rows: live | rolled_back | forgotten; others: done
  deleted_at REAL,                       -- when the text was erased by forget
  detail TEXT,
  PRIMARY KEY(pool_id, seq)
);
CREATE INDEX IF NOT EXISTS ledger_injection ON ledger(pool_id, injection_id);
CREATE TABLE IF NOT EXISTS snapshots(
  pool_id INTEGER NOT NULL REFERENCES pools(id) ON DELETE CASCADE,
  label TEXT NOT NULL,
  created_at REAL NOT NULL,
  seq INTEGER NOT NULL,
  state_file TEXT NOT NULL,
  base_file TEXT NOT NULL,
  base_seq INTEGER NOT NULL,
  base_reason TEXT NOT NULL,
  injections TEXT NOT NULL,              -- JSON list of the injection ids live in this snapshot
  PRIMARY KEY(pool_id, label)
);
"""


class StoreError(Exception):
    """Base of every error the store raises on purpose."""


class InvalidName(StoreError, ValueError):
    pass


class NotFound(StoreError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class AlreadyExists(StoreError):
    pass


class NotReplayable(StoreError):
    """Exact forget needs the texts of every later injection."""


class StoreBusy(StoreError):
    """Another process holds this data directory."""


class QuotaExceeded(StoreError):
    """The tenant holds its maximum number of pools."""


class ImportRefused(StoreError):
    """An import file that is damaged, oversized, unsigned by this server, or for another model."""


def private_dir(path: Path) -> None:
    """A directory only its owner can enter (0700), created when missing."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def private_files(directory: Path, *names: str) -> None:
    """0600 on each existing ``directory/name`` (a database and its -wal / -shm files)."""
    for n in names:
        for f in (directory / n, directory / f"{n}-wal", directory / f"{n}-shm"):
            if f.exists():
                os.chmod(f, 0o600)


def server_secret(directory: Path) -> bytes:
    """The data directory's export key: 32 random bytes in ``export.key`` (0600), made once."""
    path = directory / SECRET_FILE
    if not path.exists():
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(secrets.token_bytes(32)))  # mkstemp: 0600
        os.chmod(path, 0o600)
    key = path.read_bytes()
    if len(key) != 32:
        raise StoreError(f"{SECRET_FILE} in the data directory is damaged ({len(key)} bytes, expected 32); "
                         "delete it to make a new one (exports signed with the old one then need trust to import)")
    return key


@dataclass
class PoolInfo:
    name: str
    tenant: str
    seed: int
    model_id: str
    created_at: float
    live_injections: int
    update_count: int
    snapshots: int
    base_seq: int
    base_reason: str


@dataclass
class LedgerEntry:
    seq: int
    kind: str
    injection_id: int | None
    created_at: float
    source: str | None = None
    sha256: str | None = None
    num_tokens: int | None = None
    num_chunks: int | None = None
    allow_short: bool | None = None
    text: str | None = None
    status: str = "done"
    deleted_at: float | None = None
    detail: str | None = None

    def to_dict(self, include_text: bool = True) -> dict:
        d = asdict(self)
        if not include_text:
            d.pop("text")
        return d


@dataclass
class SnapshotInfo:
    label: str
    created_at: float
    seq: int
    injections: list[int]


@dataclass
class VerifyReport:
    ok: bool
    replayed: int  # injections re-run from the base
    base_seq: int
    base_reason: str
    message: str
    mismatches: list[str] = field(default_factory=list)


@dataclass
class ForgetReport:
    injection_id: int
    mode: str
    slots_reset: int  # fast: slots dropped from the live pool; exact: slots that held it before
    replayed: int  # exact: injections re-run
    snapshots_deleted: list[str]
    was_live: bool


def check_name(name: str, what: str = "memory name") -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidName(f"invalid {what} {name!r}: use 1-64 letters, digits, '_', '-' or '.', not starting with '.' or '-'")
    return name


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class MemoryStore:
    """Memory pools of one model (``lm``) under ``data_dir``. Thread-safe; one process per
    directory (a second one gets StoreBusy). Every method takes ``tenant`` (keyword): pools of
    different tenants live in separate namespaces and one never sees the other's."""

    def __init__(self, data_dir: str | os.PathLike, lm: MemoryModel, *, max_cached_pools: int = 8):
        from filelock import FileLock, Timeout

        self.dir = Path(data_dir)
        private_dir(self.dir)  # pools, ledger texts and keys: the owner's only (issue 17)
        self.lm = lm
        self._flock = FileLock(str(self.dir / ".lock"))
        try:
            self._flock.acquire(timeout=0)
        except Timeout:
            raise StoreBusy(f"{self.dir} is in use by another process (one process per data directory)") from None
        self._db = sqlite3.connect(self.dir / "store.db", check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        # WAL + synchronous=FULL: a commit is on disk when it returns, so an acknowledged
        # operation survives a crash or power loss.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        # forgotten texts are overwritten with zeros in the DB file, not just unlinked from it
        self._db.execute("PRAGMA secure_delete=ON")
        self._db.executescript(SCHEMA)
        private_files(self.dir, "store.db")
        self._secret = server_secret(self.dir)
        self._db_lock = threading.RLock()  # one connection shared by threads
        self._pool_locks: dict[int, threading.Lock] = {}
        self._live: OrderedDict[str, Memory] = OrderedDict()  # state file -> loaded state (LRU)
        self._max_cached = max_cached_pools
        self.recover()

    def close(self) -> None:
        with self._db_lock:
            self._db.close()
        self._flock.release()

    def __enter__(self) -> "MemoryStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ files and rows
    def _pool_dir(self, pool_id: int) -> Path:
        return self.dir / "pools" / str(pool_id)

    def _write_state(self, pool_id: int, state: Memory) -> str:
        name = f"{uuid.uuid4().hex}.safetensors"
        state.save(self._pool_dir(pool_id) / name)  # temp + fsync + rename + fsync(dir)
        return name

    def staging(self) -> Path:
        """The staging area: where every temporary file goes (swept by ``recover``)."""
        d = self.dir / STAGING
        d.mkdir(mode=0o700, exist_ok=True)
        return d

    def _stage(self, state: Memory) -> Path:
        """Write a new pool's state before its row exists (the slow part, outside the DB lock)."""
        path = self.staging() / f"{uuid.uuid4().hex}.safetensors"
        state.save(path)
        return path

    def _exists(self, pool_id: int) -> bool:
        """Whether the pool's row is committed (else its directory is an orphan)."""
        with self._db_lock:
            return self._db.execute("SELECT 1 FROM pools WHERE id=?", (pool_id,)).fetchone() is not None

    def _adopt(self, pool_id: int, staged: Path) -> str:
        """Move a staged file into the pool's directory (inside the creating transaction)."""
        d = self._pool_dir(pool_id)
        d.mkdir(parents=True, exist_ok=True)
        os.replace(staged, d / staged.name)
        fsync_dir(d)  # the rename must be on disk before the commit that names it
        return staged.name

    def _load_state(self, pool_id: int, file: str) -> Memory:
        key = f"{pool_id}/{file}"
        with self._db_lock:
            state = self._live.get(key)
            if state is not None:
                self._live.move_to_end(key)
                return state
        state = self.lm.load_memory(self._pool_dir(pool_id) / file)
        self._remember(pool_id, file, state)
        return state

    def _remember(self, pool_id: int, file: str, state: Memory) -> None:
        """Keep a state in the LRU of loaded states (keyed by file: a new version never collides)."""
        with self._db_lock:
            self._live[f"{pool_id}/{file}"] = state
            while len(self._live) > self._max_cached:
                self._live.popitem(last=False)

    def _referenced(self, pool_id: int) -> set[str]:
        rows = self._db.execute(
            "SELECT state_file AS f FROM pools WHERE id=? UNION SELECT base_file FROM pools WHERE id=? "
            "UNION SELECT state_file FROM snapshots WHERE pool_id=? UNION SELECT base_file FROM snapshots WHERE pool_id=?",
            (pool_id,) * 4,
        ).fetchall()
        return {r[0] for r in rows}

    def _collect(self, pool_id: int) -> None:
        """Delete this pool's files that no row references (after a commit, and in recover)."""
        d = self._pool_dir(pool_id)
        if not d.is_dir():
            return
        with self._db_lock:
            keep = self._referenced(pool_id)
            for key in [k for k in self._live if k.startswith(f"{pool_id}/") and k.split("/", 1)[1] not in keep]:
                del self._live[key]
        for f in d.iterdir():
            if f.name not in keep:
                f.unlink(missing_ok=True)

    def recover(self) -> list[str]:
        """Remove what a killed process left: temp files, unreferenced state files, directories of
        pools whose creation never committed or whose deletion did. Returns what was removed."""
        removed = []
        if (self.dir / STAGING).exists():
            removed += [str(p) for p in (self.dir / STAGING).iterdir()]
            shutil.rmtree(self.dir / STAGING, ignore_errors=True)
        self.staging()
        root = self.dir / "pools"
        root.mkdir(exist_ok=True)
        with self._db_lock:
            ids = {r[0] for r in self._db.execute("SELECT id FROM pools")}
        for d in root.iterdir():
            if not (d.name.isdigit() and int(d.name) in ids):
                shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)
                removed.append(str(d))
                continue
            with self._db_lock:
                keep = self._referenced(int(d.name))
            for f in d.iterdir():
                if f.name not in keep:
                    f.unlink(missing_ok=True)
                    removed.append(str(f))
        return removed

    def _pool(self, name: str, tenant: str) -> sqlite3.Row:
        check_name(name)
        with self._db_lock:
            row = self._db.execute("SELECT * FROM pools WHERE tenant=? AND name=?", (tenant, name)).fetchone()
        if row is None:
            raise NotFound(f"memory {name!r} not found")
        return row

    def _lock(self, pool_id: int) -> threading.Lock:
        with self._db_lock:
            return self._pool_locks.setdefault(pool_id, threading.Lock())

    @contextlib.contextmanager
    def _locked_pool(self, name: str, tenant: str):
        """The pool's row, read again under its lock (so it is current while the lock is held)."""
        row = self._pool(name, tenant)
        with self._lock(row["id"]):
            current = self._pool(name, tenant)
            if current["id"] != row["id"]:  # deleted (and made again) while we waited
                raise NotFound(f"memory {name!r} was deleted")
            yield current

    def _event(self, pool: sqlite3.Row, kind: str, now: float, **cols) -> int:
        """Append a ledger row (inside the caller's transaction); returns its seq."""
        seq = self._db.execute("SELECT next_seq FROM pools WHERE id=?", (pool["id"],)).fetchone()[0]
        cols.setdefault("status", "done")
        names = ["pool_id", "seq", "kind", "created_at", *cols]
        self._db.execute(
            f"INSERT INTO ledger({','.join(names)}) VALUES ({','.join('?' * len(names))})",
            (pool["id"], seq, kind, now, *cols.values()),
        )
        self._db.execute("UPDATE pools SET next_seq=? WHERE id=?", (seq + 1, pool["id"]))
        return seq

    def _live_rows(self, pool_id: int, after_seq: int) -> list[sqlite3.Row]:
        with self._db_lock:
            return self._db.execute(
                "SELECT * FROM ledger WHERE pool_id=? AND kind='inject' AND status='live' AND seq>? ORDER BY seq", (pool_id, after_seq)
            ).fetchall()

    def _live_ids(self, pool_id: int) -> list[int]:
        with self._db_lock:
            rows = self._db.execute("SELECT injection_id FROM ledger WHERE pool_id=? AND kind='inject' AND status='live' ORDER BY seq", (pool_id,))
            return [r[0] for r in rows]

    # ------------------------------------------------------------------ pools
    def create(self, name: str, *, seed: int | None = None, tenant: str = "", max_pools: int | None = None) -> PoolInfo:
        """A new empty pool; seed seeds its drop generator (random when None, and recorded).
        ``max_pools``: QuotaExceeded when the tenant already has that many (checked in the
        creating transaction, so concurrent creates cannot pass it together)."""
        check_name(name)
        seed = secrets.randbits(63) if seed is None else int(seed)
        if not 0 <= seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")
        now = time.time()
        if name in self.names(tenant=tenant):  # fail before writing a file (checked again below)
            raise AlreadyExists(f"memory {name!r} already exists")
        staged = self._stage(self.lm.new_memory(seed=seed))
        with _removing(staged), contextlib.ExitStack() as stack:
            with self._db_lock:
                if self._db.execute("SELECT 1 FROM pools WHERE tenant=? AND name=?", (tenant, name)).fetchone():
                    raise AlreadyExists(f"memory {name!r} already exists")
                self._check_quota(tenant, max_pools)
                with self._db:  # one transaction: row, file moved in, 'create' event
                    cur = self._db.execute(
                        "INSERT INTO pools(tenant,name,seed,model_id,created_at,state_file,base_file,base_seq,base_reason,next_seq,next_injection_id) "
                        "VALUES (?,?,?,?,?,'','',0,'created empty',1,1)",
                        (tenant, name, seed, self.lm.model_id, now),
                    )
                    pool_id = cur.lastrowid
                    stack.callback(lambda: None if self._exists(pool_id) else shutil.rmtree(self._pool_dir(pool_id), ignore_errors=True))
                    file = self._adopt(pool_id, staged)
                    self._db.execute("UPDATE pools SET state_file=?, base_file=? WHERE id=?", (file, file, pool_id))
                    row = self._db.execute("SELECT * FROM pools WHERE id=?", (pool_id,)).fetchone()
                    seq = self._event(row, "create", now, detail=json.dumps({"seed": seed}))
                    self._db.execute("UPDATE pools SET base_seq=? WHERE id=?", (seq, pool_id))
        return self.info(name, tenant=tenant)

    def _check_quota(self, tenant: str, max_pools: int | None) -> None:
        """(under the DB lock) QuotaExceeded when the tenant holds ``max_pools`` pools."""
        if max_pools is not None and self._db.execute("SELECT COUNT(*) FROM pools WHERE tenant=?", (tenant,)).fetchone()[0] >= max_pools:
            raise QuotaExceeded(f"quota: at most {max_pools} memories per tenant; delete one first")

    def info(self, name: str, *, tenant: str = "") -> PoolInfo:
        row = self._pool(name, tenant)
        return self._info(row)

    def _info(self, row: sqlite3.Row) -> PoolInfo:
        with self._db_lock:
            live = self._db.execute("SELECT COUNT(*) FROM ledger WHERE pool_id=? AND kind='inject' AND status='live'", (row["id"],)).fetchone()[0]
            snaps = self._db.execute("SELECT COUNT(*) FROM snapshots WHERE pool_id=?", (row["id"],)).fetchone()[0]
        return PoolInfo(row["name"], row["tenant"], row["seed"], row["model_id"], row["created_at"], live, self._update_count(row), snaps, row["base_seq"], row["base_reason"])

    def _update_count(self, row: sqlite3.Row) -> int:
        """From the loaded state, or else the state file's header when the design writes its
        counters there as safetensors metadata (MemoryLLM does: listing must not load pools),
        or else by loading the file."""
        state = self._live.get(f"{row['id']}/{row['state_file']}")
        if state is not None:
            return state.update_count
        from safetensors import safe_open

        try:
            with safe_open(str(self._pool_dir(row["id"]) / row["state_file"]), "pt") as f:
                count = (f.metadata() or {}).get("update_count")
            if count is not None:
                return int(count)
        except (OSError, SafetensorError, ValueError):  # replaced by a commit since the row was read, or another format
            pass
        with self._db_lock:
            row = self._db.execute("SELECT * FROM pools WHERE id=?", (row["id"],)).fetchone()
        return self._load_state(row["id"], row["state_file"]).update_count if row else 0

    def list(self, *, tenant: str = "") -> list[PoolInfo]:
        with self._db_lock:
            rows = self._db.execute("SELECT * FROM pools WHERE tenant=? ORDER BY name", (tenant,)).fetchall()
        return [self._info(r) for r in rows]

    def names(self, *, tenant: str = "") -> list[str]:
        with self._db_lock:
            return [r[0] for r in self._db.execute("SELECT name FROM pools WHERE tenant=? ORDER BY name", (tenant,))]

    def tenants(self) -> list[str]:
        with self._db_lock:
            return [r[0] for r in self._db.execute("SELECT DISTINCT tenant FROM pools ORDER BY tenant")]

    def delete(self, name: str, *, tenant: str = "") -> None:
        """Delete a pool, its ledger (texts included) and snapshots."""
        with self._locked_pool(name, tenant) as pool:
            with self._db_lock, self._db:
                self._db.execute("DELETE FROM pools WHERE id=?", (pool["id"],))
            with self._db_lock:
                for key in [k for k in self._live if k.startswith(f"{pool['id']}/")]:
                    del self._live[key]
            shutil.rmtree(self._pool_dir(pool["id"]), ignore_errors=True)

    def memory(self, name: str, *, tenant: str = "") -> Memory:
        """The live pool (shared: read it, do not write it; injections replace it, never mutate it)."""
        for _ in range(3):
            row = self._pool(name, tenant)
            try:
                return self._load_state(row["id"], row["state_file"])
            except MemoryFormatError:
                # an injection may have committed and deleted this file since we read the row
                if (self._pool_dir(row["id"]) / row["state_file"]).exists():
                    raise
        raise StoreError(f"memory {name!r} changes too fast to be read; try again")

    # ------------------------------------------------------------------ writing
    def inject(self, name: str, text: str | Sequence[str], *, source: str = "", store_text: bool = True, allow_short: bool = False, tenant: str = "") -> list[LedgerEntry]:
        """Write one or many texts (in order; one injection id each) into the pool.

        All texts are committed together or not at all: one new state file, one transaction.
        With store_text=False the ledger keeps only hash and token count; replay then starts
        after this injection (see verify)."""
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise ValueError("no texts to inject")
        with self._locked_pool(name, tenant) as pool:
            live = self._load_state(pool["id"], pool["state_file"])
            state = live.clone(deep=False)  # copy on write: readers of `live` are unaffected
            first = pool["next_injection_id"]
            threads = _torch_threads()  # CPU float sums depend on it: replay runs under the same count
            results = [self.lm.inject(state, t, injection_id=first + i, allow_short=allow_short, progress=False) for i, t in enumerate(texts)]
            file = self._write_state(pool["id"], state)
            now = time.time()
            seqs = []
            with self._db_lock, _unless_committed(self._pool_dir(pool["id"]) / file), self._db:
                for t, r in zip(texts, results):
                    seqs.append(self._event(
                        pool, "inject", now, injection_id=r.injection_id, source=source, sha256=text_sha256(t), num_tokens=r.num_tokens,
                        num_chunks=r.num_chunks, allow_short=int(allow_short), text=t if store_text else None, status="live",
                        detail=json.dumps({"torch_threads": threads}),
                    ))
                base = {} if store_text else {"base_file": file, "base_seq": seqs[-1], "base_reason": f"injection {results[-1].injection_id} was stored without its text"}
                sets = {"state_file": file, "next_injection_id": first + len(texts), **base}
                self._db.execute(f"UPDATE pools SET {','.join(f'{k}=?' for k in sets)} WHERE id=?", (*sets.values(), pool["id"]))
            self._remember(pool["id"], file, state)
            self._collect(pool["id"])
        return [LedgerEntry(s, "inject", r.injection_id, now, source, text_sha256(t), r.num_tokens, r.num_chunks, allow_short, t if store_text else None, "live",
                            detail=json.dumps({"torch_threads": threads})) for s, t, r in zip(seqs, texts, results)]

    # ------------------------------------------------------------------ reading
    def generate(self, name: str, prompt, *, tenant: str = "", **sampling):
        return self.lm.generate(self.memory(name, tenant=tenant), prompt, **sampling)

    def stream(self, name: str, prompt, *, tenant: str = "", **sampling) -> Iterator[str]:
        return self.lm.stream(self.memory(name, tenant=tenant), prompt, **sampling)

    def generate_batch(self, names: Sequence[str], prompts: Sequence, *, tenant: str | Sequence[str] = "", **sampling):
        """Row i answers prompts[i] from pool names[i] (of tenant[i]); one forward pass per step."""
        tenants = [tenant] * len(names) if isinstance(tenant, str) else list(tenant)
        return self.lm.generate_batch([self.memory(n, tenant=t) for n, t in zip(names, tenants)], prompts, **sampling)

    def history(self, name: str, *, tenant: str = "", include_text: bool = True) -> list[LedgerEntry]:
        pool = self._pool(name, tenant)
        with self._db_lock:
            rows = self._db.execute("SELECT * FROM ledger WHERE pool_id=? ORDER BY seq", (pool["id"],)).fetchall()
        return [_entry(r, include_text) for r in rows]

    # ------------------------------------------------------------------ versions
    def snapshot(self, name: str, label: str, *, tenant: str = "") -> SnapshotInfo:
        """Name the current version (no copy: state files are immutable)."""
        check_name(label, "snapshot label")
        with self._locked_pool(name, tenant) as pool:
            now = time.time()
            ids = self._live_ids(pool["id"])
            with self._db_lock, self._db:
                if self._db.execute("SELECT 1 FROM snapshots WHERE pool_id=? AND label=?", (pool["id"], label)).fetchone():
                    raise AlreadyExists(f"snapshot {label!r} of memory {name!r} already exists")
                seq = self._event(pool, "snapshot", now, detail=label)
                self._db.execute(
                    "INSERT INTO snapshots VALUES (?,?,?,?,?,?,?,?,?)",
                    (pool["id"], label, now, seq, pool["state_file"], pool["base_file"], pool["base_seq"], pool["base_reason"], json.dumps(ids)),
                )
        return SnapshotInfo(label, now, seq, ids)

    def snapshots(self, name: str, *, tenant: str = "") -> list[SnapshotInfo]:
        pool = self._pool(name, tenant)
        with self._db_lock:
            rows = self._db.execute("SELECT * FROM snapshots WHERE pool_id=? ORDER BY seq", (pool["id"],)).fetchall()
        return [SnapshotInfo(r["label"], r["created_at"], r["seq"], json.loads(r["injections"])) for r in rows]

    def delete_snapshot(self, name: str, label: str, *, tenant: str = "") -> None:
        with self._locked_pool(name, tenant) as pool:
            self._snapshot_row(pool, label)
            with self._db_lock, self._db:
                self._db.execute("DELETE FROM snapshots WHERE pool_id=? AND label=?", (pool["id"], label))
            self._collect(pool["id"])

    def _snapshot_row(self, pool: sqlite3.Row, label: str) -> sqlite3.Row:
        check_name(label, "snapshot label")
        with self._db_lock:
            row = self._db.execute("SELECT * FROM snapshots WHERE pool_id=? AND label=?", (pool["id"], label)).fetchone()
        if row is None:
            raise NotFound(f"snapshot {label!r} of memory {pool['name']!r} not found")
        return row

    def rollback(self, name: str, label: str, *, tenant: str = "") -> SnapshotInfo:
        """Make a snapshot the live version. Injections made since are marked rolled_back in the
        ledger (kept for audit; a rollback to a later snapshot brings them back)."""
        with self._locked_pool(name, tenant) as pool:
            snap = self._snapshot_row(pool, label)
            ids = json.loads(snap["injections"])
            now = time.time()
            with self._db_lock, self._db:
                self._db.execute(
                    f"UPDATE ledger SET status=CASE WHEN injection_id IN ({','.join('?' * len(ids))}) THEN 'live' ELSE 'rolled_back' END "
                    "WHERE pool_id=? AND kind='inject' AND status IN ('live','rolled_back')",
                    (*ids, pool["id"]),
                )
                self._event(pool, "rollback", now, detail=label)
                self._db.execute(
                    "UPDATE pools SET state_file=?, base_file=?, base_seq=?, base_reason=? WHERE id=?",
                    (snap["state_file"], snap["base_file"], snap["base_seq"], snap["base_reason"], pool["id"]),
                )
            self._collect(pool["id"])
        return SnapshotInfo(label, snap["created_at"], snap["seq"], ids)

    def diff(self, name: str, a: str | None = None, b: str | None = None, *, tenant: str = "") -> dict:
        """What differs between two versions (snapshot labels; None = live) and which injections
        wrote it: the design's ``diff`` (for MemoryLLM: slots per layer, added = in b, not in a)."""
        pool = self._pool(name, tenant)
        sa, sb = (self._load_state(pool["id"], self._snapshot_row(pool, x)["state_file"] if x else pool["state_file"]) for x in (a, b))
        d = self.lm.diff(sa, sb)
        return {"from": a or "live", "to": b or "live", "changed_slots": d.pop("changed_units"), **d}

    # ------------------------------------------------------------------ replay and verify
    def _replay(self, pool_id: int, base_file: str, rows: Sequence[sqlite3.Row], skip: int | None = None) -> tuple[Memory, int]:
        state = self._load_state(pool_id, base_file).clone()
        n = 0
        for r in rows:
            if r["injection_id"] == skip:
                continue
            if r["text"] is None:  # bases are placed after every textless injection; a guard
                raise NotReplayable(f"injection {r['injection_id']} (seq {r['seq']}) has no stored text")
            with _threads_as_written(r["detail"]):
                self.lm.inject(state, r["text"], injection_id=r["injection_id"], allow_short=bool(r["allow_short"]), progress=False)
            n += 1
        return state, n

    def replay(self, name: str, *, tenant: str = "") -> Memory:
        """The pool rebuilt from its replay base and the ledger's live injections."""
        pool = self._pool(name, tenant)
        return self._replay(pool["id"], pool["base_file"], self._live_rows(pool["id"], pool["base_seq"]))[0]

    def verify(self, name: str, *, tenant: str = "") -> VerifyReport:
        """Rebuild the pool from its replay base + ledger and compare bit for bit with the live one;
        also checks each replayed text still matches its recorded hash."""
        with self._locked_pool(name, tenant) as pool:
            rows = self._live_rows(pool["id"], pool["base_seq"])
            base_note = f"replay starts at ledger seq {pool['base_seq']} ({pool['base_reason']})"
            bad = [f"injection {r['injection_id']}: text does not match its sha256" for r in rows if r["text"] is not None and text_sha256(r["text"]) != r["sha256"]]
            try:
                live = self._load_state(pool["id"], pool["state_file"])
                rebuilt, n = self._replay(pool["id"], pool["base_file"], rows)
            except (MemoryFormatError, NotReplayable) as e:
                return VerifyReport(False, 0, pool["base_seq"], pool["base_reason"], f"cannot replay: {e}", [str(e)])
        bad += self.lm.differences(live, rebuilt)
        ok = not bad
        msg = f"{'ok' if ok else 'MISMATCH'}: {n} injections replayed; {base_note}"
        return VerifyReport(ok, n, pool["base_seq"], pool["base_reason"], msg, bad)

    # ------------------------------------------------------------------ forgetting
    def forget(self, name: str, injection_id: int, mode: str = "fast", *, tenant: str = "") -> ForgetReport:
        """Remove one injection from the pool and erase its text from the ledger.

        A design whose ``forget`` is exact (``lm.forget_exact``) forgets in place in either mode:
        the pool then equals one that never received the injection, so nothing is replayed and
        the replay base stays where it is (rid of the injection too when it holds it). Otherwise:

        fast:  the design's ``forget`` (MemoryLLM: every slot the injection wrote is reset).
               Later injections read its slots while they were written, so traces of it may
               remain in *theirs*; replay starts after this forget.
        exact: the pool is rebuilt by replaying the ledger without it, which needs the text of
               every live injection after the replay base (NotReplayable otherwise).
        Either way the ledger keeps only hash, token count and deletion time, and snapshots
        that contain the injection are deleted (a rollback must not bring it back)."""
        if mode not in FORGET_MODES:
            raise ValueError(f"mode must be one of {FORGET_MODES}, got {mode!r}")
        given = injection_id
        try:
            injection_id = operator.index(injection_id)  # ints, numpy ints; not floats or strings
        except TypeError:
            injection_id = 0
        if not 1 <= injection_id < 2**63:  # SQLite's integers are 64-bit
            raise ValueError(f"injection_id must be an integer in [1, 2**63), got {given!r}")
        with self._locked_pool(name, tenant) as pool:
            with self._db_lock:
                target = self._db.execute("SELECT * FROM ledger WHERE pool_id=? AND kind='inject' AND injection_id=?", (pool["id"], injection_id)).fetchone()
                snaps = self._db.execute("SELECT label, injections FROM snapshots WHERE pool_id=?", (pool["id"],)).fetchall()
            if target is None:
                raise NotFound(f"injection {injection_id} not found in memory {name!r}")
            if target["status"] == "forgotten":
                raise NotFound(f"injection {injection_id} of memory {name!r} was already forgotten")
            doomed = [s["label"] for s in snaps if injection_id in json.loads(s["injections"])]
            was_live = target["status"] == "live"  # a rolled-back injection is in no live state or base
            live = self._load_state(pool["id"], pool["state_file"])
            slots = int((self.lm.owners(live) == injection_id).sum())
            new_state, new_base, replayed = None, None, 0
            in_base = target["seq"] <= pool["base_seq"]  # the base holds every live injection up to base_seq
            # a design whose forget is exact forgets in place, unless this time it could not be
            # (ForgetResult.exact False, e.g. a bank that has evicted chunks since): then as below
            forgotten, exact_in_place = None, False
            if was_live and self.lm.forget_exact:
                forgotten, result = self._without(live, injection_id)
                exact_in_place = result.exact
            if was_live and exact_in_place:
                new_state = forgotten
                if in_base:
                    same = pool["base_file"] == pool["state_file"]
                    new_base = new_state if same else self._without(self._load_state(pool["id"], pool["base_file"]), injection_id)[0]
            elif was_live and mode == "exact":
                if in_base:
                    raise NotReplayable(
                        f"exact forget of injection {injection_id} needs a replay from before it, but replay starts at seq "
                        f"{pool['base_seq']} ({pool['base_reason']}); use mode='fast'"
                    )
                new_state, replayed = self._replay(pool["id"], pool["base_file"], self._live_rows(pool["id"], pool["base_seq"]), skip=injection_id)
            elif was_live:
                new_state = forgotten if forgotten is not None else self._without(live, injection_id)[0]
            file = self._write_state(pool["id"], new_state) if new_state is not None else None
            base_file = file if new_base is new_state else None
            if new_base is not None and base_file is None:
                try:
                    base_file = self._write_state(pool["id"], new_base)
                except BaseException:
                    (self._pool_dir(pool["id"]) / file).unlink(missing_ok=True)
                    raise
            now = time.time()
            written = [self._pool_dir(pool["id"]) / f for f in {file, base_file} if f is not None]
            with self._db_lock, _unless_committed(*written), self._db:
                self._db.execute(
                    "UPDATE ledger SET text=NULL, status='forgotten', deleted_at=?, detail=? WHERE pool_id=? AND seq=?",
                    (now, f"forgotten ({mode})", pool["id"], target["seq"]),
                )
                seq = self._event(pool, "forget", now, injection_id=injection_id, detail=json.dumps({"mode": mode, "snapshots_deleted": doomed}))
                if file is not None:
                    sets = {"state_file": file}
                    if base_file is not None:
                        sets["base_file"] = base_file
                    elif mode == "fast" and not exact_in_place:  # not recomputable from texts: replay starts here
                        sets |= {"base_file": file, "base_seq": seq, "base_reason": f"injection {injection_id} was forgotten (fast)"}
                    self._db.execute(f"UPDATE pools SET {','.join(f'{k}=?' for k in sets)} WHERE id=?", (*sets.values(), pool["id"]))
                if doomed:
                    self._db.execute(f"DELETE FROM snapshots WHERE pool_id=? AND label IN ({','.join('?' * len(doomed))})", (pool["id"], *doomed))
            with self._db_lock:  # the WAL still holds the old page with the text: fold it in, truncate
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            if file is not None:
                self._remember(pool["id"], file, new_state)
            if base_file is not None and base_file != file:
                self._remember(pool["id"], base_file, new_base)
            self._collect(pool["id"])
        return ForgetReport(injection_id, mode, slots, replayed, doomed, was_live)

    def _without(self, state: Memory, injection_id: int) -> tuple[Memory, ForgetResult]:
        """A copy of ``state`` with the injection forgotten by the design (``state`` is shared),
        and what the design says of it."""
        copy = state.clone()
        return copy, self.lm.forget(copy, injection_id)

    # ------------------------------------------------------------------ export / import
    def _sign(self, manifest: dict) -> str:
        """HMAC-SHA256 with this data directory's key over the manifest, which lists the sha256 of
        every member: only this server (or one given the same ``export.key``) makes files that
        ``import_file(require_signature=True)`` accepts, so a pool cannot be re-labelled to pass."""
        return hmac.new(self._secret, _signed_part(manifest), hashlib.sha256).hexdigest()

    def export(self, name: str, path: str | os.PathLike, *, tenant: str = "") -> Path:
        """One zip file (deflate): manifest.json (pool facts + ledger + the sha256 of each member,
        signed with this server's key) and live.safetensors / base.safetensors. A state equal to
        the empty memory of the pool's seed (the replay base of a pool that never became
        unreplayable, the live state of one never written) is left out and listed in ``empty``:
        import rebuilds it; a base that is the live state itself (after a textless injection) is
        written once (``base_is_live``). Snapshots are not exported. Written atomically."""
        with self._locked_pool(name, tenant) as pool:
            d = self._pool_dir(pool["id"])
            files = dict(zip(EXPORT_STATES, (pool["state_file"], pool["base_file"])))
            blank = self.lm.new_memory(seed=pool["seed"])
            empty = [k for k, f in files.items() if self._load_state(pool["id"], f).equal(blank)]
            same = files["base"] == files["live"]
            members = {k: f for k, f in files.items() if k not in empty and not (k == "base" and same)}
            manifest = {
                "format": EXPORT_FORMAT, "name": pool["name"], "seed": pool["seed"], "model_id": pool["model_id"],
                "created_at": pool["created_at"], "exported_at": time.time(), "base_seq": pool["base_seq"], "base_reason": pool["base_reason"],
                "next_injection_id": pool["next_injection_id"], "empty": empty, "base_is_live": same,
                "ledger": [e.to_dict() for e in self.history(name, tenant=tenant)],
                "members": {f"{k}.safetensors": _file_sha256(d / f) for k, f in members.items()},
            }
            manifest["signature"] = self._sign(manifest)

            def write(tmp):
                # level 1: float tensors barely compress at any level (a few %), while what does
                # (never-written slots, provenance, the manifest) compresses as well at level 1
                with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
                    z.writestr("manifest.json", json.dumps(manifest, indent=1))
                    for k, f in members.items():
                        z.write(d / f, f"{k}.safetensors")

            atomic_write(path, write)
        return Path(path)

    def import_file(self, path: str | os.PathLike, name: str | None = None, *, tenant: str = "", require_signature: bool = False,
                    max_unpacked_bytes: int = DEFAULT_UNPACKED_MAX, max_pools: int | None = None) -> PoolInfo:
        """Create a pool from an exported file (under its own name unless `name` is given).
        The ledger is kept (ids, texts, statuses); replay still starts at the exported base.
        A state the export left out as empty is rebuilt as ``new_memory(seed)``.

        ``require_signature`` (what the service asks): the manifest must carry this server's
        signature (see ``_sign``) and every member its listed sha256; without it, files of older
        versions and of other servers import too (local files an operator chose). Members are
        decompressed only up to ``max_unpacked_bytes`` together. Every refusal is an
        ImportRefused (or InvalidName / AlreadyExists / QuotaExceeded) whose message names the
        member, never a server path, and leaves nothing behind."""
        label = Path(path).name
        try:
            z = zipfile.ZipFile(path)
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise ImportRefused(f"{label} is not a memory export: {e}") from e
        with z:
            try:
                infos = {i.filename: i for i in z.infolist()}
                info = infos["manifest.json"]
                if info.file_size > MANIFEST_MAX_BYTES:
                    raise ImportRefused(f"{label}: manifest.json unpacks to {info.file_size} bytes, the limit is {MANIFEST_MAX_BYTES}")
                unpacked = sum(i.file_size for n, i in infos.items() if n.endswith(".safetensors"))
                if unpacked > max_unpacked_bytes:
                    raise ImportRefused(f"{label}: its states unpack to {unpacked} bytes, the limit is {max_unpacked_bytes} bytes")
                manifest = json.loads(z.read(info))
            except ImportRefused:
                raise
            except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError, RuntimeError, NotImplementedError) as e:  # RuntimeError: encrypted
                raise ImportRefused(f"{label} is not a memory export: {e}") from e
            if not isinstance(manifest, dict) or manifest.get("format") not in EXPORT_FORMATS:
                raise ImportRefused(f"{label}: unknown export format, expected one of {', '.join(map(repr, EXPORT_FORMATS))}")
            if require_signature:
                sig = manifest.get("signature")
                if not isinstance(sig, str) or not hmac.compare_digest(sig, self._sign(manifest)):
                    raise ImportRefused(f"{label}: not signed by this server (exports are signed with the data directory's "
                                        f"{SECRET_FILE}); export it from this server, or import it locally with memoryllm import")
                if manifest.get("model_id") != self.lm.model_id:
                    raise ImportRefused(f"{label}: memory was made for model {manifest.get('model_id')!r}, this model is {self.lm.model_id!r}")
            name = check_name(name or manifest.get("name", ""))
            try:
                ledger = [{c: e.get(c) for c in LedgerEntry.__dataclass_fields__} for e in manifest["ledger"]]
                facts = (int(manifest["seed"]), int(manifest["base_seq"]), str(manifest["base_reason"]), int(manifest["next_injection_id"]))
                last_seq = max([int(e["seq"]) for e in ledger], default=0)
                empty, same = set(manifest.get("empty", [])), manifest.get("base_is_live", False)
                if not 0 <= facts[0] < 2**63 or not empty <= set(EXPORT_STATES) or not isinstance(same, bool):
                    raise ValueError(f"seed {facts[0]} or empty states {sorted(empty)} out of range")
                if not all(-(2**63) <= x < 2**63 for x in (facts[1], facts[3], last_seq)):
                    raise ValueError("base_seq, next_injection_id or a seq out of range")
            except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
                raise ImportRefused(f"{label}: damaged manifest: {e!r}"[:500]) from e
            if empty and manifest.get("model_id") != self.lm.model_id:  # what load_memory checks for a stored state
                raise ImportRefused(f"{label}: memory was made for model {manifest.get('model_id')!r}, this model is {self.lm.model_id!r}")
            with tempfile.TemporaryDirectory(dir=self.staging()) as tmp:  # recover() removes it after a crash
                states = {k: self.lm.new_memory(seed=facts[0]) if k in empty else self._import_state(z, f"{k}.safetensors", Path(tmp), label, manifest, require_signature)
                          for k in EXPORT_STATES[: 1 if same else 2]}
                staged = {k: self._stage(st) for k, st in states.items()}
                now = time.time()
                with self._db_lock, _removing(*staged.values()), contextlib.ExitStack() as stack:
                    if self._db.execute("SELECT 1 FROM pools WHERE tenant=? AND name=?", (tenant, name)).fetchone():
                        raise AlreadyExists(f"memory {name!r} already exists")
                    self._check_quota(tenant, max_pools)
                    with self._db:
                        cur = self._db.execute(
                            "INSERT INTO pools(tenant,name,seed,model_id,created_at,state_file,base_file,base_seq,base_reason,next_seq,next_injection_id) "
                            "VALUES (?,?,?,?,?,'','',?,?,?,?)",
                            (tenant, name, facts[0], self.lm.model_id, now, facts[1], facts[2], last_seq + 1, facts[3]),
                        )
                        pool_id = cur.lastrowid
                        stack.callback(lambda: None if self._exists(pool_id) else shutil.rmtree(self._pool_dir(pool_id), ignore_errors=True))
                        files = {k: self._adopt(pool_id, f) for k, f in staged.items()}
                        files.setdefault("base", files["live"])  # base_is_live: one file, two references
                        self._db.execute("UPDATE pools SET state_file=?, base_file=? WHERE id=?", (files["live"], files["base"], pool_id))
                        cols = list(LedgerEntry.__dataclass_fields__)
                        try:
                            self._db.executemany(
                                f"INSERT INTO ledger(pool_id,{','.join(cols)}) VALUES (?{',?' * len(cols)})",
                                [(pool_id, *[e[c] for c in cols]) for e in ledger],
                            )
                        except (sqlite3.Error, OverflowError) as e:  # repeated seq numbers, values of the wrong type, ints over 64 bits
                            raise ImportRefused(f"{label}: damaged ledger: {e}") from e
                        row = self._db.execute("SELECT * FROM pools WHERE id=?", (pool_id,)).fetchone()
                        self._event(row, "import", now, detail=json.dumps({"from": label, "exported_at": manifest.get("exported_at")}))
        return self.info(name, tenant=tenant)

    def _import_state(self, z: zipfile.ZipFile, member: str, tmp: Path, label: str, manifest: dict, check_digest: bool) -> Memory:
        """One member of an import, extracted into ``tmp`` and loaded by the model; any failure is
        an ImportRefused naming the member (not the temp path)."""
        try:
            extracted = z.extract(member, tmp)
        except KeyError:
            raise ImportRefused(f"{label}: missing {member}") from None
        except (OSError, ValueError, zipfile.BadZipFile, EOFError, RuntimeError) as e:
            raise ImportRefused(f"{label}: {member} cannot be unpacked: {e}") from None
        if check_digest and (manifest.get("members") or {}).get(member) != _file_sha256(Path(extracted)):
            raise ImportRefused(f"{label}: {member} does not match the sha256 its signed manifest lists")
        try:
            return self.lm.load_memory(extracted)
        except MemoryFormatError as e:
            raise ImportRefused(f"{label}: {member}: {str(e).replace(str(extracted), member)}") from None
        except Exception as e:  # a state of another shape fails inside the design's loader
            raise ImportRefused(f"{label}: {member} is not a state of this model ({type(e).__name__}: {str(e).replace(str(extracted), member)[:300]})") from None


    # ------------------------------------------------------------------ search
    def search(self, name: str, query: str, *, tenant: str = "", limit: int = 20) -> list[LedgerEntry]:
        """Injections of the pool whose stored text contains every word of ``query``
        (case-insensitive substrings, in any order; a one-word query is a substring search),
        newest first, at most ``limit``. Live and rolled-back injections are searched;
        forgotten ones and those stored without text have no text and never match."""
        words = query.casefold().split() if isinstance(query, str) else []
        if not words:
            raise ValueError("search query is empty")
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        pool = self._pool(name, tenant)
        with self._db_lock:
            rows = self._db.execute(
                "SELECT * FROM ledger WHERE pool_id=? AND kind='inject' AND text IS NOT NULL ORDER BY seq DESC", (pool["id"],)
            ).fetchall()
        hits = []
        for r in rows:
            text = r["text"].casefold()
            if all(w in text for w in words):
                hits.append(_entry(r))
                if len(hits) == limit:
                    break
        return hits

@contextlib.contextmanager
def _unless_committed(*paths: Path):
    """Delete files written for a transaction that failed (no row will ever name them)."""
    try:
        yield
    except BaseException:
        for p in paths:
            p.unlink(missing_ok=True)
        raise


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


@contextlib.contextmanager
def _threads_as_written(detail: str | None):
    """Run a replayed injection under the torch thread count recorded when it was written
    (ledger ``detail`` {"torch_threads": n}): CPU kernels split float sums by thread, so a
    write replays bit for bit only at its own count. Rows without a record (older ledgers) run
    at the current count. The count is process-wide while it is changed."""
    try:
        want = json.loads(detail).get("torch_threads") if detail else None
    except (ValueError, AttributeError):
        want = None
    import torch

    have = torch.get_num_threads()
    if not isinstance(want, int) or want < 1 or want == have:
        yield
        return
    torch.set_num_threads(want)
    try:
        yield
    finally:
        torch.set_num_threads(have)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _signed_part(manifest: dict) -> bytes:
    return json.dumps({k: v for k, v in manifest.items() if k != "signature"}, sort_keys=True).encode()


@contextlib.contextmanager
def _removing(*paths: Path):
    """Delete staged files that were not moved into a pool (on error or refusal)."""
    try:
        yield
    finally:
        for p in paths:
            p.unlink(missing_ok=True)


def _entry(r: sqlite3.Row, include_text: bool = True) -> LedgerEntry:
    e = LedgerEntry(**{k: r[k] for k in LedgerEntry.__dataclass_fields__})
    if e.allow_short is not None:
        e.allow_short = bool(e.allow_short)
    if not include_text:
        e.text = None
    return e
