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
import json
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from demo.indian_pines import DemoDataError, aviris_indian_pines_wavelengths, tensorly_indian_pines

#: The pretraining config of the demo (shipped with the pretrain program), as the command line names it.
CONFIG_NAME = "pretrain/configs/demo_indian_pines.yaml"


def build_shards(out: Path, *, wavelengths: str | None, tile: int, workers: int) -> int:
    """Steps 1-3: shards from the cube (``gfm shards build``), then ``info`` and ``verify``; the exit code."""
    from shards.cli import main as shards_main

    try:
        cube, gt = tensorly_indian_pines()
    except DemoDataError as e:
        raise SystemExit(f"gfm demo: {e}") from None
    wl = Path(wavelengths) if wavelengths else out / "aviris_indian_pines_wavelengths_nm.txt"
    if not wavelengths:
        wl.write_text("\n".join(f"{w:.2f}" for w in aviris_indian_pines_wavelengths()) + "\n")
    shards_dir = out / "shards"
    print(f"[1/4] building shards from {cube.name} (tensorly) -> {shards_dir}", flush=True)
    rc = shards_main([
        "build", str(cube), "--wavelengths", str(wl), "--label", str(gt), "--sensor", "aviris",
        "--scene-id", "indian_pines", "--date", "1992-06-12", "--gsd", "20", "--tile", str(tile),
        "--stride", str(tile // 2), "--shard-size", "16MB", "--workers", str(workers), "--out", str(shards_dir),
    ])
    if rc:
        return rc
    print("\n[2/4] gfm shards info", flush=True)
    shards_main(["info", str(shards_dir), "--plot", str(out / "band_stats.png")])
    print("\n[3/4] gfm shards verify", flush=True)
    return shards_main(["verify", str(shards_dir)])


def pretrain(shards_dir: Path, out: Path, steps: int | None = None) -> int:
    """Step 4: pretrain LESS ViT-Tiny on ``shards_dir`` into ``out/run``; print where the results are."""
    from pretrain.__main__ import main as pretrain_main

    config = resources.files("pretrain") / "configs" / "demo_indian_pines.yaml"
    run_dir = out / "run"
    overrides = [f"data.loader.shards={shards_dir}", f"run_dir={run_dir}"]
    if steps is not None:
        overrides.append(f"steps={steps}")
    print(f"\n[4/4] gfm pretrain --config {CONFIG_NAME} {' '.join(overrides)}", flush=True)
    rc = pretrain_main(["--config", str(config), *overrides])
    if rc:
        return rc
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        losses = [r["loss"] for r in rows if "loss" in r]
        if losses:
            print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} logged steps")
    pictures = sorted(run_dir.rglob("images/*.png")) + sorted(run_dir.glob("loss_curve.png"))
    print(f"run directory: {run_dir}")
    for p in pictures[-3:]:
        print(f"  picture: {p}")
    weights = sorted(run_dir.rglob("model.safetensors"))
    if weights:
        print(f"  weights: {weights[-1]}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``gfm demo``: build and check the shards, then pretrain on them."""
    p = argparse.ArgumentParser(
        prog="gfm demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="demo_out", help="working directory (default demo_out)")
    p.add_argument("--wavelengths", help="exact wavelength list for the cube (default: nominal AVIRIS centres)")
    p.add_argument("--tile", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--shards-only", action="store_true", help="stop after building and checking the shards")
    a = p.parse_args(argv)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rc = build_shards(out, wavelengths=a.wavelengths, tile=a.tile, workers=a.workers)
    if rc or a.shards_only:
        return rc
    return pretrain(out / "shards", out)


if __name__ == "__main__":
    sys.exit(main())
