"""The memory a verb works on: a named memory in a data directory (``MemoryStore``, the default,
with its ledger, exact forgetting and search) or a memory state file (``--memory FILE``, the
pre-store way, kept for old users and as the export format)."""

from __future__ import annotations

import json
import tempfile
import time
import zipfile
from pathlib import Path

from .options import CLIError, default_data_dir


def check_free(data: Path) -> None:
    """Refuse, before any model is loaded, a data directory another process holds (the
    service, or another CLI command): MemoryStore takes ``<data>/.lock`` for its lifetime."""
    lock = data / ".lock"
    if not lock.exists():
        return
    from filelock import FileLock, Timeout

    probe = FileLock(str(lock))
    try:
        probe.acquire(timeout=0)
    except Timeout:
        raise CLIError(f"{data} is in use by another process (a running `memoryllm serve --data {data}`?): stop it first, or use its HTTP API") from None
    probe.release()


class _NoModel:
    """The model of a store opened by a verb that needs none (history, search, list)."""

    def __getattr__(self, name):
        raise RuntimeError(f"this command opened the data directory without a model (needed for {name!r})")


class StoreMemories:
    """A named memory of one data directory."""

    def __init__(self, data: str | None, name: str, tenant: str = "", seed: int = 0):
        from ..store.store import check_name

        self.data = Path(data).expanduser() if data else default_data_dir()
        self.name, self.tenant, self.seed = check_name(name), tenant, seed
        self.store = self.lm = None

    @property
    def label(self) -> str:
        return f"memory {self.name!r} in {self.data}"

    def precheck(self, *, must_exist: bool) -> None:
        """Before the model loads: the data directory exists when it must, and is not busy."""
        if must_exist and not (self.data / "store.db").is_file():
            raise CLIError(f"no memories in {self.data} (nothing injected there yet; --data DIR names another data directory)")
        check_free(self.data)

    def open(self, lm=None) -> StoreMemories:
        """Open the data directory if it has a store; a first write creates it (so reading a
        typo'd --data creates nothing)."""
        self.lm = lm if lm is not None else _NoModel()
        if (self.data / "store.db").is_file():
            self._writable()
        return self

    def _writable(self):
        from ..store.store import MemoryStore

        if self.store is None:
            self.store = MemoryStore(self.data, self.lm)
        return self.store

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None

    def __enter__(self) -> StoreMemories:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- reading
    def exists(self) -> bool:
        return self.store is not None and self.name in self.store.names(tenant=self.tenant)

    def require(self) -> None:
        if not self.exists():
            raise CLIError(f"{self.label} does not exist (`memoryllm list --data {self.data}` lists the memories; --name picks one)")

    def memory(self):
        """The live memory, or None when this name has none yet."""
        return self.store.memory(self.name, tenant=self.tenant) if self.exists() else None

    def facts(self) -> str:
        if not self.exists():
            return f"{self.name} in {self.data} (new)"
        info = self.store.info(self.name, tenant=self.tenant)
        return f"{self.name} in {self.data} ({info.live_injections} live injections, {info.snapshots} snapshots)"

    def history(self):
        self.require()
        return self.store.history(self.name, tenant=self.tenant)

    def search(self, query: str, limit: int = 20):
        self.require()
        return self.store.search(self.name, query, tenant=self.tenant, limit=limit)

    # ---- writing
    def inject(self, text: str, *, allow_short: bool = False, source: str = "cli") -> tuple[int, int, int, int]:
        """(injection id, tokens, updates it took, the memory's update count)."""
        if not self.exists():
            self._writable().create(self.name, seed=self.seed, tenant=self.tenant)
        (entry,) = self.store.inject(self.name, text, source=source, allow_short=allow_short, tenant=self.tenant)
        return entry.injection_id, entry.num_tokens, entry.num_chunks, self.store.memory(self.name, tenant=self.tenant).update_count

    def forget(self, injection_id: int, *, fast: bool = False) -> str:
        self.require()
        r = self.store.forget(self.name, injection_id, "fast" if fast else "exact", tenant=self.tenant)
        how = f"{r.replayed} later injections replayed, as if never injected" if r.mode == "exact" else "its slots reset (fast: later injections may keep traces)"
        dropped = f"; snapshots deleted: {', '.join(r.snapshots_deleted)}" if r.snapshots_deleted else ""
        return f"forgot #{injection_id} ({how}); its text is erased from the ledger{dropped}"

    def reset(self) -> str:
        """Delete the memory (ledger and snapshots too) and start it again empty, same seed."""
        self.require()
        info = self.store.info(self.name, tenant=self.tenant)
        self.store.delete(self.name, tenant=self.tenant)
        self.store.create(self.name, seed=info.seed, tenant=self.tenant)
        return f"reset {self.label}: {info.live_injections} injections and {info.snapshots} snapshots removed"

    # ---- export / import
    def export(self, path: Path) -> str:
        """A .safetensors path: the live memory state (usable with --memory); else the store's
        zip export (state + ledger, for `memoryllm import` or the service)."""
        self.require()
        if path.suffix == ".safetensors":
            self.store.memory(self.name, tenant=self.tenant).save(path)
            return f"exported the memory state of {self.label} to {path} (no ledger: use a .zip for the history)"
        self.store.export(self.name, path, tenant=self.tenant)
        return f"exported {self.label} with its ledger to {path}"

    def import_file(self, path: Path, lm) -> str:
        """A store export (zip) or a memory state file (.safetensors) becomes this memory."""
        if not path.is_file():
            raise CLIError(f"{path} does not exist")
        self._writable()
        if zipfile.is_zipfile(path):
            info = self.store.import_file(path, self.name, tenant=self.tenant)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                info = self.store.import_file(_state_as_export(path, lm, self.name, Path(tmp)), self.name, tenant=self.tenant)
        return f"imported {path} as {self.label} ({info.live_injections} live injections, {info.update_count} updates)"


def _state_as_export(path: Path, lm, name: str, tmp: Path) -> Path:
    """A memory state file wrapped as a store export (format 1: its state is both the live state
    and the replay base, with an empty ledger), so the store's own import checks and adopts it."""
    from ..store.store import EXPORT_FORMATS

    state = lm.load_memory(path)  # refuses another model's memory before anything is written
    manifest = {
        "format": EXPORT_FORMATS[0], "name": name, "seed": state.seed, "model_id": state.model_id or lm.model_id,
        "created_at": time.time(), "exported_at": time.time(), "base_seq": 0,
        "base_reason": f"imported from the memory state file {path.name} (its injections' texts are not known)",
        "next_injection_id": state.last_injection_id + 1, "ledger": [],
    }
    out = tmp / "state.zip"
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("manifest.json", json.dumps(manifest))
        z.write(path, "live.safetensors")
        z.write(path, "base.safetensors")
    return out


class FileMemories:
    """A memory state file (``--memory FILE``): no ledger, so no history, search or exact forget."""

    def __init__(self, path: str, seed: int = 0):
        self.path, self.seed = Path(path), seed
        self.lm = self._state = None

    @property
    def label(self) -> str:
        return f"memory file {self.path}"

    def precheck(self, *, must_exist: bool) -> None:
        if must_exist and not self.path.exists():
            raise CLIError(f"memory file {self.path} does not exist (inject something first)")

    def open(self, lm) -> FileMemories:
        self.lm = lm
        return self

    def close(self) -> None:
        pass

    def __enter__(self) -> FileMemories:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def exists(self) -> bool:
        return self.path.exists()

    def require(self) -> None:
        self.precheck(must_exist=True)

    def memory(self):
        """The file's memory, or a new empty one when the file does not exist yet."""
        if self._state is None:
            self._state = self.lm.load_memory(self.path) if self.path.exists() else self.lm.new_memory(seed=self.seed)
        return self._state

    def facts(self) -> str:
        return f"{self.path} ({'exists' if self.path.exists() else 'new'})"

    def history(self):
        raise CLIError(f"a memory file keeps no ledger ({self.path}): history, search and exact forget work on a data directory "
                       f"(drop --memory; `memoryllm import {self.path}` brings this memory in)")

    def search(self, query: str, limit: int = 20):
        return self.history()

    def inject(self, text: str, *, allow_short: bool = False, source: str = "cli") -> tuple[int, int, int, int]:
        mem = self.memory()
        r = self.lm.inject(mem, text, allow_short=allow_short)
        mem.save(self.path)
        return r.injection_id, r.num_tokens, r.num_chunks, mem.update_count

    def forget(self, injection_id: int, *, fast: bool = False) -> str:
        self.require()
        mem = self.memory()
        if not 1 <= injection_id <= mem.last_injection_id:
            raise CLIError(f"no injection #{injection_id} in {self.label} (ids 1..{mem.last_injection_id})")
        r = self.lm.forget(mem, injection_id)
        mem.save(self.path)
        note = f"; not exact: {r.note}" if not r.exact and r.note else ""
        return f"forgot #{injection_id}: {r.removed_units} slots reset{note} (a memory file has no texts to replay: use a data directory for exact forgetting)"

    def reset(self) -> str:
        self.require()
        seed = self.memory().seed
        self._state = self.lm.new_memory(seed=seed)
        self._state.save(self.path)
        return f"reset {self.label}: empty again (seed {seed})"


def memories_of(args, *, seed: int = 0):
    """The memory a verb's arguments name: ``--memory FILE`` or ``--data DIR --name NAME``."""
    if getattr(args, "memory", None):
        return FileMemories(args.memory, seed=seed)
    return StoreMemories(args.data, args.name, getattr(args, "tenant", ""), seed=seed)
