"""FLOP accounting: the model's analytic count per step and the device's measured matmul peak."""

from __future__ import annotations

import time

import torch
from torch import nn

from gfm.batch import Batch

TRAIN_FLOPS_PER_FORWARD = 3  # backward costs about twice the forward


def train_flops(model: nn.Module, batch: Batch) -> float | None:
    """FLOPs of one training micro-step (forward + backward) on ``batch``; None if the model can't say."""
    flops = getattr(model, "flops", None)
    if not callable(flops):
        return None
    b, c, h, w = batch.pixels.shape
    return float(TRAIN_FLOPS_PER_FORWARD * flops(b, c, (h, w)))


def tokens_in(model: nn.Module, batch: Batch) -> int:
    """Tokens the model forms from ``batch`` (rows × positions), or pixels when it has no tokeniser."""
    b, c, h, w = batch.pixels.shape
    encoder = getattr(model, "encoder", None)
    grid_size = getattr(encoder, "grid_size", None)
    if callable(grid_size):
        rows, positions = grid_size(c, (h, w))
        return int(b * rows * positions)
    return int(b * c * h * w)


def measure_peak_flops(
    device: torch.device, dtype: torch.dtype = torch.bfloat16, max_size: int = 2048, seconds: float = 0.5
) -> float:
    """Matmul FLOP/s this process reaches on ``device``: the ceiling for utilisation figures.

    Square matmuls of growing size (256, 512, ...) are each repeated for about ``seconds`` until one
    product takes 0.1 s or ``max_size`` is reached; the best rate of any timed burst counts. On a shared machine
    the figure reflects what this process can get right now.
    """

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def timed(a: torch.Tensor, b: torch.Tensor, reps: int) -> float:
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b)
        sync()
        return max(time.perf_counter() - t0, 1e-9)

    best, size = 0.0, 256
    while size <= max_size:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        one = timed(a, b, 1)  # also the warm-up
        reps = max(1, int(seconds / 3 / one))
        best = max([best] + [2 * size**3 * reps / timed(a, b, reps) for _ in range(3)])
        if one >= 0.1:  # large enough that launch and thread wake-up costs no longer matter
            break
        size *= 2
    return best
