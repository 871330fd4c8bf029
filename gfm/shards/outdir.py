"""The output directory: whose it is, whether it can be written, and what killed builds left in it.

A build writes only into a new or empty directory, or one holding a gfm build (its ``build.json``). Any
other non-empty directory is refused, unless ``BuildOptions.force``; even then no file the build would
write may exist there already, so a file gfm did not write is never overwritten.

Files are written under temporary names (``.<final name>.<...>.tmp``) and renamed into place. A build
killed mid-shard leaves its temporary file behind; the next build of the same shards removes it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from gfm.index import INDEX_FILE, members_name
from gfm.shards.errors import DatasetError
from gfm.shards.plan import PLAN_FILE, read_plan
from gfm.shards.sidecar import sidecar_path


def check_writable(out: Path) -> None:
    """Create ``out`` if needed and check a file can be created in it.

    Raises:
        DatasetError: ``out`` is a file, or cannot be created or written (naming the reason).
    """
    if out.exists() and not out.is_dir():
        raise DatasetError(f"{out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".gfm-write-check.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise DatasetError(f"{out}: cannot write there ({e.strerror or e})") from None


def _own_names(shards: Iterable[str]) -> list[str]:
    names = [PLAN_FILE, INDEX_FILE]
    for shard in shards:
        names += [shard, sidecar_path(Path(), shard).name, members_name(shard)]
    return names


def claim(out: Path, shards: Iterable[str], *, force: bool) -> None:
    """Check that this build may write into ``out`` (see the module docstring).

    Raises:
        DatasetError: ``out`` is not empty and holds no gfm build (without ``force``), a ``build.json``
            that is not a gfm plan, or (with ``force``) a file this build would write.
    """
    if not out.is_dir():
        return
    if read_plan(out) is not None:  # raises for a build.json that is not ours
        return
    entries = sorted(p.name for p in out.iterdir() if not _is_temporary(p.name))
    if not entries:
        return
    if not force:
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        raise DatasetError(
            f"{out}: not empty ({shown}) and not a gfm dataset (no {PLAN_FILE}); use a new or empty directory, "
            "or {force} to write beside those files (they are never overwritten)",
            force=True,
        )
    present = set(entries)
    clash = [n for n in _own_names(shards) if n in present]
    if clash:
        raise DatasetError(f"{out / clash[0]}: exists and was not written by this build; refusing to overwrite it "
                           "(use a new or empty output directory)")


def _is_temporary(name: str) -> bool:
    return name.startswith(".") and (name.endswith(".tmp") or ".tmp-" in name)


def remove_temporaries(out: Path, shards: Iterable[str], *, plan_files: bool) -> list[str]:
    """Remove the temporary files of ``shards`` (and, with ``plan_files``, of ``build.json``/``index.json``).

    Only temporaries of the given shards are touched, so builds of other parts of the same plan, writing
    other shards into the same directory, are left alone. Returns the names removed.
    """
    if not out.is_dir():
        return []
    prefixes = [f".{s[: -len('.tar')] if s.endswith('.tar') else s}." for s in shards]
    if plan_files:
        prefixes += [f".{PLAN_FILE}.", f".{INDEX_FILE}."]
    starts = tuple(prefixes)
    removed = []
    for p in out.iterdir():
        if _is_temporary(p.name) and p.name.startswith(starts):
            p.unlink(missing_ok=True)
            removed.append(p.name)
    return sorted(removed)
