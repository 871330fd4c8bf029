"""The build plan: which tile goes into which shard, as a pure function of the inputs and options.

Every candidate tile of every scene, in scene then row-major order, is packed into shards of about
``shard_size`` bytes (estimated), named ``<name>-<index:06d>.tar``. The plan is recorded in
``build.json`` with what it was made from:

* the options and scene specs: a directory that holds shards of other specs or options is refused, so
  a re-run (or another ``part``) always adds to the same build;
* a fingerprint of every input file (:mod:`gfm.shards.fingerprint`; a URL's from its HTTP validators and
  header, :func:`gfm.shards.remote.remote_fingerprint`) and a digest of each opened scene
  (grid, bands with their sensor descriptions, validity rules, label classes): a re-run whose inputs
  changed invalidates exactly the shards holding tiles of the scenes those inputs fed (their files
  are deleted and rebuilt), with a notice naming each changed file;
* per shard, the scenes it holds and a digest of its tile list.

URLs are recorded redacted (:func:`gfm.shards.remote.redact`): no credential reaches ``build.json``, and
a signed URL whose signature is renewed still names the same input.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gfm import __version__
from gfm.fileio import atomic_write
from gfm.index import INDEX_FILE, is_shard_name, members_name
from gfm.shards.errors import DatasetError
from gfm.shards.fingerprint import Fingerprint, fingerprint
from gfm.shards.options import BuildOptions
from gfm.shards.readers import open_raster
from gfm.shards.remote import is_remote, redact, remote_fingerprint
from gfm.shards.scene import Scene
from gfm.shards.sidecar import sidecar_path
from gfm.shards.spec import SceneSpec

PLAN_FILE = "build.json"
#: ``format`` of the ``build.json`` written here (files without one come from before input fingerprints).
PLAN_FORMAT = 2
# build.json keys that must match for a directory to hold the same build
_SAME_BUILD = ("name", "tile", "stride", "min_valid", "shard_size", "resampling", "edge", "holdout", "split", "scenes")
# their values in a build.json written before the key existed
_BEFORE_KEY = {"edge": "full", "holdout": 0.0, "split": "train"}


@dataclass
class ShardPlan:
    """One shard: its index, file name and the tiles (scene index, row, col) it will hold."""

    index: int
    name: str
    tiles: list[tuple[int, int, int]] = field(default_factory=list)


def shard_name(name: str, index: int) -> str:
    """Deterministic shard file name."""
    return f"{name}-{index:06d}.tar"


def _starts(n: int, tile: int, step: int, pad: bool) -> list[int]:
    if not pad:
        return list(range(0, n - tile + 1, step)) if n >= tile else []
    starts = [0]
    while starts[-1] + tile < n:
        starts.append(starts[-1] + step)
    return starts


def tile_origins(height: int, width: int, tile: int, step: int, edge: str = "full") -> list[tuple[int, int]]:
    """Top-left (row, col) of every tile.

    ``edge="full"``: whole tiles only; ``edge="pad"``: until the edges are covered (the last tile of a row
    or column may reach past the scene; it is padded).
    """
    pad = edge == "pad"
    return [(r, c) for r in _starts(height, tile, step, pad) for c in _starts(width, tile, step, pad)]


def uncovered_fraction(height: int, width: int, tile: int, step: int, edge: str = "full") -> float:
    """Fraction of a scene's pixels that no tile covers (0 with ``edge="pad"``)."""
    rows, cols = _starts(height, tile, step, edge == "pad"), _starts(width, tile, step, edge == "pad")
    if not rows or not cols:
        return 1.0
    covered = min(height, rows[-1] + tile) * min(width, cols[-1] + tile)
    return 1.0 - covered / (height * width)


def make_plan(
    scenes: Sequence[Scene], opts: BuildOptions, tiles: Sequence[Sequence[tuple[int, int]]] | None = None
) -> list[ShardPlan]:
    """Pack the tiles into shards of about ``opts.shard_size`` bytes (estimated).

    ``tiles`` gives each scene's tile origins to write (:func:`gfm.shards.holdout.select_tiles`);
    None: every candidate tile.
    """
    plans: list[ShardPlan] = []
    current = ShardPlan(0, shard_name(opts.name, 0))
    used = 0
    for si, scene in enumerate(scenes):
        c = len(scene.observations)
        # pixels + valid mask + label, plus tar headers and meta.json
        per_tile = opts.tile * opts.tile * (c * scene.dtype().itemsize + c + 4) + 2048
        if tiles is not None:
            origins = tiles[si]
        else:
            origins = tile_origins(scene.grid.height, scene.grid.width, opts.tile, opts.step, opts.edge)
        for r, col in origins:
            if current.tiles and used + per_tile > opts.shard_size:
                plans.append(current)
                current = ShardPlan(len(plans), shard_name(opts.name, len(plans)))
                used = 0
            current.tiles.append((si, r, col))
            used += per_tile
    if current.tiles:
        plans.append(current)
    return plans


def input_paths(spec: SceneSpec) -> list[str]:
    """Every file or URL a scene reads (bands, cubes, wavelength lists, label), each once, in order."""
    paths: list[str] = []
    for d in spec.dates:
        for f in d.files:
            paths += [p for p in (f.path, f.wavelengths, f.fwhm) if p is not None]
    if spec.label is not None:
        paths.append(spec.label)
    return list(dict.fromkeys(paths))


def scene_digest(scene: Scene, classes: Mapping[str, int] | None) -> str:
    """sha256 of what an opened scene puts into its tiles besides pixels: grid, bands, rules, classes."""
    g = scene.grid
    doc = {
        "grid": [str(g.crs) if g.crs is not None else None, list(g.transform)[:6], g.width, g.height],
        "observations": [[b.to_dict(), d] for b, d in scene.observations],
        "nodata": scene.tile_constants.nodata,
        "scale": scene.tile_constants.scale,
        "offset": scene.tile_constants.offset,
        "quality": [[redact(q.reader.path), q.rule, q.date] for q in scene.quality],
        "classes": dict(classes) if classes is not None and scene.spec.label is not None else None,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def _tiles_digest(plan: ShardPlan) -> str:
    return hashlib.sha256(json.dumps(plan.tiles).encode()).hexdigest()[:16]


def plan_doc(
    specs: Sequence[SceneSpec],
    opts: BuildOptions,
    plans: Sequence[ShardPlan],
    fingerprints: Mapping[str, Fingerprint],
    digests: Sequence[str],
    classes: Mapping[str, int] | None,
) -> dict[str, Any]:
    """The ``build.json`` document of a plan."""
    doc = {
        "gfm": __version__,
        "format": PLAN_FORMAT,
        "name": opts.name,
        "tile": opts.tile,
        "stride": opts.step,
        "min_valid": opts.min_valid,
        "shard_size": opts.shard_size,
        "resampling": opts.resampling,
        "edge": opts.edge,
        "holdout": opts.holdout,
        "split": opts.split,
        "scenes": [_redacted(asdict(s)) for s in specs],
        "classes": {name: value for name, value in classes.items()} if classes is not None else None,
        "inputs": {redact(p): fp.to_dict() for p, fp in fingerprints.items()},
        "scene_digests": {s.id: d for s, d in zip(specs, digests)},
        "shards": [
            {"name": p.name, "tiles": len(p.tiles), "scenes": sorted({specs[si].id for si, _, _ in p.tiles}),
             "digest": _tiles_digest(p)}
            for p in plans
        ],
    }
    out: dict[str, Any] = json.loads(json.dumps(doc))  # as it reads back (tuples → lists)
    return out


def _redacted(obj: Any) -> Any:
    """A scene spec (as plain data) with every string redacted: URLs lose their credentials."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: _redacted(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_redacted(v) for v in obj]
    return obj


def read_plan(out: Path) -> dict[str, Any] | None:
    """The ``build.json`` of ``out`` as written by a gfm build, or None when there is none.

    Raises:
        DatasetError: the file exists but is not a gfm build plan (or a damaged one).
    """
    path = out / PLAN_FILE
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
        if not (isinstance(doc, dict) and "gfm" in doc and isinstance(doc.get("shards"), list)):
            raise ValueError("not a gfm build plan")
        for s in doc["shards"]:
            if not isinstance(s, dict) or not isinstance(s.get("name"), str) or not is_shard_name(s["name"]):
                raise ValueError(f"shard entry {s!r} has no plain file name")
        int(doc.get("tile", 0))
        if doc.get("format") == PLAN_FORMAT:
            if not (isinstance(doc.get("inputs"), dict) and isinstance(doc.get("scene_digests"), dict)):
                raise ValueError("no 'inputs' or 'scene_digests' mapping")
            if not all(isinstance(s.get("scenes"), list) for s in doc["shards"]):
                raise ValueError("a shard entry without its 'scenes' list")
            classes = doc.get("classes")
            if classes is not None and not (isinstance(classes, dict) and
                                            all(isinstance(v, int) for v in classes.values())):
                raise ValueError(f"'classes' is not a mapping of class names to integers: {classes!r}")
        return doc
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"{path}: unreadable build plan ({e}); it was not written by gfm shards build, "
                           "or is damaged: use a new output directory") from None


def planned_shards(out: Path) -> tuple[list[str], int] | None:
    """``(shard names, tile size)`` recorded in ``out/build.json``, or None when there is no plan file."""
    doc = read_plan(out)
    if doc is None:
        return None
    return [s["name"] for s in doc["shards"]], int(doc.get("tile", 0))


def plan_classes(out: Path) -> dict[int, str] | None:
    """Label value → class name recorded in ``out/build.json`` (None when the labels have no names)."""
    doc = read_plan(out)
    classes = doc.get("classes") if doc is not None and doc.get("format") == PLAN_FORMAT else None
    if not isinstance(classes, dict):
        return None
    return {int(v): str(n) for n, v in classes.items()}


def fingerprint_inputs(specs: Sequence[SceneSpec]) -> dict[str, Fingerprint]:
    """A fingerprint of every input file of ``specs`` (see :func:`input_paths`); URLs by their header."""
    from gfm.shards.errors import InputError

    out: dict[str, Fingerprint] = {}
    for spec in specs:
        for p in input_paths(spec):
            if p in out:
                continue
            if is_remote(p):
                with open_raster(p) as ds:
                    out[p] = remote_fingerprint(p, ds)
            else:
                try:
                    out[p] = fingerprint(p)
                except OSError as e:
                    raise InputError(f"{p}: cannot read ({e.strerror})") from None
    return out


def shard_files(out: Path, name: str) -> list[Path]:
    """The files a finished shard consists of: sidecar (first: it marks the shard complete), tar, member table."""
    return [sidecar_path(out, name), out / name, out / members_name(name)]


def _same_scenes(old: Any, new: Any) -> bool:
    """Scene specs equal, ignoring fields the older file lacks that are unset (None) in the newer one."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = set(old) | {k for k, v in new.items() if v is not None}
        return all(_same_scenes(old.get(k), new.get(k)) for k in keys)
    if isinstance(old, list) and isinstance(new, list):
        return len(old) == len(new) and all(_same_scenes(a, b) for a, b in zip(old, new))
    return bool(old == new)


def reconcile_plan(out: Path, specs: Sequence[SceneSpec], doc: dict[str, Any]) -> list[str]:
    """Record ``doc`` (the plan of ``specs``) in ``out/build.json``, invalidating stale shards; returns notices.

    A new directory just gets the plan. An existing plan must be of the same build (options and scene
    specs); then every input whose fingerprint changed, and every scene whose digest changed, marks the
    shards holding tiles of those scenes as stale, and so does a shard whose tile list changed: their
    files are deleted (the sidecar first) before the new plan is written, so a crash in between leaves
    them to be found stale again. ``index.json`` is removed with them (it lists them); the merge writes
    it anew.

    Raises:
        DatasetError: ``out`` holds shards of a different build, or an unreadable plan.
    """
    path = out / PLAN_FILE
    old = read_plan(out)
    if old is None:
        atomic_write(path, json.dumps(doc, indent=1).encode())
        return []
    shard_list = [(s.get("name"), s.get("tiles")) for s in old["shards"]]
    same = all(_same_scenes(old.get(k, _BEFORE_KEY.get(k)), doc[k]) for k in _SAME_BUILD)
    if same and old.get("format") != PLAN_FORMAT:  # written before fingerprints: the plan itself must match
        same = shard_list == [(s["name"], s["tiles"]) for s in doc["shards"]]
    if not same:
        raise DatasetError(
            f"{path}: {out} holds shards of a different build (other inputs or options); "
            "use a new output directory or delete it"
        )
    notices: list[str] = []
    if old.get("format") != PLAN_FORMAT:
        notices.append(f"notice: {path} records no input fingerprints (written by an older gfm); the finished "
                       "shards are kept as they are")
        atomic_write(path, json.dumps(doc, indent=1).encode())
        return notices
    stale_scenes: set[str] = set()
    for spec in specs:
        for p in input_paths(spec):
            key = redact(p)  # as plan_doc records it
            now = Fingerprint.from_dict(doc["inputs"][key])
            assert now is not None
            what = now.change_from(Fingerprint.from_dict(old.get("inputs", {}).get(key)))
            if what is not None:
                stale_scenes.add(spec.id)
                notices.append(f"notice: input {key} changed since the last build ({what}); scene {spec.id!r} "
                               "is rebuilt")
    for sid, digest in doc["scene_digests"].items():
        if old.get("scene_digests", {}).get(sid) != digest and sid not in stale_scenes:
            stale_scenes.add(sid)
            notices.append(f"notice: scene {sid!r} reads differently since the last build (grid, band "
                           "descriptions, quality rules or label classes); it is rebuilt")
    before = {s["name"]: s for s in old["shards"]}
    after = {s["name"]: s for s in doc["shards"]}
    stale = [name for name, s in after.items()
             if name in before and (before[name].get("digest") != s["digest"] or stale_scenes & set(s["scenes"]))]
    stale += [name for name in before if name not in after]
    removed = [name for name in stale if any(f.exists() for f in shard_files(out, name))]
    for name in removed:
        for f in shard_files(out, name):
            f.unlink(missing_ok=True)
    if removed:
        (out / INDEX_FILE).unlink(missing_ok=True)
        listed = ", ".join(removed[:5]) + (f" and {len(removed) - 5} more" if len(removed) > 5 else "")
        notices.append(f"notice: {len(removed)} finished shard(s) of changed inputs deleted, to be rebuilt: {listed}")
    if doc != old:
        atomic_write(path, json.dumps(doc, indent=1).encode())
    return notices
