"""mmscale: a trainer for masked-mixer language models."""
__version__ = "0.1.0"
