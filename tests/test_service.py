"""The HTTP service on a tiny model: API keys, tenant isolation (another tenant's memory is 404),
name validation, 413/422 bounds, streaming (with finish reason and counts), the generate
micro-batcher, concurrent clients on loopback (no lost or duplicated injection), hypothesis-fuzzed
request bodies (never a 500), JSON bodies whatever their content type, a typed OpenAPI document
with declared errors, offline docs, the OpenAI-compatible chat completions (plain HTTP shaped like
the official client, and the official client itself when installed), and `memoryllm serve` as a
process: start-up and shutdown lines, access log, a busy data directory refused before the model loads."""

from __future__ import annotations

import dataclasses
import html
import json
import re
import socket
import threading
import time

import httpx
import pytest
import torch
from conftest import CORPUS, LoopbackServer, tiny_lm
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from latentmem.store import MemoryStore
from latentmem.store.service import GenerateBatcher, KeyStore, ServiceSettings, create_app

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
    from latentmem.cli.options import EXIT_MISMATCH  # issue 14: a mismatch (3) is told from an error (2); it was 1

    assert main(["verify", "--data", str(data), "--tenant", "acme", "a"]) == EXIT_MISMATCH
    assert "MISMATCH" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Issue 14: the service's conventions
# ---------------------------------------------------------------------------------------------
# the errors each route can answer (beyond the auto-documented ones); every /v1 route needs a key
ROUTE_ERRORS = {
    ("post", "/v1/memories"): {401, 403, 409, 413, 422},
    ("get", "/v1/memories"): {401},
    ("get", "/v1/memories/{name}"): {401, 404, 422},
    ("delete", "/v1/memories/{name}"): {401, 404, 422},
    ("post", "/v1/memories/{name}/inject"): {401, 404, 413, 422},
    ("post", "/v1/memories/{name}/generate"): {401, 404, 413, 422},
    ("get", "/v1/memories/{name}/ledger"): {401, 404, 422},
    ("post", "/v1/memories/{name}/snapshots"): {401, 404, 409, 413, 422},
    ("get", "/v1/memories/{name}/snapshots"): {401, 404, 422},
    ("delete", "/v1/memories/{name}/snapshots/{label}"): {401, 404, 422},
    ("post", "/v1/memories/{name}/rollback"): {401, 404, 413, 422},
    ("post", "/v1/memories/{name}/forget"): {401, 404, 409, 413, 422},
    ("get", "/v1/memories/{name}/diff"): {401, 404, 422},
    ("get", "/v1/memories/{name}/verify"): {401, 404, 422},
    ("get", "/v1/memories/{name}/export"): {401, 404, 422},
    ("put", "/v1/memories/{name}/import"): {400, 401, 409, 413, 422},
    ("get", "/health"): set(),
    ("get", "/metrics"): set(),
    ("get", "/v1/models"): {401},
    ("get", "/v1/models/{model_id}"): {401, 404},
    ("post", "/v1/chat/completions"): {400, 401, 404, 413},
}


def test_openapi_routes_are_typed_and_declare_their_errors(env):
    doc = env[0].app.openapi()
    schemas = doc["components"]["schemas"]
    seen = set()
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            seen.add((method, path))
            ok = {code: r for code, r in op["responses"].items() if code.startswith("2")}
            assert ok, (method, path)
            for code, r in ok.items():
                if code == "204":
                    assert not r.get("content"), (method, path)
                    continue
                assert r.get("content"), (method, path, code)
                for media, c in r["content"].items():
                    schema = c.get("schema")
                    assert schema and schema != {}, (method, path, media)  # no untyped answer
                    if "$ref" in schema:
                        assert schemas[schema["$ref"].rsplit("/", 1)[-1]].get("properties"), (method, path)
            declared = {int(c) for c in op["responses"] if c.isdigit() and not c.startswith("2")}
            assert ROUTE_ERRORS[(method, path)] <= declared, (method, path, declared)
            for code in declared:
                content = op["responses"][str(code)].get("content", {})
                assert content.get("application/json", {}).get("schema"), (method, path, code)  # errors are typed too
    assert seen == set(ROUTE_ERRORS)  # a new route must be added to the table above
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_json_bodies_whatever_the_content_type(env):
    c, store, _, h1, _ = env
    body = json.dumps({"name": "a", "seed": 1})
    for ctype in ["application/x-www-form-urlencoded", "text/plain", None, "application/json; charset=utf-8"]:
        headers = h1 | ({"content-type": ctype} if ctype else {})
        r = c.post("/v1/memories", content=body, headers=headers)
        assert r.status_code in (201, 409), (ctype, r.text)
        c.delete("/v1/memories/a", headers=h1)
    r = c.post("/v1/memories", content=b"name=a&seed=1", headers=h1 | {"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 422 and r.json()["detail"].startswith("request body is not valid JSON")
    r = c.post("/v1/memories", content=b"\xff\xfe{", headers=h1)
    assert r.status_code in (400, 422) and "detail" in r.json()
    assert store.names(tenant="acme") == []


def test_stream_done_carries_finish_reason_and_token_counts(env, monkeypatch):
    c, store, _, h1, _ = env
    c.post("/v1/memories", json={"name": "a", "seed": 3}, headers=h1)
    c.post("/v1/memories/a/inject", json={"text": CORPUS[0]}, headers=h1)

    def done_of(body):
        with c.stream("POST", "/v1/memories/a/generate", json=body | {"stream": True}, headers=h1) as s:
            events = [e for e in s.read().decode().split("\n\n") if e]
        head, data = events[-1].split("\n")
        assert head == "event: done"
        return json.loads(data[len("data: "):]), "".join(json.loads(e[len("data: "):])["text"] for e in events[:-1])

    # the streamed answer's done event agrees with the plain answer (finish reason, prompt tokens;
    # the designs' stream returns its Generation, so the completion tokens are exact as well)
    for body in ({"prompt": "Where does Alice live?", "max_new_tokens": 8}, {"prompt": "Who?", "max_new_tokens": 16, "stop": ["e"]}):
        plain = c.post("/v1/memories/a/generate", json=body, headers=h1).json()
        done, text = done_of(body)
        assert text == plain["text"]
        assert (done["finish_reason"], done["prompt_tokens"]) == (plain["finish_reason"], plain["prompt_tokens"]), (body, done, plain)
        assert 1 <= done["completion_tokens"] <= body["max_new_tokens"]
        if plain["finish_reason"] == "length":
            assert done["completion_tokens"] == plain["completion_tokens"]
    # a design whose stream returns its Generation gives its own counts (exact by construction)
    lm, who = store.lm, c.post("/v1/memories/a/generate", json={"prompt": "Who?", "max_new_tokens": 8}, headers=h1).json()

    def stream(memory, prompt, **sampling):
        g = type(lm).generate(lm, memory, prompt, **sampling)
        yield g.text
        return dataclasses.replace(g, finish_reason="stop", token_ids=[0] * 5)

    monkeypatch.setattr(lm, "stream", stream, raising=False)
    assert done_of({"prompt": "Who?", "max_new_tokens": 8})[0] == {"finish_reason": "stop", "prompt_tokens": who["prompt_tokens"], "completion_tokens": 5}


def test_errors_inside_a_stream_are_reported_in_band(env, monkeypatch):
    c, store, _, h1, _ = env
    c.post("/v1/memories", json={"name": "a"}, headers=h1)

    def broken(memory, prompt, **sampling):
        yield "half"
        raise ValueError("the model broke")

    monkeypatch.setattr(store.lm, "stream", broken, raising=False)
    with c.stream("POST", "/v1/memories/a/generate", json={"prompt": "hi", "stream": True}, headers=h1) as s:
        events = [e for e in s.read().decode().split("\n\n") if e]
    assert events[0] == 'data: {"text": "half"}' and events[-1].startswith("event: error")
    assert json.loads(events[-1].split("data: ")[1]) == {"detail": "the model broke", "status": 422}

    def refuses(memory, prompt, **sampling):  # fails before its first piece: an HTTP error, no stream
        raise ValueError("prompt is empty")
        yield

    monkeypatch.setattr(store.lm, "stream", refuses, raising=False)
    r = c.post("/v1/memories/a/generate", json={"prompt": "hi", "stream": True}, headers=h1)
    assert r.status_code == 422 and r.json() == {"detail": "prompt is empty"}
    r = c.post("/v1/chat/completions", json={"model": "m", "user": "a", "stream": True, "messages": [{"role": "user", "content": "hi"}]}, headers=h1)
    assert r.status_code == 400 and r.json()["error"]["message"] == "prompt is empty"


def test_docs_work_offline(tmp_path):
    from latentmem.store.app import docs_assets

    store = MemoryStore(tmp_path / "data", tiny_lm())
    try:
        assets = docs_assets()
        for docs in ([True] if assets else []) + [None]:
            app = create_app(store, KeyStore(store.dir), LIMITS, docs=docs)
            c = TestClient(app)
            page = c.get("/docs")
            assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
            assert "http://" not in page.text.replace("http://127.0.0.1", "") and "https://" not in page.text  # nothing from a CDN
            if docs is True:
                for url in re.findall(r'(?:src|href)="([^"]+)"', page.text) + ["/docs/assets/redoc.standalone.js"]:
                    assert c.get(url).status_code == 200, url
                redoc = c.get("/redoc").text
                assert "/docs/assets/redoc.standalone.js" in redoc and "https://" not in redoc
            else:  # the plain reference page: every route, every schema
                for path in app.openapi()["paths"]:
                    assert html.escape(path) in page.text
                assert "ChatCompletion" in page.text and "<script" not in page.text
            assert c.get("/openapi.json").status_code == 200
            app.state.batcher.close()
    finally:
        store.close()


def test_export_leaves_no_temp_file(env):
    c, store, _, h1, _ = env
    assert c.get("/v1/memories/none/export", headers=h1).status_code == 404
    c.post("/v1/memories", json={"name": "a"}, headers=h1)
    assert c.get("/v1/memories/a/export", headers=h1).status_code == 200
    r = c.put("/v1/memories/b/import", content=b"PK junk", headers=h1)
    assert r.status_code == 400 and str(store.dir) not in r.json()["detail"]  # no server path in the message
    leftovers = [p for p in store.dir.rglob("*.zip")]
    assert leftovers == []


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible chat completions
# ---------------------------------------------------------------------------------------------
# what the official Python client sends (openai 1.x-3.x): these headers and a JSON body
OPENAI_HEADERS = {"Accept": "application/json", "Content-Type": "application/json", "User-Agent": "OpenAI/Python 1.99.9",
                  "X-Stainless-Lang": "python", "X-Stainless-Package-Version": "1.99.9", "X-Stainless-OS": "Linux", "X-Stainless-Arch": "x64",
                  "X-Stainless-Runtime": "CPython", "X-Stainless-Runtime-Version": "3.11.9", "x-stainless-retry-count": "0",
                  "x-stainless-read-timeout": "600"}


def openai_post(c, key, body, **headers):
    return c.post("/v1/chat/completions", content=json.dumps(body, separators=(",", ":")),
                  headers=OPENAI_HEADERS | {"Authorization": f"Bearer {key}"} | headers)


@pytest.fixture
def chat_env(env):
    c, store, _, h1, h2 = env
    for name, text in (("alice", CORPUS[3]), ("bob", CORPUS[1])):
        c.post("/v1/memories", json={"name": name, "seed": 1}, headers=h1)
        c.post(f"/v1/memories/{name}/inject", json={"text": text}, headers=h1)
    return c, store, h1["Authorization"].split()[1], h1, h2


def test_chat_completions_over_plain_http(chat_env):
    c, store, key, h1, _ = chat_env
    q = "Where does Alice live?"
    expect = c.post("/v1/memories/alice/generate", json={"prompt": q, "max_new_tokens": 8}, headers=h1).json()
    body = {"messages": [{"role": "user", "content": q}], "model": "gpt-4o-mini", "max_tokens": 8, "user": "alice"}
    r = openai_post(c, key, body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-") and out["model"] == "gpt-4o-mini"
    [choice] = out["choices"]
    assert choice["message"] == {"role": "assistant", "content": expect["text"]}  # the answer reads that memory
    assert choice["finish_reason"] == expect["finish_reason"] and choice["index"] == 0
    assert out["usage"] == {"prompt_tokens": expect["prompt_tokens"], "completion_tokens": expect["completion_tokens"],
                            "total_tokens": expect["prompt_tokens"] + expect["completion_tokens"]}
    # X-Memory wins over user; content as a list of text parts; max_completion_tokens
    bob = c.post("/v1/memories/bob/generate", json={"prompt": q, "max_new_tokens": 8}, headers=h1).json()["text"]
    parts = body | {"messages": [{"role": "user", "content": [{"type": "text", "text": "Where does "}, {"type": "text", "text": "Alice live?"}]}],
                    "max_tokens": None, "max_completion_tokens": 8}
    assert openai_post(c, key, parts, **{"X-Memory": "bob"}).json()["choices"][0]["message"]["content"] == bob
    # a conversation goes through the chat template; stop strings; seeded sampling
    conv = body | {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}], "stop": ["e"],
                   "temperature": 0.7, "top_p": 0.9, "seed": 5}
    first, again = (openai_post(c, key, conv).json() for _ in range(2))
    assert first["choices"][0]["message"] == again["choices"][0]["message"] and "e" not in first["choices"][0]["message"]["content"]
    assert first["usage"]["prompt_tokens"] > out["usage"]["prompt_tokens"]
    # models
    models = c.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [store.lm.name]


def test_chat_completions_streamed_in_openai_chunks(chat_env):
    c, _, key, h1, _ = chat_env
    q = "Where does Alice live?"
    expect = c.post("/v1/memories/alice/generate", json={"prompt": q, "max_new_tokens": 8}, headers=h1).json()
    body = {"messages": [{"role": "user", "content": q}], "model": "m", "max_tokens": 8, "stream": True, "stream_options": {"include_usage": True}}
    with c.stream("POST", "/v1/chat/completions", content=json.dumps(body), headers=OPENAI_HEADERS | {"Authorization": f"Bearer {key}", "X-Memory": "alice"}) as s:
        assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in s.read().decode().split("\n\n") if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert len({ch["id"] for ch in chunks}) == 1 and all(ch["object"] == "chat.completion.chunk" for ch in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"])
    assert text == expect["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == expect["finish_reason"] and chunks[-2]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == expect["completion_tokens"]
    # without include_usage: no usage chunk
    with c.stream("POST", "/v1/chat/completions", content=json.dumps(body | {"stream_options": None, "user": "alice"}),
                  headers=OPENAI_HEADERS | {"Authorization": f"Bearer {key}"}) as s:
        lines = [line for line in s.read().decode().split("\n\n") if line]
    assert "usage" not in json.loads(lines[-2][len("data: "):])


def test_chat_completions_errors_in_openai_shape(chat_env):
    c, store, key, _, h2 = chat_env
    ok = {"messages": [{"role": "user", "content": "hi"}], "model": "m", "user": "alice"}
    other_key = h2["Authorization"].split()[1]
    cases = [
        (ok, {"Authorization": "Bearer nope"}, 401, "invalid_api_key"),
        (ok, {"Authorization": f"Bearer {other_key}"}, 404, "not_found"),  # another tenant's memory: as missing
        (ok | {"user": "nobody"}, {}, 404, "not_found"),
        (ok | {"user": None}, {}, 400, None),  # no memory chosen
        (ok | {"user": "../x"}, {}, 400, None),
        (ok | {"messages": []}, {}, 400, None),
        (ok | {"max_tokens": 17}, {}, 400, None),  # over the server's limit (16 here)
        (ok | {"n": 2}, {}, 400, None),
        (ok | {"tools": [{"type": "function", "function": {"name": "f"}}]}, {}, 400, None),
        (ok | {"temperature": 3}, {}, 400, None),
        ({"model": "m", "user": "alice"}, {}, 400, None),
        (ok | {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, {}, 400, None),
    ]
    for body, headers, status, code in cases:
        r = openai_post(c, key, body, **headers)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"] == "invalid_request_error", err
        assert code is None or err["code"] == code, err
    assert openai_post(c, key, ok | {"messages": []}).json()["error"]["param"] == "messages"
    r = c.post("/v1/chat/completions", content=b"{not json", headers=OPENAI_HEADERS | {"Authorization": f"Bearer {key}"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    big = ok | {"messages": [{"role": "user", "content": "x" * 20_000}]}
    r = openai_post(c, key, big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert [h.kind for h in store.history("alice", tenant="acme")] == ["create", "inject"]


def test_the_openai_package_talks_to_the_service(tmp_path):
    openai = pytest.importorskip("openai")
    store = MemoryStore(tmp_path / "data", tiny_lm())
    keys = KeyStore(store.dir)
    key = keys.create("acme")[1]
    app = create_app(store, keys, LIMITS)
    store.create("alice", seed=1, tenant="acme")
    store.inject("alice", CORPUS[3], tenant="acme")
    q = "Where does Alice live?"
    expect = store.generate("alice", q, max_new_tokens=8, tenant="acme")
    with LoopbackServer(app) as srv:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=key, max_retries=0)
        out = client.chat.completions.create(model="latentmem", messages=[{"role": "user", "content": q}], max_tokens=8, user="alice")
        assert out.choices[0].message.content == expect.text and out.usage.completion_tokens == len(expect.token_ids)
        stream = client.chat.completions.create(model="latentmem", messages=[{"role": "user", "content": q}], max_tokens=8, stream=True,
                                                extra_headers={"X-Memory": "alice"}, stream_options={"include_usage": True})
        chunks = list(stream)
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == expect.text
        assert chunks[-1].usage.total_tokens == expect.prompt_tokens + len(expect.token_ids)
        assert [m.id for m in client.models.list()] == [store.lm.name]
        with pytest.raises(openai.NotFoundError, match="not found"):
            client.chat.completions.create(model="latentmem", messages=[{"role": "user", "content": q}], user="nobody")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{srv.url}/v1", api_key="wrong", max_retries=0).chat.completions.create(
                model="latentmem", messages=[{"role": "user", "content": q}], user="alice")
        with pytest.raises(openai.BadRequestError, match="choose the memory"):
            client.chat.completions.create(model="latentmem", messages=[{"role": "user", "content": q}])
    app.state.batcher.close()
    store.close()


# ---------------------------------------------------------------------------------------------
# memoryllm serve as a process
# ---------------------------------------------------------------------------------------------
SERVE_DRIVER = """
import sys
sys.path.insert(0, {tests!r})
import conftest, latentmem
if {fail_load}:
    def load(*a, **k):
        print("MODEL LOADED", file=sys.stderr)
        raise SystemExit(99)
    latentmem.load = load
else:
    latentmem.load = lambda *a, **k: conftest.tiny_lm()
from latentmem.cli import main
sys.exit(main(sys.argv[1:]))
"""


def serve_process(data, *args, fail_load=False):
    import subprocess
    import sys
    from pathlib import Path

    code = SERVE_DRIVER.format(tests=str(Path(__file__).parent), fail_load=fail_load)
    return subprocess.Popen([sys.executable, "-c", code, "serve", "--data", str(data), "--port", "0", "--threads", "1", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_serve_prints_start_and_stop_lines_and_an_access_log(tmp_path):
    import signal as signals

    data = tmp_path / "data"
    key = KeyStore(data).create("acme")[1]
    proc = serve_process(data, "--log-level", "info")
    try:
        line = ""
        deadline = time.time() + 120
        while "listening on" not in line and time.time() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, proc.stderr.read()
        m = re.search(r"listening on (http://127\.0\.0\.1:(\d+)) \(model tiny, design memoryllm, data (\S+) with 0 memories", line)
        assert m, line
        url = m.group(1)
        assert m.group(3) == str(data.resolve())
        r = httpx.post(f"{url}/v1/memories", content='{"name": "alice"}', headers={"Authorization": f"Bearer {key}"}, timeout=60)  # curl -d style
        assert r.status_code == 201, r.text
        proc.send_signal(signals.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert '"POST /v1/memories HTTP/1.1" 201' in out  # uvicorn's access log, on stdout
    assert re.search(r"memoryllm serve: stopped after \d+ s, 1 requests served", err), err
    assert "Traceback" not in err


def test_serve_refuses_a_busy_data_directory_before_loading_the_model(tmp_path):
    data = tmp_path / "data"
    with MemoryStore(data, tiny_lm()):  # another server holds it
        proc = serve_process(data, fail_load=True)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("memoryllm serve: error: ") and "in use by another process" in lines[0], err
    assert "MODEL LOADED" not in err


def test_serve_refuses_a_port_in_use_before_loading_the_model(tmp_path, monkeypatch, capsys):
    import latentmem
    from latentmem.cli import main

    monkeypatch.setattr(latentmem, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--data", str(tmp_path / "d"), "--port", str(port)]) == 2
    assert "cannot listen on 127.0.0.1:" in capsys.readouterr().err


def test_keys_command_line_for_scripts(tmp_path, capsys):
    from latentmem.cli import main

    data = tmp_path / "d"
    assert main(["keys", "create", "--data", str(data), "--tenant", "acme", "--quiet"]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("mlk_") and KeyStore(data).tenant(key) == "acme"
    assert main(["keys", "list", "--data", str(tmp_path / "typo")]) == 2
    assert "no API keys in" in capsys.readouterr().err and not (tmp_path / "typo").exists()
