"""Plan tiles into shards and write them: parallel, resumable, deterministic, splittable into parts.

The plan is a pure function of the inputs and options: every candidate tile of every scene, in
scene then row-major order, is packed into shards of about ``shard_size`` bytes, named
``<name>-<index:06d>.tar``. A shard is complete once its sidecar ``<name>-<index>.stats.json`` exists;
the tar is written under a temporary name and renamed first, so an interrupted build never leaves a
file a reader would take for a complete shard, and a re-run skips complete shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from datetime import date as Date
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.warp import transform as warp_transform
from rasterio.windows import Window
from tqdm import tqdm

from gfm import __version__
from gfm.fileio import atomic_write
from gfm.schema import SCHEMA_VERSION, Tile, encode, make_key, stats_key
from shards.scene import Scene, SceneSpec, ShardError, open_scene
from shards.stats import BandStats

SIDECAR_SUFFIX = ".stats.json"
PLAN_FILE = "build.json"
INDEX_FILE = "index.json"
_TAR_MTIME = 0  # fixed member mtime: identical inputs give byte-identical shards


class TarSampleWriter:
    """Writes WebDataset samples (``__key__`` + ``member -> bytes``) as a POSIX tar.

    The format is exactly what ``webdataset.TarWriter`` writes; it is done with the standard
    library here because importing webdataset imports torch, which costs seconds at start-up of
    every ``gfm shards`` call and every worker process.
    """

    def __init__(self, fileobj: Any) -> None:
        self._tar = tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT)

    def write(self, sample: dict[str, Any]) -> None:
        """Append one sample: members ``<key>.<suffix>`` in sorted order."""
        key = sample["__key__"]
        for suffix in sorted(k for k in sample if not k.startswith("__")):
            data = sample[suffix]
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mtime, info.mode = len(data), _TAR_MTIME, 0o444
            info.uname = info.gname = "gfm"
            self._tar.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        """Finish the archive (end-of-archive blocks)."""
        self._tar.close()


@dataclass
class BuildOptions:
    """Options of one build (everything that changes which tiles land in which shard)."""

    out: str
    tile: int = 64
    stride: int | None = None
    min_valid: float = 0.5
    shard_size: int = 256 * 1024**2
    workers: int = 1
    part: tuple[int, int] = (0, 1)
    name: str = "gfm"
    resampling: str = "bilinear"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.tile < 1:
            raise ShardError(f"--tile must be a positive number of pixels, got {self.tile}")
        if self.stride is not None and self.stride < 1:
            raise ShardError(f"--stride must be a positive number of pixels, got {self.stride}")
        if not 0.0 <= self.min_valid <= 1.0:
            raise ShardError(f"--min-valid must be a fraction in [0, 1], got {self.min_valid}")
        i, n = self.part
        if not (n >= 1 and 0 <= i < n):
            raise ShardError(f"--part must be i/n with 0 <= i < n, got {i}/{n}")

    @property
    def step(self) -> int:
        """Tile stride in pixels (the tile size when no stride is given)."""
        return self.stride or self.tile


@dataclass
class ShardPlan:
    """One shard: its index, name and the tiles (scene index, row, col) it will hold."""

    index: int
    name: str
    tiles: list[tuple[int, int, int]] = field(default_factory=list)


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
        raise ShardError(f"--shard-size {text!r}: expected a size like 256MB, 1GB or 500KB") from None


def tile_origins(height: int, width: int, tile: int, step: int) -> list[tuple[int, int]]:
    """Top-left (row, col) of every full tile; partial edge tiles are not produced."""
    rows = range(0, height - tile + 1, step) if height >= tile else range(0)
    cols = range(0, width - tile + 1, step) if width >= tile else range(0)
    return [(r, c) for r in rows for c in cols]


def make_plan(scenes: list[Scene], opts: BuildOptions) -> list[ShardPlan]:
    """Pack every candidate tile into shards of about ``opts.shard_size`` bytes (estimated)."""
    plans: list[ShardPlan] = []
    current = ShardPlan(0, shard_name(opts.name, 0))
    used = 0
    for si, scene in enumerate(scenes):
        c = len(scene.observations)
        per_tile = opts.tile * opts.tile * (c * scene.dtype().itemsize + c + 4) + 2048
        for r, col in tile_origins(scene.grid.height, scene.grid.width, opts.tile, opts.step):
            if current.tiles and used + per_tile > opts.shard_size:
                plans.append(current)
                current = ShardPlan(len(plans), shard_name(opts.name, len(plans)))
                used = 0
            current.tiles.append((si, r, col))
            used += per_tile
    if current.tiles:
        plans.append(current)
    return plans


def shard_name(name: str, index: int) -> str:
    """Deterministic shard file name."""
    return f"{name}-{index:06d}.tar"


def is_complete(out: Path, shard: str) -> bool:
    """A shard is complete when its sidecar exists (written last)."""
    return (out / (shard[: -len(".tar")] + SIDECAR_SUFFIX)).exists()


# ----------------------------------------------------------------------------------------------
# Reading tiles


def _quality_valid(data: np.ndarray, rule: dict[str, Any]) -> np.ndarray:
    """Valid mask from a quality band: ``values`` listed are invalid; ``bits`` set are invalid."""
    q = data.astype(np.int64)
    bad = np.zeros(q.shape, dtype=bool)
    if "values" in rule:
        bad |= np.isin(q, rule["values"])
    for bit in rule.get("bits", []):
        bad |= (q >> int(bit)) & 1 == 1
    return ~bad


def _days(d: str | None) -> int:
    return 0 if d is None else int(d.replace("-", ""))


def _lonlat(scene: Scene, row: int, col: int, tile: int) -> list[float] | None:
    if scene.grid.crs is None:
        return None
    x, y = scene.grid.transform @ (col + tile / 2, row + tile / 2)
    try:
        lon, lat = warp_transform(scene.grid.crs, "EPSG:4326", [x], [y])
    except Exception:
        return None
    return [round(float(lon[0]), 7), round(float(lat[0]), 7)]


def read_row(scene: Scene, row: int, cols: list[int], tile: int) -> Iterator[tuple[int, np.ndarray, np.ndarray, Any]]:
    """Yield ``(col, pixels [C,t,t], valid [C,t,t], label)`` for tiles of one row, from one strip read."""
    c0, c1 = min(cols), max(cols) + tile
    window = Window(c0, row, c1 - c0, tile)
    dtype = scene.dtype()
    datas, valids = [], []
    for reader, _ in scene.readers:
        d, v = reader.read(window)
        datas.append(d.astype(dtype, copy=False))
        valids.append(v)
    pixels = np.concatenate(datas, axis=0)
    valid = np.concatenate(valids, axis=0)
    dates = [d for _, d in scene.observations]
    for q, rule, qdate in scene.quality:
        qd, qv = q.read(window)
        ok = _quality_valid(qd[0], rule) & qv[0]
        for i, d in enumerate(dates):
            if qdate is None or d == qdate:
                valid[i] &= ok
    label_strip: np.ndarray | None = None
    if scene.label is not None:
        ld, lv = scene.label.read(window)
        label_strip = np.where(lv[0], ld[0], scene.spec.label_ignore)
    elif scene.label_array is not None:
        label_strip = scene.label_array[row : row + tile, c0:c1]
    for col in cols:
        s = slice(col - c0, col - c0 + tile)
        label: Any = None
        if label_strip is not None:
            lab = label_strip[:, s]
            label = lab.astype(np.int16 if lab.min() >= -(2**15) and lab.max() < 2**15 else np.int32)
        elif scene.spec.label_class is not None:
            label = int(scene.spec.label_class)
        yield col, pixels[:, :, s], valid[:, :, s], label


def make_tile(scene: Scene, row: int, col: int, tile: int, pixels: np.ndarray, valid: np.ndarray, label: Any) -> Tile:
    """A schema :class:`Tile` for the tile at (row, col) of ``scene``."""
    const = scene.tile_constants
    t = scene.grid.window_transform(row, col)
    left, top = t.c, t.f
    right, bottom = t @ (tile, tile)
    meta: dict[str, Any] = {
        "schema": SCHEMA_VERSION,
        "bands": const["bands"],
        "gsd_m": const["gsd_m"],
        "crs": const["crs"],
        "transform": [t.a, t.b, t.c, t.d, t.e, t.f],
        "bounds": [min(left, right), min(top, bottom), max(left, right), max(top, bottom)],
        "lonlat": _lonlat(scene, row, col, tile),
        "nodata": const["nodata"],
        "scale": const["scale"],
        "offset": const["offset"],
        "source": {"scene": scene.spec.id, "window": [row, col, tile, tile], "files": const["files"]},
    }
    if isinstance(label, np.ndarray):
        meta["label_ignore"] = scene.spec.label_ignore
    if valid.all():
        v = None
    elif all(np.array_equal(valid[0], valid[i]) for i in range(1, valid.shape[0])):
        v = valid[0].astype(np.uint8)
    else:
        v = valid.astype(np.uint8)
    key = make_key(scene.spec.id, _days(const["t0"]), row, col)
    return Tile(key=key, pixels=np.ascontiguousarray(pixels), meta=meta, valid=v, label=label)


# ----------------------------------------------------------------------------------------------
# Writing one shard (runs in a worker process)


@dataclass
class ShardJob:
    """Everything a worker needs to write one shard (picklable)."""

    plan: ShardPlan
    specs: list[SceneSpec]
    opts: BuildOptions


def write_shard(job: ShardJob, on_tile: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Read, filter and write the tiles of one shard; return its sidecar summary."""
    opts, plan = job.opts, job.plan
    out = Path(opts.out)
    by_scene: dict[int, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    for si, r, c in plan.tiles:
        by_scene[si][r].append(c)
    stats: dict[str, BandStats] = {}
    bands: dict[str, dict[str, Any]] = {}
    dates: set[str] = set()
    sensors: set[str] = set()
    per_scene: dict[str, dict[str, int]] = {}
    samples = dropped = 0
    tmp = out / f".{plan.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as fileobj:
            writer = TarSampleWriter(fileobj)
            for si in sorted(by_scene):
                scene = _open_cached(job.specs[si], opts.resampling)
                counts = per_scene.setdefault(scene.spec.id, {"samples": 0, "dropped": 0})
                for row in sorted(by_scene[si]):
                    for col, px, valid, label in read_row(scene, row, sorted(by_scene[si][row]), opts.tile):
                        if on_tile is not None:
                            on_tile(1)
                        if valid.mean() < opts.min_valid:
                            dropped += 1
                            counts["dropped"] += 1
                            continue
                        tile = make_tile(scene, row, col, opts.tile, px, valid, label)
                        writer.write(encode(tile))
                        samples += 1
                        counts["samples"] += 1
                        for i, b in enumerate(tile.meta["bands"]):
                            key = stats_key(b["sensor"], b["name"])
                            if key not in stats:
                                stats[key] = BandStats(seed=plan.index)
                                bands[key] = {k: b[k] for k in ("name", "sensor", "center_nm", "fwhm_nm", "kind")}
                            stats[key].update(px[i][valid[i]])
                            sensors.add(b["sensor"])
                            if b["time"]:
                                dates.add(b["time"])
            writer.close()
        nbytes = tmp.stat().st_size
        digest = sha256_file(tmp) if samples else ""
        if samples:
            os.replace(tmp, out / plan.name)
        else:
            tmp.unlink()
        summary = {
            "name": plan.name,
            "index": plan.index,
            "samples": samples,
            "bytes": nbytes if samples else 0,
            "sha256": digest,
            "dropped_low_valid": dropped,
            "tile_size": opts.tile,
            "bands": bands,
            "stats": {k: s.state() for k, s in stats.items()},
            "dates": sorted(dates),
            "sensors": sorted(sensors),
            "scenes": per_scene,
        }
        sidecar = out / (plan.name[: -len(".tar")] + SIDECAR_SUFFIX)
        atomic_write(sidecar, json.dumps(summary).encode())
        return summary
    finally:
        if tmp.exists():
            tmp.unlink()


_SCENE_CACHE: dict[str, Scene] = {}
_SCENE_CACHE_SIZE = 2  # consecutive shards of one worker usually share a scene


def _open_cached(spec: SceneSpec, resampling: str) -> Scene:
    """Open a scene, reusing this process's last opened ones (files, VRTs, grid)."""
    key = json.dumps([asdict(spec), resampling], sort_keys=True, default=str)
    if key in _SCENE_CACHE:
        return _SCENE_CACHE[key]
    while len(_SCENE_CACHE) >= _SCENE_CACHE_SIZE:
        _SCENE_CACHE.pop(next(iter(_SCENE_CACHE))).close()
    scene = _SCENE_CACHE[key] = open_scene(spec, resampling=resampling)
    return scene


def close_cached_scenes() -> None:
    """Close every cached scene of this process."""
    while _SCENE_CACHE:
        _SCENE_CACHE.popitem()[1].close()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _worker(job: ShardJob) -> dict[str, Any]:
    try:
        return write_shard(job)
    except ShardError as e:
        return {"error": str(e), "name": job.plan.name}


# ----------------------------------------------------------------------------------------------
# The whole build


def build(specs: list[SceneSpec], opts: BuildOptions, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Build (or resume) the shards of ``specs`` into ``opts.out``; write ``index.json`` unless partitioned.

    Returns:
        A summary: shards written/skipped, samples, dropped tiles, seconds, bytes.

    Raises:
        ShardError: bad input (raised before any shard is written), or scenes without any valid tile.
    """
    emit = log or (lambda m: print(m, file=sys.stderr))
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    ids = [s.id for s in specs]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ShardError(f"scene ids must be unique; repeated: {', '.join(dupes)}")
    for spec in specs:
        for d in spec.dates:
            if d.date is not None:
                try:
                    Date.fromisoformat(d.date)
                except ValueError:
                    raise ShardError(f"scene {spec.id!r}: date {d.date!r} is not YYYY-MM-DD") from None

    # Open every scene once up front: all input errors surface before anything is written.
    scenes = []
    for spec in specs:
        scene = open_scene(spec, resampling=opts.resampling)
        for n in scene.notices:
            emit(n)
        scenes.append(scene)
    try:
        empty = [s.spec.id for s in scenes if not tile_origins(s.grid.height, s.grid.width, opts.tile, opts.step)]
        if empty:
            sizes = {s.spec.id: f"{s.grid.width}x{s.grid.height}" for s in scenes}
            raise ShardError(
                "no tile fits in scene(s) " + ", ".join(f"{i} ({sizes[i]})" for i in empty) + f" at --tile {opts.tile}"
            )
        plans = make_plan(scenes, opts)
    finally:
        for s in scenes:
            s.close()

    _write_plan(out, specs, opts, plans)
    i, n = opts.part
    mine = [p for p in plans if p.index % n == i]
    todo = [p for p in mine if not is_complete(out, p.name)]
    skipped = len(mine) - len(todo)
    if skipped:
        emit(f"resuming: {skipped} of {len(mine)} shards already complete")
    total_tiles = sum(len(p.tiles) for p in todo)
    t0 = time.perf_counter()
    results: list[dict[str, Any]] = []
    errors: list[str] = []
    bar = tqdm(total=total_tiles, unit="tile", desc="shards", disable=not opts.progress, file=sys.stderr)
    jobs = [ShardJob(p, specs, opts) for p in todo]
    try:
        if opts.workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                results.append(write_shard(job, on_tile=bar.update))
        else:
            with ProcessPoolExecutor(max_workers=opts.workers) as pool:
                pending = {pool.submit(_worker, job): job for job in jobs}
                while pending:
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        job = pending.pop(fut)
                        res = fut.result()
                        if "error" in res:
                            errors.append(res["error"])
                        else:
                            results.append(res)
                        bar.update(len(job.plan.tiles))
    finally:
        bar.close()
        close_cached_scenes()
    if errors:
        raise ShardError(errors[0])
    seconds = time.perf_counter() - t0
    summary = {
        "planned_shards": len(plans),
        "part": f"{i}/{n}",
        "written": sum(1 for r in results if r["samples"]),
        "skipped_complete": skipped,
        "tiles_read": total_tiles,
        "samples": sum(r["samples"] for r in results),
        "dropped_low_valid": sum(r["dropped_low_valid"] for r in results),
        "bytes": sum(r["bytes"] for r in results),
        "seconds": seconds,
    }
    if n == 1:
        index = write_index(out)
        no_valid = [sid for sid, c in index["scenes"].items() if c["samples"] == 0]
        if no_valid:
            raise ShardError(
                "no tile of scene(s) " + ", ".join(no_valid) + f" has a valid fraction >= --min-valid {opts.min_valid}"
            )
    return summary


def _write_plan(out: Path, specs: list[SceneSpec], opts: BuildOptions, plans: list[ShardPlan]) -> None:
    """Record the plan; refuse to mix shards of a different plan in one directory."""
    plan_doc = {
        "gfm": __version__,
        "name": opts.name,
        "tile": opts.tile,
        "stride": opts.step,
        "min_valid": opts.min_valid,
        "shard_size": opts.shard_size,
        "resampling": opts.resampling,
        "scenes": [asdict(s) for s in specs],
        "shards": [{"name": p.name, "tiles": len(p.tiles)} for p in plans],
    }
    path = out / PLAN_FILE
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            old = None
        if old is not None and {k: v for k, v in old.items() if k != "gfm"} != {
            k: v for k, v in json.loads(json.dumps(plan_doc)).items() if k != "gfm"
        }:
            raise ShardError(
                f"{path}: {out} holds shards of a different build (other inputs or options); "
                "use a new --out directory or delete it"
            )
        return
    atomic_write(path, json.dumps(plan_doc, indent=1).encode())


def write_index(out: str | Path) -> dict[str, Any]:
    """Merge every shard sidecar in ``out`` into ``index.json`` (also what ``gfm shards index`` runs)."""
    out = Path(out)
    plan_path = out / PLAN_FILE
    planned: list[str] | None = None
    tile_size = None
    if plan_path.exists():
        doc = json.loads(plan_path.read_text())
        planned = [s["name"] for s in doc["shards"]]
        tile_size = doc["tile"]
    sidecars = sorted(out.glob("*" + SIDECAR_SUFFIX))
    if not sidecars:
        raise ShardError(f"{out}: no finished shards (no *{SIDECAR_SUFFIX} files) to index")
    stats: dict[str, BandStats] = {}
    bands: dict[str, Any] = {}
    shards, dates, sensors = [], set(), set()
    scenes: dict[str, dict[str, int]] = {}
    done = set()
    dropped = 0
    for sc in sidecars:
        try:
            s = json.loads(sc.read_text())
        except json.JSONDecodeError as e:
            raise ShardError(f"{sc}: unreadable shard sidecar ({e}); delete it to rebuild that shard") from None
        done.add(s["name"])
        dropped += s["dropped_low_valid"]
        tile_size = tile_size or s["tile_size"]
        for sid, c in s["scenes"].items():
            acc = scenes.setdefault(sid, {"samples": 0, "dropped": 0})
            acc["samples"] += c["samples"]
            acc["dropped"] += c["dropped"]
        if not s["samples"]:
            continue
        if not (out / s["name"]).exists():
            raise ShardError(f"{out / s['name']}: listed by {sc.name} but missing; delete the sidecar to rebuild it")
        shards.append({"name": s["name"], "samples": s["samples"], "bytes": s["bytes"], "sha256": s["sha256"]})
        bands.update(s["bands"])
        dates.update(s["dates"])
        sensors.update(s["sensors"])
        for key, st in s["stats"].items():
            bs = BandStats.from_state(st)
            if key in stats:
                stats[key].merge(bs)
            else:
                stats[key] = bs
    missing = sorted(set(planned) - done) if planned is not None else []
    index = {
        "schema": SCHEMA_VERSION,
        "created_by": f"gfm {__version__}",
        "shards": shards,
        "samples": sum(s["samples"] for s in shards),
        "bytes": sum(s["bytes"] for s in shards),
        "tile_size": tile_size,
        "sensors": sorted(sensors),
        "dates": sorted(dates),
        "bands": dict(sorted(bands.items())),
        "stats": {k: stats[k].summary() for k in sorted(stats)},
        "scenes": scenes,
        "dropped_low_valid": dropped,
        "planned_shards": len(planned) if planned is not None else len(done),
        "missing_shards": missing,
    }
    atomic_write(out / INDEX_FILE, json.dumps(index, indent=1).encode())
    return index
