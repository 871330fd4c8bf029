"""``gfm shards``: build, index, verify and inspect WebDataset shards."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from gfm import index as index_file
from gfm.sensors import SensorError, load_sensors_yaml
from gfm.shards import (
    EDGES,
    RESAMPLING,
    SPLITS,
    BuildOptions,
    DateSpec,
    FileSpec,
    InputError,
    OptionError,
    SceneSpec,
    ShardError,
    build,
    dates_from_names,
    info,
    info_text,
    load_manifest,
    load_stac,
    plot_band_stats,
    verify,
    write_index,
)
from gfm.shards.remote import name_of

_BUILD_EPILOG = """examples:
  gfm shards build LC08_*_B*.TIF --out shards/l8 --tile 64
  gfm shards build T33UUU_*_B*.jp2 --sensor sentinel2_l1c --gsd 20 --out shards/s2
  gfm shards build RGB.tif --sensor landsat8 --bands B4,B3,B2 --date 2015-08-04 --out shards/rgb
  gfm shards build pines.npy --wavelengths wl.txt --label gt.npy --gsd 20 --tile 32 --out shards/pines
  gfm shards build --manifest scenes.yaml --out shards/all --workers 8 --part 0/4
  gfm shards build LE7*_b[1-5].tif LE7*_fmask.tif LT5*_b[1-5].tif LT5*_fmask.tif --out shards/l57
  gfm shards build a_B4.tif b_B4.tif --date 2008-04-19 --date 2008-04-27 --out shards/ab
  gfm shards build LT5*_b[345].tif --label fields.gpkg --label-field crop --edge pad --out shards/fields
  gfm shards build --manifest scenes.yaml --holdout 0.1 --split heldout --name heldout --out shards/heldout
  gfm shards build https://host/T33UUU_20200101T101031_B0{2,3,4}.tif --out shards/remote
  gfm shards build --stac items.json --assets B02,B03,B04,B08 --out shards/stac --workers 8

remote rasters: any URL GDAL reads in place (https://, s3://, gs://, /vsicurl/..., /vsis3/...) is read by
range requests, only the blocks under the tiles; credentials come from the environment (AWS_*, GOOGLE_*,
GDAL_HTTP_*) and are redacted from every URL gfm writes or prints. GDAL's HTTP settings default to
GDAL_HTTP_MAX_RETRY=3 GDAL_HTTP_RETRY_DELAY=1 GDAL_HTTP_TIMEOUT=60 GDAL_HTTP_CONNECTTIMEOUT=15
GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR; set any of them (or other GDAL_*/CPL_* options) in the environment.
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
                   help="rasters (GeoTIFF, JP2, anything GDAL reads; local files or URLs: https://, s3://, gs://, "
                   "/vsi...) or a local .npy/.mat cube")
    b.add_argument("--out", required=True, help=f"output directory (shards + {index_file.INDEX_FILE})")
    b.add_argument("--manifest", help="YAML manifest of many scenes / time series (instead of FILE...)")
    b.add_argument("--stac", metavar="ITEMS.json",
                   help="static STAC ItemCollection (or Item) file, instead of FILE...: each item is one scene (its "
                   "id, its datetime, its assets read in place); bands from the registered sensor of its platform, "
                   "else from the assets' eo:bands/raster:bands (needs pystac: pip install 'gfm[stac]')")
    b.add_argument("--assets", help="with --stac: asset keys to read from every item, comma separated (default: every "
                   "GeoTIFF asset with role 'data')")
    b.add_argument("--sensor", help="sensor preset (see 'gfm sensors'); guessed from product file names if omitted")
    b.add_argument("--sensors-yaml", help="YAML file of user sensor definitions to register first")
    b.add_argument("--bands", help="band names in file/band order, comma separated, when names can't be recognised")
    b.add_argument("--date", action="append",
                   help="acquisition date YYYY-MM-DD: once for every file, or once per file in file order "
                   "(default: read from product file names and Landsat scene ids; files of several dates make a "
                   "time series)")
    b.add_argument("--label", help="label raster (reprojected with nearest; integer, or float holding integers), "
                   ".npy/.mat array on the scene grid, or vector file (.gpkg, .geojson, .shp...) rasterised onto it")
    b.add_argument("--label-field", help="attribute of a vector label file holding the class (integer or name)")
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
    b.add_argument("--gsd", type=float, help="target ground sampling distance in metres (default: the finest file, "
                   "pixel sizes compared in metres)")
    b.add_argument("--crs", help="CRS of the scene grid, e.g. EPSG:32633 (default: the finest file's)")
    b.add_argument("--edge", default="full", choices=list(EDGES),
                   help="full: whole tiles only (default); pad: also the partial tiles at the right and bottom "
                   "edges, the part outside the scene marked invalid")
    b.add_argument("--resampling", default="bilinear",
                   choices=list(RESAMPLING),
                   help="resampling for bands not on the scene grid (default bilinear; labels always nearest)")
    b.add_argument("--min-valid", type=float, default=0.5,
                   help="drop tiles whose valid fraction is below this (default 0.5)")
    b.add_argument("--shard-size", default="256MB", help="target shard size (default 256MB)")
    b.add_argument("--workers", type=int, default=1, help="parallel worker processes (default 1)")
    b.add_argument("--part", default="0/1", help="i/n: build only part i of n (SLURM arrays, several machines)")
    b.add_argument("--name", default="gfm", help="shard file name prefix (default gfm)")
    b.add_argument("--holdout", type=float, default=0.0,
                   help="fraction of each scene's tiles held out, by a stable hash of scene id and tile position "
                   "(default 0: none)")
    b.add_argument("--split", default="train", choices=list(SPLITS),
                   help="with --holdout: write the training tiles (default; every tile but the held-out ones and "
                   "those overlapping them on the ground) or the held-out tiles")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    b.add_argument("--force", action="store_true",
                   help="write into a non-empty directory that is not a gfm dataset (its files are never overwritten)")

    i = sub.add_parser("index", help="merge finished shards (all --part jobs) into index.json")
    i.add_argument("dir")
    v = sub.add_parser("verify", help="decode every sample, check against the schema and index.json")
    v.add_argument("dir")
    n = sub.add_parser("info", help="summary of a dataset: sensors, bands, samples, statistics")
    n.add_argument("dir")
    n.add_argument("--json", action="store_true", help="print index.json instead of the table")
    n.add_argument("--plot", metavar="PNG", help="also draw each sensor's band statistics against wavelength")
    return p


# Option placeholders of library errors (gfm.shards.errors.FIELDS) → this program's flags.
_FLAGS = {
    "tile": "--tile", "stride": "--stride", "min_valid": "--min-valid", "shard_size": "--shard-size",
    "workers": "--workers", "part": "--part", "resampling": "--resampling", "sensor": "--sensor",
    "bands": "--bands", "cube_key": "--key", "wavelengths": "--wavelengths FILE", "label_key": "--label-key",
    "date": "--date", "edge": "--edge", "force": "--force", "name": "--name", "crs": "--crs", "gsd": "--gsd",
    "label_field": "--label-field", "holdout": "--holdout", "split": "--split", "assets": "--assets",
}


def _flag(option: str, value: object) -> str:
    """A library option placeholder as this program's flag, with its value as typed on the command line."""
    flag = _FLAGS.get(option, option)
    if value is None or value is True:
        return flag
    if isinstance(value, (list, tuple)) and option == "part":
        return f"{flag} {value[0]}/{value[1]}"
    if isinstance(value, (list, tuple)):
        return f"{flag} {','.join(map(str, value))}"
    return f"{flag} {value}"


def parse_size(text: str) -> int:
    """``256MB``, ``1.5GB``, ``512k``, ``1000`` → bytes."""
    t = text.strip().upper().replace("IB", "B")
    units = {"K": 1024, "KB": 1024, "M": 1024**2, "MB": 1024**2, "G": 1024**3, "GB": 1024**3, "B": 1}
    for suffix in sorted(units, key=len, reverse=True):
        if t.endswith(suffix):
            number = t[: -len(suffix)]
            try:
                return int(float(number) * units[suffix])
            except ValueError:
                break
    try:
        return int(t)
    except ValueError:
        raise OptionError(f"--shard-size {text!r}: expected a size like 256MB, 1GB or 500KB") from None


def _single_scene(a: argparse.Namespace) -> SceneSpec:
    if not a.files:
        raise InputError("give input FILE(s), --manifest or --stac")
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
            raise InputError(f"--bands lists {len(bands)} names but the files hold {offset} bands")
    else:
        files = [FileSpec(f, a.sensor, bands, a.nodata, a.key, None, a.wavelengths, a.fwhm) for f in a.files]
    scene_id = a.scene_id or name_of(a.files[0]).split(".")[0]
    return SceneSpec(
        id=scene_id,
        dates=_group_by_date(files, a.date or []),
        label=a.label,
        label_key=a.label_key,
        gsd=a.gsd,
        crs=a.crs,
        label_ignore=a.label_ignore,
        label_field=a.label_field,
    )


def _group_by_date(files: list[FileSpec], given: list[str]) -> list[DateSpec]:
    """One date or a time series of several.

    One ``--date`` (or one date in the file names) makes one date; a ``--date`` per file, or names that
    differ in date, make a time series.
    """
    if len(given) > 1:
        if len(given) != len(files):
            raise InputError(f"--date given {len(given)} times for {len(files)} files: give it once for all files "
                             "or once per file, in file order")
        by_date: dict[str, list[FileSpec]] = {}
        for f, d in zip(files, given):
            by_date.setdefault(d, []).append(f)
        dates = [DateSpec(d, by_date[d]) for d in sorted(by_date)]
    else:
        dates = dates_from_names(files, given[0] if given else None)
    if len(dates) > 1:
        source = "given" if len(given) > 1 else "in the file names"
        print(f"notice: {len(dates)} dates {source} ({dates[0].date} .. {dates[-1].date}): one time series, "
              "aligned to the first date's grid", file=sys.stderr)
    return dates


def _cmd_build(a: argparse.Namespace) -> int:
    if a.sensors_yaml:
        try:
            load_sensors_yaml(a.sensors_yaml, replace=True)
        except SensorError as e:
            raise InputError(str(e)) from None
    if sum(map(bool, (a.files, a.manifest, a.stac))) > 1:
        raise InputError("give one of FILE..., --manifest or --stac")
    if a.assets and not a.stac:
        raise InputError("--assets chooses the assets of --stac items; give --stac ITEMS.json")
    if a.manifest or a.stac:
        if a.stac:
            found = load_stac(a.stac, [s.strip() for s in a.assets.split(",")] if a.assets else None)
            for notice in found.notices:
                print(notice, file=sys.stderr)
            specs = found.scenes
        else:
            specs = load_manifest(a.manifest)
        for spec in specs:
            spec.gsd = spec.gsd if spec.gsd is not None else a.gsd
            spec.crs = spec.crs if spec.crs is not None else a.crs
    else:
        specs = [_single_scene(a)]
    try:
        pi, pn = (int(x) for x in a.part.split("/"))
    except ValueError:
        raise OptionError(f"--part {a.part!r}: expected i/n, e.g. 0/4") from None
    opts = BuildOptions(
        out=a.out, tile=a.tile, stride=a.stride, min_valid=a.min_valid, shard_size=parse_size(a.shard_size),
        workers=a.workers, part=(pi, pn), name=a.name, resampling=a.resampling, progress=not a.no_progress,
        edge=a.edge, force=a.force, holdout=a.holdout, split=a.split,
    )
    r = build(specs, opts, log=lambda m: print(m, file=sys.stderr))
    print(
        f"part {pi}/{pn}: {r.written} shards written, {r.skipped_complete} already complete, "
        f"{r.samples} samples, {r.dropped_low_valid} tiles dropped (<{opts.min_valid} valid), "
        f"{r.bytes / 1e6:.1f} MB in {r.seconds:.1f} s ({r.tiles_per_second:.0f} tiles/s)"
    )
    if pn > 1:
        print(f"after all {pn} parts finish: gfm shards index {a.out}")
    else:
        print(f"wrote {Path(a.out) / index_file.INDEX_FILE}")
    return 0


def _cmd_index(a: argparse.Namespace) -> int:
    idx = write_index(a.dir)
    missing = f", {len(idx.missing_shards)} planned shards missing" if idx.missing_shards else ""
    print(f"{a.dir}/{index_file.INDEX_FILE}: {len(idx.shards)} shards, {idx.samples} samples{missing}")
    return 0


def _cmd_verify(a: argparse.Namespace) -> int:
    r = verify(a.dir)
    for prob in r.problems:
        if prob.kind == "planned":
            prob_text = f"{prob.shard}: planned but not built (finish all --part jobs, then 'gfm shards index')"
        else:
            prob_text = str(prob)
        print(f"CORRUPT {prob_text}", file=sys.stderr)
    status = "ok" if r.ok else "FAILED"
    print(f"verify {a.dir}: {r.shards} shards, {r.samples} samples, {len(r.problems)} problems: {status}")
    return 0 if r.ok else 1


def _cmd_info(a: argparse.Namespace) -> int:
    summary = info(a.dir)
    if a.json:
        print(json.dumps(summary.index.to_dict(), indent=1))
    else:
        print(info_text(summary.index, min_valid="--min-valid", absent=summary.absent))
    if a.plot:
        print(f"wrote {plot_band_stats(summary.index, a.plot)}", file=sys.stderr)
    return 0


_COMMANDS = {"build": _cmd_build, "index": _cmd_index, "verify": _cmd_verify, "info": _cmd_info}


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so a build stops its workers and removes its temporary files."""


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise _Terminated()


@contextmanager
def _sigterm_stops() -> Iterator[None]:
    """While inside, SIGTERM raises :class:`_Terminated` (in the main thread only; elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``gfm shards``: run one subcommand; errors are one line on stderr and exit code 2.

    SIGINT and SIGTERM stop a build at once (workers killed, finished shards kept): exit codes 130 and 143.
    """
    a = _parser().parse_args(argv)
    try:
        with _sigterm_stops():
            return _COMMANDS[a.cmd](a)
    except ShardError as e:
        message = e.render(_flag)
    except index_file.IndexNotFoundError as e:
        message = f"{e.path}: no index.json (run 'gfm shards build' or 'gfm shards index {e.path.parent}')"
    except index_file.IndexFileError as e:
        message = str(e)
    except KeyboardInterrupt as e:
        what = "terminated" if isinstance(e, _Terminated) else "interrupted"
        print(f"gfm shards {a.cmd}: {what}; finished shards are kept, re-run to resume", file=sys.stderr)
        return 143 if isinstance(e, _Terminated) else 130
    print(f"gfm shards {a.cmd}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
