"""``memoryllm chat``: ask questions about a memory and write to it, one line at a time.

A line is a question (asked in the default prompt form, see ``latentmem.text.plain_prompt``)
unless it starts with '/': then it is a command, and an unknown one is refused, never sent to
the model ('//' sends a line that starts with '/'). Ctrl-C while an answer streams stops that
answer; Ctrl-C twice at the prompt, or Ctrl-D, leaves. On a terminal, lines are edited with
readline and kept in ``options.history_file()``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from .commands import format_entry, target_info
from .memories import StoreMemories
from .options import EXIT_OK, CLIError, chat_mode, cli_words, history_file, is_expected, sampling

HELP = """commands:
  /remember TEXT            write TEXT into the memory (/remember --allow-short TEXT for a short one)
  /history                  the memory's injections (id, date, tokens, text)
  /search WORDS             injections whose text contains every word
  /forget N [--fast]        forget injection #N (as if never injected; --fast or a memory file: its slots reset)
  /reset                    empty the memory (asks first)
  /info                     model and memory facts
  /help                     this list
  /quit                     leave (also /exit, Ctrl-D, or Ctrl-C twice)
anything else is asked as a question; Ctrl-C stops an answer; '//text' asks '/text'."""

QUIT = object()


class Repl:
    def __init__(self, lm, target, args, *, input_fn: Callable[[str], str] | None = None, out=None):
        self.lm, self.target, self.args = lm, target, args
        self.input = input_fn or (lambda prompt: input(prompt))  # looked up per call: tests patch builtins.input
        self.out = out or sys.stdout
        self.chat = chat_mode(args)
        self.commands = {
            "/remember": self.remember, "/history": self.history, "/search": self.search, "/forget": self.forget,
            "/reset": self.reset, "/info": self.info, "/help": self.help, "/quit": self.quit, "/exit": self.quit,
        }

    def say(self, text: str = "", end: str = "\n") -> None:
        print(text, end=end, file=self.out, flush=True)

    # ---- the loop
    def run(self) -> int:
        save_history = _readline(history_file()) if sys.stdin.isatty() else None
        mem = self.target.memory()
        updates = mem.update_count if mem is not None else 0
        self.say(f"memoryllm chat on {self.lm.name}; {self.target.label} ({updates} updates). /help lists the commands, /quit leaves.")
        interrupted = False
        try:
            while True:
                try:
                    line = self.input("> ")
                except EOFError:  # Ctrl-D
                    self.say()
                    break
                except KeyboardInterrupt:  # Ctrl-C at the prompt: once clears the line, twice leaves
                    if interrupted:
                        self.say()
                        break
                    interrupted = True
                    self.say("\n(Ctrl-C again or Ctrl-D to leave)")
                    continue
                interrupted = False
                line = line.strip()
                if not line:
                    continue
                if line.startswith("/") and not line.startswith("//"):
                    if self.command(line) is QUIT:
                        break
                    continue
                self.answer(line[1:] if line.startswith("//") else line)
        finally:
            if save_history is not None:
                save_history()
        return EXIT_OK

    def command(self, line: str):
        name, _, rest = line.partition(" ")
        handler = self.commands.get(name.lower())
        if handler is None:
            self.say(f"unknown command {name} (/help lists the commands; '//' asks a line that starts with '/')")
            return None
        try:
            return handler(rest.strip())
        except KeyboardInterrupt:
            self.say("\n(interrupted; nothing was changed)")
        except Exception as e:
            if not is_expected(e):
                raise
            self.say(f"error: {cli_words(str(e))}")
        return None

    def answer(self, question: str) -> None:
        mem = self.target.memory()
        pieces = self.lm.stream(mem, question, chat=self.chat, **sampling(self.args))
        try:
            for piece in pieces:
                self.say(piece, end="")
        except KeyboardInterrupt:  # stop this answer, keep the session
            pieces.close()
            self.say(" [stopped]", end="")
        except ValueError as e:  # e.g. --chat with a tokenizer that has no template
            self.say(f"error: {e}", end="")
        self.say()

    # ---- commands
    def help(self, _rest: str) -> None:
        self.say(HELP)

    def quit(self, _rest: str):
        return QUIT

    def info(self, _rest: str) -> None:
        self.say(target_info(self.lm, self.target))

    def remember(self, rest: str) -> None:
        allow_short = rest.startswith("--allow-short")
        text = rest[len("--allow-short") :].strip() if allow_short else rest
        if not text:
            raise CLIError("nothing to remember: /remember TEXT")
        try:
            iid, tokens, _, _ = self.target.inject(text, allow_short=allow_short, source="chat")
        except ValueError as e:
            msg = str(e).replace("pass allow_short=True", "use /remember --allow-short TEXT")
            raise CLIError(msg) from None
        self.say(f"(remembered: {tokens} tokens, injection #{iid})")

    def history(self, _rest: str) -> None:
        entries = [e for e in self.target.history() if e.kind == "inject"]
        if not entries:
            self.say("(nothing injected yet)")
        for e in entries:
            self.say(format_entry(e))

    def search(self, rest: str) -> None:
        if not rest:
            raise CLIError("/search WORDS")
        hits = self.target.search(rest)
        if not hits:
            self.say(f"(no injection contains {rest!r})")
        for e in hits:
            self.say(format_entry(e))

    def forget(self, rest: str) -> None:
        words = rest.split()
        fast = "--fast" in words
        ids = [w.lstrip("#") for w in words if w != "--fast"]
        if len(ids) != 1 or not ids[0].isdigit():
            raise CLIError("/forget N [--fast], with N an injection id from /history")
        from ..store.store import NotReplayable

        try:
            self.say(self.target.forget(int(ids[0]), fast=fast))
        except NotReplayable as e:  # exact forget needs a replay from before the injection
            raise CLIError(str(e).replace("use mode='fast'", f"use /forget {ids[0]} --fast")) from None

    def reset(self, rest: str) -> None:
        if isinstance(self.target, StoreMemories) and not self.target.exists():
            self.say("(the memory is empty already)")
            return
        if rest.strip().lower() not in ("yes", "y"):
            try:
                answer = self.input(f"reset {self.target.label}, deleting everything it holds? [y/N] ")
            except EOFError:
                answer = ""
            if answer.strip().lower() not in ("y", "yes"):
                self.say("(not reset)")
                return
        self.say(self.target.reset())


def _readline(path) -> Callable[[], None] | None:
    """Line editing and a persistent history (``path``); returns the function that saves it."""
    try:
        import readline
    except ImportError:  # e.g. Windows without pyreadline
        return None
    try:
        readline.read_history_file(path)
    except OSError:  # none yet, or unreadable: start empty
        pass
    readline.set_history_length(1000)

    def save() -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)
        except OSError as e:
            print(f"note: chat history not saved to {path}: {e}", file=sys.stderr)

    return save
