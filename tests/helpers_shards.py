"""Tiny WebDataset shards made by code for the loader tests (a stand-in for ``gfm shards build``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import webdataset as wds

from gfm.index import BandInfo, BandSummary, Index, ShardEntry, stats_key
from gfm.index import write as write_index
from gfm.schema import SCHEMA_VERSION, Tile, band_entry, encode, make_key

# Three Landsat-8-like reflectance bands and a two-band "other" sensor for mixed band sets.
L8 = [
    {"name": "B2", "sensor": "landsat8", "center_nm": 482.0, "fwhm_nm": 60.0, "kind": "reflectance"},
    {"name": "B3", "sensor": "landsat8", "center_nm": 561.4, "fwhm_nm": 57.0, "kind": "reflectance"},
    {"name": "B4", "sensor": "landsat8", "center_nm": 654.6, "fwhm_nm": 37.0, "kind": "reflectance"},
]
S1 = [
    {"name": "VV", "sensor": "sentinel1", "center_nm": 5.547e7, "fwhm_nm": 1e6, "kind": "sar_vv"},
    {"name": "VH", "sensor": "sentinel1", "center_nm": 5.547e7, "fwhm_nm": 1e6, "kind": "sar_vh"},
]


def make_tile(
    scene: str, i: int, bands: Sequence[dict[str, Any]], size: int, rng: np.random.Generator, label: bool = False
) -> Tile:
    c = len(bands)
    pixels = rng.integers(100, 5000, size=(c, size, size), dtype=np.uint16)
    pixels[0, 0, 0] = 0  # one nodata pixel per tile
    meta = {
        "schema": 1,
        "bands": [band_entry(b, "2015-08-04") for b in bands],
        "gsd_m": 30.0,
        "crs": "EPSG:32616",
        "transform": [30.0, 0.0, 0.0, 0.0, -30.0, 0.0],
        "bounds": [0.0, -30.0 * size, 30.0 * size, 0.0],
        "lonlat": [0.0, 0.0],
        "nodata": 0,
        "scale": 1.0,
        "offset": 0.0,
        "source": {},
    }
    seg = pixels[0].astype(np.int32) if label else None  # a label equal to band 0 shows the geometry
    return Tile(key=make_key(scene, 0, i, 0), pixels=pixels, meta=meta, label=seg)


def write_dataset(
    root: str,
    shard_sizes: Sequence[int],
    *,
    size: int = 16,
    mixed: bool = False,
    label: bool = False,
    seed: int = 0,
    name: str = "gfm",
) -> list[str]:
    """Write ``len(shard_sizes)`` shards and an ``index.json`` (through :mod:`gfm.index`) in ``root``; returns keys.

    With ``mixed`` every third shard holds two-band Sentinel-1-like tiles instead of Landsat 8.
    """
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    keys: list[str] = []
    entries = []
    sums: dict[str, list[float]] = {}
    for s, n in enumerate(shard_sizes):
        bands = S1 if mixed and s % 3 == 2 else L8
        fname = f"{name}-{s:06d}.tar"
        with wds.TarWriter(os.path.join(root, fname), encoder=False) as sink:
            for i in range(n):
                tile = make_tile(f"scene{s}", i, bands, size, rng, label)
                sink.write(encode(tile))
                keys.append(tile.key)
                for c, b in enumerate(bands):
                    v = tile.pixels[c][tile.pixels[c] != 0].astype(np.float64)
                    acc = sums.setdefault(stats_key(b["sensor"], b["name"]), [0.0, 0.0, 0.0])
                    acc[0] += v.size
                    acc[1] += v.sum()
                    acc[2] += (v * v).sum()
        entries.append(ShardEntry(fname, n, os.path.getsize(os.path.join(root, fname))))
    stats = {
        k: BandSummary(count=int(n), mean=s / n, std=float(np.sqrt(max(0.0, sq / n - (s / n) ** 2))))
        for k, (n, s, sq) in sums.items()
    }
    bands = [BandInfo(**b) for b in L8 + (S1 if mixed else [])]
    index = Index(
        schema=SCHEMA_VERSION,
        created_by="tests.helpers_shards",
        shards=entries,
        samples=sum(shard_sizes),
        bytes=sum(e.bytes or 0 for e in entries),
        tile_size=size,
        sensors=sorted({b.sensor for b in bands}),
        dates=["2015-08-04"],
        bands={b.key: b for b in bands},
        stats=stats,
        scenes={},
        dropped_low_valid=0,
        planned_shards=len(entries),
        missing_shards=[],
    )
    write_index(root, index)
    return keys
