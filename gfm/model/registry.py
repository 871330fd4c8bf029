"""Named model variants (timm-style registry) and the YAML-facing :class:`ModelConfig`.

Encoders: ``less_vit_{tiny,small,base,large,huge}`` and their dense joint-attention counterparts
``dense_vit_*`` (same widths, depths and heads, ChannelViT-style attention over all tokens).
Pretraining models: ``hypermae_less_*`` (a LESS encoder with a light LESS decoder). The authors'
launch configuration (LESS ViT-B, patch 16, ``d_c = 2``, 12 heads × rank 8, perception field 640 m,
decoder 512 × 4 with 16 heads × rank 8, LayerScale 1.0, drop-path / attention / projection dropout
0.1, plain targets): ``less_paper_b`` (HyperMAE) and ``less_vit_paper_b`` (its encoder). Every
builder takes keyword overrides of the class arguments: ``create_model("hypermae_less_tiny",
patch_size=8)``.

Variants (``d_c = 4``, rank 1, so ``d_s = D / (4h)``: 16 for tiny..large, 20 for huge); parameter
counts at ``patch_size=8``, ``spectral_patch=1`` (they do not depend on C or image size):

==============  ======  =====  =====  ====  =========  ==============  ==========
variant         D       depth  heads  rank  less_vit   dense_vit       hypermae
==============  ======  =====  =====  ====  =========  ==============  ==========
tiny            192     12     3      1     6.2 M      5.5 M           6.8 M
small           384     12     6      1     24.7 M     22.0 M          28.7 M
base            768     12     12     1     98.4 M     87.6 M          128.4 M
large           1024    24     16     1     344.9 M    306.8 M         375.1 M
huge            1280    32     16     1     715.1 M    636.6 M         745.4 M
paper_b (p 16)  768     12     12     8     129.0 M                    149.5 M
==============  ======  =====  =====  ====  =========  ==============  ==========

LESS blocks carry ~12 % more parameters than dense ones (the summary-pooling projections). HyperMAE
adds its decoder: tiny 128 wide × 2 blocks (2 heads), small 256 × 4 (4 heads), base/large/huge
512 × 8 (8 heads); every variant also carries its metadata embeddings (date, location, GSD).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, TypeVar, overload

from torch import nn

from gfm.config import from_dict
from gfm.model.encoder import LESSViT
from gfm.model.mae import LOSS_GROUPS, METADATA_DROPOUT, HyperMAE

ModelFn = TypeVar("ModelFn", bound=Callable[..., nn.Module])

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_PRETRAINING: set[str] = set()


@overload
def register_model(fn: ModelFn, *, pretraining: bool = False) -> ModelFn: ...
@overload
def register_model(fn: None = None, *, pretraining: bool = False) -> Callable[[ModelFn], ModelFn]: ...
def register_model(
    fn: ModelFn | None = None, *, pretraining: bool = False
) -> ModelFn | Callable[[ModelFn], ModelFn]:
    """Register a builder under its function name (``@register_model`` or ``@register_model(pretraining=True)``).

    ``pretraining`` marks builders of masked-autoencoder models (their config takes the decoder,
    masking and loss settings).
    """

    def add(f: ModelFn) -> ModelFn:
        if f.__name__ in _MODELS:
            raise ValueError(f"model {f.__name__!r} is already registered")
        _MODELS[f.__name__] = f
        if pretraining:
            _PRETRAINING.add(f.__name__)
        return f

    return add(fn) if fn is not None else add


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a glob ``pattern``, sorted."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def is_pretraining_model(name: str) -> bool:
    """Whether ``name`` builds a pretraining (HyperMAE) model."""
    return name in _PRETRAINING


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Build a registered model with keyword overrides of its constructor arguments (None = the variant's own)."""
    try:
        fn = _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None
    return fn(**{k: v for k, v in overrides.items() if v is not None})


# ------------------------------------------------------------------------------------------------
# Variants: (embed_dim, depth, num_heads, rank); d_c = 4 throughout, so d_s = D / (4h).

_ENCODERS: dict[str, dict[str, Any]] = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3, rank=1, spectral_head_dim=4),
    "small": dict(embed_dim=384, depth=12, num_heads=6, rank=1, spectral_head_dim=4),
    "base": dict(embed_dim=768, depth=12, num_heads=12, rank=1, spectral_head_dim=4),
    "large": dict(embed_dim=1024, depth=24, num_heads=16, rank=1, spectral_head_dim=4),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16, rank=1, spectral_head_dim=4),
    # the authors' launch_train.sh at 3b53776: ViT-B, patch 16, d_c 2, 12 heads x rank 8, LayerScale 1.0,
    # drop-path/attention/projection dropout 0.1, perception field 640 m
    "paper_b": dict(embed_dim=768, depth=12, num_heads=12, rank=8, spectral_head_dim=2, patch_size=16,
                    perception_radius_m=640.0, init_values=1.0, drop_path=0.1, attn_drop=0.1, proj_drop=0.1),
}
_DECODERS: dict[str, dict[str, Any]] = {
    "tiny": dict(decoder_dim=128, decoder_depth=2, decoder_num_heads=2, decoder_rank=1),
    "small": dict(decoder_dim=256, decoder_depth=4, decoder_num_heads=4, decoder_rank=1),
    "base": dict(decoder_dim=512, decoder_depth=8, decoder_num_heads=8, decoder_rank=1),
    "large": dict(decoder_dim=512, decoder_depth=8, decoder_num_heads=8, decoder_rank=1),
    "huge": dict(decoder_dim=512, decoder_depth=8, decoder_num_heads=8, decoder_rank=1),
    # decoder 512 x 4, 16 heads (its default) x rank 8, d_c 2; no --norm_pix_loss in the launch
    "paper_b": dict(decoder_dim=512, decoder_depth=4, decoder_num_heads=16, decoder_rank=8,
                    decoder_spectral_head_dim=2, mask_ratio=0.75, obs_mask_ratio=0.5, min_obs_keep=2,
                    norm_pix_loss=False),
}
#: HyperMAE constructor arguments; every other override goes to the encoder.
_MAE_ARGS = frozenset(
    {"decoder_dim", "decoder_depth", "decoder_num_heads", "decoder_rank", "decoder_spectral_head_dim",
     "decoder_perception_radius_m", "mask_ratio", "obs_mask_ratio", "min_obs_keep", "norm_pix_loss",
     "loss_balance", "loss_group_weights", "metadata_dropout", "context"}
)


def _encoder(size: str, attention: str, overrides: Mapping[str, Any]) -> LESSViT:
    return LESSViT(**{**_ENCODERS[size], "attention": attention, **overrides})


def _hypermae(size: str, overrides: Mapping[str, Any]) -> HyperMAE:
    mae_args = {k: v for k, v in overrides.items() if k in _MAE_ARGS}
    encoder_args = {k: v for k, v in overrides.items() if k not in _MAE_ARGS}
    return HyperMAE(_encoder(size, "less", encoder_args), **{**_DECODERS[size], **mae_args})


@register_model
def less_vit_tiny(**kw: Any) -> LESSViT:
    """LESS ViT-Tiny: D 192, 12 blocks, 3 heads × rank 1 (6.2 M params)."""
    return _encoder("tiny", "less", kw)


@register_model
def less_vit_small(**kw: Any) -> LESSViT:
    """LESS ViT-Small: D 384, 12 blocks, 6 heads × rank 1 (24.7 M params)."""
    return _encoder("small", "less", kw)


@register_model
def less_vit_base(**kw: Any) -> LESSViT:
    """LESS ViT-Base: D 768, 12 blocks, 12 heads × rank 1 (98.4 M params)."""
    return _encoder("base", "less", kw)


@register_model
def less_vit_large(**kw: Any) -> LESSViT:
    """LESS ViT-Large: D 1024, 24 blocks, 16 heads × rank 1 (344.9 M params)."""
    return _encoder("large", "less", kw)


@register_model
def less_vit_huge(**kw: Any) -> LESSViT:
    """LESS ViT-Huge: D 1280, 32 blocks, 16 heads × rank 1 (715.1 M params)."""
    return _encoder("huge", "less", kw)


@register_model
def dense_vit_tiny(**kw: Any) -> LESSViT:
    """Dense joint-attention reference, Tiny: D 192, 12 blocks, 3 heads (5.5 M params)."""
    return _encoder("tiny", "dense", kw)


@register_model
def dense_vit_small(**kw: Any) -> LESSViT:
    """Dense joint-attention reference, Small: D 384, 12 blocks, 6 heads (22.0 M params)."""
    return _encoder("small", "dense", kw)


@register_model
def dense_vit_base(**kw: Any) -> LESSViT:
    """Dense joint-attention reference, Base: D 768, 12 blocks, 12 heads (87.6 M params)."""
    return _encoder("base", "dense", kw)


@register_model
def dense_vit_large(**kw: Any) -> LESSViT:
    """Dense joint-attention reference, Large: D 1024, 24 blocks, 16 heads (306.8 M params)."""
    return _encoder("large", "dense", kw)


@register_model
def dense_vit_huge(**kw: Any) -> LESSViT:
    """Dense joint-attention reference, Huge: D 1280, 32 blocks, 16 heads (636.6 M params)."""
    return _encoder("huge", "dense", kw)


@register_model(pretraining=True)
def hypermae_less_tiny(**kw: Any) -> HyperMAE:
    """HyperMAE on LESS ViT-Tiny, decoder D 128 × 2 blocks, 2 heads (6.8 M params)."""
    return _hypermae("tiny", kw)


@register_model(pretraining=True)
def hypermae_less_small(**kw: Any) -> HyperMAE:
    """HyperMAE on LESS ViT-Small, decoder D 256 × 4 blocks, 4 heads (28.7 M params)."""
    return _hypermae("small", kw)


@register_model(pretraining=True)
def hypermae_less_base(**kw: Any) -> HyperMAE:
    """HyperMAE on LESS ViT-Base, decoder D 512 × 8 blocks, 8 heads (128.4 M params)."""
    return _hypermae("base", kw)


@register_model(pretraining=True)
def hypermae_less_large(**kw: Any) -> HyperMAE:
    """HyperMAE on LESS ViT-Large, decoder D 512 × 8 blocks, 8 heads (375.1 M params)."""
    return _hypermae("large", kw)


@register_model(pretraining=True)
def hypermae_less_huge(**kw: Any) -> HyperMAE:
    """HyperMAE on LESS ViT-Huge, decoder D 512 × 8 blocks, 8 heads (745.4 M params)."""
    return _hypermae("huge", kw)


@register_model
def less_vit_paper_b(**kw: Any) -> LESSViT:
    """The authors' launch encoder: LESS ViT-B, p 16, d_c 2, 12 heads × rank 8, 640 m field (129.0 M params)."""
    return _encoder("paper_b", "less", kw)


@register_model(pretraining=True)
def less_paper_b(**kw: Any) -> HyperMAE:
    """The authors' launch: :func:`less_vit_paper_b` + decoder 512 × 4, 16 heads × rank 8 (149.5 M params)."""
    return _hypermae("paper_b", kw)


# ------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """The model section of a run config (plain fields, loaded from YAML).

    Every field left at None takes the named variant's own value, so ``name: less_paper_b`` alone
    reproduces the authors' launch and ``name: hypermae_less_tiny`` the registry's tiny model.

    Attributes:
        name: a registered model (:func:`list_models`).
        depth: encoder blocks (None = the variant's; fewer for a quick CPU run).
        patch_size: ``p``, pixels per patch side.
        spectral_patch: ``s``, observations of one sensor, date and kind folded into one token.
        patch_embed: ``linear`` or ``spectral`` (per-band weights from wavelength and bandwidth).
        num_heads: encoder heads ``h``.
        rank: encoder LESS rank ``r`` (Kronecker terms per head).
        spectral_head_dim: encoder ``d_c``.
        perception_radius_m: spatial attention radius in metres, encoder (0 = global).
        finest_gsd_m: finest GSD the model is meant for (shortest position period = 2 patch pitches at it).
        nominal_gsd_m: GSD for positions and the perception field when a tile's GSD is unknown.
        drop_path: stochastic depth of the last block (linear ramp, encoder and decoder).
        attn_drop: dropout on attention weights.
        proj_drop: dropout after attention projections and in MLPs.
        init_values: LayerScale initial value (0 = no LayerScale).
        grad_checkpointing: recompute block activations in the backward pass.
        decoder_dim, decoder_depth, decoder_num_heads, decoder_rank, decoder_spectral_head_dim: the
            HyperMAE decoder (ignored by encoders, as are the fields below).
        decoder_perception_radius_m: decoder perception field (None = the encoder's).
        mask_ratio: HyperMAE fraction of positions hidden.
        obs_mask_ratio: HyperMAE fraction of token rows hidden.
        min_obs_keep: HyperMAE token rows always kept.
        norm_pix_loss: HyperMAE per-token normalised targets.
        loss_balance: ``group`` (average the loss terms over modality groups) or ``pixel``.
        loss_group_weights: weight per modality group (``optical``, ``thermal``, ``sar``, ``index``,
            ``quality``; missing = 1).
        metadata_dropout: probability per kind of metadata (``location``, ``time``, ``gsd``,
            ``bandwidth``) of hiding it from a pretraining sample (missing = the default).
        context: HyperMAE ``tile`` (default) or ``pixel``: each valid pixel its own sample, only token rows
            hidden (the regime of per-pixel fine-tuning; ``HyperMAE`` says more).
        num_classes: encoder CLS head classes, 0 = none (ignored by HyperMAE).
    """

    name: str = "hypermae_less_tiny"
    depth: int | None = None
    patch_size: int | None = None
    spectral_patch: int | None = None
    patch_embed: str | None = None
    num_heads: int | None = None
    rank: int | None = None
    spectral_head_dim: int | None = None
    perception_radius_m: float | None = None
    finest_gsd_m: float | None = None
    nominal_gsd_m: float | None = None
    drop_path: float | None = None
    attn_drop: float | None = None
    proj_drop: float | None = None
    init_values: float | None = None
    grad_checkpointing: bool = False
    decoder_dim: int | None = None
    decoder_depth: int | None = None
    decoder_num_heads: int | None = None
    decoder_rank: int | None = None
    decoder_spectral_head_dim: int | None = None
    decoder_perception_radius_m: float | None = None
    mask_ratio: float | None = None
    obs_mask_ratio: float | None = None
    min_obs_keep: int | None = None
    norm_pix_loss: bool | None = None
    loss_balance: str | None = None
    loss_group_weights: dict[str, float] | None = None
    metadata_dropout: dict[str, float] | None = None
    context: str | None = None
    num_classes: int = 0

    def validate(self) -> None:
        """Check values; raises ValueError naming the field."""
        for key in ("depth", "patch_size", "spectral_patch", "num_heads", "rank", "spectral_head_dim", "decoder_dim",
                    "decoder_depth", "decoder_num_heads", "decoder_rank", "decoder_spectral_head_dim"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"{key}: must be >= 1, got {value}")
        for key in ("drop_path", "attn_drop", "proj_drop", "mask_ratio", "obs_mask_ratio"):
            value = getattr(self, key)
            if value is not None and not 0.0 <= value < 1.0:
                raise ValueError(f"{key}: must lie in [0, 1), got {value}")
        if self.patch_embed not in (None, "linear", "spectral"):
            raise ValueError(f"patch_embed: expected 'linear' or 'spectral', got {self.patch_embed!r}")
        if self.context not in (None, "tile", "pixel"):
            raise ValueError(f"context: expected 'tile' or 'pixel', got {self.context!r}")
        if self.loss_balance not in (None, "group", "pixel"):
            raise ValueError(f"loss_balance: expected 'group' or 'pixel', got {self.loss_balance!r}")
        unknown = sorted(set(self.loss_group_weights or {}) - set(LOSS_GROUPS))
        if unknown:
            raise ValueError(f"loss_group_weights: unknown group(s) {unknown} (known: {', '.join(LOSS_GROUPS)})")
        unknown = sorted(set(self.metadata_dropout or {}) - set(METADATA_DROPOUT))
        if unknown:
            raise ValueError(f"metadata_dropout: unknown kind(s) {unknown} (known: {', '.join(METADATA_DROPOUT)})")
        for kind, p in (self.metadata_dropout or {}).items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"metadata_dropout.{kind}: must lie in [0, 1], got {p}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ModelConfig:
        """Build from a mapping, checking keys and types (:func:`gfm.config.from_dict`); errors name the key."""
        return from_dict(cls, values)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for saving with checkpoints)."""
        return asdict(self)

    def build(self) -> nn.Module:
        """The model this config describes (fields left at None keep the variant's values)."""
        args = {k: v for k, v in self.to_dict().items() if v is not None}
        name = args.pop("name")
        grad_checkpointing = args.pop("grad_checkpointing")
        if is_pretraining_model(name):
            args.pop("num_classes")
        else:
            for key in _MAE_ARGS:
                args.pop(key, None)
        model = create_model(name, **args)
        if grad_checkpointing:
            model.set_grad_checkpointing(True)  # type: ignore[operator]
        return model
