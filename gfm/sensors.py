"""Band and sensor registry: the physical description of every observation gfm handles.

A :class:`Band` says what a raster band measures (centre wavelength, bandwidth, kind); a
:class:`Sensor` is a named, ordered set of bands with their native ground sampling distance, the
quality band if the product has one, and how its file names spell band names. Presets hold public
band tables (ESA, USGS, NASA); users add sensors in YAML (:func:`load_sensors_yaml`) or build a
generic hyperspectral sensor from a wavelength list (:func:`hyperspectral`).

Wavelengths are always nanometres. SAR bands carry the radar wavelength (C-band: ~5.55 cm, i.e.
~5.5e7 nm) so one continuous scale spans visible light to microwaves. Values that look like
micrometres where nanometres are expected are rejected, never silently mis-embedded.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

#: Observation kinds, in the order of their integer codes (the model embeds the code).
KINDS: tuple[str, ...] = (
    "reflectance",  # optical reflectance or radiance (VNIR/SWIR)
    "thermal",  # thermal infrared brightness temperature / radiance
    "sar_vv",
    "sar_vh",
    "sar_hh",
    "sar_hv",
    "index",  # derived spectral index (NDVI, EVI, ...)
    "quality",  # quality / cloud mask band: used for validity, never an observation
)
KIND_CODE: dict[str, int] = {k: i for i, k in enumerate(KINDS)}

SPEED_OF_LIGHT = 299_792_458.0  # m/s

# Plausible centre-wavelength ranges in nanometres, per kind family.
_OPTICAL_RANGE_NM = (300.0, 3_000.0)
_THERMAL_RANGE_NM = (3_000.0, 20_000.0)
_SAR_RANGE_NM = (1e6, 1e9)  # 1 mm .. 1 m (Ka-band .. P-band)


class SensorError(ValueError):
    """A band, sensor or wavelength description that is wrong or unknown."""


@dataclass(frozen=True)
class Band:
    """One band of one sensor: what a single raster layer measures.

    Attributes:
        name: the agency's band name (``B04``, ``B8A``, ``VV``, ``NDVI``).
        sensor: the sensor preset name this band belongs to.
        center_nm: centre wavelength in nanometres (radar wavelength for SAR).
        fwhm_nm: bandwidth (full width at half maximum) in nanometres.
        kind: one of :data:`KINDS`.
        gsd_m: native ground sampling distance in metres (0 when unknown).
    """

    name: str
    sensor: str
    center_nm: float
    fwhm_nm: float
    kind: str = "reflectance"
    gsd_m: float = 0.0

    def __post_init__(self) -> None:
        check_band(self)

    @property
    def kind_code(self) -> int:
        """Integer code of :attr:`kind` for embedding."""
        return KIND_CODE[self.kind]

    def to_dict(self) -> dict[str, Any]:
        """The band as a plain dict (the schema's per-observation entry, without time)."""
        return {
            "name": self.name,
            "sensor": self.sensor,
            "center_nm": float(self.center_nm),
            "fwhm_nm": float(self.fwhm_nm),
            "kind": self.kind,
        }


def check_band(band: Band) -> None:
    """Raise :class:`SensorError` when a band's kind or units are implausible."""
    where = f"band {band.name!r} of sensor {band.sensor!r}"
    if band.kind not in KIND_CODE:
        raise SensorError(f"{where}: kind {band.kind!r} is not one of {', '.join(KINDS)}")
    if not (math.isfinite(band.center_nm) and band.center_nm > 0):
        raise SensorError(f"{where}: center_nm must be a positive number of nanometres, got {band.center_nm}")
    if not (math.isfinite(band.fwhm_nm) and band.fwhm_nm > 0):
        raise SensorError(f"{where}: fwhm_nm must be a positive number of nanometres, got {band.fwhm_nm}")
    if band.kind.startswith("sar_"):
        lo, hi = _SAR_RANGE_NM
        if not lo <= band.center_nm <= hi:
            raise SensorError(
                f"{where}: SAR wavelength {band.center_nm:g} nm is outside {lo:g}..{hi:g} nm "
                "(give the radar wavelength in nanometres, e.g. C-band 5.55 cm = 5.55e7 nm)"
            )
        return
    if band.kind == "quality":
        return
    lo, hi = _THERMAL_RANGE_NM if band.kind == "thermal" else (_OPTICAL_RANGE_NM[0], _THERMAL_RANGE_NM[1])
    if band.center_nm < lo:
        hint = " (it looks like micrometres: multiply by 1000)" if band.center_nm < 30 else ""
        raise SensorError(f"{where}: center_nm {band.center_nm:g} is below {lo:g} nm{hint}")
    if band.center_nm > hi:
        raise SensorError(f"{where}: center_nm {band.center_nm:g} is above {hi:g} nm")
    if band.fwhm_nm > band.center_nm:
        raise SensorError(
            f"{where}: fwhm_nm {band.fwhm_nm:g} exceeds center_nm {band.center_nm:g} (units mixed up?)"
        )


@dataclass(frozen=True)
class Sensor:
    """A named sensor product: ordered bands plus file-naming and quality conventions.

    Attributes:
        name: preset name used on the command line (``sentinel2_l2a``).
        bands: observation bands in the agency's order.
        description: one line for ``gfm sensors``.
        quality: the product's quality/cloud band, if any (read for validity, not stored as pixels).
        invalid_quality: quality file token (``SCL``, ``BQA``, ``QA_PIXEL``, ``FMASK``) -> rule making a pixel
            invalid: ``{"values": [...]}`` (class values) and/or ``{"bits": [...]}`` (bit flags set).
        nodata: the product's fill value when files don't declare one.
        scale, offset: physical = raw * scale + offset (recorded, never applied to stored pixels).
        file_patterns: regexes whose group ``band`` extracts a band name from a file name.
    """

    name: str
    bands: tuple[Band, ...]
    description: str = ""
    quality: Band | None = None
    invalid_quality: Mapping[str, Any] = field(default_factory=dict)
    nodata: float | None = None
    scale: float = 1.0
    offset: float = 0.0
    file_patterns: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        names = [b.name for b in self.bands]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise SensorError(f"sensor {self.name!r}: duplicate band names {dupes}")
        if not self.bands:
            raise SensorError(f"sensor {self.name!r} has no bands")

    @property
    def band_names(self) -> list[str]:
        """Band names in order."""
        return [b.name for b in self.bands]

    def band(self, name: str) -> Band:
        """Look a band up by name, accepting agency spelling variants (``B4`` for ``B04``, ``b8a``).

        Raises:
            SensorError: the band is not part of this sensor; the message lists the valid names.
        """
        all_bands = list(self.bands) + ([self.quality] if self.quality is not None else [])
        for b in all_bands:
            if b.name == name:
                return b
        key = canonical_band_key(name)
        for b in all_bands:
            if canonical_band_key(b.name) == key:
                return b
        raise SensorError(
            f"band {name!r} is not a band of sensor {self.name!r}; expected one of "
            f"{', '.join(self.band_names + ([self.quality.name] if self.quality else []))}"
        )

    def has_band(self, name: str) -> bool:
        """Whether :meth:`band` would find ``name``."""
        try:
            self.band(name)
        except SensorError:
            return False
        return True

    def quality_rule(self, path: str | Path) -> dict[str, Any] | None:
        """The invalid-pixel rule when ``path`` is one of this sensor's quality files, else None."""
        stem = Path(path).name.rsplit(".", 1)[0]
        for token, rule in self.invalid_quality.items():
            if re.search(rf"(?:^|[_\-.]){token}(?:[_\-.]|$)", stem, flags=re.IGNORECASE):
                return dict(rule)
        return None

    def band_from_filename(self, path: str | Path) -> Band | None:
        """The band a file holds, recognised from standard file names, or None."""
        stem = Path(path).name
        stem = re.sub(r"\.(tif|tiff|jp2|img|vrt|nc|hdf)$", "", stem, flags=re.IGNORECASE)
        for pattern in self.file_patterns + _GENERIC_PATTERNS:
            m = re.search(pattern, stem, flags=re.IGNORECASE)
            if m and self.has_band(m.group("band")):
                return self.band(m.group("band"))
        return None


def canonical_band_key(name: str) -> str:
    """Normalise a band name for matching: upper case, ``B4``/``B04``/``band4`` → ``B4``."""
    n = name.strip().upper()
    m = re.fullmatch(r"(?:B|BAND)[_ ]?0*(\d+)(A?)", n)
    if m:
        return f"B{m.group(1)}{m.group(2)}"
    return n


# Generic band tokens in file names: `_B04`, `_B4`, `_B8A`, `-VV`, `_QA_PIXEL`, `BQA`; each must end
# at a separator or the end of the stem (`_B04_10m` for Sentinel-2 L2A).
_GENERIC_PATTERNS: tuple[str, ...] = (
    r"(?:^|[_\-.])(?:SR_|ST_)?(?P<band>B\d{1,2}A?)(?:_\d+m)?$",
    r"(?:^|[_\-.])(?P<band>B\d{1,2}A?)(?:[_\-.]|$)",
    r"(?:^|[_\-.])(?P<band>VV|VH|HH|HV)(?:[_\-.]|$)",
    r"(?:^|[_\-.])(?P<band>BQA|QA_PIXEL|SCL|FMASK)(?:[_\-.]|$)",
    r"(?:^|[_\-.])(?P<band>NDVI|EVI)(?:[_\-.]|$)",
)


# ----------------------------------------------------------------------------------------------
# Presets. Centre wavelength and FWHM in nm, native GSD in m (public band tables).

def _bands(sensor: str, table: Sequence[tuple[str, float, float, str, float]]) -> tuple[Band, ...]:
    return tuple(Band(n, sensor, c, w, k, g) for n, c, w, k, g in table)


_S2_TABLE = [
    ("B01", 442.7, 21.0, "reflectance", 60.0),
    ("B02", 492.4, 66.0, "reflectance", 10.0),
    ("B03", 559.8, 36.0, "reflectance", 10.0),
    ("B04", 664.6, 31.0, "reflectance", 10.0),
    ("B05", 704.1, 15.0, "reflectance", 20.0),
    ("B06", 740.5, 15.0, "reflectance", 20.0),
    ("B07", 782.8, 20.0, "reflectance", 20.0),
    ("B08", 832.8, 106.0, "reflectance", 10.0),
    ("B8A", 864.7, 21.0, "reflectance", 20.0),
    ("B09", 945.1, 20.0, "reflectance", 60.0),
    ("B10", 1373.5, 31.0, "reflectance", 60.0),
    ("B11", 1613.7, 91.0, "reflectance", 20.0),
    ("B12", 2202.4, 175.0, "reflectance", 20.0),
]

_LANDSAT89_TABLE = [
    ("B1", 443.0, 16.0, "reflectance", 30.0),
    ("B2", 482.0, 60.0, "reflectance", 30.0),
    ("B3", 561.4, 57.0, "reflectance", 30.0),
    ("B4", 654.6, 37.0, "reflectance", 30.0),
    ("B5", 864.7, 28.0, "reflectance", 30.0),
    ("B6", 1608.9, 85.0, "reflectance", 30.0),
    ("B7", 2200.7, 187.0, "reflectance", 30.0),
    ("B8", 589.5, 172.0, "reflectance", 15.0),
    ("B9", 1373.4, 20.0, "reflectance", 30.0),
    ("B10", 10895.0, 590.0, "thermal", 100.0),
    ("B11", 12005.0, 1010.0, "thermal", 100.0),
]

_TM_TABLE = [
    ("B1", 485.0, 70.0, "reflectance", 30.0),
    ("B2", 560.0, 80.0, "reflectance", 30.0),
    ("B3", 660.0, 60.0, "reflectance", 30.0),
    ("B4", 830.0, 140.0, "reflectance", 30.0),
    ("B5", 1650.0, 200.0, "reflectance", 30.0),
    ("B6", 11450.0, 2100.0, "thermal", 120.0),
    ("B7", 2215.0, 270.0, "reflectance", 30.0),
]

_ETM_TABLE = [
    ("B1", 485.0, 70.0, "reflectance", 30.0),
    ("B2", 560.0, 80.0, "reflectance", 30.0),
    ("B3", 660.0, 60.0, "reflectance", 30.0),
    ("B4", 835.0, 130.0, "reflectance", 30.0),
    ("B5", 1650.0, 200.0, "reflectance", 30.0),
    ("B6", 11450.0, 2100.0, "thermal", 60.0),
    ("B7", 2220.0, 260.0, "reflectance", 30.0),
    ("B8", 710.0, 380.0, "reflectance", 15.0),
]

# HLS v2 (S30/L30 harmonised to 30 m), band names as in the S30 product.
_HLS_TABLE = [
    ("B01", 443.0, 20.0, "reflectance", 30.0),
    ("B02", 490.0, 65.0, "reflectance", 30.0),
    ("B03", 560.0, 35.0, "reflectance", 30.0),
    ("B04", 665.0, 30.0, "reflectance", 30.0),
    ("B05", 705.0, 15.0, "reflectance", 30.0),
    ("B06", 740.0, 15.0, "reflectance", 30.0),
    ("B07", 783.0, 20.0, "reflectance", 30.0),
    ("B08", 842.0, 115.0, "reflectance", 30.0),
    ("B8A", 865.0, 20.0, "reflectance", 30.0),
    ("B09", 945.0, 20.0, "reflectance", 30.0),
    ("B10", 1375.0, 30.0, "reflectance", 30.0),
    ("B11", 1610.0, 90.0, "reflectance", 30.0),
    ("B12", 2190.0, 180.0, "reflectance", 30.0),
]

# HLS L30 (Landsat 8/9 harmonised): OLI/TIRS bands under the L30 product's names (B05 is NIR here).
_HLS_L30_TABLE = [
    ("B01", 443.0, 16.0, "reflectance", 30.0),
    ("B02", 482.0, 60.0, "reflectance", 30.0),
    ("B03", 561.4, 57.0, "reflectance", 30.0),
    ("B04", 654.6, 37.0, "reflectance", 30.0),
    ("B05", 864.7, 28.0, "reflectance", 30.0),
    ("B06", 1608.9, 85.0, "reflectance", 30.0),
    ("B07", 2200.7, 187.0, "reflectance", 30.0),
    ("B09", 1373.4, 20.0, "reflectance", 30.0),
    ("B10", 10895.0, 590.0, "thermal", 30.0),
    ("B11", 12005.0, 1010.0, "thermal", 30.0),
]

_C_BAND_HZ = 5.405e9
_C_BAND_NM = SPEED_OF_LIGHT / _C_BAND_HZ * 1e9  # ~5.547e7 nm
# ~100 MHz range bandwidth expressed as a wavelength width: dλ = λ² df / c.
_C_BAND_FWHM_NM = (SPEED_OF_LIGHT / _C_BAND_HZ) ** 2 * 100e6 / SPEED_OF_LIGHT * 1e9

_S1_TABLE = [
    ("VV", _C_BAND_NM, _C_BAND_FWHM_NM, "sar_vv", 10.0),
    ("VH", _C_BAND_NM, _C_BAND_FWHM_NM, "sar_vh", 10.0),
    ("HH", _C_BAND_NM, _C_BAND_FWHM_NM, "sar_hh", 10.0),
    ("HV", _C_BAND_NM, _C_BAND_FWHM_NM, "sar_hv", 10.0),
]

# MODIS land bands 1-7 (MOD09) plus the MOD13 vegetation indices. An index is described by the
# span of the bands it combines (red 645 nm .. NIR 858.5 nm).
_MODIS_TABLE = [
    ("B01", 645.0, 50.0, "reflectance", 250.0),
    ("B02", 858.5, 35.0, "reflectance", 250.0),
    ("B03", 469.0, 20.0, "reflectance", 500.0),
    ("B04", 555.0, 20.0, "reflectance", 500.0),
    ("B05", 1240.0, 20.0, "reflectance", 500.0),
    ("B06", 1640.0, 24.0, "reflectance", 500.0),
    ("B07", 2130.0, 50.0, "reflectance", 500.0),
    ("NDVI", 751.75, 213.5, "index", 250.0),
    ("EVI", 657.0, 389.5, "index", 250.0),
]

# Landsat quality: pre-collection/Collection 1 BQA bit 0 is fill (its cloud bits changed meaning between
# versions, so only fill is trusted); Collection 2 QA_PIXEL bits 0 fill, 1 dilated cloud, 3 cloud, 4 shadow.
_LANDSAT_QA = {"BQA": {"bits": [0]}, "QA_PIXEL": {"bits": [0, 1, 3, 4]}}

_S2_PATTERNS = (r"_(?P<band>B\d{2}|B8A)(?:_\d{2}m)?$",)
_LANDSAT_PATTERNS = (r"_(?:SR_|ST_)?(?P<band>B\d{1,2})$", r"_(?P<band>BQA|QA_PIXEL)$")


def _preset(
    name: str,
    table: Sequence[tuple[str, float, float, str, float]],
    description: str,
    **kw: Any,
) -> Sensor:
    return Sensor(name=name, bands=_bands(name, table), description=description, **kw)


def _build_presets() -> dict[str, Sensor]:
    s2_qa = {"SCL": Band("SCL", "sentinel2_l2a", 500.0, 1.0, "quality", 20.0)}
    presets = [
        _preset(
            "sentinel2_l1c", _S2_TABLE, "Sentinel-2 MSI Level-1C top-of-atmosphere reflectance",
            nodata=0, scale=1e-4, file_patterns=_S2_PATTERNS,
        ),
        _preset(
            "sentinel2_l2a", [r for r in _S2_TABLE if r[0] != "B10"],
            "Sentinel-2 MSI Level-2A surface reflectance (SCL quality band)",
            nodata=0, scale=1e-4, quality=s2_qa["SCL"],
            # SCL classes: 0 no data, 1 saturated, 3 cloud shadow, 8/9 cloud, 10 cirrus.
            invalid_quality={"SCL": {"values": [0, 1, 3, 8, 9, 10]}},
            file_patterns=_S2_PATTERNS + (r"_(?P<band>SCL)(?:_\d{2}m)?$",),
        ),
        _preset("landsat5", _TM_TABLE, "Landsat 4-5 Thematic Mapper", nodata=0,
                quality=Band("BQA", "landsat5", 500.0, 1.0, "quality", 30.0),
                invalid_quality=_LANDSAT_QA, file_patterns=_LANDSAT_PATTERNS),
        _preset("landsat7", _ETM_TABLE, "Landsat 7 Enhanced Thematic Mapper Plus", nodata=0,
                quality=Band("BQA", "landsat7", 500.0, 1.0, "quality", 30.0),
                invalid_quality=_LANDSAT_QA, file_patterns=_LANDSAT_PATTERNS),
        _preset("landsat8", _LANDSAT89_TABLE, "Landsat 8 OLI/TIRS", nodata=0,
                quality=Band("BQA", "landsat8", 500.0, 1.0, "quality", 30.0),
                invalid_quality=_LANDSAT_QA, file_patterns=_LANDSAT_PATTERNS),
        _preset("landsat9", _LANDSAT89_TABLE, "Landsat 9 OLI-2/TIRS-2", nodata=0,
                quality=Band("BQA", "landsat9", 500.0, 1.0, "quality", 30.0),
                invalid_quality=_LANDSAT_QA, file_patterns=_LANDSAT_PATTERNS),
        _preset("hls", _HLS_TABLE, "Harmonized Landsat Sentinel-2 (HLS v2) S30 surface reflectance (L30: hls_l30)",
                nodata=-9999, scale=1e-4,
                quality=Band("FMASK", "hls", 500.0, 1.0, "quality", 30.0),
                # Fmask bits: 1 cloud, 2 adjacent cloud/shadow, 3 cloud shadow.
                invalid_quality={"FMASK": {"bits": [1, 2, 3]}}, file_patterns=(r"\.(?P<band>B\d{2}|B8A|FMASK)$",)),
        _preset("hls_l30", _HLS_L30_TABLE, "Harmonized Landsat Sentinel-2 (HLS v2) L30 (Landsat) surface reflectance",
                nodata=-9999, scale=1e-4,
                quality=Band("FMASK", "hls_l30", 500.0, 1.0, "quality", 30.0),
                invalid_quality={"FMASK": {"bits": [1, 2, 3]}}, file_patterns=(r"\.(?P<band>B\d{2}|FMASK)$",)),
        _preset("sentinel1_grd", _S1_TABLE, "Sentinel-1 C-band SAR GRD backscatter (VV, VH, HH, HV)",
                file_patterns=(r"(?:^|[_\-.])(?P<band>VV|VH|HH|HV)(?:[_\-.]|$)",)),
        _preset("modis", _MODIS_TABLE, "Terra/Aqua MODIS land reflectance (bands 1-7) and NDVI/EVI",
                nodata=-3000, scale=1e-4,
                file_patterns=(r"(?:^|[_\-.])(?P<band>NDVI|EVI)(?:[_\-.]|$)", r"_b0?(?P<band>\d)(?:_|$)")),
    ]
    return {s.name: s for s in presets}


_REGISTRY: dict[str, Sensor] = _build_presets()
PRESET_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def register(sensor: Sensor, *, replace: bool = False) -> Sensor:
    """Add a sensor to the registry (``replace`` to overwrite one of the same name)."""
    if sensor.name in _REGISTRY and not replace:
        raise SensorError(f"sensor {sensor.name!r} is already registered")
    _REGISTRY[sensor.name] = sensor
    return sensor


def get_sensor(name: str) -> Sensor:
    """A registered sensor by name; unknown names list the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise SensorError(f"unknown sensor {name!r}; known sensors: {', '.join(sorted(_REGISTRY))}") from None


def sensors() -> dict[str, Sensor]:
    """All registered sensors by name (presets and user sensors)."""
    return dict(_REGISTRY)


def hyperspectral(
    name: str,
    wavelengths_nm: Iterable[float],
    fwhm_nm: Iterable[float] | None = None,
    *,
    gsd_m: float = 0.0,
    description: str = "",
) -> Sensor:
    """A generic hyperspectral sensor from its centre wavelengths (nm).

    Band names are ``B001``.. in file order. Without ``fwhm_nm`` each band's width is the spacing to
    its nearest neighbour in wavelength. The list need not be sorted (Indian Pines is not).

    Raises:
        SensorError: empty list, non-finite values, or values that look like micrometres.
    """
    wl = [float(w) for w in wavelengths_nm]
    if not wl:
        raise SensorError(f"sensor {name!r}: empty wavelength list")
    if any(not math.isfinite(w) for w in wl):
        raise SensorError(f"sensor {name!r}: wavelength list has non-finite values")
    if max(wl) < 30:
        raise SensorError(
            f"sensor {name!r}: wavelengths {min(wl):g}..{max(wl):g} look like micrometres; give nanometres"
        )
    if fwhm_nm is None:
        widths = []
        order = sorted(wl)
        for w in wl:
            gaps = [abs(o - w) for o in order if abs(o - w) > 1e-6]
            widths.append(min(gaps) if gaps else 10.0)
    else:
        widths = [float(f) for f in fwhm_nm]
        if len(widths) != len(wl):
            raise SensorError(f"sensor {name!r}: {len(widths)} FWHM values for {len(wl)} wavelengths")
    width = max(3, len(str(len(wl))))
    bands = tuple(
        Band(f"B{i + 1:0{width}d}", name, c, w, "thermal" if c >= _THERMAL_RANGE_NM[0] else "reflectance", gsd_m)
        for i, (c, w) in enumerate(zip(wl, widths))
    )
    return Sensor(name=name, bands=bands, description=description or f"hyperspectral, {len(bands)} bands")


def read_wavelengths(path: str | Path, expected: int | None = None) -> list[float]:
    """Read a wavelength list (nm): whitespace/comma separated numbers, ``#`` comments allowed.

    Raises:
        SensorError: unreadable file, non-numeric entries, or a count different from ``expected``.
    """
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise SensorError(f"{p}: cannot read wavelength list ({e.strerror})") from None
    values: list[float] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0]
        for tok in re.split(r"[,\s]+", line.strip()):
            if not tok:
                continue
            try:
                values.append(float(tok))
            except ValueError:
                raise SensorError(f"{p}:{lineno}: {tok!r} is not a wavelength in nm") from None
    if expected is not None and len(values) != expected:
        raise SensorError(f"{p}: {len(values)} wavelengths listed, but the cube has {expected} bands")
    return values


def load_sensors_yaml(path: str | Path, *, replace: bool = False) -> list[Sensor]:
    """Register user sensors from YAML and return them.

    Format::

        sensors:
          my_camera:
            description: 4-band drone camera
            unit: nm            # or um; converted to nm
            nodata: 0
            bands:
              - {name: blue, center: 475, fwhm: 32, gsd_m: 0.1}
              - {name: nir, center: 842, fwhm: 57, kind: reflectance}
          my_hsi:
            wavelengths: [400.5, 405.1, ...]   # generic hyperspectral

    Raises:
        SensorError: naming the file, the sensor and the key that is wrong.
    """
    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise SensorError(f"{p}: cannot read sensor YAML ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("sensors"), dict):
        raise SensorError(f"{p}: expected a top-level mapping 'sensors: {{name: {{...}}}}'")
    out = []
    for name, spec in doc["sensors"].items():
        where = f"{p}: sensors.{name}"
        if not isinstance(spec, dict):
            raise SensorError(f"{where}: expected a mapping")
        unit = str(spec.get("unit", "nm")).lower()
        if unit not in ("nm", "um", "µm"):
            raise SensorError(f"{where}.unit: expected 'nm' or 'um', got {unit!r}")
        mult = 1000.0 if unit in ("um", "µm") else 1.0
        try:
            if "wavelengths" in spec:
                fw = spec.get("fwhm")
                sensor = hyperspectral(
                    name,
                    [float(w) * mult for w in spec["wavelengths"]],
                    None if fw is None else [float(f) * mult for f in fw],
                    gsd_m=float(spec.get("gsd_m", 0.0)),
                    description=str(spec.get("description", "")),
                )
            else:
                if not isinstance(spec.get("bands"), list):
                    raise SensorError(f"{where}.bands: expected a list of bands")
                bands = []
                for i, b in enumerate(spec["bands"]):
                    missing = [k for k in ("name", "center", "fwhm") if k not in b]
                    if missing:
                        raise SensorError(f"{where}.bands[{i}]: missing {', '.join(missing)}")
                    bands.append(
                        Band(str(b["name"]), name, float(b["center"]) * mult, float(b["fwhm"]) * mult,
                             str(b.get("kind", "reflectance")), float(b.get("gsd_m", 0.0)))
                    )
                sensor = Sensor(
                    name=name,
                    bands=tuple(bands),
                    description=str(spec.get("description", "")),
                    nodata=spec.get("nodata"),
                    scale=float(spec.get("scale", 1.0)),
                    offset=float(spec.get("offset", 0.0)),
                )
        except SensorError as e:
            raise SensorError(f"{where}: {e}") from None
        out.append(register(sensor, replace=replace))
    return out


def guess_sensor(paths: Sequence[str | Path]) -> str | None:
    """Guess a preset from product file names (``LC08_…``, ``S2A_MSIL2A_…``, ``T33UUU_…``), or None."""
    rules = [
        (r"(?:^|_)LC09_|(?:^|_)l9_", "landsat9"),
        (r"(?:^|_)LC08_|(?:^|_)l8_|^LC8\d", "landsat8"),
        (r"(?:^|_)LE07_|^LE7\d|(?:^|_)l7_", "landsat7"),
        (r"(?:^|_)L[TM]0[45]_|^LT[45]\d|(?:^|_)l5_", "landsat5"),
        (r"HLS\.S30\.", "hls"),
        (r"HLS\.L30\.", "hls_l30"),
        (r"MSIL2A|_L2A_|^T\d{2}[A-Z]{3}_\d{8}T\d{6}_(?:B\d{2}|B8A|SCL)_\d{2}m", "sentinel2_l2a"),
        (r"MSIL1C|_L1C_|^T\d{2}[A-Z]{3}_\d{8}T", "sentinel2_l1c"),
        (r"^S1[ABC]_|_GRD|^s1[abc]-\w+-grd-", "sentinel1_grd"),
        (r"^MOD\d{2}|^MYD\d{2}|(?:^|_)(?:TERRA|AQUA)_MODIS_", "modis"),
    ]
    found: set[str] = set()
    for path in paths:
        name = Path(path).name
        for pattern, sensor in rules:
            if re.search(pattern, name, flags=re.IGNORECASE):
                found.add(sensor)
                break
    return found.pop() if len(found) == 1 else None


_DATE_RULES: tuple[tuple[str, str], ...] = (
    (r"(?<!\d)(\d{4})-(\d{2})-(\d{2})(?!\d)", "ymd"),  # 2013-09-14
    (r"^L[COTEM]0\d_[A-Z0-9]{4}_\d{6}_(\d{4})(\d{2})(\d{2})_", "ymd"),  # Landsat Collection 1/2 product id
    (r"(?:^|[_-])(\d{4})(\d{2})(\d{2})[Tt]\d{6}", "ymd"),  # Sentinel-1/2 sensing time
    (r"\.A(\d{4})(\d{3})\.", "yj"),  # MODIS .AYYYYDDD.
    (r"\.(\d{4})(\d{3})T\d{6}\.", "yj"),  # HLS .YYYYDDDTHHMMSS.
)


def guess_date(path: str | Path) -> str | None:
    """The acquisition date (YYYY-MM-DD) in a product file name, or None.

    Knows Landsat product ids (``LC08_L1TP_042034_20200101_...``), Sentinel sensing times
    (``..._20170613T101031_...``), MODIS (``.A2013257.``), HLS (``.2020123T...``) and ISO dates.
    """
    import datetime as dt

    name = Path(path).name
    for pattern, form in _DATE_RULES:
        m = re.search(pattern, name)
        if not m:
            continue
        try:
            if form == "ymd":
                d = dt.date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
            else:
                d = dt.date(int(m.group(1)), 1, 1) + dt.timedelta(days=int(m.group(2)) - 1)
        except ValueError:
            continue
        if 1960 <= d.year <= 2100:
            return d.isoformat()
    return None


def format_sensor_table(sensor: Sensor) -> str:
    """A fixed-width band table for ``gfm sensors NAME``."""
    lines = [
        f"{sensor.name}: {sensor.description}",
        f"{'band':<6} {'centre nm':>12} {'fwhm nm':>10} {'kind':<12} {'gsd m':>6}",
    ]
    for b in sensor.bands + ((sensor.quality,) if sensor.quality else ()):
        centre = f"{b.center_nm:.4g}" if b.center_nm >= 1e5 else f"{b.center_nm:.1f}"
        fwhm = f"{b.fwhm_nm:.4g}" if b.fwhm_nm >= 1e5 else f"{b.fwhm_nm:.1f}"
        if b.kind == "quality":
            centre = fwhm = "-"
        lines.append(f"{b.name:<6} {centre:>12} {fwhm:>10} {b.kind:<12} {b.gsd_m:>6g}")
    return "\n".join(lines)
