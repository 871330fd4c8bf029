"""Checks of a train / held-out pair of shard directories, built only from what the tiles say.

Footprints come from each tile's ``meta.json`` (``transform`` and the pixel size, ``crs``), not from
the writer's hold-out code: tiles in one CRS are compared there, tiles in two CRSs after densified
reprojection of both to lon/lat, and tiles without a CRS only with tiles of their own scene.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import shapely
from rasterio.warp import transform_geom
from shapely.geometry import mapping, shape

from gfm import index as index_file
from gfm.schema import Tile, decode
from gfm.shards import iter_samples


def read_tiles(root: Path) -> dict[str, Tile]:
    """Every tile of a dataset root, by key."""
    idx = index_file.read(root)
    return {t.key: t for e in idx.shards for t in map(decode, iter_samples(root / e.name))}


def footprint(tile: Tile) -> shapely.Polygon:
    """The tile's ground footprint in its own CRS (image units without one)."""
    a, b, c, d, e, f = tile.meta["transform"]
    h, w = tile.pixels.shape[1:]
    corners = [(0, 0), (w, 0), (w, h), (0, h)]
    return shapely.Polygon([(a * x + b * y + c, d * x + e * y + f) for x, y in corners])


def _lonlat(poly: shapely.Polygon, crs: str) -> shapely.Geometry:
    dense = shapely.segmentize(poly, poly.length / 64)
    return shape(transform_geom(crs, "EPSG:4326", mapping(dense)))


def ground_overlaps(a: dict[str, Tile], b: dict[str, Tile], rel: float = 1e-6) -> list[tuple[str, str]]:
    """Pairs (key in ``a``, key in ``b``) of tiles that share ground (more than ``rel`` of a tile's area)."""
    groups: dict[object, list[tuple[str, shapely.Geometry]]] = defaultdict(list)
    lonlat_a, lonlat_b = [], []
    for side, tiles in (("a", a), ("b", b)):
        for key, t in tiles.items():
            crs = t.meta["crs"]
            poly = footprint(t)
            group = (side, crs if crs is not None else ("image", t.meta["source"]["scene"]))
            groups[group].append((key, poly))
            if crs is not None:
                (lonlat_a if side == "a" else lonlat_b).append((key, crs, _lonlat(poly, crs)))
    pairs: set[tuple[str, str]] = set()

    def collide(left: list[tuple[str, shapely.Geometry]], right: list[tuple[str, shapely.Geometry]]) -> None:
        if not left or not right:
            return
        tree = shapely.STRtree([g for _, g in right])
        for key, geom in left:
            for j in tree.query(geom, predicate="intersects"):
                other = right[int(j)][1]
                if geom.intersection(other).area > rel * min(geom.area, other.area):
                    pairs.add((key, right[int(j)][0]))

    for (side, group), items in groups.items():
        if side == "a":
            collide(items, groups.get(("b", group), []))
    # tiles in different CRSs: compare in lon/lat
    by_crs_b: dict[str, list[tuple[str, shapely.Geometry]]] = defaultdict(list)
    for key, crs, geom in lonlat_b:
        by_crs_b[crs].append((key, geom))
    for crs in {c for _, c, _ in lonlat_a}:
        mine = [(k, g) for k, c, g in lonlat_a if c == crs]
        theirs = [item for c, items in by_crs_b.items() if c != crs for item in items]
        collide(mine, theirs)
    return sorted(pairs)


def scene_counts(tiles: dict[str, Tile]) -> dict[str, int]:
    """Tiles per source scene."""
    counts: dict[str, int] = defaultdict(int)
    for t in tiles.values():
        counts[t.meta["source"]["scene"]] += 1
    return dict(counts)


def windows(tiles: dict[str, Tile], scene: str) -> np.ndarray:
    """``[N, 2]`` (row, col) of the tiles of one scene."""
    return np.array([t.meta["source"]["window"][:2] for t in tiles.values() if t.meta["source"]["scene"] == scene])
