import numpy as np
import pytest

from gfm.shards.stats import BandStats


def test_exact_integer_stats_merge_like_numpy():
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 4000, size=n).astype(np.uint16) for n in (1000, 5000, 17)]
    acc = [BandStats() for _ in parts]
    for a, p in zip(acc, parts):
        for chunk in np.array_split(p, 3):
            a.update(chunk)
    merged = BandStats.from_state(acc[0].state())
    for a in acc[1:]:
        merged.merge(BandStats.from_state(a.state()))
    allv = np.concatenate(parts)
    s = merged.summary()
    assert s["count"] == allv.size and merged.exact
    assert s["mean"] == pytest.approx(allv.mean()) and s["std"] == pytest.approx(allv.std())
    for q in (1, 50, 99):
        assert merged.percentile(q) == np.percentile(allv, q, method="lower")


def test_float_stats_use_a_weighted_reservoir():
    rng = np.random.default_rng(1)
    a, b = BandStats(), BandStats()
    x = rng.normal(10, 2, 200_000).astype(np.float32)
    y = rng.normal(20, 1, 50_000).astype(np.float32)
    a.update(x)
    b.update(y)
    a.merge(b)
    allv = np.concatenate([x, y])
    assert not a.exact and a.count == allv.size
    assert a.mean == pytest.approx(allv.mean(), rel=1e-9)
    assert a.std == pytest.approx(allv.std(), rel=1e-6)
    assert a.percentile(99) == pytest.approx(np.percentile(allv, 99), abs=0.3)
    assert a.percentile(1) == pytest.approx(np.percentile(allv, 1), abs=0.3)


def test_mixed_int_then_float_leaves_exact_mode():
    s = BandStats()
    s.update(np.arange(100, dtype=np.int16))
    s.merge(BandStats.from_state(BandStats().state()))
    t = BandStats()
    t.update(np.linspace(0, 1, 10, dtype=np.float32))
    s.merge(t)
    assert not s.exact and s.count == 110
