"""Fast kernels for mmscale models: masked token mixing and a chunked LM-head cross-entropy."""
from mmscale.ops.token_mixing import IMPLS, choose_impl, token_mix

__all__ = ["IMPLS", "choose_impl", "token_mix"]
