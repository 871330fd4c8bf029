"""Streaming, mergeable per-band statistics (count, mean, std, min, max, 1st/99th percentiles).

Each shard keeps one :class:`BandStats` per ``"<sensor>/<band>"`` and saves its state in the shard's
sidecar; ``index.json`` merges the states of all shards (across workers and ``--part`` jobs).
Integer bands of at most 16 bits keep an exact histogram, so percentiles are exact and merge exactly;
other dtypes keep a fixed-size uniform reservoir sample for percentiles. Count, mean and variance
merge exactly with Chan's parallel formula.
"""

from __future__ import annotations

from typing import Any

import numpy as np

RESERVOIR = 4096  # float samples kept per band per shard


class BandStats:
    """Accumulates statistics of one band's valid pixels."""

    def __init__(self, seed: int = 0) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.min = float("inf")
        self.max = float("-inf")
        self.hist: dict[int, int] = {}  # exact histogram for small integer dtypes
        self.reservoir: list[float] = []
        self.reservoir_weight = 0.0  # pixels each reservoir sample stands for
        self.exact = True
        self._rng = np.random.default_rng(seed)
        self._pending: list[np.ndarray] = []
        self._dense: np.ndarray | None = None
        self._dense_offset = 0

    def _sync(self) -> None:
        """Fold the dense histogram into the sparse ``hist`` dict."""
        if self._dense is None:
            return
        nz = np.nonzero(self._dense)[0]
        for i, c in zip(nz.tolist(), self._dense[nz].tolist()):
            v = i + self._dense_offset
            self.hist[v] = self.hist.get(v, 0) + c
        self._dense = None

    def update(self, values: np.ndarray) -> None:
        """Add a 1-D array of valid pixel values."""
        if values.size == 0:
            return
        v64 = values.astype(np.float64)
        n = int(values.size)
        mean = float(v64.mean())
        m2 = float(((v64 - mean) ** 2).sum())
        self._merge_moments(n, mean, m2, float(v64.min()), float(v64.max()))
        small_int = values.dtype.kind in "iu" and values.dtype.itemsize <= 2
        if small_int and self.exact:
            # dense bincount over the dtype's range (fast); folded into the sparse dict lazily
            offset = int(np.iinfo(values.dtype).min)
            size = int(np.iinfo(values.dtype).max) - offset + 1
            if self._dense is None or self._dense_offset != offset:
                self._sync()
                self._dense = np.zeros(size, dtype=np.int64)
                self._dense_offset = offset
            self._dense += np.bincount((values.astype(np.int64) - offset).ravel(), minlength=size)
        else:
            self._sync()
            if self.exact and self.hist:
                self._hist_to_reservoir()
            self.exact = False
            self._pending.append(values.astype(np.float32).ravel())

    def _merge_moments(self, n: int, mean: float, m2: float, lo: float, hi: float) -> None:
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total
        self.min = min(self.min, lo)
        self.max = max(self.max, hi)

    def _hist_to_reservoir(self) -> None:
        vals = np.array(list(self.hist.keys()), dtype=np.float64)
        counts = np.array(list(self.hist.values()), dtype=np.float64)
        self._pending.append(np.repeat(vals, counts.astype(np.int64)).astype(np.float32))
        self.hist = {}

    def _flush(self) -> None:
        """Draw the reservoir from the values seen so far (uniform over pixels)."""
        if not self._pending:
            return
        allv = np.concatenate(self._pending + [np.asarray(self.reservoir, dtype=np.float32)])
        # Existing reservoir entries carry weight; approximate by resampling uniformly with weights.
        n_new = sum(p.size for p in self._pending)
        w_old = self.reservoir_weight
        weights = np.concatenate([np.ones(n_new), np.full(len(self.reservoir), w_old)])
        k = min(RESERVOIR, allv.size)
        idx = self._rng.choice(allv.size, size=k, replace=False, p=weights / weights.sum())
        self.reservoir = allv[idx].tolist()
        self.reservoir_weight = float(weights.sum() / k)
        self._pending = []

    @property
    def std(self) -> float:
        """Population standard deviation."""
        return float(np.sqrt(self.m2 / self.count)) if self.count else 0.0

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile (0..100) of the values seen."""
        if self.count == 0:
            return float("nan")
        self._sync()
        if self.exact:
            vals = np.array(sorted(self.hist), dtype=np.float64)
            counts = np.array([self.hist[int(v)] for v in vals], dtype=np.float64)
            cum = np.cumsum(counts)
            # numpy's method="lower": the value at sorted position floor(q/100 * (n - 1))
            position = np.floor(q / 100.0 * (cum[-1] - 1))
            return float(vals[np.searchsorted(cum, position + 1, side="left")])
        self._flush()
        return float(np.percentile(np.asarray(self.reservoir), q))

    def summary(self) -> dict[str, float]:
        """count, mean, std, min, max, p01, p99."""
        return {
            "count": self.count,
            "mean": self.mean,
            "std": self.std,
            "min": self.min if self.count else float("nan"),
            "max": self.max if self.count else float("nan"),
            "p01": self.percentile(1),
            "p99": self.percentile(99),
        }

    def state(self) -> dict[str, Any]:
        """A JSON-able state that :meth:`from_state` and :meth:`merge` accept."""
        self._sync()
        self._flush()
        return {
            "count": self.count,
            "mean": self.mean,
            "m2": self.m2,
            "min": self.min if self.count else None,
            "max": self.max if self.count else None,
            "exact": self.exact,
            "hist": [[k, v] for k, v in sorted(self.hist.items())] if self.exact else [],
            "reservoir": [] if self.exact else self.reservoir,
            "reservoir_weight": self.reservoir_weight,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> BandStats:
        """Rebuild from :meth:`state`."""
        s = cls()
        s.count = int(state["count"])
        s.mean = float(state["mean"])
        s.m2 = float(state["m2"])
        s.min = float(state["min"]) if state["min"] is not None else float("inf")
        s.max = float(state["max"]) if state["max"] is not None else float("-inf")
        s.exact = bool(state["exact"])
        s.hist = {int(k): int(v) for k, v in state["hist"]}
        s.reservoir = [float(x) for x in state["reservoir"]]
        s.reservoir_weight = float(state["reservoir_weight"])
        return s

    def merge(self, other: BandStats) -> None:
        """Fold another accumulator (of the same band) into this one."""
        if other.count == 0:
            return
        self._sync()
        other._sync()
        if self.count == 0:
            self.__dict__.update(BandStats.from_state(other.state()).__dict__)
            return
        self._merge_moments(other.count, other.mean, other.m2, other.min, other.max)
        if self.exact and other.exact:
            for k, v in other.hist.items():
                self.hist[k] = self.hist.get(k, 0) + v
            return
        self._flush()
        other._flush()
        for src in (self, other):
            if src.exact and src.hist:
                src._hist_to_reservoir()
                src.exact = False
                src._flush()
        # Weighted union of the two reservoirs, resampled back to RESERVOIR entries.
        vals = np.asarray(self.reservoir + other.reservoir, dtype=np.float32)
        w = np.concatenate([np.full(len(self.reservoir), self.reservoir_weight),
                            np.full(len(other.reservoir), other.reservoir_weight)])
        k = min(RESERVOIR, vals.size)
        idx = self._rng.choice(vals.size, size=k, replace=False, p=w / w.sum())
        self.reservoir = vals[idx].tolist()
        self.reservoir_weight = float(w.sum() / k)
        self.exact = False
        self.hist = {}
