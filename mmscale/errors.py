"""User-facing errors: one line, naming the problem and the fix; the CLI prints them without a traceback."""


class UserError(Exception):
    """Bad input from the user. `str(e)` is one line; `exit_code` is the process status."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
