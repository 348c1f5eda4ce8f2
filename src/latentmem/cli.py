"""Command line: a thin shell over the library API (``latentmem.load`` and ``latentmem.api.MemoryModel``).

    memoryllm inject "Some text to remember ..."      # or --file notes.txt
    memoryllm ask "What did I tell you about ...?"
    memoryllm chat                                    # interactive; /remember TEXT injects
    memoryllm info
    memoryllm demo                                    # inject a passage, ask, print timings

Every command works on one memory-state file (--memory, default ./memory.safetensors) and the
embedded default model unless --model names a local folder; --design picks the memory design.
The commands speak only the shared interface, so every design gets the same command line.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import DESIGNS

DEFAULT_MEMORY = "memory.safetensors"

DEMO_PASSAGE = (
    "Zorblat Industries was founded in 2031 by the engineer Mira Kovac in the town of Lindholm. "
    "The company's first product was a solar-powered bicycle called the Sunrider. "
    "Its headquarters moved to Tallinn in 2035, and its mascot is a purple owl named Pixel."
)
DEMO_QUESTION = "Who founded Zorblat Industries?"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="local folder: a Llama-family HF model or a MemoryLLM checkpoint (default: embedded SmolLM2-135M)")
    p.add_argument("--design", default="memoryllm", choices=sorted(DESIGNS), help="memory design (default: memoryllm)")
    p.add_argument("--memory", default=DEFAULT_MEMORY, help=f"memory state file (default: ./{DEFAULT_MEMORY})")
    p.add_argument("--num-tokens", type=int, default=None, help="K, memory tokens per update (new models only)")
    p.add_argument("--num-blocks", type=int, default=None, help="N = num_blocks * K (new models only)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--no-chat", action="store_true", help="do not apply the tokenizer's chat template")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memoryllm", description="Language models with a memory in their latent space (MemoryLLM).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inject", help="write text into the memory")
    _add_model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("text", nargs="?", help="text to inject")
    src.add_argument("--file", help="UTF-8 text file to inject ('-' for stdin)")
    p.add_argument("--allow-short", action="store_true", help="accept texts under the minimum token count")
    p.add_argument("--memory-seed", type=int, default=0, help="seed of the drop generator for a new memory file")

    p = sub.add_parser("ask", help="answer a question from the memory")
    _add_model_args(p)
    _add_sampling_args(p)
    p.add_argument("question")
    p.add_argument("--stream", action="store_true", help="print tokens as they come")

    p = sub.add_parser("chat", help="interactive chat; /remember TEXT injects, /info, /quit")
    _add_model_args(p)
    _add_sampling_args(p)

    p = sub.add_parser("info", help="model and memory facts")
    _add_model_args(p)

    p = sub.add_parser("demo", help="inject a passage, ask about it, print the answer and timings")
    _add_model_args(p)
    _add_sampling_args(p)
    p.add_argument("--chat", action="store_true", help="ask in the tokenizer's chat template (default: the plain 'Question: ... Answer:' the shipped weights were trained on)")
    p.set_defaults(memory=None, max_new_tokens=24)

    from .eval.cli import add_parser as add_eval_parser  # memoryllm eval <task>

    add_eval_parser(sub)
    from .store.service import add_parser as add_service_parser  # memoryllm serve / keys

    add_service_parser(sub)
    from .train.cli import add_parser as add_train_parser  # memoryllm train --config FILE

    add_train_parser(sub)
    return parser


def _load_lm(args):
    import torch

    from . import load

    kw = {"dtype": getattr(torch, args.dtype), "device": args.device}
    if args.num_tokens is not None:
        kw["num_tokens"] = args.num_tokens
    if args.num_blocks is not None:
        kw["num_blocks"] = args.num_blocks
    t0 = time.perf_counter()
    lm = load(args.model, design=args.design, **kw)
    return lm, time.perf_counter() - t0


def _open_memory(lm, path: str | None, seed: int = 0, must_exist: bool = False):
    if path and Path(path).exists():
        return lm.load_memory(path)
    if must_exist:
        raise FileNotFoundError(f"memory file {path} does not exist (inject something first)")
    return lm.new_memory(seed=seed)


def _read_text(args) -> str:
    if args.file is None:
        return args.text
    data = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{args.file} is not valid UTF-8 (byte {e.start}: {e.reason})") from None


def _sampling(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop)


def cmd_inject(args) -> int:
    text = _read_text(args)  # validate input before the (slow) model load
    if not text.strip():
        raise ValueError("text is empty or whitespace only: nothing to inject")
    lm, _ = _load_lm(args)
    mem = _open_memory(lm, args.memory, seed=args.memory_seed)
    r = lm.inject(mem, text, allow_short=args.allow_short)
    mem.save(args.memory)
    print(f"injected #{r.injection_id}: {r.num_tokens} tokens in {r.num_chunks} update(s), {r.seconds:.2f} s -> {args.memory} (updates: {mem.update_count})")
    return 0


def cmd_ask(args) -> int:
    lm, _ = _load_lm(args)
    mem = _open_memory(lm, args.memory)
    if lm.info(mem).used_units == 0:
        print("note: the memory is empty; answering from the base model alone", file=sys.stderr)
    chat = False if args.no_chat else None
    if args.stream:
        for piece in lm.stream(mem, args.question, chat=chat, **_sampling(args)):
            print(piece, end="", flush=True)
        print()
    else:
        print(lm.generate(mem, args.question, chat=chat, **_sampling(args)).text)
    return 0


def cmd_chat(args) -> int:
    lm, _ = _load_lm(args)
    mem = _open_memory(lm, args.memory)
    chat = False if args.no_chat else None
    print(f"memoryllm chat on {lm.name}; memory {args.memory} ({mem.update_count} updates). /remember TEXT, /info, /quit")
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/info":
            print(_info_text(lm, mem, args.memory))
            continue
        if line.startswith("/remember"):
            try:
                r = lm.inject(mem, line[len("/remember") :].strip())
            except ValueError as e:
                print(f"error: {e}")
                continue
            mem.save(args.memory)
            print(f"(remembered: {r.num_tokens} tokens, injection #{r.injection_id})")
            continue
        for piece in lm.stream(mem, line, chat=chat, **_sampling(args)):
            print(piece, end="", flush=True)
        print()
    return 0


# What `info` prints, filled from lm.info(memory): its fields plus the design's details. Each line
# lists templates in order of preference; the first whose facts the design reports is printed,
# and a line with none (e.g. MemoryLLM's chunk limits under another design) is left out.
INFO_LINES = [
    ("model", "{model} ({parameters_m:.1f}M parameters, {dtype}, {device})", "{model}"),
    ("model id", "{model_id}"),
    ("design", "{design}"),
    ("layers L", "{layers}   hidden d: {hidden_size}"),
    ("memory N", "{N} tokens per layer ({num_blocks} blocks x K={K})"),
    ("in use", "{used_units} of {capacity_units} {unit}s"),
    ("pool size", "{memory_mib:.1f} MiB ({memory_values_m:.1f}M values)", "{memory_mib:.1f} MiB"),
    ("memory file", "{file}"),
    ("initialized", "{initialized}"),
    ("updates", "{update_count}   injections: {last_injection_id}"),
    ("chunk limits", "{min_inject_tokens}..{max_inject_tokens} tokens per update"),
]


def _facts(lm, mem, **extra) -> dict:
    """lm.info(mem) as one flat dict (fields, details, a few derived sizes) for the templates."""
    info = lm.info(mem)
    facts = {**info.to_dict(), **info.details, "memory_mib": info.memory_bytes / 2**20, **extra}
    for key in ("parameters", "memory_values"):
        if key in facts:
            facts[f"{key}_m"] = facts[key] / 1e6
    return facts


def _fill(facts: dict, *templates: str) -> str | None:
    for t in templates:
        try:
            return t.format_map(facts)
        except KeyError:  # a fact this design does not report
            continue
    return None


def _info_text(lm, mem, path) -> str:
    facts = _facts(lm, mem, file=f"{path} ({'exists' if path and Path(path).exists() else 'new'})")
    lines = ((label, _fill(facts, *templates)) for label, *templates in INFO_LINES)
    return "\n".join(f"{label + ':':<16}{text}" for label, text in lines if text is not None)


def cmd_info(args) -> int:
    lm, _ = _load_lm(args)
    print(_info_text(lm, _open_memory(lm, args.memory), args.memory))
    return 0


def cmd_demo(args) -> int:
    lm, load_s = _load_lm(args)
    mem = lm.new_memory(seed=0)
    # The shipped memory weights were trained to answer "Question: ... Answer:" from memory
    # (docs/training.md); the chat template is there for models trained with it (--chat).
    chat = bool(args.chat) and not args.no_chat
    prompt = DEMO_QUESTION if chat else f"Question: {DEMO_QUESTION} Answer:"
    sampling = _sampling(args)
    if not chat and not args.stop:
        sampling["stop"] = ["\n"]  # a plain-prompt answer is one line
    base = lm.generate(None, prompt, chat=chat, **sampling)
    r = lm.inject(mem, DEMO_PASSAGE)
    ans = lm.generate(mem, prompt, chat=chat, **sampling)
    print(f"model:     {lm.name} (loaded in {load_s:.1f} s)")
    print(f"memory:    {_fill(_facts(lm, mem), 'N={N}, K={K}, {layers} layers', '{capacity_units} {unit}s')}")
    print(f"injected:  {r.num_tokens} tokens in {r.seconds * 1000:.0f} ms")
    print(f"question:  {DEMO_QUESTION}")
    print(f"no memory: {base.text.strip()!r}")
    print(f"memory:    {ans.text.strip()!r}")
    print(f"timings:   first token {ans.prefill_seconds * 1000:.0f} ms (incl. memory keys/values), decode {ans.tokens_per_second:.1f} tokens/s")
    return 0


COMMANDS = {"inject": cmd_inject, "ask": cmd_ask, "chat": cmd_chat, "info": cmd_info, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .api import MemoryFormatError

    try:
        return (getattr(args, "handler", None) or COMMANDS[args.command])(args)
    except (ValueError, OSError, MemoryFormatError) as e:  # OSError: unreadable or unwritable files
        print(f"memoryllm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
