"""Files that appear whole or not at all: write to a temporary name beside the target, fsync, rename.

A reader (or a resumed run) never sees a half-written file: either the old content, or nothing, or the
complete new content. Temporary names start with ``.<name>.`` and end with ``.tmp``, so a killed writer's
leftovers are recognisable and never mistaken for results.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit, fsync it and rename it onto ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically; returns ``path``."""
    payload = data.encode() if isinstance(data, str) else data
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)
    return Path(path)


def atomic_save(path: str | Path, writer: Callable[[Path], object]) -> Path:
    """``writer(tmp)`` writes the content to a temporary path, which then replaces ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def stale_temporaries(path: str | Path, kinds: tuple[str, ...] = ()) -> list[Path]:
    """The temporary files writers of ``path`` left beside it: ``.<name>.[<kind>.]XXXXXXXX.tmp``.

    ``XXXXXXXX`` is :func:`tempfile.mkstemp`'s random part; ``kinds`` are the writer's own infixes (a COG
    writer's ``part`` and ``cog``). Only temporaries of ``path`` match, not those of another output (unless
    its name is this one's plus a writer's infix, ``NAME.part``).
    """
    path = Path(path)
    kind = f"(?:(?:{'|'.join(map(re.escape, kinds))})\\.)?" if kinds else ""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.{kind}[a-z0-9_]{{8}}\.tmp")
    if not path.parent.is_dir():
        return []
    return sorted(p for p in path.parent.iterdir() if pattern.fullmatch(p.name) and p.is_file())


def remove_stale_temporaries(path: str | Path, kinds: tuple[str, ...] = ()) -> list[Path]:
    """Remove what :func:`stale_temporaries` finds (a killed writer's leftovers); returns the paths removed.

    Call it before writing ``path`` anew: a writer that is still running on the same output would lose its
    temporary file, as it would lose the output itself to the new run.
    """
    removed = stale_temporaries(path, kinds)
    for p in removed:
        p.unlink(missing_ok=True)
    return removed
