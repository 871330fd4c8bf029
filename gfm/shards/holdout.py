"""Held-out tiles: a deterministic part of every scene kept out of training, and off the ground it covers.

With ``BuildOptions.holdout = f > 0`` the candidate tiles of each scene (its tile origins, in the
order :func:`gfm.shards.plan.tile_origins` gives them) are ranked by a stable hash of
``(scene id, row, col)``, and the first ``max(1, round(f * n))`` of its ``n`` tiles are held out (at
most ``n - 1``: a scene of a single tile keeps it for training). Tiles on ground that another scene of
the build covers too rank after all the others, so where scenes overlap, held-out tiles are taken
from the ground only one scene covers as long as there is enough of it. The choice depends on
nothing but the scenes' ids, grids and the tiling, so two builds of the same scenes and options (one
per split) agree on it without sharing any state:

* ``split="heldout"`` writes exactly the held-out tiles;
* ``split="train"`` writes every other tile that does not overlap a held-out tile on the ground: a
  neighbour of the same scene when ``stride < tile``, or a tile of another scene of the build that
  covers the same place (two overlapping Landsat rows, a time series split into scenes). Footprints
  of scenes in other CRSs are compared after reprojection (their bounding boxes, a conservative
  test); scenes without a CRS (image grids) are compared only with themselves.

So every scene of at least two tiles has held-out tiles, the held-out share of each scene is ``f``
(rounded), and no training tile shares a pixel of ground with a held-out tile. Tiles dropped later for
low validity (``min_valid``) are dropped from either side as usual; a held-out tile that is dropped
still keeps the training tiles over it out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
from rasterio.warp import transform as warp_transform
from rasterio.warp import transform_bounds

from gfm.shards.grid import Grid
from gfm.shards.options import BuildOptions
from gfm.shards.plan import tile_origins
from gfm.shards.scene import Scene

Origin = tuple[int, int]


@dataclass(frozen=True)
class Selection:
    """The tiles one build writes, per scene, and how the hold-out rule chose them.

    Attributes:
        tiles: per scene (in build order), the origins ``(row, col)`` to write, in tile order.
        candidates: candidate tiles over all scenes.
        heldout: tiles held out over all scenes.
        overlapping: training candidates left out because they overlap a held-out tile.
    """

    tiles: list[list[Origin]]
    candidates: int
    heldout: int
    overlapping: int

    def notice(self, opts: BuildOptions) -> str:
        """One line saying what the rule did for this build's ``split``."""
        written = sum(len(t) for t in self.tiles)
        return (f"notice: holdout {opts.holdout:g}: {self.heldout} of {self.candidates} candidate tiles held out, "
                f"{self.overlapping} more kept out of training for overlapping them; split {opts.split!r} "
                f"writes {written}")


def tile_rank(scene_id: str, row: int, col: int) -> bytes:
    """The stable sort key of a tile in the hold-out ranking (sha256 of ``"<scene id>/<row>/<col>"``)."""
    return hashlib.sha256(f"{scene_id}/{row}/{col}".encode()).digest()


def heldout_origins(
    scene_id: str, origins: Sequence[Origin], fraction: float, shared: Collection[Origin] = ()
) -> set[Origin]:
    """The held-out tiles of one scene: its ``max(1, round(fraction * n))`` lowest ranked tiles.

    Tiles in ``shared`` (ground another scene of the build covers too) rank after all others. A scene
    of one tile holds none out, and every scene keeps at least one tile for training.
    """
    n = len(origins)
    if fraction <= 0 or n < 2:
        return set()
    k = min(n - 1, max(1, round(fraction * n)))
    return set(sorted(origins, key=lambda o: (o in shared, tile_rank(scene_id, *o)))[:k])


def footprints(grid: Grid, origins: Sequence[Origin], tile: int) -> np.ndarray:
    """``[N, 4]`` (left, bottom, right, top) of each tile in the grid's CRS (image units without one)."""
    if not origins:
        return np.zeros((0, 4))
    rc = np.asarray(origins, dtype=np.float64)
    t = grid.transform
    cols = np.stack([rc[:, 1], rc[:, 1] + tile, rc[:, 1], rc[:, 1] + tile], axis=1)
    rows = np.stack([rc[:, 0], rc[:, 0], rc[:, 0] + tile, rc[:, 0] + tile], axis=1)
    xs = t.a * cols + t.b * rows + t.c
    ys = t.d * cols + t.e * rows + t.f
    return np.stack([xs.min(1), ys.min(1), xs.max(1), ys.max(1)], axis=1)


def _reproject_boxes(boxes: np.ndarray, src: Grid, dst: Grid) -> np.ndarray | None:
    """Bounding boxes of ``boxes`` (in ``src``'s CRS) in ``dst``'s CRS: corners and edge midpoints."""
    if src.crs is None or dst.crs is None:
        return None
    if src.crs == dst.crs:
        return boxes
    left, bottom, right, top = boxes.T
    mx, my = (left + right) / 2, (bottom + top) / 2
    xs = np.stack([left, right, left, right, mx, mx, left, right], axis=1)
    ys = np.stack([bottom, bottom, top, top, bottom, top, my, my], axis=1)
    try:
        tx, ty = warp_transform(src.crs, dst.crs, xs.ravel().tolist(), ys.ravel().tolist())
    except Exception:  # no transformation between the two CRSs: treat as unrelated places
        return None
    x = np.asarray(tx).reshape(xs.shape)
    y = np.asarray(ty).reshape(ys.shape)
    out = np.stack([x.min(1), y.min(1), x.max(1), y.max(1)], axis=1)
    return out[np.isfinite(out).all(axis=1)]


def _overlapping(cand: np.ndarray, held: np.ndarray, tol: float) -> np.ndarray:
    """``[N]`` whether each candidate box shares an area (more than ``tol`` deep) with any held-out box.

    Boxes that only touch (adjacent tiles) do not overlap: the candidates are shrunk by ``tol`` first.
    """
    bad = np.zeros(len(cand), dtype=bool)
    if len(cand) == 0 or len(held) == 0:
        return bad
    import shapely

    tree = shapely.STRtree(shapely.box(*held.T))
    shrunk = cand + np.array([tol, tol, -tol, -tol])
    hits = tree.query(shapely.box(*shrunk.T), predicate="intersects")
    bad[hits[0]] = True
    return bad


def _meets(a: Grid, b: Grid) -> bool:
    """Whether grid ``b``'s extent, in ``a``'s CRS, shares an area with ``a``'s (False without both CRSs)."""
    if a.crs is None or b.crs is None:
        return False
    try:
        left, bottom, right, top = b.bounds if a.crs == b.crs else transform_bounds(b.crs, a.crs, *b.bounds)
    except Exception:  # no transformation between the two CRSs: unrelated places
        return False
    al, ab, ar, at = a.bounds
    return bool(al < right and left < ar and ab < top and bottom < at)


def _shared_ground(i: int, scenes: Sequence[Scene], origins: Sequence[Origin], tile: int) -> set[Origin]:
    """The tiles of scene ``i`` that overlap the extent of another scene of the build."""
    grid = scenes[i].grid
    boxes = footprints(grid, origins, tile)
    covered = np.zeros(len(origins), dtype=bool)
    for j, other in enumerate(scenes):
        if j != i and _meets(grid, other.grid):
            extent = _reproject_boxes(np.array([other.grid.bounds], dtype=np.float64), other.grid, grid)
            if extent is not None:
                covered |= _overlapping(boxes, extent, 1e-6 * min(grid.res))
    return {o for o, c in zip(origins, covered) if c}


def select_tiles(scenes: Sequence[Scene], opts: BuildOptions) -> Selection:
    """The tiles of each scene that a build with ``opts`` writes (every tile when ``opts.holdout`` is 0)."""
    origins = [tile_origins(s.grid.height, s.grid.width, opts.tile, opts.step, opts.edge) for s in scenes]
    candidates = sum(len(o) for o in origins)
    if opts.holdout <= 0:
        return Selection(origins, candidates, 0, 0)
    shared = [_shared_ground(i, scenes, o, opts.tile) for i, o in enumerate(origins)]
    held = [heldout_origins(s.spec.id, o, opts.holdout, sh) for s, o, sh in zip(scenes, origins, shared)]
    n_held = sum(len(h) for h in held)
    if opts.split == "heldout":
        return Selection([[o for o in os if o in h] for os, h in zip(origins, held)], candidates, n_held, 0)
    held_boxes = [footprints(s.grid, sorted(h), opts.tile) for s, h in zip(scenes, held)]
    tiles: list[list[Origin]] = []
    overlapping = 0
    for i, scene in enumerate(scenes):
        rest = [o for o in origins[i] if o not in held[i]]
        boxes = footprints(scene.grid, rest, opts.tile)
        tol = 1e-6 * min(scene.grid.res)
        bad = np.zeros(len(rest), dtype=bool)
        for j, other in enumerate(scenes):
            if j != i and not (len(held_boxes[j]) and _meets(scene.grid, other.grid)):
                continue
            theirs = held_boxes[j] if j == i else _reproject_boxes(held_boxes[j], other.grid, scene.grid)
            if theirs is not None:
                bad |= _overlapping(boxes, theirs, tol)
        overlapping += int(bad.sum())
        tiles.append([o for o, b in zip(rest, bad) if not b])
    return Selection(tiles, candidates, n_held, overlapping)
