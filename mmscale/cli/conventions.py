"""One convention for every `mmscale` command's flags, applied by the dispatcher (mmscale.cli) to each command's parser.

- Help: every option has a line of help, and its default is shown when it has one.
- Inputs are `--data` (text files, datasets); outputs are `--out` (a file or folder to write).
  Old spellings keep working and print a one-line deprecation note once the command succeeded (an error
  stays one line): `--input` (prepare, tokenizer train) is `--data`; convert's positional OUT is `--out OUT`.
- `--json` prints the result as JSON on stdout; `--json FILE` (or `--json=FILE`) writes it to FILE instead.
  Every output is checked before the work: its folder must exist, and an existing FILE is replaced only with
  `--overwrite` (commands that print --json get that flag for it).
- `--no-progress` turns progress bars off wherever there is one (prepare; and the training commands, where
  it is the same as the override log.progress=false).
- Commands that take dotted config overrides point to `mmscale config keys` / `mmscale config show`.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import tempfile
from pathlib import Path

from mmscale.errors import UserError
from mmscale.fsutil import resolved_path

# help for options that their command module leaves without one (by argparse dest)
FALLBACK_HELP = {
    "seed": "random seed",
    "steps": "optimisation steps",
    "top_k": "how many top candidates count as recovered",
    "max_new_tokens": "tokens to generate after the prompt",
    "num_samples": "how many samples to print",
    "layout": "packed: documents joined with EOS and cut into n_ctx + 1 windows; padded: one document per sample",
    "val_fraction": "fraction of documents held out as the val split",
    "model_type": "sentencepiece model type",
    "dtype": "dtype of the exported weights",
    "nodes": "number of nodes",
    "export": "an export folder (mmscale convert)",
    "batch_size": "samples per forward pass",
    "no_progress": "no progress bar",
    "workdir": "folder for the demo's data and runs",
    "vocab_size": "tokenizer vocabulary size",
    "overwrite": "replace what is already there",
}

CONFIG_EPILOG = ("Every config key with its default, allowed values and meaning: `mmscale config keys`; "
                 "the resolved config for these arguments: `mmscale config show --config X [overrides]`.")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Shows "(default: X)" after an option's help unless the help already says it or there is none to show."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if (text and "default" not in text and d is not argparse.SUPPRESS and d is not None and d is not False
                and d != [] and (action.option_strings or action.nargs in ("?", "*"))):
            text += " (default: %(default)s)"
        return text


def _smallest(action: argparse.Action) -> int:
    """The smallest value an integer option accepts: seeds and options whose help gives 0 a meaning ("0 = all",
    "default 0: ...") take 0; every other count or size takes 1 or more."""
    text = (action.help or "").lower()
    if (action.dest == "seed" or action.dest.endswith("_seed") or action.default == 0 or "0 =" in text
            or "0:" in text or "0 means" in text):
        return 0
    return 1


def _subparsers(parser: argparse.ArgumentParser):
    yield parser
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub in a.choices.values():
                yield from _subparsers(sub)


def _add_alias(parser: argparse.ArgumentParser, old: str, new: str) -> bool:
    """Make option `new` a spelling of the existing option `old` (listed first in help)."""
    action = parser._option_string_actions.get(old)
    if action is None or new in parser._option_string_actions:
        return False
    action.option_strings.insert(0, new)
    parser._option_string_actions[new] = action
    return True


class Conventions:
    def __init__(self, command: str, parser: argparse.ArgumentParser):
        self.command = command
        self.deprecated: dict[str, str] = {}
        self.json_file: str | None = None
        self.out_positional = False
        self.json_takes_file = False
        self.json_flag = False
        self.has_no_progress_override = False
        self.notes: list[str] = []
        self.status: int | None = None  # the command's exit status, set by cli.main
        self.counts: list[tuple[argparse.Action, int]] = []  # integer options: (action, smallest value allowed)
        for p in _subparsers(parser):
            p.formatter_class = HelpFormatter
            if _add_alias(p, "--input", "--data"):
                self.deprecated["--input"] = "--data"
            for a in list(p._actions):
                if a.help is None and a.dest in FALLBACK_HELP:
                    a.help = FALLBACK_HELP[a.dest]
                if not a.option_strings and a.dest == "out" and a.nargs is None:
                    # a positional OUT (convert): keep it, optional, and add --out
                    a.nargs, a.required, a.default = "?", False, None
                    a.help = (a.help or "output") + " (deprecated position: use --out)"
                    p.add_argument("--out", dest="_out_opt", metavar="OUT", default=None, help=a.help.split(
                        " (deprecated")[0])
                    self.out_positional = True
                if a.dest == "json" and a.option_strings:
                    if a.nargs == 0:
                        self.json_flag = True
                        if "--overwrite" not in p._option_string_actions:
                            p.add_argument("--overwrite", dest="_json_overwrite", action="store_true",
                                           help="replace an existing --json FILE")
                    elif a.nargs is None:
                        a.nargs, a.const = "?", "-"
                        a.help = "print the result as JSON on stdout, or write it to FILE"
                        self.json_takes_file = True
                if a.type in (int, float) and a.option_strings and a.help is not argparse.SUPPRESS:
                    self.counts.append((a, _smallest(a)))
                if a.dest == "overrides" and not a.option_strings:
                    p.epilog = CONFIG_EPILOG
                    if command not in ("model-info", "config") and "--no-progress" not in p._option_string_actions:
                        p.add_argument("--no-progress", dest="_no_progress", action="store_true",
                                       help="no progress bar (the same as log.progress=false)")
                        self.has_no_progress_override = True

    def rewrite_argv(self, argv: list[str]) -> list[str]:
        out, skip = [], False
        for i, tok in enumerate(argv):
            if skip:
                skip = False
                continue
            flag = tok.split("=", 1)[0]
            if flag in self.deprecated:
                self.note(f"{flag} is deprecated; use {self.deprecated[flag]} (the same option)")
            if self.json_flag and tok.startswith("--json="):
                self.json_file = tok.split("=", 1)[1]
                tok = "--json"
            elif self.json_flag and tok == "--json" and i + 1 < len(argv) and not argv[i + 1].startswith("-") \
                    and "=" not in argv[i + 1]:  # overrides always hold "=": this is a FILE
                self.json_file, skip = argv[i + 1], True
            out.append(tok)
        if self.has_no_progress_override and "--no-progress" in out:
            # anywhere among the overrides (argparse stops a `*` positional at the first option otherwise)
            out = ["--no-progress"] + [t for t in out if t != "--no-progress"]
        return out

    def note(self, msg: str) -> None:
        """Deprecation notes are printed after the command succeeded: an error stays one line."""
        if msg not in self.notes:
            self.notes.append(msg)

    def _print_notes(self) -> None:
        if self.status not in (None, 0):
            return
        for msg in self.notes:
            print(f"mmscale {self.command}: note: {msg}", file=sys.stderr)

    def check_counts(self, args: argparse.Namespace) -> None:
        """Every integer option is a count, a size or a seed: 0 only where its help gives 0 a meaning, never < 0.
        Every number option (fractions, rates, temperatures, minutes, memory) is a finite number >= 0; a learning
        rate > 0. The command's own checks (upper bounds) follow."""
        for a, low in self.counts:
            v = getattr(args, a.dest, None)
            flag = max(a.option_strings, key=len)
            if isinstance(v, float):
                if not math.isfinite(v) or v < 0 or (v == 0 and a.dest in ("lr", "learning_rate")):
                    bound = "> 0" if a.dest in ("lr", "learning_rate") else ">= 0"
                    raise UserError(f"{flag} must be a number {bound}, got {v}", 2)
            elif isinstance(v, int) and v < low:
                what = "a count or size" if low == 1 else "0 or more"
                raise UserError(f"{flag} must be >= {low} ({what}), got {v}", 2)

    @contextlib.contextmanager
    def outputs(self, args: argparse.Namespace):
        """Applies --out / --json / --no-progress to `args` around the command's run()."""
        self.check_counts(args)
        if self.out_positional:
            opt = getattr(args, "_out_opt", None)
            if opt is not None and args.out is not None and opt != args.out:
                raise UserError(f"two outputs given ('{args.out}' and --out '{opt}'); give only --out", 2)
            if args.out is not None and opt is None:
                self.note("the output as a positional argument is deprecated; use --out OUT")
            args.out = opt if opt is not None else args.out
            if args.out is None:
                raise UserError("no output given; pass --out FOLDER", 2)
        if getattr(args, "_no_progress", False):
            args.overrides = list(args.overrides or []) + ["log.progress=false"]
        tmp = None
        if self.json_takes_file and getattr(args, "json", None) == "-":
            fd, tmp = tempfile.mkstemp(prefix="mmscale-json-", suffix=".json")
            os.close(fd)
            os.unlink(tmp)
            args.json = tmp
        elif self.json_takes_file and isinstance(getattr(args, "json", None), str) and args.json:
            # --json FILE of a command that writes it itself: a file (not a folder, FIFO or device) in a folder
            # that exists; an existing one is replaced only with --overwrite where the command has that flag
            check_output_path(args.json, "--json", kind="file", exists_code=2,
                              overwrite=bool(getattr(args, "overwrite", True)))
        try:
            if self.json_file is not None:
                target = Path(self.json_file)
                if not target.parent.is_dir():
                    raise UserError(f"--json: folder '{target.parent}' does not exist; create it first", 2)
                if target.exists() and not (getattr(args, "overwrite", False)
                                            or getattr(args, "_json_overwrite", False)):
                    raise UserError(f"--json: '{target}' already exists; pass --overwrite or another --json path", 2)
                check_output_path(target, "--json", kind="file", overwrite=True)
                # written under a temporary name and renamed once the command succeeded: an interrupted or failed
                # command never leaves a partial FILE (nor replaces the old one)
                part = target.with_name(f".{target.name}.partial-{os.getpid()}")
                try:
                    with part.open("w") as f, contextlib.redirect_stdout(f):
                        yield
                    os.replace(part, target)
                finally:
                    part.unlink(missing_ok=True)
            else:
                yield
            if tmp is not None and Path(tmp).is_file():
                sys.stdout.write(Path(tmp).read_text().rstrip("\n") + "\n")
            self._print_notes()
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)


def check_output_path(out: str | os.PathLike, flag: str = "--out", *, kind: str = "dir", overwrite: bool = False,
                      inputs=(), exists_code: int = 1) -> Path:
    """The one check of an output path, before any work (every command that writes a file or folder):

    - an existing output is replaced only with --overwrite;
    - --overwrite replaces an output of the same kind only: a file where a folder is written (or a folder where a
      file is written, or a FIFO / device / socket) is refused, with or without it;
    - an output that is an input, or holds one (removing or writing it would destroy the input), is refused with
      or without --overwrite; an output inside an input folder (an export inside its run dir) is allowed both ways;
    - a file output needs its folder to exist.
    Exit status 2 (a wrong argument); `exists_code` (1, as before) for an output that exists without --overwrite.
    """
    exit_code = 2
    out = Path(out)
    if out.is_symlink() and not out.exists():
        raise UserError(f"{flag} '{out}' is a broken symbolic link; remove it or choose another {flag}", exit_code)
    if out.exists():
        is_dir, is_file = out.is_dir(), out.is_file()
        if not (is_dir or is_file):
            raise UserError(f"{flag} '{out}' is a special file (FIFO, device or socket), not a "
                            f"{'folder' if kind == 'dir' else 'file'}; choose another {flag}", exit_code)
        if kind == "dir" and not is_dir:
            raise UserError(f"{flag} '{out}' is an existing file, not a folder; --overwrite replaces a folder only: "
                            f"remove the file or choose another {flag}", exit_code)
        if kind == "file" and is_dir:
            raise UserError(f"{flag} '{out}' is an existing folder; give a file path for {flag}", exit_code)
    ro = resolved_path(out)
    for inp in inputs:
        if not inp or "://" in str(inp) or str(inp).startswith("hf:"):
            continue
        ri = resolved_path(inp)
        if ro == ri or ro in ri.parents:
            raise UserError(f"{flag} '{out}' overlaps the input '{inp}' (the same path or a folder holding it); "
                            f"writing there would destroy the input: choose another {flag}", exit_code)
    if out.exists() and not overwrite:
        raise UserError(f"{flag} '{out}' already exists; pass --overwrite to replace it or choose another {flag}",
                        exists_code)
    if kind == "file" and not out.parent.is_dir():
        raise UserError(f"{flag}: folder '{out.parent}' does not exist; create it first", exit_code)
    return out


def apply(command: str, parser: argparse.ArgumentParser) -> Conventions:
    return Conventions(command, parser)
