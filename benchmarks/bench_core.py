"""Core speed and memory benchmark on the embedded default model (SmolLM2-135M-Instruct).

    .venv/bin/python benchmarks/bench_core.py            # all parts, about 5-8 minutes on 2 CPU cores
    .venv/bin/python benchmarks/bench_core.py --quick    # fewer sizes and repeats

Every part prints a table whose ratios compare against a baseline measured in the same run:

(a) injection time for N = 512 .. 16,384 memory tokens at fixed K=256 and a 256-token context
    (the paper claims it does not depend on N): ratio largest/smallest N, target <= 1.15;
(b) decode tokens/s reading a memory of N tokens vs transformers' ``generate`` on the same
    weights with an equal-length (N + 1) prefix KV cache: target >= 0.9x;
(c) time to answer a question after injecting T tokens into memory vs with the same T tokens
    in the prompt, T up to ~8k;
(d) peak RSS of a fresh process that loads the model, fills a pool and answers, against the
    sum of weights + pool + memory keys/values + decode cache;
(e) separate write/read LoRA adapters (rank 8 on q/k/v/o/gate/up/down): decode tokens/s and
    injection time with both adapters as peft branches, and with the reader merged into the
    weights (the default on load), against the plain base model.

Everything is measured through the shared interface (``latentmem.api.MemoryModel``: ``inject``'s
``InjectResult.seconds``, ``generate``'s ``Generation`` timings, sizes from ``info``); the one
set-up that only exists inside MemoryLLM, attaching random adapters for (e), is
``latentmem.memoryllm.bench.with_random_adapters``. The N and K knobs are MemoryLLM's load options.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import latentmem

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import OUT, recorded

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
QUESTION = "Summarise the text above in one sentence."


def corpus_tokens(tokenizer, n: int) -> list[int]:
    """n tokens of real text (Wikipedia articles from the shared data), not random ids."""
    ids: list[int] = []
    with open(DATA / "wikipedia_articles.jsonl") as f:
        for line in f:
            ids += tokenizer(json.loads(line)["text"], add_special_tokens=False)["input_ids"]
            if len(ids) >= n:
                return ids[:n]
    raise RuntimeError(f"not enough text in {DATA} for {n} tokens")


def corpus_text(lm, n: int) -> str:
    """About n tokens of real text (decoding and encoding again may move the count by a token)."""
    return lm.tokenizer.decode(corpus_tokens(lm.tokenizer, n))


def filled_memory(lm, seed: int = 0):
    """A written memory: one injection of real text (MemoryLLM tiles an empty pool with its new
    tokens, so every slot then holds real hidden states and later writes take the drop path)."""
    state = lm.new_memory(seed)
    lm.inject(state, corpus_text(lm, 256), allow_short=True, progress=False)
    return state


def peak_rss() -> int:
    """This process's own peak resident set in bytes (VmHWM; ru_maxrss would include the parent's
    peak, which Linux carries across fork + exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: kilobytes elsewhere too


def table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(f"{x:.3g}" if isinstance(x, float) else str(x) for x in r) + " |")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------
# (a) injection time vs N
# ---------------------------------------------------------------------------------------------
def bench_inject(sizes: list[int], k: int, context: int, repeats: int) -> None:
    # One model per N, timed round-robin (N1, N2, ..., N1, N2, ...) so a burst of load from other
    # processes hits every size alike instead of skewing one of them.
    updates = []
    for n in sizes:
        lm = latentmem.load(num_tokens=k, num_blocks=n // k)
        state = filled_memory(lm)
        text = corpus_text(lm, context)  # one chunk: one self-update per inject
        updates.append(lambda lm=lm, state=state, text=text: lm.inject(state, text, allow_short=True, progress=False))
    times: list[list[float]] = [[] for _ in sizes]
    tokens = [0] * len(sizes)
    for u in updates:
        u()  # warm-up
    for _ in range(repeats):
        for i, u in enumerate(updates):
            r = u()
            # InjectResult.seconds: the writes alone (tokenising and validation excluded)
            times[i].append(r.seconds / r.num_chunks)
            tokens[i] = r.num_tokens
    rows = [[n, k, tok, statistics.median(t) * 1000, min(t) * 1000] for n, tok, t in zip(sizes, tokens, times)]
    del updates
    gc.collect()
    for r in rows:
        r.append(r[3] / rows[0][3])
    table("(a) one self-update (inject) vs pool size N", ["N", "K", "context tokens", "ms / update (median)", "ms (min)", "median ratio to smallest N"], rows)
    print(f"\nlargest/smallest = {rows[-1][5]:.3f} (target <= 1.15)")


# ---------------------------------------------------------------------------------------------
# (b) decode speed vs transformers generate with an equal-length prefix cache
# ---------------------------------------------------------------------------------------------
class _StepTimes:
    """A transformers streamer that records when each generated token arrives."""

    def __init__(self):
        self.times: list[float] = []
        self.first_put = True

    def put(self, value):
        if self.first_put:  # generate first "puts" the prompt
            self.first_put = False
            return
        self.times.append(time.perf_counter())

    def end(self):
        pass


def bench_decode(sizes: list[int], new_tokens: int, repeats: int) -> None:
    from transformers import DynamicCache, LlamaForCausalLM

    from latentmem.loading import default_model_dir

    hf = LlamaForCausalLM.from_pretrained(default_model_dir(), torch_dtype=torch.float32).eval()
    rows = []
    early = []
    for n in sizes:
        lm = latentmem.load(num_tokens=min(256, n), num_blocks=max(1, n // 256))
        prompt = torch.tensor([corpus_tokens(lm.tokenizer, 32)])
        prompt_text = lm.tokenizer.decode(prompt[0].tolist())
        state = filled_memory(lm)

        def ours() -> float:
            # the memory's keys/values are computed once per memory version (the warm-up) and
            # reused; tokens_per_second counts the steps after the first token, as below
            g = lm.generate(state, prompt_text, chat=False, max_new_tokens=new_tokens, temperature=0.0)
            if len(g.token_ids) < new_tokens:
                early.append((n, len(g.token_ids)))
            return g.tokens_per_second

        # transformers: a real KV cache of N + 1 tokens (bos + memory length), then the prompt.
        prefix_ids = torch.tensor([corpus_tokens(lm.tokenizer, n + 1 + 32)[: n + 1]])
        with torch.inference_mode():
            hf_cache = hf(prefix_ids, use_cache=True).past_key_values

        def theirs() -> float:
            cache = DynamicCache()
            for layer in range(len(hf_cache.layers)):
                cache.update(hf_cache.layers[layer].keys.clone(), hf_cache.layers[layer].values.clone(), layer)
            streamer = _StepTimes()
            ids = torch.cat([prefix_ids, prompt], 1)
            with torch.inference_mode():
                hf.generate(ids, past_key_values=cache, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, streamer=streamer, pad_token_id=0)
            t = streamer.times
            return (len(t) - 1) / (t[-1] - t[0])

        ours(), theirs()  # warm-up
        pairs = [(ours(), theirs()) for _ in range(repeats)]  # interleaved: load bursts hit both
        ours_tps = statistics.median(p[0] for p in pairs)
        hf_tps = statistics.median(p[1] for p in pairs)
        rows.append([n, new_tokens, ours_tps, hf_tps, ours_tps / hf_tps])
        lm = state = hf_cache = None  # freed before the next size (not del: the closures above name them)
        gc.collect()
    table("(b) decode speed, batch 1, greedy", ["N (memory / prefix tokens)", "new tokens", "memoryllm tok/s", "transformers generate tok/s", "ratio"], rows)
    if early:  # generate stops at EOS; transformers is held to min_new_tokens
        print(f"\nnote: memoryllm stopped at EOS before {new_tokens} tokens in {len(early)} run(s) (N, tokens): {sorted(set(early))}")


# ---------------------------------------------------------------------------------------------
# (c) answer time: T tokens in memory vs T tokens in the prompt
# ---------------------------------------------------------------------------------------------
def bench_answer(lengths: list[int], new_tokens: int) -> None:
    lm = latentmem.load()  # the default memory shape (K=128, N=2048)
    rows = []
    for T in lengths:
        ids = corpus_tokens(lm.tokenizer, T)
        text = lm.tokenizer.decode(ids)
        state = lm.new_memory(0)
        t0 = time.perf_counter()
        lm.inject(state, text, progress=False)
        inject_s = time.perf_counter() - t0
        first = lm.generate(state, QUESTION, max_new_tokens=new_tokens)  # computes memory K/V once
        again = lm.generate(state, QUESTION, max_new_tokens=new_tokens)  # reuses them
        in_prompt = lm.generate(None, text + "\n\n" + QUESTION, max_new_tokens=new_tokens)
        mem_first = first.prefill_seconds + first.decode_seconds
        mem_again = again.prefill_seconds + again.decode_seconds
        prompt_s = in_prompt.prefill_seconds + in_prompt.decode_seconds
        rows.append([T, inject_s, mem_first, mem_again, prompt_s, prompt_s / mem_again])
    table(
        f"(c) time to answer ({new_tokens} new tokens) after T tokens of text",
        ["T tokens", "inject s (once)", "memory: first answer s", "memory: later answers s", "in prompt: answer s", "prompt / memory"],
        rows,
    )


# ---------------------------------------------------------------------------------------------
# (d) peak RSS in a fresh process
# ---------------------------------------------------------------------------------------------
def rss_probe(n: int, k: int, new_tokens: int) -> None:
    lm = latentmem.load(num_tokens=k, num_blocks=n // k)
    state = lm.new_memory(0)
    lm.inject(state, lm.tokenizer.decode(corpus_tokens(lm.tokenizer, 2 * k)), progress=False)
    g = lm.generate(state, QUESTION, max_new_tokens=new_tokens)
    info = lm.info(state)
    d = info.details
    weights = d["weights_bytes"]  # parameters and buffers
    pool = info.memory_bytes  # the memory's tensors (pool, provenance, slot order)
    prefix = d["read_cache_bytes"]  # the memory keys/values a read caches (bos + N per layer)
    decode_cache = prefix + (g.prompt_tokens + new_tokens) * d["kv_bytes_per_token"]  # the cache copies the prefix
    peak = peak_rss()
    print(json.dumps(dict(N=n, weights=weights, pool=pool, prefix=prefix, decode_cache=decode_cache, peak=peak)))


def bench_rss(sizes: list[int], k: int) -> None:
    mb = 2**20
    rows = []
    # The interpreter + torch + transformers baseline, measured the same way.
    base_cmd = [sys.executable, __file__, "--rss-probe", "0"]
    runtime = int(subprocess.run(base_cmd, capture_output=True, text=True, check=True).stdout)
    for n in sizes:
        out = subprocess.run([sys.executable, __file__, "--rss-probe", str(n), "--k", str(k)], capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        accounted = r["weights"] + r["pool"] + r["prefix"] + r["decode_cache"]
        rows.append([n, r["weights"] / mb, r["pool"] / mb, (r["prefix"] + r["decode_cache"]) / mb, runtime / mb, r["peak"] / mb, (r["peak"] - runtime) / accounted])
    table(
        "(d) peak RSS of a process that loads, injects and answers (MiB)",
        ["N", "weights + model buffers", "pool", "memory K/V + decode cache", "python+torch runtime", "peak RSS", "(peak - runtime) / (weights+pool+caches)"],
        rows,
    )


# ---------------------------------------------------------------------------------------------
# (e) separate write/read adapters: peft branches vs the reader merged into the weights
# ---------------------------------------------------------------------------------------------
def bench_adapters(n: int, new_tokens: int, repeats: int) -> None:
    from latentmem.memoryllm.bench import with_random_adapters

    text = " ".join(map(str, range(400)))
    rows = []
    for label in ("plain (base weights)", "write/read adapters, peft branches", "write/read adapters, reader merged"):
        # trained=False: the shipped weights carry adapters of their own; every row starts plain
        lm = latentmem.load(num_tokens=min(256, n), num_blocks=max(1, n // 256), trained=False)
        if "adapters" in label:
            lm = with_random_adapters(lm, merge_read="merged" in label, rank=8, seed=0)
        state = filled_memory(lm)
        prompt_text = corpus_text(lm, 32)

        def tps() -> float:
            # memory keys/values from generate's per-version cache (computed in prefill, which
            # tokens_per_second leaves out)
            return lm.generate(state, prompt_text, chat=False, max_new_tokens=new_tokens, temperature=0.0).tokens_per_second

        def inject() -> float:
            return lm.inject(state, text, progress=False).seconds

        tps(), inject()  # warm-up
        rows.append([label, statistics.median(tps() for _ in range(repeats)), min(inject() for _ in range(repeats))])
        lm = state = None  # freed before the next row (not del: the closures above name them)
        gc.collect()
    base_tps, base_inject = rows[0][1], rows[0][2]
    table(f"(e) separate write/read adapters, N={n}, batch 1", ["weights", "decode tok/s", "vs plain", "inject s (400-token text)", "vs plain"],
          [[r[0], r[1], r[1] / base_tps, r[2], r[2] / base_inject] for r in rows])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    ap.add_argument("--parts", default="abcde", help="which parts to run, e.g. 'ab'")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--rss-probe", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, default=256, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="Markdown file for the tables, headed by the command and the date "
                    "(default: results/benchmarks/core.md for a full run, core_<parts>[_quick].md otherwise)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_probe == 0:  # the interpreter + torch + transformers + memoryllm, nothing loaded
        import transformers  # noqa: F401

        import latentmem.memoryllm  # noqa: F401

        return print(peak_rss())
    if args.rss_probe is not None:
        return rss_probe(args.rss_probe, args.k, 32)
    full = args.parts == "abcde" and not args.quick
    out = Path(args.out) if args.out else OUT / ("core.md" if full else f"core_{args.parts}{'_quick' if args.quick else ''}.md")
    with recorded(out, "Core benchmarks (benchmarks/bench_core.py)"):
        run_parts(args)


def run_parts(args) -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, fp32")
    if "a" in args.parts:
        sizes = [512, 2048, 16384] if args.quick else [512, 1024, 2048, 4096, 8192, 16384]
        bench_inject(sizes, k=256, context=256, repeats=3 if args.quick else 7)
    if "b" in args.parts:
        bench_decode([2048] if args.quick else [512, 2048, 8192], new_tokens=32 if args.quick else 64, repeats=1 if args.quick else 3)
    if "c" in args.parts:
        bench_answer([512, 2048] if args.quick else [512, 1024, 2048, 4096, 7936], new_tokens=16)
    if "d" in args.parts:
        bench_rss([2048] if args.quick else [2048, 16384], k=256)
    if "e" in args.parts:
        bench_adapters(512, new_tokens=32 if args.quick else 64, repeats=2 if args.quick else 5)


if __name__ == "__main__":
    main()
