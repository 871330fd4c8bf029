"""Model inputs from shards: meta.json's ``lonlat`` and sensor names reach ``Batch`` and the model."""

from __future__ import annotations

import io
import json
import math
import os
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from gfm.batch import sensor_code
from gfm.data import LoaderConfig
from gfm.model import LESSViT

sys.path.insert(0, os.path.dirname(__file__))
from helpers_shards import write_dataset  # noqa: E402


def lonlat_of(key: str) -> list[float] | None:
    """A distinct, deterministic tile centre per key; every fifth tile has none (null in meta.json)."""
    h = zlib.crc32(key.encode())
    if h % 5 == 0:
        return None
    return [round(-180 + (h % 36000) / 100, 2), round(-90 + (h // 36000 % 18000) / 100, 2)]


def set_lonlat(shard: Path) -> None:
    """Rewrite every meta.json of ``shard`` with :func:`lonlat_of` its key (members and order kept)."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]  # type: ignore[union-attr]
    with tarfile.open(shard, "w") as tar:
        for member, data in members:
            if member.name.endswith(".meta.json"):
                meta = json.loads(data)
                meta["lonlat"] = lonlat_of(member.name.split(".")[0])
                data = json.dumps(meta).encode()
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data))


def test_lonlat_round_trip_from_meta_json_to_batch_and_model(tmp_path: Path) -> None:
    keys = write_dataset(str(tmp_path), [6, 5])
    for shard in sorted(tmp_path.glob("*.tar")):
        set_lonlat(shard)
    cfg = LoaderConfig(shards=str(tmp_path), mode="epoch", batch_size=4, num_workers=1, crop_size=8,
                       shuffle_buffer=4, seed=0)
    seen: dict[str, list[float] | None] = {}
    enc = LESSViT(embed_dim=32, depth=1, num_heads=2, spectral_head_dim=2, patch_size=4).eval()
    for batch in cfg.build(0, 1):
        assert batch.lonlat is not None and batch.lonlat.shape == (batch.size, 2)
        assert batch.lonlat.dtype == torch.float32
        assert batch.sensor is not None and (batch.sensor == sensor_code("landsat8")).all()
        for key, (lon, lat) in zip(batch.keys, batch.lonlat.tolist()):
            seen[key] = None if math.isnan(lon) and math.isnan(lat) else [lon, lat]
        with torch.no_grad():
            assert torch.isfinite(enc.forward_features(batch)).all()
    assert set(seen) <= set(keys) and len(seen) >= 8
    for key, got in seen.items():
        want = lonlat_of(key)
        if want is None:
            assert got is None, key
        else:
            assert got is not None and np.allclose(got, want, atol=1e-4), (key, got, want)
    assert any(v is None for v in seen.values()) and any(v is not None for v in seen.values())


def test_bad_lonlat_is_a_sample_fault() -> None:
    from gfm.data.transforms import tile_lonlat
    from gfm.schema import SchemaError, Tile

    with pytest.raises(SchemaError, match="lonlat"):
        tile_lonlat(Tile("k", np.zeros((1, 2, 2), np.uint16), {"lonlat": [200.0, 10.0]}))
    assert all(math.isnan(v) for v in tile_lonlat(Tile("k", np.zeros((1, 2, 2), np.uint16), {"lonlat": None})))
