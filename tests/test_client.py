"""latentmem.store.client.Client against a live loopback server (uvicorn in a thread, tiny model):
every method, streaming, errors as exceptions with status and message, export/import round trip."""

from __future__ import annotations


import pytest
import torch
from conftest import CORPUS, LoopbackServer, tiny_lm

from latentmem.store import MemoryStore
from latentmem.store.client import (
    Client,
    Conflict,
    Forbidden,
    InvalidRequest,
    NotFound,
    ServiceError,
    TooLarge,
    Unauthorized,
)
from latentmem.store.service import KeyStore, ServiceSettings, create_app

torch.set_num_threads(1)

LIMITS = ServiceSettings(max_body_bytes=16_384, max_new_tokens=16, max_texts=4, max_batch=4, batch_wait_ms=10, max_pools_per_tenant=3)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    store = MemoryStore(tmp_path_factory.mktemp("client") / "data", tiny_lm())
    keys = KeyStore(store.dir)
    key, other = keys.create("acme")[1], keys.create("globex")[1]
    app = create_app(store, keys, LIMITS)
    with LoopbackServer(app) as srv:
        yield srv.url, key, other, store
    app.state.batcher.close()
    store.close()


@pytest.fixture
def client(live):
    url, key, _, _ = live
    with Client(url, key, timeout=60) as c:
        yield c
        for m in c.list():
            c.delete(m["name"])


def test_memories_inject_generate_and_stream(client, live):
    store = live[3]
    assert client.health()["status"] == "ok"
    info = client.create("alice", seed=4)
    assert (info["name"], info["seed"], info["live_injections"]) == ("alice", 4, 0)
    assert [m["name"] for m in client.list()] == ["alice"] and client.get("alice")["seed"] == 4
    [row] = client.inject("alice", CORPUS[3], source="crm")
    assert (row["injection_id"], row["source"], row["status"]) == (1, "crm", "live") and "text" not in row
    rows = client.inject("alice", CORPUS[:2])
    assert [r["injection_id"] for r in rows] == [2, 3]
    g = client.generate("alice", "Where does Alice live?", max_new_tokens=8)
    expect = store.generate("alice", "Where does Alice live?", max_new_tokens=8, tenant="acme")
    assert g == {"text": expect.text, "finish_reason": expect.finish_reason, "prompt_tokens": expect.prompt_tokens,
                 "completion_tokens": len(expect.token_ids)}
    with client.stream("alice", "Where does Alice live?", max_new_tokens=8) as s:
        pieces = list(s)
    assert "".join(pieces) == g["text"] and len(pieces) >= 1
    assert s.done["finish_reason"] == g["finish_reason"] and s.done["prompt_tokens"] == g["prompt_tokens"]
    assert client.stream("alice", "Who?", max_new_tokens=4, seed=1, temperature=0.8).text == client.generate("alice", "Who?", max_new_tokens=4, seed=1, temperature=0.8)["text"]
    ledger = client.ledger("alice")
    assert [e["kind"] for e in ledger] == ["create", "inject", "inject", "inject"] and all("text" not in e for e in ledger)
    assert [e["text"] for e in client.ledger("alice", include_text=True) if e["kind"] == "inject"] == [CORPUS[3], *CORPUS[:2]]


def test_versions_forget_verify(client):
    client.create("a", seed=1)
    client.inject("a", CORPUS[:2])
    snap = client.snapshot("a", "v1")
    assert snap["label"] == "v1" and snap["injections"] == [1, 2]
    client.inject("a", CORPUS[2])
    assert set(client.diff("a", "v1")["added_by_injection"]) == {"3"}
    assert [s["label"] for s in client.snapshots("a")] == ["v1"]
    assert client.rollback("a", "v1")["injections"] == [1, 2]
    assert client.get("a")["live_injections"] == 2
    f = client.forget("a", 2, mode="exact")
    assert f["replayed"] == 1 and f["snapshots_deleted"] == ["v1"]
    v = client.verify("a")
    assert v["ok"] and v["mismatches"] == []
    client.snapshot("a", "v2")
    client.delete_snapshot("a", "v2")
    assert client.snapshots("a") == []


def test_export_import_round_trip(client, tmp_path, live):
    store = live[3]
    client.create("a", seed=2)
    client.inject("a", CORPUS[0])
    blob = client.export("a")
    assert blob[:2] == b"PK"
    path = client.export("a", tmp_path / "a.zip")
    assert path.read_bytes()[:2] == b"PK" and not list(tmp_path.glob(".*.part"))
    assert client.import_("b", path)["live_injections"] == 1
    assert client.import_("c", blob)["name"] == "c"
    assert store.memory("b", tenant="acme").equal(store.memory("a", tenant="acme"))
    assert client.verify("c")["ok"]
    with pytest.raises(Conflict):
        client.import_("b", blob)
    with pytest.raises(InvalidRequest) as e:
        client.import_("d", b"not a zip")
    assert e.value.status == 400 and "not a memory export" in e.value.message


def test_errors_are_exceptions_with_status_and_message(client, live):
    url, _, other, _ = live
    with pytest.raises(NotFound) as e:
        client.get("nobody")
    assert (e.value.status, e.value.message) == (404, "memory 'nobody' not found") and isinstance(e.value, ServiceError)
    with pytest.raises(NotFound):
        client.generate("nobody", "hi")
    with pytest.raises(NotFound):
        client.stream("nobody", "hi")
    with pytest.raises(NotFound):
        client.export("nobody")
    client.create("a")
    with pytest.raises(Conflict, match="already exists"):
        client.create("a")
    with pytest.raises(InvalidRequest) as e:
        client.generate("a", "hi", max_new_tokens=17)
    assert e.value.status == 422 and "max_new_tokens" in e.value.message and "less than or equal to 16" in e.value.message
    with pytest.raises(InvalidRequest, match="minimum"):
        client.inject("a", "hi")
    with pytest.raises(InvalidRequest, match="invalid memory name"):
        client.get("..x")
    with pytest.raises(TooLarge):
        client.inject("a", "word " * 5000)
    with pytest.raises(NotFound):
        client.forget("a", 7)
    client.create("b")
    client.create("c")
    with pytest.raises(Forbidden, match="quota"):
        client.create("d")
    with Client(url, "mlk_wrong", timeout=60) as bad, pytest.raises(Unauthorized) as e:
        bad.list()
    assert e.value.status == 401
    with Client(url, other, timeout=60) as theirs:  # another tenant sees nothing of ours
        assert theirs.list() == []
        with pytest.raises(NotFound):
            theirs.get("a")


def test_an_error_inside_a_stream_raises(client, live, monkeypatch):
    store = live[3]
    client.create("a")

    def broken(memory, prompt, **sampling):
        yield "half "
        raise ValueError("the model broke")

    monkeypatch.setattr(store.lm, "stream", broken, raising=False)
    got = []
    with pytest.raises(InvalidRequest, match="the model broke") as e:
        for piece in client.stream("a", "hi"):
            got.append(piece)
    assert got == ["half "] and e.value.status == 422
