"""MemoryStore: pools, ledger, replay bit-exactness, verify, forgetting, versions, export/import,
name validation, tenants, and that a failed operation leaves the pool and its files unchanged."""

from __future__ import annotations

import sqlite3
import threading

import pytest
import torch
from conftest import CORPUS, make_tokenizer, tiny_lm, tiny_model

from latentmem.api import ForgetResult
from latentmem.memoryllm.lm import InjectionError, MemoryLM
from latentmem.memoryllm.state import NEVER_WRITTEN, MemoryState
from latentmem.store import AlreadyExists, InvalidName, MemoryStore, NotFound, NotReplayable, StoreBusy, StoreError
from latentmem.store.store import text_sha256

torch.set_num_threads(1)  # tiny tensors: extra threads only fight over the shared CPU

BAD_NAMES = ["", ".", "..", "../x", "a/b", "a\\b", ".hidden", "-x", "x" * 65, "a\n", "a b", "é", "a\x00b", None, 3]


@pytest.fixture
def store(tmp_path):
    s = MemoryStore(tmp_path / "data", tiny_lm())
    yield s
    s.close()


def pool_files(store, name, tenant=""):
    return sorted(p.name for p in store._pool_dir(store._pool(name, tenant)["id"]).iterdir())


def reference(lm, seed, texts_with_ids) -> MemoryState:
    """The pool the ledger describes, built with the library API alone."""
    mem = lm.new_memory(seed=seed)
    for text, iid in texts_with_ids:
        lm.inject(mem, text, injection_id=iid)
    return mem


def test_create_list_info_delete(store):
    info = store.create("alice", seed=3)
    assert (info.name, info.seed, info.live_injections, info.update_count) == ("alice", 3, 0, 0)
    store.create("bob")
    assert store.names() == ["alice", "bob"]
    with pytest.raises(AlreadyExists):
        store.create("alice")
    store.delete("alice")
    assert store.names() == ["bob"]
    with pytest.raises(NotFound, match="'alice' not found"):
        store.info("alice")
    assert sorted(p.name for p in (store.dir / "pools").iterdir()) == [str(store._pool("bob", "")["id"])]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_bad_names_are_refused_before_anything_happens(store, name):
    with pytest.raises(InvalidName, match="invalid memory name"):
        store.create(name)
    with pytest.raises(InvalidName):
        store.inject(name, CORPUS[0])
    assert store.names() == [] and list((store.dir / "pools").iterdir()) == []


def test_tenants_are_separate_namespaces(store):
    store.create("notes", seed=1, tenant="t1")
    store.create("notes", seed=2, tenant="t2")
    store.inject("notes", CORPUS[0], tenant="t1")
    assert store.info("notes", tenant="t1").live_injections == 1
    assert store.info("notes", tenant="t2").live_injections == 0
    assert store.names(tenant="t3") == []
    with pytest.raises(NotFound):
        store.history("notes", tenant="t3")


def test_inject_writes_ledger_and_replays_bit_exactly(store, tmp_path):
    store.create("a", seed=7)
    store.inject("a", CORPUS[0], source="chat")
    entries = store.inject("a", CORPUS[1:4], source="import")
    assert [e.injection_id for e in entries] == [2, 3, 4]
    hist = [e for e in store.history("a") if e.kind == "inject"]
    assert [(e.injection_id, e.text, e.sha256, e.status) for e in hist] == [(i + 1, t, text_sha256(t), "live") for i, t in enumerate(CORPUS[:4])]
    assert hist[0].source == "chat" and hist[0].num_tokens == len(store.lm.encode(CORPUS[0]))
    live = store.memory("a")
    assert live.equal(store.replay("a"))
    assert live.equal(reference(store.lm, 7, [(t, i + 1) for i, t in enumerate(CORPUS[:4])]))
    report = store.verify("a")
    assert report.ok and report.replayed == 4, report
    # a fresh process (new store on the same directory) sees the same pool, bit for bit
    store.close()
    again = MemoryStore(tmp_path / "data", tiny_lm())
    try:
        assert again.memory("a").equal(live) and again.verify("a").ok
        assert again.inject("a", CORPUS[4])[0].injection_id == 5
    finally:
        again.close()
    store.__init__(tmp_path / "data", tiny_lm())  # reopen for the fixture's close()


def test_verify_detects_tampering(store):
    store.create("a", seed=1)
    store.inject("a", CORPUS[:3])
    assert store.verify("a").ok
    with sqlite3.connect(store.dir / "store.db") as db:  # someone edits the ledger
        db.execute("UPDATE ledger SET text=? WHERE injection_id=2", (CORPUS[5],))
    store._live.clear()
    report = store.verify("a")
    assert not report.ok
    assert any("does not match its sha256" in m for m in report.mismatches)
    assert any("slots differ" in m for m in report.mismatches)
    with sqlite3.connect(store.dir / "store.db") as db:
        db.execute("UPDATE ledger SET text=? WHERE injection_id=2", (CORPUS[1],))
    assert store.verify("a").ok
    # someone swaps the live state for another valid one
    pool = store._pool("a", "")
    other = reference(store.lm, 1, [(CORPUS[0], 1), (CORPUS[2], 2), (CORPUS[1], 3)])
    other.save(store._pool_dir(pool["id"]) / pool["state_file"])
    store._live.clear()
    assert not store.verify("a").ok


def test_textless_injection_moves_the_replay_base(store):
    store.create("a", seed=1)
    store.inject("a", CORPUS[0])
    [e] = store.inject("a", CORPUS[1], store_text=False)
    assert e.text is None
    row = [h for h in store.history("a") if h.injection_id == 2][0]
    assert row.text is None and row.sha256 == text_sha256(CORPUS[1]) and row.num_tokens > 0
    store.inject("a", CORPUS[2])
    report = store.verify("a")
    assert report.ok and report.replayed == 1 and "injection 2 was stored without its text" in report.message


def test_forget_fast_resets_the_slots_and_erases_the_text(store):
    store.create("a", seed=2)
    store.inject("a", CORPUS[:3])
    before = store.memory("a")
    slots = int((before.provenance == 2).sum())
    assert slots > 0
    r = store.forget("a", 2, "fast")
    assert (r.mode, r.slots_reset, r.was_live) == ("fast", slots, True)
    after = store.memory("a")
    assert not (after.provenance == 2).any()
    reset = before.provenance == 2
    assert torch.all(after.memory[reset] == 0) and torch.all(after.provenance[reset] == NEVER_WRITTEN)
    assert torch.equal(after.memory[~reset], before.memory[~reset])  # nothing else touched
    row = [h for h in store.history("a") if h.injection_id == 2][0]
    assert (row.text, row.status, row.sha256) == (None, "forgotten", text_sha256(CORPUS[1])) and row.deleted_at
    assert "forgotten (fast)" in store.verify("a").message and store.verify("a").ok
    with pytest.raises(NotFound, match="already forgotten"):
        store.forget("a", 2, "fast")
    # exact forget of an injection before a fast forget is impossible: its replay needs 2's text
    with pytest.raises(NotReplayable, match="use mode='fast'"):
        store.forget("a", 1, "exact")
    assert store.memory("a") is after


def test_forget_fast_of_the_only_injection_empties_the_pool(store):
    store.create("a", seed=2)
    store.inject("a", CORPUS[0])  # the first update tiles the whole pool
    store.forget("a", 1)
    mem = store.memory("a")
    assert not mem.initialized and not mem.memory.any()
    store.inject("a", CORPUS[1])
    assert store.verify("a").ok


def test_forget_exact_equals_never_having_injected(store):
    store.create("a", seed=4)
    store.inject("a", CORPUS[:4])
    r = store.forget("a", 2, "exact")
    assert r.replayed == 3 and r.was_live
    expected = reference(store.lm, 4, [(CORPUS[0], 1), (CORPUS[2], 3), (CORPUS[3], 4)])
    assert store.memory("a").equal(expected)
    assert store.verify("a").ok
    assert [h.text for h in store.history("a") if h.injection_id == 2 and h.kind == "inject"] == [None]
    assert store.inject("a", CORPUS[4])[0].injection_id == 5  # ids are never reused


@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_forgotten_text_leaves_no_bytes_on_disk(store, mode):
    secret = "The vault code is 7391 and it opens the north door of the old mill."
    store.create("a", seed=1)
    store.inject("a", [CORPUS[0], secret, CORPUS[1]])
    store.forget("a", 2, mode)
    for f in store.dir.rglob("*"):  # the DB, its WAL, state files
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f
    assert store.verify("a").ok


def test_forget_deletes_snapshots_that_contain_it(store):
    store.create("a", seed=1)
    store.inject("a", CORPUS[0])
    store.snapshot("a", "one")
    store.inject("a", CORPUS[1])
    store.snapshot("a", "two")
    r = store.forget("a", 2, "exact")
    assert r.snapshots_deleted == ["two"]
    assert [s.label for s in store.snapshots("a")] == ["one"]


class ExactForgetLM(MemoryLM):
    """A design whose forget is exact (as LongMem's bank and Larimar's rows will be): it rebuilds
    the memory from the texts it was given, without the forgotten ones. It keeps the texts by
    injection id, so it serves one pool's history; enough to see the store honour the flag."""

    forget_exact = True

    def __init__(self):
        super().__init__(tiny_model(), make_tokenizer(), name="tiny-exact")
        self.texts: dict[int, tuple[str, bool]] = {}
        self.forgotten: set[int] = set()

    def inject(self, memory, text, *, allow_short=False, progress=None, injection_id=None):
        r = super().inject(memory, text, allow_short=allow_short, progress=progress, injection_id=injection_id)
        self.texts.setdefault(r.injection_id, (text, allow_short))
        return r

    def forget(self, memory, injection_id):
        removed = int((self.owners(memory) == injection_id).sum())
        self.forgotten.add(injection_id)
        rebuilt = self.new_memory(memory.seed)
        for i, (text, short) in sorted(self.texts.items()):
            if i <= memory.last_injection_id and i not in self.forgotten:
                super().inject(rebuilt, text, allow_short=short, injection_id=i)
        version = memory.version
        memory.assign(rebuilt)
        memory.version = version + 1
        return ForgetResult(injection_id, exact=True, removed_units=removed)


def _five_injections(store):
    store.create("a", seed=4)
    store.inject("a", CORPUS[0])
    store.inject("a", CORPUS[1], store_text=False)  # replay starts after injection 2 from here on
    store.inject("a", CORPUS[2:5])  # 3, 4, 5
    return store.info("a")


def test_the_store_honours_a_design_whose_forget_is_exact(tmp_path, monkeypatch):
    """forget_exact = True: either mode forgets in place, nothing is replayed, and the replay base
    stays (rid of the injection when it holds it); an injection inside the base can be forgotten
    exactly, which MemoryLLM (forget_exact = False, below) cannot do."""
    lm = ExactForgetLM()
    with MemoryStore(tmp_path / "exact", lm) as store:
        before = _five_injections(store)
        with monkeypatch.context() as m:
            m.setattr(store, "_replay", lambda *a, **k: pytest.fail("the store replayed"))
            reports = [store.forget("a", 3, "exact"), store.forget("a", 1, "exact"), store.forget("a", 5, "fast")]
        assert [r.replayed for r in reports] == [0, 0, 0] and all(r.was_live for r in reports)
        after = store.info("a")
        assert (after.base_seq, after.base_reason) == (before.base_seq, "injection 2 was stored without its text")
        assert store.memory("a").equal(reference(lm, 4, [(CORPUS[1], 2), (CORPUS[3], 4)]))
        pool = store._pool("a", "")
        base = store._load_state(pool["id"], pool["base_file"])
        assert base.equal(reference(lm, 4, [(CORPUS[1], 2)]))  # injection 1 is gone from the base too
        report = store.verify("a")
        assert report.ok and report.replayed == 1, report  # injection 4 on top of the base

    with MemoryStore(tmp_path / "replayed", tiny_lm()) as store:
        _five_injections(store)
        assert store.forget("a", 3, "exact").replayed == 2  # 4 and 5 again, without 3
        with pytest.raises(NotReplayable, match="use mode='fast'"):
            store.forget("a", 1, "exact")
        store.forget("a", 5, "fast")
        assert store.info("a").base_reason == "injection 5 was forgotten (fast)" and store.verify("a").ok


def test_snapshot_diff_rollback(store):
    store.create("a", seed=5)
    store.inject("a", CORPUS[:2])
    s1 = store.snapshot("a", "s1")
    v1 = store.memory("a")
    assert s1.injections == [1, 2]
    with pytest.raises(AlreadyExists):
        store.snapshot("a", "s1")
    store.inject("a", CORPUS[2])
    store.snapshot("a", "s2")
    v2 = store.memory("a")
    d = store.diff("a", "s1", "s2")
    K, L = store.lm.config.num_tokens, store.lm.config.num_hidden_layers
    n3 = (v2.provenance == 3).sum().item()
    assert d["added_by_injection"] == {3: n3} and d["changed_slots"] == n3
    assert all(layer["added"] == layer["removed"] for layer in d["layers"])
    assert set(d["removed_by_injection"]) <= {1, 2} and n3 <= 2 * K * L
    assert store.diff("a")["changed_slots"] == 0

    store.rollback("a", "s1")
    assert store.memory("a").equal(v1)
    assert [h.status for h in store.history("a") if h.kind == "inject"] == ["live", "live", "rolled_back"]
    assert store.verify("a").ok
    store.inject("a", CORPUS[3])  # id 4: history branches
    assert store.verify("a").ok
    store.rollback("a", "s2")  # forward again: 3 is back, 4 is rolled back
    assert store.memory("a").equal(v2)
    assert [h.status for h in store.history("a") if h.kind == "inject"] == ["live", "live", "live", "rolled_back"]
    assert store.verify("a").ok
    with pytest.raises(NotFound, match="snapshot 'nope'"):
        store.rollback("a", "nope")
    store.delete_snapshot("a", "s1")
    assert [s.label for s in store.snapshots("a")] == ["s2"]


def test_snapshots_and_rollback_write_no_copies(store):
    store.create("a", seed=5)
    store.inject("a", CORPUS[0])
    files = pool_files(store, "a")
    store.snapshot("a", "s")
    assert pool_files(store, "a") == files
    store.inject("a", CORPUS[1])
    store.rollback("a", "s")
    assert pool_files(store, "a") == files  # the newer state had no reference left


def test_export_import_round_trip(store, tmp_path):
    store.create("a", seed=9)
    store.inject("a", CORPUS[:2])
    store.inject("a", CORPUS[2], store_text=False, source="secret")
    store.inject("a", CORPUS[3])
    path = store.export("a", tmp_path / "a.zip")
    info = store.import_file(path, "b", tenant="other")
    assert info.name == "b" and store.memory("b", tenant="other").equal(store.memory("a"))
    strip = lambda hs: [(h.seq, h.kind, h.injection_id, h.text, h.sha256, h.status, h.source) for h in hs if h.kind != "import"]
    assert strip(store.history("b", tenant="other")) == strip(store.history("a"))
    assert store.verify("b", tenant="other").ok
    assert store.inject("b", CORPUS[4], tenant="other")[0].injection_id == 5
    with pytest.raises(AlreadyExists):
        store.import_file(path)  # its own name, "a", exists
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    with pytest.raises(StoreError, match="not a memory export"):
        store.import_file(tmp_path / "junk.zip", "c")
    assert store.names() == ["a"] and store.names(tenant="other") == ["b"]


def test_import_refuses_a_pool_of_another_model(store, tmp_path):
    store.create("a", seed=1)
    store.inject("a", CORPUS[0])
    path = store.export("a", tmp_path / "a.zip")
    other = MemoryStore(tmp_path / "other", tiny_lm(seed=1))
    try:
        with pytest.raises(Exception, match="made for model"):
            other.import_file(path)
        assert other.names() == [] and list((other.dir / "pools").iterdir()) == []
    finally:
        other.close()


def test_failed_operations_leave_the_pool_unchanged(store, monkeypatch):
    store.create("a", seed=1)
    store.inject("a", CORPUS[0])
    before, hist, files = store.memory("a"), store.history("a"), pool_files(store, "a")
    snap = (before.memory.clone(), before.provenance.clone(), before.generator.get_state())

    def unchanged():
        mem = store.memory("a")
        assert mem is before and store.history("a") == hist and pool_files(store, "a") == files
        assert torch.equal(mem.memory, snap[0]) and torch.equal(mem.provenance, snap[1]) and torch.equal(mem.generator.get_state(), snap[2])

    with pytest.raises(InjectionError):
        store.inject("a", [CORPUS[1], "   "])  # the second text is empty: neither is written
    unchanged()
    with pytest.raises(ValueError, match="no texts"):
        store.inject("a", [])
    with pytest.raises(ValueError, match="mode must be"):
        store.forget("a", 1, "slow")
    with pytest.raises(NotFound):
        store.forget("a", 99)
    unchanged()

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(MemoryState, "save", disk_full)
    for op in (lambda: store.inject("a", CORPUS[1]), lambda: store.forget("a", 1, "exact"), lambda: store.forget("a", 1, "fast")):
        with pytest.raises(OSError, match="No space"):
            op()
        unchanged()


def test_recover_removes_orphans(store, tmp_path):
    store.create("a", seed=1)
    d = store._pool_dir(store._pool("a", "")["id"])
    files = pool_files(store, "a")
    (d / "0123.safetensors").write_bytes(b"half a state")  # killed before the commit
    (d / ".x.safetensors.123.tmp").write_bytes(b"temp")
    (store.dir / "pools" / "999").mkdir()  # a pool whose creation never committed
    removed = store.recover()
    assert len(removed) == 3 and pool_files(store, "a") == files
    assert sorted(p.name for p in (store.dir / "pools").iterdir()) == [d.name]


def test_one_process_per_directory(store, tmp_path):
    with pytest.raises(StoreBusy, match="in use"):
        MemoryStore(tmp_path / "data", store.lm)


def test_concurrent_injections_into_one_pool_are_serialised(store):
    store.create("a", seed=1)
    errors = []

    def worker(k):
        try:
            for j in range(3):
                store.inject("a", CORPUS[(k + j) % len(CORPUS)], source=f"w{k}")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    ids = [h.injection_id for h in store.history("a") if h.kind == "inject"]
    assert sorted(ids) == list(range(1, 13)) and store.memory("a").update_count == sum(h.num_chunks for h in store.history("a") if h.kind == "inject")
    assert store.verify("a").ok


def test_generate_reads_the_live_pool(store):
    store.create("a", seed=1)
    store.create("b", seed=2)
    store.inject("a", CORPUS[0])
    g = store.generate("a", "Where?", max_new_tokens=5)
    assert g.text == store.lm.generate(store.memory("a"), "Where?", max_new_tokens=5).text
    assert "".join(store.stream("a", "Where?", max_new_tokens=5)) == g.text
    batch = store.generate_batch(["a", "b"], ["Where?", "Who?"], max_new_tokens=5)
    assert len(batch) == 2 and all(isinstance(x.text, str) for x in batch)


def test_reading_a_pool_whose_file_an_injection_just_replaced(store, monkeypatch):
    store.create("a", seed=1)
    store.inject("a", CORPUS[0])
    stale = store._pool("a", "")  # a reader got this row ...
    store.inject("a", CORPUS[1])  # ... then an injection committed and deleted that file
    store._live.clear()
    real, calls = store._pool, []
    monkeypatch.setattr(store, "_pool", lambda name, tenant: calls.append(1) or (stale if len(calls) == 1 else real(name, tenant)))
    assert store.memory("a").equal(reference(store.lm, 1, [(CORPUS[0], 1), (CORPUS[1], 2)]))
    assert len(calls) == 2


def test_import_refuses_damaged_manifests_and_leaves_nothing(store, tmp_path):
    import json
    import zipfile

    store.create("a", seed=1)
    store.inject("a", CORPUS[0])
    good = store.export("a", tmp_path / "a.zip")
    with zipfile.ZipFile(good) as z:
        manifest, files = json.loads(z.read("manifest.json")), {n: z.read(n) for n in z.namelist() if n != "manifest.json"}
    damages = {"no seed": lambda m: m.pop("seed"), "ledger not a list": lambda m: m.update(ledger=3),
               "repeated seq": lambda m: m["ledger"].append(m["ledger"][0]), "text as object": lambda m: m["ledger"][1].update(text={"x": 1})}
    for what, damage in damages.items():
        m = json.loads(json.dumps(manifest))
        damage(m)
        bad = tmp_path / "bad.zip"
        with zipfile.ZipFile(bad, "w") as z:
            z.writestr("manifest.json", json.dumps(m))
            for n, b in files.items():
                z.writestr(n, b)
        with pytest.raises(StoreError, match="damaged"):
            store.import_file(bad, "b")
        assert store.names() == ["a"], what
    assert sorted(p.name for p in (store.dir / "pools").iterdir()) == [str(store._pool("a", "")["id"])]
    assert list((store.dir / "staging").iterdir()) == []


def test_export_is_deflated_and_leaves_out_the_empty_base(store, tmp_path):
    """Issue 14: a one-injection export carried an empty base pool, uncompressed. The base that is
    the creation state is left out (import rebuilds it), members are deflated, and the import is
    the same pool bit for bit, replay included."""
    import json
    import zipfile

    store.create("a", seed=9)
    store.inject("a", CORPUS[0])
    path = store.export("a", tmp_path / "a.zip")
    with zipfile.ZipFile(path) as z:
        assert sorted(z.namelist()) == ["live.safetensors", "manifest.json"]
        assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in z.infolist())
        manifest = json.loads(z.read("manifest.json"))
        live_size = z.getinfo("live.safetensors").file_size
    assert (manifest["format"], manifest["empty"], manifest["base_is_live"]) == ("memoryllm-pool/2", ["base"], False)
    assert path.stat().st_size < live_size  # one state, compressed: smaller than that state alone
    store.import_file(path, "b")
    assert store.memory("b").equal(store.memory("a"))
    pool = store._pool("b", "")
    assert store._load_state(pool["id"], pool["base_file"]).equal(store.lm.new_memory(seed=9))  # the rebuilt base
    assert store.verify("b").ok and store.verify("b").replayed == 1


def test_export_of_an_empty_pool_and_of_a_base_that_is_the_live_state(store, tmp_path):
    import zipfile

    store.create("empty", seed=2)
    path = store.export("empty", tmp_path / "e.zip")
    with zipfile.ZipFile(path) as z:
        assert z.namelist() == ["manifest.json"]  # nothing but facts: both states are new_memory(2)
    store.import_file(path, "e2")
    assert store.memory("e2").equal(store.lm.new_memory(seed=2)) and store.verify("e2").ok
    assert store.inject("e2", CORPUS[1])[0].injection_id == 1

    store.create("t", seed=3)
    store.inject("t", CORPUS[0])
    store.inject("t", CORPUS[1], store_text=False)  # the base moves to the live state
    path = store.export("t", tmp_path / "t.zip")
    with zipfile.ZipFile(path) as z:
        assert z.namelist() == ["manifest.json", "live.safetensors"]  # one file for both
    store.import_file(path, "t2")
    pool = store._pool("t2", "")
    assert pool["base_file"] == pool["state_file"] and store.memory("t2").equal(store.memory("t"))
    assert store.verify("t2").ok
    store.inject("t2", CORPUS[2])
    assert store.verify("t2").ok and store.verify("t2").replayed == 1


def test_an_export_of_the_previous_format_still_imports(store, tmp_path):
    """tests/data/export_v0.1_tiny.zip (format /1: stored, with an empty base) imports, and its
    re-export in the new format imports to the same pool."""
    from pathlib import Path

    old = Path(__file__).parent / "data" / "export_v0.1_tiny.zip"
    store.import_file(old, "old")
    # (its verify is tests/test_conformance.py's: written with 2 torch threads, it replays
    # bit for bit with 2, not with the 1 thread this module runs; issue 17)
    again = store.import_file(store.export("old", tmp_path / "new.zip"), "new")
    assert again.live_injections == 3 and store.memory("new").equal(store.memory("old"))
    assert [e.text for e in store.history("new") if e.kind == "inject"] == [e.text for e in store.history("old") if e.kind == "inject"]
    assert (tmp_path / "new.zip").stat().st_size < old.stat().st_size


def test_import_refuses_an_export_whose_left_out_states_belong_to_another_model(store, tmp_path):
    store.create("a", seed=1)
    path = store.export("a", tmp_path / "a.zip")
    other = MemoryStore(tmp_path / "other", tiny_lm(seed=1))
    try:
        with pytest.raises(Exception, match="made for model"):
            other.import_file(path)
        assert other.names() == []
    finally:
        other.close()


class SometimesInexactLM(MemoryLM):
    """A design that declares its forget exact but, this time, cannot deliver (as LongMem after
    its bank evicted chunks): it resets the slots and says exact=False."""

    forget_exact = True

    def __init__(self):
        super().__init__(tiny_model(), make_tokenizer(), name="tiny-sometimes")

    def forget(self, memory, injection_id):
        result = super().forget(memory, injection_id)
        return ForgetResult(injection_id, exact=False, removed_units=result.removed_units, note="evicted since")


def test_the_store_replays_when_a_design_cannot_forget_exactly_this_time(tmp_path):
    lm = SometimesInexactLM()
    with MemoryStore(tmp_path / "d", lm) as store:
        store.create("a", seed=1)
        store.inject("a", list(CORPUS[:3]))
        report = store.forget("a", 2, mode="exact")
        assert report.replayed == 2  # the other two injections were replayed
        never = lm.new_memory(seed=1)
        for i in (1, 3):
            MemoryLM.inject(lm, never, CORPUS[i - 1], injection_id=i)
        assert store.memory("a").equal(never)
        assert store.verify("a").ok
        store.forget("a", 3, mode="fast")  # not exact in place: replay starts after it, as for MemoryLLM
        assert "forgotten (fast)" in store.info("a").base_reason
