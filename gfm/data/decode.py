"""Sample decoding for the reader: :func:`gfm.schema.decode`'s contract, with fast ``.npy`` and ``meta.json`` paths.

``np.load`` parses every array header with ``ast.literal_eval``, which costs more than the rest of
the sample's decoding together. Tiles of one dataset share a handful of headers, so the parsed header
(dtype, shape, order) is cached by its bytes and the payload becomes a zero-copy ``np.frombuffer`` view.
An unseen header goes through ``np.load(..., allow_pickle=False)`` once. Object dtypes are refused, so
nothing is ever unpickled; member policy and validation are the schema module's own.

``meta.json`` is mostly the band list (one object per observation), the same for every tile of a scene.
:class:`TileDecoder` keeps the band lists of tiles that passed :func:`gfm.schema.validate`, keyed by their
exact JSON text; a ``meta.json`` whose only ``"bands"`` string is its first key, followed by a known list,
is parsed without it and gets the validated list (shared between tiles: read-only), so neither the
list's JSON nor its per-band checks are paid again. Anything else is parsed whole.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from gfm.schema import SchemaError, Tile, bandset_signature, decode

_MAGIC = b"\x93NUMPY"
_MAX_HEADERS = 4096
_headers: dict[bytes, tuple[np.dtype, tuple[int, ...], bool]] = {}


def load_npy(data: bytes | memoryview, key: str, member: str) -> np.ndarray:
    """One ``.npy`` member as an array (a read-only view of ``data`` when the header is known)."""
    if len(data) < 10 or data[:6] != _MAGIC:
        raise SchemaError(f"sample {key!r}: {member} is not a .npy array (bad magic)")
    if data[6] == 1:
        start = 10 + int.from_bytes(data[8:10], "little")
    elif data[6] in (2, 3):
        start = 12 + int.from_bytes(data[8:12], "little")
    else:
        raise SchemaError(f"sample {key!r}: {member} has unknown .npy version {data[6]}")
    header = bytes(data[:start])
    info = _headers.get(header)
    if info is None:
        try:
            arr = np.load(io.BytesIO(data), allow_pickle=False)
        except Exception as e:  # numpy raises ValueError/OSError/EOFError variously on bad bytes
            raise SchemaError(f"sample {key!r}: {member} is not a readable .npy array ({e})") from None
        if len(_headers) < _MAX_HEADERS:
            _headers[header] = (arr.dtype, arr.shape, bool(arr.flags.f_contiguous and not arr.flags.c_contiguous))
        return arr
    dtype, shape, fortran = info
    count = math.prod(shape)
    if len(data) - start != count * dtype.itemsize:
        raise SchemaError(
            f"sample {key!r}: {member} holds {len(data) - start} bytes, its header promises "
            f"{count * dtype.itemsize} (truncated?)"
        )
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=start)
    return arr.reshape(shape, order="F" if fortran else "C")


def decode_sample(sample: Mapping[str, Any]) -> Tile:
    """A raw WebDataset sample → validated :class:`Tile`: ``schema.decode`` with the fast ``.npy`` reader."""
    return decode(sample, npy_loader=load_npy)


_BANDS_KEY = b'{"bands":'
_MAX_BAND_LISTS = 256
_JSON = json.JSONDecoder()


class TileDecoder:
    """Raw sample (``__key__`` plus bytes per member) → validated :class:`Tile`, reusing band lists.

    ``schema.decode`` with :func:`load_npy` and a ``meta.json`` parser that reuses validated band lists
    (module docstring). One decoder per sample stream; ``band_lists`` maps exact JSON text → the list.
    """

    def __init__(self) -> None:
        self.band_lists: dict[bytes, list[dict[str, Any]]] = {}
        self._signatures: dict[int, str] = {}  # id of a list in band_lists (kept alive there) → signature
        self._candidate: tuple[bytes, list[dict[str, Any]]] | None = None
        self._last: bytes | None = None

    def __call__(self, sample: Mapping[str, Any]) -> Tile:
        """Decode and validate one sample. Raises :class:`~gfm.schema.SchemaError` naming the key and member."""
        self._candidate = None
        tile = decode(sample, npy_loader=load_npy, meta_loader=self._meta)
        if self._candidate is not None and self._candidate[1] is tile.meta["bands"]:
            text, bands = self._candidate  # validated: reusable from now on
            self.band_lists[text] = bands
            self._signatures[id(bands)] = bandset_signature(bands)
        self._candidate = None
        return tile

    def signature(self, bands: list[Any]) -> str:
        """:func:`gfm.schema.bandset_signature` of a tile's band list (looked up for the lists kept here)."""
        sig = self._signatures.get(id(bands))
        return bandset_signature(bands) if sig is None else sig

    def _meta(self, data: bytes | memoryview, key: str) -> tuple[dict[str, Any], bool]:
        raw = bytes(data)
        # Only when "bands" is the first key, no other "bands" string exists (key or value, duplicate or
        # nested; JSON strings cannot hide an unescaped quote) and no \u escape could spell one, is the
        # document with the known list spliced out the same document.
        if not (raw.startswith(_BANDS_KEY) and raw.count(b'"bands"') == 1 and b"\\u" not in raw):
            return json.loads(raw), False
        p = len(_BANDS_KEY)
        # the last list that matched first: consecutive tiles usually share one
        for text in (self._last, *self.band_lists):
            if text is not None and raw.startswith(text, p):
                meta = _JSON.decode((raw[:p] + b"null" + raw[p + len(text) :]).decode())
                if not isinstance(meta, dict):
                    break
                meta["bands"] = self.band_lists[text]
                self._last = text
                return meta, True
        meta = json.loads(raw)
        bands = meta.get("bands") if isinstance(meta, dict) else None
        if isinstance(bands, list) and len(self.band_lists) < _MAX_BAND_LISTS:
            text = json.dumps(bands, separators=(",", ":"), sort_keys=True).encode()
            if raw.startswith(text, p):  # written the way gfm writes it: remember once validated
                self._candidate = (text, bands)
        return meta, False
