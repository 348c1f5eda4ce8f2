"""Decode speed against what the hardware allows (issue 21), on the embedded default model.

    .venv/bin/python benchmarks/bench_decode.py                       # all parts, ~10 min on 2 cores
    .venv/bin/python benchmarks/bench_decode.py --sizes 0,2048 --batches 1 --quick
    .venv/bin/python benchmarks/bench_decode.py --llama-python /tmp/llvenv/bin/python --gguf F32.gguf,Q4_1.gguf

Parts, each a table whose ratios compare figures measured in the same run:

(a) tokens/s, batch 1 and batch 8 (aggregate over the rows), at memory sizes N = 0, 512, 2048,
    8192 (K = 128; N = 0 is no memory): this library's ``generate`` / ``generate_batch`` through
    the shared face, transformers' ``generate`` on the same weights with an equal-length (N + 1)
    prefix cache, and the bandwidth bound: the measured memory read bandwidth divided by the
    bytes one step must read (every weight once, plus each row's memory keys/values and its own
    cache). With ``--llama-python`` and ``--gguf``, llama.cpp (llama-cpp-python, installed
    elsewhere: it is a reference, not a dependency) on the same model's GGUF files, with an
    equal prefix of N + 1 tokens evaluated first.
(b) precision, batch 1 at one N: fp32, bf16 weights, and int8 weight-only (``quantize="int8"``)
    — tokens/s, weights in bytes, and the answers' agreement with fp32.
(c) where a step's time goes: torch.profiler over decode steps at one N, by operator.
(d) the int8 path's effect on recall from memory, against fp32 on the same held-out rows.

Results: results/benchmarks/decode.md (command, date, machine, commit).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import latentmem

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import _StepTimes, corpus_text, corpus_tokens, filled_memory, table  # noqa: E402
from results_file import OUT, recorded  # noqa: E402

K = 128
PROMPT_TOKENS = 32


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes/s of a streaming read (``sum`` over a tensor far larger than the caches), best of
    ``repeats``, with this process's torch threads: what a decode step's weight reads can reach."""
    x = torch.ones(int(gib * 2**30) // 4)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return x.numel() * 4 / best


def step_bytes(lm, memories: list, context_tokens: int) -> int:
    """Bytes one decode step must read at least: the weights once, each row's memory keys/values
    (``read_cache_bytes``) and its prompt + generated cache."""
    info = lm.info()
    per_token = info.details["kv_bytes_per_token"]
    total = info.details["weights_bytes"]
    for m in memories:
        total += (lm.info(m).details["read_cache_bytes"] if m is not None else 0) + context_tokens * per_token
    return total


def load(n: int, **kw):
    return latentmem.load(num_tokens=K, num_blocks=max(1, n // K), **kw)


def ours_tps(lm, memories, prompt: str, new_tokens: int) -> tuple[float, list[str]]:
    gens = lm.generate_batch(memories, [prompt] * len(memories), chat=False, max_new_tokens=new_tokens, temperature=0.0, repeat_limit=0, stop=[])
    steps = min(len(g.token_ids) for g in gens) - 1
    return len(memories) * steps / max(g.decode_seconds for g in gens), [g.text for g in gens]


class HFReference:
    """transformers' LlamaForCausalLM on the same weights; a real prefix cache of N + 1 tokens."""

    def __init__(self, tokenizer, dtype=torch.float32):
        from transformers import LlamaForCausalLM

        from latentmem.loading import default_model_dir

        self.hf = LlamaForCausalLM.from_pretrained(default_model_dir(), dtype=dtype).eval()
        self.tokenizer = tokenizer
        self._prefix: tuple[int, torch.Tensor, list] | None = None

    def _prefix_cache(self, n: int):
        """(prefix ids [1, n + 1], per-layer (keys, values)) of n + 1 tokens of text, computed once per n."""
        if self._prefix is None or self._prefix[0] != n:
            ids = torch.tensor([corpus_tokens(self.tokenizer, n + 1 + PROMPT_TOKENS)[: n + 1]])
            with torch.inference_mode():
                cache = self.hf(ids, use_cache=True).past_key_values
            self._prefix = (n, ids, [(layer.keys, layer.values) for layer in cache.layers])
        return self._prefix[1], self._prefix[2]

    def tps(self, n: int, batch: int, prompt_ids: torch.Tensor, new_tokens: int) -> float:
        from transformers import DynamicCache

        ids = prompt_ids.repeat(batch, 1)
        cache = DynamicCache()
        if n:
            prefix, layers = self._prefix_cache(n)
            for i, (k, v) in enumerate(layers):  # every row the same prefix (computed for one row)
                cache.update(k.repeat(batch, 1, 1, 1), v.repeat(batch, 1, 1, 1), i)
            ids = torch.cat([prefix.repeat(batch, 1), ids], 1)
        streamer = _StepTimes()
        with torch.inference_mode():
            self.hf.generate(ids, past_key_values=cache, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=streamer, pad_token_id=0)
        t = streamer.times
        return batch * (len(t) - 1) / (t[-1] - t[0])


LLAMA_CHILD = r"""
import json, sys, time
from llama_cpp import Llama
gguf, n, new, threads, prefix_text, prompt_text = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
llm = Llama(model_path=gguf, n_ctx=n + 1 + 64 + new + 16, n_threads=threads, n_batch=512, verbose=False)
prefix = llm.tokenize(prefix_text.encode(), add_bos=False, special=False)[: n + 1] if n else []
prompt = llm.tokenize(prompt_text.encode(), add_bos=False, special=False)
out = []
for rep in range(3):
    llm.reset()
    llm.eval(prefix + prompt)
    times = []
    for _ in range(new):
        tok = llm.sample(temp=0.0)
        llm.eval([tok])
        times.append(time.perf_counter())
    out.append((len(times) - 1) / (times[-1] - times[0]))
print(json.dumps(sorted(out)[1]))
"""


def llama_tps(python: str, gguf: str, n: int, new_tokens: int, threads: int, prefix_text: str, prompt_text: str) -> float:
    r = subprocess.run([python, "-c", LLAMA_CHILD, gguf, str(n), str(new_tokens), str(threads), prefix_text, prompt_text], capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"llama.cpp run failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def part_a(args, bandwidth: float) -> None:
    rows = []
    hf = None
    for n in args.sizes:
        lm = load(n)
        if hf is None:
            hf = HFReference(lm.tokenizer)
        prompt_ids = torch.tensor([corpus_tokens(lm.tokenizer, PROMPT_TOKENS)])
        prompt = lm.tokenizer.decode(prompt_ids[0].tolist())
        for batch in args.batches:
            memories = [filled_memory(lm, seed=i) for i in range(batch)] if n else [None] * batch
            context = PROMPT_TOKENS + args.new_tokens // 2  # the cache's mean length over the steps
            bound = bandwidth / step_bytes(lm, memories, context) * batch
            ours_tps(lm, memories, prompt, 4)  # warm-up: computes each memory's keys/values once
            hf.tps(n, batch, prompt_ids, 4)
            pairs = [(ours_tps(lm, memories, prompt, args.new_tokens)[0], hf.tps(n, batch, prompt_ids, args.new_tokens)) for _ in range(args.repeats)]
            ours = statistics.median(p[0] for p in pairs)
            theirs = statistics.median(p[1] for p in pairs)
            row = [n, batch, ours, theirs, ours / theirs, bound, ours / bound]
            if args.llama_python and batch == 1:
                prefix_text = corpus_text(lm, n + 1 + PROMPT_TOKENS) if n else ""
                for gguf in args.gguf:
                    row.append(llama_tps(args.llama_python, gguf, n, args.new_tokens, args.threads, prefix_text, prompt))
            rows.append(row)
            memories = None
            gc.collect()
        lm = None
        gc.collect()
    header = ["N", "batch", "latentmem tok/s", "transformers generate tok/s", "vs transformers", "bandwidth bound tok/s", "of the bound"]
    header += [f"llama.cpp {Path(g).name} tok/s" for g in (args.gguf if args.llama_python else [])]
    table(f"(a) decode speed, greedy, {args.new_tokens} new tokens, prompt {PROMPT_TOKENS} tokens, {args.threads} threads (read bandwidth {bandwidth / 1e9:.1f} GB/s)", header, rows)


def part_b(args, bandwidth: float) -> None:
    n = args.precision_n
    rows, reference = [], None
    for label, options in (("fp32", {}), ("bf16", {"dtype": torch.bfloat16}), ("int8 weight-only, bf16 activations", {"quantize": "int8"})):
        lm = load(n, **options)
        prompt = lm.tokenizer.decode(corpus_tokens(lm.tokenizer, PROMPT_TOKENS))
        memories = [filled_memory(lm)] if n else [None]
        weights = lm.info().details["weights_bytes"]
        ours_tps(lm, memories, prompt, 4)
        tps = statistics.median(ours_tps(lm, memories, prompt, args.new_tokens)[0] for _ in range(args.repeats))
        text = ours_tps(lm, memories, prompt, args.new_tokens)[1][0]
        reference = reference if reference is not None else text
        same = sum(a == b for a, b in zip(reference.split(), text.split())) / max(len(reference.split()), 1)
        rows.append([label, tps, weights / 1e6, f"{same:.2f}"])
        lm = memories = None
        gc.collect()
    table(f"(b) precision at N={n}, batch 1 ({args.new_tokens} tokens; 'same words': the share of fp32's greedy answer's words the answer repeats in place)", ["weights", "tok/s", "weights MB", "same words as fp32"], rows)


def part_c(args) -> None:
    from torch.profiler import ProfilerActivity, profile

    n = args.precision_n
    lm = load(n)
    prompt = lm.tokenizer.decode(corpus_tokens(lm.tokenizer, PROMPT_TOKENS))
    memories = [filled_memory(lm)] if n else [None]
    ours_tps(lm, memories, prompt, 4)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        tps, _ = ours_tps(lm, memories, prompt, args.new_tokens)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    rows = [[e.key, e.count, e.self_cpu_time_total / 1e3, f"{100 * e.self_cpu_time_total / total:.1f}%"] for e in top]
    table(f"(c) where the time goes: N={n}, batch 1, {args.new_tokens} tokens (profiled run: {tps:.1f} tok/s, the profiler's own cost included)", ["operator", "calls", "self ms", "share"], rows)


def part_d(args) -> None:
    """Recall from memory under each precision, on the same held-out rows: the retention task's
    first step (each row's context written into a fresh pool, its question asked; no filler)."""
    import tempfile

    from latentmem.eval.retention import run_retention

    rows = []
    for label, options in (("fp32", {}), ("int8 weight-only, bf16 activations", {"quantize": "int8"})):
        lm = latentmem.load(**options)
        with tempfile.TemporaryDirectory() as tmp:
            r = run_retention(lm, rows=args.recall_rows, steps=1, context_in_prompt=False, plot=False, out=tmp, seed=0)
        hit = r["steps"][0]["hit"]
        lp = r["steps"][0]["answer_logprob"]
        rows.append([label, f"{100 * hit['mean']:.1f}% [{100 * hit['ci95'][0]:.1f}, {100 * hit['ci95'][1]:.1f}]", hit["n"], f"{lp['mean']:.3f}"])
        lm = None
        gc.collect()
    table(f"(d) recall from memory under each precision: counterfactual_qa held-out rows, context written into a fresh pool (N=512, shipped weights), greedy 10 tokens; Wilson 95% intervals", ["weights", "answer in output", "rows", "mean answer log-prob"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="0,512,2048,8192", help="memory sizes N (0: no memory)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parts", default="abcd")
    ap.add_argument("--recall-rows", type=int, default=100, help="held-out rows for part (d)")
    ap.add_argument("--precision-n", type=int, default=2048, help="N for parts (b) and (c)")
    ap.add_argument("--quick", action="store_true", help="16 new tokens, 2 repeats")
    ap.add_argument("--llama-python", default=None, help="a Python with llama-cpp-python installed (outside this project)")
    ap.add_argument("--gguf", default="", help="comma-separated GGUF files of the default model for llama.cpp")
    ap.add_argument("--out", default=str(OUT / "decode.md"))
    args = ap.parse_args()
    args.sizes = [int(x) for x in args.sizes.split(",")]
    args.batches = [int(x) for x in args.batches.split(",")]
    args.gguf = [g for g in args.gguf.split(",") if g]
    if args.llama_python and not args.gguf:
        ap.error("--llama-python needs --gguf")
    if args.quick:
        args.new_tokens, args.repeats = 16, 2
    torch.set_num_threads(args.threads)
    with recorded(Path(args.out), "Decode speed against the bandwidth bound (benchmarks/bench_decode.py)"):
        bandwidth = read_bandwidth()
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}; streaming read bandwidth {bandwidth / 1e9:.1f} GB/s")
        if "a" in args.parts:
            part_a(args, bandwidth)
        if "b" in args.parts:
            part_b(args, bandwidth)
        if "c" in args.parts:
            part_c(args)
        if "d" in args.parts:
            part_d(args)


if __name__ == "__main__":
    main()
