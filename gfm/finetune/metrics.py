"""Classification and segmentation metrics from a confusion matrix, and mean ± std over seeds.

Everything is computed from counts, so ranks can sum their confusion matrices (or multi-label
tallies) and rank 0 derives the figures once. Conventions:

- ``confusion[i, j]``: samples (or pixels) of true class ``i`` predicted as ``j``.
- Overall accuracy (OA) = trace / total; average accuracy (AA) = mean per-class recall over classes
  that have samples; Cohen's kappa = (OA − p_e) / (1 − p_e) with p_e from the marginals.
- F1 per class = 2·TP / (2·TP + FP + FN); macro-F1 averages it over classes with samples.
- IoU per class = TP / (TP + FP + FN) (segmentation); mIoU averages it over classes with samples.

Classes with no true samples are reported as ``null`` per class and left out of the averages (so a
class dropped from a split does not count as 0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def confusion_matrix(true: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """``[K, K]`` int64 counts of (true, predicted) pairs; entries with ``true < 0`` are ignored."""
    true = np.asarray(true).reshape(-1)
    pred = np.asarray(pred).reshape(-1)
    keep = true >= 0
    idx = true[keep].astype(np.int64) * num_classes + pred[keep].astype(np.int64)
    return np.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _safe(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _nanmean(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else math.nan


def _per_class(values: np.ndarray, names: Sequence[str]) -> dict[str, float | None]:
    return {name: (None if not math.isfinite(v) else float(v)) for name, v in zip(names, values)}


def classification_metrics(
    confusion: np.ndarray, class_names: Sequence[str], segmentation: bool = False
) -> dict[str, Any]:
    """OA, AA, kappa, macro-F1, per-class accuracy and F1 (and IoU/mIoU for segmentation).

    Args:
        confusion: ``[K, K]`` counts (see :func:`confusion_matrix`).
        class_names: ``K`` names, used as the keys of the per-class entries.
        segmentation: also report per-class IoU and mIoU.

    Returns:
        A JSON-able dict; the scalar figures are fractions in [0, 1].
    """
    cm = np.asarray(confusion, dtype=np.float64)
    k = cm.shape[0]
    if cm.shape != (k, k) or len(class_names) != k:
        raise ValueError(f"confusion matrix {cm.shape} does not match {len(class_names)} class names")
    total = cm.sum()
    tp = np.diag(cm)
    support = cm.sum(axis=1)  # true samples per class
    predicted = cm.sum(axis=0)
    recall = _safe(tp, support)
    precision = _safe(tp, predicted)
    f1 = _safe(2 * tp, support + predicted)
    f1[support == 0] = np.nan
    oa = float(tp.sum() / total) if total else math.nan
    pe = float((support * predicted).sum() / total**2) if total else math.nan
    kappa = (oa - pe) / (1 - pe) if total and pe < 1 else math.nan
    out: dict[str, Any] = {
        "samples": int(total),
        "oa": oa,
        "aa": _nanmean(recall),
        "kappa": kappa,
        "macro_f1": _nanmean(f1),
        "per_class_accuracy": _per_class(recall, class_names),
        "per_class_precision": _per_class(precision, class_names),
        "per_class_f1": _per_class(f1, class_names),
        "support": {name: int(s) for name, s in zip(class_names, support)},
    }
    if segmentation:
        iou = _safe(tp, support + predicted - tp)
        iou[support == 0] = np.nan
        out["miou"] = _nanmean(iou)
        out["per_class_iou"] = _per_class(iou, class_names)
    return out


def multilabel_counts(target: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """``[K, 4]`` int64 per-class (TP, FP, FN, TN) of multi-hot ``target`` vs ``pred`` ``[B, K]``."""
    t = np.asarray(target).astype(bool)
    p = np.asarray(pred).astype(bool)
    return np.stack([(t & p).sum(0), (~t & p).sum(0), (t & ~p).sum(0), (~t & ~p).sum(0)], axis=1).astype(np.int64)


def multilabel_metrics(counts: np.ndarray, class_names: Sequence[str], exact: int, samples: int) -> dict[str, Any]:
    """Multi-label figures from per-class (TP, FP, FN, TN) counts.

    OA is the label-wise accuracy over all (sample, class) pairs; AA the mean per-class recall; macro-F1
    and micro-F1 as usual; ``exact_match`` the fraction of samples whose whole label set was right.
    """
    c = np.asarray(counts, dtype=np.float64)
    tp, fp, fn, tn = c[:, 0], c[:, 1], c[:, 2], c[:, 3]
    recall = _safe(tp, tp + fn)
    f1 = _safe(2 * tp, 2 * tp + fp + fn)
    f1[(tp + fn) == 0] = np.nan
    acc = _safe(tp + tn, tp + fp + fn + tn)
    micro = float(2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum())) if (tp.sum() + fp.sum() + fn.sum()) else math.nan
    return {
        "samples": int(samples),
        "oa": float((tp + tn).sum() / c.sum()) if c.sum() else math.nan,
        "aa": _nanmean(recall),
        "macro_f1": _nanmean(f1),
        "micro_f1": micro,
        "exact_match": exact / samples if samples else math.nan,
        "per_class_accuracy": _per_class(acc, class_names),
        "per_class_recall": _per_class(recall, class_names),
        "per_class_f1": _per_class(f1, class_names),
        "support": {name: int(s) for name, s in zip(class_names, tp + fn)},
    }


def summarize(runs: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean and (sample) standard deviation over runs of every finite scalar figure they share.

    ``{"oa": {"mean": ..., "std": ..., "n": 3}, ...}``; std is 0 for a single run.
    """
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)] if runs else []
    out: dict[str, dict[str, float]] = {}
    for key in keys:
        vals = np.array([float(r[key]) for r in runs if isinstance(r.get(key), (int, float))])
        vals = vals[np.isfinite(vals)]
        if not vals.size:
            continue
        std = float(vals.std(ddof=1)) if vals.size > 1 else 0.0
        out[key] = {"mean": float(vals.mean()), "std": std, "n": int(vals.size)}
    return out
