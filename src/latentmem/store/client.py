"""A small synchronous Python client for the memory service (``memoryllm serve``), over httpx.

    from latentmem.store.client import Client

    with Client("http://127.0.0.1:8000", api_key="mlk_...") as c:
        c.create("alice", seed=0)
        c.inject("alice", "Alice moved to Zurich in May; her new office is next to the main station.")
        print(c.generate("alice", "Where does Alice live?", max_new_tokens=16)["text"])
        with c.stream("alice", "Where does Alice live?") as s:
            for piece in s:
                print(piece, end="", flush=True)
        print(s.done)                       # {"finish_reason": ..., "prompt_tokens": ..., "completion_tokens": ...}
        c.snapshot("alice", "v1"); c.rollback("alice", "v1"); c.forget("alice", 1, mode="exact")
        c.export("alice", "alice.zip"); c.import_("alice-copy", "alice.zip")

Answers are the service's JSON as dicts (the shapes in ``/openapi.json``). Every error answer
raises ``ServiceError`` (or the subclass for its status) carrying ``status`` and ``message``;
an error that arrives inside a stream raises the same way. Needs only httpx; no torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from ..files import atomic_write

__all__ = ["Client", "Conflict", "Forbidden", "InvalidRequest", "NotFound", "ServiceError", "Stream", "TooLarge", "Unauthorized"]


class ServiceError(Exception):
    """An error answer of the service: ``status`` (HTTP status) and ``message`` (its detail)."""

    def __init__(self, status: int, message: str, body: Any = None):
        super().__init__(f"{status}: {message}")
        self.status, self.message, self.body = status, message, body


class InvalidRequest(ServiceError):
    """400 or 422: a body, a parameter or a name the service refuses."""


class Unauthorized(ServiceError):
    """401: missing, unknown or revoked API key."""


class Forbidden(ServiceError):
    """403: the tenant's quota of memories is used up."""


class NotFound(ServiceError):
    """404: no such memory, snapshot or injection for this tenant."""


class Conflict(ServiceError):
    """409: exists already, or an exact forget is impossible."""


class TooLarge(ServiceError):
    """413: request body over the server's limit."""


ERRORS = {400: InvalidRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict, 413: TooLarge, 422: InvalidRequest}


def _error(status: int, body: Any) -> ServiceError:
    message = body
    if isinstance(body, dict):
        detail = body.get("detail", body.get("error", body))
        if isinstance(detail, dict):  # OpenAI's shape
            detail = detail.get("message", detail)
        if isinstance(detail, list):  # FastAPI's list of invalid fields
            detail = "; ".join(f"{'.'.join(str(x) for x in d.get('loc', [])[1:])}: {d.get('msg')}" for d in detail)
        message = detail
    return ERRORS.get(status, ServiceError)(status, str(message), body)


def _raise_for(r: httpx.Response) -> None:
    if r.is_success:
        return
    r.read()
    try:
        body = r.json()
    except ValueError:
        body = r.text
    raise _error(r.status_code, body)


class Stream:
    """The pieces of a streamed answer (iterate it once); ``done`` holds the final event's data
    (finish_reason, prompt_tokens, completion_tokens) once the stream is exhausted. Close it (or
    use ``with``) to stop early: the server stops generating when the connection closes."""

    def __init__(self, cm):
        self._cm = cm
        self._response: httpx.Response | None = cm.__enter__()
        try:
            _raise_for(self._response)
        except BaseException:
            self.close()
            raise
        self.done: dict | None = None

    def __iter__(self) -> Iterator[str]:
        event = None
        for line in self._response.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data = json.loads(line[5:].strip() or "{}")
                if event == "done":
                    self.done = data
                elif event == "error":
                    self.close()
                    raise _error(data.get("status", 500), data)
                else:
                    yield data["text"]
            elif not line:
                event = None
        self.close()

    @property
    def text(self) -> str:
        """The whole answer (consumes the stream)."""
        return "".join(self)

    def close(self) -> None:
        if self._cm is not None:
            cm, self._cm = self._cm, None
            cm.__exit__(None, None, None)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Client:
    """The service's API as methods. ``base_url`` such as ``http://127.0.0.1:8000``; ``api_key``
    from ``memoryllm keys create`` (default: the ``MEMORYLLM_API_KEY`` environment variable);
    ``timeout`` in seconds for each request (generation on a CPU can take a while)."""

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = 300.0, transport: httpx.BaseTransport | None = None):
        key = api_key if api_key is not None else os.environ.get("MEMORYLLM_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, path: str, body: dict | None = None, **kw) -> Any:
        r = self._http.request(method, path, json=body, **kw)
        _raise_for(r)
        return None if r.status_code == 204 else r.json()

    @staticmethod
    def _m(name: str, *rest: str) -> str:
        return "/v1/memories/" + "/".join(_quote(n) for n in (name, *rest))

    # ---- service ----
    def health(self) -> dict:
        return self._call("GET", "/health")

    # ---- memories ----
    def create(self, name: str, seed: int | None = None) -> dict:
        """A new empty memory (Conflict if it exists, Forbidden over the quota)."""
        return self._call("POST", "/v1/memories", {"name": name, **({"seed": seed} if seed is not None else {})})

    def list(self) -> list[dict]:
        return self._call("GET", "/v1/memories")["memories"]

    def get(self, name: str) -> dict:
        return self._call("GET", self._m(name))

    def delete(self, name: str) -> None:
        self._call("DELETE", self._m(name))

    # ---- writing and reading ----
    def inject(self, name: str, text: str | list[str], *, source: str = "", store_text: bool = True, allow_short: bool = False) -> list[dict]:
        """Write one text, or several committed together; returns their ledger rows (ids, tokens)."""
        body = {"texts" if isinstance(text, list) else "text": text, "source": source, "store_text": store_text, "allow_short": allow_short}
        return self._call("POST", self._m(name, "inject"), body)["injections"]

    def generate(self, name: str, prompt: str, **sampling) -> dict:
        """``{text, finish_reason, prompt_tokens, completion_tokens}``; sampling: max_new_tokens,
        temperature, top_p, top_k, seed, stop, chat."""
        return self._call("POST", self._m(name, "generate"), {"prompt": prompt, **sampling})

    def stream(self, name: str, prompt: str, **sampling) -> Stream:
        """The answer piece by piece: iterate the returned ``Stream``; ``.done`` has the counts after."""
        body = {"prompt": prompt, **sampling, "stream": True}
        return Stream(self._http.stream("POST", self._m(name, "generate"), json=body))

    def ledger(self, name: str, *, include_text: bool = False) -> list[dict]:
        return self._call("GET", self._m(name, "ledger"), params={"include_text": str(include_text).lower()})["entries"]

    # ---- versions and forgetting ----
    def snapshot(self, name: str, label: str) -> dict:
        return self._call("POST", self._m(name, "snapshots"), {"label": label})

    def snapshots(self, name: str) -> list[dict]:
        return self._call("GET", self._m(name, "snapshots"))["snapshots"]

    def delete_snapshot(self, name: str, label: str) -> None:
        self._call("DELETE", self._m(name, "snapshots", label))

    def rollback(self, name: str, label: str) -> dict:
        return self._call("POST", self._m(name, "rollback"), {"label": label})

    def diff(self, name: str, a: str | None = None, b: str | None = None) -> dict:
        """Between snapshots ``a`` and ``b`` (None: the live version)."""
        params = {k: v for k, v in (("from", a), ("to", b)) if v is not None}
        return self._call("GET", self._m(name, "diff"), params=params)

    def forget(self, name: str, injection_id: int, mode: str = "fast") -> dict:
        return self._call("POST", self._m(name, "forget"), {"injection_id": injection_id, "mode": mode})

    def verify(self, name: str) -> dict:
        return self._call("GET", self._m(name, "verify"))

    # ---- transfer ----
    def export(self, name: str, path: str | os.PathLike | None = None) -> bytes | Path:
        """The memory as a zip file: written to ``path`` (streamed; returns the path), or returned as bytes."""
        with self._http.stream("GET", self._m(name, "export")) as r:
            _raise_for(r)
            if path is None:
                return r.read()
            def write(tmp: str) -> None:
                with open(tmp, "wb") as f:
                    for chunk in r.iter_bytes():
                        f.write(chunk)

            atomic_write(path, write, mode=0o644)  # a failed download leaves no partial file
            return Path(path)

    def import_(self, name: str, data: bytes | str | os.PathLike) -> dict:
        """A new memory ``name`` from an export (bytes, or the path of a file)."""
        body = data if isinstance(data, bytes) else Path(data).read_bytes()  # the server reads the whole body first anyway
        return self._call("PUT", self._m(name, "import"), content=body, headers={"Content-Type": "application/zip"})


def _quote(part: str) -> str:
    """A path segment, percent-encoded (a name with '/' must not become two segments)."""
    from urllib.parse import quote

    return quote(part, safe="")
