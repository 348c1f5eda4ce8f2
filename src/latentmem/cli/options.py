"""What the verbs share: the help formatter, argument groups, exit codes and the default folders.

Nothing here imports torch: ``memoryllm --help`` and ``--version`` build every parser and
must stay fast; the verbs import the model code when they run.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

# Exit codes (also listed in `memoryllm --help`).
EXIT_OK = 0
EXIT_BUG = 1  # an unexpected error (a bug): Python's own exit status, with its traceback
EXIT_ERROR = 2  # an expected failure: bad arguments or input, a missing file or memory, a busy data directory, a model folder that cannot be loaded
EXIT_MISMATCH = 3  # verify: a memory differs from the replay of its ledger
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)

EXIT_CODES = f"""exit status:
  {EXIT_OK}    success
  {EXIT_ERROR}    the command could not do what was asked (the message says why and which flag to use)
  {EXIT_MISMATCH}    verify: a memory differs from the replay of its ledger
  {EXIT_BUG}    an unexpected error (a bug; please report it with the traceback)
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C)"""

DATA_ENV = "LATENTMEM_DATA"
DEFAULT_NAME = "default"

# SamplingParams' defaults, written out so that --help needs no torch import
# (tests/test_cli.py checks they equal latentmem.generate.SamplingParams()).
MAX_NEW_TOKENS = 1 << 20  # no context window is longer; the model's own is checked after loading (check_length)
SAMPLING_DEFAULTS = dict(max_new_tokens=64, temperature=0.0, top_p=1.0, top_k=0, seed=None, repeat_ngram=4, repeat_limit=3)


class CLIError(Exception):
    """An expected failure the command line reports in one line (exit status 2)."""


def default_data_dir() -> Path:
    """Where the CLI keeps its memories: $LATENTMEM_DATA, else $XDG_DATA_HOME/latentmem, else
    ~/.local/share/latentmem (user data, like the model cache under ~/.cache/latentmem)."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share") / "latentmem"


def history_file() -> Path:
    """The chat REPL's readline history: $XDG_STATE_HOME/latentmem/chat_history, else
    ~/.local/state/latentmem/chat_history."""
    xdg = os.environ.get("XDG_STATE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".local" / "state") / "latentmem" / "chat_history"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each help line (not for switches, None, or help that already names one);
    descriptions and epilogs keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if "%(default)" in text or "(default" in text or d is None or d is False or d is argparse.SUPPRESS or d == [] or d == "":
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._HelpAction, argparse._VersionAction)):
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"
        return text


def use_formatter(parser: argparse.ArgumentParser) -> None:
    """HelpFormatter on ``parser`` and every subparser below it (also those other modules add)."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                use_formatter(sub)


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; 1 or 2 on a shared machine)")


def add_model_args(p: argparse.ArgumentParser, designs) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="local folder: a Llama-family HF model or a MemoryLLM checkpoint (default: the embedded SmolLM2-135M with the shipped memory weights)")
    g.add_argument("--design", default="memoryllm", choices=sorted(designs), help="memory design")
    g.add_argument("--num-tokens", type=int, default=None, help="K, memory tokens per update (new models only)")
    g.add_argument("--num-blocks", type=int, default=None, help="N = num_blocks * K (new models only)")
    g.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, mps)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights and memory dtype")
    add_threads(g)


def add_store_args(p: argparse.ArgumentParser, *, memory_file: bool = True, name: bool = True) -> None:
    g = p.add_argument_group("memory")
    g.add_argument("--data", default=None, metavar="DIR", help=f"data directory of named memories, the one `memoryllm serve` uses (default: ${DATA_ENV}, else {default_data_dir()})")
    if name:
        g.add_argument("--name", default=DEFAULT_NAME, help="memory name in the data directory")
    g.add_argument("--tenant", default="", help="the service tenant whose memory this is ('' = local memories)")
    if memory_file:
        g.add_argument("--memory", default=None, metavar="FILE", help="work on a memory state file instead of the data directory (the format of `export FILE.safetensors`)")


def add_prompt_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--chat", action="store_true", help="ask in the tokenizer's chat template (default: the plain 'Question: ... Answer:' form the shipped weights were trained on, one line)")
    g.add_argument("--raw", "--no-chat", dest="raw", action="store_true", help="send the text exactly as given: no template, no Question/Answer form, no newline stop")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    d = SAMPLING_DEFAULTS
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=d["max_new_tokens"], help="longest answer in tokens")
    g.add_argument("--temperature", type=float, default=d["temperature"], help="sampling temperature; 0 = greedy")
    g.add_argument("--top-p", type=float, default=d["top_p"], help="nucleus sampling: keep the smallest set of tokens with this much probability")
    g.add_argument("--top-k", type=int, default=d["top_k"], help="keep the k most likely tokens; 0 = all")
    g.add_argument("--seed", type=int, default=d["seed"], help="seed of the sampling (default: random)")
    g.add_argument("--stop", action="append", default=[], help="stop string, cut off the answer (repeatable)")
    g.add_argument("--repeat-limit", type=int, default=d["repeat_limit"], help="stop a degenerate loop when the answer's newest --repeat-ngram tokens have occurred this often; 0 = off")
    g.add_argument("--repeat-ngram", type=int, default=d["repeat_ngram"], help="n-gram length the loop guard watches")
    add_prompt_args(p)


def check_sampling(args) -> None:
    """Bad sampling arguments fail in one line before the model loads (issue 17: a NaN
    temperature or 10**12 new tokens gave tracebacks). The context-window bound on
    --max-new-tokens needs the model: ``check_length``."""
    import math

    for flag, value, ok, want in (
        ("--temperature", args.temperature, math.isfinite(args.temperature) and args.temperature >= 0, "a finite number >= 0 (0: greedy)"),
        ("--top-p", args.top_p, math.isfinite(args.top_p) and 0 < args.top_p <= 1, "in (0, 1]"),
        ("--top-k", args.top_k, args.top_k >= 0, ">= 0 (0: off)"),
        ("--max-new-tokens", args.max_new_tokens, 1 <= args.max_new_tokens <= MAX_NEW_TOKENS, f"in [1, {MAX_NEW_TOKENS}]"),
        ("--repeat-ngram", args.repeat_ngram, args.repeat_ngram >= 1, ">= 1"),
        ("--repeat-limit", args.repeat_limit, args.repeat_limit == 0 or args.repeat_limit >= 2, "0 (off) or >= 2"),
    ):
        if not ok:
            raise CLIError(f"{flag} {value}: must be {want}")
    if args.seed is not None and not 0 <= args.seed < 2**63:
        raise CLIError(f"--seed {args.seed}: must be in [0, 2**63)")
    if any(not s for s in args.stop):
        raise CLIError("--stop: stop strings must be non-empty")


def check_length(args, lm) -> None:
    """--max-new-tokens within the model's context window (a decode cache that size is allocated)."""
    window = lm.info().details.get("context_window")
    if window and args.max_new_tokens > window:
        raise CLIError(f"--max-new-tokens {args.max_new_tokens}: over the model's context window of {window} tokens")


def sampling(args) -> dict:
    """The SamplingParams keywords of parsed arguments."""
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                stop=args.stop, repeat_limit=args.repeat_limit, repeat_ngram=args.repeat_ngram)


def chat_mode(args) -> bool | None:
    """--chat: True (template); --raw: False (as given); neither: None (the plain default)."""
    return True if getattr(args, "chat", False) else False if getattr(args, "raw", False) else None


def cli_words(message: str) -> str:
    """Library advice in the CLI's terms (the flag, not the keyword argument)."""
    for library, cli in (("pass allow_short=True", "pass --allow-short"), ("use mode='fast'", "use --fast"), ("chat=True but", "--chat but")):
        message = message.replace(library, cli)
    return message


def is_expected(e: BaseException) -> bool:
    """Whether an error is one the command line reports in a line (exit 2), not a bug: bad input
    or arguments, files, model folders (CheckpointError), memories (MemoryFormatError,
    InjectionError), the store (StoreBusy, NotFound, ...), a missing optional dependency."""
    from ..store.store import StoreError

    return isinstance(e, (CLIError, ValueError, OSError, StoreError, NotImplementedError, ImportError))
