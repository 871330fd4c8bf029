"""``gfm demo``: the pipeline end to end on a real scene that a PyPI package ships.

The AVIRIS Indian Pines cube (145 x 145 x 200, 1992-06-12, 20 m) ships inside ``tensorly``. The demo
tiles it into shards with labels, prints the ``info`` summary, verifies the shards, then pretrains
LESS ViT-Tiny as a HyperMAE on them for a few minutes on the CPU (loss curve, reconstruction and
spectrum pictures, checkpoints and ``model.safetensors`` in ``OUT/run``).

tensorly ships the cube without its wavelength list. The demo uses the nominal AVIRIS band centres
(linear within each of the instrument's spectrometers, within ~11 nm of the calibrated list) with the
20 water-absorption bands of the "corrected" product removed; pass ``--wavelengths`` for exact ones.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# The 220 recorded channels as (first centre nm, spacing nm, count) runs, one per spectrometer stretch.
_AVIRIS_1992_RUNS = ((399.6, 9.88, 31), (687.3, 9.61, 63), (1284.1, 9.78, 95), (2260.2, 9.93, 2), (2232.2, 9.88, 29))
# 0-based channels removed in Indian_pines_corrected (water absorption): 104-108, 150-163, 220 (1-based).
_WATER_BANDS = set(range(103, 108)) | set(range(149, 163)) | {219}


def aviris_indian_pines_wavelengths() -> list[float]:
    """Nominal centre wavelengths (nm) of the 200 bands of Indian_pines_corrected."""
    centres = np.concatenate([start + step * np.arange(n) for start, step, n in _AVIRIS_1992_RUNS])
    return [round(float(c), 2) for i, c in enumerate(centres) if i not in _WATER_BANDS]


def tensorly_indian_pines() -> tuple[Path, Path]:
    """Paths of the Indian Pines cube and ground truth inside the installed tensorly package."""
    spec = importlib.util.find_spec("tensorly")
    if spec is None or spec.origin is None:
        raise SystemExit("gfm demo: needs the 'tensorly' package (pip install tensorly), which ships Indian Pines")
    base = Path(spec.origin).parent / "datasets" / "data"
    cube, gt = base / "Indian_pines_corrected.npy", base / "Indian_pines_gt.npy"
    if not cube.exists():
        raise SystemExit(f"gfm demo: {cube} not found in this tensorly version")
    return cube, gt


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``gfm demo``."""
    p = argparse.ArgumentParser(
        prog="gfm demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="demo_out", help="working directory (default demo_out)")
    p.add_argument("--wavelengths", help="exact wavelength list for the cube (default: nominal AVIRIS centres)")
    p.add_argument("--tile", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shards-only", action="store_true", help="stop after building and checking the shards")
    a = p.parse_args(argv)

    from shards.cli import main as shards_main

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cube, gt = tensorly_indian_pines()
    wl = Path(a.wavelengths) if a.wavelengths else out / "aviris_indian_pines_wavelengths_nm.txt"
    if not a.wavelengths:
        wl.write_text("\n".join(f"{w:.2f}" for w in aviris_indian_pines_wavelengths()) + "\n")
    shards_dir = out / "shards"
    print(f"[1/4] building shards from {cube.name} (tensorly) -> {shards_dir}", flush=True)
    rc = shards_main([
        "build", str(cube), "--wavelengths", str(wl), "--label", str(gt), "--sensor", "aviris",
        "--scene-id", "indian_pines", "--date", "1992-06-12", "--gsd", "20", "--tile", str(a.tile),
        "--stride", str(a.tile // 2), "--shard-size", "16MB", "--workers", str(a.workers), "--out", str(shards_dir),
    ])
    if rc:
        return rc
    print("\n[2/4] gfm shards info", flush=True)
    shards_main(["info", str(shards_dir), "--plot", str(out / "band_stats.png")])
    print("\n[3/4] gfm shards verify", flush=True)
    rc = shards_main(["verify", str(shards_dir)])
    if rc or a.shards_only:
        return rc
    if importlib.util.find_spec("pretrain.demo") is not None:
        from pretrain.demo import run_demo_pretraining

        return int(run_demo_pretraining(shards_dir, out) or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
