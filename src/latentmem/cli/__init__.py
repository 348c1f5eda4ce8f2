"""Command line: a thin shell over the library API (``latentmem.load``, ``latentmem.api.MemoryModel``
and ``MemoryStore``), installed as ``memoryllm`` and ``latentmem``.

    memoryllm inject "The launch moved to 14 March, after the board meeting in Oslo."
    memoryllm ask "When is the launch?"           # asked as "Question: ... Answer:", one line
    memoryllm chat                                # interactive; /help lists the commands
    memoryllm history | search WORDS | forget ID | reset | list | info
    memoryllm export alice.zip | import alice.zip # a memory with its ledger (.safetensors: the state alone)
    memoryllm demo                                # inject a passage, ask, print timings

Memories live in one data directory (``--data``, default $LATENTMEM_DATA or
~/.local/share/latentmem), the same ``MemoryStore`` the HTTP service uses, under names
(``--name``, default "default"); ``--memory FILE`` works on a memory state file instead.

    options.py   help formatter, argument groups, exit codes, default folders (no torch import)
    memories.py  the memory a verb works on: a named memory of a data directory, or a file
    commands.py  the verbs
    repl.py      `memoryllm chat`
"""

from __future__ import annotations

import argparse
import sys

from .. import DESIGNS, __version__
from .commands import DEMO_PASSAGE, DEMO_QUESTION, INFO_LINES, info_text
from .options import (
    EXIT_CODES,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    HelpFormatter,
    add_model_args,
    add_sampling_args,
    add_store_args,
    cli_words,
    default_data_dir,
    is_expected,
    use_formatter,
)

_info_text = info_text  # the name tests and older callers use

DESCRIPTION = """Language models with a memory in their latent space (MemoryLLM and other designs).

Memories are kept in a data directory (--data; default $LATENTMEM_DATA, else
~/.local/share/latentmem) under names (--name, default "default"): the store the HTTP service
uses, with a ledger of every injection (history, search, exact forget, export/import).
Questions are asked in the plain form the shipped weights were trained on ("Question: ...
Answer:", one line); --chat asks in the tokenizer's chat template, --raw sends text as given.
`memoryllm VERB --help` shows a verb's options and their defaults."""

EXAMPLES = """examples:
  memoryllm inject "The launch moved to 14 March, after the board meeting in Oslo."
  memoryllm ask "When is the launch?"
  memoryllm chat --name alice
  memoryllm search Oslo && memoryllm forget 1
  memoryllm export default.zip       # or default.safetensors: the memory state alone (--memory FILE)

"""

# `train` imports torch when its parser is built (latentmem.train's package imports the engine),
# so it is registered for real only when it is the verb; elsewhere a stub carries its help line.
TRAIN_HELP = "train a memory design (default MemoryLLM: paper routines + QA; LoRA); runs under torchrun unchanged"


def build_parser(verb: str | None = None) -> argparse.ArgumentParser:
    """The parser of every verb (``verb``: the one being run; others that are slow to build,
    i.e. ``train``, are then stubs that only show their help line)."""
    from . import commands as c

    parser = argparse.ArgumentParser(prog="memoryllm", description=DESCRIPTION, epilog=EXAMPLES + EXIT_CODES, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__} (latentmem)", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="VERB")

    def verb_parser(name: str, help: str, handler, **kw) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=kw.pop("description", help[:1].upper() + help[1:] + "."), epilog=kw.pop("epilog", None), **kw)
        p.set_defaults(handler=handler)
        return p

    p = verb_parser("inject", "write text into a memory", c.cmd_inject)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("text", nargs="?", help="text to inject")
    src.add_argument("--file", help="UTF-8 text file to inject ('-' for stdin)")
    p.add_argument("--allow-short", action="store_true", help="accept a text under the design's minimum token count (short texts disturb the memory)")
    p.add_argument("--memory-seed", type=int, default=0, help="seed of a new memory's drop generator")
    p.add_argument("--source", default="cli", help="source label recorded in the ledger")
    add_store_args(p)
    add_model_args(p, DESIGNS)

    p = verb_parser("ask", "answer a question from a memory", c.cmd_ask)
    p.add_argument("question", help="the question (or, with --raw, any prompt text)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None, help="print tokens as they come (default: when stdout is a terminal)")
    p.add_argument("-v", "--verbose", action="store_true", help="print token counts, finish reason and timings on stderr")
    add_sampling_args(p)
    add_store_args(p)
    add_model_args(p, DESIGNS)

    p = verb_parser("chat", "interactive questions and /commands on a memory (/help inside)", c.cmd_chat,
                    epilog="commands inside: /remember TEXT, /history, /search WORDS, /forget N, /reset, /info, /help, /quit")
    add_sampling_args(p)
    add_store_args(p)
    add_model_args(p, DESIGNS)

    p = verb_parser("info", "model and memory facts", c.cmd_info)
    add_store_args(p)
    add_model_args(p, DESIGNS)

    p = verb_parser("list", "the memories of a data directory (no model needed)", c.cmd_list)
    add_store_args(p, memory_file=False, name=False)

    p = verb_parser("history", "a memory's injections from its ledger (no model needed)", c.cmd_history)
    p.add_argument("--all", action="store_true", help="every ledger event (create, snapshot, forget, ...), not only injections")
    p.add_argument("--full", action="store_true", help="whole texts instead of one line each")
    p.add_argument("--json", action="store_true", help="JSON instead of lines")
    add_store_args(p, memory_file=False)

    p = verb_parser("search", "injections whose stored text contains every word of TEXT, newest first (no model needed)", c.cmd_search)
    p.add_argument("query", metavar="TEXT", help="words to look for (case-insensitive substrings)")
    p.add_argument("--limit", type=int, default=20, help="most results")
    p.add_argument("--full", action="store_true", help="whole texts instead of one line each")
    p.add_argument("--json", action="store_true", help="JSON instead of lines")
    add_store_args(p, memory_file=False)

    p = verb_parser("forget", "forget one injection (exact by default: the memory is rebuilt as if it never had it)", c.cmd_forget)
    p.add_argument("injection_id", type=int, metavar="ID", help="injection id (see `memoryllm history`)")
    p.add_argument("--fast", action="store_true", help="reset the injection's slots only, no replay (later injections may keep traces of it)")
    add_store_args(p)
    add_model_args(p, DESIGNS)

    p = verb_parser("reset", "empty a memory, deleting its ledger and snapshots (asks first on a terminal)", c.cmd_reset)
    p.add_argument("--yes", "-y", action="store_true", help="do not ask")
    add_store_args(p)
    add_model_args(p, DESIGNS)

    p = verb_parser("export", "write a memory to FILE: .zip = state + ledger (for import or the service), .safetensors = the state alone (for --memory)", c.cmd_export)
    p.add_argument("file", metavar="FILE", help="the file to write")
    add_store_args(p, memory_file=False)
    add_model_args(p, DESIGNS)

    p = verb_parser("import", "make FILE (an export .zip, or a memory state .safetensors) a memory of the data directory", c.cmd_import)
    p.add_argument("file", metavar="FILE", help="the file to read")
    add_store_args(p, memory_file=False)
    add_model_args(p, DESIGNS)

    p = verb_parser("verify", "rebuild memories from their ledgers and compare bit for bit (the server stopped)", c.cmd_verify,
                    epilog="exit status: 0 every memory checked matches, 3 a mismatch, 2 an error (e.g. the data directory is in use)")
    p.add_argument("names", nargs="*", help="memory names (default: all)")
    p.add_argument("--data", default=None, metavar="DIR", help=f"data directory (default: {default_data_dir()})")
    p.add_argument("--tenant", default=None, help="only this tenant's memories (default: all tenants; '' = local memories)")
    add_model_args(p, DESIGNS)

    p = verb_parser("demo", "inject a passage, ask about it, print the answer and timings", c.cmd_demo)
    add_sampling_args(p)
    add_model_args(p, DESIGNS)
    p.set_defaults(max_new_tokens=24)

    from ..eval.cli import add_parser as add_eval_parser  # memoryllm eval <task>

    add_eval_parser(sub)
    from ..store.service import add_parser as add_service_parser  # memoryllm serve / keys

    add_service_parser(sub)
    if verb in (None, "train"):
        from ..train.cli import add_parser as add_train_parser  # memoryllm train --config FILE

        add_train_parser(sub)
    else:
        sub.add_parser("train", help=TRAIN_HELP, add_help=False)
    use_formatter(parser)
    return parser


def _verb(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_verb(argv) or "").parse_args(argv)  # "": no verb (--help): no slow parsers
    name = f"memoryllm {args.command}"
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print(f"\n{name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        if not is_expected(e):
            raise  # a bug: the traceback is what a report needs (exit status 1)
        message = str(e) if str(e) else type(e).__name__
        if isinstance(e, ImportError) and e.name in ("fastapi", "uvicorn"):
            message += " (the service needs: pip install 'latentmem[serve]')"
        print(f"{name}: error: {cli_words(message)}", file=sys.stderr)
        return EXIT_ERROR


__all__ = ["DEMO_PASSAGE", "DEMO_QUESTION", "INFO_LINES", "build_parser", "main"]
