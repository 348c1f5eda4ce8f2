"""The verbs: each checks its input and its data directory first, then loads the model (the
slow part, only for verbs that run it), then works through ``latentmem.api.MemoryModel`` and
``MemoryStore`` only, so every design gets the same command line."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .memories import StoreMemories, check_free, memories_of
from .options import DEFAULT_NAME, EXIT_MISMATCH, EXIT_OK, CLIError, chat_mode, check_length, check_sampling, default_data_dir, sampling

DEMO_PASSAGE = (
    "Zorblat Industries was founded in 2031 by the engineer Mira Kovac in the town of Lindholm. "
    "The company's first product was a solar-powered bicycle called the Sunrider. "
    "Its headquarters moved to Tallinn in 2035, and its mascot is a purple owl named Pixel."
)
DEMO_QUESTION = "Who founded Zorblat Industries?"


def load_lm(args):
    """(the model the arguments name, seconds it took); --threads applies before the load."""
    import torch

    from .. import load

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    kw = {"dtype": getattr(torch, args.dtype), "device": getattr(args, "device", "cpu")}
    if getattr(args, "num_tokens", None) is not None:
        kw["num_tokens"] = args.num_tokens
    if getattr(args, "num_blocks", None) is not None:
        kw["num_blocks"] = args.num_blocks
    if getattr(args, "threads", None) is not None and args.threads < 1:
        raise CLIError(f"--threads {args.threads}: must be >= 1")
    t0 = time.perf_counter()
    try:
        lm = load(args.model, design=args.design, **kw)
    except Exception as e:
        from safetensors import SafetensorError

        if isinstance(e, (ValueError, OSError, NotImplementedError)):  # one-line errors already (CheckpointError is a ValueError)
            raise
        if isinstance(e, (SafetensorError, EOFError)):  # a truncated weights file (other errors are bugs: their traceback)
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CLIError(f"cannot load the model {args.model or '(embedded)'}: {first} (a truncated or damaged file?)") from None
        raise
    return lm, time.perf_counter() - t0


def read_text(args) -> str:
    if args.file is None:
        return args.text
    data = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{args.file} is not valid UTF-8 (byte {e.start}: {e.reason})") from None


def is_empty(lm, mem) -> bool:
    return mem is None or lm.info(mem).used_units == 0


# ---------------------------------------------------------------------------------------------
# writing and reading
# ---------------------------------------------------------------------------------------------
def cmd_inject(args) -> int:
    text = read_text(args)  # input checked before the (slow) model load
    if not text.strip():
        raise ValueError("text is empty or whitespace only: nothing to inject")
    target = memories_of(args, seed=args.memory_seed)
    target.precheck(must_exist=False)
    lm, _ = load_lm(args)
    t0 = time.perf_counter()
    with target.open(lm):
        iid, tokens, chunks, updates = target.inject(text, allow_short=args.allow_short, source=args.source)
    dest = args.memory or target.label
    print(f"injected #{iid}: {tokens} tokens in {chunks} update(s), {time.perf_counter() - t0:.2f} s -> {dest} (updates: {updates})")
    return EXIT_OK


def cmd_ask(args) -> int:
    check_sampling(args)
    target = memories_of(args)
    target.precheck(must_exist=False)
    lm, _ = load_lm(args)
    check_length(args, lm)
    with target.open(lm):
        mem = target.memory()
    if is_empty(lm, mem):
        print("note: the memory is empty; answering from the base model alone", file=sys.stderr)
    stream = sys.stdout.isatty() if args.stream is None else args.stream
    t0 = time.perf_counter()
    if stream:
        for piece in lm.stream(mem, args.question, chat=chat_mode(args), **sampling(args)):
            print(piece, end="", flush=True)
        print()
        if args.verbose:
            print(f"[{time.perf_counter() - t0:.2f} s]", file=sys.stderr)
    else:
        g = lm.generate(mem, args.question, chat=chat_mode(args), **sampling(args))
        print(g.text)
        if args.verbose:
            print(f"[{len(g.token_ids)} tokens, finish: {g.finish_reason}, prompt {g.prompt_tokens} tokens, first token {g.prefill_seconds * 1000:.0f} ms, "
                  f"{g.tokens_per_second:.1f} tokens/s]", file=sys.stderr)
    return EXIT_OK


def cmd_chat(args) -> int:
    from .repl import Repl

    check_sampling(args)
    target = memories_of(args)
    target.precheck(must_exist=False)
    lm, _ = load_lm(args)
    check_length(args, lm)
    with target.open(lm):
        return Repl(lm, target, args).run()


def cmd_demo(args) -> int:
    check_sampling(args)
    lm, load_s = load_lm(args)
    check_length(args, lm)
    mem = lm.new_memory(seed=0)
    # the default prompt asks the question as the shipped weights were trained ("Question: ...
    # Answer:", one line); --chat asks in the chat template, --raw the bare question
    chat, params = chat_mode(args), sampling(args)
    base = lm.generate(None, DEMO_QUESTION, chat=chat, **params)
    r = lm.inject(mem, DEMO_PASSAGE)
    ans = lm.generate(mem, DEMO_QUESTION, chat=chat, **params)
    print(f"model:     {lm.name} (loaded in {load_s:.1f} s)")
    print(f"memory:    {fill(facts(lm, mem), 'N={N}, K={K}, {layers} layers', '{capacity_units} {unit}s')}")
    print(f"injected:  {r.num_tokens} tokens in {r.seconds * 1000:.0f} ms")
    print(f"question:  {DEMO_QUESTION}")
    print(f"no memory: {base.text.strip()!r}")
    print(f"memory:    {ans.text.strip()!r}")
    print(f"timings:   first token {ans.prefill_seconds * 1000:.0f} ms (incl. memory keys/values), decode {ans.tokens_per_second:.1f} tokens/s")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# info: what `info` prints, filled from lm.info(memory): its fields plus the design's details.
# Each line lists templates in order of preference; the first whose facts the design reports is
# printed, and a line with none (e.g. MemoryLLM's chunk limits under another design) is left out.
# ---------------------------------------------------------------------------------------------
INFO_LINES = [
    ("model", "{model} ({parameters_m:.1f}M parameters, {dtype}, {device})", "{model}"),
    ("model id", "{model_id}"),
    ("design", "{design}"),
    ("layers L", "{layers}   hidden d: {hidden_size}"),
    ("memory N", "{N} tokens per layer ({num_blocks} blocks x K={K})"),
    ("in use", "{used_units} of {capacity_units} {unit}s"),
    ("pool size", "{memory_mib:.1f} MiB ({memory_values_m:.1f}M values)", "{memory_mib:.1f} MiB"),
    ("memory", "{stored_as}"),
    ("memory file", "{file}"),
    ("initialized", "{initialized}"),
    ("updates", "{update_count}   injections: {last_injection_id}"),
    ("chunk limits", "{min_inject_tokens}..{max_inject_tokens} tokens per update"),
]


def facts(lm, mem, **extra) -> dict:
    """lm.info(mem) as one flat dict (fields, details, a few derived sizes) for the templates."""
    info = lm.info(mem)
    out = {**info.to_dict(), **info.details, "memory_mib": info.memory_bytes / 2**20, **extra}
    for key in ("parameters", "memory_values"):
        if key in out:
            out[f"{key}_m"] = out[key] / 1e6
    return out


def fill(values: dict, *templates: str) -> str | None:
    for t in templates:
        try:
            return t.format_map(values)
        except KeyError:  # a fact this design does not report
            continue
    return None


def info_text(lm, mem, path=None, *, stored_as: str | None = None) -> str:
    """The info lines; ``path``: a memory file's, ``stored_as``: a data directory's memory."""
    extra = {}
    if path is not None:
        extra["file"] = f"{path} ({'exists' if path and Path(path).exists() else 'new'})"
    if stored_as is not None:
        extra["stored_as"] = stored_as
    values = facts(lm, mem, **extra)
    lines = ((label, fill(values, *templates)) for label, *templates in INFO_LINES)
    return "\n".join(f"{label + ':':<16}{text}" for label, text in lines if text is not None)


def target_info(lm, target) -> str:
    if isinstance(target, StoreMemories):
        return info_text(lm, target.memory(), stored_as=target.facts())
    return info_text(lm, target.memory(), target.path)


def cmd_info(args) -> int:
    target = memories_of(args)
    target.precheck(must_exist=False)
    lm, _ = load_lm(args)
    with target.open(lm):
        print(target_info(lm, target))
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# the data directory: list, history, search, forget, reset, export, import, verify
# ---------------------------------------------------------------------------------------------
def _opened_without_model(args) -> StoreMemories:
    target = StoreMemories(args.data, getattr(args, "name", None) or DEFAULT_NAME, getattr(args, "tenant", ""))
    target.precheck(must_exist=True)
    return target.open(None)


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def format_entry(e, full: bool = False, width: int = 72) -> str:
    """One ledger entry on one line (the text cut to ``width`` unless ``full``)."""
    if e.kind == "inject":
        text = e.text if e.text is not None else ("(forgotten)" if e.status == "forgotten" else "(text not stored)")
        text = " ".join(text.split()) if not full else text
        if not full and len(text) > width:
            text = text[: width - 3] + "..."
        status = "" if e.status == "live" else f" [{e.status}]"
        return f"#{e.injection_id:<4} {_when(e.created_at)}  {e.num_tokens} tokens{status}  {text}"
    target = f" #{e.injection_id}" if e.injection_id is not None else ""
    return f"{'':6}{_when(e.created_at)}  {e.kind}{target}{f'  {e.detail}' if e.detail else ''}"


def cmd_list(args) -> int:
    with _opened_without_model(args) as target:
        pools = target.store.list(tenant=args.tenant)
    if not pools:
        print(f"no memories in {target.data}", file=sys.stderr)
    for p in pools:
        print(f"{p.name:<24} {p.live_injections:>5} injections  {p.update_count:>6} updates  {p.snapshots} snapshots  created {_when(p.created_at)}")
    return EXIT_OK


def cmd_history(args) -> int:
    with _opened_without_model(args) as target:
        entries = target.history()
    if not args.all:
        entries = [e for e in entries if e.kind == "inject"]
    if args.json:
        print(json.dumps([e.to_dict() for e in entries], indent=1, ensure_ascii=False))
    else:
        for e in entries:
            print(format_entry(e, args.full))
    return EXIT_OK


def cmd_search(args) -> int:
    with _opened_without_model(args) as target:
        hits = target.search(args.query, args.limit)
    if args.json:
        print(json.dumps([e.to_dict() for e in hits], indent=1, ensure_ascii=False))
    elif not hits:
        print(f"no injection of {target.label} contains {args.query!r}", file=sys.stderr)
    for e in [] if args.json else hits:
        print(format_entry(e, args.full))
    return EXIT_OK


def cmd_forget(args) -> int:
    target = memories_of(args)
    target.precheck(must_exist=True)
    lm, _ = load_lm(args)
    with target.open(lm):
        print(target.forget(args.injection_id, fast=args.fast))
    return EXIT_OK


def confirm(question: str) -> bool:
    """y/N on the terminal; refuses (False) when stdin is not one."""
    if not sys.stdin.isatty():
        return False
    try:
        return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")
    except EOFError:
        return False


def cmd_reset(args) -> int:
    target = memories_of(args)
    target.precheck(must_exist=True)
    if not args.yes and not confirm(f"reset {target.label}, deleting what it holds{' and its ledger' if isinstance(target, StoreMemories) else ''}?"):
        raise CLIError(f"not reset: pass --yes to reset {target.label} without asking")
    lm, _ = load_lm(args)
    with target.open(lm):
        print(target.reset())
    return EXIT_OK


def cmd_export(args) -> int:
    target = memories_of(args)
    target.precheck(must_exist=True)
    lm, _ = load_lm(args)
    with target.open(lm):
        print(target.export(Path(args.file)))
    return EXIT_OK


def cmd_import(args) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise CLIError(f"{path} does not exist or is not a file")
    target = memories_of(args)
    target.precheck(must_exist=False)
    lm, _ = load_lm(args)
    with target.open(lm):
        print(target.import_file(path, lm))
    return EXIT_OK


def cmd_verify(args) -> int:
    """Exit status 0 when every memory checked equals the replay of its ledger, 3 otherwise."""
    from ..store.store import MemoryStore

    data = Path(args.data).expanduser() if args.data else default_data_dir()
    if not (data / "store.db").is_file():
        raise CLIError(f"no memories in {data} (--data DIR names the data directory)")
    check_free(data)  # before the model loads: a running server holds the directory
    lm, _ = load_lm(args)
    bad = 0
    with MemoryStore(data, lm) as store:
        tenants = [args.tenant] if args.tenant is not None else store.tenants()
        for t in tenants:
            for name in args.names or store.names(tenant=t):
                report = store.verify(name, tenant=t)
                bad += not report.ok
                print(f"{t}/{name}: {report.message}" + "".join(f"\n    {m}" for m in report.mismatches))
    return EXIT_MISMATCH if bad else EXIT_OK
