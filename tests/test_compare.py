"""``memoryllm eval compare`` (issue 20) end to end on tiny random models of every design, the new
design-agnostic tasks against hand-computed cases, resume, determinism and bad options."""

import json
import math

import pytest
import torch

from conftest import tiny_lm
from latentmem.eval import metrics, run
from latentmem.eval.compare import TASKS, parse_task_values, resolve_methods
from latentmem.eval.data import is_heldout

torch.set_num_threads(1)

WORDS = "alpha beta gamma delta river stone cloud paper lamp orange violet copper meadow harbor".split()


def _heldout_ids(prefix: str, n: int) -> list[str]:
    out, i = [], 0
    while len(out) < n:
        if is_heldout(f"{prefix}{i}"):
            out.append(f"{prefix}{i}")
        i += 1
    return out


@pytest.fixture
def data(tmp_path, monkeypatch):
    d = tmp_path / "data"
    d.mkdir()

    def write(name, rows):
        with open(d / f"{name}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")

    qa = []
    for k, rid in enumerate(_heldout_ids("q", 24)):
        ans = WORDS[k % len(WORDS)] + str(k)
        qa.append({"id": rid, "question": f"What is the secret word of folder {k}?", "context": f"Note {k}: the secret word of the blue folder number {k} is {ans}, kept near the river bank.", "answer": ans})
    qa.append({"id": "not-heldout", "question": "?", "context": "never asked", "answer": "x"})
    write("counterfactual_qa", qa)
    write("squad_disfluent_qa", qa)
    write("news_articles", [{"id": i, "text": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(80))} for i in range(6)])
    write("wikipedia_articles", [{"id": rid, "title": rid, "text": " ".join(WORDS[(k * 3 + j * 7) % len(WORDS)] for j in range(400))} for k, rid in enumerate(_heldout_ids("w", 3))])
    countries = ["France", "Japan", "Peru", "Chile", "Italy", "Spain", "Norway", "Kenya"]
    write("wikidata_facts", [{"id": f"f{i}", "prompt": f"The country of Event {i} is", "targets": [countries[i % 8]]} for i in range(16)])
    icl = [{"id": f"sst2-{s}-{i}", "task": "sst2", "split": s, "text": f"{WORDS[i % 14]} {'good' if i % 2 else 'bad'} film", "label": i % 2, "label_name": "positive" if i % 2 else "negative"} for s in ("train", "test") for i in range(16)]
    write("icl_classification", icl)
    monkeypatch.setenv("MEMORYLLM_DATA", str(d))
    return d


def _loader(design, options):
    if design == "memoryllm":
        return tiny_lm()
    if design == "longmem":
        from test_longmem import tiny_longmem

        return tiny_longmem(0, **options)
    from test_larimar import tiny_larimar

    return tiny_larimar(0, **options)


SIZES = "facts=3,6;editing=1,3;forgetting=4;perplexity=300;longqa=200;needle=200;icl=8;cost=64"
SAMPLES = "facts=4;forgetting=2;perplexity=2;longqa=2;needle=2;icl=4;cost=1"
TASK_OPTIONS = {
    "facts": {"max_passage_tokens": 200, "filler_tokens": 20, "max_answer_tokens": None, "bm25_tokens": 120, "max_new_tokens": 3, "batch_size": 4},
    "editing": {"ft_steps": 2, "max_new_tokens": 3},
    "forgetting": {"max_new_tokens": 3},
    "perplexity": {"eval_tokens": 32, "local_tokens": 8, "chunk_tokens": 16, "bm25_tokens": 64},
    "longqa": {"max_new_tokens": 3, "bm25_chunk_tokens": 32},
    "needle": {"piece_tokens": 20, "max_new_tokens": 3, "bm25_chunk_tokens": 16},
    "icl": {"prompt_demos": 2, "bm25_tokens": 64},
    "cost": {"max_new_tokens": 2},
}


def _compare(tmp_path, name, **kw):
    opts = dict(designs="memoryllm,longmem,larimar", sizes=SIZES, samples=SAMPLES, task_options=TASK_OPTIONS, loader=_loader, baseline_lm=tiny_lm(seed=3), seed=1,
                out=tmp_path / name, workdir=tmp_path / f"{name}_work", progress=False)
    opts.update(kw)
    return run("compare", **opts)


def _strip(obj):
    """The measured values without wall-clock figures (timings differ between runs)."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in ("timing", "seconds", "date", "env", "sessions", "json_path", "png_paths", "md_path")}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def test_compare_end_to_end_every_design_and_baseline_resumable_and_deterministic(data, tmp_path):
    res = _compare(tmp_path, "a")
    on_disk = json.loads((tmp_path / "a" / "compare.json").read_text())
    assert on_disk["complete"] and res["complete"]
    methods = ["memoryllm", "longmem", "longmem-release", "larimar", "larimar-sequential"]
    assert on_disk["order"] == methods + ["none", "prompt", "bm25", "ft_l"]
    sizes = on_disk["sizes"]
    for task in TASKS:
        for s in sizes[task]:
            for m in methods + list(on_disk["baselines_of"][task]):
                assert f"{task}/{s}/{m}" in on_disk["cells"], (task, s, m)
    assert "forgetting/4/none" not in on_disk["cells"] and "editing/1/bm25" not in on_disk["cells"] and "facts/3/ft_l" not in on_disk["cells"]
    n_cells = sum(len(sizes[t]) * (len(methods) + len(on_disk["baselines_of"][t])) for t in TASKS)
    assert len(on_disk["cells"]) == n_cells
    # tiny random models carry no trained weights: labelled as such
    assert on_disk["methods"]["memoryllm"]["kind"] == "design"
    assert on_disk["methods"]["none"]["kind"] == "baseline"
    c = on_disk["cells"]
    # every design saw the same facts items: the same question counts and tokens written
    assert len({c[f"facts/6/{m}"]["result"]["questions"] for m in methods + ["none", "prompt", "bm25"]}) == 1
    assert c["facts/6/none"]["result"]["questions"] == 4
    # exactness as declared by each design, and verified against a replay
    for m in methods:
        f = c[f"forgetting/4/{m}"]["result"]
        assert f["forgets"] == 2 and f["claims_agree"]
    assert c["forgetting/4/longmem"]["result"]["verified_exact"]["mean"] == 1.0
    assert c["forgetting/4/memoryllm"]["result"]["claimed_exact"]["mean"] == 0.0
    # the editing cells hold the paper's Score = harmonic mean of the three rates
    for key, cell in c.items():
        if cell["task"] == "editing":
            p = cell["result"]["probability"]
            assert p["score"] == pytest.approx(metrics.harmonic_mean([p[k]["mean"] for k in ("efficacy", "generalization", "specificity")]))
    for png in ("compare_facts.png", "compare_editing.png"):
        assert (tmp_path / "a" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "a" / "compare.md").read_text()
    assert "### Many facts in one memory" in md and "### Forgetting" in md and "Which design for which job" in md and "![facts](compare_facts.png)" in md
    # resume: a rerun measures nothing again
    again = _compare(tmp_path, "a", loader=lambda d, o: pytest.fail("a complete run must not load any design"), baseline_lm=None)
    assert _strip(again["cells"]) == _strip(on_disk["cells"])
    # a fixed seed gives identical results
    other = _compare(tmp_path, "b")
    assert _strip(other["cells"]) == _strip(on_disk["cells"])


# ---- the new tasks against hand-computed cases ------------------------------------------------------


def test_perplexity_summary_by_hand():
    from latentmem.eval.perplexity import perplexity

    p = perplexity([(2.0, 2), (8.0, 2)])  # token-weighted mean NLL = 10 / 4 = 2.5
    assert p["mean"] == pytest.approx(math.exp(2.5)) and p["nll_per_token"] == pytest.approx(2.5) and p["tokens"] == 4 and p["n"] == 2
    lo, hi = p["ci95"]  # resamples of two documents: NLL 1, 2.5 or 4 per token
    assert math.exp(1.0) - 1e-9 <= lo <= p["mean"] <= hi <= math.exp(4.0) + 1e-9


def test_perplexity_methods_score_what_they_say(data):
    from latentmem.eval.perplexity import documents, measure_perplexity

    lm = tiny_lm()
    opts = dict(length=300, docs=2, eval_tokens=32, local_tokens=8, chunk_tokens=16, bm25_tokens=64, seed=1)
    got = measure_perplexity(lm, "none", **opts)
    dec = lambda ids: lm.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    rows = []
    for ids in documents(lm, "wikipedia_articles", 300, 2, 1):
        answer = dec(ids[-32:])
        answer = answer[1:] if answer.startswith(" ") else answer
        (lp, n), = lm.score([None], [dec(ids[-40:-32])], [answer])
        rows.append((-lp, n))
    assert got["perplexity"]["mean"] == pytest.approx(math.exp(sum(a for a, _ in rows) / sum(n for _, n in rows)))
    # the prompt baseline sees more of the document than the local tokens, within the window
    wide = measure_perplexity(lm, "prompt", **opts)
    assert all(w["prompt_tokens"] > g["prompt_tokens"] for w, g in zip(wide["per_document"], got["per_document"]))
    assert all(w["prompt_tokens"] + 32 <= lm.info().details["context_window"] for w in wide["per_document"])
    with pytest.raises(ValueError, match="exceed"):
        measure_perplexity(lm, "none", length=30, eval_tokens=32)
    with pytest.raises(ValueError, match="unknown perplexity method"):
        measure_perplexity(lm, "memoryllm", length=300)


def test_icl_prediction_balance_and_prompts(data):
    from latentmem.eval.icl import load_icl, measure_icl, predict

    assert predict([(-3.0, 3), (-1.5, 1)]) == 0  # means -1.0 and -1.5: the first
    assert predict([(-2.0, 2), (-1.0, 1)]) == 0  # a tie goes to the first label
    assert predict([(-4.0, 1), (-1.0, 2)]) == 1
    demos, qs, labels = load_icl("icl_classification", "sst2", 8, 6, 0)
    assert labels == ["negative", "positive"] and len(demos) == 8
    assert sorted(q["label_name"] for q in qs) == ["negative"] * 3 + ["positive"] * 3  # balanced
    assert all(q["id"].startswith("sst2-test") for q in qs) and all(d["id"].startswith("sst2-train") for d in demos)
    lm = tiny_lm()
    none = measure_icl(lm, "none", size=8, queries=4, prompt_demos=2)
    full = measure_icl(lm, "prompt", size=8, queries=4, prompt_demos=2)
    assert full["prompt_tokens_mean"] > none["prompt_tokens_mean"]
    assert none["accuracy"]["n"] == 4 and none["chance"] == 0.5
    assert measure_icl(lm, "memory", size=8, queries=4, prompt_demos=2)["demos_in_memory"] == 6
    with pytest.raises(Exception, match="demonstrations"):
        load_icl("icl_classification", "sst2", 100, 4, 0)


def test_needle_sits_at_its_depth_in_a_haystack_of_the_asked_length(data):
    from latentmem.eval.needle import haystacks

    lm = tiny_lm()
    hs = haystacks(lm, length=300, needles=4, filler="news_articles", piece_tokens=20, seed=0)
    assert [h["depth"] for h in hs] == [0.125, 0.375, 0.625, 0.875]
    for h in hs:
        parts = h["text"].split("\n")
        at = next(i for i, p in enumerate(parts) if metrics.hit(p, h["answers"]))
        assert at == round(h["depth"] * (len(parts) - 1))  # the needle between the pieces at its depth
        assert 200 < h["tokens"] <= 300 + 2 * len(parts)  # the joins may merge differently
        assert not metrics.hit(h["question"], h["answers"])


def test_cost_bytes_per_token_by_hand(data):
    from latentmem.eval.cost import measure_cost

    lm = tiny_lm()
    mem = measure_cost(lm, "memory", size=64, repeats=1, max_new_tokens=2)
    pr = measure_cost(lm, "prompt", size=64, repeats=1, max_new_tokens=2)
    none = measure_cost(lm, "none", size=64, repeats=1, max_new_tokens=2)
    m = lm.new_memory(seed=0)
    from latentmem.eval.common import filler_pool
    from latentmem.eval.data import load_texts

    text = filler_pool(lm, load_texts("news_articles"), 64, 1, 0)[0]
    lm.inject(m, text, allow_short=True)
    assert mem["tokens"] == pr["tokens"] == len(lm.encode(text))
    assert mem["bytes_per_token"] == lm.info(m).memory_bytes / mem["tokens"]
    assert pr["bytes_per_token"] == len(text.encode()) / pr["tokens"]
    assert none["bytes_per_token"] == 0 and none["timing"]["write_seconds"] == 0
    assert mem["timing"]["peak_rss_mib"] >= mem["timing"]["rss_mib"] > 0


def test_forgetting_cost_is_forget_alone_only_where_exact(data):
    from test_longmem import tiny_longmem

    from latentmem.eval.forgetting import measure_forgetting

    for lm, exact in ((tiny_lm(), False), (tiny_longmem(0), True)):
        r = measure_forgetting(lm, size=4, forgets=2, max_new_tokens=2)
        assert r["forget_exact_declared"] is exact and r["claims_agree"]
        assert [row["fact"] for row in r["rows"]] == [1, 4]  # the first and the newest
        for row in r["rows"]:
            t = row["timing"]
            assert row["verified_exact"] is exact
            assert t["cost_seconds"] == pytest.approx(t["forget_seconds"] if exact else t["forget_seconds"] + t["replay_seconds"])
            assert row["removed_units"] > 0
    with pytest.raises(ValueError):
        measure_forgetting(tiny_lm(), size=0)


def test_which_design_picks_the_best_and_says_when_it_is_not_clear():
    from latentmem.eval.report import which_design

    def rate(k, n):
        return metrics.rate([1] * k + [0] * (n - k))

    cells = {
        "facts/10/memoryllm": {"task": "facts", "size": 10, "method": "memoryllm", "result": {"recall": rate(90, 100)}},
        "facts/10/larimar": {"task": "facts", "size": 10, "method": "larimar", "result": {"recall": rate(10, 100)}},
        "facts/10/bm25": {"task": "facts", "size": 10, "method": "bm25", "result": {"recall": rate(85, 100)}},
        "facts/1/larimar": {"task": "facts", "size": 1, "method": "larimar", "result": {"recall": rate(1, 1)}},
        "perplexity/100/memoryllm": {"task": "perplexity", "size": 100, "method": "memoryllm", "result": {"perplexity": {"mean": 30.0, "ci95": [20.0, 40.0]}}},
        "perplexity/100/longmem": {"task": "perplexity", "size": 100, "method": "longmem", "result": {"perplexity": {"mean": 10.0, "ci95": [9.0, 11.0]}}},
    }
    r = {"tasks": ["facts", "perplexity"], "order": ["memoryllm", "larimar", "longmem", "bm25"], "cells": cells,
         "methods": {"memoryllm": {"kind": "design"}, "larimar": {"kind": "design"}, "longmem": {"kind": "design"}, "bm25": {"kind": "baseline"}}}
    facts, ppl = which_design(r)
    assert (facts["size"], facts["best"], facts["best_design"], facts["clear"]) == (10, "memoryllm", "memoryllm", False)  # 90/100 vs 85/100 overlap
    assert facts["best_value"] == 0.9
    assert (ppl["best"], ppl["clear"]) == ("longmem", True)  # lower is better; [9, 11] below [20, 40]


# ---- options ----------------------------------------------------------------------------------------


def test_options_are_checked_with_clear_errors():
    assert parse_task_values("facts=10,100;editing=1", lambda v: [int(x) for x in v.split(",")], "sizes") == {"facts": [10, 100], "editing": [1]}
    assert parse_task_values(["needle=3"], int, "samples") == {"needle": 3}
    with pytest.raises(ValueError, match="unknown task 'fact'"):
        parse_task_values("fact=10", int, "sizes")
    with pytest.raises(ValueError, match="task=values"):
        parse_task_values("10,100", int, "sizes")
    methods, bases = resolve_methods("memoryllm,larimar", "none,ft_l", "all")
    assert [m for m, _, _ in methods] == ["memoryllm", "larimar", "larimar-sequential"] and bases == ["none", "ft_l"]
    assert [m for m, _, _ in resolve_methods("larimar", "", "default")[0]] == ["larimar"]
    assert resolve_methods("larimar-sequential", "", "all")[0] == [("larimar-sequential", "larimar", {"write_mode": "sequential"})]
    with pytest.raises(ValueError, match="unknown design or variant 'rag'"):
        resolve_methods("rag", "", "all")
    with pytest.raises(ValueError, match="unknown baseline"):
        resolve_methods("memoryllm", "ike", "all")


def test_cli_refuses_bad_options_with_status_2(capsys):
    from latentmem.cli import main

    assert main(["eval", "compare", "--tasks", "facts,speed"]) == 2
    assert "unknown compare task(s) ['speed']" in capsys.readouterr().err
    assert main(["eval", "compare", "--sizes", "facts=ten"]) == 2
    assert "facts='ten'" in capsys.readouterr().err
    assert main(["eval", "compare", "--designs", "gpt"]) == 2


def test_stops_at_max_seconds_keeps_what_it_has_and_refuses_other_settings(data, tmp_path):
    opts = dict(designs="memoryllm", baselines="none", tasks="cost,forgetting", sizes="cost=32;forgetting=3", samples="cost=1;forgetting=1",
                task_options={"cost": {"max_new_tokens": 2}, "forgetting": {"max_new_tokens": 2}}, loader=lambda d, o: tiny_lm(), baseline_lm=tiny_lm(),
                out=tmp_path / "o", workdir=tmp_path / "w", progress=False, plot=False)
    first = run("compare", max_seconds=0, **opts)
    assert not first["complete"] and first["cells"] == {} and first["sessions"][-1]["stopped"] == "max_seconds"
    second = run("compare", **opts)
    assert second["complete"] and sorted(second["cells"]) == ["cost/32/memoryllm", "cost/32/none", "forgetting/3/memoryllm"]
    with pytest.raises(ValueError, match="other settings"):
        run("compare", **{**opts, "seed": 5})


def test_the_results_page_quotes_the_measured_file():
    """docs/compare.md holds the page rendered from results/eval/compare/quick/compare.json, as
    it is, so no figure on it can differ from the file."""
    from pathlib import Path

    from latentmem.eval.report import render_compare

    root = Path(__file__).resolve().parent.parent
    folder = root / "results" / "eval" / "compare" / "quick"
    r = json.loads((folder / "compare.json").read_text())
    page = render_compare(r, folder, "../results/eval/compare/quick/")
    assert page in (root / "docs" / "compare.md").read_text()
    for png in ("compare_facts.png", "compare_editing.png"):
        assert f"../results/eval/compare/quick/{png}" in page and (folder / png).read_bytes()[:4] == b"\x89PNG"


def test_score_interval_by_hand():
    # three edits; efficacy of the first edit failed
    cols = [[0.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    r = metrics.harmonic_mean_ci(cols, n_boot=200)
    assert r["mean"] == pytest.approx(3 / (1 / (2 / 3) + 1 + 1)) and r["n"] == 3
    # a resample's efficacy is k/3 for k failed-free draws: the Score takes only these values
    possible = [0.0] + [metrics.harmonic_mean([k / 3, 1, 1]) for k in (1, 2, 3)]
    assert any(r["ci95"][0] == pytest.approx(v) for v in possible) and any(r["ci95"][1] == pytest.approx(v) for v in possible)
    assert r["ci95"][0] <= r["mean"] <= r["ci95"][1] == 1.0
    assert metrics.harmonic_mean_ci([[1.0, 1.0]] * 3)["ci95"] == [1.0, 1.0]
    with pytest.raises(ValueError):
        metrics.harmonic_mean_ci([[1.0], [1.0, 0.0]])


def test_a_rerun_with_other_tasks_and_designs_adds_cells_and_hides_none(data, tmp_path):
    opts = dict(sizes="cost=32;forgetting=3", samples="cost=1;forgetting=1", task_options={"cost": {"max_new_tokens": 2}, "forgetting": {"max_new_tokens": 2}},
                loader=_loader, baseline_lm=tiny_lm(), out=tmp_path / "o", workdir=tmp_path / "w", progress=False, plot=False)
    run("compare", designs="larimar", variants="default", baselines="none", tasks="cost", **opts)
    res = run("compare", designs="memoryllm", baselines="", tasks="forgetting", **opts)
    assert res["tasks"] == ["forgetting", "cost"] and res["order"] == ["memoryllm", "larimar", "none"]
    assert sorted(res["cells"]) == ["cost/32/larimar", "cost/32/none", "forgetting/3/memoryllm"]
    md = (tmp_path / "o" / "compare.md").read_text()
    assert "### Cost" in md and "### Forgetting" in md
