"""Train/val/test splits of labelled windows: spatially disjoint by default, random as an option.

Every sample of a task is a window of a scene (a tile, or a window centred on a labelled pixel) with a
class vector (one-hot for one class, a pixel histogram for a label map, multi-hot for multi-label).
:func:`make_split` decides which samples train, validate and test; the task data only reads them.

Spatial split (``mode: spatial``):

1. The scene is cut into ``block × block`` pixel blocks; a sample belongs to the block holding its
   window's centre.
2. Blocks are dealt to train/val/test so that every class gets close to its share in each split
   (iterative stratification: the class with the fewest samples left is placed first, each of its
   blocks going to the split that still wants most of that class), in an order drawn from ``seed``.
3. Training labels per class are drawn from the training blocks: a count (``per_class``) or a
   fraction of the class's labelled samples in the whole dataset (``fraction``); windows clear of
   every validation and test window first, windows near a block edge only when those run out.
4. Guard band: a validation or test window that overlaps, or comes within ``guard`` pixels of, a
   chosen training window is dropped, so no training window overlaps a test window. (The scarce side,
   the training labels, is kept.) The overlap is then counted again from scratch and reported; it is 0
   by construction. Validation and test keep every other labelled sample of their blocks.

Random split (``mode: random``) deals samples per class at random. Windows of neighbouring pixels
then overlap across train and test (the overlap is reported; this is what inflates scores in the
hyperspectral literature), so use it only as the comparison it is.

A split is saved as JSON (sample ids per split, the settings, the report) and can be loaded again for
another run on the same data.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from gfm.config import ConfigError
from gfm.fileio import atomic_write

SPLITS = ("train", "val", "test")
SPLIT_FORMAT = 1


class SplitError(ValueError):
    """A split that cannot be made or reused; the message names the class, sample or file."""


@dataclass
class SplitConfig:
    """How samples are split.

    Attributes:
        mode: ``spatial`` (blocks + guard band) or ``random``.
        block: spatial block side in pixels.
        fractions: train, val and test shares of the labelled samples (by class), summing to 1.
        guard: extra pixels kept between a training window and any test (or validation) window,
            beyond not overlapping.
        seed: seed of the split; None = the run's seed (so each seed of a study also draws its split).
        per_class: training labels per class as a count (0 = use ``fraction``).
        fraction: training labels per class as a fraction of that class's labelled samples in the
            whole dataset (used when ``per_class`` is 0; 1.0 = every sample left in the training blocks).
        empty_class: what to do with a class that ends up with no training or no test sample:
            ``error`` (stop, naming it) or ``drop`` (leave the class out of training and metrics; reported).
        load: path of a saved ``split.json`` to reuse instead of drawing a new split.
    """

    mode: Literal["spatial", "random"] = "spatial"
    block: int = 32
    fractions: tuple[float, float, float] = (0.5, 0.1, 0.4)
    guard: int = 0
    seed: int | None = None
    per_class: int = 0
    fraction: float = 1.0
    empty_class: Literal["error", "drop"] = "error"
    load: str = ""

    def validate(self) -> None:
        """Check values; raises :class:`ConfigError` naming the field."""
        if self.block < 1:
            raise ConfigError(f"block: must be >= 1, got {self.block}")
        if any(f < 0 for f in self.fractions) or abs(sum(self.fractions) - 1.0) > 1e-6:
            raise ConfigError(f"fractions: three shares >= 0 summing to 1, got {list(self.fractions)}")
        if self.fractions[0] <= 0 or self.fractions[2] <= 0:
            raise ConfigError(f"fractions: train and test shares must be > 0, got {list(self.fractions)}")
        if self.guard < 0:
            raise ConfigError(f"guard: must be >= 0, got {self.guard}")
        if self.per_class < 0:
            raise ConfigError(f"per_class: must be >= 0, got {self.per_class}")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"fraction: must be in (0, 1], got {self.fraction}")


@dataclass
class Windows:
    """The samples to split, as windows in scene pixel coordinates.

    Attributes:
        ids: a stable id per sample (tile key, or ``scene:row:col`` of a labelled pixel).
        scene: ``[S]`` scene index per sample.
        top, left: ``[S]`` window corner (may lie outside the scene for windows centred near an edge).
        height, width: ``[S]`` window size.
        classes: ``[S, K]`` class vector per sample (one-hot, multi-hot or a pixel histogram).
        class_names: ``K`` names.
    """

    ids: list[str]
    scene: np.ndarray
    top: np.ndarray
    left: np.ndarray
    height: np.ndarray
    width: np.ndarray
    classes: np.ndarray
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def centre(self) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, cols)`` of the window centres."""
        return self.top + self.height // 2, self.left + self.width // 2

    @property
    def dominant(self) -> np.ndarray:
        """``[S]`` the class with most weight in each sample (its class for per-class label budgets)."""
        return np.argmax(self.classes, axis=1)


@dataclass
class Split:
    """Sample indices per split and what happened on the way.

    Attributes:
        train, val, test: sorted sample indices.
        report: JSON-able account: settings, samples per class and split, windows dropped by the guard,
            the train/test window overlap (0 for a spatial split), classes dropped, budget shortfalls.
        dropped_classes: class indices left out of training and metrics.
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    report: dict[str, Any] = field(default_factory=dict)
    dropped_classes: list[int] = field(default_factory=list)

    def indices(self, name: str) -> np.ndarray:
        """The indices of split ``name`` (train, val or test)."""
        return {"train": self.train, "val": self.val, "test": self.test}[name]

    def save(self, path: str | Path, windows: Windows) -> Path:
        """Write ``split.json``: sample ids per split, dropped classes and the report."""
        doc = {
            "format": SPLIT_FORMAT,
            "samples": len(windows),
            "class_names": windows.class_names,
            "dropped_classes": [windows.class_names[c] for c in self.dropped_classes],
            "report": self.report,
            **{name: [windows.ids[i] for i in self.indices(name)] for name in SPLITS},
        }
        return atomic_write(path, json.dumps(doc, indent=1) + "\n")


def load_split(path: str | Path, windows: Windows) -> Split:
    """A saved split mapped back onto ``windows``; ids it names must all exist in them."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SplitError(f"split.load: cannot read {path}: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != SPLIT_FORMAT:
        raise SplitError(f"split.load: {path} is not a gfm split.json (format {SPLIT_FORMAT})")
    where = {sid: i for i, sid in enumerate(windows.ids)}
    parts = {}
    for name in SPLITS:
        ids = doc.get(name, [])
        missing = [sid for sid in ids if sid not in where]
        if missing:
            raise SplitError(
                f"split.load: {path} names {len(missing)} {name} sample(s) this data does not have "
                f"(first: {missing[0]!r}); it was made for other shards or another task window"
            )
        parts[name] = np.array(sorted(where[sid] for sid in ids), dtype=np.int64)
    names = windows.class_names
    unknown = [c for c in doc.get("dropped_classes", []) if c not in names]
    if unknown:
        raise SplitError(f"split.load: {path} drops class(es) {unknown} that this task does not have")
    dropped = [names.index(c) for c in doc.get("dropped_classes", [])]
    report = dict(doc.get("report", {}), loaded_from=str(path))
    return Split(parts["train"], parts["val"], parts["test"], report, dropped)


# ------------------------------------------------------------------------------------------------
# Geometry


def _coverage(windows: Windows, idx: np.ndarray, scene: int, offset: tuple[int, int], shape: tuple[int, int],
              grow: int) -> np.ndarray:
    """Summed-area table ``[H+1, W+1]`` of the pixels covered by windows ``idx`` of ``scene``, grown by ``grow``."""
    cover = np.zeros(shape, dtype=np.int32)
    sel = idx[windows.scene[idx] == scene]
    for i in sel:
        r0 = max(0, int(windows.top[i]) - grow - offset[0])
        c0 = max(0, int(windows.left[i]) - grow - offset[1])
        r1 = min(shape[0], int(windows.top[i] + windows.height[i]) + grow - offset[0])
        c1 = min(shape[1], int(windows.left[i] + windows.width[i]) + grow - offset[1])
        cover[r0:r1, c0:c1] = 1
    sat = np.zeros((shape[0] + 1, shape[1] + 1), dtype=np.int64)
    sat[1:, 1:] = cover.cumsum(0).cumsum(1)
    return sat


def _hits(windows: Windows, idx: np.ndarray, sat: np.ndarray, offset: tuple[int, int]) -> np.ndarray:
    """Which windows ``idx`` touch any covered pixel of ``sat`` (bool per entry of ``idx``)."""
    h, w = sat.shape[0] - 1, sat.shape[1] - 1
    r0 = np.clip(windows.top[idx] - offset[0], 0, h)
    c0 = np.clip(windows.left[idx] - offset[1], 0, w)
    r1 = np.clip(windows.top[idx] + windows.height[idx] - offset[0], 0, h)
    c1 = np.clip(windows.left[idx] + windows.width[idx] - offset[1], 0, w)
    covered = sat[r1, c1] - sat[r0, c1] - sat[r1, c0] + sat[r0, c0]
    return covered > 0


def _extent(windows: Windows, scene: int, grow: int) -> tuple[tuple[int, int], tuple[int, int]]:
    sel = windows.scene == scene
    top = int(windows.top[sel].min()) - grow
    left = int(windows.left[sel].min()) - grow
    bottom = int((windows.top[sel] + windows.height[sel]).max()) + grow
    right = int((windows.left[sel] + windows.width[sel]).max()) + grow
    return (top, left), (bottom - top, right - left)


def overlapping(windows: Windows, a: np.ndarray, b: np.ndarray, grow: int = 0) -> np.ndarray:
    """The members of ``a`` whose window overlaps (or comes within ``grow`` pixels of) a window of ``b``."""
    out = np.zeros(len(a), dtype=bool)
    if not len(a) or not len(b):
        return a[out]
    for scene in np.unique(windows.scene[a]):
        offset, shape = _extent(windows, int(scene), grow)
        sat = _coverage(windows, b, int(scene), offset, shape, grow)
        in_scene = windows.scene[a] == scene
        out[in_scene] = _hits(windows, a[in_scene], sat, offset)
    return a[out]


# ------------------------------------------------------------------------------------------------
# Assignment


def _deal_blocks(block_hist: np.ndarray, fractions: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Iterative stratification of blocks ``[Nb, K]`` into len(fractions) splits; returns a split per block."""
    nb = block_hist.shape[0]
    want = np.outer(np.asarray(fractions, dtype=np.float64), block_hist.sum(0))  # [3, K] still wanted
    assigned = np.full(nb, -1, dtype=np.int64)
    left = np.ones(nb, dtype=bool)
    while left.any():
        remaining = block_hist[left].sum(0)
        present = np.flatnonzero(remaining > 0)
        if present.size:
            cls = present[np.argmin(remaining[present])]
            blocks = np.flatnonzero(left & (block_hist[:, cls] > 0))
        else:  # blocks without labelled weight: deal by the largest total shortfall
            cls, blocks = -1, np.flatnonzero(left)
        for b in rng.permutation(blocks):
            need = want[:, cls] if cls >= 0 else want.sum(1)
            total_need = want.sum(1)
            # the split that wants this class most; ties by total need, then at random
            order = np.lexsort((rng.random(len(need)), -total_need, -need))
            s = int(order[0])
            assigned[b] = s
            want[s] -= block_hist[b]
            left[b] = False
    return assigned


def _spatial(windows: Windows, cfg: SplitConfig, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, Any]]:
    rows, cols = windows.centre
    keys = np.stack([windows.scene, rows // cfg.block, cols // cfg.block], axis=1)
    uniq, block_of = np.unique(keys, axis=0, return_inverse=True)
    block_of = block_of.reshape(-1)
    hist = np.zeros((len(uniq), windows.classes.shape[1]))
    np.add.at(hist, block_of, windows.classes)
    split_of_block = _deal_blocks(hist, cfg.fractions, rng)
    blocks = {name: int((split_of_block == s).sum()) for s, name in enumerate(SPLITS)}
    return split_of_block[block_of], {"blocks": blocks}


def _random(windows: Windows, cfg: SplitConfig, rng: np.random.Generator) -> np.ndarray:
    assign = np.full(len(windows), -1, dtype=np.int64)
    dom = windows.dominant
    for c in np.unique(dom):
        idx = rng.permutation(np.flatnonzero(dom == c))
        cuts = np.round(np.cumsum(cfg.fractions) * len(idx)).astype(int)
        for s, (a, b) in enumerate(zip(np.r_[0, cuts[:-1]], cuts)):
            assign[idx[a:b]] = s
    return assign


def _budget(
    windows: Windows, pool: np.ndarray, cfg: SplitConfig, rng: np.random.Generator, border: np.ndarray
) -> tuple[np.ndarray, dict]:
    """Training labels per class drawn from ``pool`` (members of ``border`` last); chosen indices, shortfalls."""
    dom = windows.dominant
    totals = np.bincount(dom, minlength=windows.classes.shape[1])
    chosen, short = [], {}
    for c in range(windows.classes.shape[1]):
        avail = pool[dom[pool] == c]
        if cfg.per_class > 0:
            want = cfg.per_class
        elif cfg.fraction >= 1.0:
            want = len(avail)
        else:
            want = max(1, int(round(cfg.fraction * totals[c]))) if totals[c] else 0
        if want > len(avail) and totals[c]:
            short[windows.class_names[c]] = {"asked": int(want), "available": int(len(avail))}
        inner, outer = avail[~np.isin(avail, border)], avail[np.isin(avail, border)]
        ranked = np.concatenate([rng.permutation(inner), rng.permutation(outer)])
        chosen.append(ranked[: min(want, len(avail))])
    return np.sort(np.concatenate(chosen)).astype(np.int64), short


def _window_note(windows: Windows, cfg: SplitConfig) -> str:
    """Why a spatial split comes out empty when the task's windows are larger than its blocks (else "")."""
    side = int(max(windows.height.max(), windows.width.max()))
    if cfg.mode != "spatial" or side <= cfg.block:
        return ""
    return (f": the task window ({side} x {side} px) is larger than split.block ({cfg.block} px), so every window "
            "overlaps windows of the neighbouring blocks and the guard band drops them")


def make_split(windows: Windows, cfg: SplitConfig, seed: int) -> Split:
    """Split ``windows`` as ``cfg`` says (``cfg.seed`` or else ``seed`` draws it).

    Raises:
        SplitError: a class with labelled samples ends with none in training or test and
            ``cfg.empty_class`` is ``error``; or, with ``drop``, no class is left (both name a task window
            larger than the spatial block, the usual cause).
    """
    if not len(windows):
        raise SplitError("split: the task has no labelled samples")
    split_seed = cfg.seed if cfg.seed is not None else seed
    rng = np.random.default_rng(split_seed)
    if cfg.mode == "spatial":
        assign, report = _spatial(windows, cfg, rng)
    else:
        assign, report = _random(windows, cfg, rng), {}
    pool, val, test = (np.flatnonzero(assign == s) for s in range(3))
    # training windows that would overlap a val/test window are drawn last (each would cost test samples)
    border = overlapping(windows, pool, np.union1d(val, test), cfg.guard) if cfg.mode == "spatial" else pool[:0]
    train, short = _budget(windows, pool, cfg, rng, border)
    if cfg.mode == "spatial":  # guard band: drop validation and test windows near a chosen training window
        near_val, near_test = (overlapping(windows, part, train, cfg.guard) for part in (val, test))
        val, test = np.setdiff1d(val, near_val), np.setdiff1d(test, near_test)
        report["dropped_by_guard"] = {"val": int(len(near_val)), "test": int(len(near_test))}
    split = Split(train, val, test)
    names = windows.class_names
    dom = windows.dominant
    totals = windows.classes.sum(0)
    per_split = {name: windows.classes[split.indices(name)].sum(0) for name in SPLITS}
    empty = [c for c in range(len(names))
             if totals[c] > 0 and (per_split["train"][c] == 0 or per_split["test"][c] == 0)]
    note = _window_note(windows, cfg)
    block = "a larger split.block" if note else "a smaller split.block"
    if empty and cfg.empty_class == "error":
        c = empty[0]
        where = "training" if per_split["train"][c] == 0 else "test"
        raise SplitError(
            f"split: class {c} {names[c]!r} has no {where} samples ({int(totals[c])} labelled, "
            f"{int(per_split['train'][c])} train / {int(per_split['test'][c])} test after the guard band)"
            f"{note}; use {block}, a smaller task window, split.mode=random, or split.empty_class=drop"
            + (f" ({len(empty)} classes affected: {', '.join(names[e] for e in empty)})" if len(empty) > 1 else "")
        )
    if empty:  # drop: those classes leave every split (their samples are neither trained on nor scored)
        keep = ~np.isin(dom, empty)
        split = Split(train[keep[train]], val[keep[val]], test[keep[test]], dropped_classes=empty)
        per_split = {name: windows.classes[split.indices(name)].sum(0) for name in SPLITS}
        if not len(split.train) or not len(split.test):
            raise SplitError(
                f"split: no class keeps both training and test samples (all {len(empty)} dropped by "
                f"split.empty_class=drop){note}; use {block}, a smaller task window, or split.mode=random"
            )
    split.report = {
        "mode": cfg.mode,
        "seed": int(split_seed),
        "block": cfg.block if cfg.mode == "spatial" else None,
        "guard": cfg.guard if cfg.mode == "spatial" else None,
        "fractions": list(cfg.fractions),
        "per_class": cfg.per_class,
        "fraction": cfg.fraction,
        **report,
        "samples": {name: int(len(split.indices(name))) for name in SPLITS},
        "per_class_samples": {
            names[c]: {name: float(per_split[name][c]) for name in SPLITS} for c in range(len(names))
        },
        "budget_shortfall": short,
        "dropped_classes": [names[c] for c in empty],
        "overlap_train_test": int(len(overlapping(windows, split.train, split.test))),
        "overlap_val_test": int(len(overlapping(windows, split.val, split.test))),
    }
    return split
