"""Verify a dataset root: every sample of every shard decodes, and the shards agree with ``index.json``."""

from __future__ import annotations

import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gfm import index as index_file
from gfm.index import stats_key
from gfm.schema import SchemaError, decode
from gfm.shards.write import sha256_file

#: Kinds of :class:`Problem`.
PROBLEM_KINDS = ("missing", "checksum", "sample", "no_stats", "unreadable", "duplicate", "count", "stray", "planned")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one shard.

    Attributes:
        shard: the shard's file name.
        kind: one of :data:`PROBLEM_KINDS`.
        detail: what is wrong (names the sample where there is one).
    """

    shard: str
    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.shard}: {self.detail}"


@dataclass(frozen=True)
class VerifyReport:
    """What :func:`verify` found: shards listed, samples decoded, problems (none when the dataset is sound)."""

    shards: int
    samples: int
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems


def iter_samples(path: Path) -> Iterator[dict[str, bytes | str]]:
    """The samples of one tar, as WebDataset dicts: ``__key__`` plus ``suffix -> bytes`` per member.

    Members are grouped by key (the part of the name before the first dot), in tar order.

    Raises:
        SchemaError: a member that is not a regular file.
        tarfile.TarError, EOFError, OSError: an unreadable tar.
    """
    current: dict[str, bytes | str] = {}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                raise SchemaError(f"member {member.name!r} is not a regular file")
            name = Path(member.name).name
            key, _, suffix = name.partition(".")
            if current and current["__key__"] != key:
                yield current
                current = {}
            f = tar.extractfile(member)
            assert f is not None
            current.setdefault("__key__", key)
            current[suffix] = f.read()
    if current:
        yield current


def verify(root: str | Path) -> VerifyReport:
    """Decode every sample of every shard of ``root``; compare with its ``index.json``.

    Checks, per shard: the file exists, its sha256 matches, every sample decodes under the schema and
    has statistics for each band, no key repeats, the sample count matches; and that no stray tar lies
    in the root and no planned shard is missing.

    Raises:
        gfm.index.IndexFileError: no readable ``index.json`` (IndexNotFoundError when there is none).
    """
    root = Path(root)
    idx = index_file.read(root)
    problems: list[Problem] = []
    n_samples = 0
    for entry in idx.shards:
        name = entry.name
        path = root / name
        if not path.exists():
            problems.append(Problem(name, "missing", "missing"))
            continue
        if entry.sha256 and sha256_file(path) != entry.sha256:
            problems.append(Problem(name, "checksum", "checksum differs from index.json (corrupt or modified)"))
        seen = 0
        keys: Counter[str] = Counter()
        try:
            for sample in iter_samples(path):
                key = str(sample["__key__"])
                keys[key] += 1
                try:
                    tile = decode(sample)
                except SchemaError as e:
                    problems.append(Problem(name, "sample", str(e)))
                    continue
                for b in tile.meta["bands"]:
                    if stats_key(b["sensor"], b["name"]) not in idx.stats:
                        problems.append(
                            Problem(name, "no_stats", f"sample {key!r} band {b['sensor']}/{b['name']} has no stats")
                        )
                seen += 1
        except (tarfile.TarError, EOFError, OSError, SchemaError) as e:
            problems.append(Problem(name, "unreadable", f"unreadable tar after {seen} samples ({e})"))
        dup = [k for k, c in keys.items() if c > 1]
        if dup:
            problems.append(Problem(name, "duplicate", f"duplicate keys {dup[:3]}"))
        if seen != entry.samples:
            problems.append(Problem(name, "count", f"{seen} readable samples, index.json says {entry.samples}"))
        n_samples += seen
    listed = {e.name for e in idx.shards}
    for stray in sorted(p.name for p in root.glob("*.tar")):
        if stray not in listed:
            problems.append(Problem(stray, "stray", "tar file not listed in index.json"))
    for missing in idx.missing_shards:
        problems.append(Problem(missing, "planned", "planned but not built (finish every part of the build, "
                                                    "then merge the index)"))
    return VerifyReport(shards=len(idx.shards), samples=n_samples, problems=problems)
