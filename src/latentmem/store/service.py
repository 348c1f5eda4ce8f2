"""HTTP service over MemoryStore: tenants with API keys, one memory namespace per tenant.

    memoryllm keys create --data data/ --tenant acme      # prints the key once
    memoryllm serve --data data/ --port 8000              # OpenAPI at /docs and /openapi.json

    curl -H "Authorization: Bearer $KEY" -d '{"name": "alice"}' localhost:8000/v1/memories
    curl -H "Authorization: Bearer $KEY" -d '{"text": "..."}' localhost:8000/v1/memories/alice/inject
    curl -H "Authorization: Bearer $KEY" -d '{"prompt": "...", "stream": true}' localhost:8000/v1/memories/alice/generate

Injections into one pool are serialised by the store; generations for different pools that
arrive within ``batch_wait_ms`` of each other go through the model together
(``MemoryModel.generate_batch``). Another tenant's memory answers 404, exactly like a missing one.

This module holds what needs no web framework (keys, batching, metrics, the body limit, the
settings, the ``serve`` / ``verify`` / ``keys`` commands); ``app.py`` builds the FastAPI app
behind ``create_app``.
"""


import hashlib
import json
import os
import queue
import secrets
import sqlite3
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from ..api import Memory, MemoryModel
from .store import MemoryStore, NotFound, StoreError, check_name

KEY_PREFIX = "mlk"


# ---------------------------------------------------------------------------------------------
# API keys: only sha256(key) is stored; the key itself is shown once, at creation
# ---------------------------------------------------------------------------------------------
class KeyStore:
    """API keys in ``<data_dir>/keys.db``. A key is ``mlk_<key id>_<secret>``; lookups hash
    the presented key, so the database never holds anything that authenticates."""

    def __init__(self, data_dir: str | os.PathLike):
        Path(data_dir).mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(Path(data_dir) / "keys.db", check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS api_keys(key_id TEXT PRIMARY KEY, key_sha256 TEXT UNIQUE NOT NULL, tenant TEXT NOT NULL, "
            "label TEXT NOT NULL, created_at REAL NOT NULL, revoked_at REAL)"
        )
        self._db.commit()
        self._lock = threading.Lock()

    def create(self, tenant: str, label: str = "") -> tuple[str, str]:
        """(key id, key): the key is not stored and cannot be shown again."""
        check_name(tenant, "tenant")
        key_id = secrets.token_hex(4)
        key = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
        with self._lock, self._db:
            self._db.execute("INSERT INTO api_keys VALUES (?,?,?,?,?,NULL)", (key_id, _sha256(key), tenant, label, time.time()))
        return key_id, key

    def list(self) -> list[dict]:
        with self._lock:
            return [dict(r) | {"key_sha256": None} for r in self._db.execute("SELECT * FROM api_keys ORDER BY created_at")]

    def revoke(self, key_id: str) -> None:
        with self._lock, self._db:
            cur = self._db.execute("UPDATE api_keys SET revoked_at=? WHERE key_id=? AND revoked_at IS NULL", (time.time(), key_id))
        if cur.rowcount == 0:
            raise NotFound(f"no active key with id {key_id!r}")

    def tenant(self, key: str) -> str | None:
        """The tenant of a valid, unrevoked key; None otherwise. Read per request, so a
        revocation from the CLI takes effect on the next request."""
        with self._lock:
            row = self._db.execute("SELECT tenant FROM api_keys WHERE key_sha256=? AND revoked_at IS NULL", (_sha256(key),)).fetchone()
        return row[0] if row else None

    def close(self) -> None:
        self._db.close()


def _sha256(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Micro-batching of generations
# ---------------------------------------------------------------------------------------------
@dataclass
class _Job:
    state: Memory | None
    prompt: object
    params: dict
    future: Future


class GenerateBatcher:
    """Collects generate requests for up to ``max_wait_s`` (or ``max_batch`` of them) and runs
    each group with equal sampling parameters through ``lm.generate_batch`` as one batch.

    Seeded sampling is never batched with others: its random draws would depend on what it was
    batched with. A batch that fails is retried row by row, so one bad request fails alone."""

    def __init__(self, lm: MemoryModel, max_batch: int = 8, max_wait_s: float = 0.005, on_batch=None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.lm, self.max_batch, self.max_wait_s, self.on_batch = lm, max_batch, max_wait_s, on_batch
        self._q: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="generate-batcher", daemon=True)
        self._thread.start()

    def submit(self, state: Memory | None, prompt, **params) -> Future:
        fut: Future = Future()
        self._q.put(_Job(state, prompt, params, fut))
        return fut

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            first = self._q.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                try:
                    job = self._q.get(timeout=max(deadline - time.monotonic(), 0))
                except queue.Empty:
                    break
                if job is None:
                    self._q.put(None)
                    break
                batch.append(job)
            groups = defaultdict(list)
            for i, job in enumerate(batch):
                key = i if job.params.get("seed") is not None else json.dumps(job.params, sort_keys=True, default=str)
                groups[key].append(job)
            for jobs in groups.values():
                self._run(jobs)

    def _run(self, jobs: list[_Job]) -> None:
        try:
            outs = self.lm.generate_batch([j.state for j in jobs], [j.prompt for j in jobs], **jobs[0].params)
        except Exception as e:
            if len(jobs) == 1:
                jobs[0].future.set_exception(e)
                return
            for j in jobs:
                self._run([j])
            return
        if self.on_batch:
            self.on_batch(len(jobs))
        for j, out in zip(jobs, outs):
            j.future.set_result(out)


# ---------------------------------------------------------------------------------------------
# Metrics (Prometheus text format, no dependency)
# ---------------------------------------------------------------------------------------------
class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.counters: dict[tuple, float] = defaultdict(float)
        self.started = time.time()

    def inc(self, name: str, value: float = 1.0, **labels) -> None:
        with self._lock:
            self.counters[(name, tuple(sorted(labels.items())))] += value

    def render(self, gauges: dict[str, float]) -> str:
        lines = []
        with self._lock:
            items = sorted(self.counters.items())
        for name, value in [("latentmem_uptime_seconds", time.time() - self.started), *gauges.items()]:
            lines += [f"# TYPE {name} gauge", f"{name} {value:g}"]
        typed = set()
        for (name, labels), value in items:
            if name not in typed:
                typed.add(name)
                lines.append(f"# TYPE {name} counter")
            lab = ",".join(f'{k}="{v}"' for k, v in labels)
            lines.append(f"{name}{{{lab}}} {value:g}" if lab else f"{name} {value:g}")
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Request body limit (pure ASGI: refuses before the app parses anything)
# ---------------------------------------------------------------------------------------------
class BodyLimit:
    def __init__(self, app, max_bytes: int, import_max_bytes: int):
        self.app, self.max_bytes, self.import_max_bytes = app, max_bytes, import_max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.import_max_bytes if scope["path"].endswith("/import") else self.max_bytes
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _too_large(send, int(declared), limit)
        messages, size = [], 0
        while True:  # read the body (also a chunked one) up to the limit
            msg = await receive()
            if msg["type"] != "http.request":
                messages.append(msg)
                break
            size += len(msg.get("body", b""))
            if size > limit:
                return await _too_large(send, size, limit, at_least=True)
            messages.append(msg)
            if not msg.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


async def _too_large(send, size: int, limit: int, at_least: bool = False) -> None:
    detail = f"request body too large: {'more than ' if at_least else ''}{size} bytes, the limit is {limit} bytes; split the text into several injections"
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------------------------
# Limits, and the app (built in app.py)
# ---------------------------------------------------------------------------------------------
@dataclass
class ServiceSettings:
    max_body_bytes: int = 1 << 20  # 1 MiB: ~250k tokens of text per request
    max_import_bytes: int = 2 << 30  # an exported pool (the default model's is ~300 MB)
    max_new_tokens: int = 512
    max_texts: int = 64  # texts per inject request
    max_pools_per_tenant: int = 1000  # each pool is a state file (141 MB for the default model)
    max_batch: int = 8  # generations batched together (1: one at a time)
    batch_wait_ms: float = 5.0


def create_app(store: MemoryStore, keys: KeyStore | None = None, settings: ServiceSettings | None = None):
    """The FastAPI app over ``store`` (the ``serve`` extra): its bodies, dependencies, routers
    and error statuses are in ``app.py``; keys default to ``<store.dir>/keys.db``."""
    from .app import build_app

    return build_app(store, keys or KeyStore(store.dir), settings or ServiceSettings())


# ---------------------------------------------------------------------------------------------
# CLI: memoryllm serve / memoryllm keys ...
# ---------------------------------------------------------------------------------------------
def add_parser(subparsers) -> None:
    from .. import DESIGNS

    p = subparsers.add_parser("serve", help="HTTP service: per-tenant memories (FastAPI + uvicorn)")
    p.add_argument("--data", required=True, help="data directory (pools, ledger, keys)")
    p.add_argument("--model", default=None, help="local model folder (default: embedded SmolLM2-135M)")
    p.add_argument("--design", default="memoryllm", choices=sorted(DESIGNS), help="memory design (default: memoryllm)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    d = ServiceSettings()
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="generations batched together (1: one at a time)")
    p.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms, help="how long the first request waits for others")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes)
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--max-pools-per-tenant", type=int, default=d.max_pools_per_tenant)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; on a shared CPU 1 avoids oversubscription)")
    p.set_defaults(handler=cmd_serve)

    v = subparsers.add_parser("verify", help="rebuild memories of a data directory from their ledgers and compare bit for bit (server stopped)")
    v.add_argument("--data", required=True)
    v.add_argument("--tenant", default=None, help="only this tenant's memories (default: all)")
    v.add_argument("names", nargs="*", help="memory names (default: all)")
    v.add_argument("--model", default=None)
    v.add_argument("--design", default="memoryllm", choices=sorted(DESIGNS))
    v.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    v.set_defaults(handler=cmd_verify)

    k = subparsers.add_parser("keys", help="API keys of the service: create, list, revoke")
    ks = k.add_subparsers(dest="keys_command", required=True)
    c = ks.add_parser("create", help="a new key for a tenant (printed once)")
    c.add_argument("--data", required=True)
    c.add_argument("--tenant", required=True)
    c.add_argument("--label", default="")
    c.set_defaults(handler=cmd_keys)
    c = ks.add_parser("list", help="keys (ids, tenants, dates; never the keys)")
    c.add_argument("--data", required=True)
    c.set_defaults(handler=cmd_keys)
    c = ks.add_parser("revoke", help="revoke a key by its id")
    c.add_argument("--data", required=True)
    c.add_argument("key_id")
    c.set_defaults(handler=cmd_keys)


def cmd_keys(args) -> int:
    keys = KeyStore(args.data)
    try:
        if args.keys_command == "create":
            key_id, key = keys.create(args.tenant, args.label)
            print(f"key id: {key_id}\ntenant: {args.tenant}\nkey:    {key}\n(store it now: only its hash is kept)")
        elif args.keys_command == "list":
            for r in keys.list():
                state = f"revoked {time.strftime('%Y-%m-%d %H:%M', time.gmtime(r['revoked_at']))}" if r["revoked_at"] else "active"
                print(f"{r['key_id']}  {r['tenant']:<20} {time.strftime('%Y-%m-%d %H:%M', time.gmtime(r['created_at']))}  {state}  {r['label']}")
        else:
            keys.revoke(args.key_id)
            print(f"revoked {args.key_id}")
    except (StoreError, KeyError) as e:
        print(f"memoryllm keys: error: {e}", file=sys.stderr)
        return 2
    finally:
        keys.close()
    return 0


def cmd_verify(args) -> int:
    """Exit status 0 when every memory checked is consistent with its ledger, 1 otherwise."""
    import torch

    from .. import load

    lm = load(args.model, design=args.design, dtype=getattr(torch, args.dtype))
    bad = 0
    with MemoryStore(args.data, lm) as store:
        tenants = [args.tenant] if args.tenant is not None else store.tenants()
        for t in tenants:
            for name in args.names or store.names(tenant=t):
                report = store.verify(name, tenant=t)
                bad += not report.ok
                print(f"{t}/{name}: {report.message}" + "".join(f"\n    {m}" for m in report.mismatches))
    return 1 if bad else 0


def cmd_serve(args) -> int:
    import torch
    import uvicorn

    from .. import load

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load(args.model, design=args.design, dtype=getattr(torch, args.dtype), device=args.device)
    settings = ServiceSettings(max_body_bytes=args.max_body_bytes, max_new_tokens=args.max_new_tokens, max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                               max_pools_per_tenant=args.max_pools_per_tenant)
    with MemoryStore(args.data, lm) as store:
        uvicorn.run(create_app(store, settings=settings), host=args.host, port=args.port, log_level="warning")
    return 0
