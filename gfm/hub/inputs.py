"""Raw sensor values + band descriptions → the model's input, normalised with the stored statistics."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import numpy as np
import torch

from gfm.batch import Batch
from gfm.hub.base import HubError, Pooling, UnknownBandsError
from gfm.hub.config import stats_of
from gfm.sensors import KIND_CODE, SensorError, get_sensor


def _band_key(band: Any) -> tuple[str, dict[str, Any]]:
    """``("sensor/name", description)`` of a band given as a key string, a mapping or a ``gfm.sensors.Band``."""
    if isinstance(band, str):
        if "/" not in band:
            raise HubError(f"band {band!r}: name bands as '<sensor>/<band>' (e.g. 'sentinel2_l2a/B04')")
        sensor, _, name = band.partition("/")
        return band, {"sensor": sensor, "name": name}
    if isinstance(band, Mapping):
        d = dict(band)
    elif hasattr(band, "to_dict"):
        d = dict(band.to_dict())
    else:
        raise HubError(f"band {band!r}: expected '<sensor>/<band>', a mapping or a gfm.sensors.Band")
    if "sensor" not in d or "name" not in d:
        raise HubError(f"band {d!r}: a band description needs 'sensor' and 'name'")
    return f"{d['sensor']}/{d['name']}", d


def _days(date: Any) -> float:
    if date is None or (isinstance(date, float) and math.isnan(date)):
        return math.nan
    return float((np.datetime64(str(date)[:10], "D") - np.datetime64("1970-01-01", "D")).astype(np.int64))


@dataclass
class InputBands:
    """A band set matched to the model's statistics: turns raw arrays into :class:`Batch` objects.

    Attributes:
        keep: indices of the observations used (bands without statistics dropped with ``unknown="drop"``).
        table: per kept observation, its description (name, sensor, center_nm, fwhm_nm, kind, time) with
            its ``mean`` and ``std``.
        dropped: ``"sensor/band"`` keys left out.
    """

    keep: list[int]
    table: list[dict[str, Any]]
    dropped: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        std = np.array([t["std"] for t in self.table], dtype=np.float32)
        self.mean = np.array([t["mean"] for t in self.table], dtype=np.float32)
        self.std = np.where(std > 0, std, np.float32(1.0)).astype(np.float32)
        self.wavelength = torch.tensor([t["center_nm"] for t in self.table], dtype=torch.float32)
        self.bandwidth = torch.tensor([t["fwhm_nm"] or 10.0 for t in self.table], dtype=torch.float32)
        self.kind = torch.tensor([KIND_CODE[t["kind"] or "reflectance"] for t in self.table], dtype=torch.int64)
        self.time = torch.tensor([_days(t["time"]) for t in self.table], dtype=torch.float32)
        from gfm import batch as batch_module

        code = getattr(batch_module, "sensor_code", None)
        self.sensor = torch.tensor([code(t["sensor"]) for t in self.table]) if code is not None else None

    @property
    def keys(self) -> list[str]:
        """``"sensor/band"`` of each kept observation."""
        return [f"{t['sensor']}/{t['name']}" for t in self.table]

    def batch(
        self,
        pixels: np.ndarray,
        valid: np.ndarray,
        *,
        gsd: float | None = None,
        lonlat: np.ndarray | None = None,
        keys: Sequence[str] = (),
    ) -> Batch:
        """``pixels [B, C, H, W]`` raw values of *all* observations + ``valid`` (same shape) → a Batch.

        Normalises as the training loader does, ``(raw - mean) / std`` in float32 with invalid pixels set
        to 0; ``lonlat`` is ``[B, 2]`` (NaN rows: unknown).
        """
        px, mask = pixels[:, self.keep], valid[:, self.keep]
        x = px.astype(np.float32)
        x -= self.mean[None, :, None, None]
        x *= (1.0 / self.std)[None, :, None, None]
        x[~mask] = 0.0
        b, c = x.shape[:2]
        tensors: dict[str, Any] = {
            "pixels": torch.from_numpy(x),
            "wavelength": self.wavelength.expand(b, c).clone(),
            "bandwidth": self.bandwidth.expand(b, c).clone(),
            "kind": self.kind.expand(b, c).clone(),
            "time": self.time.expand(b, c).clone(),
            "valid": torch.from_numpy(np.ascontiguousarray(mask)),
            "gsd": torch.full((b,), math.nan if gsd is None else float(gsd), dtype=torch.float32),
            "keys": list(keys),
        }
        optional = {f.name for f in fields(Batch)}
        if "lonlat" in optional and lonlat is not None:
            tensors["lonlat"] = torch.as_tensor(np.asarray(lonlat, dtype=np.float32).reshape(b, 2))
        if "sensor" in optional and self.sensor is not None:
            tensors["sensor"] = self.sensor.expand(b, c).clone()
        return Batch(**tensors)


#: the tolerance (nm) on centre wavelengths when neither band's FWHM is known, and its least value otherwise
WAVELENGTH_TOLERANCE_NM = 1.0


def _tolerance(a: Mapping[str, Any], b: Mapping[str, Any]) -> float:
    """How far two descriptions of one band may put its centre: the narrower FWHM (at least 1 nm)."""
    widths = [float(w) for w in (a.get("fwhm_nm"), b.get("fwhm_nm")) if w]
    return max(WAVELENGTH_TOLERANCE_NM, min(widths)) if widths else WAVELENGTH_TOLERANCE_NM


def _registered(sensor: str) -> bool:
    try:
        get_sensor(sensor)
    except (SensorError, KeyError):
        return False
    return True


def _nearest(full: Mapping[str, Any], entries: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The key of the band's sensor's entry nearest its centre wavelength, within the tolerance (else None)."""
    best, gap = None, math.inf
    for key, e in entries.items():
        if e.get("sensor") != full["sensor"] or e.get("center_nm") is None:
            continue
        d = abs(float(e["center_nm"]) - float(full["center_nm"]))
        if d <= _tolerance(full, e) and d < gap:
            best, gap = key, d
    return best


def _described(key: str, desc: dict[str, Any], entries: Mapping[str, Mapping[str, Any]], where: str) -> dict[str, Any]:
    """The band's full description: its own values, else the sensor registry's, else the model's entry for its key."""
    ref = entries.get(key, {})
    full = {k: desc.get(k) for k in ("name", "sensor", "center_nm", "fwhm_nm", "kind")}
    if full["center_nm"] is None:
        try:
            b = get_sensor(str(full["sensor"])).band(str(full["name"]))
            full.update(center_nm=b.center_nm, fwhm_nm=b.fwhm_nm, kind=b.kind)
        except (SensorError, KeyError):
            if ref.get("center_nm") is None:
                raise HubError(f"{where}band {key!r}: no wavelength given and none known for it") from None
            full.update({k: ref.get(k) for k in ("center_nm", "fwhm_nm", "kind")})
    for k in ("fwhm_nm", "kind"):
        if full[k] is None:
            full[k] = ref.get(k)
    return full


def _match(key: str, full: Mapping[str, Any], entries: Mapping[str, Mapping[str, Any]], where: str) -> str | None:
    """The key of the model's entry whose statistics the band takes (None: the model has none for it).

    A registered sensor's band is its own key, its wavelength checked. Any other sensor's bands (a
    hyperspectral cube's ``B001``.. are positions in a file) are keyed by wavelength: the same sensor's
    entry nearest the band's centre within the tolerance.

    Raises:
        HubError: the model's entry for the band's key lies at another wavelength (and, for a sensor that
            is not registered, no entry lies at the band's).
    """
    entry = entries.get(key)
    center = full["center_nm"]

    def contradiction() -> HubError:
        assert entry is not None
        return HubError(f"{where}band {key!r} is at {float(center):g} nm, but the model's statistics for {key!r} "
                        f"are for {float(entry['center_nm']):g} nm and it has none for {full['sensor']} at "
                        f"{float(center):g} nm; check the band order and wavelengths")

    known_center = entry is not None and entry.get("center_nm") is not None
    if _registered(str(full["sensor"])) or center is None:
        if entry is not None and known_center and center is not None and (
                abs(float(entry["center_nm"]) - float(center)) > _tolerance(full, entry)):
            raise contradiction()
        return key if entry is not None else None
    found = _nearest(full, entries)
    if found is None and known_center:
        raise contradiction()
    return found if found is not None else (key if entry is not None else None)


def input_bands(
    bands: Sequence[Any],
    config: Mapping[str, Any],
    stats: Mapping[str, Mapping[str, Any]] | None = None,
    unknown: Literal["error", "drop"] = "error",
    where: str = "",
) -> InputBands:
    """Match band descriptions to the model's statistics by physics (explicit ``stats`` win over the model's own).

    A band of a registered sensor (:mod:`gfm.sensors`) takes the statistics of the model's entry with its
    ``"sensor/band"`` key, and that entry's centre wavelength must agree with the band's (within the
    narrower FWHM, at least 1 nm). The bands of any other sensor (hyperspectral cubes, whose ``B001``..
    names are positions in a file) are keyed by wavelength: each takes the same sensor's entry nearest its
    centre within that tolerance, so a reordered or subset cube gets each band's own statistics. A band
    whose key the model knows at another wavelength, with no entry at its own, is refused naming both.

    Args:
        bands: one per observation: ``"sensor/band"``, a mapping (``name``, ``sensor`` and optionally
            ``center_nm``, ``fwhm_nm``, ``kind``, ``time``) or a ``gfm.sensors.Band``.
        config: the exported ``config.json``.
        stats: extra or overriding ``"sensor/band"`` → ``{"mean", "std"}`` (and optionally ``center_nm``,
            ``fwhm_nm``: then matched by wavelength too).
        unknown: ``"error"`` refuses bands without statistics, ``"drop"`` leaves them out.
        where: prefix of error messages (the scene or file).

    Raises:
        UnknownBandsError: a band has no statistics and ``unknown`` is ``"error"`` (or no band is left).
        HubError: a band's wavelength contradicts the model's entry for its key.
    """
    table = dict(config.get("bands") or {})
    entries: dict[str, dict[str, Any]] = {}
    for key, st in stats_of(config).items():
        described = {k: (table.get(key) or {}).get(k) for k in ("name", "sensor", "center_nm", "fwhm_nm", "kind")}
        entries[key] = {**described, **st}
    for key, v in (stats or {}).items():
        sensor, _, name = key.partition("/")
        base = entries.get(key) or {"name": name, "sensor": sensor}
        described = {k: v[k] for k in ("center_nm", "fwhm_nm", "kind") if v.get(k) is not None}
        entries[key] = {**base, **described, "mean": float(v["mean"]), "std": float(v["std"])}
    keep: list[int] = []
    out: list[dict[str, Any]] = []
    missing: list[str] = []
    for i, band in enumerate(bands):
        key, desc = _band_key(band)
        if key not in entries and not any(e.get("sensor") == desc["sensor"] for e in entries.values()):
            missing.append(key)
            continue
        full = _described(key, desc, entries, where)
        found = _match(key, full, entries, where)
        if found is None:
            missing.append(key)
            continue
        full["time"] = desc.get("time")
        full.update(mean=float(entries[found]["mean"]), std=float(entries[found]["std"]))
        keep.append(i)
        out.append(full)
    known = sorted(entries)
    if missing and unknown == "error":
        raise UnknownBandsError(missing, known, where)
    if not out:
        raise UnknownBandsError(missing, known, f"{where}no band left: ")
    return InputBands(keep, out, missing)


def prepare(
    pixels: Any,
    bands: Sequence[Any],
    config: Mapping[str, Any],
    *,
    valid: Any = None,
    nodata: float | Sequence[float | None] | None = None,
    dates: Sequence[str | None] | None = None,
    gsd: float | None = None,
    lonlat: Sequence[float] | None = None,
    stats: Mapping[str, Mapping[str, Any]] | None = None,
    unknown: Literal["error", "drop"] = "error",
) -> Batch:
    """Raw sensor values + band descriptions → the model's input, normalised as in pretraining.

    Args:
        pixels: ``[C, H, W]`` or ``[B, C, H, W]`` raw values (numpy or torch; any dtype).
        bands: one per observation: ``"sensor/band"``, a mapping (``name``, ``sensor`` and optionally
            ``center_nm``, ``fwhm_nm``, ``kind``, ``time``) or a ``gfm.sensors.Band``.
        config: the exported ``config.json`` (its statistics and band table).
        valid: optional mask (same shape as ``pixels`` or ``[.., H, W]``), True = usable.
        nodata: raw value(s) that mean "no data" (one, or one per observation).
        dates: acquisition date per observation (``YYYY-MM-DD``), overriding the bands' ``time``.
        gsd: ground sampling distance in metres (unknown: NaN, the model's "unknown" path).
        lonlat: tile centre (longitude, latitude), when known.
        stats: extra or overriding statistics ``"sensor/band"`` → ``{"mean", "std"}``.
        unknown: ``"error"`` (default) refuses bands without statistics; ``"drop"`` leaves them out.

    Returns:
        A :class:`Batch`; invalid pixels are 0 and False in ``valid``.
    """
    px = pixels.detach().cpu().numpy() if isinstance(pixels, torch.Tensor) else np.asarray(pixels)
    squeeze = px.ndim == 3
    if squeeze:
        px = px[None]
    if px.ndim != 4:
        raise HubError(f"pixels: expected [C, H, W] or [B, C, H, W], got shape {px.shape}")
    b, c, _h, _w = px.shape
    if len(bands) != c:
        raise HubError(f"bands: {len(bands)} descriptions for {c} observations in pixels")
    if dates is not None:
        if len(dates) != c:
            raise HubError(f"dates: {len(dates)} dates for {c} observations")
        bands = [{**_band_key(band)[1], "time": d} for band, d in zip(bands, dates)]
    spec = input_bands(bands, config, stats, unknown)
    mask = np.ones(px.shape, dtype=bool)
    if valid is not None:
        v = (valid.detach().cpu().numpy() if isinstance(valid, torch.Tensor) else np.asarray(valid)).astype(bool)
        if squeeze:
            v = v[None]  # [1, C, H, W] or [1, H, W]
        if v.ndim == 3:
            v = v[:, None]  # one mask for every observation
        try:
            mask &= np.broadcast_to(v, px.shape)
        except ValueError:
            raise HubError(f"valid: shape {np.shape(valid)} does not fit pixels {px.shape}") from None
    if nodata is not None:
        nd = list(nodata) if isinstance(nodata, Sequence) else [nodata] * c
        if len(nd) != c:
            raise HubError(f"nodata: {len(nd)} values for {c} observations")
        for i, value in enumerate(nd):
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                mask[:, i] &= px[:, i] != value
    if px.dtype.kind == "f":
        mask &= np.isfinite(px)
    ll = None if lonlat is None else np.tile(np.asarray(lonlat, dtype=np.float32), (b, 1))
    return spec.batch(px, mask, gsd=gsd, lonlat=ll)


def pool(
    tokens: torch.Tensor, inputs: Batch | Mapping[str, torch.Tensor], pooling: Pooling, patch: int
) -> torch.Tensor:
    """``[B, C+1, N+1, D]`` tokens → ``[B, D]``.

    ``cls``: the global CLS token. ``mean``: the mean of the per-position summary tokens
    ``tokens[:, 0, 1:]`` over positions with at least one valid pixel (all positions when none is).
    """
    if pooling == "cls":
        return tokens[:, 0, 0]
    if pooling != "mean":
        raise HubError(f"pooling: expected 'mean' or 'cls', got {pooling!r}")
    per_pos = tokens[:, 0, 1:]  # [B, N, D]
    valid = inputs.valid if isinstance(inputs, Batch) else inputs.get("valid")
    if valid is None:
        return per_pos.mean(dim=1)
    weight = position_validity(valid, patch).to(per_pos.dtype)  # [B, N]
    weight = torch.where(weight.sum(1, keepdim=True) > 0, weight, torch.ones_like(weight))
    return (per_pos * weight[..., None]).sum(1) / weight.sum(1, keepdim=True)


def position_validity(valid: torch.Tensor, patch: int) -> torch.Tensor:
    """``[B, C, H, W]`` pixel validity → ``[B, N]``: True where a patch holds any valid pixel (padding invalid)."""
    any_obs = valid.any(dim=1).float()  # [B, H, W]
    h, w = any_obs.shape[-2:]
    ph, pw = -h % patch, -w % patch
    any_obs = torch.nn.functional.pad(any_obs, (0, pw, 0, ph))
    pooled = torch.nn.functional.max_pool2d(any_obs[:, None], patch)[:, 0]  # [B, h/p, w/p]
    return pooled.flatten(1) > 0
