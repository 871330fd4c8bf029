"""The build plan: which tile goes into which shard, as a pure function of the inputs and options.

Every candidate tile of every scene, in scene then row-major order, is packed into shards of about
``shard_size`` bytes (estimated), named ``<name>-<index:06d>.tar``. The plan is recorded in
``build.json``; a directory that holds shards of another plan is refused, so a re-run (or another
``part``) always adds to the same build.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gfm import __version__
from gfm.fileio import atomic_write
from gfm.shards.errors import DatasetError
from gfm.shards.options import BuildOptions
from gfm.shards.scene import Scene
from gfm.shards.spec import SceneSpec

PLAN_FILE = "build.json"


@dataclass
class ShardPlan:
    """One shard: its index, file name and the tiles (scene index, row, col) it will hold."""

    index: int
    name: str
    tiles: list[tuple[int, int, int]] = field(default_factory=list)


def shard_name(name: str, index: int) -> str:
    """Deterministic shard file name."""
    return f"{name}-{index:06d}.tar"


def tile_origins(height: int, width: int, tile: int, step: int) -> list[tuple[int, int]]:
    """Top-left (row, col) of every full tile; partial edge tiles are not produced."""
    rows = range(0, height - tile + 1, step) if height >= tile else range(0)
    cols = range(0, width - tile + 1, step) if width >= tile else range(0)
    return [(r, c) for r in rows for c in cols]


def make_plan(scenes: Sequence[Scene], opts: BuildOptions) -> list[ShardPlan]:
    """Pack every candidate tile into shards of about ``opts.shard_size`` bytes (estimated)."""
    plans: list[ShardPlan] = []
    current = ShardPlan(0, shard_name(opts.name, 0))
    used = 0
    for si, scene in enumerate(scenes):
        c = len(scene.observations)
        # pixels + valid mask + label, plus tar headers and meta.json
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


def planned_shards(out: Path) -> tuple[list[str], int] | None:
    """``(shard names, tile size)`` recorded in ``out/build.json``, or None when there is no plan file."""
    path = out / PLAN_FILE
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
        return [str(s["name"]) for s in doc["shards"]], int(doc["tile"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise DatasetError(f"{path}: unreadable build plan ({e}); delete the directory and rebuild") from None


def write_plan(out: Path, specs: Sequence[SceneSpec], opts: BuildOptions, plans: Sequence[ShardPlan]) -> None:
    """Record the plan in ``build.json``; refuse a directory that holds shards of a different plan."""
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
            raise DatasetError(
                f"{path}: {out} holds shards of a different build (other inputs or options); "
                "use a new output directory or delete it"
            )
        return
    atomic_write(path, json.dumps(plan_doc, indent=1).encode())
