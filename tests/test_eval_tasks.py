"""Every evaluation end to end on a tiny random model: well-formed JSON, a PNG, determinism."""

import json

import pytest

import torch

from conftest import tiny_lm
from latentmem.eval import run
from latentmem.eval.data import DataError

torch.set_num_threads(1)  # the tiny models are slower with more threads on a shared CPU

WORDS = "alpha beta gamma delta river stone cloud paper lamp orange violet copper meadow harbor".split()


def _qa_rows(n):
    rows = []
    for i in range(n):
        ans = WORDS[i % len(WORDS)]
        ctx = f"The quick note number {i} says that the secret word is {ans} and the dog sleeps near the river bank."
        rows.append({"id": f"q{i}", "question": f"What is secret word {i}?", "context": ctx, "answer": ans})
    return rows


@pytest.fixture
def data(tmp_path, monkeypatch):
    d = tmp_path / "data"
    d.mkdir()
    with open(d / "toy_qa.jsonl", "w") as f:
        for r in _qa_rows(12):
            f.write(json.dumps(r) + "\n")
    with open(d / "toy_text.jsonl", "w") as f:
        for i in range(6):
            f.write(json.dumps({"id": i, "text": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(80))}) + "\n")
    with open(d / "toy_facts.jsonl", "w") as f:
        countries = ["France", "Japan", "Peru", "Chile", "Italy", "Spain", "Norway", "Kenya"]
        for i in range(16):
            f.write(json.dumps({"id": f"f{i}", "prompt": f"The country of Event {i} is", "targets": [countries[i % 8]]}) + "\n")
    monkeypatch.setenv("MEMORYLLM_DATA", str(d))
    return d


def _strip(res):
    return {k: v for k, v in res.items() if k not in ("timing", "env", "json_path", "png_path")}


def _check_files(res):
    path = res["json_path"]
    with open(path) as f:
        on_disk = json.load(f)
    assert on_disk["task"] == res["task"]
    with open(res["png_path"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    return on_disk


def test_retention_end_to_end_and_deterministic(data, tmp_path):
    opts = dict(dataset="toy_qa", rows=5, steps=4, filler="toy_text", filler_tokens=20, batch_size=3, max_new_tokens=4, max_answer_tokens=None, seed=3)
    a = run("retention", lm=tiny_lm(), out=tmp_path / "a", **opts)
    on_disk = _check_files(a)
    assert on_disk["rows"] == 5 and len(on_disk["steps"]) == 4
    assert on_disk["model"]["N"] == 32 and on_disk["model"]["K"] == 8
    assert on_disk["theory"]["eq5"][0] == pytest.approx(on_disk["steps"][0]["hit"]["mean"])
    assert all(len(r["hits"]) == 4 for r in on_disk["per_row"])
    b = run("retention", lm=tiny_lm(), out=tmp_path / "b", **opts)
    assert _strip(a) == _strip(b)
    from latentmem.eval.report import render

    md = render(tmp_path / "a")
    assert "### Retention: toy_qa (5 rows, 4 steps" in md and "| 4 |" in md and ".png)" in md


def test_integrity_resumes(data, tmp_path):
    opts = dict(dataset="toy_qa", window=5, health_every=4, checkpoint_every=5, max_new_tokens=3, max_answer_tokens=None, workdir=tmp_path / "w", out=tmp_path / "o")
    first = run("integrity", lm=tiny_lm(), max_updates=8, **opts)
    _check_files(first)
    assert first["progress"]["updates"] >= 8
    second = run("integrity", lm=tiny_lm(), max_updates=30, **opts)  # continues from the checkpoint
    assert second["progress"]["updates"] >= 30 and second["progress"]["passes_completed"] >= 1
    assert len(second["timing"]["sessions"]) == 2 and second["timing"]["sessions"][1]["updates_from"] == first["progress"]["updates"]
    assert not second["health_summary"]["nonfinite_ever"]
    straight = run("integrity", lm=tiny_lm(), max_updates=30, **{**opts, "workdir": tmp_path / "w2"})
    assert straight["curve"] == second["curve"] and straight["accuracy"] == second["accuracy"]
    # the resumed pool is bit-identical to the uninterrupted one: same health at the same updates
    assert [(h["updates"], h["layer_norm"]) for h in straight["health"]] == [(h["updates"], h["layer_norm"]) for h in second["health"]]
    with pytest.raises(ValueError, match="different settings"):
        run("integrity", lm=tiny_lm(), max_updates=31, **{**opts, "seed": 9})


def test_editing_end_to_end(data, tmp_path):
    opts = dict(facts="toy_facts", edits=4, batch_size=12, max_new_tokens=3, ft_steps=2, seed=1)
    a = run("editing", lm=tiny_lm(), out=tmp_path / "a", **opts)
    on_disk = _check_files(a)
    assert set(on_disk["methods"]) == {"no_edit", "memoryllm", "memoryllm_sequence", "ike", "ft_l", "ft_l_sequence"}
    for m in on_disk["methods"].values():
        for kind in ("generation", "probability"):
            assert 0 <= m[kind]["score"] <= 1 and m[kind]["efficacy"]["n"] == 4
    b = run("editing", lm=tiny_lm(), out=tmp_path / "b", **opts)
    assert _strip(a) == _strip(b)
    lm = tiny_lm()
    before = lm.model.state_dict()["model.layers.0.mlp.down_proj.weight"].clone()
    run("editing", lm=lm, out=tmp_path / "c", methods="ft_l", ft_layer=0, **{k: v for k, v in opts.items()})
    assert (lm.model.state_dict()["model.layers.0.mlp.down_proj.weight"] == before).all()  # FT-L restores the weights
    with pytest.raises(ValueError, match="unknown editing method"):
        run("editing", lm=lm, methods="rome", facts="toy_facts", edits=2)


def test_longqa_and_longbench(data, tmp_path):
    opts = dict(dataset="toy_qa", questions=3, lengths=[80, 160], window=64, chunk_tokens=32, bm25_tokens=48, bm25_chunk_tokens=16, max_new_tokens=4, batch_size=2, seed=2)
    a = run("longqa", lm=tiny_lm(), out=tmp_path / "a", **opts)
    on_disk = _check_files(a)
    assert set(on_disk["methods"]) == {"memoryllm", "truncated", "full", "bm25"}
    for m in on_disk["methods"].values():
        assert set(m) == {"80", "160"} and 0 <= m["80"]["f1"]["mean"] <= 1
    assert on_disk["per_question"]["memoryllm"]["160"][0]["doc_tokens"] <= 160
    assert on_disk["complete"] is True and on_disk["options"]["window"] == 64
    b = run("longqa", lm=tiny_lm(), out=tmp_path / "b", **opts)
    assert _strip(a) == _strip(b)
    # LongBench files: run, write predictions, score
    lb = tmp_path / "hotpotqa.jsonl"
    with open(lb, "w") as f:
        for r in _qa_rows(3):
            f.write(json.dumps({"input": r["question"], "context": r["context"] * 4, "answers": [r["answer"]], "length": 90, "dataset": "hotpotqa", "_id": r["id"]}) + "\n")
    res = run("longbench", lm=tiny_lm(), data=[str(lb)], predictions_dir=str(tmp_path / "pred"), out=tmp_path / "lb", chunk_tokens=32, max_new_tokens=3)
    assert res["scores"]["hotpotqa"]["n"] == 3
    pred = tmp_path / "p.jsonl"
    pred.write_text(json.dumps({"pred": "The Paris", "answers": ["paris"], "length": 5000}) + "\n" + json.dumps({"pred": "x", "answers": ["y"], "length": 100}) + "\n")
    s = run("longbench-score", predictions=[str(pred)])
    assert s["scores"]["p"]["f1"] == 50.0 and s["scores"]["p"]["by_length"] == {"0-4k": 0.0, "4-8k": 100.0}
    with pytest.raises(DataError):
        run("longbench", lm=tiny_lm(), data=[str(tmp_path / "missing.jsonl")])


def test_cli_eval_parser():
    from latentmem.cli import build_parser

    args = build_parser().parse_args(["eval", "retention", "--rows", "3", "--steps", "2"])
    assert args.command == "eval" and args.eval_task == "retention" and args.rows == 3 and callable(args.handler)
    assert args.trained and not build_parser().parse_args(["eval", "longqa", "--untrained"]).trained
    # --untrained names the embedded default's base model; a local folder has no shipped weights
    with pytest.raises(ValueError, match="untrained"):
        run("longqa", model="/some/folder", trained=False)
    with pytest.raises(ValueError, match="weights"):
        run("longqa", model="/some/folder", weights="w.safetensors")
    with pytest.raises(ValueError, match="contradict"):
        run("longqa", trained=False, weights="w.safetensors")


def test_unknown_task_and_dataset(data):
    with pytest.raises(ValueError, match="unknown evaluation task"):
        run("nope")
    with pytest.raises(DataError, match="unknown dataset"):
        run("retention", lm=tiny_lm(), dataset="does_not_exist")


def test_trained_models_are_evaluated_on_held_out_rows_only(data):
    from latentmem.eval.data import eval_rows_only, is_heldout, load_qa

    every = load_qa("toy_qa", shuffle=False)
    held = load_qa("toy_qa", shuffle=False, heldout_only=True)
    assert [r["id"] for r in held] == [r["id"] for r in every if is_heldout(r["id"])]
    lm = tiny_lm()
    assert not eval_rows_only(lm)  # an untrained model may use every row
    lm.model.applied_weights = {"file": "trained.safetensors"}
    assert eval_rows_only(lm)
