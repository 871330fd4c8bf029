"""Dense predictors: a task model turned into per-pixel class probabilities for a batch of tiles.

- :class:`SegmentationPredictor`: a model whose ``logits(batch)`` are ``[B, K, H, W]`` (a segmentation
  task model); tiles overlap and blend.
- :class:`DensePixelPredictor`: a ``pixel``-task model whose encoder sees each pixel alone (the dense head
  with ``context: pixel``, ``per_pixel``): every pixel of a tile from one dense pass over the tile, read
  with a halo of ``smooth // 2`` pixels for the smoothing of class probabilities; no blending is needed.
- :class:`PixelPredictor`: a model that classifies the centre pixel of a ``window × window`` window
  (``logits(batch)`` ``[B, K]``, the ``pixel`` task of hyperspectral scenes): every pixel of a tile gets its
  own window, cut from the tile read with a halo of ``window // 2`` pixels; no blending is needed. The
  reference, and the path of pixel models whose encoder sees the whole window (``context: window``) or that
  predate the dense head (head ``centre``/``linear``).

:func:`make_predictor` picks one for a model. A dense head serves the band set it was trained on
(``TaskInfo.num_bands``); :func:`check_band_set` refuses another in one line (:class:`BandSetError`).

:func:`load_task_model` loads what ``gfm predict --model DIR [--adapter DIR]`` names: a merged export
(the task model is the export), an export with its adapter beside it, or an export plus a fine-tuning
run's adapter (LoRA through peft, or a linear probe's head; :func:`gfm.hub.task_model_from`), checking
that the adapter was trained on this base.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gfm.batch import Batch
from gfm.finetune.methods import unwrap
from gfm.hub import ADAPTER_DIR, FINETUNE_MANIFEST, HubError, InputBands, from_pretrained, model_location
from gfm.hub.model import apply_adapter

#: fine-tuning tasks that give a class per pixel
DENSE_TASKS = ("segmentation", "pixel")


@dataclass
class TaskInfo:
    """What a task model predicts.

    Attributes:
        task: ``segmentation`` or ``pixel``.
        num_classes: ``K``, the model's output classes.
        classes: class names, one per output class index.
        label_values: the label value each class index stands for in the training labels.
        window: pixel task: the window side.
        colors: ``(r, g, b)`` per class, when the export carries them.
        source: where the task came from (for messages and the output's metadata).
        num_bands: the band count the model serves: a dense head's, the bands it was trained on (its
            pixel path reads them by position); 0 = any band set.
        bands: ``"sensor/band"`` names of those bands when the export's band table says which (it lists
            exactly ``num_bands``), else empty.
    """

    task: str
    num_classes: int
    classes: list[str]
    label_values: list[int] = field(default_factory=list)
    window: int = 0
    colors: list[tuple[int, int, int]] | None = None
    source: str = ""
    num_bands: int = 0
    bands: list[str] = field(default_factory=list)


class SegmentationPredictor:
    """``[B, K, H, W]`` class probabilities from a model with ``logits(batch) -> [B, K, H, W]``."""

    halo = 0

    def __init__(self, model: nn.Module, info: TaskInfo) -> None:
        self.model = model
        self.info = info

    @torch.no_grad()
    def __call__(self, batch: Batch) -> torch.Tensor:
        """Probabilities ``[B, K, H, W]`` for the batch's tiles."""
        logits = self.model.logits(batch)  # type: ignore[operator]
        return F.softmax(logits.float(), dim=1)


class PixelPredictor:
    """``[B, K, T, T]`` class probabilities from a centre-pixel classifier, one window per pixel.

    The tiles come with a halo of ``window // 2`` pixels; pixel ``(i, j)`` of a tile is classified from
    the window centred on it. Windows whose centre is invalid are not computed (probabilities 0).

    Args:
        model: ``logits(batch) -> [B, K]`` for ``window × window`` inputs.
        info: the task (``window`` is used).
        batch_size: windows per forward.
    """

    def __init__(self, model: nn.Module, info: TaskInfo, batch_size: int = 256) -> None:
        self.model = model
        self.info = info
        self.window = int(info.window)
        self.halo = self.window // 2
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, batch: Batch) -> torch.Tensor:
        """Probabilities ``[B, K, H - 2·halo, W - 2·halo]`` for tiles read with the halo."""
        w, r = self.window, self.halo
        B, C, H, W = batch.pixels.shape
        h, wd = H - 2 * r, W - 2 * r
        out = torch.zeros(B, self.info.num_classes, h, wd)
        for b in range(B):
            # [C, H, W] -> [C, h, wd, w, w] -> [h·wd, C, w, w]: every pixel's window
            px = batch.pixels[b].unfold(1, w, 1).unfold(2, w, 1)[:, :h, :wd].permute(1, 2, 0, 3, 4)
            ok = batch.valid[b].unfold(1, w, 1).unfold(2, w, 1)[:, :h, :wd].permute(1, 2, 0, 3, 4)
            px, ok = px.reshape(h * wd, C, w, w), ok.reshape(h * wd, C, w, w)
            centre = ok[:, :, r, r].any(dim=1)  # [h·wd]
            todo = torch.nonzero(centre).flatten()
            probs = torch.zeros(h * wd, self.info.num_classes)
            for start in range(0, len(todo), self.batch_size):
                idx = todo[start: start + self.batch_size]
                windows = _repeat(batch, b, len(idx), px[idx].contiguous(), ok[idx].contiguous())
                probs[idx] = F.softmax(self.model.logits(windows).float(), dim=1)  # type: ignore[operator]
            out[b] = probs.T.reshape(-1, h, wd)
        return out


class DensePixelPredictor:
    """``[B, K, T, T]`` class probabilities of a per-pixel model: every pixel of a tile in one dense pass.

    For a ``pixel``-task model whose encoder sees each pixel alone (``per_pixel``), a pixel's logits depend
    on its own bands and its tile's descriptors only, and its class probabilities are the softmax averaged
    over the valid pixels of the ``smooth × smooth`` neighbourhood around it. So a tile read with a halo of
    ``smooth // 2`` pixels is predicted by one pass over its pixels that have a valid band (in batches of
    ``batch_size`` pixels, which bounds memory), one smoothing over the tile, and cropping the halo: the
    probabilities window-by-window prediction (:class:`PixelPredictor`) gives, and fine-tuning's
    evaluation (``gfm.finetune.evaluate``) scores, with each pixel computed once instead of once per pixel
    of every window that holds it (``window²`` times). Pixels with no valid band neither vote nor get a
    class (probabilities 0). A ``smooth`` wider than the training window reaches past the window here
    (as in the evaluation); window by window, it would stop at the window's edge.

    Args:
        model: a task model with a dense, per-pixel head (or one wrapped by peft).
        info: the task.
        batch_size: pixels per forward.
    """

    def __init__(self, model: nn.Module, info: TaskInfo, batch_size: int = 512) -> None:
        self.model = model
        self.task_model = unwrap(model)  # peft's adapters are injected in place: they still run
        if not getattr(self.task_model, "per_pixel", False):
            raise HubError(f"{info.source}: DensePixelPredictor needs a per-pixel dense head (head.context: pixel)")
        self.info = info
        self.smooth = int(self.task_model.smooth)
        self.halo = self.smooth // 2
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, batch: Batch) -> torch.Tensor:
        """Probabilities ``[B, K, H - 2·halo, W - 2·halo]`` for tiles read with the halo."""
        r = self.halo
        H, W = batch.pixels.shape[-2:]
        prob: torch.Tensor = self.task_model.dense_probabilities(batch, self.batch_size)
        return prob[:, :, r: H - r, r: W - r]


def _repeat(batch: Batch, b: int, n: int, pixels: torch.Tensor, valid: torch.Tensor) -> Batch:
    """A batch of ``n`` windows that share sample ``b``'s descriptors."""
    per_sample: dict[str, Any] = {}
    for name, t in batch.tensors().items():
        if name in ("pixels", "valid", "label"):
            continue
        per_sample[name] = t[b: b + 1].expand(n, *t.shape[1:]).contiguous()
    return replace(batch, pixels=pixels, valid=valid, keys=[], label=None, **per_sample)


Predictor = SegmentationPredictor | DensePixelPredictor | PixelPredictor


def make_predictor(model: nn.Module, info: TaskInfo, batch_size: int = 256, pixel_batch: int = 512) -> Predictor:
    """The predictor for ``info.task`` and the model's head.

    Segmentation: :class:`SegmentationPredictor`. Pixel task: :class:`DensePixelPredictor` when the encoder
    sees each pixel alone (a dense head with ``context: pixel``, ``per_pixel``), else window by window
    (:class:`PixelPredictor`).

    Args:
        model: the task model (or one wrapped by peft).
        info: the task.
        batch_size: windows per forward (:class:`PixelPredictor`).
        pixel_batch: pixels per forward (:class:`DensePixelPredictor`).
    """
    if info.task == "segmentation":
        return SegmentationPredictor(model, info)
    if info.task == "pixel":
        if getattr(unwrap(model), "per_pixel", False):
            return DensePixelPredictor(model, info, pixel_batch)
        return PixelPredictor(model, info, batch_size)
    raise HubError(f"{info.source}: task {info.task!r} gives one class per tile, not a map; gfm predict needs a "
                   f"{' or '.join(DENSE_TASKS)} model")


def _listed(keys: Sequence[str], most: int = 6) -> str:
    """``a, b, c`` or, for long lists, ``a, b, c, ..., z``."""
    shown = list(keys) if len(keys) <= most else [*keys[: most - 2], "...", keys[-1]]
    return ", ".join(shown)


class BandSetError(HubError):
    """The scene's bands are not the band set a dense head was trained on.

    Attributes:
        where: the scene (message prefix).
        num_bands: the model's band count.
        model_bands: their names, when the export says which.
        scene_bands: the scene's bands (after dropping those without statistics).
    """

    def __init__(self, where: str, num_bands: int, model_bands: Sequence[str], scene_bands: Sequence[str]) -> None:
        self.where = where
        self.num_bands = num_bands
        self.model_bands = list(model_bands)
        self.scene_bands = list(scene_bands)
        super().__init__(self.render("choose them with SceneFiles(bands=...) and the files, or leave bands without "
                                     "statistics out with unknown='drop' (instead of stats= for them)"))

    def render(self, fix: str) -> str:
        """The one-line message with ``fix`` (how to choose the bands, in the caller's terms) at its end."""
        names = f" (the export's band table: {_listed(self.model_bands)})" if self.model_bands else ""
        return (f"{self.where}the model's dense head serves the {self.num_bands} band(s) it was trained on{names}; "
                f"the scene gives {len(self.scene_bands)} ({_listed(self.scene_bands)}); {fix}")


def check_band_set(info: TaskInfo, bands: InputBands, where: str = "") -> None:
    """Refuse a scene that does not give the model ``info.num_bands`` bands (0 accepts any band set).

    Only the count is checked: the export's band table is the pretraining data's, which names a dense
    head's bands only when it lists exactly that many, and then only as a likely answer (a fine-tune may
    have used other bands of the same count), so the names go into the message, not into the rule.

    Raises:
        BandSetError: the scene gives another number of bands.
    """
    if info.num_bands and len(bands.keys) != info.num_bands:
        raise BandSetError(where, info.num_bands, info.bands, bands.keys)


# ------------------------------------------------------------------------------------------------
# Loading


def _task_info(doc: dict[str, Any], source: str, model: nn.Module, config: dict[str, Any]) -> TaskInfo:
    """What ``doc`` (``finetune.json`` or an export's ``task``) says ``model`` predicts.

    A dense head serves the ``num_bands`` it was trained on; they are named when the export's band table
    (``config["bands"]``, the pretraining data's) lists exactly that many.
    """
    colors = doc.get("colors")
    classes = [str(c) for c in doc.get("class_names") or doc.get("classes") or []]
    fixed = bool(getattr(unwrap(model), "dense", False))
    num_bands = int(doc.get("num_bands") or 0) if fixed else 0
    table = list(config.get("bands") or {})
    return TaskInfo(
        task=str(doc["task"]),
        num_classes=int(doc.get("num_classes") or len(classes)),
        classes=classes,
        label_values=[int(v) for v in doc.get("label_values") or []],
        window=int(doc.get("window") or 0),
        colors=[tuple(c) for c in colors] if colors else None,  # type: ignore[misc]
        source=source,
        num_bands=num_bands,
        bands=table if num_bands and len(table) == num_bands else [],
    )


@dataclass
class LoadedTask:
    """A task model, what it predicts, and the export's ``config.json`` (statistics, band table, inputs)."""

    model: nn.Module
    info: TaskInfo
    config: dict[str, Any]


def load_task_model(model_dir: str | Path, adapter: str | Path | None = None) -> LoadedTask:
    """A task model and what it predicts, from an export (merged, or with an adapter) and an optional adapter.

    Raises:
        HubError: the export has no task and no adapter was given (a pretraining-only model predicts no
            classes), or the adapter does not fit.
    """
    where = model_location(model_dir)  # a Hub id or short name: its local folder, where adapter/ lies
    base = from_pretrained(where)
    task, pretraining_config = base.config.get("task"), base.config
    if adapter is None and task and task.get("merged"):
        return LoadedTask(base.net, _task_info(task, str(model_dir), base.net, base.config), base.config)
    if adapter is None and (where / ADAPTER_DIR / FINETUNE_MANIFEST).is_file():
        adapter = where / ADAPTER_DIR
    if adapter is None:
        raise HubError(f"{model_dir}: a pretraining export has no task head, so it predicts no classes; pass a "
                       "fine-tuning run's adapter (adapter=DIR), or export the fine-tuned model with it")
    doc = apply_adapter(base, where, adapter)  # an adapter/ swapped in from another run is refused
    info = _task_info(doc, str(adapter), base.net, pretraining_config)
    if task and task.get("colors"):
        info.colors = [tuple(c) for c in task["colors"]]  # type: ignore[misc]
    return LoadedTask(base.net, info, base.config)


def class_table(info: TaskInfo) -> dict[str, str]:
    """GeoTIFF metadata tags that describe the classes (JSON lists)."""
    return {
        "CLASS_NAMES": json.dumps(info.classes),
        "CLASS_VALUES": json.dumps(info.label_values),
        "TASK": info.task,
    }


def classes_or_default(info: TaskInfo, k: int) -> Sequence[str]:
    """Class names, or ``class_<i>`` when the task did not name them."""
    return info.classes if len(info.classes) == k else [f"class_{i}" for i in range(k)]
