"""Shard sidecars: ``<name>-<index>.stats.json``, written last, marks a shard complete.

A sidecar holds what the shard adds to ``index.json`` plus the mergeable state of its band
statistics, so the index of a build split over workers and machines is a merge of sidecars.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gfm.fileio import atomic_write
from gfm.index import BandInfo, SceneCounts, ShardEntry, ShardPart
from gfm.shards.errors import DatasetError

SIDECAR_SUFFIX = ".stats.json"


def sidecar_path(out: Path, shard: str) -> Path:
    """The sidecar of shard file ``shard`` in ``out``."""
    return out / (shard[: -len(".tar")] + SIDECAR_SUFFIX)


def is_complete(out: Path, shard: str) -> bool:
    """A shard is complete when its sidecar exists (written last)."""
    return sidecar_path(out, shard).exists()


@dataclass
class ShardSummary:
    """The content of one sidecar.

    Attributes:
        name, index: the shard's file name and plan index.
        samples, bytes, sha256: tiles written, tar size and checksum (0 and "" when no tile was valid
            enough; then no tar exists).
        dropped_low_valid: tiles dropped below ``min_valid``.
        members: file name of the shard's member table (None: none was written).
        tile_size: tile size in pixels.
        bands: ``"<sensor>/<band>"`` → description, for every band in the samples.
        stats: ``"<sensor>/<band>"`` → :meth:`gfm.shards.stats.BandStats.state`.
        dates, sensors: sorted, as seen in the samples.
        scenes: scene id → tiles written and dropped in this shard.
    """

    name: str
    index: int
    samples: int
    bytes: int
    sha256: str
    dropped_low_valid: int
    tile_size: int
    bands: dict[str, BandInfo]
    stats: dict[str, dict[str, Any]]
    dates: list[str]
    sensors: list[str]
    scenes: dict[str, SceneCounts]
    members: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, fields in file order."""
        return {
            "name": self.name,
            "index": self.index,
            "samples": self.samples,
            "bytes": self.bytes,
            "sha256": self.sha256,
            **({"members": self.members} if self.members else {}),
            "dropped_low_valid": self.dropped_low_valid,
            "tile_size": self.tile_size,
            "bands": {k: b.to_dict() for k, b in self.bands.items()},
            "stats": self.stats,
            "dates": self.dates,
            "sensors": self.sensors,
            "scenes": {k: c.to_dict() for k, c in self.scenes.items()},
        }

    def part(self) -> ShardPart:
        """What this shard adds to ``index.json`` (statistics aside)."""
        return ShardPart(
            shard=ShardEntry(self.name, self.samples, self.bytes, self.sha256, self.members),
            tile_size=self.tile_size,
            bands=self.bands,
            dates=self.dates,
            sensors=self.sensors,
            scenes=self.scenes,
            dropped_low_valid=self.dropped_low_valid,
        )


def write_sidecar(out: Path, summary: ShardSummary) -> Path:
    """Write the sidecar of ``summary``'s shard atomically: from now on the shard counts as complete."""
    return atomic_write(sidecar_path(out, summary.name), json.dumps(summary.to_dict()).encode())


def read_sidecar(path: Path) -> ShardSummary:
    """Read one sidecar.

    Raises:
        DatasetError: unreadable or incomplete (naming the file; deleting it rebuilds that shard).
    """
    try:
        d = json.loads(path.read_text())
        return ShardSummary(
            name=str(d["name"]),
            index=int(d["index"]),
            samples=int(d["samples"]),
            bytes=int(d["bytes"]),
            sha256=str(d["sha256"]),
            members=None if d.get("members") is None else str(d["members"]),
            dropped_low_valid=int(d["dropped_low_valid"]),
            tile_size=int(d["tile_size"]),
            bands={k: BandInfo(**b) for k, b in d["bands"].items()},
            stats=dict(d["stats"]),
            dates=list(d["dates"]),
            sensors=list(d["sensors"]),
            scenes={k: SceneCounts(int(c["samples"]), int(c["dropped"])) for k, c in d["scenes"].items()},
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        problem = e.strerror if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
        raise DatasetError(f"{path}: unreadable shard sidecar ({problem}); delete it to rebuild that shard") from None
