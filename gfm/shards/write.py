"""Writing one shard: read its tiles, drop those with too few valid pixels, write the tar, then the sidecar.

The tar is written under a temporary name and renamed into place, then its member table (where each
sample's members lie, :class:`gfm.index.MemberTable`, for readers that slice samples out of the file),
and only then is its sidecar written, so an interrupted build never leaves a file a reader would take
for a complete shard. Member mtimes are fixed, so identical inputs give byte-identical shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

from gfm.index import BandInfo, Member, MemberTable, SceneCounts, members_name, stats_key, write_members
from gfm.schema import encode
from gfm.shards.errors import DatasetError
from gfm.shards.options import BuildOptions
from gfm.shards.plan import ShardPlan
from gfm.shards.scene import Scene, open_scene
from gfm.shards.sidecar import ShardSummary, write_sidecar
from gfm.shards.spec import SceneSpec
from gfm.shards.stats import BandStats
from gfm.shards.tiles import make_tile, read_row

_TAR_MTIME = 0  # fixed member mtime: identical inputs give byte-identical shards


class TarSampleWriter:
    """Writes WebDataset samples (``__key__`` + ``member -> bytes``) as a POSIX tar.

    The format is exactly what ``webdataset.TarWriter`` writes; it is done with the standard
    library here because importing webdataset imports torch, which costs seconds at start-up of
    every ``gfm shards`` call and every worker process.

    ``samples`` records, per sample written, its key and ``(suffix, data offset, size)`` per member:
    the shard's member table.
    """

    def __init__(self, fileobj: BinaryIO) -> None:
        self._tar = tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT)
        self.samples: list[tuple[str, list[Member]]] = []

    def write(self, sample: dict[str, Any]) -> None:
        """Append one sample: members ``<key>.<suffix>`` in sorted order."""
        key = sample["__key__"]
        members: list[Member] = []
        for suffix in sorted(k for k in sample if not k.startswith("__")):
            data = sample[suffix]
            info = tarfile.TarInfo(f"{key}.{suffix}")
            info.size, info.mtime, info.mode = len(data), _TAR_MTIME, 0o444
            info.uname = info.gname = "gfm"
            self._tar.addfile(info, io.BytesIO(data))
            padded = -(-len(data) // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            members.append((suffix, self._tar.offset - padded, len(data)))  # data ends the member just written
        self.samples.append((key, members))

    def close(self) -> None:
        """Finish the archive (end-of-archive blocks)."""
        self._tar.close()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ShardJob:
    """Everything a worker process needs to write one shard (picklable).

    ``classes`` numbers the class names of text-valued vector labels (:func:`gfm.shards.labels.class_table`).
    """

    plan: ShardPlan
    specs: list[SceneSpec]
    opts: BuildOptions
    classes: dict[str, int] | None = None


def temporary_name(shard: str) -> str:
    """The name a shard is written under before it is complete (``.<shard>.<pid>.tmp``)."""
    return f".{shard}.{os.getpid()}.tmp"


def write_shard(job: ShardJob, on_tile: Callable[[int], None] | None = None) -> ShardSummary:
    """Read, filter and write the tiles of one shard, then its sidecar; return the sidecar's summary.

    ``on_tile(1)`` is called for every tile read (progress).

    Raises:
        InputError: an input that cannot be read (e.g. a truncated raster).
        DatasetError: the shard, its member table or sidecar cannot be written (naming the file).
    """
    opts, plan = job.opts, job.plan
    out = Path(opts.out)
    by_scene: dict[int, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    for si, r, c in plan.tiles:
        by_scene[si][r].append(c)
    stats: dict[str, BandStats] = {}
    bands: dict[str, BandInfo] = {}
    dates: set[str] = set()
    sensors: set[str] = set()
    per_scene: dict[str, list[int]] = {}  # scene id -> [samples, dropped]
    samples = dropped = 0
    tmp = out / temporary_name(plan.name)
    try:
        with _writing(tmp), open(tmp, "wb") as fileobj:
            writer = TarSampleWriter(fileobj)
            for si in sorted(by_scene):
                scene = _open_cached(job.specs[si], opts.resampling, job.classes)
                counts = per_scene.setdefault(scene.spec.id, [0, 0])
                for row in sorted(by_scene[si]):
                    for col, px, valid, label in read_row(scene, row, sorted(by_scene[si][row]), opts.tile):
                        if on_tile is not None:
                            on_tile(1)
                        if valid.mean() < opts.min_valid:
                            dropped += 1
                            counts[1] += 1
                            continue
                        tile = make_tile(scene, row, col, opts.tile, px, valid, label)
                        writer.write(encode(tile))
                        samples += 1
                        counts[0] += 1
                        for i, b in enumerate(tile.meta["bands"]):
                            key = stats_key(b["sensor"], b["name"])
                            if key not in stats:
                                stats[key] = BandStats(seed=plan.index)
                                bands[key] = BandInfo(b["name"], b["sensor"], b["center_nm"], b["fwhm_nm"], b["kind"])
                            stats[key].update(px[i][valid[i]])
                            sensors.add(b["sensor"])
                            if b["time"]:
                                dates.add(b["time"])
            writer.close()
        nbytes = tmp.stat().st_size
        digest = sha256_file(tmp) if samples else ""
        if samples:
            with _writing(out / plan.name):
                os.replace(tmp, out / plan.name)
            with _writing(out / members_name(plan.name)):
                write_members(out / members_name(plan.name), MemberTable(plan.name, nbytes, writer.samples))
        else:
            tmp.unlink()
        summary = ShardSummary(
            name=plan.name,
            index=plan.index,
            samples=samples,
            bytes=nbytes if samples else 0,
            sha256=digest,
            members=members_name(plan.name) if samples else None,
            dropped_low_valid=dropped,
            tile_size=opts.tile,
            bands=bands,
            stats={k: s.state() for k, s in stats.items()},
            dates=sorted(dates),
            sensors=sorted(sensors),
            scenes={sid: SceneCounts(n, d) for sid, (n, d) in per_scene.items()},
        )
        with _writing(out / plan.name):
            write_sidecar(out, summary)
        return summary
    finally:
        if tmp.exists():
            tmp.unlink()


_SCENE_CACHE: dict[str, Scene] = {}
_SCENE_CACHE_SIZE = 2  # consecutive shards of one worker usually share a scene


def _open_cached(spec: SceneSpec, resampling: str, classes: dict[str, int] | None = None) -> Scene:
    """Open a scene, reusing this process's last opened ones (files, VRTs, grid)."""
    key = json.dumps([asdict(spec), resampling, classes], sort_keys=True, default=str)
    if key in _SCENE_CACHE:
        return _SCENE_CACHE[key]
    while len(_SCENE_CACHE) >= _SCENE_CACHE_SIZE:
        _SCENE_CACHE.pop(next(iter(_SCENE_CACHE))).close()
    scene = _SCENE_CACHE[key] = open_scene(spec, resampling=resampling, classes=classes)
    return scene


@contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn an OSError from writing ``path`` (full disk, read-only folder...) into a one-line DatasetError."""
    try:
        yield
    except OSError as e:
        raise DatasetError(f"{e.filename or path}: cannot write ({e.strerror or e})") from None


def close_cached_scenes() -> None:
    """Close every cached scene of this process."""
    while _SCENE_CACHE:
        _SCENE_CACHE.popitem()[1].close()
