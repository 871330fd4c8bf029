"""Evaluation: predictions of a split on every rank, counts summed over ranks, figures on rank 0.

Each rank predicts every ``world_size``-th sample of the split; confusion matrices (or multi-label
tallies) and per-scene prediction votes are summed with one all-reduce each, so the figures are those
of the whole split whatever the number of ranks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from gfm import distributed as gdist
from gfm.finetune.data import IGNORE, TaskData
from gfm.finetune.methods import unwrap
from gfm.finetune.metrics import (
    classification_metrics,
    confusion_matrix,
    multilabel_counts,
    multilabel_metrics,
)
from gfm.model.heads import smooth_probabilities

#: the largest classes × pixels of a scene's prediction votes reduced over ranks (else no map)
MAX_MAP_CELLS = 64_000_000


@dataclass
class Evaluation:
    """What :func:`evaluate` found.

    Attributes:
        metrics: the figures (see :mod:`gfm.finetune.metrics`), fractions in [0, 1].
        confusion: ``[K, K]`` counts (``[K, 4]`` TP/FP/FN/TN for multi-label).
        maps: per scene, the predicted class of each evaluated pixel (-1 elsewhere), or None when too large.
    """

    metrics: dict[str, Any]
    confusion: np.ndarray
    maps: list[np.ndarray | None] = field(default_factory=list)


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def predict(model: Any, data: TaskData, indices: Sequence[int] | np.ndarray, batch_size: int,
            autocast: torch.dtype | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Predictions of ``model`` (a task model, or one wrapped by peft or DeepSpeed) for samples ``indices``.

    Returns ``(targets, predictions)``: for scene/pixel ``[n]`` class arrays; for multi-label ``[n, K]``
    multi-hot; for segmentation, targets are the concatenated label pixels and predictions a list of
    ``[H, W]`` maps (one per sample).
    """
    was_training = model.training
    model.eval()
    device = _device_of(model)
    task_model = unwrap(model)
    if data.task == "pixel" and getattr(task_model, "per_pixel", False):
        pred = _pixel_dense(task_model, data, np.asarray(indices), batch_size, device, autocast)
        model.train(was_training)
        return np.asarray(data.targets)[np.asarray(indices, dtype=np.int64)].astype(np.int64), [pred]
    preds: list[np.ndarray] = []
    targets: list[np.ndarray] = []
    for start in range(0, len(indices), batch_size):
        chunk = list(indices[start : start + batch_size])
        batch = data.batch(chunk).to(device)
        ctx: Any = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
        with ctx:
            logits = model(batch).logits
        pred = model.predict(logits.float()).cpu().numpy()  # peft and DeepSpeed forward the attribute
        if data.task == "segmentation":
            preds.extend(list(pred))
        else:
            preds.append(pred)
        assert batch.label is not None  # task samples always carry their target
        targets.append(batch.label.cpu().numpy())
    model.train(was_training)
    if data.task == "segmentation":
        return (np.concatenate([t.reshape(-1) for t in targets]) if targets else np.zeros(0, np.int64)), preds
    k = data.num_classes
    empty_t = np.zeros((0, k)) if data.multilabel else np.zeros(0, np.int64)
    return (np.concatenate(targets) if targets else empty_t), ([np.concatenate(preds)] if preds else [empty_t])


@torch.no_grad()
def _pixel_dense(model: Any, data: TaskData, indices: np.ndarray, batch_size: int, device: torch.device,
                 autocast: torch.dtype | None) -> np.ndarray:
    """Pixel task, encoder per pixel: the samples' class probabilities from one pass over the pixels they need.

    A per-pixel encoder's logits for a pixel depend on that pixel alone, and smoothing reads the
    ``smooth × smooth`` pixels around it, all inside its window: so computing each needed pixel of a
    scene's mosaic once (the samples' centres and their smoothing neighbourhoods, no other) gives exactly
    what window-by-window evaluation gives, each pixel once instead of once per window it lies in.
    """
    out = np.zeros(len(indices), dtype=np.int64)
    w = data.windows
    pad = data.window // 2
    halo = model.smooth // 2
    tile = data.tiles[0]
    ctx: Any = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    for s in np.unique(w.scene[indices]) if len(indices) else []:
        mine = np.flatnonzero(w.scene[indices] == s)
        # window centres in the mosaic, which is padded by ``pad`` on every side: top + pad (centre) + pad
        rows, cols = w.top[indices[mine]] + 2 * pad, w.left[indices[mine]] + 2 * pad
        pixels, valid = data.mosaics[int(s)]
        r0, r1 = max(0, int(rows.min()) - halo), min(pixels.shape[-2], int(rows.max()) + halo + 1)
        part = replace(tile, pixels=pixels[None, :, r0:r1], valid=valid[None, :, r0:r1], label=None, keys=[]).to(device)
        ok = part.valid.any(dim=1)  # [1, h, W]
        centres = torch.zeros_like(ok)
        centres[0, torch.as_tensor(rows - r0), torch.as_tensor(cols)] = True
        needed = F.max_pool2d(centres[:, None].float(), 2 * halo + 1, stride=1, padding=halo)[:, 0] > 0
        with ctx:
            logits = model.dense_logits_where(part, needed & ok, batch_size)  # [1, K, h, W]
        prob = smooth_probabilities(logits, model.smooth, ok)
        out[mine] = prob[0, :, torch.as_tensor(rows - r0), torch.as_tensor(cols)].argmax(0).cpu().numpy()
    return out


def evaluate(model: Any, data: TaskData, indices: np.ndarray, batch_size: int, *,
             dropped_classes: Sequence[int] = (), maps: bool = True,
             autocast: torch.dtype | None = None) -> Evaluation:
    """Metrics of ``model`` on samples ``indices`` over all ranks (every rank calls; rank 0 uses the result).

    ``dropped_classes`` are left out of the per-class entries' averages (they have no samples anyway).
    """
    info = gdist.info()
    mine = np.asarray(indices)[info.rank :: info.world_size]
    targets, preds = predict(model, data, mine, batch_size, autocast)
    return score(data, mine, targets, preds, dropped_classes=dropped_classes, maps=maps)


def score(data: TaskData, mine: np.ndarray, targets: np.ndarray, preds: list[np.ndarray], *,
          dropped_classes: Sequence[int] = (), maps: bool = True) -> Evaluation:
    """Figures and per-scene maps of predictions of samples ``mine``, counts summed over ranks.

    Every rank calls it with its own share of the split; whatever made the predictions (a network through
    :func:`predict`, or a classic baseline of :mod:`gfm.finetune.classic`), they are scored the same way.

    Args:
        data: the task data.
        mine: the sample indices this rank predicted.
        targets: as :func:`predict` returns them: ``[n]`` classes, ``[n, K]`` multi-hot, or (segmentation)
            every pixel's class of the ``mine`` tiles concatenated (-1 = unlabelled).
        preds: as :func:`predict` returns them: ``[[n]]`` or ``[[n, K]]``, or (segmentation) one ``[H, W]``
            map per sample.
        dropped_classes: left out of the per-class averages.
        maps: also build the per-scene prediction maps.
    """
    k = data.num_classes
    names = data.class_names
    if data.multilabel:
        pred = preds[0]
        counts = multilabel_counts(targets, pred) if len(targets) else np.zeros((k, 4), np.int64)
        exact = int((targets == pred).all(1).sum())
        tally = torch.from_numpy(np.concatenate([counts.reshape(-1), [exact, len(targets)]]))
        total = gdist.all_reduce_sum_tensor(tally).numpy().astype(np.int64)
        counts, exact, n = total[:-2].reshape(k, 4), int(total[-2]), int(total[-1])
        metrics = multilabel_metrics(counts, names, exact, n)
        matrix = counts
        pixel_pred = pred.argmax(1) if len(pred) else np.zeros(0, np.int64)  # map shows the first positive class
    else:
        if data.task == "segmentation":
            flat = np.concatenate([p.reshape(-1) for p in preds]) if preds else np.zeros(0, np.int64)
            cm = confusion_matrix(targets, flat, k)
        else:
            cm = confusion_matrix(targets, preds[0], k)
        matrix = gdist.all_reduce_sum_tensor(torch.from_numpy(cm)).numpy().astype(np.int64)
        metrics = classification_metrics(matrix, names, segmentation=data.task == "segmentation")
        pixel_pred = preds[0] if data.task != "segmentation" else np.zeros(0, np.int64)
    metrics["dropped_classes"] = [names[c] for c in dropped_classes]
    out = Evaluation(metrics, matrix)
    if maps:
        out.maps = _maps(data, mine, pixel_pred, preds if data.task == "segmentation" else [])
    return out


def _maps(data: TaskData, mine: np.ndarray, pred: np.ndarray, seg_preds: list[np.ndarray]) -> list[np.ndarray | None]:
    """Per scene, the predicted class of each evaluated pixel (votes summed over ranks, then argmax)."""
    out: list[np.ndarray | None] = []
    k = data.num_classes
    w = data.windows
    for s, (h, wd) in enumerate(data.scene_hw):
        if k * h * wd > MAX_MAP_CELLS:
            out.append(None)
            continue
        votes = np.zeros((k, h, wd), dtype=np.float32)
        for j, i in enumerate(mine):
            if w.scene[i] != s:
                continue
            if data.task == "pixel":
                r, c = int(w.top[i]) + data.window // 2, int(w.left[i]) + data.window // 2
                votes[int(pred[j]), r, c] += 1
                continue
            r0, c0 = int(w.top[i]), int(w.left[i])
            r1, c1 = min(h, r0 + int(w.height[i])), min(wd, c0 + int(w.width[i]))
            if data.task == "segmentation":
                seg = seg_preds[j][: r1 - r0, : c1 - c0]
                np.add.at(votes, (seg, *np.mgrid[r0:r1, c0:c1]), 1)
            else:
                votes[int(pred[j]), r0:r1, c0:c1] += 1
        total = gdist.all_reduce_sum_tensor(torch.from_numpy(votes)).numpy()
        m = total.argmax(0).astype(np.int64)
        m[total.sum(0) == 0] = IGNORE
        out.append(m)
    return out
