"""Import mosaicml-streaming without its vision extras.

`import streaming` imports `streaming.vision`, which needs torchvision; the CPU torch of this
project cannot load PyPI's torchvision (see the README, "Installing"). Registering an empty
module under that name first makes the import work; mmscale never uses the vision datasets.
"""
from __future__ import annotations

import sys
import types


def import_streaming():
    """Return the `streaming` package, importing it with an empty `streaming.vision` if needed."""
    if "streaming" not in sys.modules:
        try:
            import torchvision  # noqa: F401  (a working torchvision needs no shim)
        except Exception:
            sys.modules.setdefault("streaming.vision", types.ModuleType("streaming.vision"))
    import streaming  # lazy: only after the shim above (the reason this module exists)

    return streaming
