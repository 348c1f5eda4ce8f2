"""The FastAPI app of the memory service: what the routes share, the routes in four routers (plus
the OpenAI-compatible one, ``openai_compat.py``), the mapping from store errors to HTTP statuses,
the offline interactive docs. Bodies are in ``schemas.py``; ``service.create_app`` is the entry point.

No ``from __future__ import annotations`` here: FastAPI reads the route signatures' types at
definition time, and the bodies bounded by settings are classes made per app (``bounded_bodies``).
"""

import asyncio
import contextlib
import html
import importlib.util
import itertools
import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import (
    FileResponse,
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..api import InjectionError, MemoryFormatError
from .schemas import (
    CreateMemory,
    Diff,
    ForgetReport,
    ForgetRequest,
    GenerateRequest,
    GenerateResponse,
    Health,
    InjectResponse,
    Ledger,
    MemoryFacts,
    MemoryList,
    Snapshot,
    SnapshotList,
    SnapshotRequest,
    StreamDone,
    VerifyReport,
    binary,
    bounded_bodies,
    errors,
)
from .service import BodyLimit, GenerateBatcher, JSONBodies, KeyStore, Metrics, ServiceSettings, error_body, openai_path, prompt_token_limit
from .store import AlreadyExists, ImportRefused, InvalidName, MemoryStore, NotFound, NotReplayable, QuotaExceeded, StoreError, check_name

DEFAULT_MAX_NEW_TOKENS = GenerateRequest.model_fields["max_new_tokens"].default


# ---------------------------------------------------------------------------------------------
# What the routes share, and the dependencies
# ---------------------------------------------------------------------------------------------
bearer = HTTPBearer(auto_error=False)


@dataclass
class Service:
    """What the routes of one app share: the store, the keys, the limits, the counters and the
    generate batcher; ``tenant`` is the dependency that checks the caller's key."""

    store: MemoryStore
    keys: KeyStore
    settings: ServiceSettings
    metrics: Metrics = field(default_factory=Metrics)
    batcher: GenerateBatcher = field(init=False)

    def __post_init__(self):
        s = self.settings
        self.max_prompt_tokens = s.max_prompt_tokens or prompt_token_limit(self.store.lm, s.request_memory_bytes)
        self.batcher = GenerateBatcher(self.store.lm, s.max_batch, s.batch_wait_ms / 1000, on_batch=self._count_batch)

    def _count_batch(self, rows: int) -> None:
        self.metrics.inc("latentmem_generate_batches_total")
        self.metrics.inc("latentmem_generate_batched_rows_total", rows)

    def tenant(self, creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> str:
        """The caller's tenant, from its API key (401 without a valid one)."""
        t = self.keys.tenant(creds.credentials) if creds else None
        if t is None:
            raise HTTPException(401, "missing or invalid API key (Authorization: Bearer <key>)", headers={"WWW-Authenticate": "Bearer"})
        return t

    def prompt_tokens(self, prompt, sampling: dict) -> int:
        """The prompt's tokens as the model reads it; 413 when it and max_new_tokens together pass
        ``max_prompt_tokens`` (checked before any model work: cost grows with tokens squared)."""
        lm = self.store.lm
        n = len(lm.encode(lm.chat_prompt(prompt, sampling.get("chat"))))
        new = sampling.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        if n + new > self.max_prompt_tokens:
            raise HTTPException(413, f"prompt too long: {n} tokens plus max_new_tokens {new} is over this server's limit of "
                                     f"{self.max_prompt_tokens} tokens; shorten the prompt or ask for fewer new tokens")
        return n

    def inject_tokens(self, texts: list[str]) -> None:
        """413 when the texts of one inject request hold more than ``max_inject_tokens`` tokens
        (the pool's lock is held for the whole write)."""
        limit, n = self.settings.max_inject_tokens, 0
        for t in texts:
            n += len(self.store.lm.encode(t))
            if n > limit:
                raise HTTPException(413, f"injection too long: more than {limit} tokens in one request (this server's limit); "
                                         "split the text over several requests")

    async def generate(self, memory, prompt, sampling: dict):
        """One answer through the micro-batcher (batched with other users' requests)."""
        await asyncio.to_thread(self.prompt_tokens, prompt, sampling)
        try:
            g = await asyncio.wrap_future(self.batcher.submit(memory, prompt, **sampling))
        except ValueError as e:
            raise HTTPException(422, str(e)) from e
        self.metrics.inc("latentmem_generated_tokens_total", len(g.token_ids))
        return g

    async def start_stream(self, memory, prompt, sampling: dict) -> Iterator[str | StreamDone]:
        """``stream``, its first item computed before any header is sent: invalid parameters and
        a failing prefill answer an HTTP error (a ValueError: 422), not an in-band event."""
        await asyncio.to_thread(self.prompt_tokens, prompt, sampling)
        it = self.stream(memory, prompt, sampling)
        first = await asyncio.to_thread(next, it)
        return itertools.chain([first], it)

    def stream(self, memory, prompt, sampling: dict) -> Iterator[str | StreamDone]:
        """The answer's text pieces, then a ``StreamDone`` with finish reason and token counts.

        A design whose ``stream`` returns its ``Generation`` when exhausted (the generator's return
        value) gives exact counts; otherwise they are computed here: prompt tokens exactly (the
        prompt ``generate`` reads, ``chat_prompt``), completion tokens as the larger of the pieces
        streamed and the answer's tokens re-encoded, and ``length`` when that reaches
        ``max_new_tokens``."""
        lm = self.store.lm
        it, pieces = lm.stream(memory, prompt, **sampling), []
        try:
            while True:
                try:
                    piece = next(it)
                except StopIteration as end:
                    result = end.value
                    break
                pieces.append(piece)
                yield piece
        finally:
            it.close()  # a client that hangs up stops the decoding at once
        if hasattr(result, "finish_reason"):
            done = StreamDone(finish_reason=result.finish_reason, prompt_tokens=result.prompt_tokens, completion_tokens=len(result.token_ids))
        else:
            text = "".join(pieces)
            completion = max(len(pieces), len(lm.encode(text)) if text else 0)
            limit = sampling.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
            done = StreamDone(finish_reason="length" if completion >= limit else "stop", completion_tokens=min(completion, limit),
                              prompt_tokens=len(lm.encode(lm.chat_prompt(prompt, sampling.get("chat")))))
        self.metrics.inc("latentmem_generated_tokens_total", done.completion_tokens)
        yield done


def pool_name(name: str) -> str:
    """The {name} of a route, checked before anything else (InvalidName: 422)."""
    check_name(name)
    return name


def _public(info) -> dict:
    """A pool's facts without its tenant (the caller's own, by construction)."""
    return {k: v for k, v in asdict(info).items() if k != "tenant"}


NAMED = (401, 404, 422)  # what every route on /v1/memories/{name} can answer
SSE_200 = {200: {"description": "the answer (JSON), or with stream: true server-sent events: `data: {\"text\": \"...\"}` per piece, "
                                "then `event: done` with `data: {\"finish_reason\", \"prompt_tokens\", \"completion_tokens\"}` "
                                "(or `event: error` with `data: {\"detail\", \"status\"}`)",
                 "content": {"text/event-stream": {"schema": {"type": "string"}}}}}


# ---------------------------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------------------------
def meta_routes(svc: Service) -> APIRouter:
    """Health and metrics: no key needed."""
    r = APIRouter(tags=["meta"])

    @r.get("/health", response_model=Health)
    def health():
        """Liveness and the model served."""
        lm = svc.store.lm
        return {"status": "ok", "model": lm.name, "model_id": lm.model_id, "design": lm.design}

    @r.get("/metrics", response_class=PlainTextResponse,
           responses={200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}})
    def get_metrics():
        """Requests by route and status, time per route, injections, generated tokens, generate batches and rows."""
        return svc.metrics.render({"latentmem_batch_max": svc.settings.max_batch})

    return r


def memory_routes(svc: Service, inject_body: type, generate_body: type) -> APIRouter:
    """A tenant's memories: create, list, read, delete; inject and generate; the ledger."""
    r, store, tenant = APIRouter(prefix="/v1/memories", tags=["memories"]), svc.store, svc.tenant
    limit = svc.settings.max_pools_per_tenant

    @r.post("", status_code=201, response_model=MemoryFacts, responses=errors(401, 403, 409, 413, 422))
    def create_memory(req: CreateMemory, t: str = Depends(tenant)):
        """A new empty memory."""
        return _public(store.create(req.name, seed=req.seed, tenant=t, max_pools=limit))  # quota checked in the creating transaction

    @r.get("", response_model=MemoryList, responses=errors(401))
    def list_memories(t: str = Depends(tenant)):
        """The tenant's memories, by name."""
        return {"memories": [_public(p) for p in store.list(tenant=t)]}

    @r.get("/{name}", response_model=MemoryFacts, responses=errors(*NAMED))
    def get_memory(name: str = Depends(pool_name), t: str = Depends(tenant)):
        """A memory's facts: live injections, updates, snapshots, where replay starts."""
        return _public(store.info(name, tenant=t))

    @r.delete("/{name}", status_code=204, response_class=Response, responses=errors(*NAMED))
    def delete_memory(name: str = Depends(pool_name), t: str = Depends(tenant)):
        """Delete the memory, its ledger (texts included) and its snapshots."""
        store.delete(name, tenant=t)
        return Response(status_code=204)

    @r.post("/{name}/inject", response_model=InjectResponse, responses=errors(401, 404, 413, 422))
    def inject(req: inject_body, name: str = Depends(pool_name), t: str = Depends(tenant)):
        """Write one text or several (committed together, in order) into the memory."""
        texts = req.texts if req.texts is not None else [req.text]
        svc.inject_tokens(texts)
        entries = store.inject(name, texts, source=req.source, store_text=req.store_text, allow_short=req.allow_short, tenant=t)
        svc.metrics.inc("latentmem_injections_total", len(entries))
        return {"injections": [e.to_dict(include_text=False) for e in entries]}

    @r.post("/{name}/generate", response_model=GenerateResponse, responses={**SSE_200, **errors(401, 404, 413, 422)})
    async def generate(req: generate_body, name: str = Depends(pool_name), t: str = Depends(tenant)):
        """Answer a prompt reading the memory (non-streaming answers are batched with other users')."""
        memory = await asyncio.to_thread(store.memory, name, tenant=t)  # 404 before anything starts; may read a file
        if req.stream:
            items = await svc.start_stream(memory, req.prompt, req.sampling())
            return StreamingResponse(_events(items), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        g = await svc.generate(memory, req.prompt, req.sampling())
        return {"text": g.text, "finish_reason": g.finish_reason, "prompt_tokens": g.prompt_tokens, "completion_tokens": len(g.token_ids)}

    @r.get("/{name}/ledger", response_model=Ledger, response_model_exclude_unset=True, responses=errors(*NAMED))
    def ledger(name: str = Depends(pool_name), t: str = Depends(tenant), include_text: bool = False):
        """Every event of the memory: create, inject (id, time, source, sha256, tokens, status), snapshot, rollback, forget, import."""
        return {"entries": [e.to_dict(include_text) for e in store.history(name, tenant=t)]}

    return r


def _events(items: Iterator[str | StreamDone]):
    """The answer as server-sent events; once headers are sent, an error is reported in-band."""
    try:
        for item in items:
            if isinstance(item, str):
                yield f"data: {json.dumps({'text': item})}\n\n"
            else:
                yield f"event: done\ndata: {item.model_dump_json()}\n\n"
    except Exception as e:
        yield f"event: error\ndata: {json.dumps({'detail': str(e), 'status': status_of(e)})}\n\n"


def version_routes(svc: Service) -> APIRouter:
    """Snapshots, rollback, forgetting, diff and verify of one memory."""
    r, store, tenant = APIRouter(prefix="/v1/memories/{name}", tags=["versions"]), svc.store, svc.tenant

    @r.post("/snapshots", status_code=201, response_model=Snapshot, responses=errors(401, 404, 409, 413, 422))
    def snapshot(req: SnapshotRequest, name: str = Depends(pool_name), t: str = Depends(tenant)):
        """Name the current version (no copy)."""
        return asdict(store.snapshot(name, req.label, tenant=t))

    @r.get("/snapshots", response_model=SnapshotList, responses=errors(*NAMED))
    def snapshots(name: str = Depends(pool_name), t: str = Depends(tenant)):
        return {"snapshots": [asdict(s) for s in store.snapshots(name, tenant=t)]}

    @r.delete("/snapshots/{label}", status_code=204, response_class=Response, responses=errors(*NAMED))
    def delete_snapshot(label: str, name: str = Depends(pool_name), t: str = Depends(tenant)):
        store.delete_snapshot(name, label, tenant=t)
        return Response(status_code=204)

    @r.post("/rollback", response_model=Snapshot, responses=errors(401, 404, 413, 422))
    def rollback(req: SnapshotRequest, name: str = Depends(pool_name), t: str = Depends(tenant)):
        """Make a snapshot the live version; later injections are marked rolled_back."""
        return asdict(store.rollback(name, req.label, tenant=t))

    @r.post("/forget", response_model=ForgetReport, responses=errors(401, 404, 409, 413, 422))
    def forget(req: ForgetRequest, name: str = Depends(pool_name), t: str = Depends(tenant)):
        """Remove one injection (fast: its slots; exact: as if never injected, 409 when impossible) and erase its text."""
        return asdict(store.forget(name, req.injection_id, req.mode, tenant=t))

    @r.get("/diff", response_model=Diff, responses=errors(*NAMED))
    def diff(name: str = Depends(pool_name), t: str = Depends(tenant), a: str | None = Query(None, alias="from"), b: str | None = Query(None, alias="to")):
        """What differs between two versions (snapshot labels; omitted: live) and which injections wrote it."""
        return store.diff(name, a, b, tenant=t)

    @r.get("/verify", response_model=VerifyReport, responses=errors(*NAMED))
    def verify(name: str = Depends(pool_name), t: str = Depends(tenant)):
        """Rebuild the memory from its ledger and compare bit for bit."""
        return asdict(store.verify(name, tenant=t))

    return r


def transfer_routes(svc: Service) -> APIRouter:
    """A memory out as one zip file (export) and back in (import)."""
    r, store, tenant = APIRouter(prefix="/v1/memories/{name}", tags=["transfer"]), svc.store, svc.tenant

    def temp_zip() -> str:
        """A temp file in the staging area (emptied by recovery after a crash)."""
        fd, path = tempfile.mkstemp(suffix=".zip", dir=store.staging())
        os.close(fd)
        return path

    @r.get("/export", response_class=Response, responses={200: binary("application/zip", "the memory as one zip file"), **errors(*NAMED)})
    def export(name: str = Depends(pool_name), t: str = Depends(tenant)):
        """The memory as one zip file: manifest (facts and ledger) and its states (deflated)."""
        store.info(name, tenant=t)  # 404 before any file exists
        path = temp_zip()
        try:
            store.export(name, path, tenant=t)
        except BaseException:
            os.unlink(path)
            raise
        return FileResponse(path, media_type="application/zip", filename=f"{name}.memory.zip", background=BackgroundTask(os.unlink, path))

    @r.put("/import", status_code=201, response_model=MemoryFacts, responses=errors(400, 401, 409, 413, 422),
           openapi_extra={"requestBody": {"required": True, "content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}}}})
    async def import_(request: Request, name: str = Depends(pool_name), t: str = Depends(tenant)):
        """A new memory from a file made by export on this server (body: the zip file; its signature
        and model are checked, its members decompressed only up to the server's limit)."""
        path = temp_zip()
        try:
            with open(path, "wb") as f:  # streamed to disk after the key was checked, never held in memory
                async for block in request.stream():  # BodyLimit bounds its size and the time it takes
                    await asyncio.to_thread(f.write, block)
            info = await asyncio.to_thread(store.import_file, path, name, tenant=t, require_signature=True,
                                           max_unpacked_bytes=svc.settings.max_import_unpacked_bytes, max_pools=svc.settings.max_pools_per_tenant)
        except (StoreError, MemoryFormatError) as e:  # the message names the temp file: not for clients
            status = 400 if isinstance(e, MemoryFormatError) else status_of(e)
            raise HTTPException(status, str(e).replace(path, "the uploaded file").replace(Path(path).name, "the uploaded file")) from None
        finally:
            os.unlink(path)
        return _public(info)

    return r


# ---------------------------------------------------------------------------------------------
# Interactive docs, offline
# ---------------------------------------------------------------------------------------------
def docs_assets() -> Path | None:
    """Swagger UI and ReDoc files of the ``fastapi-offline`` package (the serve extra), if installed."""
    spec = importlib.util.find_spec("fastapi_offline")
    static = Path(spec.origin).parent / "static" if spec and spec.origin else None
    need = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js")
    return static if static and all((static / f).is_file() for f in need) else None


def docs_routes(app: FastAPI, assets: Path | None) -> None:
    """/docs (Swagger UI) and /redoc served from local files, so they work without a network;
    without the files, /docs is a plain HTML reference of the routes made from the OpenAPI document."""
    from fastapi.staticfiles import StaticFiles

    @app.get("/", include_in_schema=False)
    def root():
        return RedirectResponse("/docs")

    if assets is None:
        @app.get("/docs", include_in_schema=False)
        def reference():
            return HTMLResponse(reference_html(app.openapi()))

        @app.get("/redoc", include_in_schema=False)
        def no_redoc():
            return RedirectResponse("/docs")

        return
    app.mount("/docs/assets", StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def swagger(request: Request):
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(openapi_url=f"{root}/openapi.json", title=f"{app.title} - Swagger UI", oauth2_redirect_url=f"{root}/docs/oauth2-redirect",
                                   swagger_js_url=f"{root}/docs/assets/swagger-ui-bundle.js", swagger_css_url=f"{root}/docs/assets/swagger-ui.css",
                                   swagger_favicon_url=f"{root}/docs/assets/favicon.png")

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    def swagger_redirect():
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    def redoc(request: Request):
        root = request.scope.get("root_path", "")
        return get_redoc_html(openapi_url=f"{root}/openapi.json", title=f"{app.title} - ReDoc", redoc_js_url=f"{root}/docs/assets/redoc.standalone.js",
                              redoc_favicon_url=f"{root}/docs/assets/favicon.png", with_google_fonts=False)


def _schema_name(schema: dict | None) -> str:
    if not schema:
        return ""
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in schema:
        return " | ".join(_schema_name(s) for s in schema["anyOf"])
    if schema.get("type") == "array":
        return f"list[{_schema_name(schema.get('items'))}]"
    return schema.get("format") or schema.get("type", "object")


def _contents(part: dict) -> str:
    """'media type: schema' of a request body or a response."""
    return ", ".join(f"{t}: {_schema_name(c.get('schema'))}" for t, c in part.get("content", {}).items())


def reference_html(doc: dict) -> str:
    """A self-contained page (no script, no external file) listing every route, its body, its
    answers and every schema's fields, from the OpenAPI document."""
    e = html.escape
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(doc['info']['title'])}</title>",
           "<style>body{font-family:sans-serif;max-width:70em;margin:2em auto}code,td{font-size:.9em}table{border-collapse:collapse}"
           "td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left;vertical-align:top}h3{margin-bottom:.2em}</style></head><body>",
           f"<h1>{e(doc['info']['title'])} {e(doc['info']['version'])}</h1><p>{e(doc['info'].get('description', ''))}</p>",
           "<p>Machine-readable: <a href='/openapi.json'>/openapi.json</a>. Every /v1 route needs <code>Authorization: Bearer &lt;key&gt;</code>.</p>"]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            out.append(f"<h3><code>{method.upper()} {e(path)}</code></h3><p>{e(op.get('description') or op.get('summary', ''))}</p>")
            params = [f"{p['name']} ({p['in']})" for p in op.get("parameters", [])]
            if params:
                out.append(f"<p>Parameters: {e(', '.join(params))}</p>")
            if op.get("requestBody"):
                out.append(f"<p>Body: {e(_contents(op['requestBody']))}</p>")
            rows = "".join(f"<tr><td>{e(code)}</td><td>{e(r.get('description', ''))}</td><td>{e(_contents(r))}</td></tr>" for code, r in op.get("responses", {}).items())
            out.append(f"<table><tr><th>status</th><th>meaning</th><th>body</th></tr>{rows}</table>")
    out.append("<h2>Schemas</h2>")
    for name, s in doc.get("components", {}).get("schemas", {}).items():
        rows = "".join(f"<tr><td>{e(k)}</td><td>{e(_schema_name(v))}</td><td>{e(v.get('description', ''))}</td></tr>" for k, v in s.get("properties", {}).items())
        out.append(f"<h3 id='{e(name)}'>{e(name)}</h3><p>{e(s.get('description', ''))}</p><table>{rows}</table>")
    return "\n".join(out) + "</body></html>"


# ---------------------------------------------------------------------------------------------
# Errors, counting, assembly
# ---------------------------------------------------------------------------------------------
# The HTTP status of each error the store and the model raise on purpose; an error takes the
# status of the first class in its MRO listed here (as Starlette looks handlers up), so
# InvalidName is 422 although it is also a StoreError.
ERROR_STATUS: dict[type[Exception], int] = {
    InvalidName: 422, NotFound: 404, AlreadyExists: 409, NotReplayable: 409, InjectionError: 422, QuotaExceeded: 403,
    ImportRefused: 400, StoreError: 400, MemoryFormatError: 500, ValueError: 422,
}


def status_of(e: Exception) -> int:
    if isinstance(e, StarletteHTTPException):
        return e.status_code
    return next((ERROR_STATUS[c] for c in type(e).__mro__ if c in ERROR_STATUS), 500)


def _answer(request: Request, status: int, message: str, headers=None, param: str | None = None) -> JSONResponse:
    if openai_path(request.url.path) and status == 422:
        status = 400  # OpenAI clients expect 400 for invalid requests
    return JSONResponse(error_body(request.url.path, status, message, param=param), status_code=status, headers=headers)


def error_response(request: Request, e: Exception) -> JSONResponse:
    return _answer(request, status_of(e), str(e))


def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    return _answer(request, e.status_code, str(e.detail), headers=getattr(e, "headers", None))


async def validation_error(request: Request, e: RequestValidationError):
    """FastAPI's 422 list of issues, except: a body that is not JSON says so in one sentence, and
    the OpenAI-compatible routes answer 400 in OpenAI's shape naming the first invalid field."""
    issues = e.errors()
    bad_json = next((i for i in issues if i.get("type") == "json_invalid"), None)
    if bad_json is not None:
        reason = (bad_json.get("ctx") or {}).get("error", "")
        return _answer(request, 422, f"request body is not valid JSON ({reason} at character {bad_json['loc'][-1]}); send one JSON object, e.g. {{\"name\": \"alice\"}}")
    if openai_path(request.url.path):
        first = issues[0]
        param = ".".join(str(p) for p in first["loc"][1:]) or None
        msg = first["msg"].removeprefix("Value error, ")
        return _answer(request, 400, f"{param + ': ' if param else ''}{msg}", param=param)
    try:
        return await request_validation_exception_handler(request, e)
    except UnicodeEncodeError:  # an echoed input holds a lone surrogate, which JSON cannot carry as UTF-8
        safe = [{k: v for k, v in i.items() if k not in ("input", "ctx")} for i in issues]
        return JSONResponse({"detail": jsonable_encoder(safe)}, status_code=422)


HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


async def count_requests(request: Request, call_next):
    t0 = time.perf_counter()
    response = await call_next(request)
    path = getattr(request.scope.get("route"), "path", "unmatched")
    # labels from bounded sets only: a client chooses the method and the path (issue 17)
    method = request.method if request.method in HTTP_METHODS else "other"
    metrics = request.app.state.metrics
    metrics.inc("latentmem_requests_total", method=method, route=path, status=response.status_code)
    metrics.inc("latentmem_request_seconds_total", time.perf_counter() - t0, method=method, route=path)
    return response


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    yield
    app.state.batcher.close()


DESCRIPTION = """Per-tenant memories in a model's latent space: create, inject, generate (also streamed), ledger, snapshots and
rollback, forgetting, verify, export and import; an OpenAI-compatible `POST /v1/chat/completions` whose answer reads the
memory named by the `X-Memory` header or else the `user` field. Every /v1 route needs `Authorization: Bearer <key>`
(`memoryllm keys create`). JSON bodies are read as JSON whatever their Content-Type."""


def build_app(store: MemoryStore, keys: KeyStore, settings: ServiceSettings, *, docs: Path | None | bool = True) -> FastAPI:
    """The app; ``docs``: True serves Swagger UI / ReDoc from ``fastapi-offline``'s files when
    installed (else the plain reference page), None forces the plain page, a folder gives the files."""
    from .openai_compat import ChatCompletionChunk, openai_routes

    svc = Service(store, keys, settings)
    app = FastAPI(title="memoryllm", version=__version__, lifespan=lifespan, description=DESCRIPTION, docs_url=None, redoc_url=None)
    app.state.store, app.state.keys, app.state.batcher, app.state.metrics, app.state.service = store, keys, svc.batcher, svc.metrics, svc
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, import_max_bytes=settings.max_import_bytes, timeout_s=settings.body_timeout_s)
    app.add_middleware(JSONBodies)
    for exc in ERROR_STATUS:
        app.add_exception_handler(exc, error_response)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.middleware("http")(count_requests)
    inject_body, generate_body = bounded_bodies(settings.max_texts, settings.max_new_tokens)
    for router in (meta_routes(svc), memory_routes(svc, inject_body, generate_body), version_routes(svc), transfer_routes(svc), openai_routes(svc)):
        app.include_router(router)
    docs_routes(app, docs_assets() if docs is True else (docs or None))
    with_event_schemas(app, [StreamDone, ChatCompletionChunk])
    return app


def with_event_schemas(app: FastAPI, models: list) -> None:
    """Add to the OpenAPI components the models that only travel inside server-sent events
    (no route returns them as JSON, so FastAPI would not list them)."""
    base = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            components = base().setdefault("components", {}).setdefault("schemas", {})
            for m in models:
                schema = m.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(schema.pop("$defs", {}))
                components[m.__name__] = schema
        return app.openapi_schema

    app.openapi = openapi
