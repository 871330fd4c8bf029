"""The methods of ``gfm finetune``, registered once in :data:`METHODS` under their ``method.name``.

How the encoder adapts: ``lora`` (peft), ``linear_probe``, ``full`` (layer-wise lr decay), ``scratch``;
and the classic baselines that replace it: ``random_forest``, ``svm``, ``knn`` (scikit-learn,
:mod:`gfm.finetune.classic`). One program runs them all, so comparisons are like for like: same data,
split, evaluation (and for the networks the same head and schedule); only what is fitted differs.

- ``lora``: peft LoRA adapters on the modules named by :attr:`LoraConfig.targets`, the base frozen,
  the task head trained in full (peft's ``modules_to_save``, so it is saved with the adapter).
- ``linear_probe``: the encoder frozen, only the head trains.
- ``full``: everything trains; block ``i`` of ``L`` gets lr × ``layer_decay^(L + 1 − (i + 1))``,
  the embeddings ``layer_decay^(L + 1)``, the final norm and head the full lr (as in MAE fine-tuning).
- ``scratch``: ``full`` from random weights (the encoder's architecture still comes from
  ``encoder.weights`` when given, so the comparison is with the same model).
- ``random_forest``, ``svm``, ``knn``: no encoder; a scikit-learn model on the samples' pixel values.

Each is a :class:`Method` (:class:`LoraMethod`, :class:`ClassicMethod`) that knows what it trains, what
its run saves and how it prepares the model; code elsewhere asks the registry (:func:`get_method`) and
never compares a method's name.

LoRA targets are regexes that peft matches against each module's *full* name with ``re.fullmatch``.
They are written here per group over the encoder's module names (``encoder.blocks.3.attn.proj``...),
anchored on ``encoder.`` so the head is never wrapped (peft's ``"all-linear"`` would wrap it).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from gfm.config import ConfigError, to_dict
from gfm.finetune import classic
from gfm.finetune.classic import ClassicConfig
from gfm.train.optim import NonFiniteSkippingAdamW, OptimConfig

#: LoRA target groups: a regex per group over the encoder's module names (relative to the encoder).
TARGET_GROUPS: dict[str, str] = {
    # both attention branches (LESS: spectral + spatial qkv and the output projection; dense: qkv, proj)
    "attention": r"blocks\.\d+\.attn\.(?:spectral\.qkv|spatial\.qkv|attn\.qkv|proj)",
    # the summary pools that fold the grid into spectral and spatial tokens
    "pools": r"blocks\.\d+\.attn\.pool\.(?:kv|q_spectral|q_spatial|to_spectral|to_spatial)",
    "mlp": r"blocks\.\d+\.mlp\.fc[12]",
    "patch_embed": r"patch_embed\.proj",
    # the channel embedding's projections of wavelength and bandwidth features: a new sensor adapts cheaply
    "channel_embed": r"pos_chan_embed\.chan\.fc\w*",
    # the date, location and GSD embeddings' MLPs
    "metadata_embed": r"pos_chan_embed\.meta\.\w+\.fc[12]",
}
ENCODER_PREFIX = "encoder"
HEAD_NAME = "task_head"


@dataclass
class LoraConfig:
    r"""LoRA settings (peft).

    Attributes:
        targets: groups of encoder modules to adapt (keys of :data:`TARGET_GROUPS`: attention, pools,
            mlp, patch_embed, channel_embed, metadata_embed).
        target_regex: a regex over the encoder's module names (relative to the encoder, e.g.
            ``blocks\\.\\d+\\.mlp\\.fc1``) used instead of ``targets`` when set.
        rank: LoRA rank ``r``.
        alpha: LoRA ``alpha`` (scale alpha / r, or alpha / sqrt(r) with rsLoRA).
        dropout: dropout on the LoRA branch input.
        rslora: rank-stabilised scaling.
        dora: weight-decomposed LoRA (DoRA).
    """

    targets: list[str] = field(default_factory=lambda: ["attention", "pools", "mlp"])
    target_regex: str = ""
    rank: int = 4
    alpha: int = 8
    dropout: float = 0.0
    rslora: bool = False
    dora: bool = False

    def validate(self) -> None:
        """Check values; raises :class:`ConfigError` naming the field."""
        unknown = [t for t in self.targets if t not in TARGET_GROUPS]
        if unknown:
            raise ConfigError(f"targets: unknown group(s) {unknown} (known: {', '.join(TARGET_GROUPS)})")
        if not self.targets and not self.target_regex:
            raise ConfigError("targets: empty; name at least one group or set target_regex")
        if self.target_regex:
            try:
                re.compile(self.target_regex)
            except re.error as e:
                raise ConfigError(f"target_regex: not a regex ({e})") from None
        if self.rank < 1:
            raise ConfigError(f"rank: must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ConfigError(f"alpha: must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout}")

    def regex(self) -> str:
        """The full-name regex handed to peft (anchored on the encoder, so the head never matches)."""
        inner = self.target_regex or "|".join(f"(?:{TARGET_GROUPS[t]})" for t in self.targets)
        return rf"{ENCODER_PREFIX}\.(?:{inner})"

    def peft_config(self) -> Any:
        """The ``peft.LoraConfig`` (head in ``modules_to_save``: trained in full and saved with the adapter)."""
        import peft

        return peft.LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.regex(),
            use_rslora=self.rslora,
            use_dora=self.dora,
            modules_to_save=[HEAD_NAME],
            bias="none",
        )


@dataclass
class MethodConfig:
    """What a run fits.

    Attributes:
        name: a registered method (:data:`METHODS`): ``lora``, ``linear_probe``, ``full``, ``scratch``, or the
            classic baselines ``random_forest``, ``svm``, ``knn``.
        lora: LoRA settings (method ``lora``).
        classic: settings of the classic baselines (:class:`~gfm.finetune.classic.ClassicConfig`).
    """

    # the registry's names, spelled out for the type checker (a test keeps the two the same)
    name: Literal["lora", "linear_probe", "full", "scratch", "random_forest", "svm", "knn"] = "lora"
    lora: LoraConfig = field(default_factory=LoraConfig)
    classic: ClassicConfig = field(default_factory=ClassicConfig)


# ------------------------------------------------------------------------------------------------
# The registry

#: the model file a run leaves: peft adapter, the probe's head (the base is read again), encoder + head, none
Saves = Literal["adapter", "head", "model", "nothing"]


@dataclass(frozen=True)
class Method:
    """A method of ``gfm finetune`` on the network (the encoder + task head); registered once.

    Attributes:
        name: its ``method.name``.
        summary: what it trains, in a few words (docs, ``--help``).
        trains_encoder: every encoder weight trains.
        random_init: the encoder starts from random weights, whatever ``encoder.weights`` holds (the
            architecture still comes from them).
        saves: the model file its run leaves (:data:`Saves`).
        classic: a scikit-learn baseline (:class:`ClassicMethod`): no encoder, no training loop.
    """

    name: str
    summary: str
    trains_encoder: bool = False
    random_init: bool = False
    saves: Saves = "model"
    classic: bool = False

    @property
    def frozen_base(self) -> bool:
        """An adapter or a probe on a frozen base, which is read again on loading and its fingerprint checked."""
        return self.saves in ("adapter", "head")

    @property
    def mergeable(self) -> bool:
        """Its outputs can be folded into the encoder (``merge``)."""
        return self.saves == "adapter"

    def apply(self, model: nn.Module, cfg: MethodConfig) -> nn.Module:
        """Freeze or wrap ``model`` (with ``encoder`` and ``task_head`` children); returns the model to train."""
        for p in getattr(model, ENCODER_PREFIX).parameters():
            p.requires_grad_(self.trains_encoder)
        return model

    def settings(self, cfg: MethodConfig) -> dict[str, Any] | None:
        """Its own section of ``cfg``, as recorded in ``finetune.json`` (None: it has none)."""
        return None

    def describe(self, cfg: MethodConfig, model: nn.Module | None, layer_decay: float) -> str:
        """Its settings in a few words for the run's log ('' when there is nothing to add)."""
        return f"layer-wise lr decay {layer_decay:g}" if self.trains_encoder and layer_decay < 1 else ""


@dataclass(frozen=True)
class LoraMethod(Method):
    """peft LoRA adapters on the encoder, the head trained in full (peft's ``modules_to_save``)."""

    saves: Saves = "adapter"

    def apply(self, model: nn.Module, cfg: MethodConfig) -> nn.Module:
        """``model`` wrapped by ``peft.get_peft_model`` (a one-line error when the targets match nothing)."""
        import peft

        wrapped = peft.get_peft_model(model, cfg.lora.peft_config())
        if not lora_modules(wrapped):
            raise ConfigError(f"method.lora: the targets match no module of the encoder (regex {cfg.lora.regex()})")
        return wrapped

    def settings(self, cfg: MethodConfig) -> dict[str, Any] | None:
        """``cfg.lora``."""
        out: dict[str, Any] = to_dict(cfg.lora)
        return out

    def describe(self, cfg: MethodConfig, model: nn.Module | None, layer_decay: float) -> str:
        """Rank, alpha, variants and how many modules carry an adapter."""
        lc = cfg.lora
        where = f"on {len(lora_modules(model))} modules " if model is not None else ""
        return (f"LoRA r={lc.rank} alpha={lc.alpha:g}{' rsLoRA' if lc.rslora else ''}{' DoRA' if lc.dora else ''} "
                f"{where}({lc.target_regex or ', '.join(lc.targets)})")


@dataclass(frozen=True, kw_only=True)
class ClassicMethod(Method):
    """A scikit-learn baseline on the samples' pixel values (:mod:`gfm.finetune.classic`); saves no model.

    Attributes:
        estimator: the scikit-learn class, for the log.
        build: ``(settings, seed, multilabel, training samples) -> estimator`` (unfitted).
        keys: the fields of :class:`~gfm.finetune.classic.ClassicConfig` it reads.
        max_segmentation_pixels: training pixels it accepts on a segmentation task (0 = any number).
        limit_reason: why that limit, for the error.
    """

    saves: Saves = "nothing"
    classic: bool = True
    estimator: str
    build: Callable[[ClassicConfig, int, bool, int], Any]
    keys: tuple[str, ...]
    max_segmentation_pixels: int = 0
    limit_reason: str = ""

    def apply(self, model: nn.Module, cfg: MethodConfig) -> nn.Module:
        """Never called: a classic baseline has no encoder to adapt."""
        raise TypeError(f"method {self.name} is a classic baseline: it has no encoder to adapt")

    def settings(self, cfg: MethodConfig) -> dict[str, Any] | None:
        """The :class:`~gfm.finetune.classic.ClassicConfig` fields it reads."""
        return {k: getattr(cfg.classic, k) for k in ("features", "max_train_pixels", *self.keys)}

    def describe(self, cfg: MethodConfig, model: nn.Module | None, layer_decay: float) -> str:
        """The scikit-learn class and the settings it reads."""
        settings = ", ".join(f"{k}={v}" for k, v in (self.settings(cfg) or {}).items())
        return f"scikit-learn {self.estimator} ({settings})"


#: every method by ``method.name``, in the order of the docs
METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to :data:`METHODS` (once per name)."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method called ``name``; raises :class:`ConfigError` listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"method.name: unknown method {name!r} (known: {', '.join(METHODS)})") from None


register(LoraMethod("lora", "LoRA adapters (peft) + the head"))
register(Method("linear_probe", "the head", saves="head"))
register(Method("full", "everything", trains_encoder=True))
register(Method("scratch", "everything, from random weights", trains_encoder=True, random_init=True))
register(ClassicMethod("random_forest", "a random forest (no encoder)", estimator="RandomForestClassifier",
                       build=classic.random_forest, keys=("trees", "max_depth", "n_jobs")))
register(ClassicMethod("svm", "an RBF SVM on standardised features (no encoder)", estimator="SVC",
                       build=classic.svm, keys=("svm_c", "svm_gamma"), max_segmentation_pixels=50_000,
                       limit_reason="an SVM's fit grows with the square of the samples"))
register(ClassicMethod("knn", "k nearest neighbours on standardised features (no encoder)",
                       estimator="KNeighborsClassifier", build=classic.knn, keys=("knn_k", "n_jobs")))


def apply_method(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    """Freeze/wrap ``model`` (with ``encoder`` and ``task_head`` children) for method ``cfg.name``.

    Returns the model to train: a ``peft.PeftModel`` for ``lora``, ``model`` itself otherwise.
    """
    return get_method(cfg.name).apply(model, cfg)


def unwrap(model: Any) -> Any:
    """The task model inside peft's and DeepSpeed's wrappers (what :func:`apply_method` and the engine wrap).

    peft injects its layers in place, so the unwrapped model still runs the adapters.
    """
    while True:
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        else:
            return model


def lora_modules(model: nn.Module) -> list[str]:
    """Names (relative to the task model) of the modules that carry a LoRA adapter."""
    from peft.tuners.lora import LoraLayer

    out = []
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            out.append(re.sub(r"^base_model\.model\.", "", name))
    return out


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """``trainable`` and ``total`` parameters (LoRA weights count as parameters of the model they adapt)."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trainable": int(trainable), "total": int(total)}


# ------------------------------------------------------------------------------------------------
# Optimizer: layer-wise lr decay


_BLOCK_RE = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def layer_id(name: str, depth: int) -> int:
    """Depth of parameter ``name`` for layer-wise decay: embeddings 0, block ``i`` → i + 1, the rest L + 1."""
    m = _BLOCK_RE.search(name)
    if m and f"{ENCODER_PREFIX}." in name:
        return int(m.group(1)) + 1
    if name.startswith(f"{ENCODER_PREFIX}.") and not name.startswith(f"{ENCODER_PREFIX}.norm"):
        return 0  # patch/channel/position embeddings and summary tokens
    return depth + 1


@dataclass
class FinetuneOptimConfig(OptimConfig):
    """AdamW settings of fine-tuning (``gfm.train.optim.OptimConfig``) plus layer-wise lr decay.

    Attributes:
        layer_decay: lr factor per block from the top (``full`` and ``scratch``; 1 = off).
        head_lr_scale: lr multiplier of the task head (every method).
    """

    lr: float = 1e-3
    ref_batch: int = 32
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    layer_decay: float = 0.75
    head_lr_scale: float = 1.0

    def validate(self) -> None:
        """Check values; raises :class:`ConfigError` naming the field."""
        super().validate()
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(f"layer_decay: must be in (0, 1], got {self.layer_decay}")
        if self.head_lr_scale <= 0:
            raise ConfigError(f"head_lr_scale: must be > 0, got {self.head_lr_scale}")

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """AdamW groups by (layer, decayed or not), each with its ``lr_scale``."""
        groups: dict[tuple[int, bool], dict[str, Any]] = {}
        blocks = [int(m.group(1)) for n, _ in model.named_parameters() if (m := _BLOCK_RE.search(n))]
        depth = max(blocks) + 1 if blocks else 0
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            plain = re.sub(r"^base_model\.model\.", "", name)
            decayed = not (p.ndim <= 1 or any(s in plain for s in self.no_decay))
            layer = layer_id(plain, depth)
            scale = self.layer_decay ** (depth + 1 - layer)
            if HEAD_NAME in plain.split("."):
                scale = self.head_lr_scale
            key = (layer if HEAD_NAME not in plain.split(".") else -1, decayed)
            group = groups.setdefault(key, {"params": [], "weight_decay": self.weight_decay if decayed else 0.0,
                                            "lr_scale": scale})
            group["params"].append(p)
        return list(groups.values())

    def build(self, model: nn.Module, peak_lr: float) -> torch.optim.Optimizer:
        """:class:`LayerScaledAdamW` over :meth:`param_groups`."""
        return LayerScaledAdamW(self.param_groups(model), lr=peak_lr, betas=self.betas, eps=self.eps, foreach=False)


class LayerScaledAdamW(NonFiniteSkippingAdamW):
    """AdamW whose groups step at ``lr × lr_scale``.

    The train module sets one lr on every group each step (the schedule); the per-group scale of
    layer-wise decay is applied here, for the duration of the update, so the two compose.
    """

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: D102
        base = [g["lr"] for g in self.param_groups]
        for g in self.param_groups:
            g["lr"] = g["lr"] * g.get("lr_scale", 1.0)
        try:
            return super().step(closure)
        finally:
            for g, lr in zip(self.param_groups, base):
                g["lr"] = lr


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters that train."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def frozen_state(model: nn.Module, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """A CPU copy of the frozen parameters (to check later that training left them bit-identical)."""
    keep = set(names) if names is not None else None
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters()
            if not p.requires_grad and (keep is None or n in keep)}
