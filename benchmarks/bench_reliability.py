"""Reliability probes of the store and the service (issue 17) on a tiny random model, at larger
counts than the CI suite (tests/test_reliability.py, whose helpers this reuses):

    .venv/bin/python benchmarks/bench_reliability.py                    # ~3 minutes on 2 shared cores
    .venv/bin/python benchmarks/bench_reliability.py --kills 50 --examples 50

1. kills: a forked worker exports and imports a pool in a loop (temporary zips in the staging
   area, as the service does) and is SIGKILLed at a random instant; the store is reopened and
   checked: staging empty, no temp file or zip anywhere, every pool verifies, every pool
   directory holds exactly the files its rows name.
2. schemathesis: cases generated from the app's OpenAPI document (valid and invalid ones) sent
   to every operation with a valid key; counted by status class; any 5xx is a failure.
3. hostile inputs: each case of the issue, with the status it answers and whether the data
   directory is unchanged afterwards.
4. abuse: 16 concurrent creates against a quota of 5; 300 requests with made-up methods
   against /metrics' series count.

Prints Markdown tables and writes them to results/benchmarks/reliability.md.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import random
import signal
import sys
import tempfile
import threading
import time
import zipfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
from results_file import OUT, recorded  # noqa: E402


def kills(n: int, seed: int) -> dict:
    import test_reliability as t
    from conftest import CORPUS, tiny_lm

    from latentmem.store import MemoryStore
    from latentmem.store.store import STAGING

    out = Counter()
    rng = random.Random(seed)
    ctx = multiprocessing.get_context("fork")
    for trial in range(n):
        data = Path(tempfile.mkdtemp()) / "d"
        with MemoryStore(data, tiny_lm()) as store:
            store.create("a", seed=1)
            store.inject("a", CORPUS[:2])
        phases = data.parent / "phase.log"
        p = ctx.Process(target=t._transfer_worker, args=(str(data), trial, str(phases)))
        p.start()
        time.sleep(0.2 + rng.random() * 2.0)
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        out["trials"] += 1
        lines = phases.read_text().split() if phases.exists() else []
        out[f"killed during: {lines[-1] if lines else 'start-up'}"] += 1
        with MemoryStore(data, tiny_lm()) as store:
            staged = list((data / STAGING).iterdir())
            stray = [f for f in data.rglob("*") if f.suffix in (".zip", ".tmp") or (f.name.startswith(".") and f.name != ".lock")]
            bad = [nm for nm in store.names() if not store.verify(nm).ok]
            orphans = [d for d in (data / "pools").iterdir() if {f.name for f in d.iterdir()} != store._referenced(int(d.name))]
            out["pools after recovery (all trials)"] += len(store.names())
            out["files left in staging"] += len(staged)
            out["stray temp files / zips"] += len(stray)
            out["pools failing verify"] += len(bad)
            out["pool dirs with unreferenced files"] += len(orphans)
    return dict(out)


def schemathesis_probe(examples: int) -> dict:
    import test_reliability as t
    from conftest import CORPUS, tiny_lm

    from latentmem.store import MemoryStore
    from latentmem.store.service import KeyStore, ServiceSettings, create_app

    store = MemoryStore(Path(tempfile.mkdtemp()) / "d", tiny_lm())
    keys = KeyStore(store.dir)
    key = keys.create("acme")[1]
    store.create("a", seed=1, tenant="acme")
    store.inject("a", CORPUS[0], tenant="acme")
    app = create_app(store, keys, ServiceSettings(max_new_tokens=8, batch_wait_ms=1))
    try:
        res = t.schemathesis_run(app, key, examples)
        ok = all(store.verify(n, tenant=tn).ok for tn in store.tenants() for n in store.names(tenant=tn))
    finally:
        app.state.batcher.close()
        keys.close()
        store.close()
    by_class = Counter()
    for (_, cls), v in res["counts"].items():
        by_class[cls] += v
    return {"operations": len({op for op, _ in res["counts"]}), "by_class": dict(by_class), "failures": res["failures"], "pools_verify": ok}


def hostile() -> list[tuple[str, str, bool]]:
    """(case, answer, data directory unchanged)."""
    import test_reliability as t
    from conftest import CORPUS, tiny_lm
    from fastapi.testclient import TestClient

    from latentmem.store import MemoryStore
    from latentmem.store.service import KeyStore, create_app

    store = MemoryStore(Path(tempfile.mkdtemp()) / "d", tiny_lm())
    keys = KeyStore(store.dir)
    key = keys.create("acme")[1]
    app = create_app(store, keys, t.LIMITS)
    c = TestClient(app, raise_server_exceptions=False)
    h = {"Authorization": f"Bearer {key}"}
    c.post("/v1/memories", json={"name": "a", "seed": 1}, headers=h)
    c.post("/v1/memories/a/inject", json={"text": CORPUS[0]}, headers=h)
    blob = c.get("/v1/memories/a/export", headers=h).content
    man = json.loads(zipfile.ZipFile(io.BytesIO(blob)).read("manifest.json"))
    live = zipfile.ZipFile(io.BytesIO(blob)).read("live.safetensors")
    rows = []

    def probe(case, method, path, **kw):
        before = t.state_of(store)
        r = c.request(method, path, headers=h | kw.pop("headers", {}), **kw)
        detail = r.json().get("detail") if r.headers.get("content-type", "").startswith("application/json") else ""
        if isinstance(detail, list):
            detail = detail[0].get("msg", "")
        detail = detail or json.dumps(r.json().get("error", {}).get("message", ""))[:80] if r.status_code >= 400 else ""
        leaks = str(store.dir) in r.text
        rows.append((case, f"{r.status_code} {str(detail)[:70]}" + (" (SERVER PATH)" if leaks else ""), t.state_of(store) == before or r.status_code < 300))

    probe("forget injection_id 2**63", "POST", "/v1/memories/a/forget", json={"injection_id": 2**63})
    probe("generate temperature 1e-300", "POST", "/v1/memories/a/generate", json={"prompt": "hi", "temperature": 1e-300, "max_new_tokens": 4})
    probe("generate top_p 1e-300", "POST", "/v1/memories/a/generate", json={"prompt": "hi", "temperature": 1, "top_p": 1e-300, "max_new_tokens": 4})
    probe("lone surrogate in texts", "POST", "/v1/memories/a/inject", content=b'{"texts": ["Alice lives in Zurich \\ud800 now"]}')
    probe("lone surrogate in chat message", "POST", "/v1/chat/completions",
          content=b'{"model": "m", "user": "a", "messages": [{"role": "user", "content": "hi \\ud800"}]}')
    probe("prompt of 40,000 chars", "POST", "/v1/memories/a/generate", json={"prompt": "x" * 40_000, "max_new_tokens": 1})
    probe("inject of 3 x 600 tokens (limit 400)", "POST", "/v1/memories/a/inject", json={"texts": ["Alice went to the market today. " * 20] * 3})
    probe("import: manifest seed 10**30", "PUT", "/v1/memories/b/import", content=t.rezip(blob, {**man, "seed": 10**30}))
    probe("import: unsigned", "PUT", "/v1/memories/b/import", content=t.rezip(blob, {k: v for k, v in man.items() if k != "signature"}))
    probe("import: model_id blanked, checksum redone", "PUT", "/v1/memories/b/import",
          content=t.rezip(blob, members={"live.safetensors": t.relabelled(live, "")}))
    probe("import: damaged member", "PUT", "/v1/memories/b/import", content=t.rezip(blob, members={"live.safetensors": b"junk"}))
    probe("import: truncated zip", "PUT", "/v1/memories/b/import", content=blob[: len(blob) // 2])
    app.state.service.settings.max_import_unpacked_bytes = 4 << 20
    bomb = t.rezip(blob, raw={"padding.safetensors": b"\0" * (64 << 20)})
    probe(f"import: {len(bomb) // 1000} kB zip unpacking to 64 MiB (limit 4 MiB)", "PUT", "/v1/memories/b/import", content=bomb)
    probe("export of a missing pool", "GET", "/v1/memories/none/export")
    zips = list(store.dir.rglob("*.zip"))
    rows.append(("zips left in the data directory after all of the above", str(len(zips)), not zips))
    app.state.batcher.close()
    keys.close()
    store.close()
    return rows


def abuse() -> dict:
    import test_reliability as t
    from conftest import tiny_lm
    from fastapi.testclient import TestClient

    from latentmem.store import MemoryStore
    from latentmem.store.service import KeyStore, create_app

    store = MemoryStore(Path(tempfile.mkdtemp()) / "d", tiny_lm())
    keys = KeyStore(store.dir)
    key = keys.create("acme")[1]
    app = create_app(store, keys, t.LIMITS)  # quota 5
    c = TestClient(app, raise_server_exceptions=False)
    h = {"Authorization": f"Bearer {key}"}
    barrier, codes = threading.Barrier(16), []

    def create(i):
        barrier.wait()
        codes.append(c.post("/v1/memories", json={"name": f"p{i}"}, headers=h).status_code)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(16)]
    [th.start() for th in threads]
    [th.join() for th in threads]
    pools = len(store.names(tenant="acme"))
    c.get("/health")
    before = sum(1 for ln in c.get("/metrics").text.splitlines() if not ln.startswith("#"))
    for i in range(300):
        c.request(f"BOGUS{i}", f"/x/{i}")
    after = sum(1 for ln in c.get("/metrics").text.splitlines() if not ln.startswith("#"))
    app.state.batcher.close()
    keys.close()
    store.close()
    return {"creates": Counter(codes), "pools": pools, "series_before": before, "series_after": after}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20, help="crash-kill trials during export/import")
    ap.add_argument("--examples", type=int, default=20, help="schemathesis cases per operation and mode")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(OUT / "reliability.md"))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    with recorded(Path(args.out), "Reliability probes (benchmarks/bench_reliability.py)"):
        k = kills(args.kills, args.seed)
        print(f"\n### Kills during export / import ({k['trials']} trials)\n\n| where the kill landed, and outcome after recovery | count |\n|---|---|")
        for key, v in sorted(k.items(), key=lambda kv: (not kv[0].startswith("killed"), kv[0])):
            if key != "trials":
                print(f"| {key} | {v} |")
        s = schemathesis_probe(args.examples)
        total = sum(s["by_class"].values())
        print(f"\n### schemathesis over /openapi.json ({s['operations']} operations, {args.examples} cases per operation and mode)\n")
        print("| answers | count |\n|---|---|")
        for cls, v in sorted(s["by_class"].items()):
            print(f"| {cls} | {v} |")
        print(f"| total | {total} |\n\n5xx: {len(s['failures'])}; pools verify afterwards: {s['pools_verify']}")
        for f in s["failures"][:10]:
            print(f"- {f}")
        print("\n### Hostile inputs\n\n| case | answer | data directory unchanged |\n|---|---|---|")
        for case, answer, same in hostile():
            print(f"| {case} | {answer} | {'yes' if same else 'NO'} |")
        a = abuse()
        print("\n### Concurrency and label abuse\n\n| probe | outcome |\n|---|---|")
        print(f"| 16 concurrent creates, quota 5, none held before | {dict(sorted(a['creates'].items()))}, {a['pools']} pools |")
        print(f"| 300 requests with made-up methods | /metrics series {a['series_before']} -> {a['series_after']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
