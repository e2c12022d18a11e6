"""`python -m mmscale.cli COMMAND ...`: the same dispatcher as the `mmscale` console script."""
import sys

from mmscale.cli import main

sys.exit(main())
