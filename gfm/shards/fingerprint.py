"""Input fingerprints: whether a file is still the one a finished shard was built from.

A fingerprint holds the file's size, its modification time, and a sha256 of its content: the whole file
when it is small enough to hash cheaply (:data:`FULL_HASH_BYTES`), else of its size, its first MiB
(the header, and the tile index of a cloud-optimised GeoTIFF), its last 256 KiB and 32 evenly spaced
64 KiB blocks. Two fingerprints describe the same content when size and hash agree and, unless the whole
file was hashed, the modification time too (a rewritten file whose sampled blocks happen to agree still
counts as changed).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Files up to this size are hashed whole; larger ones by sampled blocks.
FULL_HASH_BYTES = 32 * 1024**2
_HEAD = 1024**2
_TAIL = 256 * 1024
_BLOCK = 64 * 1024
_BLOCKS = 32


@dataclass(frozen=True)
class Fingerprint:
    """Size, modification time (ns) and content hash of one input file.

    Attributes:
        size: bytes.
        mtime_ns: modification time in nanoseconds.
        sha256: hex digest of the whole file (``full``) or of the sampled blocks.
        full: whether ``sha256`` covers the whole file.
    """

    size: int
    mtime_ns: int
    sha256: str
    full: bool

    def to_dict(self) -> dict[str, Any]:
        """The JSON object recorded in ``build.json``."""
        return {"size": self.size, "mtime_ns": self.mtime_ns, "sha256": self.sha256, "full": self.full}

    @staticmethod
    def from_dict(d: Any) -> Fingerprint | None:
        """The fingerprint of a ``build.json`` entry; None when it is not one (then the file counts as changed)."""
        try:
            return Fingerprint(int(d["size"]), int(d["mtime_ns"]), str(d["sha256"]), bool(d["full"]))
        except (TypeError, KeyError, ValueError):
            return None

    def change_from(self, old: Fingerprint | None) -> str | None:
        """How this file differs from ``old`` (``"size 10 -> 12 bytes"``...), or None when it is the same content."""
        if old is None:
            return "not fingerprinted before"
        if self.size != old.size:
            return f"size {old.size} -> {self.size} bytes"
        if self.full != old.full or self.sha256 != old.sha256:
            return "content differs"
        if not self.full and self.mtime_ns != old.mtime_ns:
            return "modified since (same size; too large to compare whole)"
        return None


def fingerprint(path: str | Path) -> Fingerprint:
    """Fingerprint one file (see the module docstring).

    Raises:
        OSError: the file cannot be read.
    """
    p = Path(path)
    st = p.stat()
    h = hashlib.sha256()
    with open(p, "rb") as f:
        if st.st_size <= FULL_HASH_BYTES:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
            return Fingerprint(st.st_size, st.st_mtime_ns, h.hexdigest(), True)
        h.update(str(st.st_size).encode())
        h.update(f.read(_HEAD))
        span = st.st_size - _HEAD - _TAIL
        for i in range(_BLOCKS):
            f.seek(_HEAD + span * i // _BLOCKS)
            h.update(f.read(_BLOCK))
        f.seek(st.st_size - _TAIL)
        h.update(f.read(_TAIL))
    return Fingerprint(st.st_size, st.st_mtime_ns, h.hexdigest(), False)
