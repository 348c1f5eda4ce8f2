"""The many-facts benchmark (``memoryllm eval facts``, issue 15) on tiny random models, and what
``inject`` / ``info`` tell users about capacity: the synthetic generator, the stream, ages,
the baselines' prompts, the summaries against hand-computed cases, determinism, resume."""

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from conftest import tiny_lm
from latentmem.eval import metrics, run
from latentmem.eval.facts import UPDATE_BINS, ages, asked_items, bm25_context, build_stream, by_age, summarize, window_context, writes_of
from latentmem.eval.synthetic import FactGenerator
from latentmem.text import qa_prompt

torch.set_num_threads(1)

WORDS = "alpha beta gamma delta river stone cloud paper lamp orange violet copper meadow harbor".split()


@pytest.fixture
def data(tmp_path, monkeypatch):
    d = tmp_path / "data"
    d.mkdir()
    with open(d / "counterfactual_qa.jsonl", "w") as f:
        for i in range(16):
            ans = WORDS[i % len(WORDS)] + str(i)
            ctx = f"Note {i}: the secret word of the blue folder number {i} is {ans}, kept near the river bank."
            f.write(json.dumps({"id": f"q{i}", "question": f"What is the secret word of folder {i}?", "context": ctx, "answer": ans}) + "\n")
        # a duplicate passage (another question on the same context) must not enter a stream twice
        f.write(json.dumps({"id": "dup", "question": "Which folder?", "context": ctx, "answer": "blue"}) + "\n")
    with open(d / "news_articles.jsonl", "w") as f:
        for i in range(6):
            f.write(json.dumps({"id": i, "text": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(80))}) + "\n")
    monkeypatch.setenv("MEMORYLLM_DATA", str(d))
    return d


OPTS = dict(items=8, checkpoints=[3, 8], passage_share=0.5, max_passage_tokens=200, filler_rate=0.5, filler_tokens=20, max_answer_tokens=None, window_tokens=300, bm25_tokens=120, max_new_tokens=3, batch_size=3, checkpoint_every=4, seed=1)


def _strip(res: dict) -> dict:
    out = {k: v for k, v in res.items() if k not in ("timing", "env", "json_path", "png_path")}
    out["options"] = {k: v for k, v in res["options"].items() if k != "workdir"}
    return out


# ---- the generator and the stream ---------------------------------------------------------------


def test_generator_is_seeded_never_repeats_an_entity_and_asks_well_formed_questions():
    facts = FactGenerator(seed=3).facts(600)
    assert facts == FactGenerator(seed=3).facts(600)
    assert [f["text"] for f in FactGenerator(seed=4).facts(20)] != [f["text"] for f in facts[:20]]
    entities = [f["entity"] for f in facts]
    assert len(set(entities)) == len(entities)
    named = [f["answer"] for f in facts if not f["answer"].isdigit()]  # invented names: never reused either
    assert len(set(named)) == len(named) and not set(named) & set(entities)
    assert len({f["id"] for f in facts}) == len(facts)
    assert len({f["relation"] for f in facts}) >= 8
    for f in facts:
        assert f["answer"] in f["text"] and f["entity"] in f["text"] and f["answers"] == [f["answer"]]
        assert 14 <= len(f["text"].split()) <= 24  # 21-32 tokens with the default model's tokenizer
        assert len(f["questions"]) >= 3 and len(set(f["questions"])) == len(f["questions"])
        for q in f["questions"]:
            assert q.endswith("?") and f["entity"] in q
            assert not metrics.hit(q, f["answer"])  # no question gives its answer away
            assert q not in f["text"]


def test_stream_is_deterministic_with_unique_items_and_evenly_spread_fillers(data):
    lm = tiny_lm()
    s = build_stream(lm, items=10, seed=2, passage_share=0.4, passage_tokens=(16, 200), max_answer_tokens=None, filler_rate=0.5, filler_tokens=20)
    assert s == build_stream(lm, items=10, seed=2, passage_share=0.4, passage_tokens=(16, 200), max_answer_tokens=None, filler_rate=0.5, filler_tokens=20)
    items = [e for e in s if e["kind"] != "filler"]
    assert [e["item"] for e in items] == list(range(1, 11))
    assert sum(e["kind"] == "passage" for e in items) == 4 and sum(e["kind"] == "fact" for e in items) == 6
    assert len({e["text"] for e in items}) == 10  # no passage twice (the duplicate context is dropped)
    # item k is followed by floor((k+1) r) - floor(k r) fillers: here one after every second item
    kinds = [e["kind"] for e in s]
    after = [kinds[i + 1] == "filler" if i + 1 < len(kinds) else False for i, k in enumerate(kinds) if k != "filler"]
    assert after == [False, True] * 5
    assert all(e["tokens"] == len(lm.encode(e["text"])) for e in s)
    for e in items:
        if e["kind"] == "passage":
            assert 16 <= e["tokens"] <= 200 and any(e["answers"][0] in e["text"] for _ in [0])
    with pytest.raises(ValueError, match="distinct passages"):
        build_stream(lm, items=40, seed=0, passage_share=1.0, passage_tokens=(16, 200), max_answer_tokens=None, filler_rate=0)


def test_ages_and_question_choice_by_hand():
    updates_after, tokens_after = [1, 3, 4, 6], [10, 30, 45, 70]
    assert ages(updates_after, tokens_after, 0, 3) == (5, 60)
    assert ages(updates_after, tokens_after, 2, 3) == (2, 25)
    assert ages(updates_after, tokens_after, 3, 3) == (0, 0)
    assert asked_items([0, 2, 3, 5, 6], None) == [0, 2, 3, 5, 6]
    assert asked_items([0, 2, 3, 5, 6], 3) == [0, 3, 6]  # first, middle, newest
    assert asked_items(list(range(10)), 4) == [0, 3, 6, 9]
    assert asked_items([4, 7], 1) == [7]


def test_summaries_against_hand_computed_cases():
    # stream: item 1 (2 updates, 50 tokens), filler (1, 20), item 2 (1, 10), item 3 (1, 10)
    stream = [
        {"kind": "fact", "item": 1, "answers": ["a"]},
        {"kind": "filler"},
        {"kind": "fact", "item": 2, "answers": ["b"]},
        {"kind": "passage", "item": 3, "answers": ["c"]},
    ]
    state = {
        "ident": {"questions_per_checkpoint": None},
        "updates_after": [2, 3, 4, 5],
        "tokens_after": [50, 70, 80, 90],
        "answers": {
            "none": {"0": ["x", 0], "2": ["x", 0], "3": ["x", 1]},
            "fresh": {"0": ["a", 1], "2": ["b", 1], "3": ["c", 1]},
            "probe": {"0": ["a", 1], "2": ["b", 1], "3": ["z", 0]},
            "ckpt": {"2": {"memory": {"0": ["a", 1], "2": ["b", 1]}}, "3": {"memory": {"0": ["z", 0], "2": ["b", 1], "3": ["c", 1]}}},
        },
    }
    res = summarize(stream, state, [2, 3], ["memory", "none", "fresh"], {"N": 8, "K": 2})
    c2, c3 = res["checkpoints"]
    # after 2 items the stream ends before item 3: item 1 is 2 updates (filler + item 2) and 30 tokens old
    assert (c2["items"], c2["updates"], c2["tokens_written"], c2["stream_elements"]) == (2, 4, 80, 3)
    m2 = c2["methods"]["memory"]
    assert m2["recall"]["mean"] == 1.0 and m2["recall"]["n"] == 2 and m2["newest_item"]["mean"] == 1.0 and m2["first_item"]["mean"] == 1.0
    assert [(b["bin"], b["n"], b["mean_age"]) for b in m2["by_age_updates"]] == [("0", 1, 0), ("2-3", 1, 2)]
    m3 = c3["methods"]["memory"]
    assert m3["recall"]["mean"] == pytest.approx(2 / 3) and m3["recall"]["ci95"] == pytest.approx(list(metrics.wilson_interval(2, 3)))
    assert m3["first_item"]["mean"] == 0.0 and m3["newest_item"]["mean"] == 1.0
    assert (m3["by_kind"]["fact"]["mean"], m3["by_kind"]["fact"]["n"], m3["by_kind"]["passage"]["mean"]) == (0.5, 2, 1.0)
    assert m3["modal_answer"] == {"answer": "b", "count": 1, "share": 1 / 3}  # a tie: the first in sorted order
    assert metrics.normalize_answer("The Zagrou.") == "zagrou"
    from latentmem.eval.facts import modal_answer

    assert modal_answer([" Thea Nordahl's friend", "Zagrou", "thea nordahl's friend.", ""]) == {"answer": "thea nordahls friend", "count": 2, "share": 0.5}
    assert modal_answer(["", "  "]) is None
    # item 1 at 3 later updates (2-3), item 2 at 1, item 3 at 0; tokens: 40, 10, 0
    assert [(b["bin"], b["n"], b["mean"]) for b in m3["by_age_updates"]] == [("0", 1, 1.0), ("1", 1, 1.0), ("2-3", 1, 0.0)]
    assert [(b["bin"], b["n"]) for b in m3["by_age_tokens"]] == [("0", 1), ("1-127", 2)]
    assert c3["methods"]["none"]["recall"]["mean"] == pytest.approx(1 / 3)
    assert c3["methods"]["fresh"]["recall"]["mean"] == 1.0
    assert res["newest_probe"]["all"]["mean"] == pytest.approx(2 / 3) and res["newest_probe"]["by_items_before"][0]["n"] == 3
    th = res["theory"]
    assert (th["a_u"], th["a_b"], th["capacity_updates"]) == (1.0, pytest.approx(1 / 3), 4)
    assert th["eq5"][:3] == pytest.approx([1.0, 1 / 3 + (2 / 3) * 0.75, 1 / 3 + (2 / 3) * 0.75**2])
    rows = [{"age": a, "hit": h} for a, h in [(0, True), (1, False), (3, True), (3, False), (9, True)]]
    assert [(b["bin"], b["n"], b["mean"]) for b in by_age(rows, "age", (0, 1, 2, 4, 8))] == [("0", 1, 1.0), ("1", 1, 0.0), ("2-3", 2, 0.5), ("8+", 1, 1.0)]


# ---- the baselines' prompts ---------------------------------------------------------------------


def test_window_baseline_keeps_the_last_whole_texts_that_fit():
    lm = tiny_lm()
    texts = ["The fox jumps over the dog.", "Paris is the capital of France.", "Alice lives in Zurich.", "The meeting was moved."]
    q, new = "Where does Alice live?", 3

    def size(ctx):
        return len(lm.encode(qa_prompt(lm, q, "plain", ctx))) + new

    two, three = "\n".join(texts[2:]), "\n".join(texts[1:])
    assert window_context(lm, texts, q, size(two), new) == two  # exactly the last two fit
    assert window_context(lm, texts, q, size(three) - 1, new) == two  # one token short of three
    assert window_context(lm, texts, q, size(three), new) == three
    assert window_context(lm, texts, q, 10_000, new) == "\n".join(texts)
    cut = window_context(lm, texts, q, size(texts[-1]) - 3, new)  # not even the newest fits: its end
    assert cut and texts[-1].endswith(cut) and cut != texts[-1] and size(cut) <= size(texts[-1]) - 3
    assert window_context(lm, [], q, 100, new) == ""


def test_bm25_baseline_retrieves_the_matching_texts_in_stream_order():
    lm = tiny_lm()
    texts = ["Alice lives in Zurich and works at a bakery.", "The fox jumps over the dog.", "Numbers like 42 appear.", "Alice has a dog called Rex."]
    q = "Where does Alice live and work?"
    n = [len(lm.encode(t)) + 1 for t in texts]
    got = bm25_context(lm, texts, q, n[0] + n[3])
    assert got == texts[0] + "\n" + texts[3]  # the two Alice texts, best first, kept in stream order
    assert bm25_context(lm, texts, q, n[0]) == texts[0]
    assert bm25_context(lm, texts, q, 10_000).count("\n") == 3
    assert bm25_context(lm, texts, q, 3) == lm.tokenizer.decode(lm.encode(texts[0])[:3])


# ---- end to end ---------------------------------------------------------------------------------


def test_facts_end_to_end_deterministic_with_json_png_and_report(data, tmp_path):
    a = run("facts", lm=tiny_lm(), out=tmp_path / "a", workdir=tmp_path / "wa", **OPTS)
    assert a["complete"] and a["stopped"] == "done"
    on_disk = json.loads(Path(a["json_path"]).read_text())
    assert Path(a["json_path"]).name == "facts_counterfactual_qa_8.json" and on_disk["task"] == "facts"
    assert Path(a["png_path"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [c["items"] for c in on_disk["checkpoints"]] == [3, 8]
    last = on_disk["checkpoints"][-1]
    assert set(last["methods"]) == {"memory", "none", "window", "bm25", "fresh"} and last["questions"] == 8
    assert all(v["recall"]["n"] == 8 for v in last["methods"].values())
    assert on_disk["newest_probe"]["all"]["n"] == 8
    assert on_disk["model"]["N"] == 32 and on_disk["theory"]["K"] == 8 and on_disk["capacity"]["capacity_updates"] == 4
    # ages in updates are the writes the design reported: each text takes ceil(tokens / 32) updates
    lm = tiny_lm()
    stream = build_stream(lm, items=8, seed=1, passage_share=0.5, passage_tokens=(16, 200), max_answer_tokens=None, filler_rate=0.5, filler_tokens=20)
    cum = [sum(writes_of(lm, e["text"]) for e in stream[: i + 1]) for i in range(len(stream))]
    progress = json.loads((tmp_path / "wa" / "progress.json").read_text())
    assert progress["updates_after"] == cum and on_disk["stream"]["updates"] == cum[-1]
    item_pos = [i for i, e in enumerate(stream) if e["kind"] != "filler"]
    by_hand = [{"age": cum[-1] - cum[p], "hit": bool(on_disk["answers"]["ckpt"]["8"]["memory"][str(p)][1])} for p in item_pos]
    assert by_hand[-1]["age"] == writes_of(lm, stream[-1]["text"])  # item 8 is followed by one filler
    assert [{k: b[k] for k in ("bin", "n", "mean", "mean_age")} for b in last["methods"]["memory"]["by_age_updates"]] == [{k: b[k] for k in ("bin", "n", "mean", "mean_age")} for b in by_age(by_hand, "age", UPDATE_BINS)]
    b = run("facts", lm=tiny_lm(), out=tmp_path / "b", workdir=tmp_path / "wb", **OPTS)
    assert _strip(a) == _strip(b)
    from latentmem.eval.report import render

    md = render(tmp_path / "a")
    assert "### Many facts in one memory: 8 items" in md and "| 8 | memory |" in md and "Eq. 5 reference" in md and ".png)" in md


class _Crash(Exception):
    pass


class _Flaky:
    """A model that fails on its n-th generate_batch call (a crash in the middle of a run)."""

    def __init__(self, lm, n):
        self._lm, self._n = lm, n

    def __getattr__(self, name):
        return getattr(self._lm, name)

    def generate_batch(self, *a, **k):
        self._n -= 1
        if self._n == 0:
            raise _Crash("killed")
        return self._lm.generate_batch(*a, **k)


def test_resume_after_an_interruption_equals_an_uninterrupted_run(data, tmp_path):
    straight = run("facts", lm=tiny_lm(), out=tmp_path / "s", workdir=tmp_path / "ws", **OPTS)
    with pytest.raises(_Crash):
        run("facts", lm=_Flaky(tiny_lm(), 14), out=tmp_path / "r", workdir=tmp_path / "wr", **OPTS)
    partial = json.loads((tmp_path / "r" / "facts_counterfactual_qa_8.json").read_text())
    assert partial["complete"] is False and partial["answers"]["probe"]  # written as measured
    stopped = run("facts", lm=tiny_lm(), out=tmp_path / "r", workdir=tmp_path / "wr", max_seconds=0, **OPTS)
    assert stopped["stopped"] == "max_seconds" and not stopped["complete"]
    resumed = run("facts", lm=tiny_lm(), out=tmp_path / "r", workdir=tmp_path / "wr", **OPTS)
    assert resumed["complete"] and [x["stopped"] for x in resumed["timing"]["sessions"]] == ["error: _Crash", "max_seconds", "done"]
    for k in ("checkpoints", "newest_probe", "answers", "stream", "theory", "items"):
        assert resumed[k] == straight[k], k
    with pytest.raises(ValueError, match="different settings"):
        run("facts", lm=tiny_lm(), out=tmp_path / "r", workdir=tmp_path / "wr", **{**OPTS, "seed": 5})


def test_baselines_only_run_uses_the_write_sizes_and_cli_parser(data, tmp_path):
    res = run("facts", lm=tiny_lm(), out=tmp_path / "o", workdir=tmp_path / "w", methods="none,window", **{k: v for k, v in OPTS.items()})
    assert set(res["checkpoints"][-1]["methods"]) == {"none", "window"} and res["theory"] is None and res["newest_probe"]["all"]["n"] == 0
    with pytest.raises(ValueError, match="unknown facts method"):
        run("facts", lm=tiny_lm(), methods="rag")
    from latentmem.cli import build_parser

    args = build_parser().parse_args(["eval", "facts", "--items", "100", "--checkpoints", "10,100", "--window-tokens", "2048", "--threads", "1"])
    assert (args.eval_task, args.items, args.checkpoints, args.window_tokens, args.probe, args.resume) == ("facts", 100, "10,100", 2048, True, True)


# ---- what users are told (issue 15, item 5) -------------------------------------------------------


def test_info_states_capacity_in_updates_and_tokens():
    lm = tiny_lm()  # N=32, K=8, at most 32 tokens per write
    d = lm.info().details
    assert d["capacity_updates"] == 4 and d["capacity_tokens"] == 4 * 32
    assert lm.info(lm.new_memory()).details["capacity_updates"] == 4
    json.dumps(lm.info().to_dict())


def test_inject_warns_when_a_text_needs_more_updates_than_the_pool_keeps():
    lm = tiny_lm()
    mem = lm.new_memory(seed=0)
    long_text = " ".join(["The quick brown fox jumps over the lazy dog near the river bank."] * 12)
    n = len(lm.encode(long_text))
    c = math.ceil(n / 32)
    assert c > 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lm.inject(mem, "Paris is the capital of France and Rome is the capital of Italy.")  # one update: no warning
        assert not caught
        r = lm.inject(mem, long_text)
    assert r.num_chunks == c and len(caught) == 1
    w = caught[0]
    msg = str(w.message)
    assert issubclass(w.category, UserWarning) and w.filename == __file__  # points at the caller
    share = 100 * 0.75 ** (c - 1)
    assert f"({n} tokens) takes {c} memory updates" in msg and "keeps about its last N/K=4 updates" in msg
    assert f"an expected {share:.1f}% of the first chunk's slots remain" in msg and "the last 4 chunks" in msg
    with warnings.catch_warnings(record=True) as caught:  # a batch warns once, about its longest text
        warnings.simplefilter("always")
        lm.inject([lm.new_memory(), lm.new_memory()], [long_text, "Alice lives in Zurich and works as an engineer."])
    assert len(caught) == 1 and "the longest of 2 texts" in str(caught[0].message)


def test_the_cli_shows_the_capacity_warning(tmp_path):
    root = Path(__file__).resolve().parents[1]
    script = (
        "import sys; sys.path.insert(0, 'tests'); import torch; torch.set_num_threads(1)\n"
        "from conftest import tiny_lm\n"
        "import latentmem.cli as cli\n"
        "try:\n    import latentmem.cli.commands as where; where.load_lm = lambda args: (tiny_lm(), 0.0)\n"
        "except ImportError:\n    cli._load_lm = lambda args: (tiny_lm(), 0.0)\n"
        f"sys.exit(cli.main(['inject', '--memory', {str(tmp_path / 'm.safetensors')!r}, ' '.join('note%d zq' % i for i in range(120))]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    p = subprocess.run([sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "CapacityWarning" in p.stderr and "keeps about its last N/K=4 updates" in p.stderr
    assert "injected #1" in p.stdout
