"""User-facing errors: one line, naming the problem and the fix; the CLI prints them without a traceback."""
from __future__ import annotations

import codecs
import os
import signal
import stat
import sys
from pathlib import Path
from typing import Callable


class UserError(Exception):
    """Bad input from the user. `str(e)` is one line; `exit_code` is the process status."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


def exit_status(prog: str, fn: Callable[..., int | None], *args, **kwargs) -> int:
    """`fn(*args, **kwargs)` as a process status: its int result (None = 0), or, when it raises UserError,
    the one line `{prog}: error: {e}` on stderr and the error's exit_code (no traceback)."""
    try:
        return int(fn(*args, **kwargs) or 0)
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    except UnicodeDecodeError as e:  # a reader without its own check: still one line, never a traceback
        print(f"{prog}: error: an input file holds bytes that are not UTF-8 text ({e.reason}, byte offset {e.start}); "
              "save it as UTF-8", file=sys.stderr)
        return 1


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised where the command is (so `finally` blocks remove partial output and locks)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def install_interrupt_handlers(prog: str) -> dict:
    """SIGINT and SIGTERM raise Interrupted in the main thread; a second one while the first is being cleaned up
    ends the process at once (one line, status 128 + signal). Returns the handlers it replaced (for
    restore_handlers)."""
    hit: list[int] = []
    old: dict = {}

    def handle(signum, frame):
        if hit:
            print(f"{prog}: interrupted again ({signal.Signals(signum).name}); stopped without cleaning up",
                  file=sys.stderr, flush=True)
            os._exit(128 + signum)
        hit.append(signum)
        raise Interrupted(signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        try:
            old[s] = signal.signal(s, handle)
        except (ValueError, OSError):  # not the main thread: leave the defaults
            break
    return old


def restore_handlers(old: dict) -> None:
    for s, h in old.items():
        try:
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        except (ValueError, OSError, TypeError):
            pass


def interrupt_status(prog: str, e: KeyboardInterrupt) -> int:
    """The one line and the status (130 SIGINT, 143 SIGTERM) of a command stopped by a signal."""
    signum = getattr(e, "signum", signal.SIGINT)
    print(f"{prog}: interrupted by {signal.Signals(signum).name}; stopped, partial output removed",
          file=sys.stderr, flush=True)
    return 128 + signum


def utf8_problem(path) -> tuple[str | None, int, int]:
    """Scan a file in 4 MiB chunks, before any parsing: (None, 0, 0) for clean UTF-8 text, else (problem, line,
    byte offset) with problem "not_utf8" (the first bad byte's line and offset), "nul" (a NUL byte in the file)
    or "truncated" (the file ends inside a character). Callers word the one-line error for their input."""
    decoder, offset, lines = codecs.getincrementaldecoder("utf-8")(), 0, 1
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as e:
                at = max(e.start, 0)
                return "not_utf8", lines + chunk.count(b"\n", 0, at), offset + at
            if b"\0" in chunk:
                return "nul", lines, offset
            lines += chunk.count(b"\n")
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return "truncated", lines, offset
    return None, 0, 0


def check_text_file(path, what: str = "file", fix: str = "save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)") -> None:
    """The one check of a text input before it is parsed: a regular file (a FIFO or device is never opened),
    UTF-8 throughout (the line and byte offset of the first bad byte) and no NUL bytes. One-line UserError."""
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError as e:
        raise UserError(f"{what} '{path}' cannot be read ({e.strerror}); check the path") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a FIFO, device or socket)"
        raise UserError(f"{what} '{path}' is {kind}; give a text file")
    problem, line, offset = utf8_problem(p)
    if problem == "not_utf8":
        raise UserError(f"{what} '{path}' is not UTF-8 text (line {line}, byte offset {offset}); {fix}")
    if problem == "nul":
        raise UserError(f"{what} '{path}' holds NUL bytes (a binary file?); give a text file")
    if problem == "truncated":
        raise UserError(f"{what} '{path}' ends inside a UTF-8 character (truncated?); {fix}")
