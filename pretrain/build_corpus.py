"""``python -m pretrain.build_corpus``: the pretraining corpus from ``../shared/data``, with its held-out part.

    python -m pretrain.build_corpus --out runs/corpus [--shared ../shared/data] [--tile 32] [--workers 2]
    python -m pretrain.build_corpus --out runs/corpus_s1 --only sentinel1_grd,modis

Builds the scenes of ``pretrain/corpus/shared_data.yaml`` twice with the writer's hold-out rule
(``gfm.shards.BuildOptions.holdout``, 10 % of each scene's tiles, by a stable hash of the tile's scene
and position; no training tile over a held-out tile's ground): ``OUT/train`` and ``OUT/heldout``, each
with its ``index.json``. Re-running resumes (finished shards are kept). Train on ``OUT/train``;
evaluate on ``OUT/heldout`` normalised with the training statistics (``data.loader.norm_index:
OUT/train/index.json``). Prints a table: sensor, scenes, tiles in train and held-out, bands.
See docs/train.md, "The pretraining corpus".
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from gfm.index import split_stats_key
from gfm.sensors import guess_sensor
from gfm.shards import BuildOptions, BuildReport, SceneSpec, ShardError, build, load_manifest
from gfm.shards.errors import python_name

MANIFEST = Path(__file__).resolve().parent / "corpus" / "shared_data.yaml"
# where the manifest's paths point: they are written relative to it as ../../../shared/data/..., the
# repository's sibling folder
MANIFEST_DATA = MANIFEST.parents[2].parent / "shared" / "data"
DEFAULT_SHARED = Path(os.environ.get("GFM_SHARED_DATA", MANIFEST_DATA))
HOLDOUT = 0.1  # share of each scene's tiles held out
SHARD_SIZE = 16 * 1024**2  # several shards even for this small corpus: parallel writing, finer resume
HELDOUT_NAME = "heldout"  # shard name prefix of the held-out set (heldout-000000.tar), never mistaken for train


class CorpusError(Exception):
    """A corpus request that cannot be met (a sensor no scene has)."""


@dataclass(frozen=True)
class SensorRow:
    """One line of the summary: a sensor's scenes, tiles per split and band names."""

    sensor: str
    scenes: int
    train: int
    heldout: int
    bands: list[str]
    band_range_nm: tuple[float, float]


@dataclass(frozen=True)
class CorpusReport:
    """What :func:`build_corpus` built: both builds' reports, per-sensor rows, wall time."""

    train: BuildReport
    heldout: BuildReport
    rows: list[SensorRow]
    seconds: float


def reroot(specs: Sequence[SceneSpec], shared: Path, manifest_data: Path = MANIFEST_DATA) -> list[SceneSpec]:
    """The specs with every path under ``manifest_data`` moved under ``shared`` (others kept as they are)."""
    base = Path(os.path.normpath(os.path.abspath(manifest_data)))
    to = Path(os.path.abspath(shared))

    def move(p: str | None) -> str | None:
        if p is None:
            return None
        path = Path(os.path.normpath(os.path.abspath(p)))
        return str(to / path.relative_to(base)) if path.is_relative_to(base) else str(path)

    out = []
    for spec in specs:
        dates = [replace(d, files=[replace(f, path=str(move(f.path)), wavelengths=move(f.wavelengths),
                                           fwhm=move(f.fwhm)) for f in d.files]) for d in spec.dates]
        out.append(replace(spec, dates=dates, label=move(spec.label)))
    return out


def scene_sensors(spec: SceneSpec) -> list[str]:
    """The sensors of a scene's files, in order (a file without one: the sensor its name suggests, or '?')."""
    names = [f.sensor or guess_sensor([f.path]) or "?" for d in spec.dates for f in d.files]
    return list(dict.fromkeys(names))


def load_corpus(manifest: Path, shared: Path, only: Sequence[str] = ()) -> list[SceneSpec]:
    """The corpus scenes, their paths under ``shared``; with ``only``, the scenes of those sensors.

    Raises:
        InputError: a bad manifest.
        CorpusError: a sensor in ``only`` that no scene has (the message lists the ones there are).
    """
    specs = reroot(load_manifest(manifest), shared)
    if not only:
        return specs
    known = sorted({s for spec in specs for s in scene_sensors(spec)})
    unknown = [s for s in only if s not in known]
    if unknown:
        raise CorpusError(f"no scene of sensor(s) {', '.join(unknown)} in {manifest} (it has: {', '.join(known)})")
    return [spec for spec in specs if set(scene_sensors(spec)) & set(only)]


def build_corpus(
    specs: Sequence[SceneSpec], out: Path, *, tile: int = 32, workers: int = 2, progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> CorpusReport:
    """Build (or resume) ``out/train`` and ``out/heldout`` from ``specs`` with the writer's hold-out rule.

    Raises:
        ShardError: an input, option or output-directory problem (see :mod:`gfm.shards`).
    """
    def options(split: str, name: str) -> BuildOptions:
        return BuildOptions(out=str(out / split), tile=tile, workers=workers, shard_size=SHARD_SIZE,
                            holdout=HOLDOUT, split=split, name=name, progress=progress)

    t0 = time.perf_counter()
    train = build(specs, options("train", "gfm"), log=log)
    heldout = build(specs, options("heldout", HELDOUT_NAME), log=log)
    return CorpusReport(train, heldout, sensor_rows(specs, train, heldout), time.perf_counter() - t0)


def _natural(name: str) -> list[object]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def sensor_rows(specs: Sequence[SceneSpec], train: BuildReport, heldout: BuildReport) -> list[SensorRow]:
    """Per sensor: scenes, tiles written in each split (a scene of several sensors counts for each), bands."""
    assert train.index is not None and heldout.index is not None
    rows = []
    for sensor in sorted({s for spec in specs for s in scene_sensors(spec)}):
        ids = [spec.id for spec in specs if sensor in scene_sensors(spec)]
        bands = {b.name: b.center_nm for key, b in train.index.bands.items() if split_stats_key(key)[0] == sensor}
        centres = list(bands.values()) or [float("nan")]
        rows.append(SensorRow(
            sensor=sensor,
            scenes=len(ids),
            train=sum(train.index.scenes[i].samples for i in ids if i in train.index.scenes),
            heldout=sum(heldout.index.scenes[i].samples for i in ids if i in heldout.index.scenes),
            bands=sorted(bands, key=_natural),
            band_range_nm=(min(centres), max(centres)),
        ))
    return rows


def summary_table(report: CorpusReport) -> str:
    """The table the program prints: one row per sensor and a total."""
    def bands(r: SensorRow) -> str:
        if len(r.bands) <= 12:
            return " ".join(r.bands)
        return f"{len(r.bands)} bands, {r.band_range_nm[0]:.0f}-{r.band_range_nm[1]:.0f} nm"

    head = f"{'sensor':<15}{'scenes':>7}{'train':>8}{'held-out':>10}{'share':>7}  bands"
    lines = [head, "-" * (len(head) + 40)]
    for r in report.rows:
        share = r.heldout / max(1, r.train + r.heldout)
        lines.append(f"{r.sensor:<15}{r.scenes:>7}{r.train:>8}{r.heldout:>10}{share:>7.1%}  {bands(r)}")
    train, held = report.train.index, report.heldout.index
    assert train is not None and held is not None
    total = held.samples / max(1, train.samples + held.samples)
    lines.append("-" * (len(head) + 40))
    lines.append(f"{'total':<15}{len(train.scenes):>7}{train.samples:>8}{held.samples:>10}{total:>7.1%}  "
                 f"{len(train.bands)} bands")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pretrain.build_corpus", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="output folder: OUT/train and OUT/heldout")
    p.add_argument("--shared", type=Path, default=DEFAULT_SHARED,
                   help=f"the shared data folder (default: $GFM_SHARED_DATA or {DEFAULT_SHARED})")
    p.add_argument("--tile", type=int, default=32, help="tile size in pixels (default 32; stride = tile)")
    p.add_argument("--workers", type=int, default=2, help="parallel worker processes (default 2)")
    p.add_argument("--only", help="comma-separated sensors: build only their scenes (e.g. sentinel1_grd,modis)")
    p.add_argument("--manifest", type=Path, default=MANIFEST, help=f"scene manifest (default: {MANIFEST.name})")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Build the corpus; one line on stderr and exit code 2 on a problem, 130 when interrupted."""
    a = _parser().parse_args(argv)
    prog = "build_corpus"
    if not a.shared.is_dir():
        print(f"{prog}: no shared data folder at {a.shared} (the corpus is built from the repository's sibling "
              "../shared/data); pass --shared DIR where it lies, or set GFM_SHARED_DATA", file=sys.stderr)
        return 2
    seen: set[str] = set()

    def log(message: str) -> None:  # the two builds state the same grids: each notice once
        if message not in seen:
            seen.add(message)
            print(message, file=sys.stderr)

    only = [s.strip() for s in a.only.split(",") if s.strip()] if a.only else []
    try:
        specs = load_corpus(a.manifest, a.shared, only)
        report = build_corpus(specs, a.out, tile=a.tile, workers=a.workers, progress=sys.stderr.isatty(), log=log)
    except ShardError as e:
        print(f"{prog}: {e.render(_option)}", file=sys.stderr)
        return 2
    except CorpusError as e:
        print(f"{prog}: --only {a.only}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; finished shards are kept, re-run the same command to resume", file=sys.stderr)
        return 130
    print(summary_table(report))
    print(f"\nbuilt in {report.seconds:.1f} s")
    print(f"train:    data.loader.shards: {a.out / 'train'}")
    print(f"held-out: data.loader.shards: {a.out / 'heldout'}, data.loader.norm_index: "
          f"{a.out / 'train' / 'index.json'}, data.loader.mode: epoch")
    return 0


def _option(option: str, value: object) -> str:
    """A library option placeholder as this program's flag where it has one, else the Python field."""
    if option in ("tile", "workers"):
        return f"--{option}" if value is None else f"--{option} {value}"
    return python_name(option, value)


if __name__ == "__main__":
    sys.exit(main())
