"""Test fixtures for the training tests: a minimal model that consumes a Batch, and a worker program.

This file holds no tests. The worker is what the multi-process tests start (``python -m`` or
``torchrun``); it runs :func:`gfm.train.run` (through ``run_guarded``) with :class:`TinyMAE` and can inject faults:

- ``--nan-samples 40,41``: the loss is NaN for any micro-batch containing those global samples;
- ``--kill-after-step N``: SIGKILL this process right after step N (and after its checkpoint);
- ``--kill-in-checkpoint N``: SIGKILL while checkpoint N is being written (files on disk, no marker).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from gfm.batch import Batch  # noqa: E402

PATCH = 4


@dataclass
class TinyOutput:
    loss: torch.Tensor
    loss_pos: torch.Tensor
    loss_obs: torch.Tensor


class TinyMAE(nn.Module):
    """Deterministic patch autoencoder (no random masking): every rank count sees the same loss."""

    def __init__(self, dim: int = 32, nan_samples: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self.embed = nn.Linear(PATCH * PATCH + 1, dim)
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, PATCH * PATCH)
        self.nan_samples = nan_samples

    def forward(self, batch: Batch, generator: torch.Generator | None = None) -> TinyOutput:
        B, C, H, W = batch.pixels.shape
        x = batch.pixels.reshape(B, C, H // PATCH, PATCH, W // PATCH, PATCH)
        x = x.permute(0, 1, 2, 4, 3, 5).reshape(B, C, -1, PATCH * PATCH)  # [B, C, N, p*p]
        wl = (batch.wavelength.float().log() - 6.5)[:, :, None, None].expand(-1, -1, x.shape[2], 1)
        h = self.embed(torch.cat([x * 0.0 + x.mean(-1, keepdim=True), wl.to(x.dtype)], -1))
        h = h + self.mlp(self.norm(h))
        pred = self.head(h).float()
        err = (pred - x.float()) ** 2  # [B, C, N, p*p]
        loss_pos = err[:, :, ::2].mean()
        loss_obs = err[:, :, 1::2].mean()
        loss = (loss_pos + loss_obs) / 2
        idx = {int(k.rsplit("-", 1)[1]) for k in batch.keys if k.startswith("synthetic-")}
        if idx & self.nan_samples:
            loss = loss * float("nan")
        return TinyOutput(loss=loss, loss_pos=loss_pos, loss_obs=loss_obs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default=None)
    p.add_argument("--nan-samples", default="")
    p.add_argument("--kill-after-step", type=int, default=-1)
    p.add_argument("--kill-in-checkpoint", type=int, default=-1)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)

    from gfm.config import load
    from gfm.train import checkpoint as ckpt
    from gfm.train.config import TrainConfig
    from gfm.train.runner import run_guarded
    from gfm.train.trainer import Callback

    cfg = load(TrainConfig, args.config, args.overrides)
    nan = frozenset(int(s) for s in args.nan_samples.split(",") if s)
    torch.manual_seed(cfg.seed)
    model = TinyMAE(nan_samples=nan)

    class KillAfter(Callback):
        def on_step(self, trainer: Any, result: Any) -> None:
            if trainer.step == args.kill_after_step:
                os.kill(os.getpid(), signal.SIGKILL)

    if args.kill_in_checkpoint >= 0:
        original = ckpt.atomic_write

        def dying_write(path: Path, text: str) -> Path:
            if path.name == ckpt.COMPLETE and path.parent.name == ckpt.tag_for(args.kill_in_checkpoint):
                os.kill(os.getpid(), signal.SIGKILL)
            return original(path, text)

        ckpt.atomic_write = dying_write  # type: ignore[assignment]

    return run_guarded(cfg, model=model, extra_callbacks=[KillAfter()], prog="NonFiniteError")


if __name__ == "__main__":
    sys.exit(main())
