"""The FastAPI app of the service (needs the ``serve`` extra): request bodies, the two
dependencies (the caller's tenant, a valid memory name), the routes in four routers, and the
mapping from store errors to HTTP statuses. ``service.create_app`` is the entry point.

No ``from __future__ import annotations`` here: FastAPI reads the route signatures' types at
definition time, and the bodies bounded by settings are classes made per app (``bounded``).
"""

import asyncio
import contextlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator
from starlette.background import BackgroundTask

from ..api import InjectionError, MemoryFormatError
from .service import BodyLimit, GenerateBatcher, KeyStore, Metrics, ServiceSettings
from .store import (
    FORGET_MODES,
    NAME_RE,
    AlreadyExists,
    InvalidName,
    MemoryStore,
    NotFound,
    NotReplayable,
    StoreError,
    check_name,
)

NAME_PATTERN = f"^{NAME_RE.pattern}$"


# ---------------------------------------------------------------------------------------------
# Request bodies (unknown fields are refused)
# ---------------------------------------------------------------------------------------------
class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CreateMemory(Strict):
    name: str = Field(pattern=NAME_PATTERN, description="1-64 of [A-Za-z0-9_.-], not starting with '.' or '-'")
    seed: int | None = Field(None, ge=0, lt=2**63, description="seed of the memory's generator (random when omitted)")


class InjectRequest(Strict):
    text: str | None = Field(None, min_length=1, description="one text (or use texts)")
    texts: list[str] | None = Field(None, min_length=1, description="several texts, injected in order, committed together")
    source: str = Field("", max_length=256)
    store_text: bool = Field(True, description="false: the ledger keeps only hash and token count (no replay across it)")
    allow_short: bool = False

    @model_validator(mode="after")
    def one_of(self):
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of 'text' or 'texts'")
        if self.texts is not None and any(not t for t in self.texts):
            raise ValueError("texts must be non-empty strings")
        return self


class GenerateRequest(Strict):
    prompt: str = Field(min_length=1, max_length=100_000)
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0, le=10)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, le=100_000)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(default_factory=list, max_length=16)
    chat: bool | None = Field(None, description="apply the chat template (default: when the tokenizer has one)")
    stream: bool = Field(False, description="server-sent events: 'data: {\"text\": ...}' per piece, then 'event: done'")

    def sampling(self) -> dict:
        return self.model_dump(exclude={"prompt", "stream"})


class SnapshotRequest(Strict):
    label: str = Field(pattern=NAME_PATTERN)


class ForgetRequest(Strict):
    injection_id: int = Field(ge=1)
    mode: str = Field("fast", pattern="^(" + "|".join(FORGET_MODES) + ")$", description="fast: the design's own forget; exact: as if never injected")


@dataclass(frozen=True)
class Bodies:
    """The bodies whose bounds are settings, as this app's subclasses (apps keep their own)."""

    inject: type[InjectRequest]
    generate: type[GenerateRequest]


def bounded(settings: ServiceSettings) -> Bodies:
    """InjectRequest with at most ``max_texts`` texts, GenerateRequest with at most ``max_new_tokens``."""
    texts = Field(None, min_length=1, max_length=settings.max_texts, description=InjectRequest.model_fields["texts"].description)
    return Bodies(
        inject=create_model("InjectRequest", __base__=InjectRequest, texts=(list[str] | None, texts)),
        generate=create_model("GenerateRequest", __base__=GenerateRequest, max_new_tokens=(int, Field(64, ge=1, le=settings.max_new_tokens))),
    )


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


def pool_name(name: str) -> str:
    """The {name} of a route, checked before anything else (InvalidName: 422)."""
    check_name(name)
    return name


def _public(info) -> dict:
    """A pool's facts without its tenant (the caller's own, by construction)."""
    return {k: v for k, v in asdict(info).items() if k != "tenant"}


# ---------------------------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------------------------
def meta_routes(svc: Service) -> APIRouter:
    """Health and metrics: no key needed."""
    r = APIRouter()

    @r.get("/health")
    def health():
        return {"status": "ok", "model": svc.store.lm.name, "model_id": svc.store.lm.model_id}

    @r.get("/metrics", response_class=PlainTextResponse)
    def get_metrics():
        return svc.metrics.render({"latentmem_batch_max": svc.settings.max_batch})

    return r


def memory_routes(svc: Service, bodies: Bodies) -> APIRouter:
    """A tenant's memories: create, list, read, delete; inject and generate; the ledger."""
    r, store, tenant = APIRouter(prefix="/v1/memories"), svc.store, svc.tenant
    limit = svc.settings.max_pools_per_tenant

    @r.post("", status_code=201)
    def create_memory(req: CreateMemory, t: str = Depends(tenant)):
        if len(store.names(tenant=t)) >= limit:
            raise HTTPException(403, f"quota: at most {limit} memories per tenant; delete one first")
        return _public(store.create(req.name, seed=req.seed, tenant=t))

    @r.get("")
    def list_memories(t: str = Depends(tenant)):
        return {"memories": [_public(p) for p in store.list(tenant=t)]}

    @r.get("/{name}")
    def get_memory(name: str = Depends(pool_name), t: str = Depends(tenant)):
        return _public(store.info(name, tenant=t))

    @r.delete("/{name}", status_code=204)
    def delete_memory(name: str = Depends(pool_name), t: str = Depends(tenant)):
        store.delete(name, tenant=t)
        return Response(status_code=204)

    @r.post("/{name}/inject")
    def inject(req: bodies.inject, name: str = Depends(pool_name), t: str = Depends(tenant)):
        texts = req.texts if req.texts is not None else [req.text]
        entries = store.inject(name, texts, source=req.source, store_text=req.store_text, allow_short=req.allow_short, tenant=t)
        svc.metrics.inc("latentmem_injections_total", len(entries))
        return {"injections": [e.to_dict(include_text=False) for e in entries]}

    @r.post("/{name}/generate")
    async def generate(req: bodies.generate, name: str = Depends(pool_name), t: str = Depends(tenant)):
        memory = await asyncio.to_thread(store.memory, name, tenant=t)  # 404 before anything starts; may read a file
        if req.stream:
            return StreamingResponse(_events(store.lm, memory, req), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            g = await asyncio.wrap_future(svc.batcher.submit(memory, req.prompt, **req.sampling()))
        except ValueError as e:
            raise HTTPException(422, str(e)) from e
        svc.metrics.inc("latentmem_generated_tokens_total", len(g.token_ids))
        return {"text": g.text, "finish_reason": g.finish_reason, "prompt_tokens": g.prompt_tokens, "completion_tokens": len(g.token_ids)}

    @r.get("/{name}/ledger")
    def ledger(name: str = Depends(pool_name), t: str = Depends(tenant), include_text: bool = False):
        return {"entries": [e.to_dict(include_text) for e in store.history(name, tenant=t)]}

    return r


def _events(lm, memory, req: GenerateRequest):
    """The answer as server-sent events; once headers are sent, an error is reported in-band."""
    try:
        for piece in lm.stream(memory, req.prompt, **req.sampling()):
            yield f"data: {json.dumps({'text': piece})}\n\n"
        yield "event: done\ndata: {}\n\n"
    except Exception as e:
        yield f"event: error\ndata: {json.dumps({'detail': str(e)})}\n\n"


def version_routes(svc: Service) -> APIRouter:
    """Snapshots, rollback, forgetting, diff and verify of one memory."""
    r, store, tenant = APIRouter(prefix="/v1/memories/{name}"), svc.store, svc.tenant

    @r.post("/snapshots", status_code=201)
    def snapshot(req: SnapshotRequest, name: str = Depends(pool_name), t: str = Depends(tenant)):
        return asdict(store.snapshot(name, req.label, tenant=t))

    @r.get("/snapshots")
    def snapshots(name: str = Depends(pool_name), t: str = Depends(tenant)):
        return {"snapshots": [asdict(s) for s in store.snapshots(name, tenant=t)]}

    @r.delete("/snapshots/{label}", status_code=204)
    def delete_snapshot(label: str, name: str = Depends(pool_name), t: str = Depends(tenant)):
        store.delete_snapshot(name, label, tenant=t)
        return Response(status_code=204)

    @r.post("/rollback")
    def rollback(req: SnapshotRequest, name: str = Depends(pool_name), t: str = Depends(tenant)):
        return asdict(store.rollback(name, req.label, tenant=t))

    @r.post("/forget")
    def forget(req: ForgetRequest, name: str = Depends(pool_name), t: str = Depends(tenant)):
        return asdict(store.forget(name, req.injection_id, req.mode, tenant=t))

    @r.get("/diff")
    def diff(name: str = Depends(pool_name), t: str = Depends(tenant), a: str | None = Query(None, alias="from"), b: str | None = Query(None, alias="to")):
        return store.diff(name, a, b, tenant=t)

    @r.get("/verify")
    def verify(name: str = Depends(pool_name), t: str = Depends(tenant)):
        return asdict(store.verify(name, tenant=t))

    return r


def transfer_routes(svc: Service) -> APIRouter:
    """A memory out as one zip file (export) and back in (import)."""
    r, store, tenant = APIRouter(prefix="/v1/memories/{name}"), svc.store, svc.tenant

    @r.get("/export", response_class=FileResponse)
    def export(name: str = Depends(pool_name), t: str = Depends(tenant)):
        fd, path = tempfile.mkstemp(suffix=".zip", dir=store.dir)
        os.close(fd)
        store.export(name, path, tenant=t)
        return FileResponse(path, media_type="application/zip", filename=f"{name}.memory.zip", background=BackgroundTask(os.unlink, path))

    @r.put("/import", status_code=201)
    async def import_(request: Request, name: str = Depends(pool_name), t: str = Depends(tenant)):
        """Body: a file made by export (application/zip)."""
        fd, path = tempfile.mkstemp(suffix=".zip", dir=store.dir)
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in request.stream():
                    f.write(chunk)
            info = await asyncio.to_thread(store.import_file, path, name, tenant=t)
        finally:
            os.unlink(path)
        return _public(info)

    return r


# ---------------------------------------------------------------------------------------------
# Errors, counting, assembly
# ---------------------------------------------------------------------------------------------
# The HTTP status of each error the store and the model raise on purpose; an error takes the
# status of the first class in its MRO listed here (as Starlette looks handlers up), so
# InvalidName is 422 although it is also a StoreError.
ERROR_STATUS: dict[type[Exception], int] = {
    InvalidName: 422, NotFound: 404, AlreadyExists: 409, NotReplayable: 409, InjectionError: 422,
    StoreError: 400, MemoryFormatError: 500, ValueError: 422,
}


def error_response(request: Request, e: Exception) -> JSONResponse:
    status = next(ERROR_STATUS[c] for c in type(e).__mro__ if c in ERROR_STATUS)
    return JSONResponse({"detail": str(e)}, status_code=status)


async def count_requests(request: Request, call_next):
    t0 = time.perf_counter()
    response = await call_next(request)
    path = getattr(request.scope.get("route"), "path", "unmatched")
    metrics = request.app.state.metrics
    metrics.inc("latentmem_requests_total", method=request.method, route=path, status=response.status_code)
    metrics.inc("latentmem_request_seconds_total", time.perf_counter() - t0, method=request.method, route=path)
    return response


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    yield
    app.state.batcher.close()


def build_app(store: MemoryStore, keys: KeyStore, settings: ServiceSettings) -> FastAPI:
    svc = Service(store, keys, settings)
    app = FastAPI(title="memoryllm", version="1", lifespan=lifespan, description="Per-tenant self-updating memories (MemoryLLM): inject, generate, versions, forgetting.")
    app.state.store, app.state.keys, app.state.batcher, app.state.metrics = store, keys, svc.batcher, svc.metrics
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, import_max_bytes=settings.max_import_bytes)
    for exc in ERROR_STATUS:
        app.add_exception_handler(exc, error_response)
    app.middleware("http")(count_requests)
    for router in (meta_routes(svc), memory_routes(svc, bounded(settings)), version_routes(svc), transfer_routes(svc)):
        app.include_router(router)
    return app
