"""The HTTP service on a tiny model: API keys, tenant isolation (another tenant's memory is 404),
name validation, 413/422 bounds, streaming, the generate micro-batcher, concurrent clients on
loopback (no lost or duplicated injection), and hypothesis-fuzzed request bodies (never a 500)."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
import torch
from conftest import CORPUS, tiny_lm
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from latentmem.store.service import GenerateBatcher, KeyStore, ServiceSettings, create_app
from latentmem.store import MemoryStore

torch.set_num_threads(1)

LIMITS = ServiceSettings(max_body_bytes=16_384, max_new_tokens=16, max_texts=4, max_batch=4, batch_wait_ms=30, max_pools_per_tenant=3)


@pytest.fixture
def env(tmp_path):
    store = MemoryStore(tmp_path / "data", tiny_lm())
    keys = KeyStore(store.dir)
    app = create_app(store, keys, LIMITS)
    k1, k2 = keys.create("acme")[1], keys.create("globex")[1]
    client = TestClient(app)
    yield client, store, keys, {"Authorization": f"Bearer {k1}"}, {"Authorization": f"Bearer {k2}"}
    app.state.batcher.close()
    store.close()


def test_health_metrics_openapi_need_no_key(env):
    c = env[0]
    assert c.get("/health").json()["status"] == "ok"
    assert "latentmem_uptime_seconds" in c.get("/metrics").text
    paths = c.get("/openapi.json").json()["paths"]
    assert {"/v1/memories", "/v1/memories/{name}/inject", "/v1/memories/{name}/generate", "/v1/memories/{name}/forget"} <= set(paths)


def test_api_keys(env):
    c, store, keys, h1, _ = env
    assert c.get("/v1/memories").status_code == 401
    assert c.get("/v1/memories", headers={"Authorization": "Bearer mlk_0000_nope"}).status_code == 401
    assert c.get("/v1/memories", headers=h1).json() == {"memories": []}
    key_id, key = keys.create("initech")
    assert key not in (store.dir / "keys.db").read_bytes().decode("latin-1")  # only the hash is stored
    h3 = {"Authorization": f"Bearer {key}"}
    assert c.get("/v1/memories", headers=h3).status_code == 200
    keys.revoke(key_id)
    r = c.get("/v1/memories", headers=h3)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"


def test_another_tenants_memory_is_indistinguishable_from_a_missing_one(env):
    c, store, _, h1, h2 = env
    assert c.post("/v1/memories", json={"name": "notes", "seed": 1}, headers=h1).status_code == 201
    assert c.post("/v1/memories/notes/inject", json={"text": CORPUS[0]}, headers=h1).status_code == 200
    attempts = [
        ("GET", "/v1/memories/{}", None), ("DELETE", "/v1/memories/{}", None), ("POST", "/v1/memories/{}/inject", {"text": CORPUS[1]}),
        ("POST", "/v1/memories/{}/generate", {"prompt": "hi"}), ("GET", "/v1/memories/{}/ledger", None),
        ("POST", "/v1/memories/{}/forget", {"injection_id": 1}), ("POST", "/v1/memories/{}/snapshots", {"label": "x"}),
        ("POST", "/v1/memories/{}/rollback", {"label": "x"}), ("GET", "/v1/memories/{}/export", None), ("GET", "/v1/memories/{}/verify", None),
    ]
    for method, path, body in attempts:
        theirs = c.request(method, path.format("notes"), json=body, headers=h2)
        missing = c.request(method, path.format("nothing"), json=body, headers=h2)
        assert theirs.status_code == missing.status_code == 404, (method, path)
        assert theirs.json()["detail"].replace("notes", "X") == missing.json()["detail"].replace("nothing", "X")
    assert c.get("/v1/memories", headers=h2).json() == {"memories": []}
    assert [h.kind for h in store.history("notes", tenant="acme")] == ["create", "inject"]  # untouched
    assert c.post("/v1/memories", json={"name": "notes"}, headers=h2).status_code == 201  # own namespace


@pytest.mark.parametrize("name", ["..", ".hidden", "a b", "-x", "x" * 65, "a%2Fb", "%2E%2E", "caf%C3%A9"])
def test_invalid_names(env, name):
    c, store, _, h1, _ = env
    assert c.post("/v1/memories", json={"name": httpx.URL(f"/{name}").path[1:]}, headers=h1).status_code == 422
    r = c.get(f"/v1/memories/{name}", headers=h1)
    assert r.status_code in (404, 422) and store.names(tenant="acme") == []


def test_bodies_and_lengths_are_bounded(env):
    c, store, _, h1, _ = env
    c.post("/v1/memories", json={"name": "a"}, headers=h1)
    big = {"text": "word " * 5000}  # 25 kB > 16 kB
    r = c.post("/v1/memories/a/inject", json=big, headers=h1)
    assert r.status_code == 413 and "limit is 16384 bytes" in r.json()["detail"]

    def chunked():  # no Content-Length: counted while read
        for _ in range(40):
            yield b"x" * 1000

    assert c.post("/v1/memories/a/inject", content=chunked(), headers=h1).status_code == 413
    bad = [
        ("/v1/memories/a/generate", {"prompt": "hi", "max_new_tokens": 17}, "less than or equal to 16"),
        ("/v1/memories/a/generate", {"prompt": ""}, "at least 1 character"),
        ("/v1/memories/a/generate", {"prompt": "hi", "top_p": 0}, "greater than 0"),
        ("/v1/memories/a/generate", {"prompt": "hi", "bogus": 1}, "Extra inputs"),
        ("/v1/memories/a/generate", {"prompt": "hi", "stop": [""], "stream": True}, "at least 1 character"),
        ("/v1/memories/a/inject", {"texts": [CORPUS[0]] * 5}, "at most 4 items"),
        ("/v1/memories/a/inject", {"text": CORPUS[0], "texts": [CORPUS[1]]}, "exactly one of"),
        ("/v1/memories/a/inject", {}, "exactly one of"),
        ("/v1/memories/a/inject", {"text": "hi"}, "minimum"),  # too few tokens for a self-update
        ("/v1/memories/a/forget", {"injection_id": 1, "mode": "gentle"}, "String should match"),
        ("/v1/memories", {"name": "b", "seed": -1}, "greater than or equal to 0"),
    ]
    for path, body, message in bad:
        r = c.post(path, json=body, headers=h1)
        assert r.status_code == 422 and message in json.dumps(r.json()), (path, body, r.text)
    assert [h.kind for h in store.history("a", tenant="acme")] == ["create"]  # nothing written
    for name in ("b", "c"):
        assert c.post("/v1/memories", json={"name": name}, headers=h1).status_code == 201
    r = c.post("/v1/memories", json={"name": "d"}, headers=h1)
    assert r.status_code == 403 and "at most 3 memories" in r.json()["detail"]


def test_inject_generate_stream_versions_forget(env):
    c, store, _, h1, _ = env
    c.post("/v1/memories", json={"name": "a", "seed": 3}, headers=h1)
    r = c.post("/v1/memories/a/inject", json={"texts": CORPUS[:3], "source": "crm"}, headers=h1).json()
    assert [i["injection_id"] for i in r["injections"]] == [1, 2, 3] and "text" not in r["injections"][0]
    assert c.post("/v1/memories/a/snapshots", json={"label": "v1"}, headers=h1).status_code == 201
    c.post("/v1/memories/a/inject", json={"text": CORPUS[3], "store_text": False}, headers=h1)
    body = {"prompt": "Where does Alice live?", "max_new_tokens": 8}
    plain = c.post("/v1/memories/a/generate", json=body, headers=h1).json()
    assert plain["completion_tokens"] <= 8
    with c.stream("POST", "/v1/memories/a/generate", json=body | {"stream": True}, headers=h1) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        events = [e for e in s.read().decode().split("\n\n") if e]
    assert events[-1].startswith("event: done")
    assert "".join(json.loads(e[len("data: "):])["text"] for e in events[:-1]) == plain["text"]

    ledger = c.get("/v1/memories/a/ledger", headers=h1).json()["entries"]
    assert all("text" not in e for e in ledger)
    ledger = c.get("/v1/memories/a/ledger", params={"include_text": True}, headers=h1).json()["entries"]
    assert [e["text"] for e in ledger if e["kind"] == "inject"] == [*CORPUS[:3], None]
    d = c.get("/v1/memories/a/diff", params={"from": "v1"}, headers=h1).json()
    assert set(d["added_by_injection"]) == {"4"}
    assert c.post("/v1/memories/a/forget", json={"injection_id": 1, "mode": "exact"}, headers=h1).status_code == 409  # behind the textless base
    f = c.post("/v1/memories/a/forget", json={"injection_id": 2, "mode": "fast"}, headers=h1).json()
    assert f["snapshots_deleted"] == ["v1"]
    assert c.get("/v1/memories/a/verify", headers=h1).json()["ok"]
    assert c.get("/v1/memories/a/snapshots", headers=h1).json() == {"snapshots": []}
    assert c.post("/v1/memories/a/rollback", json={"label": "v1"}, headers=h1).status_code == 404

    blob = c.get("/v1/memories/a/export", headers=h1)
    assert blob.headers["content-type"] == "application/zip"
    assert c.put("/v1/memories/copy/import", content=blob.content, headers=h1).status_code == 201
    assert store.memory("copy", tenant="acme").equal(store.memory("a", tenant="acme"))
    assert c.put("/v1/memories/copy/import", content=blob.content, headers=h1).status_code == 409
    assert c.put("/v1/memories/junk/import", content=b"junk", headers=h1).status_code == 400
    assert c.delete("/v1/memories/copy", headers=h1).status_code == 204
    assert [m["name"] for m in c.get("/v1/memories", headers=h1).json()["memories"]] == ["a"]


class FakeLM:
    def __init__(self):
        self.batches = []

    def generate_batch(self, states, prompts, **params):
        self.batches.append(list(prompts))
        if any(p == "boom" for p in prompts):
            raise ValueError("boom")
        return [f"{s}:{p}" for s, p in zip(states, prompts)]


def test_batcher_groups_requests_that_arrive_together():
    lm = FakeLM()
    b = GenerateBatcher(lm, max_batch=3, max_wait_s=0.2)
    futs = [b.submit(f"m{i}", f"q{i}", max_new_tokens=4) for i in range(5)]
    futs.append(b.submit("m5", "q5", max_new_tokens=9))  # other parameters: its own batch
    futs.append(b.submit("m6", "q6", max_new_tokens=4, seed=1))  # seeded: never shared
    assert [f.result(timeout=10) for f in futs] == [f"m{i}:q{i}" for i in range(7)]
    assert [sorted(b) for b in lm.batches] == [["q0", "q1", "q2"], ["q3", "q4"], ["q5"], ["q6"]]
    bad, good = b.submit("m", "boom", max_new_tokens=4), b.submit("m", "fine", max_new_tokens=4)
    with pytest.raises(ValueError, match="boom"):
        bad.result(timeout=10)
    assert good.result(timeout=10) == "m:fine"  # a failing row fails alone
    b.close()


def test_generations_for_different_users_are_batched(env):
    c, store, _, h1, h2 = env
    for h in (h1, h2):
        for name in ("a", "b"):
            c.post("/v1/memories", json={"name": name}, headers=h)
            c.post(f"/v1/memories/{name}/inject", json={"text": CORPUS[0]}, headers=h)
    out = []
    threads = [threading.Thread(target=lambda h=h, n=n: out.append(c.post(f"/v1/memories/{n}/generate", json={"prompt": "hi", "max_new_tokens": 4}, headers=h).status_code))
               for h in (h1, h2) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == [200] * 4
    metrics = c.get("/metrics").text
    value = lambda name: float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith(name)))
    assert value("latentmem_generate_batched_rows_total") == 4 and value("latentmem_generate_batches_total") < 4


class LoopbackServer:
    """uvicorn on 127.0.0.1 (a free port) in a thread."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def test_concurrent_clients_on_loopback_lose_and_duplicate_nothing(tmp_path):
    store = MemoryStore(tmp_path / "data", tiny_lm())
    keys = KeyStore(store.dir)
    key = keys.create("acme")[1]
    app = create_app(store, keys, LIMITS)
    clients, per_client = 6, 5
    with LoopbackServer(app) as srv:
        h = {"Authorization": f"Bearer {key}"}
        httpx.post(f"{srv.url}/v1/memories", json={"name": "shared", "seed": 1}, headers=h).raise_for_status()
        statuses, errors = [], []

        def client(k):
            with httpx.Client(base_url=srv.url, headers=h, timeout=60) as http:
                for j in range(per_client):
                    try:
                        r = http.post("/v1/memories/shared/inject", json={"text": CORPUS[(k + j) % len(CORPUS)], "source": f"c{k}-{j}"})
                        statuses.append(r.status_code)
                        if j % 2:
                            statuses.append(http.post("/v1/memories/shared/generate", json={"prompt": "hi", "max_new_tokens": 3}).status_code)
                    except Exception as e:
                        errors.append(e)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        with httpx.stream("POST", f"{srv.url}/v1/memories/shared/generate", json={"prompt": "hi", "max_new_tokens": 6, "stream": True}, headers=h, timeout=60) as s:
            events = [e for e in s.read().decode().split("\n\n") if e]  # streamed while injections run
        for t in threads:
            t.join()
    app.state.batcher.close()
    assert events[-1].startswith("event: done") and all(e.startswith("data: ") for e in events[:-1])
    assert not errors and set(statuses) == {200}
    injects = [e for e in store.history("shared", tenant="acme") if e.kind == "inject"]
    assert len(injects) == clients * per_client
    assert sorted(e.injection_id for e in injects) == list(range(1, clients * per_client + 1))
    assert sorted(e.source for e in injects) == sorted(f"c{k}-{j}" for k in range(clients) for j in range(per_client))
    assert store.memory("shared", tenant="acme").update_count == sum(e.num_chunks for e in injects)
    assert store.verify("shared", tenant="acme").ok
    store.close()


json_values = st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=40),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=10)
FIELDS = ["name", "seed", "text", "texts", "source", "store_text", "allow_short", "prompt", "max_new_tokens", "temperature", "top_p",
          "top_k", "stop", "chat", "stream", "label", "injection_id", "mode"]
bodies = st.one_of(json_values, st.dictionaries(st.sampled_from(FIELDS), json_values | st.sampled_from(CORPUS), max_size=6))
routes = st.sampled_from(["/v1/memories", "/v1/memories/a/inject", "/v1/memories/a/generate", "/v1/memories/a/snapshots",
                          "/v1/memories/a/rollback", "/v1/memories/a/forget", "/v1/memories/zz/inject"])


def test_fuzzed_request_bodies_never_cause_a_server_error(env):
    c, store, _, h1, _ = env
    c.post("/v1/memories", json={"name": "a", "seed": 1}, headers=h1)
    c.post("/v1/memories/a/inject", json={"text": CORPUS[0]}, headers=h1)

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(route=routes, body=bodies, raw=st.booleans(), junk=st.binary(max_size=64))
    def check(route, body, raw, junk):
        if raw:
            r = c.post(route, content=junk, headers=h1 | {"content-type": "application/json"})
        else:
            r = c.post(route, content=json.dumps(body, allow_nan=True), headers=h1 | {"content-type": "application/json"})
        assert r.status_code < 500, (route, body, r.text)
        assert "detail" in r.json() or r.status_code in (200, 201)

    check()
    for name in store.names(tenant="acme"):
        assert store.verify(name, tenant="acme").ok


def test_keys_command_line(tmp_path, capsys):
    from latentmem.cli import main

    data = str(tmp_path / "d")
    assert main(["keys", "create", "--data", data, "--tenant", "acme", "--label", "ci"]) == 0
    out = capsys.readouterr().out
    key_id, key = out.split("key id: ")[1].split()[0], out.split("key:    ")[1].split()[0]
    keys = KeyStore(data)
    assert keys.tenant(key) == "acme"
    assert main(["keys", "list", "--data", data]) == 0
    listed = capsys.readouterr().out
    assert key_id in listed and "active" in listed and key not in listed
    assert main(["keys", "revoke", "--data", data, key_id]) == 0
    assert keys.tenant(key) is None
    assert main(["keys", "revoke", "--data", data, key_id]) == 2
    assert "no active key" in capsys.readouterr().err
    assert main(["keys", "create", "--data", data, "--tenant", "../evil"]) == 2
    keys.close()


def test_verify_command_line(tmp_path, capsys, monkeypatch):
    import sqlite3

    import latentmem
    from latentmem.cli import main

    data = tmp_path / "d"
    with MemoryStore(data, tiny_lm()) as store:
        store.create("a", seed=1, tenant="acme")
        store.inject("a", CORPUS[:2], tenant="acme")
        store.create("b", seed=2, tenant="globex")
    monkeypatch.setattr(latentmem, "load", lambda *a, **k: tiny_lm())
    assert main(["verify", "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "acme/a: ok: 2 injections replayed" in out and "globex/b: ok" in out
    with sqlite3.connect(data / "store.db") as db:
        db.execute("UPDATE ledger SET text=? WHERE injection_id=2", (CORPUS[3],))
    assert main(["verify", "--data", str(data), "--tenant", "acme", "a"]) == 1
    assert "MISMATCH" in capsys.readouterr().out
