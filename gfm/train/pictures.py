"""Reconstruction pictures: input / masked input / reconstruction, per-band error, and a spectrum.

Works with any model output that offers ``reconstruction()`` (``[B, C, H, W]`` in input units, visible
pixels pasted back) and ``masked_pixels()`` (``[B, C, H, W]`` bool) — :class:`gfm.model.mae.MAEOutput`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gfm.batch import Batch

RGB_NM = (665.0, 560.0, 490.0)  # red, green, blue centre wavelengths
RGB_TOLERANCE_NM = 40.0
HYPERSPECTRAL_MIN_BANDS = 30


def display_bands(wavelength: torch.Tensor, wanted: Sequence[float] = ()) -> list[int]:
    """Band indices to show: those nearest to ``wanted`` nm.

    Without ``wanted``: an RGB composite when the bands allow, else the first band.
    """
    wl = wavelength.float()
    targets = list(wanted) or list(RGB_NM)
    picks = [int(torch.argmin((wl - t).abs())) for t in targets]
    if wanted:
        return picks
    if all(abs(float(wl[i]) - t) <= RGB_TOLERANCE_NM for i, t in zip(picks, targets)):
        return picks
    return [0]


def _stretch(img: np.ndarray) -> np.ndarray:
    if not np.isfinite(img).any():  # e.g. the shown band was a hidden observation: all grey
        return np.full(img.shape, np.nan)
    lo, hi = np.nanpercentile(img, 2), np.nanpercentile(img, 98)
    return np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)


def _view(x: torch.Tensor, bands: list[int]) -> np.ndarray:
    """``[C, H, W]`` → an ``[H, W, 3]`` or ``[H, W]`` array in [0, 1]."""
    sel = x[bands].float().cpu().numpy()
    if len(bands) == 3:
        return _stretch(np.moveaxis(sel, 0, -1))
    return _stretch(sel[0])


def render(batch: Batch, output: Any, path: Path, step: int, wanted_nm: Sequence[float] = ()) -> Path:
    """Write the reconstruction figure of the first sample of ``batch`` to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = batch.pixels[0].detach().float().cpu()  # [C, H, W]
    recon = output.reconstruction()[0].detach().float().cpu()
    hidden = output.masked_pixels()[0].detach().cpu()
    valid = batch.valid[0].detach().cpu()
    wl = batch.wavelength[0].detach().float().cpu()
    bands = display_bands(wl, wanted_nm)
    masked = x.clone()
    masked[hidden] = float("nan")
    C = x.shape[0]
    hyper = C >= HYPERSPECTRAL_MIN_BANDS
    ncols = 5 if hyper else 4
    fig, axes = plt.subplots(1, ncols, figsize=(3.2 * ncols, 3.4))
    label = "RGB" if len(bands) == 3 else f"{float(wl[bands[0]]):.0f} nm"
    hidden_note = " (band hidden)" if bool(hidden[bands].all()) else ""
    for ax, img, title in zip(
        axes[:3], (x, masked, recon), (f"input ({label})", f"masked input{hidden_note}", "reconstruction")
    ):
        view = _view(img, bands)
        ax.imshow(np.nan_to_num(view, nan=0.5), cmap=None if view.ndim == 3 else "gray")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    scored = hidden & valid  # [C, H, W]
    err = ((recon - x) ** 2 * scored).sum(dim=(1, 2)) / scored.sum(dim=(1, 2)).clamp(min=1)
    order = torch.argsort(wl)
    ax = axes[3]
    ax.bar(range(C), err[order].numpy(), color="tab:red")
    ax.set_title("per-band MSE (hidden pixels)", fontsize=9)
    ax.set_xlabel("band (by wavelength)")
    if C <= 16:
        ax.set_xticks(range(C), [f"{float(w):.0f}" for w in wl[order]], rotation=90, fontsize=6)
    if hyper:
        h, w = x.shape[1] // 2, x.shape[2] // 2
        ax = axes[4]
        ax.plot(wl[order].numpy(), x[order, h, w].numpy(), label="input")
        ax.plot(wl[order].numpy(), recon[order, h, w].numpy(), label="reconstruction")
        ax.set_xlabel("wavelength (nm)")
        ax.set_title(f"spectrum at pixel ({h}, {w})", fontsize=9)
        ax.legend(fontsize=7)
    key = batch.keys[0] if batch.keys else ""
    fig.suptitle(f"step {step}  {key}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_loss_curve(metrics_jsonl: Path, path: Path) -> Path | None:
    """Loss, both loss terms and the learning rate against step, from a run's ``metrics.jsonl``.

    Returns the PNG path, or None when the file holds no logged step yet.
    """
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if isinstance(r.get("loss"), (int, float))]
    if not rows:
        return None
    steps = [r["step"] for r in rows]
    fig, (ax, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.5))
    for key, style in (("loss", "-"), ("loss_pos", "--"), ("loss_obs", ":")):
        if all(key in r for r in rows):
            ax.plot(steps, [r[key] for r in rows], style, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("masked reconstruction loss")
    ax.legend()
    ax.grid(alpha=0.3)
    ax_lr.plot(steps, [r.get("lr", float("nan")) for r in rows], color="tab:gray")
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
