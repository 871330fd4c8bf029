"""Tile embeddings: shards or a scene → one vector per tile in GeoParquet (and a dense per-patch COG).

- :func:`embed_shards`: every sample of a shard dataset (``index.json`` order), decoded under the tile
  schema, validity as the loader computes it, normalised with the *model's* statistics.
- :func:`embed_scene`: a scene cut into non-overlapping tiles on a grid anchored at its top-left corner
  (the last row and column padded with invalid pixels), so per-patch embeddings line up across tiles;
  tiles without a valid pixel are skipped. Optionally the per-position tokens become a ``D``-band
  float32 COG at patch resolution (``dense``), written tile by tile.

Pooling (recorded in the file's ``gfm`` metadata): ``mean`` averages the per-position summary tokens
over positions holding a valid pixel; ``cls`` takes the global CLS token.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from einops import rearrange
from rasterio.transform import Affine

from gfm import __version__
from gfm.hub import GFMModel, HubError, InputBands, OutputExistsError, Pooling, input_bands, pool
from gfm.infer.cog import CogWriter, gdal_env
from gfm.infer.geoparquet import EmbeddingWriter, TileRow
from gfm.infer.scenes import observation_bands, read_window, scene_paths, tile_lonlat
from gfm.outputs import check_files
from gfm.schema import Tile, bandset_signature
from gfm.shards.scene import Scene


@dataclass
class EmbedOptions:
    """How to embed.

    Attributes:
        pooling: ``mean`` (valid per-position tokens) or ``cls``.
        batch_size: tiles per forward.
        tile: scenes: tile side in pixels (None: the tile size the model was trained on, else 64).
        stats: extra or overriding band statistics ``"sensor/band"`` → ``{"mean", "std"}``.
        unknown: ``error`` refuses bands without statistics, ``drop`` leaves them out.
        dense: scenes: also write per-patch embeddings to this COG path.
        overwrite: replace existing outputs.
        progress: show a tqdm bar.
        device: where the model runs.
    """

    pooling: Pooling = "mean"
    batch_size: int = 16
    tile: int | None = None
    stats: dict[str, dict[str, float]] | None = None
    unknown: str = "error"
    dense: str | Path | None = None
    overwrite: bool = False
    progress: bool = True
    device: str = "cpu"


@dataclass
class EmbedReport:
    """What an embedding run wrote."""

    out: Path
    rows: int
    dim: int
    pooling: str
    skipped: int
    seconds: float
    dense: Path | None = None
    dropped_bands: list[str] | None = None


def _metadata(model: GFMModel, opts: EmbedOptions, source: str, dim: int) -> dict[str, Any]:
    cfg = model.config
    return {
        "gfm_version": __version__,
        "model": (cfg.get("model") or {}).get("name"),
        "model_source": (cfg.get("training") or {}).get("source"),
        "pooling": opts.pooling,
        "pooling_description": "mean of the per-position summary tokens over positions with a valid pixel"
        if opts.pooling == "mean" else "the global CLS token",
        "embedding_dim": dim,
        "source": source,
        "normalization": "(raw - mean) / std with the model's band statistics",
    }


def _embed(model: GFMModel, batch: Any, opts: EmbedOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pooled [B, D], per-position tokens [B, N, D])`` for a batch."""
    with torch.no_grad():
        tokens = model.features(batch.to(opts.device)).float().cpu()
    return pool(tokens, batch, opts.pooling, model.patch_size), tokens[:, 0, 1:]


def _check(path: Path | None, overwrite: bool) -> None:
    if path is not None and path.exists() and not overwrite:
        raise OutputExistsError(path)


def _bar(total: int | None, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tile", dynamic_ncols=True)


# ------------------------------------------------------------------------------------------------
# Shards


def iter_tiles(root: str | Path) -> Iterator[Tile]:
    """Every sample of a shard dataset, in ``index.json`` order, decoded under the tile schema."""
    from gfm import index as index_contract
    from gfm.data.decode import decode_sample
    from gfm.data.sources import absent_shards
    from gfm.shards.verify import iter_samples

    root = Path(root)
    shards = [root / s.name for s in index_contract.read(root).shards] if root.is_dir() else [root]
    absent = absent_shards(shards, root / index_contract.INDEX_FILE)
    if absent:
        raise HubError(absent)
    for shard in shards:
        for sample in iter_samples(shard):
            yield decode_sample(sample)


def embed_shards(model: GFMModel, root: str | Path, out: str | Path, opts: EmbedOptions | None = None) -> EmbedReport:
    """One GeoParquet row per sample of the shard dataset at ``root`` (a directory with index.json, or a .tar)."""
    from gfm.data.transforms import Geometry, valid_masks

    opts = opts or EmbedOptions()
    out = Path(out)
    check_files({"out": out}, [root])
    _check(out, opts.overwrite)
    start = time.perf_counter()
    dim = model.embed_dim
    total = None
    if Path(root).is_dir():
        from gfm import index as index_contract

        total = index_contract.read(root).samples
    bar = _bar(total, f"embed {Path(root).name}", opts.progress)
    specs: dict[str, InputBands] = {}
    pending: dict[str, list[Tile]] = defaultdict(list)
    skipped = 0
    dropped: set[str] = set()

    def flush(writer: EmbeddingWriter, sig: str) -> None:
        tiles = pending.pop(sig, [])
        if not tiles:
            return
        spec = specs[sig]
        shapes = {t.pixels.shape for t in tiles}
        for shape in shapes:  # a band set may come in several tile sizes
            group = [t for t in tiles if t.pixels.shape == shape]
            px = np.stack([t.pixels for t in group])
            geoms = [Geometry(0, 0, shape[1], shape[2], False, False, 0)] * len(group)
            valid = valid_masks(group, geoms, px)
            lonlat = np.array([t.meta.get("lonlat") or [np.nan, np.nan] for t in group], dtype=np.float32)
            gsd = float(group[0].meta["gsd_m"])
            batch = spec.batch(px, valid, gsd=gsd, lonlat=lonlat, keys=[t.key for t in group])
            emb, _ = _embed(model, batch, opts)
            writer.write([
                TileRow(key=t.key, scene=str((t.meta.get("source") or {}).get("scene", "")), crs=t.meta.get("crs"),
                        bounds=t.meta.get("bounds"), dates=[b["time"] for b in t.meta["bands"] if b["time"]],
                        sensors=[b["sensor"] for b in t.meta["bands"]], bands=spec.keys, gsd_m=gsd,
                        valid_fraction=float(valid[i][spec.keep].mean()), embedding=emb[i].numpy())
                for i, t in enumerate(group)
            ])
            if bar is not None:
                bar.update(len(group))

    with EmbeddingWriter(out, dim, _metadata(model, opts, str(root), dim)) as writer:
        for tile in iter_tiles(root):
            sig = bandset_signature(tile.meta["bands"])
            if sig not in specs:
                spec = input_bands(tile.meta["bands"], model.config, opts.stats, opts.unknown,  # type: ignore[arg-type]
                                   where=f"{root}: ")
                specs[sig] = spec
                dropped.update(spec.dropped)
            pending[sig].append(tile)
            if len(pending[sig]) >= opts.batch_size:
                flush(writer, sig)
        for sig in list(pending):
            flush(writer, sig)
        if bar is not None:
            bar.close()
        writer.commit()
    return EmbedReport(out, writer.rows, dim, opts.pooling, skipped, time.perf_counter() - start,
                       dropped_bands=sorted(dropped))


# ------------------------------------------------------------------------------------------------
# Scenes


def scene_tiles(height: int, width: int, tile: int) -> list[tuple[int, int]]:
    """Origins of non-overlapping ``tile × tile`` tiles anchored at (0, 0), the last ones reaching past the edge."""
    return [(r, c) for r in range(0, height, tile) for c in range(0, width, tile)]


def embed_scene(
    model: GFMModel,
    scene: Scene,
    out: str | Path,
    opts: EmbedOptions | None = None,
    on_tiles: Callable[[int], None] | None = None,
) -> EmbedReport:
    """One GeoParquet row per tile of ``scene`` with a valid pixel (and the dense COG when asked)."""
    opts = opts or EmbedOptions()
    out = Path(out)
    dense_path = Path(opts.dense) if opts.dense else None
    check_files({"out": out, "dense": dense_path}, scene_paths(scene.spec))
    _check(out, opts.overwrite)
    _check(dense_path, opts.overwrite)
    start = time.perf_counter()
    dim, patch = model.embed_dim, model.patch_size
    tile = opts.tile or int((model.config.get("inputs") or {}).get("tile_size_trained") or 64)
    if dense_path is not None and tile % patch:
        tile = -(-tile // patch) * patch  # whole patches per tile keep the patch grid aligned across tiles
    spec = input_bands(observation_bands(scene), model.config, opts.stats, opts.unknown,  # type: ignore[arg-type]
                       where=f"scene {scene.spec.id}: ")
    g = scene.grid
    const = scene.tile_constants
    origins = scene_tiles(g.height, g.width, tile)
    bar = _bar(len(origins), f"embed {scene.spec.id}", opts.progress)
    skipped = 0
    dense: CogWriter | None = None
    with gdal_env():
        writer = EmbeddingWriter(out, dim, _metadata(model, opts, scene.spec.id, dim) | {"tile": tile})
        try:
            if dense_path is not None:
                dh, dw = -(-g.height // patch), -(-g.width // patch)
                dense = CogWriter(
                    dense_path, width=dw, height=dh, count=dim, dtype="float32", nodata=float("nan"), crs=g.crs,
                    transform=g.transform @ Affine.scale(patch), descriptions=[f"emb_{i}" for i in range(dim)],
                    tags={"POOLING": "per-position summary token", "PATCH_SIZE": str(patch)},
                    overview_resampling="average",
                )
            for i in range(0, len(origins), opts.batch_size):
                chunk = origins[i: i + opts.batch_size]
                reads = [read_window(scene, r, c, tile, tile) for r, c in chunk]
                keep = [j for j, (_, v) in enumerate(reads) if v[spec.keep].any()]
                skipped += len(chunk) - len(keep)
                if bar is not None:
                    bar.update(len(chunk))
                if on_tiles is not None:
                    on_tiles(len(chunk))
                if not keep:
                    continue
                chunk = [chunk[j] for j in keep]
                px = np.stack([reads[j][0] for j in keep])
                valid = np.stack([reads[j][1] for j in keep])
                lonlat = tile_lonlat(scene, chunk, tile, tile)
                keys = [f"{scene.spec.id}_{r}_{c}" for r, c in chunk]
                batch = spec.batch(px, valid, gsd=const.gsd_m, lonlat=lonlat, keys=keys)
                emb, per_pos = _embed(model, batch, opts)
                rows = []
                for j, (r, c) in enumerate(chunk):
                    t = g.window_transform(r, c)
                    right, bottom = t @ (tile, tile)
                    bounds = [min(t.c, right), min(t.f, bottom), max(t.c, right), max(t.f, bottom)]
                    rows.append(TileRow(
                        key=keys[j], scene=scene.spec.id, crs=const.crs, bounds=bounds if g.crs else None,
                        dates=[d for _, d in scene.observations if d], sensors=[t_["sensor"] for t_ in spec.table],
                        bands=spec.keys, gsd_m=const.gsd_m, valid_fraction=float(valid[j][spec.keep].mean()),
                        embedding=emb[j].numpy(),
                    ))
                    if dense is not None:
                        _write_dense(dense, per_pos[j], batch.valid[j], r, c, tile, patch, g.height, g.width)
                writer.write(rows)
            writer.commit()
            if dense is not None:
                dense.commit()
        except BaseException:
            writer.abort()
            if dense is not None:
                dense.abort()
            raise
        finally:
            if bar is not None:
                bar.close()
    return EmbedReport(out, writer.rows, dim, opts.pooling, skipped, time.perf_counter() - start, dense_path,
                       dropped_bands=spec.dropped)


def _write_dense(
    dense: CogWriter, tokens: torch.Tensor, valid: torch.Tensor, row: int, col: int, tile: int, patch: int,
    height: int, width: int,
) -> None:
    """Per-position tokens ``[N, D]`` of one tile → its ``[D, t/p, t/p]`` block (NaN where no pixel is valid)."""
    from gfm.hub import position_validity

    n = tile // patch
    grid = rearrange(tokens, "(h w) d -> d h w", h=n, w=n).clone()
    ok = position_validity(valid[None], patch)[0].reshape(n, n)
    grid[:, ~ok] = float("nan")
    r0, c0 = row // patch, col // patch
    h = min(n, -(-height // patch) - r0)
    w = min(n, -(-width // patch) - c0)
    dense.write(grid[:, :h, :w].numpy().astype(np.float32), r0, c0)

