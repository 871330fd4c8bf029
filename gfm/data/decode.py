"""Sample decoding for the reader: :func:`gfm.schema.decode`'s contract, with a fast ``.npy`` path.

``np.load`` parses every array header with ``ast.literal_eval``, which costs more than the rest of
the sample's decoding together. Tiles of one dataset share a handful of headers, so the parsed header
(dtype, shape, order) is cached by its bytes and the payload becomes a zero-copy ``np.frombuffer`` view.
An unseen header goes through ``np.load(..., allow_pickle=False)`` once. Object dtypes are refused, so
nothing is ever unpickled; member policy and validation are the schema module's own.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from gfm.schema import SchemaError, Tile, decode

_MAGIC = b"\x93NUMPY"
_MAX_HEADERS = 4096
_headers: dict[bytes, tuple[np.dtype, tuple[int, ...], bool]] = {}


def load_npy(data: bytes, key: str, member: str) -> np.ndarray:
    """One ``.npy`` member as an array (a read-only view of ``data`` when the header is known)."""
    if data[:6] != _MAGIC or len(data) < 10:
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
