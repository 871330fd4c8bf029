"""A backbone for other frameworks: per-position feature maps of chosen blocks (timm ``features_only`` style).

:class:`GFMBackbone` wraps a :class:`~gfm.model.encoder.LESSViT` so that code written for timm's
``features_only`` models or terratorch's backbones can use it: ``backbone(x, wavelengths)`` takes a plain
``x: [B, C, H, W]`` of normalised band values plus each band's centre wavelength in nm, builds the
:class:`~gfm.batch.Batch` the encoder reads, and returns one map ``[B, D, h, w]`` per chosen block
(``h = ⌈H/p⌉``, ``w = ⌈W/p⌉``), with ``out_channels`` and ``feature_info`` describing them. Any band
count and any wavelengths: that is gfm's point.

A block's token grid ``[B, G+1, N+1, D]`` becomes a map by folding the observation axis:

- ``reduce="summary"`` (default): the summary-row token of each position, what
  :meth:`LESSViT.forward_intermediates` returns and gfm's segmentation fine-tuning trains its heads on.
  In every block it is the attention pool over that position's observation tokens, invalid ones never
  keys, so the model's own learned spectral reduction, whatever ``G``;
- ``reduce="mean"``: the mean over the position's valid observation tokens (0 where none is valid).

A pretrained model is wrapped as loaded: ``GFMBackbone(gfm.from_pretrained("gfm-tiny"), bands=...)``
(``gfm.model`` never imports the hub). :mod:`gfm.terratorch` registers these backbones with terratorch.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any

import torch
from einops import rearrange
from timm.models import FeatureInfo
from torch import nn

from gfm.batch import Batch, sensor_code
from gfm.model.encoder import Inputs, LESSViT
from gfm.model.registry import create_model
from gfm.sensors import KIND_CODE, Band, get_sensor

#: feature maps of four blocks by default, evenly spaced and ending at the last (as UPerNet-style necks take)
DEFAULT_NUM_OUTPUTS = 4

FloatsLike = torch.Tensor | Sequence[float]


def default_out_indices(depth: int, count: int = DEFAULT_NUM_OUTPUTS) -> list[int]:
    """``count`` block indices evenly spaced up to the last block: depth 12 → ``[2, 5, 8, 11]``.

    Shallow encoders repeat blocks (depth 2 → ``[0, 0, 0, 1]``) so a neck that wants ``count`` maps gets them.
    """
    return [max(0, (k + 1) * depth // count - 1) for k in range(count)]


def _encoder_of(model: nn.Module) -> LESSViT:
    """The LESS ViT in ``model``: itself, or its ``encoder`` (a HyperMAE, an exported ``GFMModel``)."""
    enc = model if isinstance(model, LESSViT) else getattr(model, "encoder", None)
    if not isinstance(enc, LESSViT):
        raise TypeError(f"GFMBackbone wraps a LESSViT (or a model whose .encoder is one), got {type(model).__name__}")
    return enc


def _band(band: str | Band) -> Band:
    if isinstance(band, Band):
        return band
    sensor, sep, name = str(band).partition("/")
    if not sep:
        raise ValueError(f"band {band!r}: name bands as '<sensor>/<band>' (e.g. 'sentinel2_l2a/B04')")
    return get_sensor(sensor).band(name)


class GFMBackbone(nn.Module):
    """Feature maps ``[B, D, h, w]`` of chosen blocks of a LESS ViT, for a tensor and its bands' wavelengths.

    The band description given here (``bands``, or ``wavelengths`` with optional ``bandwidths`` and
    ``kinds``) is the default of :meth:`forward`, so frameworks that call ``backbone(x)`` alone
    (terratorch) work; arguments of :meth:`forward` override it per call.

    Args:
        encoder: a :class:`LESSViT`, or a model holding one as ``.encoder`` (HyperMAE, ``gfm.from_pretrained``).
        out_indices: blocks whose outputs to return, 0-based, negative from the end; an int ``n`` for the
            last ``n`` blocks; None for :func:`default_out_indices` (4 evenly spaced).
        bands: the input's bands as ``"sensor/band"`` keys of :mod:`gfm.sensors` or ``Band`` objects
            (wavelength, bandwidth, kind and sensor id from the registry).
        wavelengths: ``[C]`` centre wavelengths in nm (radar wavelength for SAR), instead of ``bands``.
        bandwidths: ``[C]`` FWHM in nm (default unknown).
        kinds: ``[C]`` kind names of :data:`gfm.sensors.KIND_CODE` (default reflectance).
        gsd: ground sampling distance in metres (default unknown).
        norm: apply the encoder's final norm to each block output (as gfm's segmentation fine-tuning does).
        reduce: ``"summary"`` or ``"mean"`` (module docstring).
        reshape: True → maps ``[B, D, h, w]``; False → tokens ``[B, N, D]`` (``N = h·w``, row-major).
        prune: drop the encoder's blocks after the last chosen one (and its final norm when ``norm`` is
            off, its class head), as timm's ``features_only`` does: they would cost time and, under DDP,
            fail as parameters without gradients. This edits ``encoder`` in place.
        ignore_extra: accept and ignore keyword arguments :meth:`forward` does not know (terratorch's
            tasks pass every other field of their batch); False makes them an error.
    """

    def __init__(
        self,
        encoder: nn.Module,
        out_indices: int | Sequence[int] | None = None,
        *,
        bands: Sequence[str | Band] | None = None,
        wavelengths: FloatsLike | None = None,
        bandwidths: FloatsLike | None = None,
        kinds: Sequence[str] | None = None,
        gsd: float | None = None,
        norm: bool = True,
        reduce: str = "summary",
        reshape: bool = True,
        prune: bool = True,
        ignore_extra: bool = False,
    ) -> None:
        super().__init__()
        enc = _encoder_of(encoder)
        depth = len(enc.blocks)
        self.out_indices = self._check_indices(out_indices, depth)
        if reduce not in ("summary", "mean"):
            raise ValueError(f"reduce must be 'summary' or 'mean', got {reduce!r}")
        self.reduce, self.norm, self.reshape, self.ignore_extra = reduce, norm, reshape, ignore_extra
        self.depth = depth  # of the encoder as given (out_indices refer to it)
        self.patch_size = enc.patch_size
        self.embed_dim = enc.embed_dim
        if prune:
            enc.blocks = nn.ModuleList(list(enc.blocks)[: max(self.out_indices) + 1])
            enc.head = nn.Identity()
            if not norm:
                enc.norm = nn.Identity()
        self.encoder = enc
        self.train(enc.training)  # the wrapped model's mode (eval as gfm.from_pretrained loads it)
        self.feature_info = FeatureInfo(
            [dict(module=f"encoder.blocks.{i}", num_chs=self.embed_dim, reduction=self.patch_size)
             for i in range(depth)],
            tuple(self.out_indices),
        )
        self.gsd = gsd
        self.sensor: list[int] | None = None
        if bands is not None:
            if wavelengths is not None or bandwidths is not None or kinds is not None:
                raise ValueError("give the bands either as `bands` or as `wavelengths` (+ bandwidths, kinds), not both")
            described = [_band(b) for b in bands]
            wavelengths = [b.center_nm for b in described]
            bandwidths = [b.fwhm_nm for b in described]
            kinds = [b.kind for b in described]
            self.sensor = [sensor_code(b.sensor) for b in described]
        self.wavelengths = None if wavelengths is None else torch.as_tensor(wavelengths, dtype=torch.float32)
        self.bandwidths = None if bandwidths is None else torch.as_tensor(bandwidths, dtype=torch.float32)
        self.kinds = None if kinds is None else self._kind_codes(kinds)
        if self.wavelengths is not None:
            n = self.wavelengths.shape[-1]
            for name, t in (("bandwidths", self.bandwidths), ("kinds", self.kinds)):
                if t is not None and t.shape[-1] != n:
                    raise ValueError(f"{t.shape[-1]} {name} were given for {n} wavelengths")

    @staticmethod
    def _check_indices(out_indices: int | Sequence[int] | None, depth: int) -> list[int]:
        if out_indices is None:
            return default_out_indices(depth)
        if isinstance(out_indices, int):
            if not 1 <= out_indices <= depth:
                raise ValueError(f"out_indices={out_indices} (the last n blocks) must lie in 1..{depth}: the encoder "
                                 f"has depth {depth}")
            return list(range(depth - out_indices, depth))
        chosen = [int(i) for i in out_indices]
        wrong = [i for i in chosen if not -depth <= i < depth]
        if wrong or not chosen:
            raise ValueError(f"out_indices {chosen} must be non-empty block indices in {-depth}..{depth - 1}: the "
                             f"encoder has depth {depth} (out of range: {wrong})")
        return [i % depth for i in chosen]

    @staticmethod
    def _kind_codes(kinds: Sequence[str]) -> torch.Tensor:
        unknown = sorted({k for k in kinds if k not in KIND_CODE})
        if unknown:
            raise ValueError(f"unknown band kinds {unknown}; known: {', '.join(KIND_CODE)}")
        return torch.tensor([KIND_CODE[k] for k in kinds], dtype=torch.long)

    # --------------------------------------------------------------------------------------------
    # Construction by name

    @classmethod
    def create(cls, name: str, out_indices: int | Sequence[int] | None = None, **kwargs: Any) -> GFMBackbone:
        """A randomly initialised backbone of the registered variant ``name`` (:func:`gfm.model.create_model`).

        ``kwargs`` naming an argument of this class go to it, the rest to the model builder:
        ``GFMBackbone.create("less_vit_tiny", depth=2, out_indices=[0, 1], wavelengths=[490, 560, 665])``.
        A pretraining variant (``hypermae_*``) gives its encoder.
        """
        own, model_kwargs = _split_kwargs(kwargs)
        return cls(create_model(name, **model_kwargs), out_indices, **own)

    # --------------------------------------------------------------------------------------------
    # Forward

    @property
    def out_channels(self) -> list[int]:
        """Channels of each returned map (``D`` each), what terratorch's necks and decoders read."""
        return [self.embed_dim] * len(self.out_indices)

    def batch(
        self,
        x: torch.Tensor,
        wavelengths: FloatsLike | None = None,
        *,
        bandwidths: FloatsLike | None = None,
        kinds: Sequence[str] | None = None,
        valid: torch.Tensor | None = None,
        gsd: float | torch.Tensor | None = None,
        time: float | torch.Tensor | None = None,
        lonlat: torch.Tensor | None = None,
    ) -> Batch:
        """The :class:`Batch` of ``x: [B, C, H, W]`` and its bands (arguments as :meth:`forward`)."""
        if x.ndim != 4:
            raise ValueError(f"x must be [B, C, H, W], got shape {tuple(x.shape)}")
        B, C = int(x.shape[0]), int(x.shape[1])
        device = x.device

        def per_band(value: Any, default: torch.Tensor | None, name: str, fill: float, dtype: torch.dtype,
                     ) -> torch.Tensor:
            t = torch.as_tensor(value if value is not None else default if default is not None else fill,
                                dtype=dtype, device=device)
            if t.ndim >= 1 and t.shape[-1] != C:
                raise ValueError(f"x has {C} bands (shape {tuple(x.shape)}), but {t.shape[-1]} {name} were given")
            if t.ndim == 2 and t.shape[0] != B:
                raise ValueError(f"x holds {B} samples, but {name} are given for {t.shape[0]}")
            return t.expand(B, C).clone() if t.ndim < 2 else t

        if wavelengths is None and self.wavelengths is None:
            raise ValueError("no wavelengths: pass them to forward() or give bands/wavelengths to GFMBackbone")
        kind_codes = None if kinds is None else self._kind_codes(kinds)
        if valid is not None and valid.ndim == 3:  # [B, H, W]: the same mask for every band
            valid = valid[:, None].expand(-1, C, -1, -1)
        gsd = self.gsd if gsd is None else gsd
        per_tile = torch.as_tensor(math.nan if gsd is None else gsd, dtype=torch.float32, device=device)
        days = torch.as_tensor(math.nan if time is None else time, dtype=torch.float32, device=device)
        own = wavelengths is None  # the constructor's band description, unless forward() describes the bands
        return Batch(
            pixels=x,
            wavelength=per_band(wavelengths, self.wavelengths, "wavelengths", math.nan, torch.float32),
            bandwidth=per_band(bandwidths, self.bandwidths if own else None, "bandwidths", math.nan, torch.float32),
            kind=per_band(kind_codes, self.kinds if own else None, "kinds", KIND_CODE["reflectance"], torch.long),
            time=(days[:, None] if days.ndim == 1 else days).expand(B, C).clone(),  # scalar, [B] or [B, C]
            valid=torch.ones(x.shape, dtype=torch.bool, device=device) if valid is None else valid.bool(),
            gsd=per_tile.expand(B).clone(),
            lonlat=None if lonlat is None else torch.as_tensor(lonlat, dtype=torch.float32, device=device).expand(B, 2),
            sensor=per_band(self.sensor, None, "sensor ids", 0, torch.long) if own and self.sensor else None,
        )

    def forward(
        self,
        x: torch.Tensor,
        wavelengths: FloatsLike | None = None,
        *,
        bandwidths: FloatsLike | None = None,
        kinds: Sequence[str] | None = None,
        valid: torch.Tensor | None = None,
        gsd: float | torch.Tensor | None = None,
        time: float | torch.Tensor | None = None,
        lonlat: torch.Tensor | None = None,
        **extra: Any,
    ) -> list[torch.Tensor]:
        """Feature maps of ``x`` from the chosen blocks, in ``out_indices`` order.

        Args:
            x: ``[B, C, H, W]`` band values, normalised as the encoder was trained (NaN = no value).
            wavelengths: ``[C]`` or ``[B, C]`` centre wavelengths in nm (default: the constructor's bands;
                given, they describe other bands: the constructor's bandwidths, kinds and sensor ids are
                not used).
            bandwidths: ``[C]`` or ``[B, C]`` FWHM in nm (default: the constructor's, else unknown).
            kinds: ``C`` kind names (default: the constructor's, else reflectance).
            valid: ``[B, C, H, W]`` or ``[B, H, W]`` bool, False = no value (default: every finite pixel).
            gsd: metres, a float or ``[B]`` (NaN or None = unknown).
            time: acquisition date as days since 1970-01-01: a float, ``[B]`` or ``[B, C]`` (None = unknown).
            lonlat: ``[2]`` or ``[B, 2]`` tile centre in WGS84 degrees (None = unknown).
            extra: ignored with ``ignore_extra``, else an error.

        Returns:
            One ``[B, D, ⌈H/p⌉, ⌈W/p⌉]`` map per entry of ``out_indices`` (``[B, N, D]`` without ``reshape``).
        """
        if extra and not self.ignore_extra:
            raise TypeError(f"GFMBackbone.forward got unexpected keyword arguments {sorted(extra)}")
        return self.forward_batch(self.batch(x, wavelengths, bandwidths=bandwidths, kinds=kinds, valid=valid,
                                             gsd=gsd, time=time, lonlat=lonlat))

    def forward_batch(self, inputs: Inputs) -> list[torch.Tensor]:
        """Feature maps of a :class:`Batch` (or a mapping of its fields), as :meth:`forward` returns them."""
        enc = self.encoder
        tokens = enc.embed(inputs)
        mask = enc.grid_mask(tokens.token_valid, tokens.pitch, tokens.grid_hw)
        wanted = sorted(set(self.out_indices))
        _, kept = enc.forward_tokens(tokens.x, mask, wanted)  # block outputs [B, G+1, N+1, D], un-normed
        maps = {i: self.fold(x, tokens.token_valid, tokens.grid_hw) for i, x in zip(wanted, kept)}
        return [maps[i] for i in self.out_indices]

    def fold(self, x: torch.Tensor, token_valid: torch.Tensor, grid_hw: tuple[int, int]) -> torch.Tensor:
        """A block's grid ``[B, G+1, N+1, D]`` → ``[B, D, h, w]`` (or ``[B, N, D]``), by ``reduce``.

        ``token_valid: [B, G, N]`` marks the observation tokens holding a valid pixel.
        """
        if self.norm:
            x = self.encoder.norm(x)
        if self.reduce == "summary":
            out = x[:, 0, 1:]  # [B, N, D]: the summary row, one token per position
        else:
            weight = token_valid.to(x.dtype).unsqueeze(-1)  # [B, G, N, 1]
            out = (x[:, 1:, 1:] * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1.0)
        if not self.reshape:
            return out
        h, w = grid_hw
        return rearrange(out, "b (h w) d -> b d h w", h=h, w=w)


def _split_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``kwargs`` split into :class:`GFMBackbone` arguments and the rest (the model builder's)."""
    names = set(inspect.signature(GFMBackbone.__init__).parameters) - {"self", "encoder", "out_indices"}
    return {k: v for k, v in kwargs.items() if k in names}, {k: v for k, v in kwargs.items() if k not in names}
