"""Sample decoding for the reader: :func:`gfm.schema.decode`'s contract, with a fast ``.npy`` path.

``np.load`` parses every array header with ``ast.literal_eval``, which costs more than the rest of
the sample's decoding together. Tiles of one dataset share a handful of headers, so the parsed header
(dtype, shape, order) is cached by its bytes and the payload becomes a zero-copy ``np.frombuffer`` view.
An unseen header goes through ``np.load(..., allow_pickle=False)`` once. Object dtypes are refused, so
nothing is ever unpickled; member policy and validation are the schema module's own.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from gfm.schema import MEMBERS, PICKLE_SUFFIXES, SchemaError, Tile, validate

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
    """A raw WebDataset sample → validated :class:`Tile` (same rules and errors as ``schema.decode``)."""
    key = str(sample.get("__key__", "?"))
    for name in sample:
        if name.startswith("__"):
            continue
        if name.endswith(PICKLE_SUFFIXES):
            raise SchemaError(f"sample {key!r}: member {name!r} is a pickle; gfm never unpickles shard members")
        if name not in MEMBERS:
            raise SchemaError(f"sample {key!r}: unexpected member {name!r}; expected {', '.join(MEMBERS)}")
    for required in ("pixels.npy", "meta.json"):
        if required not in sample:
            raise SchemaError(f"sample {key!r}: missing member {required}")
    pixels = load_npy(sample["pixels.npy"], key, "pixels.npy")
    try:
        meta = json.loads(sample["meta.json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SchemaError(f"sample {key!r}: meta.json is not valid JSON ({e})") from None
    valid = load_npy(sample["valid.npy"], key, "valid.npy") if "valid.npy" in sample else None
    label: np.ndarray | int | None = None
    if "label.npy" in sample:
        label = load_npy(sample["label.npy"], key, "label.npy")
    elif "label.cls" in sample:
        try:
            label = int(bytes(sample["label.cls"]).decode().strip())
        except (UnicodeDecodeError, ValueError):
            raise SchemaError(f"sample {key!r}: label.cls is not an integer") from None
    tile = Tile(key=key, pixels=pixels, meta=meta, valid=valid, label=label)
    validate(tile)
    return tile
