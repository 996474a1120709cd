"""Model FLOPs per sample (counted, not estimated) and model FLOPs utilisation (MFU).

FLOPs are counted with `torch.utils.flop_counter.FlopCounterMode` over one full training step
(forward + backward; the optimiser's elementwise work is not counted, as in the usual MFU
definition). MFU = achieved model FLOP/s / the device's peak FLOP/s. The peak is a property of
the device and the precision, so it comes from `--peak-tflops` or, on GPUs we know, from the
datasheet table below (dense bf16 tensor-core peaks); on CPU there is no reliable peak and MFU
is reported as n/a with the achieved FLOP/s alone.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' datasheets.
GPU_PEAK_TFLOPS_BF16 = {
    "H200": 989.0,
    "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
    "H100": 989.0,
    "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "V100": 125.0,
}


def device_peak_tflops(given: float | None = None, device: str | torch.device = "cpu") -> float | None:
    """Peak TFLOP/s: `given` if set, else the datasheet value for a known GPU, else None."""
    if given:
        return float(given)
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    for key in sorted(GPU_PEAK_TFLOPS_BF16, key=len, reverse=True):  # most specific name first
        if key in name:
            return GPU_PEAK_TFLOPS_BF16[key]
    return None


def count_flops(fn: Callable[[], object]) -> int:
    """Total FLOPs that `fn()` executes (matmuls, convolutions, attention), counted by torch."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def flops_per_sample(step: Callable[[], object], batch_size: int) -> float:
    """FLOPs of one training step (forward + backward) divided by its batch size."""
    return count_flops(step) / batch_size


def mfu(flops_per_sample_: float, samples_per_s: float, peak_tflops: float | None) -> dict:
    """Achieved model FLOP/s and MFU (None without a peak, e.g. on CPU)."""
    achieved = flops_per_sample_ * samples_per_s
    return {"flops_per_sample": flops_per_sample_, "achieved_tflops": achieved / 1e12,
            "peak_tflops": peak_tflops,
            "mfu": (achieved / (peak_tflops * 1e12)) if peak_tflops else None}
