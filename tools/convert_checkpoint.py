#!/usr/bin/env python
"""Checkpoint of any engine -> consolidated export; the same as `mmscale convert`.

    python tools/convert_checkpoint.py runs/tiny exports/tiny [--dtype bf16] [--verify] [--tokenizer T]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mmscale.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
