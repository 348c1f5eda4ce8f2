"""HTTP service over MemoryStore: tenants with API keys, one memory namespace per tenant.

    memoryllm keys create --data data/ --tenant acme      # prints the key once
    memoryllm serve --data data/ --port 8000              # interactive docs at /docs, OpenAPI at /openapi.json

    curl -H "Authorization: Bearer $KEY" -d '{"name": "alice"}' localhost:8000/v1/memories
    curl -H "Authorization: Bearer $KEY" -d '{"text": "..."}' localhost:8000/v1/memories/alice/inject
    curl -H "Authorization: Bearer $KEY" -d '{"prompt": "...", "stream": true}' localhost:8000/v1/memories/alice/generate
    curl -H "Authorization: Bearer $KEY" -H "X-Memory: alice" -d '{"model": "m", "messages": [...]}' localhost:8000/v1/chat/completions

Injections into one pool are serialised by the store; generations for different pools that
arrive within ``batch_wait_ms`` of each other go through the model together
(``MemoryModel.generate_batch``). Another tenant's memory answers 404, exactly like a missing one.

This module holds what needs no web framework (keys, batching, metrics, the body limit, JSON
bodies whatever their content type, the error shapes, the settings, the ``serve`` /
``keys`` commands); ``app.py`` builds the FastAPI app behind ``create_app``; ``client.py`` is a
Python client for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import queue
import re
import secrets
import signal
import socket
import sqlite3
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .store import MemoryStore, NotFound, StoreBusy, StoreError, check_name, private_dir, private_files

if TYPE_CHECKING:
    from ..api import Memory, MemoryModel

KEY_PREFIX = "mlk"


# ---------------------------------------------------------------------------------------------
# API keys: only sha256(key) is stored; the key itself is shown once, at creation
# ---------------------------------------------------------------------------------------------
class KeyStore:
    """API keys in ``<data_dir>/keys.db``. A key is ``mlk_<key id>_<secret>``; lookups hash
    the presented key, so the database never holds anything that authenticates."""

    def __init__(self, data_dir: str | os.PathLike):
        private_dir(Path(data_dir))
        self._db = sqlite3.connect(Path(data_dir) / "keys.db", check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS api_keys(key_id TEXT PRIMARY KEY, key_sha256 TEXT UNIQUE NOT NULL, tenant TEXT NOT NULL, "
            "label TEXT NOT NULL, created_at REAL NOT NULL, revoked_at REAL)"
        )
        self._db.commit()
        private_files(Path(data_dir), "keys.db")  # hashes only, but tenants and labels: the owner's
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
# Error bodies: {"detail": ...} on the service's own routes, OpenAI's shape on its compatible ones
# ---------------------------------------------------------------------------------------------
OPENAI_PATHS = ("/v1/chat/", "/v1/models")  # routes whose clients expect OpenAI's error shape
OPENAI_CODES = {401: "invalid_api_key", 403: "insufficient_quota", 404: "not_found", 413: "request_too_large", 429: "rate_limit_exceeded"}


def openai_path(path: str) -> bool:
    return path.startswith(OPENAI_PATHS)


def error_body(path: str, status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    """The JSON body of an error answer on ``path``: ``{"detail": message}``, or on the
    OpenAI-compatible routes ``{"error": {"message", "type", "param", "code"}}`` (what OpenAI
    clients parse into their exceptions)."""
    if not openai_path(path):
        return {"detail": message}
    kind = "server_error" if status >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code or OPENAI_CODES.get(status)}}


# ---------------------------------------------------------------------------------------------
# Request bodies (pure ASGI, before the app parses anything): a size limit, and JSON whatever
# the Content-Type says
# ---------------------------------------------------------------------------------------------
class JSONBodies:
    """Every body of a JSON route is read as JSON whatever its Content-Type (``curl -d`` sends
    ``application/x-www-form-urlencoded``; some clients send none): the header is rewritten to
    ``application/json`` before FastAPI looks at it, so a JSON body always parses and anything
    else answers 422 "not valid JSON". Imports (a zip file) keep their header."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH") and not scope["path"].endswith("/import"):
            headers = [(k, v) for k, v in scope.get("headers") or [] if k != b"content-type"]
            scope = dict(scope, headers=[*headers, (b"content-type", b"application/json")])
        await self.app(scope, receive, send)


IMPORT_ROUTE = re.compile(r"/v1/memories/[^/]+/import")


class BodyLimit:
    """Bodies bounded in size and in the time they take to arrive (issue 17).

    A JSON body (at most ``max_bytes``) is read here, a declared Content-Length over the limit
    refused before reading; a body that stops arriving answers 408 after ``timeout_s`` between
    two pieces. Only ``PUT /v1/memories/{name}/import`` may be larger (``import_max_bytes``),
    and its body is not read here: the route streams it to disk after checking the key, while
    this counts it and times it out as it passes."""

    def __init__(self, app, max_bytes: int, import_max_bytes: int, timeout_s: float = 30.0):
        self.app, self.max_bytes, self.import_max_bytes, self.timeout_s = app, max_bytes, import_max_bytes, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        is_import = scope["method"] == "PUT" and IMPORT_ROUTE.fullmatch(scope["path"]) is not None
        limit = self.import_max_bytes if is_import else self.max_bytes
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _too_large(send, scope["path"], int(declared), limit)
        if is_import:
            return await self.app(scope, self._counted(receive, scope["path"], limit), send)
        messages, size = [], 0
        while True:  # read the body (also a chunked one) up to the limit
            try:
                msg = await asyncio.wait_for(receive(), self.timeout_s)
            except asyncio.TimeoutError:
                return await _answer_error(send, scope["path"], 408, f"request body not received within {self.timeout_s:g} s; send the whole body at once")
            if msg["type"] != "http.request":
                messages.append(msg)
                break
            size += len(msg.get("body", b""))
            if size > limit:
                return await _too_large(send, scope["path"], size, limit, at_least=True)
            messages.append(msg)
            if not msg.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    def _counted(self, receive, path: str, limit: int):
        size = 0

        async def counted():
            nonlocal size
            from fastapi import HTTPException

            try:
                msg = await asyncio.wait_for(receive(), self.timeout_s)
            except asyncio.TimeoutError:
                raise HTTPException(408, f"request body not received within {self.timeout_s:g} s; send the whole body at once") from None
            size += len(msg.get("body", b"")) if msg["type"] == "http.request" else 0
            if size > limit:
                raise HTTPException(413, f"request body too large: more than {size} bytes, the limit is {limit} bytes")
            return msg

        return counted


async def _answer_error(send, path: str, status: int, detail: str) -> None:
    body = json.dumps(error_body(path, status, detail)).encode()
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


async def _too_large(send, path: str, size: int, limit: int, at_least: bool = False) -> None:
    detail = f"request body too large: {'more than ' if at_least else ''}{size} bytes, the limit is {limit} bytes; split the text into several injections"
    body = json.dumps(error_body(path, 413, detail)).encode()
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
    # limits in the unit that costs (issue 17): a prompt's attention grows with its tokens squared,
    # an injection's time (under its pool's lock) with its tokens
    max_prompt_tokens: int | None = None  # prompt + max_new_tokens; None: prompt_token_limit(lm, request_memory_bytes)
    request_memory_bytes: int = 256 << 20  # one request's T x T float32 attention scores fit this (8192 tokens)
    max_inject_tokens: int = 8192  # tokens per inject request, all texts together
    body_timeout_s: float = 30.0  # a request body not fully received in this time answers 408
    max_import_unpacked_bytes: int = 4 << 30  # the members of an import, decompressed


def prompt_token_limit(lm, request_memory_bytes: int) -> int:
    """The default ``max_prompt_tokens``: the model's context window, or fewer when one T x T
    float32 attention-score matrix of T tokens would not fit ``request_memory_bytes``."""
    import math

    window = int(lm.info().details.get("context_window") or 2048)
    return max(1, min(window, math.isqrt(max(request_memory_bytes, 4) // 4)))


def create_app(store: MemoryStore, keys: KeyStore | None = None, settings: ServiceSettings | None = None, *, docs=True):
    """The FastAPI app over ``store`` (the ``serve`` extra): its routers, dependencies and error
    statuses are in ``app.py``, its bodies in ``schemas.py``; keys default to ``<store.dir>/keys.db``.
    ``docs``: see ``app.build_app`` (interactive docs from local files, or a plain reference page)."""
    from .app import build_app

    return build_app(store, keys or KeyStore(store.dir), settings or ServiceSettings(), docs=docs)


# ---------------------------------------------------------------------------------------------
# CLI: memoryllm serve / keys ... (verify is the CLI's own, in latentmem/cli)
# ---------------------------------------------------------------------------------------------
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def add_parser(subparsers) -> None:
    from .. import DESIGNS
    from ..cli.options import default_data_dir  # the CLI's memories: `memoryllm serve` serves them (no torch import)

    data = str(default_data_dir())

    p = subparsers.add_parser("serve", help="HTTP service: per-tenant memories (FastAPI + uvicorn)",
                              description="Serve the memories of a data directory over HTTP (one server per directory). "
                                          "Prints a start-up line once it listens and a line when it stops (Ctrl-C or SIGTERM).")
    p.add_argument("--data", default=data, metavar="DIR", help="data directory (memories, ledger, keys), created when missing (default: the CLI's, %(default)s)")
    p.add_argument("--model", default=None, help="local model folder (default: embedded SmolLM2-135M)")
    p.add_argument("--design", default="memoryllm", choices=sorted(DESIGNS), help="memory design (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights dtype (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; on a shared CPU 1 avoids oversubscription)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s; 0 picks a free one, shown in the start-up line)")
    d = ServiceSettings()
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="generations batched together, 1: one at a time (default: %(default)s)")
    p.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms, help="how long the first request waits for others (default: %(default)s)")
    p.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help="largest JSON request body (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="largest max_new_tokens / max_tokens a request may ask (default: %(default)s)")
    p.add_argument("--max-pools-per-tenant", type=int, default=d.max_pools_per_tenant, help="memories per tenant (default: %(default)s)")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="prompt + max_new_tokens of one request, in tokens (default: the model's context "
                                                                        "window, or less when --request-memory-bytes binds)")
    p.add_argument("--request-memory-bytes", type=int, default=d.request_memory_bytes, help="a prompt's T x T float32 attention scores fit this "
                                                                                             "(sets the default --max-prompt-tokens; default: %(default)s)")
    p.add_argument("--max-inject-tokens", type=int, default=d.max_inject_tokens, help="tokens of one inject request, all texts together (default: %(default)s)")
    p.add_argument("--max-import-bytes", type=int, default=d.max_import_bytes, help="largest import upload (default: %(default)s)")
    p.add_argument("--max-import-unpacked-bytes", type=int, default=d.max_import_unpacked_bytes, help="an import's states decompressed (default: %(default)s)")
    p.add_argument("--body-timeout-s", type=float, default=d.body_timeout_s, help="a request body must keep arriving: at most this many seconds "
                                                                                   "between two pieces, else 408 (default: %(default)s)")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="uvicorn's log level (default: %(default)s)")
    p.add_argument("--no-access-log", action="store_true", help="no line per request (the access log is on by default, on stdout)")
    p.add_argument("--log-config", default=None, metavar="FILE", help="uvicorn logging configuration (.json, .yaml or .ini) instead of uvicorn's default")
    p.set_defaults(handler=cmd_serve)

    k = subparsers.add_parser("keys", help="API keys of the service: create, list, revoke")
    ks = k.add_subparsers(dest="keys_command", required=True)
    c = ks.add_parser("create", help="a new key for a tenant (printed once)")
    c.add_argument("--data", default=data, metavar="DIR", help="data directory, created when missing (default: %(default)s)")
    c.add_argument("--tenant", required=True, help="the tenant the key acts for (a name like a memory's)")
    c.add_argument("--label", default="", help="free note shown by keys list")
    c.add_argument("--quiet", action="store_true", help="print the key alone (for scripts: KEY=$(memoryllm keys create ... --quiet))")
    c.set_defaults(handler=cmd_keys)
    c = ks.add_parser("list", help="keys (ids, tenants, dates; never the keys)")
    c.add_argument("--data", default=data, metavar="DIR", help="data directory (default: %(default)s)")
    c.set_defaults(handler=cmd_keys)
    c = ks.add_parser("revoke", help="revoke a key by its id (effective on the next request)")
    c.add_argument("--data", default=data, metavar="DIR", help="data directory (default: %(default)s)")
    c.add_argument("key_id", help="the id keys list shows")
    c.set_defaults(handler=cmd_keys)


def _fail(command: str, message: str) -> int:
    """An expected failure: one line on stderr, exit status 2 (as the CLI's main reports its errors)."""
    print(f"memoryllm {command}: error: {message}", file=sys.stderr)
    return 2


def cmd_keys(args) -> int:
    data = Path(args.data)
    if args.keys_command != "create" and not (data / "keys.db").is_file():
        return _fail("keys", f"no API keys in {data} (no keys.db): check --data, or create one with memoryllm keys create --data {data} --tenant NAME")
    try:
        keys = KeyStore(data)
    except (OSError, sqlite3.Error) as e:
        return _fail("keys", f"cannot open {data / 'keys.db'}: {e}")
    try:
        if args.keys_command == "create":
            key_id, key = keys.create(args.tenant, args.label)
            print(key if args.quiet else f"key id: {key_id}\ntenant: {args.tenant}\nkey:    {key}\n(store it now: only its hash is kept)")
        elif args.keys_command == "list":
            for r in keys.list():
                state = f"revoked {time.strftime('%Y-%m-%d %H:%M', time.gmtime(r['revoked_at']))}" if r["revoked_at"] else "active"
                print(f"{r['key_id']}  {r['tenant']:<20} {time.strftime('%Y-%m-%d %H:%M', time.gmtime(r['created_at']))}  {state}  {r['label']}")
        else:
            keys.revoke(args.key_id)
            print(f"revoked {args.key_id}")
    except (StoreError, KeyError) as e:
        return _fail("keys", str(e))
    finally:
        keys.close()
    return 0


def _load_model(args):
    import torch

    from .. import load

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    lm = load(args.model, design=args.design, dtype=getattr(torch, args.dtype), device=args.device)
    return lm, time.perf_counter() - t0


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads (a port in use fails at once)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class _Stopped(Exception):
    """SIGTERM, re-raised by uvicorn after its graceful shutdown."""


def _raise_stopped(signum, frame):
    raise _Stopped


def cmd_serve(args) -> int:
    """Serve until Ctrl-C / SIGTERM. Busy data directory, port in use and unusable arguments
    fail before the model loads, with one line and exit status 2."""
    import uvicorn

    from ..cli.memories import check_free  # the CLI's probe of a busy data directory (one implementation)

    if args.max_batch < 1 or args.max_new_tokens < 1 or args.max_body_bytes < 1 or args.max_pools_per_tenant < 0 or args.batch_wait_ms < 0:
        return _fail("serve", "--max-batch, --max-new-tokens and --max-body-bytes must be >= 1, --max-pools-per-tenant and --batch-wait-ms >= 0")
    sizes = (args.request_memory_bytes, args.max_inject_tokens, args.max_import_bytes, args.max_import_unpacked_bytes, args.max_prompt_tokens or 1)
    if min(sizes) < 1 or not args.body_timeout_s > 0:
        return _fail("serve", "--max-prompt-tokens, --request-memory-bytes, --max-inject-tokens, --max-import-bytes and "
                              "--max-import-unpacked-bytes must be >= 1, --body-timeout-s > 0")
    if args.log_config and not Path(args.log_config).is_file():
        return _fail("serve", f"--log-config {args.log_config}: no such file")
    check_free(Path(args.data))  # before the model loads: another server may hold the directory (CLIError: one line, exit 2)
    try:
        sock = _listen(args.host, args.port)
    except OSError as e:
        return _fail("serve", f"cannot listen on {args.host}:{args.port}: {e.strerror or e}")
    with contextlib.closing(sock):
        lm, load_s = _load_model(args)
        settings = ServiceSettings(max_body_bytes=args.max_body_bytes, max_new_tokens=args.max_new_tokens, max_batch=args.max_batch,
                                   batch_wait_ms=args.batch_wait_ms, max_pools_per_tenant=args.max_pools_per_tenant,
                                   max_prompt_tokens=args.max_prompt_tokens, request_memory_bytes=args.request_memory_bytes,
                                   max_inject_tokens=args.max_inject_tokens, max_import_bytes=args.max_import_bytes,
                                   max_import_unpacked_bytes=args.max_import_unpacked_bytes, body_timeout_s=args.body_timeout_s)
        try:
            store = MemoryStore(args.data, lm)
        except StoreBusy as e:  # taken while the model loaded
            return _fail("serve", str(e))
        host, port = sock.getsockname()[:2]
        url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
        t0 = time.time()
        with store:
            app = create_app(store, settings=settings)
            n_pools = sum(len(store.names(tenant=t)) for t in store.tenants())
            started = (f"memoryllm serve: listening on {url} (model {lm.name}, design {lm.design}, data {Path(args.data).resolve()} "
                       f"with {n_pools} memories; model loaded in {load_s:.1f} s; docs {url}/docs; Ctrl-C to stop)")

            class Server(uvicorn.Server):
                async def startup(self, sockets=None):
                    await super().startup(sockets)
                    if self.started:
                        print(started, file=sys.stderr, flush=True)

            config = uvicorn.Config(app, log_level=args.log_level, access_log=not args.no_access_log, timeout_graceful_shutdown=30,
                                    **({"log_config": args.log_config} if args.log_config else {}))
            main_thread = threading.current_thread() is threading.main_thread()
            previous = signal.signal(signal.SIGTERM, _raise_stopped) if main_thread else None
            try:
                Server(config).run(sockets=[sock])
            except (KeyboardInterrupt, _Stopped):  # uvicorn stopped gracefully, then re-raised the signal
                pass
            finally:
                if main_thread:
                    signal.signal(signal.SIGTERM, previous)
            served = sum(v for (name, _), v in app.state.metrics.counters.items() if name == "latentmem_requests_total")
        print(f"memoryllm serve: stopped after {time.time() - t0:.0f} s, {served:.0f} requests served; {args.data} closed", file=sys.stderr, flush=True)
    return 0
