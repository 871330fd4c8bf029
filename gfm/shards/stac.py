"""STAC items → scenes: each item of a static ItemCollection (or a single Item) file becomes one scene.

The item's ``id`` is the scene id, its ``datetime`` (or ``start_datetime``) the date, and its chosen
assets the scene's files, their ``href`` made absolute against the item's ``self`` link, else against
the file the items were read from (a URL is read in place, :mod:`gfm.shards.remote`).

Assets: those named (``assets``), else every asset whose roles include ``data`` and whose media type is a
GeoTIFF (cloud-optimised or not).

Bands: when the item's ``platform`` is one a registered sensor describes (``sentinel-2a`` →
``sentinel2_l2a``, or ``sentinel2_l1c`` for a Level-1C collection; Landsat 5-9; Sentinel-1), each asset
is matched to the preset's band by its name (asset key or ``eo:bands`` name) or else by its
``eo:bands`` centre wavelength; an asset whose centre wavelength disagrees with the preset band it is
named after is refused with both values. Otherwise the assets describe a sensor of their own,
``stac_<collection>``, registered for the build: ``eo:bands`` (``name``, ``center_wavelength`` and
``full_width_half_max`` in µm → nm; or STAC 1.1 ``bands`` with ``eo:`` fields), ``gsd``, and
``raster:bands`` (``nodata``, ``scale``, ``offset``).

Static files only: searching a STAC API (``pystac-client``) is not done here. Needs ``pystac``
(``pip install 'gfm[stac]'``), imported when items are read.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

from gfm.sensors import Band, Sensor, SensorError, get_sensor, register
from gfm.shards.errors import InputError
from gfm.shards.remote import is_remote
from gfm.shards.spec import DateSpec, FileSpec, SceneSpec

_GEOTIFF = re.compile(r"^image/(?:tiff|vnd\.stac\.geotiff)", re.IGNORECASE)
# platform → presets that describe it (the first unless the collection says Level-1C)
_PLATFORMS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (r"sentinel-?2[a-d]?", ("sentinel2_l2a", "sentinel2_l1c")),
    (r"landsat-?9", ("landsat9",)),
    (r"landsat-?8", ("landsat8",)),
    (r"landsat-?7", ("landsat7",)),
    (r"landsat-?[45]", ("landsat5",)),
    (r"sentinel-?1[a-d]?", ("sentinel1_grd",)),
)
_MIN_TOLERANCE_NM = 10.0  # a STAC centre wavelength may differ from the preset's by half a band width, at least this


@dataclass
class StacScenes:
    """What :func:`load_stac` made of an items file.

    Attributes:
        scenes: one :class:`SceneSpec` per item, in file order.
        sensors: sensors registered from the items' band descriptions (name → sensor).
        notices: assets skipped and sensors chosen, one line each.
    """

    scenes: list[SceneSpec]
    sensors: dict[str, Sensor] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)


def _pystac() -> Any:
    try:
        import pystac
    except ImportError:
        raise InputError("reading STAC items needs pystac: pip install 'gfm[stac]' (or pip install pystac)") from None
    return pystac


def load_stac(path: str | Path, assets: Sequence[str] | None = None) -> StacScenes:
    """The scenes of a static STAC ItemCollection (or single Item) JSON file (see the module docstring).

    Args:
        path: a local JSON file holding a ``FeatureCollection`` of items, or one ``Feature``.
        assets: asset keys to read from every item; None: every GeoTIFF data asset.

    Raises:
        InputError: an unreadable file, an item without a requested asset, an asset without usable band
            descriptions, or one that disagrees with the registered sensor (naming the item and asset).
    """
    pystac = _pystac()
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except OSError as e:
        raise InputError(f"{p}: cannot read STAC items ({e.strerror})") from None
    except ValueError as e:
        raise InputError(f"{p}: not JSON ({e})") from None
    kind = doc.get("type") if isinstance(doc, dict) else None
    try:
        if kind == "FeatureCollection":
            items = list(pystac.ItemCollection.from_dict(doc).items)
        elif kind == "Feature":
            items = [pystac.Item.from_dict(doc)]
        else:
            raise InputError(f"{p}: expected a STAC ItemCollection (type FeatureCollection) or Item (type Feature), "
                             f"got type {kind!r}")
    except (KeyError, ValueError, TypeError, pystac.STACError) as e:
        raise InputError(f"{p}: not a valid STAC item file ({type(e).__name__}: {e})") from None
    if not items:
        raise InputError(f"{p}: holds no STAC items")
    out = StacScenes([])
    base = str(p.resolve())
    for item in items:
        out.scenes.append(_scene(item, base, assets, out))
    return out


def _scene(item: Any, base: str, wanted: Sequence[str] | None, out: StacScenes) -> SceneSpec:
    where = f"STAC item {item.id!r}"
    when = item.datetime or item.common_metadata.start_datetime
    date = when.date().isoformat() if when is not None else None
    chosen = _chosen_assets(item, wanted, where)
    preset = _preset(item)
    files = []
    if preset is not None:
        for key, asset in chosen:
            fs = _preset_file(item, key, asset, preset, base, explicit=wanted is not None)
            if fs is None:
                out.notices.append(f"notice: {where}: asset {key!r} is not a band of {preset.name}; skipped")
            else:
                files.append(fs)
        if not files:
            raise InputError(f"{where}: none of its assets ({', '.join(k for k, _ in chosen)}) is a band of "
                             f"{preset.name}; choose them with {{assets}}", assets=None)
    else:
        sensor, per_asset = _own_sensor(item, chosen, where, out)
        for (_, asset), bands in zip(chosen, per_asset):
            files.append(FileSpec(_href(item, asset, base), sensor.name, [b.name for b in bands], _nodata(asset)))
    return SceneSpec(id=item.id, dates=[DateSpec(date, files)])


def _chosen_assets(item: Any, wanted: Sequence[str] | None, where: str) -> list[tuple[str, Any]]:
    if wanted is not None:
        missing = [k for k in wanted if k not in item.assets]
        if missing:
            raise InputError(f"{where}: no asset {missing[0]!r}; it has {', '.join(item.assets) or 'none'}")
        return [(k, item.assets[k]) for k in wanted]
    chosen = [(k, a) for k, a in item.assets.items()
              if "data" in (a.roles or []) and _GEOTIFF.match(a.media_type or "")]
    if not chosen:
        raise InputError(f"{where}: no GeoTIFF asset with role 'data' (its assets: {', '.join(item.assets) or 'none'});"
                         " name them with {assets}", assets=None)
    return chosen


def _href(item: Any, asset: Any, base: str) -> str:
    """The asset's href, absolute: against the item's self link, else against the items file."""
    href = str(asset.href)
    if is_remote(href) or os.path.isabs(href) or href.startswith("file://"):
        return href[len("file://"):] if href.startswith("file://") else href
    self_href = item.get_self_href() or base
    if is_remote(self_href):
        return urljoin(self_href, href)
    return os.path.normpath(os.path.join(os.path.dirname(self_href), href))


def _preset(item: Any) -> Sensor | None:
    platform = str(item.properties.get("platform") or "").lower()
    for pattern, names in _PLATFORMS:
        if re.fullmatch(pattern, platform):
            level = " ".join(str(x) for x in (item.collection_id, item.properties.get("processing:level"),
                                               item.properties.get("s2:product_type")))
            name = names[1] if len(names) > 1 and re.search(r"l1c", level, re.IGNORECASE) else names[0]
            return get_sensor(name)
    return None


def _eo_bands(asset: Any) -> list[dict[str, Any]]:
    """The asset's band descriptions: ``eo:bands`` (STAC 1.0) or ``bands`` with ``eo:`` fields (STAC 1.1)."""
    fields = asset.extra_fields
    if isinstance(fields.get("eo:bands"), list):
        return [b for b in fields["eo:bands"] if isinstance(b, dict)]
    if isinstance(fields.get("bands"), list):
        return [{"name": b.get("name"), "center_wavelength": b.get("eo:center_wavelength"),
                 "full_width_half_max": b.get("eo:full_width_half_max"), **b}
                for b in fields["bands"] if isinstance(b, dict)]
    return []


def _raster_bands(asset: Any) -> list[dict[str, Any]]:
    fields = asset.extra_fields
    if isinstance(fields.get("raster:bands"), list):
        return [b for b in fields["raster:bands"] if isinstance(b, dict)]
    if isinstance(fields.get("bands"), list):
        return [b for b in fields["bands"] if isinstance(b, dict)]
    return []


def _nodata(asset: Any) -> float | None:
    for b in _raster_bands(asset):
        if b.get("nodata") is not None:
            try:
                return float(b["nodata"])
            except (TypeError, ValueError):
                return None
    return None


def _preset_file(item: Any, key: str, asset: Any, preset: Sensor, base: str, *, explicit: bool) -> FileSpec | None:
    """The asset as a file of ``preset``'s bands; None when it is not one (refused when named explicitly)."""
    where = f"STAC item {item.id!r}: asset {key!r}"
    eo = _eo_bands(asset)
    if preset.quality is not None and preset.quality.name.lower() in (key.lower(), *(
            str(b.get("name", "")).lower() for b in eo)):
        # the product's quality layer: the scene opener recognises it and turns it into validity rules
        return FileSpec(_href(item, asset, base), preset.name, None, _nodata(asset))
    count = max(1, len(eo))
    names: list[str] = []
    for i in range(count):
        desc = eo[i] if i < len(eo) else {}
        band = _match(preset, key if count == 1 else None, desc, where)
        if band is None:
            if explicit:
                raise InputError(f"{where}: not recognised as a band of {preset.name} by its name or centre "
                                 f"wavelength; expected one of {', '.join(preset.band_names)}")
            return None
        names.append(band.name)
    return FileSpec(_href(item, asset, base), preset.name, names, _nodata(asset))


def _match(preset: Sensor, key: str | None, desc: dict[str, Any], where: str) -> Band | None:
    """The preset band named by ``key`` or ``desc['name']``, checked against ``desc``'s centre; else by centre."""
    center = _nm(desc.get("center_wavelength"))
    for name in (desc.get("name"), key):
        if isinstance(name, str) and preset.has_band(name):
            band = preset.band(name)
            if center is not None and abs(center - band.center_nm) > _tolerance(band):
                raise InputError(f"{where}: eo:bands centre wavelength {center:g} nm disagrees with band {band.name} "
                                 f"of the registered sensor {preset.name} ({band.center_nm:g} nm)")
            return band
    if center is None:
        return None
    near = min(preset.bands, key=lambda b: abs(b.center_nm - center))
    return near if abs(near.center_nm - center) <= _tolerance(near) else None


def _tolerance(band: Band) -> float:
    return max(band.fwhm_nm, _MIN_TOLERANCE_NM) / 2


def _nm(micrometres: Any) -> float | None:
    try:
        value = float(micrometres)
    except (TypeError, ValueError):
        return None
    return value * 1000.0 if math.isfinite(value) and value > 0 else None


def _asset_bands(item: Any, key: str, asset: Any, sensor: str, where: str) -> list[Band]:
    """Bands of one asset of an unregistered sensor, from ``eo:bands``, ``gsd`` and ``raster:bands``."""
    eo = _eo_bands(asset)
    if not eo:
        raise InputError(f"{where}: asset {key!r} has no eo:bands (centre wavelength and band width), and its "
                         "platform is not a registered sensor; describe the sensor in YAML (gfm sensors) and list "
                         "the files in a manifest")
    raster = _raster_bands(asset)
    gsd = asset.extra_fields.get("gsd", item.properties.get("gsd"))
    bands = []
    for i, desc in enumerate(eo):
        name = str(desc.get("name") or (key if len(eo) == 1 else f"{key}_{i + 1}"))
        center, fwhm = _nm(desc.get("center_wavelength")), _nm(desc.get("full_width_half_max"))
        if center is None or fwhm is None:
            what = "center_wavelength" if center is None else "full_width_half_max"
            raise InputError(f"{where}: asset {key!r} band {name!r}: eo:bands gives no {what} (µm); "
                             "it is needed to describe the band")
        res = raster[i].get("spatial_resolution") if i < len(raster) else None
        try:
            gsd_m = float(res if res is not None else gsd if gsd is not None else 0.0)
            bands.append(Band(name, sensor, center, fwhm, "thermal" if center >= 3000.0 else "reflectance", gsd_m))
        except (SensorError, TypeError, ValueError) as e:
            raise InputError(f"{where}: asset {key!r}: {e}") from None
    return bands


def _own_sensor(
    item: Any, chosen: list[tuple[str, Any]], where: str, out: StacScenes
) -> tuple[Sensor, list[list[Band]]]:
    """The sensor the chosen assets describe, and each chosen asset's bands.

    The sensor is registered as ``stac_<collection>``, the same for every item.
    """
    label = item.collection_id or item.properties.get("constellation") or item.properties.get("platform") or "items"
    name = "stac_" + (re.sub(r"[^A-Za-z0-9]+", "_", str(label)).strip("_").lower() or "items")
    per_asset = [_asset_bands(item, key, asset, name, where) for key, asset in chosen]
    bands = [b for asset_bands in per_asset for b in asset_bands]
    scales: set[tuple[float, float]] = set()
    for _, asset in chosen:
        for rb in _raster_bands(asset):
            scales.add((float(rb.get("scale", 1.0)), float(rb.get("offset", 0.0))))
    if len(scales) > 1:
        listed = ", ".join(f"scale {s:g} offset {o:g}" for s, o in sorted(scales))
        raise InputError(f"{where}: its assets' raster:bands give different scales ({listed}); one sensor has one "
                         "scale and offset: choose assets that share them with {assets}", assets=None)
    scale, offset = scales.pop() if scales else (1.0, 0.0)
    try:
        sensor = Sensor(name=name, bands=tuple(bands), scale=scale, offset=offset,
                        description=f"described by STAC items of {label}")
    except SensorError as e:
        raise InputError(f"{where}: {e}") from None
    known = out.sensors.get(name)
    if known is not None and (known.bands, known.scale, known.offset) != (sensor.bands, sensor.scale, sensor.offset):
        raise InputError(f"{where}: its band descriptions differ from an earlier item's of {label} ({name}); "
                         "build them separately, or choose the same assets with {assets}", assets=None)
    if known is None:
        register(sensor, replace=True)  # an earlier load in this process may have registered it: this one wins
        out.sensors[name] = sensor
        out.notices.append(f"notice: sensor {name} described by the STAC items' eo:bands ({len(bands)} bands: "
                           f"{', '.join(b.name for b in bands)})")
    return sensor, per_asset

