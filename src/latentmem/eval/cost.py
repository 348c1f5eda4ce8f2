"""Cost (``eval compare``): what remembering ``size`` tokens of text costs each method.

* write latency per token: seconds to make the text readable, over its tokens (``memory``:
  ``inject`` into an empty memory; ``prompt``: tokenising it; ``bm25``: tokenising and indexing
  its chunks; ``none`` remembers nothing);
* answer latency: seconds for one greedy answer of ``max_new_tokens`` tokens, the median of
  ``repeats`` (``memory``: read from the memory; ``prompt``: the text in the prompt, cut to the
  window; ``bm25``: chunk selection plus the answer);
* memory bytes per remembered token: ``info(memory).memory_bytes`` (the memory's tensors) over
  the text's tokens; for ``prompt`` / ``bm25`` the UTF-8 bytes of the text kept;
* peak RSS: the process's peak resident set (``resource.getrusage``) after the measurement. It is
  the peak of the whole process so far (models loaded earlier included), so it bounds what this
  method needs from above; ``rss_mib`` is the resident set just after.
Latencies are wall-clock on the machine that ran them and sit under ``timing``.
"""

from __future__ import annotations

import resource
import statistics
import time

from .common import filler_pool
from .data import load_texts
from .longqa import bm25_select, truncate_middle
from ..text import qa_prompt

METHODS = ("memory", "none", "prompt", "bm25")


def rss_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure_cost(lm, method: str, *, size: int, filler: str = "news_articles", question: str = "What happened?", max_new_tokens: int = 16, repeats: int = 3,
                 bm25_tokens: int = 512, chunk_tokens: int = 64, seed: int = 0) -> dict:
    if method not in METHODS:
        raise ValueError(f"unknown cost method {method!r}; choose from {', '.join(METHODS)}")
    text = filler_pool(lm, load_texts(filler), size, 1, seed)[0]
    tokens = len(lm.encode(text))
    window = lm.info().details["context_window"]
    mem, stored_bytes = None, 0
    t0 = time.perf_counter()
    if method == "memory":
        mem = lm.new_memory(seed=seed)
        lm.inject(mem, text, allow_short=True, progress=False)
        stored_bytes = lm.info(mem).memory_bytes
    elif method in ("prompt", "bm25"):
        lm.encode(text)
        if method == "bm25":
            bm25_select(lm, text, question, 0, chunk_tokens)  # index every chunk (a 0 budget selects one)
        stored_bytes = len(text.encode("utf-8"))
    write_s = time.perf_counter() - t0 if method != "none" else 0.0

    def prompt() -> str:
        if method == "prompt":
            room = window - len(lm.encode(qa_prompt(lm, question, "plain", "x"))) - max_new_tokens
            return qa_prompt(lm, question, "plain", truncate_middle(lm, text, max(16, room)))
        if method == "bm25":
            return qa_prompt(lm, question, "plain", bm25_select(lm, text, question, bm25_tokens, chunk_tokens))
        return qa_prompt(lm, question, "plain")

    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        lm.generate(mem, prompt(), chat=False, max_new_tokens=max_new_tokens, temperature=0.0)
        times.append(time.perf_counter() - t0)
    rss = rss_mib()
    peak = max(peak_rss_mib(), rss)  # the kernel's high-water mark is synced lazily: never below the current RSS
    return {
        "tokens": tokens,
        "memory_bytes": stored_bytes,
        "bytes_per_token": stored_bytes / tokens,
        "read_state_bytes": lm.info(mem).details.get("read_state_bytes", 0) if mem is not None else 0,
        "timing": {"write_seconds_per_token": write_s / tokens, "write_seconds": write_s, "answer_seconds": statistics.median(times), "peak_rss_mib": peak, "rss_mib": rss},
    }
