"""Language models: the masked mixer and its Llama-style baseline, single-device and parallelism-free.

    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model)          # fp32 on CPU
    logits = model(ids)                     # [B, L, V]
    loss = model(ids, labels)               # mean shifted cross-entropy, -100 ignored
"""
from __future__ import annotations

from mmscale.models.common import IGNORE_INDEX, CausalLM, lm_loss  # noqa: F401
from mmscale.models.mixer import MaskedMixerLM, TokenMixer  # noqa: F401
from mmscale.models.transformer import LlamaLM  # noqa: F401


def build_model(model_cfg) -> CausalLM:
    """The model a ModelConfig describes, in fp32 on CPU. Seed torch first for reproducible weights."""
    if model_cfg.kind == "mixer":
        return MaskedMixerLM(model_cfg)
    if model_cfg.kind == "transformer":
        return LlamaLM(model_cfg)
    raise ValueError(f"model.kind must be 'mixer' or 'transformer', got {model_cfg.kind!r}")
