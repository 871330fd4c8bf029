"""How the encoder adapts: ``lora`` (peft), ``linear_probe``, ``full`` (layer-wise lr decay), ``scratch``.

One program runs all four, so comparisons are like for like: same data, split, head, schedule and
evaluation; only which parameters train (and from which initial weights) differs.

- ``lora``: peft LoRA adapters on the modules named by :attr:`LoraConfig.targets`, the base frozen,
  the task head trained in full (peft's ``modules_to_save``, so it is saved with the adapter).
- ``linear_probe``: the encoder frozen, only the head trains.
- ``full``: everything trains; block ``i`` of ``L`` gets lr × ``layer_decay^(L + 1 − (i + 1))``,
  the embeddings ``layer_decay^(L + 1)``, the final norm and head the full lr (as in MAE fine-tuning).
- ``scratch``: ``full`` from random weights (the encoder's architecture still comes from
  ``encoder.weights`` when given, so the comparison is with the same model).

LoRA targets are regexes that peft matches against each module's *full* name with ``re.fullmatch``.
They are written here per group over the encoder's module names (``encoder.blocks.3.attn.proj``...),
anchored on ``encoder.`` so the head is never wrapped (peft's ``"all-linear"`` would wrap it).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from gfm.config import ConfigError
from gfm.train.optim import NonFiniteSkippingAdamW, OptimConfig

METHODS = ("lora", "linear_probe", "full", "scratch")

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
    """Which parameters train.

    Attributes:
        name: ``lora``, ``linear_probe``, ``full`` or ``scratch``.
        lora: LoRA settings (method ``lora``).
    """

    name: Literal["lora", "linear_probe", "full", "scratch"] = "lora"
    lora: LoraConfig = field(default_factory=LoraConfig)

    @property
    def trains_encoder(self) -> bool:
        """Whether every encoder weight trains (full, scratch)."""
        return self.name in ("full", "scratch")


def apply_method(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    """Freeze/wrap ``model`` (with ``encoder`` and ``task_head`` children) for ``cfg.name``.

    Returns the model to train: a ``peft.PeftModel`` for ``lora``, ``model`` itself otherwise.
    """
    if cfg.name == "lora":
        import peft

        wrapped = peft.get_peft_model(model, cfg.lora.peft_config())
        matched = lora_modules(wrapped)
        if not matched:
            raise ConfigError(f"method.lora: the targets match no module of the encoder (regex {cfg.lora.regex()})")
        return wrapped
    encoder = getattr(model, ENCODER_PREFIX)
    for p in encoder.parameters():
        p.requires_grad_(cfg.trains_encoder)
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
