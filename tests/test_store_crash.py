"""Crash safety: a worker process doing random store operations is SIGKILLed at random instants
(and at the two critical points: new state written but not committed, committed but old files
not yet deleted). After every kill the store is reopened and checked:

- every pool verifies against its ledger (replay from its base is bit-identical);
- every acknowledged injection is in the ledger with its hash, every acknowledged pool exists;
- a pool without an operation in flight is exactly as the last acknowledgement left it; the
  pool with one in flight is exactly before or exactly after it;
- no file is left that no row references.

MEMORYLLM_CRASH_TRIALS sets the number of trials (default 30; the benchmark runs hundreds).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time

import pytest
import torch
from conftest import CORPUS, tiny_lm

from latentmem.store import MemoryStore, StoreError

torch.set_num_threads(1)

TRIALS = int(os.environ.get("MEMORYLLM_CRASH_TRIALS", "30"))
KILL_MODES = ("timer", "after_write", "before_collect")


def _worker(data_dir: str, ack_path: str, seed: int, kill_mode: str, lm) -> None:
    """Random operations forever; one 'intent' line before and one 'ack' line after each."""
    rng = random.Random(seed)
    store = MemoryStore(data_dir, lm)
    log = open(ack_path, "a", buffering=1)  # line-buffered: an ack is in the file once written

    if kill_mode != "timer":  # die at the k-th pass through a critical point
        countdown = [rng.randint(1, 12)]
        target = "_write_state" if kill_mode == "after_write" else "_collect"
        original = getattr(MemoryStore, target)

        def hooked(self, *a, **k):
            out = original(self, *a, **k) if target == "_write_state" else None
            countdown[0] -= 1
            if countdown[0] == 0:
                os.kill(os.getpid(), signal.SIGKILL)
            return out if target == "_write_state" else original(self, *a, **k)

        setattr(MemoryStore, target, hooked)

    def write(kind, **d):
        log.write(json.dumps({"kind": kind, **d}) + "\n")

    def pool_facts(name):
        row = store._pool(name, "")
        return {"state_file": row["state_file"], "live": store._live_ids(row["id"])}

    n_snap = 0
    while True:
        names = store.names()
        r = rng.random()
        if not names or (r < 0.05 and len(names) < 4):
            op = {"op": "create", "pool": f"p{len(names)}", "seed": rng.randrange(2**32)}
        else:
            pool = rng.choice(names)
            live = pool_facts(pool)["live"]
            snaps = [s.label for s in store.snapshots(pool)]
            if r < 0.6 or not live:
                texts = rng.sample(CORPUS, rng.choice([1, 1, 1, 2, 3]))
                op = {"op": "inject", "pool": pool, "texts": texts, "store_text": rng.random() > 0.1}
            elif r < 0.7:
                n_snap += 1
                op = {"op": "snapshot", "pool": pool, "label": f"s{n_snap}"}
            elif r < 0.8 and snaps:
                op = {"op": "rollback", "pool": pool, "label": rng.choice(snaps)}
            else:
                op = {"op": "forget", "pool": pool, "id": rng.choice(live), "mode": rng.choice(["fast", "exact"])}
        write("intent", **op)
        result = {}
        try:
            if op["op"] == "create":
                store.create(op["pool"], seed=op["seed"])
            elif op["op"] == "inject":
                entries = store.inject(op["pool"], op["texts"], store_text=op["store_text"])
                result["injected"] = [[e.injection_id, e.sha256] for e in entries]
            elif op["op"] == "snapshot":
                store.snapshot(op["pool"], op["label"])
            elif op["op"] == "rollback":
                store.rollback(op["pool"], op["label"])
            else:
                store.forget(op["pool"], op["id"], op["mode"])
        except StoreError as e:  # e.g. exact forget behind a replay base: refused, nothing changed
            result["refused"] = str(e)
        write("ack", **op, **result, **pool_facts(op["pool"]))


def _run_worker(*args) -> None:
    try:
        _worker(*args)
    finally:
        os._exit(1)  # never run the parent's pytest machinery in the child


def read_log(path) -> list[dict]:
    out = []
    if os.path.exists(path):
        for line in open(path):
            try:
                out.append(json.loads(line))
            except ValueError:  # a line cut by the kill
                pass
    return out


def check_after_crash(data_dir, lm, log: list[dict]) -> dict:
    acks = [e for e in log if e["kind"] == "ack"]  # the worker's and the previous check's
    in_flight = log[-1] if log and log[-1]["kind"] == "intent" else None
    store = MemoryStore(data_dir, lm)  # runs recover()
    try:
        last = {}
        for a in acks:
            last[a["pool"]] = a
        names = set(store.names())
        assert set(last) <= names, "an acknowledged pool is missing"
        for name in names:
            pool = store._pool(name, "")
            report = store.verify(name)
            assert report.ok, (name, report)
            ledger = {(h.injection_id, h.sha256) for h in store.history(name) if h.kind == "inject"}
            for a in acks:
                if a["pool"] == name:
                    for iid, sha in a.get("injected", []):
                        assert (iid, sha) in ledger, f"acknowledged injection {iid} of {name} lost"
            if name not in last:  # created by the op in flight: committed after all
                assert in_flight and in_flight["op"] == "create" and in_flight["pool"] == name
                continue
            state = (pool["state_file"], store._live_ids(pool["id"]))
            before = (last[name]["state_file"], last[name]["live"])
            if in_flight is None or in_flight["pool"] != name:
                assert state == before, f"{name} changed without an operation in flight"
            files = {p.name for p in store._pool_dir(pool["id"]).iterdir()}
            assert files == store._referenced(pool["id"]), "orphaned or missing state files"
        now = {n: {"state_file": store._pool(n, "")["state_file"], "live": store._live_ids(store._pool(n, "")["id"])} for n in names}
        return {"acks": len(acks), "in_flight": in_flight["op"] if in_flight else None, "now": now}
    finally:
        store.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks the worker (cheap: no second torch import)")
def test_kill_at_random_points_leaves_every_pool_consistent(tmp_path):
    lm = tiny_lm()
    ctx = multiprocessing.get_context("fork")
    rng = random.Random(1234)
    seen_ops, total_acks = set(), 0
    t0 = time.time()
    for trial in range(TRIALS):
        data_dir, ack_path = str(tmp_path / f"t{trial}"), str(tmp_path / f"t{trial}.log")
        mode = KILL_MODES[trial % len(KILL_MODES)]
        # each trial crashes twice into the same directory: recovery itself must survive a crash
        for round_ in range(2):
            p = ctx.Process(target=_run_worker, args=(data_dir, ack_path, rng.randrange(2**32), mode, lm))
            p.start()
            if mode == "timer":
                time.sleep(rng.uniform(0.05, 0.8))
                os.kill(p.pid, signal.SIGKILL)
            p.join(timeout=60)
            if p.is_alive():  # pragma: no cover - a hung worker
                os.kill(p.pid, signal.SIGKILL)
                pytest.fail(f"worker of trial {trial} did not die")
            facts = check_after_crash(data_dir, lm, read_log(ack_path))
            seen_ops.add(facts["in_flight"])
            with open(ack_path, "a") as f:  # the next round starts from what was checked
                f.write("\n")  # ends a line the kill may have cut
                for name, pool in facts["now"].items():
                    f.write(json.dumps({"kind": "ack", "op": "checked", "pool": name, **pool}) + "\n")
        total_acks += sum(e["kind"] == "ack" and e["op"] != "checked" for e in read_log(ack_path))
    print(f"\n{TRIALS} trials x 2 kills, {total_acks} acknowledged operations, in flight at the kill: {sorted(map(str, seen_ops))}, {time.time() - t0:.1f} s")
    assert total_acks > TRIALS  # the workers did real work between kills
