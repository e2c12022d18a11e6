"""Fast kernels for mmscale models: masked token mixing and a chunked LM-head cross-entropy.

    out = token_mix(weight, x, causal=True, impl="auto")          # dense | blocked | triton, all exact
    loss = lm_head_cross_entropy(hidden, lm_head.weight, labels)  # chunked when the logits are large
"""
from mmscale.ops.cross_entropy import chunked_cross_entropy, lm_head_cross_entropy
from mmscale.ops.token_mixing import IMPLS, choose_impl, token_mix

__all__ = ["IMPLS", "choose_impl", "chunked_cross_entropy", "lm_head_cross_entropy", "token_mix"]
