"""Local shards read through their member tables: one ``pread`` per sample, no tar walking.

The shard writer records where every sample's members lie in the tar (:class:`gfm.index.MemberTable`,
``<shard>.members.json``). For a local shard whose ``index.json`` entry names its table, the loader
reads a sample as one ``os.pread`` of the bytes from its first member's header to its last member's
end, and the members are ``memoryview`` slices of that buffer (arrays become ``np.frombuffer`` views:
no further copy). The read happens when the sample is decoded, after the shuffle buffer, so the buffer
holds references rather than bytes.

The table is a hint, never trusted blindly:

* at open, the tar's size must equal the size the table records, and the table must list as many
  samples as ``index.json`` — otherwise the shard is read as a tar stream (logged), where a truncated
  tar is the usual counted shard fault;
* at every read, each member's 512-byte tar header (inside the same ``pread``) must name
  ``<key>.<suffix>`` and the recorded size, as a regular file — otherwise the sample is a counted fault
  naming the table, never another sample's bytes. A short read (the file shrank) is a fault as well.

``pipe:`` commands, URLs and shards without a table always go through the tar stream.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from gfm.index import IndexFileError, MemberTable, parse_members
from gfm.schema import SchemaError

log = logging.getLogger("gfm.data")

_BLOCK = 512
_TABLE_CACHE = 64  # parsed tables kept per stream (resampled mode reopens shards)


class ShardFile:
    """An open local shard and its member table; the file closes when the last sample reference goes."""

    def __init__(self, path: str, table: MemberTable, members: str) -> None:
        self.path = path
        self.table = table
        self.members = members  # where the table was read from
        self.fd = os.open(path, os.O_RDONLY)
        self._close = os.close  # still there when __del__ runs at interpreter exit

    def __del__(self) -> None:
        if hasattr(self, "_close"):
            self._close(self.fd)


@dataclass(frozen=True, slots=True)
class SampleRef:
    """Sample ``index`` of an open shard, read by :meth:`load` (after the shuffle buffer)."""

    shard: ShardFile
    index: int

    @property
    def key(self) -> str:
        """The sample's key, as the table records it."""
        return self.shard.table.samples[self.index][0]

    def load(self) -> dict[str, Any]:
        """The raw sample (``__key__``, ``__url__``, member suffix → ``memoryview``), checked against the tar.

        Raises:
            SchemaError: the file is shorter than the table says, or a member header does not name
                ``<key>.<suffix>`` with the recorded size (the table does not describe this tar).
        """
        key, members = self.shard.table.samples[self.index]
        start = members[0][1] - _BLOCK
        stop = members[-1][1] + members[-1][2]
        buf = os.pread(self.shard.fd, stop - start, start)
        where = f"member table {self.shard.members}"
        if len(buf) != stop - start:
            raise SchemaError(f"sample {key!r}: {where} points past the end of the file (truncated?)")
        view = memoryview(buf)
        sample: dict[str, Any] = {"__key__": key, "__url__": self.shard.path}
        for suffix, offset, size in members:
            head = offset - _BLOCK - start
            name = f"{key}.{suffix}".encode()
            named = buf.startswith(name, head) and (len(name) == 100 or buf[head + len(name)] == 0)
            kind = buf[head + 156]
            try:
                recorded = int(buf[head + 124 : head + 136].rstrip(b"\0 ").strip() or b"0", 8)
            except ValueError:
                recorded = -1
            if not named or recorded != size or kind not in (0x30, 0):  # "0" or NUL: a regular file
                raise SchemaError(
                    f"sample {key!r}: {where} does not match the tar at {suffix} (its header names "
                    f"{buf[head : head + 100].rstrip(bytes(1))[:60]!r}, {recorded} bytes; table: {size} bytes)"
                )
            sample[suffix.lower()] = view[offset - start : offset - start + size]  # as webdataset names it
        return sample


class TableCache:
    """Parsed member tables of one stream, re-read when the table file changes."""

    def __init__(self) -> None:
        self._tables: dict[str, tuple[tuple[int, int], MemberTable]] = {}

    def open(self, url: str, members: str, count: int | None) -> ShardFile | None:
        """The shard at local path ``url`` with its table at ``members``; None (logged) to read it as a tar.

        Raises:
            OSError: the shard itself cannot be opened (a shard fault, as on the tar path).
        """
        try:
            st = os.stat(members)
            stamp = (st.st_mtime_ns, st.st_size)
            cached = self._tables.get(members)
            if cached is not None and cached[0] == stamp:
                table = cached[1]
            else:
                with open(members, "rb") as f:
                    table = parse_members(f.read(), members)
                while len(self._tables) >= _TABLE_CACHE:
                    self._tables.pop(next(iter(self._tables)))
                self._tables[members] = (stamp, table)
        except (OSError, IndexFileError) as e:
            log.warning("reading %s as a tar stream: its member table is unusable (%s)", url, e)
            return None
        shard = ShardFile(url, table, members)
        size = os.fstat(shard.fd).st_size
        problem = None
        if size != table.bytes:
            problem = f"the tar has {size} bytes, the table describes {table.bytes}"
        elif count is not None and len(table.samples) != count:
            problem = f"the table lists {len(table.samples)} samples, index.json {count}"
        elif os.path.basename(url) != table.shard:
            problem = f"the table describes {table.shard!r}"
        if problem:
            log.warning("reading %s as a tar stream: %s (%s)", url, problem, members)
            return None
        return shard


def sample_refs(shard: ShardFile, start: int, stop: int) -> Iterator[SampleRef]:
    """References to samples ``[start, stop)`` of ``shard`` (clipped to the table), hinting the OS to read ahead."""
    samples = shard.table.samples
    stop = min(stop, len(samples))
    if start >= stop:
        return
    first = samples[start][1][0][1] - _BLOCK
    last = samples[stop - 1][1][-1]
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(shard.fd, first, last[1] + last[2] - first, os.POSIX_FADV_WILLNEED)
    for i in range(start, stop):
        yield SampleRef(shard, i)
