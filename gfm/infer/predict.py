"""Whole-scene inference: read window by window, predict tiles with overlap, blend, write a COG block by block.

:func:`predict_scene` covers the scene grid with a fixed grid of overlapping tiles (:mod:`gfm.infer.tiling`)
and walks the output in blocks. For each block it reads the tiles that intersect it (aligned reads of
the scene, :func:`gfm.infer.scenes.read_window`), normalises them with the model's statistics, runs the
predictor in batches, accumulates class probabilities weighted by a raised-cosine window, divides by
the summed weights and writes the block's classes (and optionally its probabilities) into a tiled,
compressed GeoTIFF that becomes a Cloud-Optimized GeoTIFF at the end (:mod:`gfm.infer.cog`). Memory is
one block's accumulators plus one batch of tiles: flat in the scene's size. Tiles that straddle two
blocks are predicted for each (the price of flat memory; a few per cent with the default sizes).

A pixel where every observation is invalid (nodata, NaN, masked by a quality layer, outside the source
rasters) is nodata in the output. The output file is written under a temporary name and renamed at the
end, so an interrupted run never leaves a file that looks complete (a killed run's temporaries are removed
by the next run of the same output). The class map and the probabilities must be two paths, neither of
them a file of the scene (:func:`gfm.outputs.check_files`).

:func:`predict_array` runs the same blocks into arrays held in memory instead (the class map identical
pixel for pixel, the probabilities unquantised); :func:`gfm.infer.api.predict` (``gfm.predict``) opens the
model and the scene (files or an array) and calls one or the other.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gfm.finetune.pictures import class_colors
from gfm.hub import HubError, InputBands, OutputExistsError
from gfm.infer.cog import BLOCK, CogWriter, gdal_env
from gfm.infer.predictors import Predictor, check_band_set, class_table, classes_or_default
from gfm.infer.scenes import read_window, scene_paths, tile_lonlat
from gfm.infer.tiling import Layout, blend_weights
from gfm.outputs import check_files
from gfm.shards.scene import Scene

#: probabilities are stored as round(p × PROB_SCALE) in uint8, 255 = nodata
PROB_SCALE = 254


@dataclass
class PredictOptions:
    """How to cut, batch and write.

    Attributes:
        tile: tile side in pixels (a pixel-task model reads ``tile + 2·halo`` per tile: the predictor's
            halo is ``window // 2`` window by window, ``smooth // 2`` for a per-pixel dense head).
        overlap: pixels shared by neighbouring tiles (blended); ``None``: a quarter of the tile for
            segmentation, 0 for pixel-task models (their prediction per pixel does not depend on the tile).
        batch_size: tiles per forward.
        block: output block side in pixels (rounded up to a multiple of the file's 256-pixel tiles).
        probabilities: also write class probabilities (uint8, ``p × 254``, 255 = nodata) to this path.
        region: predict only this window of the scene grid, ``(row, col, height, width)`` in pixels; the
            output covers the window (its transform is the window's), the model still sees context
            outside it where tiles or pixel windows reach.
        overwrite: replace existing outputs.
        progress: show a tqdm bar.
        device: where the model runs.
    """

    tile: int = 64
    overlap: int | None = None
    batch_size: int = 8
    block: int = 512
    probabilities: str | Path | None = None
    region: tuple[int, int, int, int] | None = None
    overwrite: bool = False
    progress: bool = True
    device: str = "cpu"


@dataclass
class PredictReport:
    """What :func:`predict_scene` (or :func:`predict_array`) did.

    ``out`` and ``probabilities`` are the files written (None from :func:`predict_array`); ``width``,
    ``height`` the output's size; ``counts`` the pixels per class name (classes with none left out).
    """

    out: Path | None
    probabilities: Path | None
    width: int
    height: int
    tiles: int
    forwards: int
    blocks: int
    seconds: float
    classes: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


@dataclass
class Prediction:
    """A prediction: arrays held in memory (:func:`predict_array`), or the report of the files written.

    Attributes:
        classes: ``[H, W]`` class indices, ``uint8`` with 255 = nodata (``uint16``/65535 beyond 254
            classes), as in the class map COG; None when the map was written to a file.
        probabilities: ``[K, H, W]`` float32 class probabilities (blended, unquantised; NaN where
            ``classes`` is nodata), when asked for and not written to a file; else None.
        report: what was done (``report.classes`` names the class indices; ``report.out`` the file written).
    """

    classes: np.ndarray | None
    probabilities: np.ndarray | None
    report: PredictReport


def _check_output(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise OutputExistsError(path)


@dataclass
class _Plan:
    """What one prediction covers and how its classes are stored (shared by the COG and the array paths)."""

    region: tuple[int, int, int, int]  # (row, col, height, width) of the scene grid
    overlap: int
    layout: Layout
    names: list[str]
    dtype: str
    nodata: int

    @property
    def k(self) -> int:
        return len(self.names)

    def classes(self, prob: torch.Tensor, seen: np.ndarray) -> np.ndarray:
        """``[h, w]`` class indices of a block's probabilities ``[K, h, w]``, nodata where nothing was seen."""
        classes = prob.argmax(dim=0).numpy().astype(self.dtype)
        classes[~seen] = self.nodata
        return classes


def _plan(scene: Scene, predictor: Predictor, bands: InputBands, opts: PredictOptions) -> _Plan:
    """Check the band set and the region; lay out tiles and blocks (nothing is read yet)."""
    info = predictor.info
    check_band_set(info, bands, where=f"scene {scene.spec.id}: ")
    k = info.num_classes
    overlap = opts.overlap if opts.overlap is not None else (opts.tile // 4 if info.task == "segmentation" else 0)
    block = -(-max(opts.block, BLOCK) // BLOCK) * BLOCK
    g = scene.grid
    r0, c0, height, width = opts.region or (0, 0, g.height, g.width)
    if not (0 <= r0 and 0 <= c0 and height >= 1 and width >= 1 and r0 + height <= g.height
            and c0 + width <= g.width):
        raise HubError(f"region {opts.region}: (row, col, height, width) must lie inside the scene grid "
                       f"{g.height} x {g.width}")
    dtype, nodata = ("uint8", 255) if k < 255 else ("uint16", 65535)
    return _Plan((r0, c0, height, width), overlap, Layout.make(height, width, opts.tile, overlap, block),
                 list(classes_or_default(info, k)), dtype, nodata)


class _Progress:
    """Counts forwards; feeds a tqdm bar (``opts.progress``) and the caller's ``on_tiles``."""

    def __init__(self, scene: Scene, plan: _Plan, opts: PredictOptions, on_tiles: Callable[[int], None] | None):
        self.forwards = 0
        self.on_tiles = on_tiles
        self.bar = None
        if opts.progress:
            from tqdm import tqdm

            total = sum(len(plan.layout.tiles_in(*b)) for b in plan.layout.blocks())
            self.bar = tqdm(total=total, desc=f"predict {scene.spec.id}", unit="tile", dynamic_ncols=True)

    def __call__(self, n: int) -> None:
        self.forwards += n
        if self.bar is not None:
            self.bar.update(n)
        if self.on_tiles is not None:
            self.on_tiles(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _blend(
    scene: Scene, predictor: Predictor, bands: InputBands, plan: _Plan, opts: PredictOptions, step: _Progress
) -> Iterator[tuple[int, int, torch.Tensor, np.ndarray]]:
    """Per output block, in layout order: ``(row, col, probabilities [K, h, w], seen [h, w] bool)``.

    ``row, col`` are in region coordinates. The probabilities are the tiles' blended by their weights;
    ``seen`` marks pixels where some tile had a valid observation (the others become nodata).
    """
    layout, halo = plan.layout, predictor.halo
    r0, c0, _, _ = plan.region
    weights = torch.from_numpy(blend_weights(layout.tile_h, layout.tile_w, plan.overlap))
    gsd = scene.grid.gsd_m()  # as gfm shards build records it in every tile
    for r, c, h, w in layout.blocks():
        acc = torch.zeros(plan.k, h, w)
        wsum = torch.zeros(h, w)
        seen = torch.zeros(h, w, dtype=torch.bool)
        origins = layout.tiles_in(r, c, h, w)
        for i in range(0, len(origins), opts.batch_size):
            chunk = origins[i: i + opts.batch_size]
            reads = [read_window(scene, r0 + tr - halo, c0 + tc - halo, layout.tile_h + 2 * halo,
                                 layout.tile_w + 2 * halo) for tr, tc in chunk]
            pixels = np.stack([p for p, _ in reads])
            valid = np.stack([v for _, v in reads])
            lonlat = tile_lonlat(scene, [(r0 + tr, c0 + tc) for tr, tc in chunk], layout.tile_h, layout.tile_w)
            batch = bands.batch(pixels, valid, gsd=gsd, lonlat=lonlat,
                                keys=[f"{scene.spec.id}_{r0 + tr}_{c0 + tc}" for tr, tc in chunk])
            probs = predictor(batch.to(opts.device)).float().cpu()  # [b, K, th, tw]
            inner = batch.valid[..., halo: halo + layout.tile_h, halo: halo + layout.tile_w].any(dim=1)
            for j, (tr, tc) in enumerate(chunk):
                # the part of tile j inside this block, in block and in tile coordinates
                y0, y1 = max(tr, r), min(tr + layout.tile_h, r + h)
                x0, x1 = max(tc, c), min(tc + layout.tile_w, c + w)
                tb = (slice(y0 - tr, y1 - tr), slice(x0 - tc, x1 - tc))
                bb = (slice(y0 - r, y1 - r), slice(x0 - c, x1 - c))
                acc[(slice(None), *bb)] += probs[j][(slice(None), *tb)] * weights[tb]
                wsum[bb] += weights[tb]
                seen[bb] |= inner[j][tb]
            step(len(chunk))
        yield r, c, acc / wsum.clamp_min(1e-12), seen.numpy()


def _report(plan: _Plan, out: Path | None, prob_path: Path | None, counts: np.ndarray, step: _Progress,
            blocks: int, start: float) -> PredictReport:
    _, _, height, width = plan.region
    return PredictReport(
        out=out, probabilities=prob_path, width=width, height=height, tiles=plan.layout.tiles,
        forwards=step.forwards, blocks=blocks, seconds=time.perf_counter() - start, classes=plan.names,
        counts={plan.names[i]: int(n) for i, n in enumerate(counts) if n},
    )


def predict_scene(
    scene: Scene,
    predictor: Predictor,
    bands: InputBands,
    out: str | Path,
    options: PredictOptions | None = None,
    on_tiles: Callable[[int], None] | None = None,
) -> PredictReport:
    """Predict every pixel of ``scene`` and write a class map COG (and optionally probabilities).

    Args:
        scene: an opened scene (:func:`gfm.shards.scene.open_scene`).
        predictor: :class:`~gfm.infer.predictors.SegmentationPredictor`,
            :class:`~gfm.infer.predictors.DensePixelPredictor` or :class:`~gfm.infer.predictors.PixelPredictor`
            (:func:`~gfm.infer.predictors.make_predictor` picks one).
        bands: the scene's observations matched to the model's statistics (:func:`gfm.hub.input_bands`); a
            dense head needs the band count it was trained on
            (:class:`~gfm.infer.predictors.BandSetError` otherwise, before anything is written).
        out: the class map to write (``uint8``, 255 = nodata; ``uint16``/65535 beyond 255 classes).
        options: see :class:`PredictOptions`.
        on_tiles: called with the number of tiles predicted after each batch (progress hooks, tests).
    """
    opts = options or PredictOptions()
    out = Path(out)
    prob_path = Path(opts.probabilities) if opts.probabilities else None
    check_files({"out": out, "probabilities": prob_path}, scene_paths(scene.spec))
    _check_output(out, opts.overwrite)
    if prob_path is not None:
        _check_output(prob_path, opts.overwrite)
    plan = _plan(scene, predictor, bands, opts)
    info, k = predictor.info, plan.k
    colors = info.colors if info.colors and len(info.colors) == k else class_colors(k)
    g = scene.grid
    r0, c0, height, width = plan.region
    common: dict[str, Any] = dict(width=width, height=height, crs=g.crs, transform=g.window_transform(r0, c0))
    step = _Progress(scene, plan, opts, on_tiles)
    start = time.perf_counter()
    counts = np.zeros(k, dtype=np.int64)
    blocks = 0
    with gdal_env():
        writer = CogWriter(out, count=1, dtype=plan.dtype, nodata=plan.nodata, descriptions=["class"],
                           colormap={i: (*colors[i], 255) for i in range(min(k, 256))},
                           tags={**class_table(info), "MODEL": info.source}, **common)
        prob_writer = None
        try:
            if prob_path is not None:
                prob_writer = CogWriter(prob_path, count=k, dtype="uint8", nodata=255, descriptions=plan.names,
                                        tags=class_table(info), scales=[1.0 / PROB_SCALE] * k,
                                        overview_resampling="average", **common)
            for r, c, prob, seen in _blend(scene, predictor, bands, plan, opts, step):
                classes = plan.classes(prob, seen)
                writer.write(classes[None], r, c)
                counts += np.bincount(classes[seen].astype(np.int64), minlength=k)[:k]
                if prob_writer is not None:
                    q = torch.round(prob * PROB_SCALE).clamp(0, PROB_SCALE).to(torch.uint8).numpy()
                    q[:, ~seen] = 255
                    prob_writer.write(q, r, c)
                blocks += 1
            writer.commit()
            if prob_writer is not None:
                prob_writer.commit()
        except BaseException:
            writer.abort()
            if prob_writer is not None:
                prob_writer.abort()
            raise
        finally:
            step.close()
    return _report(plan, out, prob_path, counts, step, blocks, start)


def predict_array(
    scene: Scene,
    predictor: Predictor,
    bands: InputBands,
    options: PredictOptions | None = None,
    *,
    probabilities: bool = False,
    on_tiles: Callable[[int], None] | None = None,
) -> Prediction:
    """Predict every pixel of ``scene`` (or ``options.region``) into arrays held in memory.

    The same tiles, blending and classes as :func:`predict_scene` (pixel for pixel the class map it
    writes), but the whole result is held in memory: ``H·W`` bytes for the classes, plus ``K·H·W·4``
    for the probabilities when asked. The output fields of ``options`` (``probabilities``,
    ``overwrite``) do not apply.

    Args:
        scene: an opened scene (:func:`gfm.shards.scene.open_scene`, or one built from an array).
        predictor: as for :func:`predict_scene`.
        bands: as for :func:`predict_scene` (a dense head's band count is checked the same way).
        options: see :class:`PredictOptions`.
        probabilities: also return the blended class probabilities (float32, unquantised).
        on_tiles: called with the number of tiles predicted after each batch.
    """
    opts = options or PredictOptions()
    plan = _plan(scene, predictor, bands, opts)
    _, _, height, width = plan.region
    classes = np.full((height, width), plan.nodata, dtype=plan.dtype)
    probs = np.full((plan.k, height, width), np.nan, dtype=np.float32) if probabilities else None
    counts = np.zeros(plan.k, dtype=np.int64)
    blocks = 0
    step = _Progress(scene, plan, opts, on_tiles)
    start = time.perf_counter()
    try:
        for r, c, prob, seen in _blend(scene, predictor, bands, plan, opts, step):
            block = plan.classes(prob, seen)
            h, w = block.shape
            classes[r: r + h, c: c + w] = block
            counts += np.bincount(block[seen].astype(np.int64), minlength=plan.k)[: plan.k]
            if probs is not None:
                p = prob.numpy()
                p[:, ~seen] = np.nan
                probs[:, r: r + h, c: c + w] = p
            blocks += 1
    finally:
        step.close()
    return Prediction(classes, probs, _report(plan, None, None, counts, step, blocks, start))
