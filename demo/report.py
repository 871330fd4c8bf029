"""The demo's checks, pictures and ``REPORT.md``: what ran, the figures, the timings and the pictures."""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Step:
    """One program the demo ran."""

    n: int
    title: str
    command: str
    log: Path
    seconds: float = 0.0
    skipped: bool = False


@dataclass
class PredictionCheck:
    """The whole-scene prediction read back and scored on the fine-tuning run's held-out pixels.

    Attributes:
        test_pixels: held-out labelled pixels inside the predicted area, scored.
        oa: overall accuracy of the predicted map on them.
        finetune_oa: the fine-tuning run's own test accuracy (same pixels, same model, before export).
        crs, shape, nodata: the GeoTIFF as rasterio reads it.
    """

    test_pixels: int
    oa: float
    finetune_oa: float
    crs: str
    shape: tuple[int, int]
    nodata: float | None

    @property
    def summary(self) -> str:
        """One line for the terminal."""
        return (f"prediction.tif ({self.shape[0]} x {self.shape[1]}, nodata {self.nodata}): OA {100 * self.oa:.2f}% on "
                f"the {self.test_pixels} held-out labelled pixels it covers; the fine-tuning run measured "
                f"{100 * self.finetune_oa:.2f}% on all its held-out pixels before export")


def _test_pixels(split_json: Path) -> list[tuple[int, int]]:
    """(row, col) of the test samples of a per-pixel split (ids ``scene:row:col``)."""
    doc = json.loads(split_json.read_text())
    out = []
    for sid in doc.get("test", []):
        _, r, c = str(sid).rsplit(":", 2)
        out.append((int(r), int(c)))
    return out


def check_prediction(pred: Path, gt: Path, split_json: Path, finetune_metrics: dict[str, Any]) -> PredictionCheck:
    """Score the predicted class map on the held-out pixels of the LoRA run's split."""
    import rasterio

    manifest = json.loads((split_json.parent / "finetune.json").read_text())
    values = np.asarray(manifest["label_values"])  # class index -> label value
    with rasterio.open(pred) as src:
        classes = src.read(1)
        crs, shape, nodata = str(src.crs), (src.height, src.width), src.nodata
    labels = np.load(gt)
    # the map covers the scene's top-left corner (``--region 0 0 N N``) or all of it
    pixels = [(r, c) for r, c in _test_pixels(split_json) if r < shape[0] and c < shape[1]]
    rows = np.array([r for r, _ in pixels], dtype=np.int64)
    cols = np.array([c for _, c in pixels], dtype=np.int64)
    got = classes[rows, cols]
    ok = (got != nodata) & (values[np.minimum(got, len(values) - 1)] == labels[rows, cols])
    return PredictionCheck(
        test_pixels=len(pixels), oa=float(ok.mean()) if len(pixels) else float("nan"),
        finetune_oa=float(finetune_metrics.get("test", {}).get("oa", float("nan"))),
        crs=crs, shape=shape, nodata=nodata,
    )


def prediction_png(pred: Path, gt: Path, out: Path) -> Path:
    """The predicted map beside the ground truth, both in the GeoTIFF's colour map (one colour per class)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import rasterio
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    with rasterio.open(pred) as src:
        classes = src.read(1)
        nodata = src.nodata
        tags = src.tags()
        try:
            cmap = src.colormap(1)
        except ValueError:
            cmap = {}
    values = [int(v) for v in json.loads(tags.get("CLASS_VALUES", "[]"))]  # class index -> label value
    names = [str(n) for n in json.loads(tags.get("CLASS_NAMES", "[]"))]
    predicted = classes[classes != nodata]
    k = max(len(values), int(predicted.max()) + 1 if predicted.size else 1)
    colours = [tuple(c / 255 for c in cmap.get(i, (128, 128, 128, 255))[:3]) for i in range(k)]
    labels = np.load(gt)[: classes.shape[0], : classes.shape[1]]
    truth = np.full(labels.shape, -1, dtype=np.int64)  # label values -> the class indices the map holds
    for index, value in enumerate(values):
        truth[labels == value] = index
    fig, axes = plt.subplots(1, 2, figsize=(9, 5.6))
    style = {"cmap": ListedColormap(colours), "vmin": -0.5, "vmax": k - 0.5, "interpolation": "nearest"}
    axes[0].imshow(np.ma.masked_less(truth, 0), **style)
    axes[0].set_title("ground truth (labelled pixels)")
    axes[1].imshow(np.ma.masked_equal(classes, nodata), **style)
    axes[1].set_title("gfm predict: whole scene (export + LoRA)")
    for ax in axes:
        ax.set_axis_off()
    if names:
        fig.legend(handles=[Patch(color=colours[i], label=n) for i, n in enumerate(names[:k])], loc="lower center",
                   ncol=4, fontsize=7, frameon=False)
        fig.tight_layout(rect=(0, 0.14, 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


#: the demo's fine-tuning rows, as the report names them
LABELS = {"lora": "gfm-tiny (pretrained) + LoRA", "scratch_lora": "random weights + LoRA (same steps)",
          "random_forest": "random forest on the bands (classic)"}


def _fmt(v: Any, pct: bool = True) -> str:
    if isinstance(v, (int, float)) and v == v:
        return f"{100 * v:.2f}" if pct else f"{v:,}"
    return "–"


def write_report(out: Path, steps: list[Step], *, pretrain_dir: Path, finetune_runs: dict[str, Path],
                 export_dir: Path, prediction: Path, prediction_check: PredictionCheck, prediction_picture: Path,
                 embeddings: Path, total_seconds: float) -> Path:
    """Write ``OUT/REPORT.md`` from what the runs left on disk."""
    rel = lambda p: str(Path(p).relative_to(out)) if Path(p).is_relative_to(out) else str(p)  # noqa: E731
    lines = ["# gfm demo report", "",
             f"AVIRIS Indian Pines (tensorly), {platform.machine()} CPU, {total_seconds / 60:.1f} min for this run "
             "(steps done by an earlier run are marked skipped).", "", "## What ran", "",
             "| step | command | time |", "|---|---|---|"]
    for s in steps:
        lines.append(f"| {s.n}. {s.title} | `{s.command}` | {'skipped' if s.skipped else f'{s.seconds:.0f} s'} |")

    rows = [json.loads(x) for x in (pretrain_dir / "metrics.jsonl").read_text().splitlines() if x.strip()] \
        if (pretrain_dir / "metrics.jsonl").exists() else []
    losses = [r["loss"] for r in rows if "loss" in r]
    lines += ["", "## Pretraining", ""]
    if losses:
        lines.append(f"HyperMAE loss {losses[0]:.3f} → {losses[-1]:.3f} over {len(losses)} logged steps "
                     f"(`{rel(pretrain_dir)}/metrics.jsonl`).")
    for pic in [pretrain_dir / "loss_curve.png", *sorted(pretrain_dir.rglob("images/*.png"))[-1:]]:
        if pic.exists():
            lines += ["", f"![{pic.stem}]({rel(pic)})"]

    lines += ["", "## Fine-tuning: per-pixel classification, spatially disjoint split, 5 % of the labels", "",
              "| encoder + method | OA % | AA % | kappa % | macro-F1 % | trainable params | total params | train s |",
              "|---|---|---|---|---|---|---|---|"]
    for name, run in finetune_runs.items():
        m = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").exists() else {}
        t, c = m.get("test", {}), m.get("parameters", {})
        label = LABELS.get(name, name)
        lines.append(f"| {label} | {_fmt(t.get('oa'))} | {_fmt(t.get('aa'))} | {_fmt(t.get('kappa'))} | "
                     f"{_fmt(t.get('macro_f1'))} | {_fmt(c.get('trainable'), False)} | {_fmt(c.get('total'), False)} | "
                     f"{m.get('train_seconds', m.get('seconds', 0)):.0f} |")
    split = json.loads((finetune_runs["lora"] / "split.json").read_text()) if \
        (finetune_runs["lora"] / "split.json").exists() else {}
    if split.get("report"):
        rep = split["report"]
        lines += ["", "Split: " + ", ".join(f"{k} {v}" for k, v in rep.items() if not isinstance(v, (dict, list)))]
    for name, run in finetune_runs.items():
        for pic in sorted(run.glob("*.png")):
            lines += ["", f"![{name}: {pic.stem}]({rel(pic)})"]

    lines += ["", "## Export, reload and use", "",
              f"- Export: `{rel(export_dir)}` (config.json, model.safetensors, model card README.md, adapter/).",
              f"- Reloaded with strict keys in a fresh process by `gfm predict`: `{rel(prediction)}` "
              f"({prediction_check.shape[0]} x {prediction_check.shape[1]}, CRS {prediction_check.crs}).",
              f"- {prediction_check.summary}.",
              f"- Embeddings: `{rel(embeddings)}` (GeoParquet, one row per tile).",
              "", f"![prediction map]({rel(prediction_picture)})"]
    if (out / "band_stats.png").exists():
        lines += ["", "## Shards", "", "![band statistics](band_stats.png)"]
    path = out / "REPORT.md"
    path.write_text("\n".join(lines) + "\n")
    return path
