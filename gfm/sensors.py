"""Band and sensor registry: the physical description of every observation gfm handles.

A :class:`Band` says what a raster band measures (centre wavelength, bandwidth, kind); a
:class:`Sensor` is a named, ordered set of bands with their native ground sampling distance, the
quality band if the product has one, and how its file names spell band names. Presets are data:
public band tables (ESA, USGS, NASA) in ``gfm/sensor_presets/*.yaml``, read by the same strict loader
(:func:`parse_sensors_yaml`) as the sensors users add in YAML (:func:`load_sensors_yaml`); a generic
hyperspectral sensor is built from a wavelength list (:func:`hyperspectral`).

Wavelengths are always nanometres. SAR bands carry the radar wavelength (C-band: ~5.55 cm, i.e.
~5.5e7 nm) so one continuous scale spans visible light to microwaves. Values that look like
micrometres where nanometres are expected are rejected, never silently mis-embedded.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
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
#: Rows of the model's kind table: room for kinds added after a model was trained, so its exports keep
#: loading. Kinds are only ever appended to :data:`KINDS` (a code never changes), at most this many.
KIND_SLOTS = 32

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
# Presets: data files in gfm/sensor_presets, read by the same strict loader as user sensor YAML.

#: Preset files, in the order ``gfm sensors`` lists their sensors.
PRESET_FILES: tuple[str, ...] = ("sentinel2.yaml", "landsat.yaml", "hls.yaml", "sentinel1.yaml", "modis.yaml")

# A quality layer has no wavelength; its Band carries these placeholders and is never embedded.
_QUALITY_CENTER_NM = 500.0
_QUALITY_FWHM_NM = 1.0


def _load_presets() -> dict[str, Sensor]:
    presets: dict[str, Sensor] = {}
    folder = resources.files("gfm") / "sensor_presets"
    for name in PRESET_FILES:
        for sensor in parse_sensors_yaml((folder / name).read_text(encoding="utf-8"), f"gfm/sensor_presets/{name}"):
            if sensor.name in presets:
                raise SensorError(f"gfm/sensor_presets/{name}: sensor {sensor.name!r} is defined twice")
            presets[sensor.name] = sensor
    return presets


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

    Band names are ``B001``.. in file order. Without ``fwhm_nm`` each band's width is the band spacing
    of its own spectrometer: the smaller step to its neighbours in file order that runs the way most
    steps run (a list of several spectrometers steps back where the next one starts, as Indian Pines'
    AVIRIS list does at 696.5 → 686.91 nm; the band there is ~10 nm wide, not the 0.05 nm to the other
    spectrometer's nearest band). A band with no such neighbour takes the spacing to its nearest
    neighbour in wavelength (10 nm for a single band). The list need not be sorted.

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
        widths = _spectrometer_spacing(wl)
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


def _spectrometer_spacing(wl: Sequence[float]) -> list[float]:
    """Default band widths: the spacing within each band's spectrometer (see :func:`hyperspectral`)."""
    steps = [b - a for a, b in zip(wl, wl[1:])]
    ups = sum(1 for d in steps if d > 1e-6)
    downs = sum(1 for d in steps if d < -1e-6)
    sign = 1.0 if ups >= downs else -1.0
    widths = []
    for i, w in enumerate(wl):
        near = [sign * d for d in steps[max(0, i - 1) : i + 1] if sign * d > 1e-6]  # the steps into and out of i
        if not near:
            near = [abs(o - w) for o in wl if abs(o - w) > 1e-6]
        widths.append(min(near) if near else 10.0)
    return widths


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
    """Register the sensors of a YAML file (format: :func:`parse_sensors_yaml`) and return them.

    Raises:
        SensorError: an unreadable file, or anything :func:`parse_sensors_yaml` refuses (naming the file).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise SensorError(f"{p}: cannot read sensor YAML ({e.strerror})") from None
    # registered one by one as they parse (the sensors before a bad one stay registered, as before)
    return [register(s, replace=replace) for s in _iter_sensors(text, str(p))]


_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's when built with it: 5x faster
_SENSOR_KEYS = ("description", "unit", "nodata", "scale", "offset", "bands", "wavelengths", "fwhm", "gsd_m",
                "quality_band", "invalid_quality", "file_patterns")
_BAND_KEYS = ("name", "center", "fwhm", "kind", "gsd_m")
_QUALITY_BAND_KEYS = ("name", "gsd_m")
_RULE_KEYS = ("values", "bits")


def _check_keys(obj: Any, known: Sequence[str], where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise SensorError(f"{where}: expected a mapping")
    unknown = [k for k in obj if k not in known]
    if unknown:
        raise SensorError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(known)})")
    return obj


def _number(value: Any, where: str) -> float:
    # PyYAML reads 1e-4 (no dot) as a string; accept any numeral, refuse anything else
    if isinstance(value, bool):
        raise SensorError(f"{where}: expected a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise SensorError(f"{where}: expected a number, got {value!r}") from None


def _int_list(value: Any, where: str, lo: int, hi: int) -> list[int]:
    if not isinstance(value, list) or not value:
        raise SensorError(f"{where}: expected a non-empty list of integers")
    for v in value:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise SensorError(f"{where}: {v!r} is not an integer in {lo}..{hi}")
    return list(value)


def _quality_rules(obj: Any, where: str) -> dict[str, dict[str, list[int]]]:
    """``{token: {values: [...], bits: [...]}}``: file-name token of a quality layer → invalid pixels."""
    if not isinstance(obj, dict) or not obj:
        raise SensorError(f"{where}: expected a mapping of quality file tokens to rules")
    rules = {}
    for token, rule in obj.items():
        at = f"{where}.{token}"
        if not re.fullmatch(r"[A-Za-z0-9]+(?:_[A-Za-z0-9]+)*", str(token)):
            raise SensorError(f"{at}: a quality token is letters, digits and inner underscores")
        rule = _check_keys(rule, _RULE_KEYS, at)
        if not rule:
            raise SensorError(f"{at}: give 'values' (invalid class values) and/or 'bits' (invalid bit flags)")
        rules[str(token)] = {k: _int_list(v, f"{at}.{k}", 0, 63 if k == "bits" else 2**32) for k, v in rule.items()}
    return rules


def _file_patterns(obj: Any, where: str) -> tuple[str, ...]:
    """Regexes with a named group ``band`` that extract a band name from a file name (without extension)."""
    if not isinstance(obj, list):
        raise SensorError(f"{where}: expected a list of regular expressions")
    for i, pattern in enumerate(obj):
        try:
            compiled = re.compile(str(pattern))
        except re.error as e:
            raise SensorError(f"{where}[{i}]: {pattern!r} is not a regular expression ({e})") from None
        if "band" not in compiled.groupindex:
            raise SensorError(f"{where}[{i}]: {pattern!r} has no named group (?P<band>...)")
    return tuple(str(p) for p in obj)


def _sensor(name: str, spec: Any, where: str) -> Sensor:
    spec = _check_keys(spec, _SENSOR_KEYS, where)
    unit = str(spec.get("unit", "nm")).lower()
    if unit not in ("nm", "um", "µm"):
        raise SensorError(f"{where}.unit: expected 'nm' or 'um', got {unit!r}")
    mult = 1000.0 if unit in ("um", "µm") else 1.0
    gsd_m = _number(spec.get("gsd_m", 0.0), f"{where}.gsd_m")
    description = str(spec.get("description", ""))
    if ("wavelengths" in spec) == ("bands" in spec):
        raise SensorError(f"{where}: give either 'bands' (a band table) or 'wavelengths' (hyperspectral)")
    if "wavelengths" in spec:
        wl, fw = spec["wavelengths"], spec.get("fwhm")
        if not isinstance(wl, list) or (fw is not None and not isinstance(fw, list)):
            raise SensorError(f"{where}: 'wavelengths' and 'fwhm' are lists of numbers")
        sensor = hyperspectral(
            name,
            [_number(w, f"{where}.wavelengths[{i}]") * mult for i, w in enumerate(wl)],
            None if fw is None else [_number(f, f"{where}.fwhm[{i}]") * mult for i, f in enumerate(fw)],
            gsd_m=gsd_m,
            description=description,
        )
        bands, description = sensor.bands, sensor.description
    else:
        if "fwhm" in spec:
            raise SensorError(f"{where}.fwhm: a band table gives each band's fwhm")
        if not isinstance(spec["bands"], list):
            raise SensorError(f"{where}.bands: expected a list of bands")
        table = []
        for i, b in enumerate(spec["bands"]):
            at = f"{where}.bands[{i}]"
            b = _check_keys(b, _BAND_KEYS, at)
            missing = [k for k in ("name", "center", "fwhm") if k not in b]
            if missing:
                raise SensorError(f"{at}: missing {', '.join(missing)}")
            table.append(Band(str(b["name"]), name, _number(b["center"], f"{at}.center") * mult,
                              _number(b["fwhm"], f"{at}.fwhm") * mult, str(b.get("kind", "reflectance")),
                              _number(b.get("gsd_m", gsd_m), f"{at}.gsd_m")))
        bands = tuple(table)
    rules = _quality_rules(spec["invalid_quality"], f"{where}.invalid_quality") if "invalid_quality" in spec else {}
    quality = None
    if "quality_band" in spec:
        q = _check_keys(spec["quality_band"], _QUALITY_BAND_KEYS, f"{where}.quality_band")
        if "name" not in q:
            raise SensorError(f"{where}.quality_band: missing name")
        qname = str(q["name"])
        if qname not in rules:
            raise SensorError(f"{where}.quality_band: {qname!r} has no rule in invalid_quality")
        quality = Band(qname, name, _QUALITY_CENTER_NM, _QUALITY_FWHM_NM, "quality",
                       _number(q.get("gsd_m", gsd_m), f"{where}.quality_band.gsd_m"))
    patterns = _file_patterns(spec["file_patterns"], f"{where}.file_patterns") if "file_patterns" in spec else ()
    nodata = spec.get("nodata")
    if nodata is not None and (isinstance(nodata, bool) or not isinstance(nodata, (int, float))):
        raise SensorError(f"{where}.nodata: expected a number, got {nodata!r}")
    return Sensor(
        name=name,
        bands=bands,
        description=description,
        quality=quality,
        invalid_quality=rules,
        nodata=nodata,
        scale=_number(spec.get("scale", 1.0), f"{where}.scale"),
        offset=_number(spec.get("offset", 0.0), f"{where}.offset"),
        file_patterns=patterns,
    )


def parse_sensors_yaml(text: str, where: str) -> list[Sensor]:
    """Sensors from the text of a sensor YAML file (presets and user files alike); ``where`` names it in errors.

    Format::

        sensors:
          my_camera:
            description: 4-band drone camera
            unit: nm              # or um; converted to nm
            nodata: 0             # fill value when files declare none
            scale: 1.0e-4         # physical = raw * scale + offset (recorded, never applied)
            offset: 0
            bands:                # in the camera's file band order
              - {name: blue, center: 475, fwhm: 32, gsd_m: 0.1}
              - {name: nir, center: 842, fwhm: 57, kind: reflectance, gsd_m: 0.1}
            file_patterns:        # regexes whose group 'band' finds a band name in a file name
              - '_(?P<band>blue|nir)$'
            quality_band: {name: CLOUD, gsd_m: 0.1}   # listed by `gfm sensors NAME`
            invalid_quality:      # quality file-name token -> invalid pixels
              CLOUD: {values: [1, 2]}                 # class values; and/or bits: [0, 3] (flags set)
          my_hsi:
            wavelengths: [400.5, 405.1, ...]          # generic hyperspectral (bands B001...)
            fwhm: [5.0, 5.0, ...]                     # optional: default the band spacing
            gsd_m: 20

    ``kind`` is one of :data:`KINDS` (default reflectance). Units are checked: a wavelength that looks
    like micrometres where nanometres are expected is an error.

    Raises:
        SensorError: unknown or missing keys, values of the wrong type, implausible wavelengths, bad
            regexes or quality rules; the message names the file, the sensor and the key.
    """
    return list(_iter_sensors(text, where))


def _iter_sensors(text: str, where: str) -> Iterator[Sensor]:
    try:
        doc = yaml.load(text, Loader=_YAML_LOADER)  # a safe loader: plain data only
    except yaml.YAMLError as e:
        raise SensorError(f"{where}: not valid YAML ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("sensors"), dict):
        raise SensorError(f"{where}: expected a top-level mapping 'sensors: {{name: {{...}}}}'")
    extra = [k for k in doc if k != "sensors"]
    if extra:
        raise SensorError(f"{where}: unknown key {extra[0]!r} (known: sensors)")
    for name, spec in doc["sensors"].items():
        at = f"{where}: sensors.{name}"
        try:
            sensor = _sensor(str(name), spec, at)
        except SensorError as e:
            raise SensorError(str(e) if str(e).startswith(at) else f"{at}: {e}") from None
        yield sensor


# Landsat pre-collection scene ids: L + sensor (C OLI/TIRS, O OLI, T TM or TIRS, E ETM+, M MSS) + satellite +
# WRS path (3) + row (3) + year (4) + day of year (3) + ground station (3 letters) + version (2).
_LANDSAT_SCENE_ID = re.compile(r"^L([CEMOT])(\d)(\d{3})(\d{3})(\d{4})(\d{3})([A-Z]{3})(\d{2})(?![A-Z0-9])", re.I)
# Landsat Collection 1/2 product ids: LXSS_LLLL_PPPRRR_YYYYMMDD_yyyymmdd_CC_TX.
_LANDSAT_PRODUCT_ID = re.compile(r"^L([CEMOT])0(\d)_[A-Z0-9]{4}_\d{6}_(\d{4})(\d{2})(\d{2})(?![0-9])", re.I)


@dataclass(frozen=True)
class LandsatId:
    """What a Landsat scene or product id says: the sensor preset (None for MSS: no preset) and the date."""

    sensor: str | None
    date: str


def landsat_id(path: str | Path) -> LandsatId | None:
    """Sensor and acquisition date from a Landsat file name, or None when it is not one.

    Knows pre-collection scene ids (``LE70350322008118EDC00_b3.tif``: ETM+ on Landsat 7, 2008, day 118)
    and Collection 1/2 product ids (``LC08_L1TP_042034_20200101_20200114_01_T1_B4.TIF``).
    """
    import datetime as dt

    name = Path(path).name
    m = _LANDSAT_SCENE_ID.match(name)
    try:
        if m:
            instrument, sat = m.group(1).upper(), int(m.group(2))
            d = dt.date(int(m.group(5)), 1, 1) + dt.timedelta(days=int(m.group(6)) - 1)
            if d.year != int(m.group(5)):
                return None
        else:
            m = _LANDSAT_PRODUCT_ID.match(name)
            if not m:
                return None
            instrument, sat = m.group(1).upper(), int(m.group(2))
            d = dt.date(int(m.group(3)), int(m.group(4)), int(m.group(5)))
    except ValueError:
        return None
    return LandsatId(_LANDSAT_SENSORS.get((instrument, sat)), d.isoformat())


_LANDSAT_SENSORS: dict[tuple[str, int], str] = {
    ("T", 4): "landsat5", ("T", 5): "landsat5",  # the landsat5 preset is the TM of Landsat 4 and 5
    ("E", 7): "landsat7",
    **{(i, 8): "landsat8" for i in "COT"},
    **{(i, 9): "landsat9" for i in "COT"},
}


def guess_sensor(paths: Sequence[str | Path]) -> str | None:
    """Guess a preset from product file names (``LC08_…``, ``LT50350322008110PAC01_…``, ``S2A_MSIL2A_…``), or None.

    None also when the names point at different sensors, or at a Landsat MSS product (no preset).
    """
    rules = [
        (r"(?:^|_)LC09_|(?:^|_)l9_", "landsat9"),
        (r"(?:^|_)LC08_|(?:^|_)l8_", "landsat8"),
        (r"(?:^|_)LE07_|(?:^|_)l7_", "landsat7"),
        (r"(?:^|_)LT0[45]_|(?:^|_)l5_", "landsat5"),
        (r"HLS\.S30\.", "hls"),
        (r"HLS\.L30\.", "hls_l30"),
        (r"MSIL2A|_L2A_|^T\d{2}[A-Z]{3}_\d{8}T\d{6}_(?:B\d{2}|B8A|SCL)_\d{2}m", "sentinel2_l2a"),
        (r"MSIL1C|_L1C_|^T\d{2}[A-Z]{3}_\d{8}T", "sentinel2_l1c"),
        (r"^S1[ABC]_|_GRD|^s1[abc]-\w+-grd-", "sentinel1_grd"),
        (r"^MOD\d{2}|^MYD\d{2}|(?:^|_)(?:TERRA|AQUA)_MODIS_", "modis"),
    ]
    found: set[str | None] = set()
    for path in paths:
        landsat = landsat_id(path)
        if landsat is not None:
            found.add(landsat.sensor)
            continue
        name = Path(path).name
        for pattern, sensor in rules:
            if re.search(pattern, name, flags=re.IGNORECASE):
                found.add(sensor)
                break
    return found.pop() if len(found) == 1 else None


_DATE_RULES: tuple[tuple[str, str], ...] = (
    (r"(?<!\d)(\d{4})-(\d{2})-(\d{2})(?!\d)", "ymd"),  # 2013-09-14
    (r"(?:^|[_-])(\d{4})(\d{2})(\d{2})[Tt]\d{6}", "ymd"),  # Sentinel-1/2 sensing time
    (r"\.A(\d{4})(\d{3})\.", "yj"),  # MODIS .AYYYYDDD.
    (r"\.(\d{4})(\d{3})T\d{6}\.", "yj"),  # HLS .YYYYDDDTHHMMSS.
)


def guess_date(path: str | Path) -> str | None:
    """The acquisition date (YYYY-MM-DD) in a product file name, or None.

    Knows Landsat scene and product ids (:func:`landsat_id`), Sentinel sensing times
    (``..._20170613T101031_...``), MODIS (``.A2013257.``), HLS (``.2020123T...``) and ISO dates.
    """
    import datetime as dt

    landsat = landsat_id(path)
    if landsat is not None:
        return landsat.date
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


_REGISTRY: dict[str, Sensor] = _load_presets()
#: Names of the preset sensors (``gfm/sensor_presets/*.yaml``), in listing order.
PRESET_NAMES: tuple[str, ...] = tuple(_REGISTRY)
