"""Metric functions of latentmem.eval against hand-computed cases."""

import pytest

from latentmem.eval import metrics as M
from latentmem.eval.data import build_edits, parse_fact_prompt


def test_normalize_answer_like_longbench():
    assert M.normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert M.normalize_answer("An apple, a pear; the end.") == "apple pear end"
    assert M.normalize_answer("theory") == "theory"  # articles only as whole words
    assert M.normalize_answer("") == ""


def test_qa_f1_hand_computed():
    # pred tokens: [eiffel, tower, in, paris]; truth: [eiffel, tower]: P = 2/4, R = 1, F1 = 2/3
    assert M.qa_f1_score("The Eiffel Tower in Paris", "Eiffel Tower") == pytest.approx(2 / 3)
    assert M.qa_f1_score("Paris", "London") == 0.0
    assert M.qa_f1_score("x y y", "y y z") == pytest.approx(2 / 3)  # bag overlap 2: P = R = 2/3
    assert M.qa_f1_score("a b b", "b b c") == pytest.approx(0.8)  # "a" is an article: P = 1, R = 2/3
    assert M.max_f1("Paris", ["London", "paris."]) == 1.0
    assert M.qa_f1_score("", "x") == 0.0
    with pytest.raises(ValueError):
        M.max_f1("x", [])


def test_hit_rule():
    assert M.hit(" Mason Plumlee played the role", "Mason Plumlee")
    assert M.hit("it was the Sunrider.", ["bike", "sunrider"])
    assert not M.hit("in 19990", "1999")
    assert not M.hit("a party", "art")
    assert not M.hit("anything", "")


def test_harmonic_mean():
    assert M.harmonic_mean([1, 1, 1]) == 1
    assert M.harmonic_mean([0.5, 1.0]) == pytest.approx(2 / 3)
    assert M.harmonic_mean([0.998, 0.967, 0.571]) == pytest.approx(3 / (1 / 0.998 + 1 / 0.967 + 1 / 0.571))
    assert M.harmonic_mean([0.9, 0.0, 0.8]) == 0.0
    with pytest.raises(ValueError):
        M.harmonic_mean([])


def test_eq5_curve():
    # N = 7680, K = 256 (the paper's 7B): r = 29/30
    c = M.eq5_curve(0.46, 0.1, 7680, 256, 3)
    assert c[0] == pytest.approx(0.46)
    assert c[1] == pytest.approx(0.1 + 0.36 * 29 / 30)
    assert c[2] == pytest.approx(0.1 + 0.36 * (29 / 30) ** 2)
    raw = M.eq5_curve(0.46, 0.1, 7680, 256, [1, 2], add_baseline=False)  # as printed in the paper
    assert raw == pytest.approx([0.36, 0.36 * 29 / 30])
    assert M.retention_fraction(2048, 128, 16) == pytest.approx((15 / 16) ** 16)
    with pytest.raises(ValueError):
        M.eq5_curve(0.5, 0.1, 100, 200, 3)


def test_confidence_intervals():
    lo, hi = M.wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-3) and hi == pytest.approx(0.7634, abs=1e-3)
    assert M.wilson_interval(0, 0) == (0.0, 1.0)
    r = M.rate([1, 0, 1, 1])
    assert r["mean"] == 0.75 and r["n"] == 4 and r["ci95"][0] < 0.75 < r["ci95"][1]
    a = M.bootstrap_ci([0.0, 1.0] * 20, seed=3)
    assert a == M.bootstrap_ci([0.0, 1.0] * 20, seed=3) and a[0] < 0.5 < a[1]
    assert M.sliding_mean([1, 0, 1, 1], 2) == [1.0, 0.5, 0.5, 1.0]


def test_fact_relations_and_edits():
    assert parse_fact_prompt("The country of 2000 Summer Olympics is") == ("country", "2000 Summer Olympics", "The country of {} is")
    assert parse_fact_prompt("875 North Michigan Avenue is located in") == ("located in", "875 North Michigan Avenue", "{} is located in")
    facts = [
        {"id": str(i), "prompt": f"The country of Event{i} is", "targets": [c], "relation": "country", "subject": f"Event{i}", "template": "The country of {} is"}
        for i, c in enumerate(["France", "Japan", "Peru", "Chile", "Italy", "Spain"])
    ]
    edits = build_edits(facts, 3, seed=1)
    assert len(edits) == 3 and edits == build_edits(facts, 3, seed=1)
    for e in edits:
        assert e["new"] != e["old"] and e["relation"] == "country"
        assert all(e["prompt"] != p for p in e["paraphrases"])
        assert all(nb["prompt"] != e["prompt"] for nb in e["neighbours"])


def test_local_qa_files(tmp_path):
    import json

    from latentmem.eval.data import DataError, load_qa

    squad = {"data": [{"title": "t", "paragraphs": [{"context": "Paris is in France.", "qas": [
        {"id": "a", "question": "Where is Paris?", "answers": [{"text": "France", "answer_start": 12}]},
        {"id": "b", "question": "Unanswerable?", "answers": [], "is_impossible": True}]}]}]}
    (tmp_path / "squad.json").write_text(json.dumps(squad, indent=2))
    rows = load_qa(tmp_path / "squad.json", shuffle=False)
    assert rows == [{"id": "a", "question": "Where is Paris?", "context": "Paris is in France.", "answer": "France", "answers": ["France"]}]
    hf = tmp_path / "nq.jsonl"
    hf.write_text(json.dumps({"id": 1, "question": "q?", "context": "c", "answers": {"text": ["x", "y"]}}) + "\n")
    assert load_qa(hf)[0]["answers"] == ["x", "y"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(DataError, match="lacks question/context"):
        load_qa(bad)
