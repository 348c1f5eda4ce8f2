"""Issue 17, the service and the store under hostile input, on a tiny model: every client input
answers 2xx or a specific 4xx naming the problem (no server path) and changes nothing; limits in
tokens; imports signed by this server and made for its model; temporary files only in the staging
area, removed on every error path and swept after a kill during exports and imports; private
permissions; quotas and metric labels that hold under concurrency and made-up methods; replay
under the thread count each write recorded; the CLI's one-line answers to bad arguments.
benchmarks/bench_reliability.py reruns these probes at larger counts and writes the table."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import socket
import stat
import threading
import time
import zipfile

import pytest
import torch
from conftest import CORPUS, LoopbackServer, make_tokenizer, tiny_lm, tiny_model
from fastapi.testclient import TestClient

from latentmem.store import MemoryStore, StoreError
from latentmem.store.service import KeyStore, ServiceSettings, create_app
from latentmem.store.store import SECRET_FILE, STAGING

torch.set_num_threads(1)

LIMITS = ServiceSettings(max_body_bytes=1 << 20, max_new_tokens=16, max_texts=8, max_pools_per_tenant=5, max_inject_tokens=400,
                         batch_wait_ms=1, body_timeout_s=1.0)


@pytest.fixture
def svc(tmp_path):
    store = MemoryStore(tmp_path / "data", tiny_lm())
    keys = KeyStore(store.dir)
    app = create_app(store, keys, LIMITS)
    key = keys.create("acme")[1]
    client = TestClient(app, raise_server_exceptions=False)
    h = {"Authorization": f"Bearer {key}"}
    assert client.post("/v1/memories", json={"name": "a", "seed": 1}, headers=h).status_code == 201
    assert client.post("/v1/memories/a/inject", json={"text": CORPUS[0]}, headers=h).status_code == 200
    yield client, store, h, app
    app.state.batcher.close()
    keys.close()
    store.close()


def state_of(store: MemoryStore) -> tuple:
    """What must not change when a request is refused: files on disk, ledgers, pools."""
    files = sorted(str(p.relative_to(store.dir)) for p in store.dir.rglob("*") if p.is_file() and not p.name.endswith(("-wal", "-shm")))
    ledgers = {(t, n): [e.to_dict() for e in store.history(n, tenant=t)] for t in store.tenants() for n in store.names(tenant=t)}
    return files, ledgers


def assert_refused(r, status: int, words: str, store: MemoryStore) -> None:
    """``words``: a regular expression the message must hold (case-insensitive)."""
    assert r.status_code == status, r.text
    text = r.text
    assert re.search(words, text, re.IGNORECASE), text
    assert str(store.dir) not in text and "/tmp" not in text, text  # no server path


# ---------------------------------------------------------------------------------------------
# no 500 for client input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampling", [{"temperature": 1e-300}, {"temperature": 1.0, "top_p": 1e-300}, {"temperature": 5e-324, "top_p": 5e-324}])
def test_extreme_sampling_parameters_answer_like_greedy(svc, sampling):
    c, store, h, _ = svc
    greedy = c.post("/v1/memories/a/generate", json={"prompt": "hi", "max_new_tokens": 4}, headers=h).json()["text"]
    r = c.post("/v1/memories/a/generate", json={"prompt": "hi", "max_new_tokens": 4, "seed": 3, **sampling}, headers=h)
    assert r.status_code == 200 and r.json()["text"] == greedy  # the best token has all the mass


def test_nan_sampling_is_refused_by_the_library(lm):
    mem = lm.new_memory(seed=0)
    for bad in ({"temperature": float("nan")}, {"temperature": float("inf")}, {"top_p": float("nan")}):
        with pytest.raises(ValueError, match="temperature|top_p"):
            lm.generate(mem, "hi", **bad)


@pytest.mark.parametrize("route,body", [
    ("/v1/memories/a/inject", b'{"texts": ["Alice lives in Zurich \\ud800 and works there"]}'),
    ("/v1/memories/a/inject", b'{"text": "Alice lives in Zurich \\udfff and works there"}'),
    ("/v1/memories/a/inject", b'{"text": "Alice lives in Zurich and works there", "source": "\\ud800"}'),
    ("/v1/memories/a/generate", b'{"prompt": "where \\ud800"}'),
    ("/v1/memories/a/generate", b'{"prompt": "where", "stop": ["\\ud800"]}'),
    ("/v1/chat/completions", b'{"model": "m", "user": "a", "messages": [{"role": "user", "content": "hi \\ud800"}]}'),
])
def test_a_lone_surrogate_is_refused_and_changes_nothing(svc, route, body):
    c, store, h, _ = svc
    before = state_of(store)
    r = c.post(route, content=body, headers=h)
    assert_refused(r, 400 if "chat" in route else 422, "surrogate|unicode", store)
    assert state_of(store) == before
    assert c.get("/health").status_code == 200  # the connection and the server stay usable


def test_limits_count_tokens(svc):
    c, store, h, app = svc
    before = state_of(store)
    svc_obj = app.state.service
    assert svc_obj.max_prompt_tokens == 512  # the tiny model's context window (under the memory budget's 8192)
    r = c.post("/v1/memories/a/generate", json={"prompt": "x" * 40_000, "max_new_tokens": 1}, headers=h)  # 40k chars < 100k limit
    assert_refused(r, 413, "prompt too long", store)
    r = c.post("/v1/memories/a/generate", json={"prompt": "é" * 600, "stream": True}, headers=h)  # 600 chars, over 512 tokens
    assert_refused(r, 413, "limit of 512 tokens", store)
    r = c.post("/v1/chat/completions", json={"model": "m", "user": "a", "messages": [{"role": "user", "content": "word " * 2000}]}, headers=h)
    assert r.status_code == 413 and "prompt too long" in r.json()["error"]["message"]
    r = c.post("/v1/memories/a/inject", json={"texts": ["Alice went to the market today. " * 20] * 3}, headers=h)
    assert_refused(r, 413, "more than 400 tokens", store)
    assert state_of(store) == before
    from latentmem.store.service import prompt_token_limit

    assert prompt_token_limit(store.lm, 1 << 20) == 512 and prompt_token_limit(store.lm, 4 * 100**2) == 100  # the memory budget binds


def test_forget_and_seed_integers_past_64_bits(svc):
    c, store, h, _ = svc
    before = state_of(store)
    for body in ({"injection_id": 2**63}, {"injection_id": 10**30}):
        assert c.post("/v1/memories/a/forget", json=body, headers=h).status_code == 422
    assert c.post("/v1/memories", json={"name": "z", "seed": 2**64}, headers=h).status_code == 422
    assert state_of(store) == before


# ---------------------------------------------------------------------------------------------
# imports: signed by this server, for its model, bounded; refusals leave nothing
# ---------------------------------------------------------------------------------------------
def exported(c, h) -> bytes:
    r = c.get("/v1/memories/a/export", headers=h)
    assert r.status_code == 200
    return r.content


def rezip(blob: bytes, manifest=None, members=None, raw=None) -> bytes:
    src = zipfile.ZipFile(io.BytesIO(blob))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("manifest.json", json.dumps(manifest if manifest is not None else json.loads(src.read("manifest.json"))))
        for n in src.namelist():
            if n != "manifest.json":
                z.writestr(n, (members or {}).get(n, src.read(n)))
        for n, b in (raw or {}).items():
            z.writestr(n, b)
    return out.getvalue()


def relabelled(member: bytes, model_id: str) -> bytes:
    """A state file with its model_id changed and its (unkeyed) checksum recomputed."""
    import struct

    from safetensors.torch import load, save

    from latentmem import statefile

    n = struct.unpack("<Q", member[:8])[0]
    meta = dict(json.loads(member[8 : 8 + n])["__metadata__"])
    tensors = load(member)
    meta["model_id"] = model_id
    meta["sha256"] = statefile.digest(tensors, meta)
    return save(tensors, metadata=meta)


def test_a_signed_export_imports_and_tampered_ones_do_not(svc, tmp_path):
    c, store, h, _ = svc
    blob = exported(c, h)
    assert json.loads(zipfile.ZipFile(io.BytesIO(blob)).read("manifest.json"))["signature"]
    r = c.put("/v1/memories/b/import", content=blob, headers=h)
    assert r.status_code == 201 and c.get("/v1/memories/b/verify", headers=h).json()["ok"]
    man = json.loads(zipfile.ZipFile(io.BytesIO(blob)).read("manifest.json"))
    live = zipfile.ZipFile(io.BytesIO(blob)).read("live.safetensors")
    before = state_of(store)
    cases = {
        "unsigned": (rezip(blob, {k: v for k, v in man.items() if k != "signature"}), "not signed by this server"),
        "ledger edited": (rezip(blob, {**man, "ledger": man["ledger"][:1]}), "not signed by this server"),
        "huge seed": (rezip(blob, {**man, "seed": 10**30}), "not signed by this server"),
        "model_id blanked": (rezip(blob, members={"live.safetensors": relabelled(live, "")}), "does not match the sha256"),
        "member garbage": (rezip(blob, members={"live.safetensors": b"garbage"}), "does not match the sha256"),
        "truncated": (blob[: len(blob) // 2], "not a memory export"),
        "not a zip": (b"PK junk", "not a memory export"),
    }
    for what, (body, words) in cases.items():
        r = c.put("/v1/memories/c/import", content=body, headers=h)
        assert_refused(r, 400, re.escape(words), store)
        assert state_of(store) == before, what
    assert list((store.dir / STAGING).iterdir()) == []


def test_the_python_api_refuses_damaged_members_without_server_paths(tmp_path):
    """Unsigned local imports (older files, other servers) still go through the model's checks:
    a re-labelled state of another shape, or garbage, is an ImportRefused naming the member."""
    with MemoryStore(tmp_path / "d", tiny_lm()) as store:
        store.create("a", seed=1)
        store.inject("a", CORPUS[0])
        blob = store.export("a", tmp_path / "a.zip").read_bytes()
        live = zipfile.ZipFile(io.BytesIO(blob)).read("live.safetensors")
        before = state_of(store)
        for member in (b"garbage", live[: len(live) // 2]):
            (tmp_path / "bad.zip").write_bytes(rezip(blob, members={"live.safetensors": member}))
            with pytest.raises(StoreError, match="live.safetensors") as e:
                store.import_file(tmp_path / "bad.zip", "b")
            assert str(store.dir) not in str(e.value)
        assert state_of(store) == before
    with MemoryStore(tmp_path / "other", tiny_lm(num_blocks=8)) as other:  # another shape, relabelled as this model
        other.create("a", seed=1)
        other.inject("a", CORPUS[0])
        oblob = other.export("a", tmp_path / "o.zip").read_bytes()
    with MemoryStore(tmp_path / "d", tiny_lm()) as store:
        olive = zipfile.ZipFile(io.BytesIO(oblob)).read("live.safetensors")
        oman = json.loads(zipfile.ZipFile(io.BytesIO(oblob)).read("manifest.json")) | {"model_id": store.lm.model_id}
        (tmp_path / "bad.zip").write_bytes(rezip(oblob, oman, members={"live.safetensors": relabelled(olive, store.lm.model_id)}))
        with pytest.raises(StoreError, match="live.safetensors") as e:
            store.import_file(tmp_path / "bad.zip", "b")
        assert str(tmp_path) not in str(e.value) and store.names() == ["a"]


def test_a_server_with_the_same_key_still_refuses_another_models_pool(tmp_path):
    with MemoryStore(tmp_path / "one", tiny_lm()) as one:
        one.create("a", seed=1)
        one.inject("a", CORPUS[0])
        path = one.export("a", tmp_path / "a.zip")
    (tmp_path / "two").mkdir(mode=0o700)
    shutil.copy(tmp_path / "one" / SECRET_FILE, tmp_path / "two" / SECRET_FILE)
    with MemoryStore(tmp_path / "two", tiny_lm(seed=1)) as two:
        with pytest.raises(StoreError, match="made for model"):
            two.import_file(path, "a", require_signature=True)
        assert two.names() == [] and list((two.dir / STAGING).iterdir()) == []
    with MemoryStore(tmp_path / "three", tiny_lm()) as three:  # same model, other key: the signature fails
        with pytest.raises(StoreError, match="not signed by this server"):
            three.import_file(path, "a", require_signature=True)
        assert three.import_file(path, "a").live_injections == 1  # an operator's local import still works


def test_import_decompression_is_bounded(svc, tmp_path):
    c, store, h, app = svc
    blob = exported(c, h)
    bomb = rezip(blob, raw={"padding.safetensors": b"\0" * (8 << 20)})  # 8 MiB of zeros: ~8 kB deflated
    assert len(bomb) < 100_000
    app.state.service.settings.max_import_unpacked_bytes = 4 << 20
    before = state_of(store)
    r = c.put("/v1/memories/c/import", content=bomb, headers=h)
    assert_refused(r, 400, "unpack to", store)
    assert state_of(store) == before
    man = json.loads(zipfile.ZipFile(io.BytesIO(blob)).read("manifest.json"))
    (tmp_path / "m.zip").write_bytes(rezip(blob, {**man, "pad": "x" * (65 << 20)}))
    with pytest.raises(StoreError, match="manifest.json unpacks to"):
        store.import_file(tmp_path / "m.zip", "d")


# ---------------------------------------------------------------------------------------------
# bodies: authenticated and routed before buffering; a body-read timeout
# ---------------------------------------------------------------------------------------------
def raw_request(url: str, head: bytes, body: bytes = b"") -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as s:
        s.sendall(head + body)
        chunks = []
        while True:
            try:
                b = s.recv(65536)
            except TimeoutError:
                break
            if not b:
                break
            chunks.append(b)
            if b"\r\n\r\n" in b"".join(chunks) and b"}" in b"".join(chunks):
                break
        return b"".join(chunks)


def test_bodies_are_authenticated_routed_and_timed(tmp_path):
    store = MemoryStore(tmp_path / "data", tiny_lm())
    keys = KeyStore(store.dir)
    key = keys.create("acme")[1]
    app = create_app(store, keys, LIMITS)
    try:
        with LoopbackServer(app) as srv:
            # an unauthenticated import declaring 1 GiB is answered 401 at once, its body never read
            head = b"PUT /v1/memories/x/import HTTP/1.1\r\nHost: t\r\nContent-Length: 1073741824\r\n\r\n"
            out = raw_request(srv.url, head, b"PK" * 1000)
            assert out.startswith(b"HTTP/1.1 401"), out[:200]
            # the import limit is only for the import route: another path ending in /import gets the JSON limit
            head = b"POST /v1/memories/x/import HTTP/1.1\r\nHost: t\r\nContent-Length: 2000000\r\n\r\n"
            assert raw_request(srv.url, head).startswith(b"HTTP/1.1 413")
            # a body that stops arriving: 408 after body_timeout_s, not a wait forever
            head = (b"POST /v1/memories HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\nAuthorization: Bearer " + key.encode() + b"\r\n\r\n")
            out = raw_request(srv.url, head, b'{"name": ')
            assert out.startswith(b"HTTP/1.1 408") and b"not received within 1 s" in out, out[:300]
            head = (b"PUT /v1/memories/x/import HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\nAuthorization: Bearer " + key.encode() + b"\r\n\r\n")
            out = raw_request(srv.url, head, b"PK")
            assert out.startswith(b"HTTP/1.1 408"), out[:300]
            import httpx

            assert httpx.get(srv.url + "/health").status_code == 200
        assert store.names(tenant="acme") == [] and list((store.dir / STAGING).iterdir()) == []
    finally:
        app.state.batcher.close()
        keys.close()
        store.close()


# ---------------------------------------------------------------------------------------------
# quotas and metrics under concurrency and made-up input
# ---------------------------------------------------------------------------------------------
def test_the_pool_quota_holds_under_concurrent_creates(svc):
    c, store, h, _ = svc  # holds "a" already; quota 5
    barrier = threading.Barrier(16)
    codes = []

    def create(i):
        barrier.wait()
        codes.append(c.post("/v1/memories", json={"name": f"p{i}"}, headers=h).status_code)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [201] * 4 + [403] * 12
    assert len(store.names(tenant="acme")) == 5


def test_made_up_methods_do_not_grow_the_metrics(svc):
    c, _, _, _ = svc
    c.get("/health")
    before = len(c.get("/metrics").text.splitlines())
    for i in range(300):
        c.request(f"X{i}", f"/made/up/{i}")
    after = c.get("/metrics").text
    assert len(after.splitlines()) <= before + 6  # one series per (bounded) label set, not per method
    assert 'method="other"' in after and "X1" not in after


# ---------------------------------------------------------------------------------------------
# nothing left behind; permissions
# ---------------------------------------------------------------------------------------------
def test_failed_operations_leave_no_file(svc, monkeypatch):
    c, store, h, _ = svc
    before = state_of(store)
    assert c.get("/v1/memories/none/export", headers=h).status_code == 404
    real = MemoryStore._event

    def fail_on_inject(self, pool, kind, now, **cols):
        if kind in ("inject", "forget"):
            raise RuntimeError("disk full (simulated)")
        return real(self, pool, kind, now, **cols)

    monkeypatch.setattr(MemoryStore, "_event", fail_on_inject)
    with pytest.raises(RuntimeError):
        store.inject("a", CORPUS[1], tenant="acme")  # the state file is written before the commit fails
    with pytest.raises(RuntimeError):
        store.forget("a", 1, tenant="acme")
    assert state_of(store) == before


def test_the_data_directory_is_private(svc):
    _, store, _, _ = svc
    assert stat.S_IMODE(store.dir.stat().st_mode) == 0o700
    for name in ("store.db", "store.db-wal", "keys.db", "keys.db-wal", SECRET_FILE):
        p = store.dir / name
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, name


def _transfer_worker(data_dir: str, seed: int, phase_path: str | None = None) -> None:
    """Exports and imports forever, as the service runs them (temp zips in the staging area);
    the operation under way is the last line of ``phase_path``."""
    import tempfile

    torch.set_num_threads(1)
    rng = random.Random(seed)
    store = MemoryStore(data_dir, tiny_lm())
    log = open(phase_path or os.devnull, "a", buffering=1)
    i = 0
    while True:
        i += 1
        fd, path = tempfile.mkstemp(suffix=".zip", dir=store.staging())
        os.close(fd)
        log.write("export\n")
        store.export("a", path)
        name = f"c{seed}_{i}"
        log.write("import\n")
        store.import_file(path, name, require_signature=True)
        log.write("between\n")
        os.unlink(path)
        if rng.random() < 0.7:
            log.write("delete\n")
            store.delete(name)
            log.write("between\n")


@pytest.mark.parametrize("trial", range(4))
def test_a_kill_during_export_or_import_leaves_nothing_after_recovery(tmp_path, trial):
    data = tmp_path / "d"
    with MemoryStore(data, tiny_lm()) as store:
        store.create("a", seed=1)
        store.inject("a", CORPUS[:2])
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=_transfer_worker, args=(str(data), trial))
    p.start()
    time.sleep(0.3 + random.Random(trial).random() * 1.5)  # a random instant, not an assertion on time
    os.kill(p.pid, signal.SIGKILL)
    p.join()
    with MemoryStore(data, tiny_lm()) as store:
        assert list((data / STAGING).iterdir()) == []
        assert [f for f in data.rglob("*") if f.suffix in (".zip", ".tmp") or f.name.startswith(".")] == [data / ".lock"]
        for name in store.names():
            assert store.verify(name).ok, name
        for d in (data / "pools").iterdir():
            row_files = store._referenced(int(d.name))
            assert {f.name for f in d.iterdir()} == row_files


# ---------------------------------------------------------------------------------------------
# replay under the recorded thread count
# ---------------------------------------------------------------------------------------------
def test_replay_runs_each_injection_at_the_thread_count_it_was_written_with(tmp_path, monkeypatch):
    lm = tiny_lm()
    with MemoryStore(tmp_path / "d", lm) as store:
        store.create("a", seed=1)
        torch.set_num_threads(1)
        store.inject("a", CORPUS[0])
        torch.set_num_threads(2)
        store.inject("a", CORPUS[1])
        details = [json.loads(e.detail)["torch_threads"] for e in store.history("a") if e.kind == "inject"]
        assert details == [1, 2]
        seen, real = [], lm.inject

        def spy(*a, **k):
            seen.append(torch.get_num_threads())
            return real(*a, **k)

        monkeypatch.setattr(lm, "inject", spy)
        torch.set_num_threads(3)
        assert store.verify("a").ok
        assert seen == [1, 2] and torch.get_num_threads() == 3  # and put back


# ---------------------------------------------------------------------------------------------
# the CLI: one line and a non-zero exit for every bad argument
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from latentmem.memoryllm.checkpoint import save_memoryllm_checkpoint

    return save_memoryllm_checkpoint(tiny_model(seed=3), tmp_path_factory.mktemp("ckpt") / "tiny", tokenizer=make_tokenizer())


@pytest.mark.parametrize("argv,words", [
    (["--temperature", "nan"], "--temperature nan: must be a finite number"),
    (["--temperature", "-1"], "--temperature -1.0"),
    (["--top-p", "inf"], "--top-p inf"),
    (["--max-new-tokens", "1000000000000"], "--max-new-tokens 1000000000000: must be in [1,"),
    (["--max-new-tokens", "0"], "--max-new-tokens 0"),
    (["--max-new-tokens", "100000"], "over the model's context window of 512 tokens"),
    (["--seed", "-3"], "--seed -3"),
    (["--threads", "0"], "--threads 0"),
])
def test_bad_sampling_arguments_are_one_line(capsys, tmp_path, checkpoint, argv, words):
    from latentmem.cli import main

    code = main(["ask", "q", "--model", str(checkpoint), "--memory", str(tmp_path / "m.safetensors"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err


def test_a_truncated_model_file_is_one_line(capsys, tmp_path, checkpoint):
    from latentmem.cli import main

    bad = tmp_path / "trunc"
    shutil.copytree(checkpoint, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    code = main(["ask", "q", "--model", str(bad), "--memory", str(tmp_path / "m.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and "cannot load the model" in err and "truncated or damaged" in err and len(err.strip().splitlines()) == 1, err


# ---------------------------------------------------------------------------------------------
# schemathesis over the OpenAPI document
# ---------------------------------------------------------------------------------------------
def schemathesis_run(app, key: str, examples: int) -> dict:
    """Cases made from the app's own OpenAPI document (valid ones and, negative mode, invalid
    ones) sent with a valid key to every operation; {(operation, status class): count}."""
    import collections
    import warnings

    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.reporting import with_reporter
    from schemathesis import GenerationMode

    counts, failures = collections.Counter(), []
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    for result in schema.get_all_operations():
        op = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            @given(case=op.as_strategy(generation_mode=mode))
            def send(case):
                r = case.call(headers={"Authorization": f"Bearer {key}"})
                counts[(op.label, f"{r.status_code // 100}xx")] += 1
                if r.status_code >= 500:
                    failures.append((op.label, r.status_code, r.text[:300]))

            with warnings.catch_warnings(), with_reporter(lambda *a: None):  # quiet about unsatisfiable operations
                warnings.simplefilter("ignore")
                try:
                    send()
                except Exception as e:  # no invalid case exists for this operation; a zip body it cannot make (import)
                    if type(e).__name__ not in ("Unsatisfiable", "SerializationNotPossible"):
                        raise
                    counts[(op.label, "not generated")] += 1
    return {"counts": counts, "failures": failures}


def test_schemathesis_finds_no_server_error(svc):
    pytest.importorskip("schemathesis")
    c, store, h, app = svc
    out = schemathesis_run(app, h["Authorization"].split()[1], examples=4)
    assert sum(out["counts"].values()) > 100
    assert out["failures"] == []
    assert all(store.verify(n, tenant="acme").ok for n in store.names(tenant="acme"))


def test_the_python_api_refuses_injection_ids_past_64_bits(tmp_path):
    with MemoryStore(tmp_path / "d", tiny_lm()) as store:
        store.create("a", seed=1)
        store.inject("a", CORPUS[0])
        before = state_of(store)
        for bad in (2**63, 10**30, 0, "1", 1.0):
            with pytest.raises(ValueError, match="injection_id must be an integer"):
                store.forget("a", bad)
        assert state_of(store) == before


def test_ctrl_c_during_an_inject_is_one_line_and_writes_nothing(capsys, tmp_path, checkpoint, monkeypatch):
    from latentmem.cli import main
    from latentmem.memoryllm.lm import MemoryLM

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt

    data = tmp_path / "d"
    assert main(["inject", CORPUS[0], "--model", str(checkpoint), "--data", str(data)]) == 0
    capsys.readouterr()
    monkeypatch.setattr(MemoryLM, "inject", interrupted)
    code = main(["inject", CORPUS[1], "--model", str(checkpoint), "--data", str(data)])
    err = capsys.readouterr().err
    assert code == 130 and err.strip() == "memoryllm inject: interrupted"
    monkeypatch.undo()
    with MemoryStore(data, tiny_lm(seed=3)) as store:
        assert [e.kind for e in store.history("default")] == ["create", "inject"]
        assert list((data / STAGING).iterdir()) == []
