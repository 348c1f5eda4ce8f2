"""Per-user memories on disk and over HTTP, for any design behind ``latentmem.api.MemoryModel``.

    store.py    MemoryStore: named memories per tenant, SQLite ledger, snapshots/rollback,
                replay + verify, forgetting, export/import; crash-safe writes
    service.py  the HTTP service over the store: API keys, batched generation, metrics, limits,
                create_app, the serve / verify / keys commands
    app.py      the FastAPI app (serve extra): request bodies, tenant and name dependencies,
                routers, error statuses
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
