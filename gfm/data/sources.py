"""Where the samples are: shard URLs, the dataset's ``index.json``, and who reads which samples.

A shard spec is one of

* a dataset root (local directory, or a URL ending in ``/``): the shards are the ones its
  ``index.json`` lists;
* a brace pattern or ``::``-separated list (``/data/gfm-{000000..000099}.tar``);
* a list file (``*.txt``): one shard path or URL per line, relative paths taken from the file's folder;
* a single URL. ``pipe:`` commands and the schemes webdataset's ``gopen`` knows (http, gs, hf, ...)
  go through webdataset; other ``scheme://`` URLs (``s3://``, ``az://``) through fsspec.

``pipe:`` runs a shell command, so it is used only where the user asks for it: in a spec, list file or
index location they give, and only with ``allow_pipe`` (``LoaderConfig.allow_pipe``); otherwise it is a
start-up error. Shard names *read from* an ``index.json`` are never URLs or commands: :mod:`gfm.index`
refuses anything but plain relative file names inside the dataset, so a downloaded dataset cannot make
the loader run a command or read outside its root, whatever ``allow_pipe`` says.

URLs are passed through untouched. The ``index.json`` (contract in :mod:`gfm.index`) is found at the root,
or next to the first shard, unless given explicitly; it supplies sample counts and band statistics.

Exact epochs split **samples**, not shards: the shards, in an order shuffled per epoch, are laid end to
end and cut into ``world_size * num_workers`` equal contiguous ranges, one per (rank, worker) *slot*. A
slot reads whole shards plus at most a head and a tail part of two boundary shards, so every slot gets
exactly the same number of samples however unevenly the shards are filled, and no slot is empty while
there are enough samples.
"""

from __future__ import annotations

import bisect
import os
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from webdataset.gopen import gopen, gopen_schemes
from webdataset.shardlists import expand_urls

from gfm import index as index_file
from gfm.index import INDEX_FILE, stats_key

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


class LoaderError(RuntimeError):
    """A loader set-up or run-time failure that must stop training (message says what and where)."""


def _scheme(url: str) -> str | None:
    if url.startswith("pipe:"):
        return "pipe"
    m = _SCHEME_RE.match(url)
    return m.group(1).lower() if m else None


def _refuse_pipe(url: str, what: str) -> LoaderError:
    return LoaderError(
        f"{what} {url!r} is a 'pipe:' command, which runs a shell; the loader runs one only when asked to "
        "(LoaderConfig.allow_pipe=True; data.loader.allow_pipe: true in a run config)"
    )


def open_url(url: str, *, allow_pipe: bool = False) -> IO[bytes]:
    """A binary stream for a local path, a remote URL, or (with ``allow_pipe``) a ``pipe:`` command.

    Local paths and ``file://`` open directly; ``pipe:`` and the schemes in webdataset's ``gopen``
    table go through webdataset; anything else with a scheme goes through ``fsspec`` (which must have
    the scheme's backend installed, e.g. ``s3fs`` for ``s3://``).

    Raises:
        LoaderError: a ``pipe:`` command without ``allow_pipe``.
    """
    scheme = _scheme(url)
    if scheme == "pipe" and not allow_pipe:
        raise _refuse_pipe(url, "shard")
    if scheme is None:
        return open(url, "rb")
    if scheme == "file":
        return open(url[len("file://") :], "rb")
    if scheme in gopen_schemes:
        return gopen(url, "rb")  # type: ignore[no-any-return]
    import fsspec

    return fsspec.open(url, "rb").open()  # type: ignore[no-any-return]


def _join(root: str, name: str) -> str:
    if _scheme(name) is not None or os.path.isabs(name):
        return name
    if _scheme(root) is not None:
        return root.rstrip("/") + "/" + name
    return os.path.join(root, name)


def _dirname(url: str) -> str:
    if _scheme(url) is not None and not url.startswith("pipe:"):
        return url.rsplit("/", 1)[0]
    return os.path.dirname(url) or "."


def _basename(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


@dataclass
class DatasetIndex:
    """The parsed ``index.json`` of a dataset root.

    Attributes:
        url: where it was read from.
        counts: shard file name → number of samples.
        stats: ``"<sensor>/<band>"`` → ``{"mean", "std", ...}``.
        raw: the whole document.
    """

    url: str
    counts: dict[str, int]
    stats: dict[str, dict[str, float]]
    raw: dict[str, Any] = field(repr=False)

    @property
    def samples(self) -> int:
        """Total number of samples the index lists."""
        return int(self.raw.get("samples", sum(self.counts.values())))

    @property
    def mean_sample_bytes(self) -> float:
        """Average bytes per sample in the tars (for memory estimates); 0 when unknown."""
        nbytes = self.raw.get("bytes")
        return float(nbytes) / max(1, self.samples) if nbytes else 0.0

    def norm(self, sensor: str, band: str) -> tuple[float, float]:
        """``(mean, std)`` of one band. Raises :class:`LoaderError` naming the band when absent."""
        key = stats_key(sensor, band)
        entry = self.stats.get(key)
        if entry is None or "mean" not in entry or "std" not in entry:
            known = ", ".join(sorted(self.stats)) or "none"
            raise LoaderError(
                f"band {key!r} has no statistics in {self.url} (it has: {known}); rebuild the index over "
                "data that includes this band, or drop it from the shards"
            )
        return float(entry["mean"]), float(entry["std"])


def load_index(url: str, *, allow_pipe: bool = False) -> DatasetIndex:
    """Read and check an ``index.json`` (local path or URL) against its contract (:mod:`gfm.index`).

    ``allow_pipe``: ``url`` may be a ``pipe:`` command (given by the user).
    """
    if _scheme(url) == "pipe" and not allow_pipe:
        raise _refuse_pipe(url, "index")
    try:
        with open_url(url, allow_pipe=allow_pipe) as f:
            data = f.read()
    except FileNotFoundError:
        raise LoaderError(
            f"no index.json at {url}: build the shards with `gfm shards build` (or merge parts with "
            "`gfm shards index DIR`), or set the loader's `index` to its location"
        ) from None
    except OSError as e:
        raise LoaderError(f"cannot read index {url}: {e}") from None
    try:
        index = index_file.parse(data, url)
    except index_file.IndexFileError as e:
        raise LoaderError(str(e)) from None
    stats = {key: summary.to_dict() for key, summary in index.stats.items()}
    return DatasetIndex(url=url, counts=index.counts, stats=stats, raw=index.to_dict())


@dataclass
class ShardSet:
    """The resolved shards of one dataset.

    Attributes:
        urls: shard URLs in their listed order.
        counts: samples per shard, aligned with ``urls`` (from the index; None where it does not list it).
        index: the dataset index.
        members: local path of each shard's member table (:mod:`gfm.data.reader`), aligned with ``urls``;
            None for shards the index gives none, and for every URL and ``pipe:`` command.
        allow_pipe: the user allowed ``pipe:`` commands (for :func:`open_url`).
    """

    urls: list[str]
    counts: list[int | None]
    index: DatasetIndex
    members: list[str | None] = field(default_factory=list)
    allow_pipe: bool = False

    @property
    def total(self) -> int:
        """Samples over all shards with a known count."""
        return sum(c for c in self.counts if c is not None)


def absent_shards(shards: Sequence[str | os.PathLike[str]], index_url: str | os.PathLike[str]) -> str | None:
    """One line naming the first shard file an ``index.json`` lists that is not there (None when all are).

    Only local files are checked (URLs are the reader's business): an index whose tars were moved or not
    copied with it.
    """
    missing = [str(u) for u in shards if _scheme(str(u)) is None and not os.path.isfile(u)]
    if not missing:
        return None
    return (f"{missing[0]}: listed in {index_url} but not there ({len(missing)} of {len(shards)} shard(s) "
            "missing); copy the shards together with their index.json")


def resolve_shards(spec: str, index: str | None = None, *, allow_pipe: bool = False) -> ShardSet:
    """Turn a shard spec (see the module docstring) into URLs plus their index.

    Raises:
        LoaderError: no shards or index, an index that breaks its contract, or a ``pipe:`` command in
            ``spec``, a list file or ``index`` without ``allow_pipe``.
    """
    if not spec:
        raise LoaderError("loader.shards is empty: give a dataset directory, brace pattern, list file or URL")
    for given, what in ((spec, "shard spec"), (index, "index")):
        if given is not None and not allow_pipe and any(part.startswith("pipe:") for part in given.split("::")):
            raise _refuse_pipe(given, what)
    root: str | None = None
    if spec.endswith(INDEX_FILE):
        root = _dirname(spec)
        index = index or spec
    elif os.path.isdir(spec) if _scheme(spec) is None else spec.endswith("/"):
        root = spec
    if root is not None:
        idx = load_index(index or _join(root, INDEX_FILE), allow_pipe=allow_pipe)
        urls = [_join(root, name) for name in idx.counts]
        if not urls:
            raise LoaderError(f"{idx.url} lists no shards")
    else:
        if _scheme(spec) is None and spec.endswith((".txt", ".list")) and os.path.isfile(spec):
            base = os.path.dirname(spec)
            with open(spec, encoding="utf-8") as f:
                lines = [ln.strip() for ln in f]
            urls = [_join(base, ln) for ln in lines if ln and not ln.startswith("#")]
            piped = [u for u in urls if _scheme(u) == "pipe"]
            if piped and not allow_pipe:
                raise _refuse_pipe(piped[0], f"line of {spec}:")
        else:
            urls = list(expand_urls(spec))
        if not urls:
            raise LoaderError(f"shard spec {spec!r} names no shards")
        idx = load_index(index or _join(_dirname(urls[0]), INDEX_FILE), allow_pipe=allow_pipe)
    counts = [idx.counts.get(_basename(u)) for u in urls]
    tables = {e["name"]: e["members"] for e in idx.raw.get("shards", []) if e.get("members")}
    members = [_local_table(u, tables.get(_basename(u))) for u in urls]
    return ShardSet(urls=urls, counts=counts, index=idx, members=members, allow_pipe=allow_pipe)


def local_path(url: str) -> str | None:
    """The file system path of a local shard URL (a plain path or ``file://``); None for anything else."""
    scheme = _scheme(url)
    if scheme is None:
        return url
    return url[len("file://") :] if scheme == "file" else None


def _local_table(url: str, name: str | None) -> str | None:
    path = local_path(url)
    if path is None or name is None or _scheme(name) is not None or os.path.isabs(name) or "/" in name:
        return None  # a table only ever lies beside its (local) shard
    return os.path.join(os.path.dirname(path), name)


@dataclass(frozen=True)
class Segment:
    """Samples ``[start, stop)`` of one shard (by position in the tar)."""

    url: str
    start: int
    stop: int


def epoch_order(n_shards: int, seed: int, epoch: int) -> list[int]:
    """Shard order for an exact epoch: a permutation that depends only on (seed, epoch)."""
    order = list(range(n_shards))
    random.Random(f"gfm-shards/{seed}/{epoch}").shuffle(order)
    return order


def slot_segments(
    urls: list[str], counts: list[int], order: list[int], start: int, stop: int
) -> Iterator[Segment]:
    """The segments covering global samples ``[start, stop)`` of the shards laid end to end in ``order``.

    Positions past the end wrap around (used only to top up a slot that lost samples to faults).
    """
    total = sum(counts)
    if total == 0 or stop <= start:
        return
    offsets = []
    acc = 0
    for i in order:
        offsets.append(acc)
        acc += counts[i]
    pos = start
    while pos < stop:
        p = pos % total
        # the shard holding global position p: the last one starting at or before p (never an empty one,
        # since an empty shard starts where the next one does)
        k = bisect.bisect_right(offsets, p) - 1
        i = order[k]
        local = p - offsets[k]
        take = min(counts[i] - local, stop - pos)
        yield Segment(urls[i], local, local + take)
        pos += take
