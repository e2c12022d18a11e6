"""`mmscale` command line: the dispatcher (`mmscale COMMAND`, `python -m mmscale.cli COMMAND`).

Each command lives in its own module, imported only when it runs (the module path in COMMANDS: importing every
command would import torch, deepspeed's checks and transformers for `mmscale --help`). A command module defines
`add_arguments(parser)` and `run(args) -> int`; mmscale.cli.conventions adds the shared flags.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from mmscale import __version__
from mmscale.cli import conventions
from mmscale.errors import exit_status, install_interrupt_handlers, interrupt_status, restore_handlers

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "model-info": ("mmscale.model_info", "parameters, FLOPs per token and memory of a model config"),
    "plan": ("mmscale.plan", "memory, step time and the layout to use for a config on N GPUs (or this CPU)"),
    "tokenizer": ("mmscale.data.tokenizer", "train a lossless sentencepiece tokenizer (`tokenizer train`)"),
    "prepare": ("mmscale.data.prepare", "tokenize text/JSONL/Parquet into MDS shards + a manifest"),
    "data": ("mmscale.data.cli", "built-in story corpus with summaries (`data synth`)"),
    "train": ("mmscale.run.train", "pre-train a model (single process; use deepspeed/torchrun for more)"),
    "launch": ("mmscale.launch", "submit training to SLURM (or run locally) through submitit"),
    "convert": ("mmscale.export.convert", "checkpoint of any engine -> consolidated export"),
    "export-hf": ("mmscale.export.hf", "export or checkpoint -> Hugging Face folder (transformers, "
                                       "sentence-transformers, lm-eval)"),
    "generate": ("mmscale.export.generate", "sample text from an export"),
    "eval": ("mmscale.export.evaluate", "mean loss and perplexity of an export on a dataset or text files"),
    "retrieval": ("mmscale.retrieval.cli", "retrieval fine-tuning, evaluation, collection import (`retrieval train|eval|import`)"),
    "representation": ("mmscale.representation", "input-representation accuracy of an export (the paper's metric)"),
    "report": ("mmscale.report", "one self-contained HTML page comparing runs (curves, config diff, samples)"),
    "experiment": ("mmscale.experiment", "a fair mixer-vs-transformer comparison from a spec "
                                         "(`experiment run|status|report`)"),
    "config": ("mmscale.cli.config", "every config key with its default, allowed values and meaning "
                                     "(`config show|keys`)"),
}


def _usage() -> str:
    w = max(map(len, COMMANDS))
    lines = ["usage: mmscale COMMAND [options]   (mmscale COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{w}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def _non_utf8_argument(args: list[str]) -> str | None:
    """The first argument holding bytes that are not UTF-8 (Python keeps them as lone surrogates), shown with
    those bytes escaped; paths are exempt (a file name may be any bytes): an existing path, or one with a '/' in
    a folder that exists (an output)."""
    for tok in args:
        try:
            tok.encode("utf-8")
            continue
        except UnicodeEncodeError:
            pass
        value = tok.split("=", 1)[1] if tok.startswith("--") and "=" in tok else tok
        if os.path.lexists(value) or ("/" in value and os.path.isdir(os.path.dirname(value) or ".")):
            continue
        return repr(tok.encode("utf-8", "surrogateescape"))[1:]
    return None


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # `mmscale --help | head`: the reader left; no traceback, and nothing more to flush into the pipe
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by a closed pipe


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"mmscale {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"mmscale: error: unknown command '{name}'; valid commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    bad = _non_utf8_argument(argv[1:])
    if bad is not None:
        print(f"mmscale {name}: error: the argument {bad} is not UTF-8 text; pass text arguments (prompts, "
              "separators, overrides) as UTF-8", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"mmscale {name}", description=COMMANDS[name][1],
                                     formatter_class=conventions.HelpFormatter)
    module.add_arguments(parser)
    conv = conventions.apply(name, parser)  # help with defaults, --data/--out/--json/--no-progress
    args = parser.parse_args(conv.rewrite_argv(argv[1:]))

    def run() -> int:
        with conv.outputs(args):
            conv.status = int(module.run(args) or 0)  # deprecation notes only after a success
        return conv.status

    old = install_interrupt_handlers(f"mmscale {name}")  # SIGINT and SIGTERM: one line, `finally` blocks run
    try:
        return exit_status(f"mmscale {name}", run)
    except KeyboardInterrupt as e:
        return interrupt_status(f"mmscale {name}", e)
    finally:
        restore_handlers(old)

