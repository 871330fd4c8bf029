"""Labelled task data from shards: scene classification, multi-label, segmentation, per-pixel windows.

A fine-tuning set is small next to a pretraining corpus, so the tiles are read once, normalised
exactly as the pretraining loader does (``gfm.data``'s ``collate`` with the shards' ``index.json``
statistics) and held in memory; batches are cut from there.

Every sample is a window of a scene, which is what the splits (:mod:`gfm.finetune.splits`) need:

=================  =========================================================================
task               sample, target
=================  =========================================================================
``scene``          a tile; ``label.cls`` (one class)
``multilabel``     a tile; meta.json ``labels`` (list of label values) when present, else every
                   class covering at least ``labels.min_fraction`` of the tile's ``label.npy``
``segmentation``   a tile; ``label.npy`` ([H, W], ignore values → not scored)
``pixel``          a ``window × window`` cut of the scene mosaic centred on each labelled pixel;
                   the pixel's class
=================  =========================================================================

Where a tile sits in its scene comes from meta.json ``source`` (``scene`` and ``window`` = [row, col,
height, width], as ``gfm shards build`` writes it), else from its ``transform`` relative to the other
tiles of the same CRS. For the pixel task the tiles of a scene are put back together into one
mosaic (overlapping tiles agree), so a window may straddle tile borders and every labelled pixel a
tile covers gets a centred window; pixels near the scene edge get windows padded with invalid pixels.
The mosaic is held in memory (``data.max_mosaic_mb`` guards it): this task is for scenes of up to a
few thousand pixels a side, the usual size of labelled hyperspectral scenes.

Label values: ``labels.ignore`` and meta.json ``label_ignore`` mark unlabelled pixels; the remaining
values are the classes (``labels.values`` fixes them and their order; otherwise every value found,
sorted). Class names come from ``labels.names``, else the shards' metadata (``classes`` in index.json
or meta.json: a list indexed by label value, or a mapping from label value to name), else
``class_<value>``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

import numpy as np
import torch

from gfm.batch import Batch
from gfm.config import ConfigError
from gfm.finetune.splits import Windows
from gfm.index import stats_key
from gfm.schema import Tile

TASKS = ("scene", "multilabel", "segmentation", "pixel")
IGNORE = -1  # class index of unlabelled / ignored pixels in targets


class TaskDataError(ValueError):
    """Shards that cannot serve the chosen task; the message names the shards, tile or value."""


@dataclass
class LabelConfig:
    """What the label values mean.

    Attributes:
        ignore: label values that are not a class (besides each tile's meta.json ``label_ignore``).
        values: the label values that are classes, in class order; empty = every value found, sorted.
        names: class names in class order; empty = from the shards' metadata, else ``class_<value>``.
        num_classes: the number of classes you expect (0 = whatever the labels hold); a different count
            in the labels is an error.
        min_fraction: multi-label from a label map: a class counts when it covers at least this share
            of the tile's labelled pixels.
    """

    ignore: list[int] = field(default_factory=list)
    values: list[int] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    num_classes: int = 0
    min_fraction: float = 0.01

    def validate(self) -> None:
        """Check values; raises :class:`ConfigError` naming the field."""
        if self.num_classes < 0:
            raise ConfigError(f"num_classes: must be >= 0, got {self.num_classes}")
        if len(set(self.values)) != len(self.values):
            raise ConfigError(f"values: repeated label values in {self.values}")
        if set(self.values) & set(self.ignore):
            raise ConfigError(f"values: {sorted(set(self.values) & set(self.ignore))} are also in labels.ignore")
        if self.names and self.values and len(self.names) != len(self.values):
            raise ConfigError(f"names: {len(self.names)} names for {len(self.values)} label values")
        if not 0 <= self.min_fraction <= 1:
            raise ConfigError(f"min_fraction: must be in [0, 1], got {self.min_fraction}")


@dataclass
class TaskDataConfig:
    """The labelled data of a fine-tuning run.

    Attributes:
        shards: dataset directory (with ``index.json``), brace pattern, list file or URL.
        index: ``index.json`` location when not beside the shards.
        task: ``scene``, ``multilabel``, ``segmentation`` or ``pixel``.
        window: pixel task: side of the window centred on each labelled pixel (odd, so flips keep the
            pixel at the centre).
        batch_size: training samples per rank per micro-step.
        eval_batch_size: samples per forward pass when evaluating.
        hflip, vflip, rot90: random flips and quarter turns of training samples.
        max_mosaic_mb: pixel task: the largest scene mosaic held in memory (float32 pixels).
        labels: what the label values mean (:class:`LabelConfig`).
    """

    shards: str = ""
    index: str | None = None
    task: Literal["scene", "multilabel", "segmentation", "pixel"] = "scene"
    window: int = 9
    batch_size: int = 32
    eval_batch_size: int = 128
    hflip: bool = True
    vflip: bool = True
    rot90: bool = True
    max_mosaic_mb: float = 2048.0
    labels: LabelConfig = field(default_factory=LabelConfig)

    def validate(self) -> None:
        """Check values; raises :class:`ConfigError` naming the field."""
        if not self.shards:
            raise ConfigError("shards: empty; give the labelled dataset's directory (with index.json)")
        if self.task == "pixel" and (self.window < 1 or self.window % 2 == 0):
            raise ConfigError(f"window: the pixel task needs an odd window >= 1, got {self.window}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ConfigError(f"batch_size: must be >= 1, got {self.batch_size} / {self.eval_batch_size}")

    def build(self) -> TaskData:
        """Read the shards and prepare the task's samples (see :func:`load_task_data`)."""
        return load_task_data(self)


# ------------------------------------------------------------------------------------------------
# Reading


def read_tiles(shards: str, index: str | None = None) -> tuple[list[Tile], Any]:
    """Every tile of a dataset (validated, never unpickled) and its parsed ``index.json``."""
    import webdataset as wds

    from gfm.data.decode import decode_sample
    from gfm.data.sources import absent_shards, resolve_shards

    found = resolve_shards(shards, index)
    absent = absent_shards(found.urls, found.index.url)
    if absent:
        raise TaskDataError(absent)
    tiles = []
    for url in found.urls:
        # every rank reads every tile (the task set is small; ranks split the samples, not the shards)
        reader = wds.WebDataset(url, shardshuffle=False, empty_check=False, nodesplitter=_every_shard,
                                workersplitter=_every_shard)
        for sample in reader:
            tiles.append(decode_sample(sample))
    if not tiles:
        raise TaskDataError(f"{shards}: the shards hold no samples")
    return tiles, found.index


def _every_shard(urls: Iterator[Any]) -> Iterator[Any]:
    yield from urls


def _normalised(tiles: Sequence[Tile], index: Any) -> list[Batch]:
    """Each tile as a one-sample :class:`Batch`, normalised and masked as the pretraining loader does."""
    from gfm.data.transforms import BandTable, Geometry, check_tile, collate

    tables: dict[str, BandTable] = {}
    out = []
    for t in tiles:
        sig = "|".join(f"{b['sensor']}/{b['name']}" for b in t.meta["bands"])
        if sig not in tables:
            tables[sig] = BandTable.from_bands(t.meta["bands"], index)
        check_tile(t, None)
        _, h, w = t.pixels.shape
        label, t.label = t.label, None  # targets are built here, not by collate
        b = collate([t], [Geometry(0, 0, h, w, False, False, 0)], tables[sig])
        t.label = label
        out.append(b)
    return out


def normalization_table(tiles: Sequence[Tile], index: Any) -> dict[str, dict[str, Any]]:
    """``"sensor/band"`` → physical description and the ``stats`` (mean, std) the task's tiles are normalised with.

    What a fine-tuning run records in ``finetune.json`` (``bands``), so an export of it normalises new
    scenes as the fine-tuning did (``gfm.hub.config.with_task_bands``), whatever statistics the base
    model was pretrained with.
    """
    table: dict[str, dict[str, Any]] = {}
    for t in tiles:
        for b in t.meta["bands"]:
            key = stats_key(b["sensor"], b["name"])
            if key not in table:
                mean, std = index.norm(b["sensor"], b["name"])
                table[key] = {"name": b["name"], "sensor": b["sensor"], "center_nm": b.get("center_nm"),
                              "fwhm_nm": b.get("fwhm_nm"), "kind": b.get("kind"),
                              "stats": {"mean": mean, "std": std}}
    return dict(sorted(table.items()))


def _placement(tiles: Sequence[Tile]) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Scene id per tile and each tile's top-left (row, col) in its scene's pixel grid."""
    scene_ids, rows, cols = [], [], []
    by_crs: dict[str, list[int]] = {}
    for i, t in enumerate(tiles):
        src = t.meta.get("source") or {}
        win = src.get("window")
        if isinstance(win, list) and len(win) == 4 and src.get("scene") is not None:
            scene_ids.append(str(src["scene"]))
            rows.append(int(win[0]))
            cols.append(int(win[1]))
        else:
            scene_ids.append("")
            rows.append(0)
            cols.append(0)
            by_crs.setdefault(str(t.meta.get("crs")), []).append(i)
    for crs, members in by_crs.items():  # no source window: place by the affine transform
        a = np.array([tiles[i].meta["transform"] for i in members], dtype=np.float64)
        px_w, px_h = abs(a[0, 0]), abs(a[0, 4])
        left, top = a[:, 2].min(), a[:, 5].max()
        for i, coeffs in zip(members, a):
            scene_ids[i] = f"crs:{crs}"
            rows[i] = int(round((top - coeffs[5]) / px_h))
            cols[i] = int(round((coeffs[2] - left) / px_w))
    return scene_ids, np.array(rows, dtype=np.int64), np.array(cols, dtype=np.int64)


def _metadata_names(index_raw: dict[str, Any], tiles: Sequence[Tile]) -> dict[int, str]:
    """Label value → class name from index.json / meta.json ``classes`` (list or mapping), if any."""
    for source in [index_raw, *(t.meta for t in tiles[:1])]:
        classes = source.get("classes") if isinstance(source, dict) else None
        if isinstance(classes, list):
            out: dict[int, str] = {}
            for i, entry in enumerate(classes):
                if isinstance(entry, dict):  # [{"value": 3, "name": "corn"}, ...]
                    out[int(entry.get("value", i))] = str(entry.get("name", f"class_{i}"))
                else:
                    out[i] = str(entry)
            return out
        if isinstance(classes, dict):
            return {int(k): str(v) for k, v in classes.items()}
    return {}


# ------------------------------------------------------------------------------------------------
# The task data


@dataclass
class TaskData:
    """A task's samples in memory, ready to be batched.

    Attributes:
        task: the task name.
        class_names: ``K`` class names (class index order).
        label_values: the label value of each class.
        windows: every sample as a window of its scene (for splits and maps).
        targets: per sample: class ``[S]`` (scene/pixel), multi-hot ``[S, K]`` (multilabel), or the
            index of the sample's label map in ``label_maps`` (segmentation).
        scenes: scene ids (``windows.scene`` indexes them).
        scene_hw: each scene's extent (rows, cols) as covered by its tiles.
        source: where the data came from (shards spec).
        window: the pixel task's window side (0 for tile tasks).
        bands: ``"sensor/band"`` → description and the statistics the tiles were normalised with
            (:func:`normalization_table`).
    """

    task: str
    class_names: list[str]
    label_values: list[int]
    windows: Windows
    targets: np.ndarray
    scenes: list[str]
    scene_hw: list[tuple[int, int]]
    source: str
    window: int = 0
    bands: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    label_maps: list[torch.Tensor] = field(default_factory=list, repr=False)
    tiles: list[Batch] = field(default_factory=list, repr=False)
    tile_of_sample: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64), repr=False)
    mosaics: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list, repr=False)
    label_mosaics: list[np.ndarray] = field(default_factory=list, repr=False)

    @property
    def num_classes(self) -> int:
        """``K``."""
        return len(self.class_names)

    @property
    def num_bands(self) -> int:
        """``C``, the bands (observations) of every sample."""
        return int(self.tiles[0].pixels.shape[1]) if self.tiles else 0

    @property
    def multilabel(self) -> bool:
        """Whether targets are multi-hot."""
        return self.task == "multilabel"

    def __len__(self) -> int:
        return len(self.windows)

    def sample(self, i: int) -> Batch:
        """Sample ``i`` as a one-sample :class:`Batch` with its target in ``label``."""
        tile = self.tiles[int(self.tile_of_sample[i])]
        if self.task == "pixel":
            scene = int(self.windows.scene[i])
            pixels, valid = self.mosaics[scene]
            pad = self.window // 2
            r, c = int(self.windows.top[i]) + pad, int(self.windows.left[i]) + pad  # padded mosaic coordinates
            win = slice(r, r + self.window), slice(c, c + self.window)
            label = torch.tensor([int(self.targets[i])])
            return replace(tile, pixels=pixels[None, :, win[0], win[1]], valid=valid[None, :, win[0], win[1]],
                           label=label, keys=[self.windows.ids[i]])
        if self.task == "segmentation":
            label = self.label_maps[int(self.targets[i])][None]
        elif self.task == "multilabel":
            label = torch.from_numpy(self.targets[i][None].astype(np.float32))
        else:
            label = torch.tensor([int(self.targets[i])])
        return replace(tile, label=label)

    def batch(
        self,
        indices: Sequence[int] | np.ndarray,
        rng: np.random.Generator | None = None,
        augment: tuple[bool, bool, bool] = (False, False, False),
    ) -> Batch:
        """Samples ``indices`` stacked into one :class:`Batch`; with ``rng``, flips/turns as ``augment`` allows."""
        samples = [self.sample(int(i)) for i in indices]
        if rng is not None and any(augment):
            samples = [_augment(s, rng, *augment) for s in samples]
        return stack(samples)


def _augment(b: Batch, rng: np.random.Generator, hflip: bool, vflip: bool, rot90: bool) -> Batch:
    u = rng.random(3)  # fixed draw count: the stream does not depend on the settings' effects
    k = int(u[2] * 4) if rot90 and b.pixels.shape[-1] == b.pixels.shape[-2] else 0
    dims: list[int] = []
    if hflip and u[0] < 0.5:
        dims.append(-1)
    if vflip and u[1] < 0.5:
        dims.append(-2)
    if not dims and not k:
        return b
    hw = tuple(b.pixels.shape[-2:])
    moved: dict[str, Any] = {}
    for f in fields(b):
        v = getattr(b, f.name)
        if isinstance(v, torch.Tensor) and v.ndim >= 3 and tuple(v.shape[-2:]) == hw:  # spatial fields
            if dims:
                v = torch.flip(v, dims)
            if k:
                v = torch.rot90(v, k, dims=(-2, -1))
            moved[f.name] = v.contiguous()
    return replace(b, **moved)


def stack(samples: Sequence[Batch]) -> Batch:
    """One :class:`Batch` from batches of equal shapes (every tensor field concatenated on dim 0)."""
    first = samples[0]
    out: dict[str, Any] = {}
    for f in fields(first):
        v = getattr(first, f.name)
        if isinstance(v, torch.Tensor):
            out[f.name] = torch.cat([getattr(s, f.name) for s in samples])
        elif f.name == "keys":
            out[f.name] = [k for s in samples for k in s.keys]
    return replace(first, **out)


def _class_table(
    cfg: TaskDataConfig, found: set[int], names_meta: dict[int, str], shards: str
) -> tuple[list[int], list[str]]:
    lab = cfg.labels
    values = list(lab.values) if lab.values else sorted(found)
    extra = sorted(found - set(values))
    if extra:
        raise TaskDataError(
            f"{shards}: label value(s) {extra} are neither in labels.values {values} nor in labels.ignore; "
            "the class count disagrees with the labels"
        )
    if lab.num_classes and lab.num_classes != len(values):
        raise TaskDataError(
            f"{shards}: labels.num_classes={lab.num_classes} but the labels hold {len(values)} class value(s) "
            f"{values}; fix labels.num_classes or list the classes in labels.values / labels.ignore"
        )
    if not values:
        raise TaskDataError(f"{shards}: every label value is ignored; no class to learn")
    if lab.names:
        if len(lab.names) != len(values):
            raise TaskDataError(f"labels.names: {len(lab.names)} names for {len(values)} classes {values}")
        names = list(lab.names)
    else:
        names = [names_meta.get(v, f"class_{v}") for v in values]
    return values, names


def _ignored(tile: Tile, cfg: TaskDataConfig) -> set[int]:
    out = set(cfg.labels.ignore)
    if tile.meta.get("label_ignore") is not None:
        out.add(int(tile.meta["label_ignore"]))
    return out


def _check_uniform(tiles: Sequence[Tile], cfg: TaskDataConfig) -> None:
    """One band set (and, for tile tasks, one tile size) over the dataset: batches stack samples."""
    def signature(t: Tile) -> str:
        return "|".join(f"{b['sensor']}/{b['name']}" for b in t.meta["bands"])

    first = tiles[0]
    for t in tiles[1:]:
        if signature(t) != signature(first):
            raise TaskDataError(
                f"{cfg.shards}: tile {t.key!r} has other bands than {first.key!r} ({t.pixels.shape[0]} vs "
                f"{first.pixels.shape[0]} observations); fine-tuning batches need one band set: build the task's "
                "shards from one sensor and date set"
            )
        if cfg.task != "pixel" and t.pixels.shape != first.pixels.shape:
            raise TaskDataError(f"{cfg.shards}: tile {t.key!r} is {t.pixels.shape[1]}x{t.pixels.shape[2]}, "
                                f"{first.key!r} {first.pixels.shape[1]}x{first.pixels.shape[2]}; tile tasks need "
                                "one tile size")


def load_task_data(cfg: TaskDataConfig) -> TaskData:
    """Read ``cfg.shards`` and build the samples of ``cfg.task``.

    Raises:
        TaskDataError: shards without the labels the task needs, label values that disagree with
            ``labels``, or a mosaic too large to hold.
    """
    tiles, index = read_tiles(cfg.shards, cfg.index)
    need = {"scene": "label.cls", "segmentation": "label.npy", "pixel": "label.npy"}.get(cfg.task)
    if cfg.task == "multilabel":
        lacking = [t.key for t in tiles if "labels" not in t.meta and not isinstance(t.label, np.ndarray)]
        need = "meta.json 'labels' or label.npy"
    elif cfg.task == "scene":
        lacking = [t.key for t in tiles if not isinstance(t.label, int)]
    else:
        lacking = [t.key for t in tiles if not isinstance(t.label, np.ndarray)]
    if lacking:
        have = sorted({"label.cls" if isinstance(t.label, int) else "label.npy" if t.label is not None else "none"
                       for t in tiles})
        raise TaskDataError(
            f"{cfg.shards}: task '{cfg.task}' needs {need} in every sample, but {len(lacking)} of {len(tiles)} "
            f"lack it (first: {lacking[0]!r}; labels found: {', '.join(have)}); rebuild the shards with labels "
            "(gfm shards build --label ...) or choose the task that matches them"
        )
    names_meta = _metadata_names(index.raw, tiles)
    scene_ids, rows, cols = _placement(tiles)
    scenes = sorted(set(scene_ids))
    scene_of_tile = np.array([scenes.index(s) for s in scene_ids], dtype=np.int64)
    hw = np.array([t.pixels.shape[1:] for t in tiles], dtype=np.int64)
    scene_hw = [
        (int((rows + hw[:, 0])[scene_of_tile == s].max()), int((cols + hw[:, 1])[scene_of_tile == s].max()))
        for s in range(len(scenes))
    ]

    # label values found (minus ignored ones) → the class table
    found: set[int] = set()
    for t in tiles:
        ign = _ignored(t, cfg)
        if isinstance(t.label, np.ndarray):
            found.update(int(v) for v in np.unique(t.label) if int(v) not in ign)
        elif isinstance(t.label, int) and t.label not in ign:
            found.add(int(t.label))
        if cfg.task == "multilabel" and "labels" in t.meta:
            found.update(int(v) for v in t.meta["labels"] if int(v) not in ign)
    values, names = _class_table(cfg, found, names_meta, cfg.shards)
    k = len(values)
    lut = {v: i for i, v in enumerate(values)}

    def to_class(a: np.ndarray) -> np.ndarray:
        out = np.full(a.shape, IGNORE, dtype=np.int64)
        for v, i in lut.items():
            out[a == v] = i
        return out

    _check_uniform(tiles, cfg)
    normalised = _normalised(tiles, index)
    data = TaskData(
        task=cfg.task, class_names=names, label_values=values, windows=Windows([], *(np.zeros(0, np.int64),) * 5,
                                                                                np.zeros((0, k)), names),
        targets=np.zeros(0, np.int64), scenes=scenes, scene_hw=scene_hw, source=cfg.shards, tiles=normalised,
        bands=normalization_table(tiles, index),
    )
    if cfg.task == "pixel":
        return _pixel_samples(data, tiles, cfg, scene_of_tile, rows, cols, to_class)

    classes = np.zeros((len(tiles), k))
    targets: list[Any] = []
    for i, t in enumerate(tiles):
        ign = _ignored(t, cfg)
        if cfg.task == "scene":
            if int(t.label) in ign:  # type: ignore[arg-type]
                targets.append(IGNORE)
                continue
            targets.append(lut[int(t.label)])  # type: ignore[arg-type]
            classes[i, targets[-1]] = 1
        elif cfg.task == "segmentation":
            cls_map = to_class(np.asarray(t.label))
            data.label_maps.append(torch.from_numpy(cls_map))
            targets.append(len(data.label_maps) - 1)
            classes[i] = np.bincount(cls_map[cls_map >= 0], minlength=k)
        else:  # multilabel
            if "labels" in t.meta:
                hot = np.zeros(k)
                hot[[lut[int(v)] for v in t.meta["labels"] if int(v) not in ign]] = 1
            else:
                cls_map = to_class(np.asarray(t.label))
                counts = np.bincount(cls_map[cls_map >= 0], minlength=k)
                hot = (counts >= max(1, cfg.labels.min_fraction * counts.sum())).astype(np.float64)
            targets.append(hot)
            classes[i] = hot
    keep = np.flatnonzero(classes.sum(1) > 0)  # tiles with nothing labelled are not samples
    if not len(keep):
        raise TaskDataError(f"{cfg.shards}: no tile has a labelled pixel or class for task '{cfg.task}'")
    tgt = np.asarray(targets)[keep] if cfg.task != "segmentation" else np.asarray(targets, dtype=np.int64)[keep]
    data.windows = Windows(
        ids=[tiles[i].key for i in keep], scene=scene_of_tile[keep], top=rows[keep], left=cols[keep],
        height=hw[keep, 0], width=hw[keep, 1], classes=classes[keep], class_names=names,
    )
    data.targets = tgt
    data.tile_of_sample = keep.astype(np.int64)
    data.label_mosaics = _label_mosaics(data, tiles, scene_of_tile, rows, cols, to_class, cfg)
    return data


def _label_mosaics(data: TaskData, tiles: Sequence[Tile], scene_of_tile: np.ndarray, rows: np.ndarray,
                   cols: np.ndarray, to_class: Any, cfg: TaskDataConfig) -> list[np.ndarray]:
    """Per scene, the class of each pixel (segmentation) or of each tile's area (scene tasks), -1 elsewhere."""
    out = [np.full(hw, IGNORE, dtype=np.int64) for hw in data.scene_hw]
    for i, t in enumerate(tiles):
        h, w = t.pixels.shape[1:]
        dst = out[scene_of_tile[i]][rows[i] : rows[i] + h, cols[i] : cols[i] + w]
        if isinstance(t.label, np.ndarray):
            dst[...] = to_class(t.label)
        elif isinstance(t.label, int) and t.label in data.label_values:
            dst[...] = data.label_values.index(t.label)
    return out


def _pixel_samples(data: TaskData, tiles: Sequence[Tile], cfg: TaskDataConfig, scene_of_tile: np.ndarray,
                   rows: np.ndarray, cols: np.ndarray, to_class: Any) -> TaskData:
    """Scene mosaics (pixels, valid, classes) and one sample per labelled pixel."""
    pad = cfg.window // 2
    ids: list[str] = []
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("scene", "row", "col", "cls", "tile")}
    for s, (h, w) in enumerate(data.scene_hw):
        members = np.flatnonzero(scene_of_tile == s)
        first = data.tiles[members[0]]
        c = int(first.pixels.shape[1])
        mb = c * (h + 2 * pad) * (w + 2 * pad) * 5 / 2**20  # float32 pixels + bool valid
        if mb > cfg.max_mosaic_mb:
            raise TaskDataError(
                f"{cfg.shards}: scene {data.scenes[s]!r} ({h}x{w} pixels, {c} bands) needs a {mb:.0f} MB mosaic, "
                f"over data.max_mosaic_mb={cfg.max_mosaic_mb:g}; raise it, or use the segmentation task"
            )
        pixels = torch.zeros((c, h + 2 * pad, w + 2 * pad), dtype=torch.float32)
        valid = torch.zeros((c, h + 2 * pad, w + 2 * pad), dtype=torch.bool)
        classes = np.full((h, w), IGNORE, dtype=np.int64)
        owner = np.full((h, w), -1, dtype=np.int64)  # the tile whose metadata a pixel's window uses
        sig = [(b["sensor"], b["name"]) for b in tiles[int(members[0])].meta["bands"]]
        for i in map(int, members):
            if [(b["sensor"], b["name"]) for b in tiles[i].meta["bands"]] != sig:
                raise TaskDataError(f"{cfg.shards}: tile {tiles[i].key!r} has other bands than the rest of scene "
                                    f"{data.scenes[s]!r}; a pixel mosaic needs one band set per scene")
            th, tw = tiles[i].pixels.shape[1:]
            r0, c0 = int(rows[i]), int(cols[i])
            pixels[:, pad + r0 : pad + r0 + th, pad + c0 : pad + c0 + tw] = data.tiles[i].pixels[0]
            valid[:, pad + r0 : pad + r0 + th, pad + c0 : pad + c0 + tw] = data.tiles[i].valid[0]
            classes[r0 : r0 + th, c0 : c0 + tw] = to_class(np.asarray(tiles[i].label))
            owner[r0 : r0 + th, c0 : c0 + tw] = i
        data.mosaics.append((pixels, valid))
        data.label_mosaics.append(classes)
        r, cc = np.nonzero(classes >= 0)
        ids += [f"{data.scenes[s]}:{a}:{b}" for a, b in zip(r, cc)]
        parts["scene"].append(np.full(len(r), s))
        parts["row"].append(r)
        parts["col"].append(cc)
        parts["cls"].append(classes[r, cc])
        parts["tile"].append(owner[r, cc])
    if not ids:
        raise TaskDataError(f"{cfg.shards}: no labelled pixel (every label value is ignored)")
    row, col, cls = (np.concatenate(parts[k]).astype(np.int64) for k in ("row", "col", "cls"))
    n, k = len(ids), data.num_classes
    data.windows = Windows(
        ids=ids, scene=np.concatenate(parts["scene"]).astype(np.int64), top=row - pad, left=col - pad,
        height=np.full(n, cfg.window), width=np.full(n, cfg.window), classes=np.eye(k)[cls],
        class_names=data.class_names,
    )
    data.targets = cls
    data.tile_of_sample = np.concatenate(parts["tile"]).astype(np.int64)
    data.window = cfg.window
    return data


# ------------------------------------------------------------------------------------------------
# Training stream


class TaskLoader:
    """Training batches of one rank: a seeded permutation per epoch, dealt round-robin to the ranks.

    An epoch yields ``max(1, n_rank // batch_size)`` full batches (a rank with fewer samples than a
    batch repeats its permutation to fill one). The stream is a pure function of (seed, epoch, rank),
    so ``state_dict`` is just the epoch and the batches already consumed.
    """

    def __init__(self, data: TaskData, indices: np.ndarray, batch_size: int, rank: int, world_size: int,
                 seed: int, augment: tuple[bool, bool, bool]) -> None:
        if not len(indices):
            raise TaskDataError("the training split is empty")
        self.data = data
        self.indices = np.asarray(indices, dtype=np.int64)
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.augment = augment
        self.epoch = 0
        self.position = 0

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its first batch."""
        if epoch != self.epoch:
            self.position = 0
        self.epoch = epoch

    def state_dict(self) -> dict[str, Any]:
        """Epoch and batches consumed in it."""
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where :meth:`state_dict` was taken."""
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def _order(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch])
        mine = rng.permutation(self.indices)[self.rank :: self.world_size]
        if not len(mine):
            mine = rng.permutation(self.indices)[: 1]
        reps = math.ceil(self.batch_size / len(mine))
        order = np.concatenate([mine] + [rng.permutation(mine) for _ in range(reps - 1)])
        return order[: max(1, len(order) // self.batch_size) * self.batch_size]

    def __len__(self) -> int:
        return len(self._order()) // self.batch_size

    def __iter__(self) -> Iterator[Batch]:
        order = self._order()
        n = len(order) // self.batch_size
        while self.position < n:
            b = self.position
            self.position += 1
            rng = np.random.default_rng([self.seed, self.epoch, self.rank, b])
            yield self.data.batch(order[b * self.batch_size : (b + 1) * self.batch_size], rng, self.augment)
        # the trainer calls set_epoch(epoch + 1) next
