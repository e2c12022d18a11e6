"""User-facing errors: one line, naming the problem and the fix; the CLI prints them without a traceback."""
from __future__ import annotations

import sys
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
