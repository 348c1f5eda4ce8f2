"""Per-user memories on disk and over HTTP, for any design behind ``latentmem.api.MemoryModel``.

    store.py    MemoryStore: named memories per tenant, SQLite ledger, snapshots/rollback,
                replay + verify, forgetting, export/import; crash-safe writes
    service.py  the HTTP service over the store: API keys, tenants, batched generation
"""

from .store import (
    FORGET_MODES,
    AlreadyExists,
    ForgetReport,
    InvalidName,
    LedgerEntry,
    MemoryStore,
    NotFound,
    NotReplayable,
    PoolInfo,
    SnapshotInfo,
    StoreBusy,
    StoreError,
    VerifyReport,
)

__all__ = [
    "FORGET_MODES", "AlreadyExists", "ForgetReport", "InvalidName", "LedgerEntry", "MemoryStore", "NotFound",
    "NotReplayable", "PoolInfo", "SnapshotInfo", "StoreBusy", "StoreError", "VerifyReport",
]
