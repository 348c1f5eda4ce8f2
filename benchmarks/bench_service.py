"""Load benchmark of the HTTP service on the embedded default model (SmolLM2-135M-Instruct).

    .venv/bin/python benchmarks/bench_service.py                       # ~8 minutes
    .venv/bin/python benchmarks/bench_service.py --seconds 30 --clients 4

For each scenario (generate only; mixed 20% inject / 80% generate) the service runs twice as a
separate process (`memoryllm serve` on loopback): micro-batching on (--max-batch 8) and off
(--max-batch 1: one generation at a time). Closed-loop clients, one user (memory pool) each,
send requests for a bounded time. Printed: requests/s, p50/p95/p99 latency per kind, the mean
generate batch size (from /metrics), and the ratio batching-on / batching-off.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_file import OUT, recorded

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "wikipedia_articles.jsonl"
QUESTIONS = ["What is this about?", "Summarise what you remember.", "Who is mentioned?", "When did it happen?"]


def passages(n: int, words: int = 120) -> list[str]:
    """n passages of ~words words of real text (about 1.3 tokens per word)."""
    out = []
    with open(DATA) as f:
        for line in f:
            w = json.loads(line)["text"].split()
            for i in range(0, len(w) - words, words):
                out.append(" ".join(w[i : i + words]))
                if len(out) == n:
                    return out
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


async def run_clients(url: str, key: str, clients: int, seconds: float, inject_share: float, texts: list[str], max_new_tokens: int) -> dict:
    lat = {"inject": [], "generate": []}
    errors = []
    deadline = time.monotonic() + seconds

    async def client(k: int):
        rng = random.Random(k)
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600) as http:
            while time.monotonic() < deadline:
                kind = "inject" if rng.random() < inject_share else "generate"
                body = {"text": rng.choice(texts), "source": "bench"} if kind == "inject" else {"prompt": rng.choice(QUESTIONS), "max_new_tokens": max_new_tokens}
                t0 = time.perf_counter()
                r = await http.post(f"/v1/memories/user{k}/{kind}", json=body)
                if r.status_code != 200:
                    errors.append(f"{kind} {r.status_code} {r.text[:200]}")
                    continue
                lat[kind].append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(clients)))
    return {"lat": lat, "elapsed": time.perf_counter() - t0, "errors": errors}


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def run_config(args, scenario: str, inject_share: float, max_batch: int, texts: list[str]) -> dict:
    from latentmem.store.service import KeyStore

    data = tempfile.mkdtemp(prefix="bench_service_", dir=args.workdir)
    keys = KeyStore(data)
    key = keys.create("bench")[1]
    keys.close()
    port = free_port()
    cmd = [sys.executable, "-m", "latentmem.cli", "serve", "--data", data, "--port", str(port), "--max-batch", str(max_batch),
           "--batch-wait-ms", str(args.batch_wait_ms), "--threads", str(args.threads)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None:
                raise RuntimeError(f"server exited: {server.stderr.read()}")
            time.sleep(0.5)
        h = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=url, headers=h, timeout=600) as http:
            for k in range(args.clients):  # every user starts with one passage in memory
                http.post("/v1/memories", json={"name": f"user{k}", "seed": k}).raise_for_status()
                http.post(f"/v1/memories/user{k}/inject", json={"text": texts[k % len(texts)]}).raise_for_status()
                http.post(f"/v1/memories/user{k}/generate", json={"prompt": "Hi", "max_new_tokens": 1}).raise_for_status()  # warm caches
            before = http.get("/metrics").text
        res = asyncio.run(run_clients(url, key, args.clients, args.seconds, inject_share, texts, args.max_new_tokens))
        after = httpx.get(f"{url}/metrics").text
        d = lambda n: metric(after, n) - metric(before, n)
        res["mean_batch"] = d("latentmem_generate_batched_rows_total") / max(d("latentmem_generate_batches_total"), 1)
        with httpx.Client(base_url=url, headers=h, timeout=600) as http:  # the ledger agrees with what was acknowledged
            ledger = sum(len([e for e in http.get(f"/v1/memories/user{k}/ledger").json()["entries"] if e["kind"] == "inject"]) for k in range(args.clients))
        res["ledger_ok"] = ledger == args.clients + len(res["lat"]["inject"])
    finally:
        server.terminate()
        server.wait(timeout=60)
        import shutil

        shutil.rmtree(data, ignore_errors=True)
    res.update(scenario=scenario, max_batch=max_batch)
    return res


def row(r: dict) -> str:
    n = {k: len(v) for k, v in r["lat"].items()}
    ms = lambda k, q: pct(r["lat"][k], q) * 1000
    cells = [r["scenario"], str(r["max_batch"]), f"{sum(n.values()) / r['elapsed']:.2f}", f"{n['generate'] / r['elapsed']:.2f}", str(n["generate"])]
    cells += [f"{ms('generate', q):.0f}" for q in (50, 95, 99)]
    cells += [str(n["inject"])] + ([f"{ms('inject', q):.0f}" for q in (50, 95, 99)] if n["inject"] else ["-"] * 3)
    cells += [f"{r['mean_batch']:.2f}", str(len(r["errors"])), "yes" if r["ledger_ok"] else "NO"]
    return "| " + " | ".join(cells) + " |"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=90)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--batch-wait-ms", type=float, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server (1: the CPU is shared)")
    ap.add_argument("--scenarios", default="generate,mixed")
    ap.add_argument("--workdir", default=None, help="where the temporary data directories go")
    ap.add_argument("--json", default=None, help="also write the raw results here")
    ap.add_argument("--out", default=str(OUT / "service.md"), help="Markdown file for the tables, headed by the command and the date")
    args = ap.parse_args()
    with recorded(Path(args.out), "Service load benchmark (benchmarks/bench_service.py)"):
        return run(args)


def run(args) -> int:
    texts = passages(64)
    shares = {"generate": 0.0, "mixed": 0.2}
    results = []
    for scenario in args.scenarios.split(","):
        for mb in (args.max_batch, 1):
            print(f"running {scenario} max_batch={mb} for {args.seconds:.0f} s ...", file=sys.stderr, flush=True)
            results.append(run_config(args, scenario, shares[scenario], mb, texts))
            for e in results[-1]["errors"][:3]:
                print("  error:", e, file=sys.stderr)

    print(f"\n{args.clients} clients (one memory each), {args.seconds:.0f} s per row, max_new_tokens={args.max_new_tokens}, "
          f"batch wait {args.batch_wait_ms:g} ms, {args.threads} torch thread(s), {os.cpu_count()} CPUs (shared)\n")
    print("| scenario | max batch | req/s | generate/s | generates | gen p50 ms | gen p95 ms | gen p99 ms | injects | inj p50 ms | inj p95 ms | inj p99 ms | mean batch | errors | ledger = acks |")
    print("|" + "---|" * 15)
    for r in results:
        print(row(r))
    print("\n| scenario | generate/s on/off | gen p50 on/off | gen p95 on/off | req/s on/off |")
    print("|---|---|---|---|---|")
    for scenario in args.scenarios.split(","):
        on, off = [r for r in results if r["scenario"] == scenario]
        rate = lambda r, k=None: (len(r["lat"][k]) if k else sum(map(len, r["lat"].values()))) / r["elapsed"]
        p = lambda r, q: pct(r["lat"]["generate"], q)
        print(f"| {scenario} | {rate(on, 'generate') / rate(off, 'generate'):.2f}x | {p(on, 50) / p(off, 50):.2f} | {p(on, 95) / p(off, 95):.2f} | {rate(on) / rate(off):.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
