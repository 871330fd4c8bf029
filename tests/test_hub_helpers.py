"""Test fixtures for the export tests: a pretraining worker that records the training-time model's output.

This file holds no tests. ``python tests/test_hub_helpers.py --reference OUT.safetensors key=value ...``
(or under ``torchrun``) runs :func:`gfm.train.runner.run_guarded` with the model the config names (a real
registered model, so an export can rebuild it from the config) and, after the last checkpoint, runs the
DeepSpeed engine's module in eval mode on a fixed batch on every rank (ZeRO-3 gathers its partitions) and
has rank 0 save that batch and the output as safetensors: what an export must reproduce exactly.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from gfm.batch import Batch  # noqa: E402

# the L8-like bands of tests/helpers_shards.py
WAVELENGTHS = [482.0, 561.4, 654.6]
BANDWIDTHS = [60.0, 57.0, 37.0]


def reference_batch(size: int = 16) -> Batch:
    """A fixed, normalised batch of 2 tiles × 3 observations with some invalid pixels and known dates."""
    g = torch.Generator().manual_seed(1234)
    pixels = torch.randn(2, 3, size, size, generator=g)
    valid = torch.rand(2, 3, size, size, generator=g) > 0.1
    return Batch(
        pixels=torch.where(valid, pixels, torch.zeros_like(pixels)),
        wavelength=torch.tensor([WAVELENGTHS] * 2),
        bandwidth=torch.tensor([BANDWIDTHS] * 2),
        kind=torch.zeros(2, 3, dtype=torch.int64),
        time=torch.tensor([[16651.0] * 3, [math.nan] * 3]),
        valid=valid,
        gsd=torch.tensor([30.0, 30.0]),
    )


def forward(model: Any, batch: Batch) -> torch.Tensor:
    """The model's deterministic output on ``batch``: HyperMAE prediction with a fixed masking generator."""
    with torch.no_grad():
        out = model(batch, generator=torch.Generator().manual_seed(7))
    return out.pred if hasattr(out, "pred") else out


def _pytorch_linear() -> Any:
    """PyTorch's own ``torch.nn.functional.linear`` (DeepSpeed keeps it when it patches the function)."""
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses

    return getattr(InsertPostInitMethodToModuleSubClasses, "linear_bk", torch.nn.functional.linear)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--reference", required=True, help="where rank 0 saves the batch and the output")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    from safetensors.torch import save_file

    from gfm import distributed as gdist
    from gfm.config import load
    from gfm.train.config import TrainConfig
    from gfm.train.runner import run_guarded
    from gfm.train.trainer import Callback

    cfg = load(TrainConfig, None, args.overrides)

    class Reference(Callback):
        def on_end(self, trainer: Any) -> None:
            module = trainer.module.engine.module
            module.eval()
            batch = reference_batch()
            as_trained = forward(module, batch)  # every rank: ZeRO-3 gathers parameters collectively
            # At ZeRO-3 DeepSpeed replaces torch.nn.functional.linear process-wide by matmul + add (its
            # LinearFunctionForZeroStage3), which rounds differently from PyTorch's fused linear. The reference
            # is the same module and parameters with PyTorch's own linear, as a fresh process computes it.
            linear = torch.nn.functional.linear
            original = _pytorch_linear()
            torch.nn.functional.linear = original
            try:
                pred = forward(module, batch)
            finally:
                torch.nn.functional.linear = linear
            if gdist.is_main():
                tensors = {k: v.contiguous() for k, v in batch.tensors().items()}
                save_file({**tensors, "pred": pred.contiguous(), "pred_as_trained": as_trained.contiguous()},
                          args.reference)

    return run_guarded(cfg, extra_callbacks=[Reference()], prog="hub worker")


if __name__ == "__main__":
    sys.exit(main())
