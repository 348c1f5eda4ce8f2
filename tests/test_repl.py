"""`memoryllm chat`, driven line by line through input() on a tiny checkpoint: the /commands,
refusal of unknown ones, Ctrl-C during an answer and at the prompt, Ctrl-D, readline history."""

from __future__ import annotations

import pytest
import torch
from conftest import CORPUS, make_tokenizer, tiny_model

import latentmem.generate
from latentmem.cli import main
from latentmem.memoryllm.checkpoint import save_memoryllm_checkpoint
from latentmem.memoryllm.lm import load
from latentmem.store import MemoryStore

torch.set_num_threads(1)

TEXT = "Alice lives in Zürich and works as an engineer at a bakery café."
QUESTION = "Where does Alice live?"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(save_memoryllm_checkpoint(tiny_model(seed=3), tmp_path_factory.mktemp("ckpt") / "tiny", tokenizer=make_tokenizer()))


def chat(capsys, monkeypatch, lines, *argv):
    """Run `memoryllm chat` on these input lines (an exception instance is raised by input()
    at its turn); returns (exit code, stdout, the lines never read)."""
    feed = iter(lines)

    def fake_input(prompt=""):
        item = next(feed, EOFError())
        if isinstance(item, BaseException):
            raise item
        return item

    monkeypatch.setattr("builtins.input", fake_input)
    code = main(["chat", *argv, "--max-new-tokens", "4"])
    return code, capsys.readouterr().out, list(feed)


def test_commands_on_a_named_memory(capsys, monkeypatch, tmp_path, checkpoint):
    data = str(tmp_path / "d")
    m = ["--model", checkpoint, "--data", data]
    lines = ["/help", "/remember " + TEXT, "/remember hi", "/remember --allow-short hi there", "/remember " + CORPUS[4],
             "/history", "/search zürich", QUESTION, "/forget 2", "/history", "/info", "/quit", "never read"]
    code, out, left = chat(capsys, monkeypatch, lines, *m)
    assert code == 0 and left == ["never read"]
    assert out.splitlines()[0].startswith(f"memoryllm chat on {checkpoint}; memory 'default' in {data} (0 updates)")
    assert "/forget N" in out and "/remember TEXT" in out  # /help
    lm = load(checkpoint)
    assert f"(remembered: {len(lm.encode(TEXT))} tokens, injection #1)" in out
    assert "error: text has 2 tokens" in out and "use /remember --allow-short TEXT" in out
    assert "injection #2)" in out and "injection #3)" in out
    with MemoryStore(data, lm) as store:
        history = store.history("default")
        assert [e.text for e in history if e.kind == "inject"] == [TEXT, None, CORPUS[4]]  # #2 forgotten
        assert [e.source for e in history if e.kind == "inject"] == ["chat"] * 3
        assert [e.allow_short for e in history if e.kind == "inject"] == [False, True, False]
        live = store.memory("default")
    expected = lm.new_memory(seed=0)
    lm.inject(expected, TEXT, injection_id=1)
    lm.inject(expected, CORPUS[4], injection_id=3)
    assert live.equal(expected)  # exact forget of #2
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("#")]
    assert listed == ["#1", "#2", "#3", "#1", "#1", "#2", "#3"]  # /history, /search zürich, /history
    assert "[forgotten]  (forgotten)" in out
    # the question was answered from the memory as it was then (#1, #2, #3), in the default form
    before = lm.new_memory(seed=0)
    lm.inject(before, TEXT, injection_id=1)
    lm.inject(before, "hi there", injection_id=2, allow_short=True)
    lm.inject(before, CORPUS[4], injection_id=3)
    assert "\n" + lm.generate(before, QUESTION, max_new_tokens=4).text + "\n" in out
    assert "memory:         default in " in out and "(2 live injections, 0 snapshots)" in out  # /info


def test_unknown_commands_are_refused_and_never_reach_the_model(capsys, monkeypatch, tmp_path, checkpoint):
    calls = []
    real = latentmem.generate.sample_next
    monkeypatch.setattr(latentmem.generate, "sample_next", lambda *a: calls.append(1) or real(*a))
    code, out, _ = chat(capsys, monkeypatch, ["/bogus what is this?", "/Remember", "/forget x", "/quit"], "--model", checkpoint, "--data", str(tmp_path / "d"))
    assert code == 0 and calls == []
    assert "unknown command /bogus (/help lists the commands" in out
    assert "error: nothing to remember: /remember TEXT" in out and "error: /forget N [--fast]" in out
    # '//' sends a line that starts with '/' as a question
    code, out, _ = chat(capsys, monkeypatch, ["//usr is a folder?", "/quit"], "--model", checkpoint, "--data", str(tmp_path / "d"))
    assert code == 0 and calls


def test_ctrl_c_stops_the_answer_and_the_session_goes_on(capsys, monkeypatch, tmp_path, checkpoint):
    real = latentmem.generate.sample_next
    steps = []

    def interrupted_once(*a):  # Ctrl-C at the 3rd token of the first answer
        steps.append(1)
        if len(steps) == 3:
            raise KeyboardInterrupt
        return real(*a)

    monkeypatch.setattr(latentmem.generate, "sample_next", interrupted_once)
    lines = ["/remember " + TEXT, QUESTION, QUESTION, "/quit"]
    code, out, left = chat(capsys, monkeypatch, lines, "--model", checkpoint, "--data", str(tmp_path / "d"))
    assert code == 0 and left == []
    lm = load(checkpoint)
    mem = lm.new_memory(seed=0)
    lm.inject(mem, TEXT)
    full = lm.generate(mem, QUESTION, max_new_tokens=4).text
    partial = "".join(list(lm.stream(mem, QUESTION, max_new_tokens=2)))
    answers = out.split("injection #1)\n", 1)[1].splitlines()
    assert answers[0] == partial + " [stopped]"  # what had streamed, then the mark
    assert answers[1] == full  # the next question is answered in full


def test_ctrl_c_at_the_prompt_twice_or_ctrl_d_leaves_cleanly(capsys, monkeypatch, tmp_path, checkpoint):
    m = ["--model", checkpoint, "--data", str(tmp_path / "d")]
    code, out, left = chat(capsys, monkeypatch, [KeyboardInterrupt(), KeyboardInterrupt(), "never read"], *m)
    assert code == 0 and left == ["never read"] and "(Ctrl-C again or Ctrl-D to leave)" in out
    # one Ctrl-C clears the line; the next line is read as usual
    code, out, left = chat(capsys, monkeypatch, [KeyboardInterrupt(), "/help", KeyboardInterrupt(), "/quit", "never read"], *m)
    assert code == 0 and left == ["never read"] and "/remember TEXT" in out
    code, out, left = chat(capsys, monkeypatch, ["/help", EOFError(), "never read"], *m)
    assert code == 0 and left == ["never read"]


def test_reset_asks_first(capsys, monkeypatch, tmp_path, checkpoint):
    data = str(tmp_path / "d")
    m = ["--model", checkpoint, "--data", data]
    code, out, _ = chat(capsys, monkeypatch, ["/reset", "/remember " + TEXT, "/reset", "n", "/reset", "y", "/history", "/quit"], *m)
    assert code == 0
    assert "(the memory is empty already)" in out and "(not reset)" in out
    assert f"reset memory 'default' in {data}: 1 injections and 0 snapshots removed" in out and "(nothing injected yet)" in out


def test_a_memory_file_has_no_history_and_says_where_to_find_one(capsys, monkeypatch, tmp_path, checkpoint):
    memory = tmp_path / "m.safetensors"
    code, out, _ = chat(capsys, monkeypatch, ["/remember " + TEXT, "/history", "/search Alice", "/forget 1", "/quit"], "--model", checkpoint, "--memory", str(memory))
    assert code == 0
    assert out.count("error: a memory file keeps no ledger") == 2 and "memoryllm import" in out
    assert "forgot #1: " in out and "slots reset" in out
    lm = load(checkpoint)
    assert lm.info(lm.load_memory(memory)).used_units == 0


def test_readline_history_is_kept_in_the_state_directory(monkeypatch, tmp_path):
    readline = pytest.importorskip("readline")
    from latentmem.cli.options import history_file
    from latentmem.cli.repl import _readline

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    path = history_file()
    assert path == tmp_path / "state" / "latentmem" / "chat_history"
    readline.clear_history()
    save = _readline(path)
    readline.add_history("When is the launch?")
    save()
    assert path.is_file()
    readline.clear_history()
    _readline(path)  # a new session reads it back
    assert readline.get_history_item(readline.get_current_history_length()) == "When is the launch?"
    readline.clear_history()


def test_forget_fast_and_the_hint_when_exact_forget_cannot_replay(capsys, monkeypatch, tmp_path, checkpoint):
    m = ["--model", checkpoint, "--data", str(tmp_path / "d")]
    lines = ["/remember " + TEXT, "/remember " + CORPUS[4], "/forget 2 --fast", "/forget 1", "/forget 1 --fast", "/forget 1", "/quit"]
    code, out, _ = chat(capsys, monkeypatch, lines, *m)
    assert code == 0
    assert "forgot #2 (its slots reset (fast: later injections may keep traces))" in out
    # the fast forget moved the replay base after #1: exact forget of #1 cannot replay from before it
    assert "exact forget of injection 1 needs a replay from before it" in out and "use /forget 1 --fast" in out
    assert "forgot #1 (its slots reset" in out and "error: injection 1 of memory 'default' was already forgotten" in out
