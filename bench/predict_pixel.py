"""Per-pixel prediction benchmark: one dense pass per tile against one window per pixel.

A ``pixel``-task model with the dense head whose encoder sees each pixel alone (``head.context: pixel``,
the default since the dense head) is predicted over a generated scene two ways, in one process, on the same
tiles: :class:`gfm.infer.predictors.DensePixelPredictor` (every pixel of a tile once, smoothing over the
tile) and :class:`gfm.infer.predictors.PixelPredictor` (a ``window × window`` window cut around every
pixel, the path of window-context and older models). The model is a 4-block LESS ViT-Tiny with 1-pixel
patches and spectral patches of 25 bands (the shipped recipe) on a 200-band AVIRIS-like scene, window 7,
smoothing 5, random weights: the benchmark measures the predictor, not the model. One untimed dense pass
first warms the process up (allocator, kernels), so no row pays for what the first one would.

The window path costs about ``window²`` times the dense path's encoder work, so the expected speedup is of
that order (49 at window 7), less what both share (reading, writing). A third row, ``dense-ps``, runs the
dense path with the per-sample work the model did before 2026-12-07 (patch weights generated per pixel, one
column product per pixel in the pools), so the gain of the batched paths is measured in the same run.
Agreement is the share of pixels with the same class in the dense and window maps (they compute the same
probabilities; float sums differ in order only). The last line is ``RESULT dense_speedup=...
fast_paths_speedup=... dense_px_per_s=... agreement=...``.

Run: ``python -m bench.predict_pixel`` (``--size``: scene side, default 24, the window path takes minutes).
``--threads``: torch threads.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

BANDS = 200
SENSOR = "bench_hsi"  # a generic 200-band spectrometer, 400-2500 nm, registered here


def write_scene(path: Path, size: int) -> list[str]:
    """A ``size × size`` 200-band uint16 AVIRIS-like GeoTIFF; returns the band names."""
    import rasterio
    from rasterio.transform import from_origin

    from gfm.sensors import hyperspectral, register

    sensor = register(hyperspectral(SENSOR, np.linspace(400.0, 2500.0, BANDS).tolist(), gsd_m=20.0), replace=True)
    names = [b.name for b in sensor.bands]
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    field = np.sin(yy / 7.0) + np.cos(xx / 11.0)
    spectra = rng.normal(0, 1, (4, len(names))).cumsum(axis=1)  # four smooth "materials"
    material = ((field + 2) * 1.99).astype(int).clip(0, 3)
    data = (3000 + 300 * spectra[material].transpose(2, 0, 1) + rng.normal(0, 50, (len(names), size, size)))
    profile = dict(driver="GTiff", width=size, height=size, count=len(names), dtype="uint16", crs="EPSG:32616",
                   transform=from_origin(500000.0, 4000000.0, 20.0, 20.0), nodata=0)
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(data.clip(1, 60000).astype("uint16"))
    return names


@contextlib.contextmanager
def per_sample_paths(enabled: bool) -> Iterator[None]:
    """With ``enabled``, run the model's per-pixel work as it ran before the batched paths (the comparison row).

    The spectral patch weights are generated for every slot of every sample (``SpectralPatchEmbed.weights``
    instead of ``slot_weights``) and the summary pools multiply each sample's columns in its own call.
    """
    if not enabled:
        yield
        return
    from gfm.model import fused
    from gfm.model.embed import SpectralPatchEmbed

    threshold, slot_weights = fused._BATCHED_GRID_ELEMENTS, SpectralPatchEmbed.slot_weights
    fused._BATCHED_GRID_ELEMENTS = 0
    SpectralPatchEmbed.slot_weights = SpectralPatchEmbed.weights  # type: ignore[method-assign]
    try:
        yield
    finally:
        fused._BATCHED_GRID_ELEMENTS, SpectralPatchEmbed.slot_weights = threshold, slot_weights  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    """Predict the scene both ways, print the table and the RESULT line."""
    p = argparse.ArgumentParser(prog="python -m bench.predict_pixel", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=24, help="scene side in pixels (default 24)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = p.parse_args(argv)

    import rasterio
    import torch

    from gfm import hub
    from gfm.finetune.model import HeadConfig, TaskModel
    from gfm.infer.predict import PredictOptions, predict_scene
    from gfm.infer.predictors import DensePixelPredictor, PixelPredictor, TaskInfo
    from gfm.infer.scenes import SceneFiles, observation_bands, read_window, scene_spec
    from gfm.model import LESSViT, create_model
    from gfm.shards.scene import open_scene

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="gfm-bench-pixel-") as tmp:
        path = Path(tmp) / "scene.tif"
        names = write_scene(path, args.size)
        scene = open_scene(scene_spec(SceneFiles([str(path)], sensor=SENSOR, bands=names, date="1992-06-12")))
        stats = {"bands": {f"{SENSOR}/{b}": {"stats": {"mean": 3000.0, "std": 600.0}} for b in names}}
        bands = hub.input_bands(observation_bands(scene), stats)
        encoder = create_model("less_vit_tiny", depth=4, patch_size=1, spectral_patch=25, patch_embed="spectral")
        assert isinstance(encoder, LESSViT)
        px, ok = read_window(scene, 0, 0, 1, 1)
        rows = encoder.num_rows(bands.batch(px[None], ok[None], gsd=20.0))
        model = TaskModel(encoder, "pixel", 8, HeadConfig(smooth=5), window=7, num_bands=len(names),
                          num_rows=rows).eval()
        info = TaskInfo("pixel", 8, [f"class{i}" for i in range(8)], window=7, source="bench",
                        num_bands=len(names))
        opts = PredictOptions(tile=32, block=256, progress=False, overwrite=True)
        timings = {}
        predict_scene(scene, DensePixelPredictor(model, info, batch_size=1024), bands, Path(tmp) / "warmup.tif", opts)
        runs = (("dense", DensePixelPredictor(model, info, batch_size=1024), False),
                ("dense-ps", DensePixelPredictor(model, info, batch_size=1024), True),
                ("windows", PixelPredictor(model, info, batch_size=64), False))
        for name, predictor, per_sample in runs:
            with per_sample_paths(per_sample):
                t0 = time.perf_counter()
                report = predict_scene(scene, predictor, bands, Path(tmp) / f"{name}.tif", opts)
                timings[name] = (time.perf_counter() - t0, report.forwards)
        with rasterio.open(Path(tmp) / "dense.tif") as a, rasterio.open(Path(tmp) / "windows.tif") as b:
            agreement = float((a.read(1) == b.read(1)).mean())
    load = os.getloadavg()[0]
    px = args.size ** 2
    print(f"# gfm predict, pixel task: {args.size}x{args.size} px, {BANDS} bands, LESS-Tiny depth 4 p1 s25 "
          f"({rows} token rows), dense head, window 7, smooth 5, tile 32, {args.threads} thread(s), "
          f"load average {load:.2f}")
    print(f"{'predictor':>10} {'s':>8} {'px/s':>9} {'forwards':>9} {'vs windows':>10}")
    for name in ("dense", "dense-ps", "windows"):
        s, forwards = timings[name]
        print(f"{name:>10} {s:>8.2f} {px / s:>9.0f} {forwards:>9} {timings['windows'][0] / s:>9.1f}x")
    print("# dense-ps: the dense path with the per-sample paths the model had before 2026-12-07 (patch weights "
          "generated for every pixel, the pools' column products one call per pixel)")
    speedup = timings["windows"][0] / timings["dense"][0]
    fast_paths = timings["dense-ps"][0] / timings["dense"][0]
    print(f"RESULT dense_speedup={speedup:.1f} fast_paths_speedup={fast_paths:.2f} "
          f"dense_px_per_s={px / timings['dense'][0]:.0f} agreement={agreement:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
