"""Entry point kept for `python -m mmscale.train ...` and `deepspeed|torchrun mmscale/train.py ...`; the training
loop itself is mmscale/run/train.py (its docstring lists every way to start it)."""
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # `deepspeed mmscale/train.py` / `torchrun mmscale/train.py` run it as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mmscale.run.train import main

if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
