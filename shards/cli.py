"""``gfm shards``: build, index, verify and inspect WebDataset shards."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from gfm.sensors import SensorError, guess_date, load_sensors_yaml
from shards.build import BuildOptions, build, parse_size, write_index
from shards.manifest import load_manifest
from shards.scene import DateSpec, FileSpec, SceneSpec, ShardError
from shards.verify import info_text, load_index, plot_band_stats, verify

_BUILD_EPILOG = """examples:
  gfm shards build LC08_*_B*.TIF --out shards/l8 --tile 64
  gfm shards build T33UUU_*_B*.jp2 --sensor sentinel2_l1c --gsd 20 --out shards/s2
  gfm shards build RGB.tif --sensor landsat8 --bands B4,B3,B2 --date 2015-08-04 --out shards/rgb
  gfm shards build pines.npy --wavelengths wl.txt --label gt.npy --gsd 20 --tile 32 --out shards/pines
  gfm shards build --manifest scenes.yaml --out shards/all --workers 8 --part 0/4
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gfm shards", description="Build, index, verify and inspect WebDataset shards.")
    sub = p.add_subparsers(dest="cmd", required=True)

    b = sub.add_parser(
        "build",
        help="tile scenes into shards",
        description="Tile one scene (FILE...) or many (--manifest) into WebDataset shards with band metadata, "
        "validity masks, labels and per-band statistics. Re-running resumes: finished shards are kept.",
        epilog=_BUILD_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    b.add_argument("files", nargs="*", metavar="FILE",
                   help="rasters (GeoTIFF, JP2, anything GDAL reads) or a .npy/.mat cube")
    b.add_argument("--out", required=True, help="output directory (shards + index.json)")
    b.add_argument("--manifest", help="YAML manifest of many scenes / time series (instead of FILE...)")
    b.add_argument("--sensor", help="sensor preset (see 'gfm sensors'); guessed from product file names if omitted")
    b.add_argument("--sensors-yaml", help="YAML file of user sensor definitions to register first")
    b.add_argument("--bands", help="band names in file/band order, comma separated, when names can't be recognised")
    b.add_argument("--date", help="acquisition date YYYY-MM-DD (default: read from product file names; files of "
                   "several dates make a time series)")
    b.add_argument("--label", help="label raster (reprojected with nearest) or .npy/.mat array on the scene grid")
    b.add_argument("--label-key", help="variable name in a .mat label file")
    b.add_argument("--label-ignore", type=int, default=-1,
                   help="label value for pixels outside the label raster (default -1)")
    b.add_argument("--scene-id", help="scene id used in sample keys (default: from the first file name)")
    b.add_argument("--wavelengths", help="wavelength list (nm) for a hyperspectral cube")
    b.add_argument("--fwhm", help="band width list (nm) for a hyperspectral cube (default: band spacing)")
    b.add_argument("--key", help="variable name in a .mat cube")
    b.add_argument("--nodata", type=float, help="nodata value overriding the files' own")
    b.add_argument("--tile", type=int, default=64, help="tile size in pixels (default 64)")
    b.add_argument("--stride", type=int, help="tile stride in pixels (default: tile size, no overlap)")
    b.add_argument("--gsd", type=float, help="target ground sampling distance in metres (default: the finest band)")
    b.add_argument("--resampling", default="bilinear",
                   choices=["nearest", "bilinear", "cubic", "average", "lanczos", "mode"],
                   help="resampling for bands not on the scene grid (default bilinear; labels always nearest)")
    b.add_argument("--min-valid", type=float, default=0.5,
                   help="drop tiles whose valid fraction is below this (default 0.5)")
    b.add_argument("--shard-size", default="256MB", help="target shard size (default 256MB)")
    b.add_argument("--workers", type=int, default=1, help="parallel worker processes (default 1)")
    b.add_argument("--part", default="0/1", help="i/n: build only part i of n (SLURM arrays, several machines)")
    b.add_argument("--name", default="gfm", help="shard file name prefix (default gfm)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")

    i = sub.add_parser("index", help="merge finished shards (all --part jobs) into index.json")
    i.add_argument("dir")
    v = sub.add_parser("verify", help="decode every sample, check against the schema and index.json")
    v.add_argument("dir")
    n = sub.add_parser("info", help="summary of a dataset: sensors, bands, samples, statistics")
    n.add_argument("dir")
    n.add_argument("--json", action="store_true", help="print index.json instead of the table")
    n.add_argument("--plot", metavar="PNG", help="also draw each sensor's band statistics against wavelength")
    return p


def _single_scene(a: argparse.Namespace) -> SceneSpec:
    if not a.files:
        raise ShardError("give input FILE(s) or --manifest")
    bands = [s.strip() for s in a.bands.split(",")] if a.bands else None
    files = []
    if bands is not None and len(a.files) > 1:
        # --bands names bands across all files in order: split it per file by band count.
        import rasterio

        offset = 0
        for f in a.files:
            try:
                with rasterio.open(f) as ds:
                    count = ds.count
            except Exception:
                count = 1
            names = bands[offset : offset + count]
            files.append(FileSpec(f, a.sensor, names, a.nodata, a.key, None, a.wavelengths, a.fwhm))
            offset += count
        if offset != len(bands):
            raise ShardError(f"--bands lists {len(bands)} names but the files hold {offset} bands")
    else:
        files = [FileSpec(f, a.sensor, bands, a.nodata, a.key, None, a.wavelengths, a.fwhm) for f in a.files]
    scene_id = a.scene_id or Path(a.files[0]).stem.split(".")[0]
    return SceneSpec(
        id=scene_id,
        dates=_group_by_date(files, a.date),
        label=a.label,
        label_key=a.label_key,
        gsd=a.gsd,
        label_ignore=a.label_ignore,
    )


def _group_by_date(files: list[FileSpec], date: str | None) -> list[DateSpec]:
    """One date (--date, or the one date in the file names), or a time series when names differ in date."""
    if date is not None:
        return [DateSpec(date, files)]
    guessed = [guess_date(f.path) for f in files]
    distinct = sorted({d for d in guessed if d is not None})
    if len(distinct) <= 1:
        return [DateSpec(distinct[0] if distinct else None, files)]
    undated = [f.path for f, d in zip(files, guessed) if d is None]
    if undated:
        raise ShardError(f"{undated[0]}: no date in its name while other files have several; give --date or a manifest")
    print(f"notice: {len(distinct)} dates in the file names ({distinct[0]} .. {distinct[-1]}): one time series, "
          "aligned to the first date's grid", file=sys.stderr)
    return [DateSpec(d, [f for f, g in zip(files, guessed) if g == d]) for d in distinct]


def _cmd_build(a: argparse.Namespace) -> int:
    if a.sensors_yaml:
        try:
            load_sensors_yaml(a.sensors_yaml, replace=True)
        except SensorError as e:
            raise ShardError(str(e)) from None
    if a.manifest:
        if a.files:
            raise ShardError("give either FILE... or --manifest, not both")
        specs = load_manifest(a.manifest)
        if a.gsd is not None:
            for s in specs:
                s.gsd = s.gsd or a.gsd
    else:
        specs = [_single_scene(a)]
    try:
        pi, pn = (int(x) for x in a.part.split("/"))
    except ValueError:
        raise ShardError(f"--part {a.part!r}: expected i/n, e.g. 0/4") from None
    opts = BuildOptions(
        out=a.out, tile=a.tile, stride=a.stride, min_valid=a.min_valid, shard_size=parse_size(a.shard_size),
        workers=a.workers, part=(pi, pn), name=a.name, resampling=a.resampling, progress=not a.no_progress,
    )
    s = build(specs, opts)
    rate = s["tiles_read"] / s["seconds"] if s["seconds"] > 0 else 0.0
    print(
        f"part {s['part']}: {s['written']} shards written, {s['skipped_complete']} already complete, "
        f"{s['samples']} samples, {s['dropped_low_valid']} tiles dropped (<{opts.min_valid} valid), "
        f"{s['bytes'] / 1e6:.1f} MB in {s['seconds']:.1f} s ({rate:.0f} tiles/s)"
    )
    if pn > 1:
        print(f"after all {pn} parts finish: gfm shards index {a.out}")
    else:
        print(f"wrote {Path(a.out) / 'index.json'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``gfm shards``."""
    a = _parser().parse_args(argv)
    try:
        if a.cmd == "build":
            return _cmd_build(a)
        if a.cmd == "index":
            idx = write_index(a.dir)
            print(f"{a.dir}/index.json: {len(idx['shards'])} shards, {idx['samples']} samples"
                  + (f", {len(idx['missing_shards'])} planned shards missing" if idx["missing_shards"] else ""))
            return 0
        if a.cmd == "verify":
            r = verify(a.dir)
            for prob in r["problems"]:
                print(f"CORRUPT {prob}", file=sys.stderr)
            status = "FAILED" if r["problems"] else "ok"
            n_prob = len(r["problems"])
            print(f"verify {a.dir}: {r['shards']} shards, {r['samples']} samples, {n_prob} problems: {status}")
            return 1 if r["problems"] else 0
        if a.cmd == "info":
            idx = load_index(a.dir)
            print(json.dumps(idx, indent=1) if a.json else info_text(idx))
            if a.plot:
                print(f"wrote {plot_band_stats(idx, a.plot)}", file=sys.stderr)
            return 0
    except ShardError as e:
        print(f"gfm shards {a.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gfm shards {a.cmd}: interrupted; finished shards are kept, re-run to resume", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
