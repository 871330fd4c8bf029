"""Named model variants (timm-style registry) and the YAML-facing :class:`ModelConfig`.

Encoders: ``less_vit_{tiny,small,base,large,huge}`` and their dense joint-attention counterparts
``dense_vit_*`` (same widths and depths, ChannelViT-style attention over all tokens). Pretraining
models: ``hypermae_less_*`` (a LESS encoder with a light LESS decoder). Every builder takes keyword
overrides of the class arguments: ``create_model("hypermae_less_tiny", patch_size=8)``.

Parameter counts (``patch_size=8``, ``spectral_patch=1``; they do not depend on C or image size):

================  ==========  ================  ==========
variant           params      variant           params
================  ==========  ================  ==========
less_vit_tiny     6.1 M       dense_vit_tiny    5.4 M
less_vit_small    24.2 M      dense_vit_small   21.5 M
less_vit_base     96.5 M      dense_vit_base    85.8 M
less_vit_large    341.6 M     dense_vit_large   303.5 M
less_vit_huge     710.0 M     dense_vit_huge    631.5 M
================  ==========  ================  ==========

LESS blocks carry ~12 % more parameters than dense ones (the summary-pooling projections).
HyperMAE adds its decoder: tiny 0.5 M (128 wide, 2 blocks), small 3.8 M (256, 4), base/large/huge
29.1-29.4 M (512, 8); totals 6.6 / 28.0 / 125.6 / 370.9 / 739.4 M.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

from torch import nn

from gfm.model.encoder import LESSViT
from gfm.model.mae import HyperMAE

ModelFn = TypeVar("ModelFn", bound=Callable[..., nn.Module])

_MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: ModelFn) -> ModelFn:
    """Register a builder under its function name."""
    if fn.__name__ in _MODELS:
        raise ValueError(f"model {fn.__name__!r} is already registered")
    _MODELS[fn.__name__] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a glob ``pattern``, sorted."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered model, with keyword overrides of its constructor arguments."""
    try:
        fn = _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None
    return fn(**overrides)


# ------------------------------------------------------------------------------------------------
# Variants: (embed_dim, depth, rank); d_c = 4 throughout, so d_s = 16 (tiny..large) or 20 (huge).

_ENCODERS: dict[str, dict[str, Any]] = {
    "tiny": dict(embed_dim=192, depth=12, rank=3),
    "small": dict(embed_dim=384, depth=12, rank=6),
    "base": dict(embed_dim=768, depth=12, rank=12),
    "large": dict(embed_dim=1024, depth=24, rank=16),
    "huge": dict(embed_dim=1280, depth=32, rank=16),
}
_DECODERS: dict[str, dict[str, Any]] = {
    "tiny": dict(decoder_dim=128, decoder_depth=2, decoder_rank=2),
    "small": dict(decoder_dim=256, decoder_depth=4, decoder_rank=4),
    "base": dict(decoder_dim=512, decoder_depth=8, decoder_rank=8),
    "large": dict(decoder_dim=512, decoder_depth=8, decoder_rank=8),
    "huge": dict(decoder_dim=512, decoder_depth=8, decoder_rank=8),
}
#: HyperMAE constructor arguments; every other override goes to the encoder.
_MAE_ARGS = frozenset(
    {"decoder_dim", "decoder_depth", "decoder_rank", "decoder_spectral_head_dim", "mask_ratio",
     "obs_mask_ratio", "min_obs_keep", "norm_pix_loss"}
)


def _encoder(size: str, attention: str, overrides: Mapping[str, Any]) -> LESSViT:
    return LESSViT(**{**_ENCODERS[size], "attention": attention, **overrides})


def _hypermae(size: str, overrides: Mapping[str, Any]) -> HyperMAE:
    mae_args = {k: v for k, v in overrides.items() if k in _MAE_ARGS}
    encoder_args = {k: v for k, v in overrides.items() if k not in _MAE_ARGS}
    return HyperMAE(_encoder(size, "less", encoder_args), **{**_DECODERS[size], **mae_args})


@register_model
def less_vit_tiny(**kw: Any) -> LESSViT:
    """LESS ViT-Tiny: D 192, 12 blocks, rank 3 (6.1 M params)."""
    return _encoder("tiny", "less", kw)


@register_model
def less_vit_small(**kw: Any) -> LESSViT:
    """LESS ViT-Small: D 384, 12 blocks, rank 6 (24.2 M params)."""
    return _encoder("small", "less", kw)


@register_model
def less_vit_base(**kw: Any) -> LESSViT:
    """LESS ViT-Base: D 768, 12 blocks, rank 12 (96.5 M params)."""
    return _encoder("base", "less", kw)


@register_model
def less_vit_large(**kw: Any) -> LESSViT:
    """LESS ViT-Large: D 1024, 24 blocks, rank 16 (341.6 M params)."""
    return _encoder("large", "less", kw)


@register_model
def less_vit_huge(**kw: Any) -> LESSViT:
    """LESS ViT-Huge: D 1280, 32 blocks, rank 16 (710.0 M params)."""
    return _encoder("huge", "less", kw)


@register_model
def dense_vit_tiny(**kw: Any) -> LESSViT:
    """Dense joint-attention reference, Tiny: D 192, 12 blocks, 3 heads (5.4 M params)."""
    return _encoder("tiny", "dense", kw)


@register_model
def dense_vit_small(**kw: Any) -> LESSViT:
    """Dense joint-attention reference, Small: D 384, 12 blocks, 6 heads (21.5 M params)."""
    return _encoder("small", "dense", kw)


@register_model
def dense_vit_base(**kw: Any) -> LESSViT:
    """Dense joint-attention reference, Base: D 768, 12 blocks, 12 heads (85.8 M params)."""
    return _encoder("base", "dense", kw)


@register_model
def dense_vit_large(**kw: Any) -> LESSViT:
    """Dense joint-attention reference, Large: D 1024, 24 blocks, 16 heads (303.5 M params)."""
    return _encoder("large", "dense", kw)


@register_model
def dense_vit_huge(**kw: Any) -> LESSViT:
    """Dense joint-attention reference, Huge: D 1280, 32 blocks, 16 heads (631.5 M params)."""
    return _encoder("huge", "dense", kw)


@register_model
def hypermae_less_tiny(**kw: Any) -> HyperMAE:
    """HyperMAE on LESS ViT-Tiny, decoder D 128 × 2 blocks (6.6 M params)."""
    return _hypermae("tiny", kw)


@register_model
def hypermae_less_small(**kw: Any) -> HyperMAE:
    """HyperMAE on LESS ViT-Small, decoder D 256 × 4 blocks (28.0 M params)."""
    return _hypermae("small", kw)


@register_model
def hypermae_less_base(**kw: Any) -> HyperMAE:
    """HyperMAE on LESS ViT-Base, decoder D 512 × 8 blocks (125.6 M params)."""
    return _hypermae("base", kw)


@register_model
def hypermae_less_large(**kw: Any) -> HyperMAE:
    """HyperMAE on LESS ViT-Large, decoder D 512 × 8 blocks (370.9 M params)."""
    return _hypermae("large", kw)


@register_model
def hypermae_less_huge(**kw: Any) -> HyperMAE:
    """HyperMAE on LESS ViT-Huge, decoder D 512 × 8 blocks (739.4 M params)."""
    return _hypermae("huge", kw)


# ------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """The model section of a run config (plain fields, loaded from YAML).

    Attributes:
        name: a registered model (:func:`list_models`).
        patch_size: ``p``, pixels per patch side.
        spectral_patch: ``s``, adjacent observations folded into one token.
        perception_radius_m: spatial attention radius in metres (0 = global).
        drop_path: stochastic depth of the last encoder block.
        grad_checkpointing: recompute block activations in the backward pass.
        mask_ratio: HyperMAE fraction of positions hidden (ignored by encoders).
        obs_mask_ratio: HyperMAE fraction of observations hidden (ignored by encoders).
        min_obs_keep: HyperMAE observations always kept (ignored by encoders).
        norm_pix_loss: HyperMAE per-token normalised targets (ignored by encoders).
        num_classes: encoder CLS head classes, 0 = none (ignored by HyperMAE).
    """

    name: str = "hypermae_less_tiny"
    patch_size: int = 8
    spectral_patch: int = 1
    perception_radius_m: float = 0.0
    drop_path: float = 0.0
    grad_checkpointing: bool = False
    mask_ratio: float = 0.75
    obs_mask_ratio: float = 0.5
    min_obs_keep: int = 2
    norm_pix_loss: bool = True
    num_classes: int = 0

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelConfig:
        """Build from a mapping; an unknown key is an error that names it."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"model config: unknown key(s) {unknown}; expected some of {sorted(known)}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for saving with checkpoints)."""
        return asdict(self)

    def build(self) -> nn.Module:
        """The model this config describes."""
        args = self.to_dict()
        name = args.pop("name")
        grad_checkpointing = args.pop("grad_checkpointing")
        if name.startswith("hypermae_"):
            args.pop("num_classes")
        else:
            for key in _MAE_ARGS:
                args.pop(key, None)
        model = create_model(name, **args)
        if grad_checkpointing:
            model.set_grad_checkpointing(True)  # type: ignore[operator]
        return model
