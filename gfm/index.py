"""The ``index.json`` contract: the one file at a dataset root that lists its shards and describes its bands.

Written by the shard writer (:func:`gfm.shards.write_index`, through :func:`merge` and :func:`write`),
read through :func:`read` / :func:`parse` by ``gfm shards verify`` and ``info`` and by the loader
(:mod:`gfm.data.sources`). Fields, in file order:

================== ========================= =====================================================
field              type                      meaning
================== ========================= =====================================================
schema             int                       tile sample schema version of the shards
                                             (:data:`gfm.schema.SCHEMA_VERSION`)
created_by         str                       ``"gfm <version>"``
shards             list                      ``{name, samples, bytes, sha256, members}`` per shard
                                             with samples, in plan order; ``members`` (optional)
                                             names the shard's member table
samples, bytes     int                       totals over ``shards``
tile_size          int or null               tile size in pixels
sensors, dates     list[str]                 sorted; dates ``YYYY-MM-DD``
bands              {key: band}               ``{name, sensor, center_nm, fwhm_nm, kind}``
stats              {key: statistics}         over valid pixels: ``{count, mean, std, min, max,
                                             p01, p99}``
scenes             {scene id: counts}        ``{samples, dropped}`` per scene
dropped_low_valid  int                       tiles dropped below the build's ``min_valid``
planned_shards     int                       shards in the build plan
missing_shards     list[str]                 planned shards not (yet) built
classes            {value: name}             optional: label value → class name (written when the
                                             labels came with names, e.g. a vector label field)
================== ========================= =====================================================

Shard names (``shards[i].name``, ``members``, ``missing_shards``) are plain relative file names inside
the dataset root (:func:`check_shard_name`): letters, digits, ``_ - . +``, folders separated by ``/``.
A URL, a ``pipe:`` command, an absolute path or ``..`` is an error naming the entry: an ``index.json``
is untrusted input (datasets are downloaded and shared), so it can never make a reader open another
location or run a command.

Band and statistics keys are ``"<sensor>/<band>"`` (:func:`stats_key`). A reader needs only ``schema``
and ``shards`` (every other field has a default), refuses unknown fields, and names the field of any
value of the wrong type.

A **member table** (``<shard stem>.members.json``, beside the shard, named by its entry's optional
``members``) records where every sample's members lie in the tar, as the writer wrote them, so a local
reader can slice a sample out of a memory-mapped shard instead of walking the tar::

    {"format": "gfm-members/1", "shard": "<tar file name>", "bytes": <tar size>,
     "samples": [["<key>", [["<suffix>", <data offset>, <size>], ...]], ...]}

Offsets are those of the member *data* (its 512-byte tar header lies just before). The table is a hint
that a reader checks against the file (its size, and each member's header) before trusting it;
datasets without tables read as plain tars.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gfm.fileio import atomic_write
from gfm.sensors import KIND_CODE

#: The file name of the index at a dataset root.
INDEX_FILE = "index.json"


class IndexFileError(ValueError):
    """An ``index.json`` (or the shard parts merged into one) that breaks the contract; names file and key."""


class IndexNotFoundError(IndexFileError):
    """There is no ``index.json`` where one was expected."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        super().__init__(f"{path}: no index.json (build the shards, or merge their finished parts into one)")


_NAME_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+\-]*")


def is_shard_name(name: str) -> bool:
    """Whether ``name`` is a plain relative file name inside a dataset root (see :func:`check_shard_name`)."""
    return bool(name) and all(_NAME_PART.fullmatch(part) for part in name.split("/"))


def check_shard_name(name: Any, where: str, key: str) -> str:
    """``name`` when it is a plain relative file name inside the dataset root, else an :class:`IndexFileError`.

    Allowed: letters, digits, ``_``, ``-``, ``.``, ``+``, with ``/`` between folders; no part starts
    with a dot. So never a URL or ``pipe:`` command (no ``:``), an absolute path, ``..``, a hidden
    file, a brace pattern or a ``::`` list.
    """
    if not isinstance(name, str):
        raise _bad(where, key, "a string", name)
    if not is_shard_name(name):
        raise IndexFileError(
            f"{where}: {key}: {name!r} is not a plain relative file name inside the dataset (letters, digits, "
            "'_', '-', '.', '+', folders separated by '/'; no URL, 'pipe:' command, absolute path or '..')"
        )
    return name


def stats_key(sensor: str, band: str) -> str:
    """Key of a band in ``bands`` and ``stats``: ``"<sensor>/<band>"``."""
    return f"{sensor}/{band}"


def split_stats_key(key: str) -> tuple[str, str]:
    """``"<sensor>/<band>"`` → ``(sensor, band)``.

    Raises:
        IndexFileError: the key is not of that form.
    """
    sensor, sep, band = key.partition("/")
    if not (sep and sensor and band) or "/" in band:
        raise IndexFileError(f"key {key!r} is not '<sensor>/<band>'")
    return sensor, band


@dataclass(frozen=True)
class ShardEntry:
    """One shard of the dataset: file name (relative to the root), samples, size and sha256 of the tar.

    ``members`` names the shard's member table (relative to the shard's folder), None when it has none.
    """

    name: str
    samples: int
    bytes: int | None = None
    sha256: str | None = None
    members: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (fields that are None are left out)."""
        d: dict[str, Any] = {"name": self.name, "samples": self.samples}
        if self.bytes is not None:
            d["bytes"] = self.bytes
        if self.sha256 is not None:
            d["sha256"] = self.sha256
        if self.members is not None:
            d["members"] = self.members
        return d


@dataclass(frozen=True)
class BandInfo:
    """The physical description of one band (as in ``meta.json``, without the date)."""

    name: str
    sensor: str
    center_nm: float
    fwhm_nm: float
    kind: str

    @property
    def key(self) -> str:
        """The band's ``"<sensor>/<band>"`` key."""
        return stats_key(self.sensor, self.name)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object."""
        return {"name": self.name, "sensor": self.sensor, "center_nm": self.center_nm, "fwhm_nm": self.fwhm_nm,
                "kind": self.kind}


@dataclass(frozen=True)
class BandSummary:
    """Statistics of one band over the valid pixels of every shard (None where the index does not say)."""

    count: int
    mean: float
    std: float
    min: float | None = None
    max: float | None = None
    p01: float | None = None
    p99: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object."""
        return {"count": self.count, "mean": self.mean, "std": self.std, "min": self.min, "max": self.max,
                "p01": self.p01, "p99": self.p99}


@dataclass(frozen=True)
class SceneCounts:
    """Tiles of one scene: written as samples, and dropped for too few valid pixels."""

    samples: int
    dropped: int

    def to_dict(self) -> dict[str, Any]:
        """The JSON object."""
        return {"samples": self.samples, "dropped": self.dropped}


@dataclass
class Index:
    """A parsed ``index.json`` (fields as in the module docstring)."""

    schema: int
    created_by: str | None
    shards: list[ShardEntry]
    samples: int
    bytes: int | None
    tile_size: int | None
    sensors: list[str]
    dates: list[str]
    bands: dict[str, BandInfo]
    stats: dict[str, BandSummary]
    scenes: dict[str, SceneCounts]
    dropped_low_valid: int
    planned_shards: int
    missing_shards: list[str]
    classes: dict[int, str] | None = None

    @property
    def counts(self) -> dict[str, int]:
        """Shard file name → samples."""
        return {s.name: s.samples for s in self.shards}

    def to_dict(self) -> dict[str, Any]:
        """The JSON document, fields in file order."""
        return {
            "schema": self.schema,
            "created_by": self.created_by,
            "shards": [s.to_dict() for s in self.shards],
            "samples": self.samples,
            "bytes": self.bytes,
            "tile_size": self.tile_size,
            "sensors": list(self.sensors),
            "dates": list(self.dates),
            "bands": {k: b.to_dict() for k, b in self.bands.items()},
            "stats": {k: s.to_dict() for k, s in self.stats.items()},
            "scenes": {k: c.to_dict() for k, c in self.scenes.items()},
            "dropped_low_valid": self.dropped_low_valid,
            "planned_shards": self.planned_shards,
            "missing_shards": list(self.missing_shards),
            **({"classes": {str(v): n for v, n in self.classes.items()}} if self.classes is not None else {}),
        }


# ----------------------------------------------------------------------------------------------
# Reading


_FIELDS = ("schema", "created_by", "shards", "samples", "bytes", "tile_size", "sensors", "dates", "bands", "stats",
           "scenes", "dropped_low_valid", "planned_shards", "missing_shards", "classes")


def _bad(where: str, key: str, expected: str, value: Any) -> IndexFileError:
    return IndexFileError(f"{where}: {key}: expected {expected}, got {value!r}")


def _int(value: Any, where: str, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _bad(where, key, "a non-negative integer", value)
    return value


def _float(value: Any, where: str, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(where, key, "a number", value)
    return float(value)


def _opt_float(value: Any, where: str, key: str) -> float | None:
    return None if value is None else _float(value, where, key)


def _str(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise _bad(where, key, "a string", value)
    return value


def _mapping(value: Any, where: str, key: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise _bad(where, key, "an object", value)
    return value


def _strings(value: Any, where: str, key: str) -> list[str]:
    if not isinstance(value, list):
        raise _bad(where, key, "a list of strings", value)
    return [_str(v, where, f"{key}[{i}]") for i, v in enumerate(value)]


def _fields(obj: Mapping[str, Any], where: str, key: str, required: Sequence[str], optional: Sequence[str]) -> None:
    missing = [f for f in required if f not in obj]
    if missing:
        raise IndexFileError(f"{where}: {key} lacks {', '.join(missing)}")
    unknown = sorted(set(obj) - set(required) - set(optional))
    if unknown:
        known = ", ".join([*required, *optional])
        raise IndexFileError(f"{where}: {key}: unknown field {unknown[0]!r} (known: {known})")


def _shard(obj: Any, where: str, key: str) -> ShardEntry:
    obj = _mapping(obj, where, key)
    _fields(obj, where, key, ("name", "samples"), ("bytes", "sha256", "members"))
    return ShardEntry(
        name=check_shard_name(obj["name"], where, f"{key}.name"),
        samples=_int(obj["samples"], where, f"{key}.samples"),
        bytes=None if obj.get("bytes") is None else _int(obj["bytes"], where, f"{key}.bytes"),
        sha256=None if obj.get("sha256") is None else _str(obj["sha256"], where, f"{key}.sha256"),
        members=None if obj.get("members") is None else check_shard_name(obj["members"], where, f"{key}.members"),
    )


def _band(obj: Any, where: str, key: str) -> BandInfo:
    obj = _mapping(obj, where, key)
    _fields(obj, where, key, ("name", "sensor", "center_nm", "fwhm_nm", "kind"), ())
    kind = _str(obj["kind"], where, f"{key}.kind")
    if kind not in KIND_CODE:
        raise _bad(where, f"{key}.kind", f"one of {', '.join(KIND_CODE)}", kind)
    return BandInfo(
        name=_str(obj["name"], where, f"{key}.name"),
        sensor=_str(obj["sensor"], where, f"{key}.sensor"),
        center_nm=_float(obj["center_nm"], where, f"{key}.center_nm"),
        fwhm_nm=_float(obj["fwhm_nm"], where, f"{key}.fwhm_nm"),
        kind=kind,
    )


def _summary(obj: Any, where: str, key: str) -> BandSummary:
    obj = _mapping(obj, where, key)
    _fields(obj, where, key, ("count", "mean", "std"), ("min", "max", "p01", "p99"))
    return BandSummary(
        count=_int(obj["count"], where, f"{key}.count"),
        mean=_float(obj["mean"], where, f"{key}.mean"),
        std=_float(obj["std"], where, f"{key}.std"),
        **{f: _opt_float(obj.get(f), where, f"{key}.{f}") for f in ("min", "max", "p01", "p99")},
    )


def _classes(value: Any, where: str) -> dict[int, str] | None:
    """``classes``: ``{"<label value>": "<name>"}`` (absent: None)."""
    if value is None:
        return None
    out: dict[int, str] = {}
    for k, v in _mapping(value, where, "classes").items():
        try:
            label = int(k)
        except ValueError:
            raise _bad(where, "classes", "integer label values as keys", k) from None
        out[label] = _str(v, where, f"classes[{k!r}]")
    return out


def _keyed(key: str, where: str, field: str) -> str:
    try:
        split_stats_key(key)
    except IndexFileError:
        raise IndexFileError(f"{where}: {field}[{key!r}]: key is not '<sensor>/<band>'") from None
    return key


def from_dict(doc: Any, where: str) -> Index:
    """Validate a decoded ``index.json`` document; ``where`` (its path or URL) starts every error message.

    Raises:
        IndexFileError: no ``schema`` or ``shards`` list, an unknown field, or a value of the wrong type
            (naming its key).
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("shards"), list):
        raise IndexFileError(f"{where}: not a gfm index.json (no 'shards' list)")
    unknown = sorted(set(doc) - set(_FIELDS))
    if unknown:
        raise IndexFileError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(_FIELDS)})")
    shards = [_shard(s, where, f"shards[{i}]") for i, s in enumerate(doc["shards"])]
    names = [s.name for s in shards]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise IndexFileError(f"{where}: shards: {repeated[0]!r} is listed more than once")
    bands = {_keyed(k, where, "bands"): _band(v, where, f"bands[{k!r}]")
             for k, v in _mapping(doc.get("bands", {}), where, "bands").items()}
    for k, b in bands.items():
        if b.key != k:
            raise IndexFileError(f"{where}: bands[{k!r}] describes {b.key!r}")
    stats = {_keyed(k, where, "stats"): _summary(v, where, f"stats[{k!r}]")
             for k, v in _mapping(doc.get("stats", {}), where, "stats").items()}
    scenes = {}
    for sid, c in _mapping(doc.get("scenes", {}), where, "scenes").items():
        c = _mapping(c, where, f"scenes[{sid!r}]")
        _fields(c, where, f"scenes[{sid!r}]", ("samples", "dropped"), ())
        scenes[sid] = SceneCounts(_int(c["samples"], where, f"scenes[{sid!r}].samples"),
                                  _int(c["dropped"], where, f"scenes[{sid!r}].dropped"))
    known_bytes = [s.bytes for s in shards if s.bytes is not None]
    if "schema" not in doc:
        raise IndexFileError(f"{where}: not a gfm index.json (no 'schema' version)")
    schema = doc["schema"]
    created_by = doc.get("created_by")
    tile_size = doc.get("tile_size")
    nbytes = doc.get("bytes", sum(known_bytes) if len(known_bytes) == len(shards) else None)
    return Index(
        schema=_int(schema, where, "schema"),
        created_by=None if created_by is None else _str(created_by, where, "created_by"),
        shards=shards,
        samples=_int(doc.get("samples", sum(s.samples for s in shards)), where, "samples"),
        bytes=None if nbytes is None else _int(nbytes, where, "bytes"),
        tile_size=None if tile_size is None else _int(tile_size, where, "tile_size"),
        sensors=_strings(doc.get("sensors", []), where, "sensors"),
        dates=_strings(doc.get("dates", []), where, "dates"),
        bands=bands,
        stats=stats,
        scenes=scenes,
        dropped_low_valid=_int(doc.get("dropped_low_valid", 0), where, "dropped_low_valid"),
        planned_shards=_int(doc.get("planned_shards", len(shards)), where, "planned_shards"),
        missing_shards=[check_shard_name(v, where, f"missing_shards[{i}]")
                        for i, v in enumerate(_strings(doc.get("missing_shards", []), where, "missing_shards"))],
        classes=_classes(doc.get("classes"), where),
    )


def parse(data: str | bytes, where: str) -> Index:
    """Parse and validate the text of an ``index.json``; ``where`` names it in errors."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexFileError(f"{where}: not valid JSON ({e})") from None
    return from_dict(doc, where)


def index_path(root: str | Path) -> Path:
    """The ``index.json`` of a dataset root (``root`` may also name the file itself)."""
    p = Path(root)
    return p if p.name == INDEX_FILE and not p.is_dir() else p / INDEX_FILE


def read(root: str | Path) -> Index:
    """Read and validate the ``index.json`` of a local dataset root (or the file itself).

    Raises:
        IndexNotFoundError: there is none.
        IndexFileError: it breaks the contract (the message names the file and the key).
    """
    path = index_path(root)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise IndexNotFoundError(path) from None
    except OSError as e:
        raise IndexFileError(f"{path}: cannot read ({e.strerror})") from None
    return parse(data, str(path))


def write(root: str | Path, index: Index) -> Path:
    """Write ``index`` to ``root/index.json`` atomically (readers never see half a file); returns the path."""
    return atomic_write(Path(root) / INDEX_FILE, json.dumps(index.to_dict(), indent=1).encode())


# ----------------------------------------------------------------------------------------------
# Merging


@dataclass(frozen=True)
class ShardPart:
    """What one finished shard adds to an index (a shard without samples adds only its scene counts).

    Attributes:
        shard: the shard's entry.
        tile_size: tile size in pixels of its tiles.
        bands: key → description of every band in its samples.
        dates, sensors: those seen in its samples.
        scenes: scene id → its tiles in this shard.
        dropped_low_valid: tiles of this shard dropped for too few valid pixels.
    """

    shard: ShardEntry
    tile_size: int | None
    bands: Mapping[str, BandInfo]
    dates: Sequence[str]
    sensors: Sequence[str]
    scenes: Mapping[str, SceneCounts]
    dropped_low_valid: int


def merge(
    parts: Iterable[ShardPart],
    stats: Mapping[str, BandSummary],
    *,
    schema: int,
    created_by: str,
    planned: Sequence[str] | None = None,
    tile_size: int | None = None,
    classes: Mapping[int, str] | None = None,
) -> Index:
    """One index from the parts of every finished shard, in the order given.

    Statistics cannot be merged from summaries (percentiles), so the caller merges them exactly from
    its own accumulators and passes the result as ``stats``; everything else is merged here.

    Args:
        parts: one per finished shard, shards with no samples included.
        stats: key → statistics over every shard.
        schema: the tile sample schema version of the shards.
        created_by: ``"gfm <version>"``.
        planned: every shard name of the build plan (None: the parts are the plan).
        tile_size: the plan's tile size (None: the first part's).
        classes: label value → class name of the build's labels (None: the labels have no names).

    Raises:
        IndexFileError: a shard given twice, a band key that does not match its description, a band
            described differently by two shards, or statistics for a key no shard has (naming the key).
    """
    shards: list[ShardEntry] = []
    bands: dict[str, BandInfo] = {}
    first_seen: dict[str, str] = {}
    dates: set[str] = set()
    sensors: set[str] = set()
    scenes: dict[str, SceneCounts] = {}
    done: set[str] = set()
    dropped = 0
    for part in parts:
        name = part.shard.name
        if name in done:
            raise IndexFileError(f"shard {name!r} is given twice")
        done.add(name)
        dropped += part.dropped_low_valid
        tile_size = tile_size or part.tile_size
        for sid, c in part.scenes.items():
            acc = scenes.get(sid, SceneCounts(0, 0))
            scenes[sid] = SceneCounts(acc.samples + c.samples, acc.dropped + c.dropped)
        if not part.shard.samples:
            continue
        shards.append(part.shard)
        for key, band in part.bands.items():
            if band.key != key:
                raise IndexFileError(f"shard {name!r}: bands[{key!r}] describes {band.key!r}")
            if key in bands and bands[key] != band:
                raise IndexFileError(
                    f"band {key!r}: shard {name!r} describes it as {band}, shard {first_seen[key]!r} as "
                    f"{bands[key]}; one sensor name must mean one band table"
                )
            bands.setdefault(key, band)
            first_seen.setdefault(key, name)
        dates.update(part.dates)
        sensors.update(part.sensors)
    for key in stats:
        if key not in bands:
            raise IndexFileError(f"stats[{key!r}]: no shard has a band of that key")
    missing = sorted(set(planned) - done) if planned is not None else []
    known_bytes = [s.bytes for s in shards if s.bytes is not None]
    return Index(
        schema=schema,
        created_by=created_by,
        shards=shards,
        samples=sum(s.samples for s in shards),
        bytes=sum(known_bytes),
        tile_size=tile_size,
        sensors=sorted(sensors),
        dates=sorted(dates),
        bands=dict(sorted(bands.items())),
        stats={k: stats[k] for k in sorted(stats)},
        scenes=scenes,
        dropped_low_valid=dropped,
        planned_shards=len(planned) if planned is not None else len(done),
        missing_shards=missing,
        classes=dict(sorted(classes.items())) if classes is not None else None,
    )



# ----------------------------------------------------------------------------------------------
# Member tables

#: The ``format`` tag of a member table.
MEMBERS_FORMAT = "gfm-members/1"
_TAR_BLOCK = 512

#: One member of a sample: (suffix, offset of its data in the tar, size in bytes).
Member = tuple[str, int, int]


@dataclass(frozen=True)
class MemberTable:
    """Where the members of every sample of one shard lie (see the module docstring).

    Attributes:
        shard: the tar's file name.
        bytes: the tar's size; a tar of another size is not the one the table describes.
        samples: ``(key, members)`` per sample in tar order; members in tar order.
    """

    shard: str
    bytes: int
    samples: list[tuple[str, list[Member]]]

    def to_dict(self) -> dict[str, Any]:
        """The JSON document."""
        return {"format": MEMBERS_FORMAT, "shard": self.shard, "bytes": self.bytes,
                "samples": [[key, [list(m) for m in members]] for key, members in self.samples]}


def members_name(shard: str) -> str:
    """The member table's file name for shard file ``shard`` (``gfm-000000.tar`` → ``gfm-000000.members.json``)."""
    stem = shard[: -len(".tar")] if shard.endswith(".tar") else shard
    return stem + ".members.json"


def parse_members(data: str | bytes, where: str) -> MemberTable:
    """Parse and check a member table; ``where`` names it in errors.

    Checks the structure and that every member lies after its header block, inside the tar, after the
    previous member. Whether it matches the tar's content is the reader's check.

    Raises:
        IndexFileError: not JSON, another format, or a value of the wrong type or out of place (naming it).
    """
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IndexFileError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != MEMBERS_FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else doc
        raise IndexFileError(f"{where}: format: expected {MEMBERS_FORMAT!r}, got {got!r}")
    _fields(doc, where, "member table", ("format", "shard", "bytes", "samples"), ())
    shard = _str(doc["shard"], where, "shard")
    size = _int(doc["bytes"], where, "bytes")
    if not isinstance(doc["samples"], list):
        raise _bad(where, "samples", "a list", doc["samples"])
    samples: list[tuple[str, list[Member]]] = []
    end = 0
    for i, entry in enumerate(doc["samples"]):
        ok = isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], list)
        if not ok or not entry[1]:
            raise _bad(where, f"samples[{i}]", "[key, [[suffix, offset, size], ...]]", entry)
        members: list[Member] = []
        for j, m in enumerate(entry[1]):
            ok = isinstance(m, list) and len(m) == 3 and isinstance(m[0], str)
            if not ok or any(isinstance(v, bool) or not isinstance(v, int) for v in m[1:]):
                raise _bad(where, f"samples[{i}][{j}]", "[suffix, offset, size]", m)
            suffix, offset, n = m
            if offset % _TAR_BLOCK or offset < end + _TAR_BLOCK or n < 0 or offset + n > size:
                raise _bad(where, f"samples[{i}][{j}]", f"a member after its header inside the {size}-byte tar", m)
            end = offset + n
            members.append((suffix, offset, n))
        samples.append((entry[0], members))
    return MemberTable(shard=shard, bytes=size, samples=samples)


def write_members(path: str | Path, table: MemberTable) -> Path:
    """Write a member table atomically (compact JSON); returns the path."""
    return atomic_write(path, json.dumps(table.to_dict(), separators=(",", ":")).encode())
