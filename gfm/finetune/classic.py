"""Classic baselines (scikit-learn): random forest, SVM and k-nearest neighbours on the run's own samples.

``method.name: random_forest | svm | knn`` run through the same program as the network methods, so a
baseline row is like for like: the same :class:`~gfm.finetune.data.TaskData` (same windows or tiles,
normalised by ``TaskData.batch`` exactly as the network sees them, invalid pixels 0), the same split, and
the same scoring (:func:`gfm.finetune.evaluate.score`). What differs is only the model, fitted here on
features of the training samples:

=============  ===========================================  =============================================
task           ``features: centre`` (default)               ``features: window``
=============  ===========================================  =============================================
pixel          the centre pixel's values ``[C]``            the whole window flattened ``[C · w · w]``
scene,         per band, the mean of the tile's valid       the whole tile flattened ``[C · H · W]``
multilabel     pixels ``[C]``
segmentation   every labelled pixel is a sample: its        (not defined: the config refuses it)
               values ``[C]``; training pixels subsampled
               to ``max_train_pixels`` with the run's seed
=============  ===========================================  =============================================

``C`` counts observations (band × date), as the network's input does. The SVM and kNN standardise each
feature with the training set's mean and std (``StandardScaler`` in a ``Pipeline``); the forest needs no
scaling. Multi-label: the forest and kNN fit every class column at once (scikit-learn's multi-output
support), the SVM one binary SVM per class (``MultiOutputClassifier``); a class column constant over the
training set (or a single training class) is predicted as that constant, since no classifier can be fit
to one value.

scikit-learn is an optional dependency (``pip install 'gfm[baselines]'``), imported only here and only
when a classic method runs. The fitted model is never written: a scikit-learn model is saved as a pickle,
which is executable code, and gfm neither writes nor reads pickles. A classic run leaves its figures,
pictures and ``finetune.json``, and is for comparison only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from gfm.config import ConfigError

if TYPE_CHECKING:  # the registry imports this module; the data only travels through it
    from gfm.finetune.data import TaskData
    from gfm.finetune.methods import ClassicMethod

INSTALL_HINT = "pip install 'gfm[baselines]'"
#: segmentation: pixels predicted per call (whole tiles), so memory stays bounded whatever the tile size
PREDICT_PIXELS = 1 << 20


class ClassicError(ValueError):
    """A classic baseline cannot run as asked (scikit-learn missing, too many samples for the method...)."""


@dataclass
class ClassicConfig:
    """Settings of the classic baselines (``method.name: random_forest | svm | knn``).

    Attributes:
        features: ``centre`` (pixel task: the centre pixel's values; scene tasks: per-band mean of the
            valid pixels) or ``window`` (the whole window / tile flattened). Segmentation: each labelled
            pixel's values, ``centre`` only.
        trees: random forest: number of trees.
        max_depth: random forest: the deepest a tree may grow (0 = no limit).
        svm_c: SVM: the RBF SVM's regularisation ``C``.
        svm_gamma: SVM: the RBF kernel's ``gamma``: ``scale``, ``auto`` or a number > 0.
        knn_k: kNN: neighbours that vote.
        max_train_pixels: segmentation: training pixels at most (a seeded uniform subsample beyond).
        n_jobs: worker processes of the forest and kNN (-1 = every core).
    """

    features: Literal["centre", "window"] = "centre"
    trees: int = 500
    max_depth: int = 0
    svm_c: float = 100.0
    svm_gamma: float | str = "scale"
    knn_k: int = 5
    max_train_pixels: int = 200_000
    n_jobs: int = 2

    def validate(self) -> None:
        """Check values; raises :class:`ConfigError` naming the field."""
        if self.trees < 1:
            raise ConfigError(f"trees: must be >= 1, got {self.trees}")
        if self.max_depth < 0:
            raise ConfigError(f"max_depth: must be >= 0 (0 = no limit), got {self.max_depth}")
        if not self.svm_c > 0:
            raise ConfigError(f"svm_c: must be > 0, got {self.svm_c}")
        if isinstance(self.svm_gamma, str) and self.svm_gamma not in ("scale", "auto"):
            raise ConfigError(f"svm_gamma: 'scale', 'auto' or a number > 0, got {self.svm_gamma!r}")
        if not isinstance(self.svm_gamma, str) and not self.svm_gamma > 0:
            raise ConfigError(f"svm_gamma: must be > 0, got {self.svm_gamma}")
        if self.knn_k < 1:
            raise ConfigError(f"knn_k: must be >= 1, got {self.knn_k}")
        if self.max_train_pixels < 1:
            raise ConfigError(f"max_train_pixels: must be >= 1, got {self.max_train_pixels}")
        if self.n_jobs < 1 and self.n_jobs != -1:
            raise ConfigError(f"n_jobs: must be >= 1 or -1 (every core), got {self.n_jobs}")


def require_sklearn(method: str) -> None:
    """Raise :class:`ClassicError` (one line with the install hint) when scikit-learn cannot be imported."""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise ClassicError(f"method {method} needs scikit-learn, which is not installed: {INSTALL_HINT}") from None


# ------------------------------------------------------------------------------------------------
# The estimators (one builder per registered classic method)


def random_forest(cfg: ClassicConfig, seed: int, multilabel: bool, samples: int) -> Any:
    """``RandomForestClassifier`` (multi-output natively for multi-label)."""
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(n_estimators=cfg.trees, max_depth=cfg.max_depth or None, n_jobs=cfg.n_jobs,
                                  random_state=seed)


def svm(cfg: ClassicConfig, seed: int, multilabel: bool, samples: int) -> Any:
    """Standardised features into an RBF ``SVC`` (one per class for multi-label)."""
    from sklearn.multioutput import MultiOutputClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    one = SVC(C=cfg.svm_c, gamma=cfg.svm_gamma, random_state=seed)
    return Pipeline([("scale", StandardScaler()), ("svm", MultiOutputClassifier(one) if multilabel else one)])


def knn(cfg: ClassicConfig, seed: int, multilabel: bool, samples: int) -> Any:
    """Standardised features into ``KNeighborsClassifier`` (multi-output natively for multi-label)."""
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    if cfg.knn_k > samples:
        raise ClassicError(f"method.classic.knn_k: {cfg.knn_k} neighbours, but the training split has only "
                           f"{samples} sample(s); lower knn_k")
    return Pipeline([("scale", StandardScaler()), ("knn", KNeighborsClassifier(n_neighbors=cfg.knn_k,
                                                                               n_jobs=cfg.n_jobs))])


def fitted_size(model: Any) -> dict[str, int]:
    """What a fitted estimator holds: trees and nodes, support vectors, or stored training samples."""
    from sklearn.multioutput import MultiOutputClassifier
    from sklearn.pipeline import Pipeline

    final = model[-1] if isinstance(model, Pipeline) else model
    parts = final.estimators_ if isinstance(final, MultiOutputClassifier) else [final]
    out: dict[str, int] = {}
    for part in parts:
        if hasattr(part, "n_support_"):
            out["support_vectors"] = out.get("support_vectors", 0) + int(part.n_support_.sum())
        elif hasattr(part, "n_samples_fit_"):
            out["stored_samples"] = out.get("stored_samples", 0) + int(part.n_samples_fit_)
        elif hasattr(part, "estimators_"):
            out["trees"] = out.get("trees", 0) + len(part.estimators_)
            out["nodes"] = out.get("nodes", 0) + sum(int(t.tree_.node_count) for t in part.estimators_)
    return out


# ------------------------------------------------------------------------------------------------
# Features


def sample_features(data: TaskData, indices: Sequence[int] | np.ndarray, features: str,
                    batch_size: int) -> np.ndarray:
    """``[n, D]`` float32 features of pixel / scene / multi-label samples ``indices`` (see the module table)."""
    parts: list[np.ndarray] = []
    for start in range(0, len(indices), batch_size):
        b = data.batch(list(indices[start : start + batch_size]))
        x = b.pixels  # [B, C, H, W], normalised, invalid pixels 0
        if features == "window":
            f = x.flatten(1)
        elif data.task == "pixel":
            f = x[:, :, x.shape[2] // 2, x.shape[3] // 2]  # the window is odd: the labelled pixel
        else:
            f = x.sum((2, 3)) / b.valid.sum((2, 3)).clamp(min=1)  # per-band mean of the valid pixels
        parts.append(f.float().numpy())
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def labelled_counts(data: TaskData, tiles: Sequence[int] | np.ndarray) -> np.ndarray:
    """Labelled pixels of each segmentation tile in ``tiles``."""
    return np.array([int((data.label_maps[int(data.targets[i])] >= 0).sum()) for i in tiles], dtype=np.int64)


def labelled_pixels(data: TaskData, tiles: Sequence[int] | np.ndarray, limit: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``([n, C], [n])``: the values and classes of the tiles' labelled pixels, at most ``limit`` of them.

    Beyond ``limit`` a uniform subsample (without replacement, drawn from ``rng``) over all the tiles'
    labelled pixels, gathered tile by tile so only the kept pixels are ever copied.
    """
    counts = labelled_counts(data, tiles)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    total = int(offsets[-1])
    keep = np.sort(rng.choice(total, limit, replace=False)) if total > limit else np.arange(total)
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    for j, i in enumerate(tiles):
        mine = keep[(keep >= offsets[j]) & (keep < offsets[j + 1])] - offsets[j]  # ranks among its labelled pixels
        if not len(mine):
            continue
        b = data.batch([int(i)])
        assert b.label is not None  # task samples always carry their target
        label = b.label[0].reshape(-1)  # [H·W]
        where = torch.nonzero(label >= 0).squeeze(1)[torch.from_numpy(mine)]
        xs.append(b.pixels[0].flatten(1)[:, where].T.float().numpy())  # [n_tile, C]
        ys.append(label[where].numpy())
    if not xs:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return np.concatenate(xs), np.concatenate(ys)


# ------------------------------------------------------------------------------------------------
# Fit and predict


@dataclass
class Fitted:
    """A fitted baseline, in memory only (never written: see the module docstring).

    Attributes:
        model: the scikit-learn estimator, or None when every target column is constant.
        samples: training samples (segmentation: training pixels after the subsample).
        features: values per sample ``D``.
        constant: per target column, the value it had throughout training, or -1 where it varied (those
            columns went to ``model``); single-label targets are one column.
        multilabel: whether targets are multi-hot ``[n, K]``.
    """

    model: Any
    samples: int
    features: int
    constant: np.ndarray
    multilabel: bool

    def predict(self, x: np.ndarray) -> np.ndarray:
        """``[n]`` classes or ``[n, K]`` multi-hot of features ``x`` ``[n, D]``."""
        out = np.repeat(self.constant[None], len(x), axis=0).astype(np.int64)  # [n, columns]
        varying = self.constant < 0
        if self.model is not None and len(x):
            out[:, varying] = np.asarray(self.model.predict(x)).reshape(len(x), -1)
        return out if self.multilabel else out[:, 0]

    def size(self) -> dict[str, int]:
        """What the fitted model holds (:func:`fitted_size`)."""
        return fitted_size(self.model) if self.model is not None else {}


def fit(method: ClassicMethod, cfg: ClassicConfig, data: TaskData, train: np.ndarray, seed: int,
        batch_size: int) -> Fitted:
    """Fit ``method``'s estimator on the training samples ``train``.

    Raises:
        ClassicError: scikit-learn missing; more training pixels than the method allows (the SVM on
            segmentation); more kNN neighbours than training samples.
    """
    require_sklearn(method.name)
    if data.task == "segmentation":
        pixels = min(int(labelled_counts(data, train).sum()), cfg.max_train_pixels)
        if method.max_segmentation_pixels and pixels > method.max_segmentation_pixels:
            raise ClassicError(
                f"method {method.name} on task segmentation: {pixels:,} training pixels exceed its limit of "
                f"{method.max_segmentation_pixels:,} ({method.limit_reason}); use method.name=random_forest, "
                f"or lower method.classic.max_train_pixels to {method.max_segmentation_pixels}")
        x, y = labelled_pixels(data, train, cfg.max_train_pixels, np.random.default_rng(seed))
    else:
        x, y = sample_features(data, train, cfg.features, batch_size), data.targets[train]
    if not len(x):
        raise ClassicError(f"method {method.name}: the training split holds no sample to fit on")
    y = np.asarray(y).astype(np.int64).reshape(len(x), -1)  # [n, columns]
    constant = np.where(y.min(0) == y.max(0), y[0], -1)
    varying = constant < 0
    model = None
    if varying.any():
        target = y[:, varying] if data.multilabel else y[:, 0]
        model = method.build(cfg, seed, data.multilabel, len(x))
        model.fit(x, target)
    return Fitted(model, len(x), int(x.shape[1]), constant, data.multilabel)


def predict(fitted: Fitted, data: TaskData, indices: np.ndarray, features: str,
            batch_size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """``(targets, predictions)`` of samples ``indices``, shaped as :func:`gfm.finetune.evaluate.predict`'s.

    Segmentation: every pixel of each tile is predicted (``[H, W]`` per tile) and the targets are every
    pixel's class concatenated (-1 unlabelled, left out by the scoring).
    """
    if data.task != "segmentation":
        x = sample_features(data, indices, features, batch_size)
        return np.asarray(data.targets[indices]), [fitted.predict(x)]
    targets: list[np.ndarray] = []
    preds: list[np.ndarray] = []
    if not len(indices):
        return np.zeros(0, np.int64), preds
    first = int(indices[0])
    per_call = max(1, PREDICT_PIXELS // int(data.windows.height[first] * data.windows.width[first]))
    for start in range(0, len(indices), per_call):
        b = data.batch(list(indices[start : start + per_call]))
        assert b.label is not None  # task samples always carry their target
        n, c, h, w = b.pixels.shape
        x = b.pixels.permute(0, 2, 3, 1).reshape(n * h * w, c).float().numpy()  # [B·H·W, C]
        preds.extend(list(fitted.predict(x).reshape(n, h, w)))
        targets.append(b.label.reshape(-1).numpy())
    return np.concatenate(targets), preds
