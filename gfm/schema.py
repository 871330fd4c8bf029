"""The tile sample schema: the one contract between the shard writer and every reader.

One sample is one tile, stored as WebDataset tar members that share the key
``<scene>_<t0>_<row>_<col>``:

============== ===================================================================================
member         content
============== ===================================================================================
pixels.npy     ``[C, H, W]`` source dtype (uint8/uint16/int16/float32...), not normalised; C are
               observations, i.e. (band, time) pairs on one aligned grid
meta.json      ``schema``; ``bands`` (one ``{name, sensor, center_nm, fwhm_nm, kind, time}`` per
               observation, in pixel order); ``gsd_m``; ``crs``; ``transform`` (6 affine
               coefficients); ``bounds``; ``lonlat``; ``nodata``; ``scale``; ``offset``; ``source``
valid.npy      optional ``[C, H, W]`` or ``[H, W]`` uint8, 1 = usable pixel
label.npy      optional ``[H, W]`` integer segmentation labels (``label_ignore`` in meta)
label.cls      optional single integer class, as ASCII text
============== ===================================================================================

Nothing is pickled: arrays are ``.npy`` loaded with ``allow_pickle=False`` and any member with a
pickle extension is refused. The dataset-level ``index.json`` has its own contract: :mod:`gfm.index`.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gfm.index import stats_key
from gfm.sensors import KIND_CODE

SCHEMA_VERSION = 1

#: Members a sample may carry. Anything else is an error (no silent extras, no pickles).
MEMBERS = ("pixels.npy", "meta.json", "valid.npy", "label.npy", "label.cls")
PICKLE_SUFFIXES = (".pyd", ".pickle", ".pkl", ".pth", ".pt", ".torch")

_PIXEL_DTYPES = {"uint8", "uint16", "int8", "int16", "int32", "uint32", "float16", "float32", "float64"}
_PIXEL_TYPES = frozenset(np.dtype(n).type for n in _PIXEL_DTYPES)  # dtype.name costs microseconds per call
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
_BAND_FIELDS = ("name", "sensor", "center_nm", "fwhm_nm", "kind", "time")


class SchemaError(ValueError):
    """A sample that does not follow the schema. The message names the key and the member."""


@dataclass
class Tile:
    """One decoded tile.

    Attributes:
        key: the sample key ``<scene>_<t0>_<row>_<col>`` (no dots: WebDataset splits keys at dots).
        pixels: ``[C, H, W]`` array in the source dtype.
        meta: the ``meta.json`` dictionary (see module docstring).
        valid: optional ``[C, H, W]`` or ``[H, W]`` uint8 mask, 1 = usable.
        label: optional ``[H, W]`` integer array, or an ``int`` class.
    """

    key: str
    pixels: np.ndarray
    meta: dict[str, Any]
    valid: np.ndarray | None = None
    label: np.ndarray | int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def bands(self) -> list[dict[str, Any]]:
        """Per-observation descriptions, in pixel order."""
        return list(self.meta["bands"])


def make_key(scene: str, t0: int, row: int, col: int) -> str:
    """The sample key for a tile whose top-left pixel is (row, col) in scene ``scene``, first date ``t0``."""
    safe = re.sub(r"[^A-Za-z0-9\-]+", "-", scene).strip("-") or "scene"
    return f"{safe}_{t0}_{row}_{col}"


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def _npy_load(data: bytes, key: str, member: str) -> np.ndarray:
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # numpy raises ValueError/OSError/EOFError variously on bad bytes
        raise SchemaError(f"sample {key!r}: {member} is not a readable .npy array ({e})") from None
    if not isinstance(arr, np.ndarray):
        raise SchemaError(f"sample {key!r}: {member} is not a single array")
    return arr


def encode(tile: Tile) -> dict[str, Any]:
    """A tile as a WebDataset sample dict (``__key__`` plus bytes per member). Validates first."""
    validate(tile)
    sample: dict[str, Any] = {
        "__key__": tile.key,
        "pixels.npy": _npy_bytes(tile.pixels),
        "meta.json": json.dumps(tile.meta, separators=(",", ":"), sort_keys=True).encode(),
    }
    if tile.valid is not None:
        sample["valid.npy"] = _npy_bytes(tile.valid.astype(np.uint8))
    if isinstance(tile.label, np.ndarray):
        sample["label.npy"] = _npy_bytes(tile.label)
    elif tile.label is not None:
        sample["label.cls"] = str(int(tile.label)).encode()
    return sample


def decode(
    sample: Mapping[str, Any],
    npy_loader: Callable[[bytes, str, str], np.ndarray] | None = None,
    meta_loader: Callable[[bytes, str], tuple[dict[str, Any], bool]] | None = None,
) -> Tile:
    """A WebDataset sample dict (raw bytes per member) back into a validated :class:`Tile`.

    ``npy_loader(data, key, member)`` replaces the default ``np.load(allow_pickle=False)`` (the loader
    passes a faster one); it must raise :class:`SchemaError` on bad bytes and never unpickle.
    ``meta_loader(data, key)`` replaces ``json.loads`` for meta.json and returns ``(meta, bands_checked)``:
    True when ``meta["bands"]`` is a list it got from an earlier tile that passed :func:`validate` (readers
    cache validated band lists; then only the list's length is checked again).

    Raises:
        SchemaError: missing or unknown members, pickle members, unreadable arrays, or metadata
            that does not match the pixels. The message names the key and member.
    """
    key = str(sample.get("__key__", "?"))
    for name in sample:
        if name.startswith("__"):
            continue
        if name.endswith(PICKLE_SUFFIXES):
            raise SchemaError(f"sample {key!r}: member {name!r} is a pickle; gfm never unpickles shard members")
        if name not in MEMBERS:
            raise SchemaError(f"sample {key!r}: unexpected member {name!r}; expected {', '.join(MEMBERS)}")
    for required in ("pixels.npy", "meta.json"):
        if required not in sample:
            raise SchemaError(f"sample {key!r}: missing member {required}")
    load = npy_loader or _npy_load
    pixels = load(sample["pixels.npy"], key, "pixels.npy")
    bands_checked = False
    try:
        if meta_loader is None:
            meta = json.loads(sample["meta.json"])
        else:
            meta, bands_checked = meta_loader(sample["meta.json"], key)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SchemaError(f"sample {key!r}: meta.json is not valid JSON ({e})") from None
    valid = load(sample["valid.npy"], key, "valid.npy") if "valid.npy" in sample else None
    label: np.ndarray | int | None = None
    if "label.npy" in sample:
        label = load(sample["label.npy"], key, "label.npy")
    elif "label.cls" in sample:
        try:
            label = int(bytes(sample["label.cls"]).decode().strip())
        except (UnicodeDecodeError, ValueError):
            raise SchemaError(f"sample {key!r}: label.cls is not an integer") from None
    tile = Tile(key=key, pixels=pixels, meta=meta, valid=valid, label=label)
    validate(tile, bands_checked=bands_checked)
    return tile


def validate(tile: Tile, *, bands_checked: bool = False) -> None:
    """Check a tile against the schema; raise :class:`SchemaError` naming the key and field.

    ``bands_checked``: ``meta["bands"]`` is a list that passed this check before (only its length is checked).
    """
    key = tile.key
    if not _KEY_RE.match(key):
        raise SchemaError(f"sample {key!r}: key must match [A-Za-z0-9_-]+ (WebDataset splits keys at dots)")
    px = tile.pixels
    if not isinstance(px, np.ndarray) or px.ndim != 3:
        shape = getattr(px, "shape", None)
        raise SchemaError(f"sample {key!r}: pixels.npy must be a [C, H, W] array, got shape {shape}")
    if px.dtype.type not in _PIXEL_TYPES:
        raise SchemaError(f"sample {key!r}: pixels.npy dtype {px.dtype} is not one of {sorted(_PIXEL_DTYPES)}")
    c, h, w = px.shape
    meta = tile.meta
    if not isinstance(meta, dict):
        raise SchemaError(f"sample {key!r}: meta.json must be an object")
    if meta.get("schema") != SCHEMA_VERSION:
        raise SchemaError(
            f"sample {key!r}: meta.json schema version {meta.get('schema')!r}, this gfm reads {SCHEMA_VERSION}"
        )
    for k in ("bands", "gsd_m", "crs", "transform", "bounds"):
        if k not in meta:
            raise SchemaError(f"sample {key!r}: meta.json lacks {k!r}")
    bands = meta["bands"]
    if not isinstance(bands, list) or len(bands) != c:
        n = len(bands) if isinstance(bands, list) else "no"
        raise SchemaError(f"sample {key!r}: meta.json has {n} bands but pixels.npy has C={c}")
    for i, b in enumerate([] if bands_checked else bands):
        missing = [f for f in _BAND_FIELDS if f not in b]
        if missing:
            raise SchemaError(f"sample {key!r}: meta.json bands[{i}] lacks {', '.join(missing)}")
        if b["kind"] not in KIND_CODE:
            raise SchemaError(f"sample {key!r}: meta.json bands[{i}].kind {b['kind']!r} is unknown")
        for f in ("center_nm", "fwhm_nm"):
            if not isinstance(b[f], (int, float)) or not math.isfinite(b[f]) or b[f] <= 0:
                raise SchemaError(f"sample {key!r}: meta.json bands[{i}].{f} must be a positive number")
        if b["time"] is not None and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", str(b["time"])):
            raise SchemaError(f"sample {key!r}: meta.json bands[{i}].time {b['time']!r} is not YYYY-MM-DD or null")
    gsd = meta["gsd_m"]
    if not isinstance(gsd, (int, float)) or not gsd > 0:
        raise SchemaError(f"sample {key!r}: meta.json gsd_m must be a positive number, got {gsd!r}")
    if not (isinstance(meta["transform"], list) and len(meta["transform"]) == 6):
        raise SchemaError(f"sample {key!r}: meta.json transform must list 6 affine coefficients")
    if not (isinstance(meta["bounds"], list) and len(meta["bounds"]) == 4):
        raise SchemaError(f"sample {key!r}: meta.json bounds must be [left, bottom, right, top]")
    if tile.valid is not None:
        v = tile.valid
        if v.shape not in ((c, h, w), (h, w)):
            raise SchemaError(f"sample {key!r}: valid.npy shape {v.shape}, expected {(c, h, w)} or {(h, w)}")
        if v.dtype not in (np.uint8, np.bool_):
            raise SchemaError(f"sample {key!r}: valid.npy dtype {v.dtype}, expected uint8")
    if isinstance(tile.label, np.ndarray):
        if tile.label.shape != (h, w):
            raise SchemaError(f"sample {key!r}: label.npy shape {tile.label.shape}, expected {(h, w)}")
        if not np.issubdtype(tile.label.dtype, np.integer):
            raise SchemaError(f"sample {key!r}: label.npy dtype {tile.label.dtype}, expected integers")


def band_entry(band: Mapping[str, Any], time: str | None) -> dict[str, Any]:
    """The meta.json entry of one observation: a band description plus its date (or None)."""
    return {
        "name": str(band["name"]),
        "sensor": str(band["sensor"]),
        "center_nm": float(band["center_nm"]),
        "fwhm_nm": float(band["fwhm_nm"]),
        "kind": str(band["kind"]),
        "time": time,
    }


def bandset_signature(bands: list[Mapping[str, Any]]) -> str:
    """A string identifying a tile's band set (sensor/band per observation, times ignored)."""
    return "|".join(stats_key(b["sensor"], b["name"]) for b in bands)
