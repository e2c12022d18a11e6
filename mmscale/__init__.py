"""mmscale: a trainer for masked-mixer language models."""
__version__ = "0.1.0"


def __getattr__(name):
    # lazy, so that `import mmscale` (and the CLI) does not import torch
    if name == "Embedder":
        from mmscale.retrieval.embedder import Embedder
        return Embedder
    raise AttributeError(f"module 'mmscale' has no attribute {name!r}")
