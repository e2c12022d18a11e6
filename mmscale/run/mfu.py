"""Model FLOP utilisation of the training loop: model FLOPs per token and MFU against the device's peak.

Convention (also in run/metrics.py's docstring): model FLOPs per token = `model.flops_per_token()`: matmul
FLOPs (2 per multiply-add) of forward + backward (= 3 x forward), activation recomputation not counted.
"dense" counts the full T x T token mixing / attention, "causal" only the live lower triangle.
MFU = tokens_per_s x FLOPs per token / (peak x ranks); null when the peak is unknown (CPU, unknown GPUs).
"""
from __future__ import annotations

from mmscale.peak_flops import device_peak


def flops_per_token_both(model) -> dict:
    """{"dense": ..., "causal": ...} training FLOPs per token; 6 x parameters for both if the model cannot say."""
    fn = getattr(model, "flops_per_token", None)
    if fn is not None:
        flops = fn()
        if isinstance(flops, dict):
            return {"dense": float(flops["dense"]), "causal": float(flops.get("causal", flops["dense"]))}
        return {"dense": float(flops), "causal": float(flops)}
    n = 6.0 * sum(p.numel() for p in model.parameters())
    return {"dense": n, "causal": n}


def mfu_columns(tokens_per_s: float, flops: dict, peak: float | None, world_size: int) -> dict:
    """The MFU columns of a training row: dense and causal (live) FLOPs; null when the peak is unknown."""
    if not peak:
        return {"mfu_dense": None, "mfu_causal": None, "mfu": None}
    denom = peak * world_size
    dense = tokens_per_s * flops["dense"] / denom
    return {"mfu_dense": dense, "mfu_causal": tokens_per_s * flops["causal"] / denom, "mfu": dense}


class Mfu:
    """The model's FLOPs per token and the device's peak, fixed for the run; `columns(tokens_per_s)` per log row."""

    def __init__(self, model, device, precision: str, peak_flops: float, world_size: int):
        self.flops = flops_per_token_both(model)
        self.peak, self.peak_note = device_peak(device, precision, peak_flops)
        self.world_size = world_size

    def columns(self, tokens_per_s: float) -> dict:
        return mfu_columns(tokens_per_s, self.flops, self.peak, self.world_size)
