"""Benchmarks write what they print to results/benchmarks/ as Markdown, headed by the command,
the date, the machine and the commit, so a table on a docs page can name the file it came from."""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "benchmarks"


def _commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT, timeout=10, check=False
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=10,
            check=False,
        ).stdout.strip()
        return head + (" (with uncommitted changes)" if dirty else "") if head else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, s: str) -> int:
        for st in self.streams:
            st.write(s)
        return len(s)

    def flush(self) -> None:
        for st in self.streams:
            st.flush()


@contextlib.contextmanager
def recorded(path: Path, title: str):
    """Everything printed on stdout inside goes to the terminal and, at the end (also after an
    error), to `path` under a header with the command, the date and the machine."""
    started = datetime.datetime.now(datetime.UTC)
    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    buf = io.StringIO()
    real = sys.stdout
    sys.stdout = _Tee(real, buf)
    ok = False
    try:
        yield
        ok = True
    finally:
        sys.stdout = real
        load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        argv = [
            Path(sys.argv[0]).resolve().relative_to(ROOT).as_posix()
            if Path(sys.argv[0]).resolve().is_relative_to(ROOT)
            else sys.argv[0],
            *sys.argv[1:],
        ]
        head = [
            f"# {title}",
            "",
            f"- command: `python {shlex.join(argv)}`",
            f"- date: {started:%Y-%m-%d %H:%M} UTC ({(datetime.datetime.now(datetime.UTC) - started).total_seconds():.0f} s)"
            + ("" if ok else "; **stopped before the end**"),
            f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, load average {load0:.1f} -> {load1:.1f}",
            f"- commit: {_commit()}",
            "",
        ]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text("\n".join(head) + "\n" + buf.getvalue().strip("\n") + "\n")
        tmp.replace(path)
        print(f"\nwritten: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}", file=sys.stderr)
