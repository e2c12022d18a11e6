"""Peak dense FLOP/s of one accelerator, for MFU: a table of the GPUs people train on, picked by device name.

Numbers are the vendors' datasheet figures *without* structured sparsity (NVIDIA prints the 2:4-sparse
figure and marks it "*"; the dense one is half of it). "bf16" is the BF16 tensor-core peak; "fp32" is
plain FP32 (not TF32: mmscale leaves torch's TF32 matmul switch at its default, off).

| device (torch.cuda.get_device_name contains) | bf16 TFLOP/s | fp32 TFLOP/s | source |
|---|---|---|---|
| H100 SXM (`H100` + `HBM3`/`SXM`, GH200)  | 989.5 | 67 | NVIDIA H100 Tensor Core GPU datasheet (1,979* / 67) |
| H100 PCIe                               | 756.5 | 51 | NVIDIA H100 datasheet, PCIe column (1,513* / 51) |
| H100 NVL                                | 835.5 | 60.0 | NVIDIA H100 NVL datasheet (1,671* / 60) |
| H200 (SXM)                              | 989.5 | 67 | NVIDIA H200 datasheet, SXM column (1,979* / 67) |
| H200 NVL                                | 835.5 | 60.0 | NVIDIA H200 datasheet, NVL column (1,671* / 60) |
| A100 (SXM4 and PCIe, 40/80 GB)          | 312.0 | 19.5 | NVIDIA A100 Tensor Core GPU datasheet (312 / 624*; 19.5) |
| A30                                     | 165.0 | 10.3 | NVIDIA A30 datasheet (165 / 330*; 10.3) |
| A10 (not A10G)                          | 125.0 | 31.2 | NVIDIA A10 datasheet (125 / 250*; 31.2) |
| L40S                                    | 362.05 | 91.6 | NVIDIA L40S datasheet (362.05 / 733*; 91.6) |
| L40                                     | 181.05 | 90.5 | NVIDIA L40 datasheet (181.05 / 362.1*; 90.5) |
| L4                                      | 121.0 | 30.3 | NVIDIA L4 datasheet (121 / 242*; 30.3) |
| AMD Instinct MI300X                     | 1307.4 | 163.4 | AMD Instinct MI300X datasheet (peak BF16 / FP32 matrix) |

Anything else (A10G, consumer cards, CPUs) is unknown: MFU stays empty and the run says so; set
`log.peak_flops` to your device's number to get it.
"""
from __future__ import annotations

import re

T = 1e12

# (name pattern, description, {precision: FLOP/s}); the first match wins, so the specific names come first
PEAKS: list[tuple[str, str, dict[str, float]]] = [
    (r"H200.*NVL", "NVIDIA H200 NVL", {"bf16": 835.5 * T, "fp32": 60.0 * T}),
    (r"H200", "NVIDIA H200 SXM", {"bf16": 989.5 * T, "fp32": 67.0 * T}),
    (r"H100.*PCIe", "NVIDIA H100 PCIe", {"bf16": 756.5 * T, "fp32": 51.0 * T}),
    (r"H100.*NVL", "NVIDIA H100 NVL", {"bf16": 835.5 * T, "fp32": 60.0 * T}),
    (r"H100|GH200", "NVIDIA H100 SXM", {"bf16": 989.5 * T, "fp32": 67.0 * T}),
    (r"A100", "NVIDIA A100", {"bf16": 312.0 * T, "fp32": 19.5 * T}),
    (r"\bA30\b", "NVIDIA A30", {"bf16": 165.0 * T, "fp32": 10.3 * T}),
    (r"\bA10\b", "NVIDIA A10", {"bf16": 125.0 * T, "fp32": 31.2 * T}),
    (r"L40S", "NVIDIA L40S", {"bf16": 362.05 * T, "fp32": 91.6 * T}),
    (r"\bL40\b", "NVIDIA L40", {"bf16": 181.05 * T, "fp32": 90.5 * T}),
    (r"\bL4\b", "NVIDIA L4", {"bf16": 121.0 * T, "fp32": 30.3 * T}),
    (r"MI300X", "AMD Instinct MI300X", {"bf16": 1307.4 * T, "fp32": 163.4 * T}),
]


def lookup(device_name: str, precision: str) -> tuple[float | None, str]:
    """(peak FLOP/s or None, which table row matched or why none did) for a device name and bf16|fp32."""
    for pattern, label, peaks in PEAKS:
        if re.search(pattern, device_name):
            return peaks.get(precision), f"{label} {precision} peak from the built-in table"
    return None, f"no peak FLOP/s known for '{device_name}'; set log.peak_flops for MFU"


def device_peak(device, precision: str, override: float = 0.0) -> tuple[float | None, str]:
    """Peak dense FLOP/s of one device of this run: `log.peak_flops` when set, else the table; None on CPU."""
    if override:
        return float(override), "log.peak_flops"
    if getattr(device, "type", str(device)) != "cuda":
        return None, "no MFU on CPU (peak FLOP/s unknown); set log.peak_flops to get one"
    import torch

    return lookup(torch.cuda.get_device_name(device), precision)
