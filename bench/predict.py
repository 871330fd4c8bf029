"""Whole-scene prediction benchmark: peak memory stays flat as the scene grows.

``gfm predict``'s engine (:func:`gfm.infer.predict.predict_scene`) on a generated 3-band uint16 Landsat-8-like
GeoTIFF of ``S × S`` pixels and on one of ``2S × 2S`` (4× the pixels), each in a fresh process, with a
small segmentation model (a 2-block LESS ViT-Tiny encoder, ``p = 8``, and the linear segmentation head of
``gfm.finetune``; random weights: the benchmark measures the engine, not the model). Tiles of 64 pixels
overlap by 16, output blocks are 512 pixels, batch 8, probabilities written too.

Peak memory is the child's peak resident set (``getrusage`` high-water mark) at the end; the baseline is
the same figure after the model, the scene and one warm-up batch are ready, so ``growth`` is what the
prediction itself added (block accumulators, one batch, GDAL's block cache of at most 64 MB). The last
line is ``RESULT peak_ratio=... growth_ratio=... flat=...``: large scene ÷ small scene, and whether the
peak ratio is within 10 %.

Run: ``python -m bench.predict`` (``--size`` for S, ``--threads``).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_scene(path: Path, size: int) -> None:
    """A ``size × size`` 3-band uint16 GeoTIFF (UTM 16N, 30 m), written in strips (the parent stays small)."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    profile = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint16", crs="EPSG:32616",
                   transform=from_origin(500000.0, 4000000.0, 30.0, 30.0), nodata=0, tiled=True,
                   blockxsize=256, blockysize=256, compress="deflate")
    rng = np.random.default_rng(0)
    with rasterio.open(path, "w", **profile) as ds:
        for r in range(0, size, 256):
            h = min(256, size - r)
            yy, xx = np.mgrid[r: r + h, 0:size]
            base = 2500 + 1000 * (np.sin(yy / 40.0) + np.cos(xx / 55.0))
            strip = (base[None] + rng.normal(0, 200, (3, h, size))).clip(1, 9000).astype("uint16")
            ds.write(strip, window=Window(0, r, size, h))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def child(args: argparse.Namespace) -> None:
    """One scene: build, warm up, predict, print a JSON line."""
    import torch

    from gfm import hub
    from gfm.finetune.model import HeadConfig, TaskModel
    from gfm.infer.predict import PredictOptions, predict_scene
    from gfm.infer.predictors import SegmentationPredictor, TaskInfo
    from gfm.infer.scenes import SceneFiles, observation_bands, read_window, scene_spec
    from gfm.model import create_model
    from gfm.shards.scene import open_scene

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    encoder = create_model("less_vit_tiny", depth=2, patch_size=8)
    model = TaskModel(encoder, "segmentation", 8, HeadConfig(), num_bands=3, num_rows=3).eval()
    info = TaskInfo("segmentation", 8, [f"class{i}" for i in range(8)], source="bench")
    predictor = SegmentationPredictor(model, info)
    scene = open_scene(scene_spec(SceneFiles([args.scene], sensor="landsat8", bands=["B2", "B3", "B4"],
                                             date="2015-08-04")))
    stats = {"bands": {f"landsat8/{b}": {"stats": {"mean": 2500.0, "std": 1000.0}} for b in ("B2", "B3", "B4")}}
    bands = hub.input_bands(observation_bands(scene), stats)
    warm = [read_window(scene, 0, 0, 64, 64) for _ in range(8)]  # one batch through the model first
    predictor(bands.batch(np.stack([p for p, _ in warm]), np.stack([v for _, v in warm]), gsd=30.0))
    baseline = _rss_mb()
    out = Path(args.out)
    t0 = time.perf_counter()
    report = predict_scene(scene, predictor, bands, out / "pred.tif",
                           PredictOptions(tile=64, overlap=16, batch_size=8, block=512, progress=False,
                                          probabilities=out / "probs.tif", overwrite=True))
    seconds = time.perf_counter() - t0
    print(json.dumps({"size": report.width, "tiles": report.tiles, "forwards": report.forwards,
                      "seconds": seconds, "baseline_mb": baseline, "peak_mb": _rss_mb(),
                      "out_mb": (out / "pred.tif").stat().st_size / 1e6}))


def main(argv: list[str] | None = None) -> int:
    """Run both scenes in fresh processes and print the table and the RESULT line."""
    p = argparse.ArgumentParser(prog="python -m bench.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1024, help="side S of the small scene in pixels (default 1024)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in each child (default 1)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--scene", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="gfm-bench-predict-") as tmp:
        for size in (args.size, 2 * args.size):
            scene = Path(tmp) / f"scene_{size}.tif"
            write_scene(scene, size)
            out = Path(tmp) / f"out_{size}"
            out.mkdir()
            cmd = [sys.executable, "-m", "bench.predict", "--child", "--scene", str(scene), "--out", str(out),
                   "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(f"# gfm predict: 3-band uint16 scene, 2-block LESS-Tiny + linear segmentation head (8 classes), tile 64, "
          f"overlap 16, block 512, batch 8, probabilities on, {args.threads} thread(s)")
    print(f"{'scene':>11} {'Mpx':>6} {'tiles':>6} {'forwards':>8} {'s':>7} {'baseline MB':>11} {'peak MB':>8} "
          f"{'growth MB':>9}")
    for r in rows:
        print(f"{r['size']:>5}x{r['size']:<5} {r['size'] ** 2 / 1e6:>6.2f} {r['tiles']:>6} {r['forwards']:>8} "
              f"{r['seconds']:>7.1f} {r['baseline_mb']:>11.0f} {r['peak_mb']:>8.0f} "
              f"{r['peak_mb'] - r['baseline_mb']:>9.0f}")
    small, large = rows
    peak_ratio = large["peak_mb"] / small["peak_mb"]
    growth_ratio = (large["peak_mb"] - large["baseline_mb"]) / max(1.0, small["peak_mb"] - small["baseline_mb"])
    print("# peak = child's peak resident set after predicting; growth = peak - the same after model, scene and "
          "one warm-up batch")
    print(f"RESULT peak_ratio={peak_ratio:.3f} growth_ratio={growth_ratio:.3f} flat={abs(peak_ratio - 1) <= 0.10}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
