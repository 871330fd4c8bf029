"""Pictures of a fine-tuning run: the confusion matrix and, per scene, predictions beside the labels."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def _pyplot():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def class_colors(k: int) -> list[tuple[int, int, int]]:
    """``k`` distinct 8-bit RGB colours, one per class: matplotlib's tab20, then evenly spaced hues beyond 20.

    The one palette of gfm: the run's pictures, an export's ``task.colors`` and the colour map of
    ``gfm predict``'s GeoTIFF all use it, so a class has one colour everywhere.
    """
    from matplotlib import colormaps
    from matplotlib.colors import hsv_to_rgb

    if k <= 20:
        cmap = colormaps["tab20"]
        return [tuple(int(round(255 * v)) for v in cmap(i)[:3]) for i in range(k)]  # type: ignore[misc]
    return [tuple(int(round(255 * v)) for v in hsv_to_rgb((i / k, 0.65, 0.9))) for i in range(k)]  # type: ignore[misc]


def _class_cmap(k: int):  # type: ignore[no-untyped-def]
    """:func:`class_colors` as a colour map, with light grey for 'nothing here' (-1 → index 0)."""
    from matplotlib.colors import ListedColormap

    base = np.array(class_colors(k), dtype=np.float64).reshape(-1, 3) / 255.0
    colours = np.vstack([[0.93, 0.93, 0.93], base])
    return ListedColormap(colours)


def confusion_png(confusion: np.ndarray, class_names: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Row-normalised confusion matrix (true rows, predicted columns) with counts when they fit."""
    plt = _pyplot()
    cm = np.asarray(confusion, dtype=np.float64)
    k = cm.shape[0]
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    size = max(4.0, 0.45 * k + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), labels=list(class_names), rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(k), labels=list(class_names), fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=6,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    ax.set_title(title or "confusion matrix", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def prediction_png(labels: np.ndarray, prediction: np.ndarray, split_map: np.ndarray | None,
                   class_names: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Labels, the split, the predictions and their errors of one scene side by side.

    Args:
        labels: ``[H, W]`` class per pixel, -1 where unlabelled.
        prediction: ``[H, W]`` predicted class where evaluated, -1 elsewhere.
        split_map: ``[H, W]`` 0 none, 1 train, 2 val, 3 test (where each sample's centre / tile lies), or None.
        class_names: names for the legend.
        path: the PNG to write.
        title: the figure title.
    """
    plt = _pyplot()
    from matplotlib.patches import Patch

    k = len(class_names)
    cmap = _class_cmap(k)
    panels: list[tuple[str, np.ndarray, object, int]] = [
        ("labels", labels + 1, cmap, k), ("prediction", prediction + 1, cmap, k)]
    evaluated = prediction >= 0
    scored = evaluated & (labels >= 0)
    errors = np.zeros(labels.shape, dtype=np.int64)
    errors[scored] = np.where(prediction[scored] == labels[scored], 1, 2)
    from matplotlib.colors import ListedColormap

    panels.append(("errors (green right, red wrong)", errors, ListedColormap(["#eeeeee", "#2ca02c", "#d62728"]), 2))
    if split_map is not None:
        panels.insert(1, ("split (blue train, orange val, purple test)", split_map,
                          ListedColormap(["#eeeeee", "#1f77b4", "#ff7f0e", "#9467bd"]), 3))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.6))
    for ax, (name, img, cm, vmax) in zip(np.atleast_1d(axes), panels):
        ax.imshow(img, cmap=cm, vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    acc = float((prediction[scored] == labels[scored]).mean()) if scored.any() else float("nan")
    handles = [Patch(color=cmap(i + 1), label=n) for i, n in enumerate(class_names)]
    fig.legend(handles=handles, loc="lower center", ncol=min(8, k), fontsize=7, frameon=False)
    fig.suptitle(f"{title}  (accuracy on the {int(scored.sum())} evaluated labelled pixels: {acc:.3f})", fontsize=10)
    fig.tight_layout(rect=(0, 0.08 + 0.02 * (k // 8), 1, 0.95))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
