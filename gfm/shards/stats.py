"""Streaming, mergeable per-band statistics (count, mean, std, min, max, 1st/99th percentiles).

Each shard keeps one :class:`BandStats` per ``"<sensor>/<band>"`` and saves its state in the shard's
sidecar; ``index.json`` merges the states of all shards (across workers and build parts).
Integer bands of at most 16 bits keep an exact sparse histogram (values, counts), so percentiles are
exact and merge exactly; other dtypes keep a fixed-size weighted reservoir sample for percentiles.
Count, mean and variance merge exactly with Chan's parallel formula.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gfm.index import BandSummary

RESERVOIR = 4096  # float samples kept per band per shard
_BUFFER = 1 << 20  # values buffered per band before they are folded in


def _merge_hist(v1: np.ndarray, c1: np.ndarray, v2: np.ndarray, c2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    values, inverse = np.unique(np.concatenate([v1, v2]), return_inverse=True)
    counts = np.bincount(inverse, weights=np.concatenate([c1, c2]).astype(np.float64), minlength=values.size)
    return values, counts.astype(np.int64)


class BandStats:
    """Accumulates statistics of one band's valid pixels."""

    def __init__(self, seed: int = 0) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.min = float("inf")
        self.max = float("-inf")
        self.exact = True  # True while every value seen was a <=16-bit integer
        self.hist_values = np.zeros(0, dtype=np.int64)
        self.hist_counts = np.zeros(0, dtype=np.int64)
        self.reservoir = np.zeros(0, dtype=np.float32)
        self.reservoir_weights = np.zeros(0, dtype=np.float64)  # pixels each reservoir entry stands for
        self._rng = np.random.default_rng(seed)
        self._buffer: list[np.ndarray] = []
        self._buffered = 0

    # -- accumulation --------------------------------------------------------------------------

    def update(self, values: np.ndarray) -> None:
        """Add an array of valid pixel values (buffered; folded in by :meth:`_sync`)."""
        if values.size == 0:
            return
        self._buffer.append(values.ravel())
        self._buffered += values.size
        if self._buffered >= _BUFFER:
            self._sync()

    def _sync(self) -> None:
        """Fold buffered values into the moments and the histogram or reservoir."""
        if not self._buffer:
            return
        values = np.concatenate(self._buffer)
        self._buffer, self._buffered = [], 0
        v64 = values.astype(np.float64)
        mean = float(v64.mean())
        self._merge_moments(int(values.size), mean, float(((v64 - mean) ** 2).sum()), float(v64.min()),
                            float(v64.max()))
        if self.exact and values.dtype.kind in "iu" and values.dtype.itemsize <= 2:
            offset = int(np.iinfo(values.dtype).min)
            counts = np.bincount(values.astype(np.int64) - offset)
            nz = np.nonzero(counts)[0]
            self.hist_values, self.hist_counts = _merge_hist(
                self.hist_values, self.hist_counts, nz + offset, counts[nz]
            )
        else:
            self._to_reservoir()
            self._add_to_reservoir(values.astype(np.float32), np.ones(values.size))

    def _merge_moments(self, n: int, mean: float, m2: float, lo: float, hi: float) -> None:
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.count * n / total
        self.count = total
        self.min = min(self.min, lo)
        self.max = max(self.max, hi)

    def _to_reservoir(self) -> None:
        """Leave exact mode: turn the histogram into weighted reservoir entries."""
        if not self.exact:
            return
        self.exact = False
        if self.hist_values.size:
            vals, counts = self.hist_values.astype(np.float32), self.hist_counts.astype(np.float64)
            self.hist_values = np.zeros(0, dtype=np.int64)
            self.hist_counts = np.zeros(0, dtype=np.int64)
            self._add_to_reservoir(vals, counts)

    def _add_to_reservoir(self, values: np.ndarray, weights: np.ndarray) -> None:
        """Weighted resample of (existing reservoir ∪ new values) down to RESERVOIR entries."""
        allv = np.concatenate([self.reservoir, values])
        w = np.concatenate([self.reservoir_weights, weights.astype(np.float64)])
        if allv.size > RESERVOIR:
            total = w.sum()
            idx = self._rng.choice(allv.size, size=RESERVOIR, replace=False, p=w / total)
            allv, w = allv[idx], np.full(RESERVOIR, total / RESERVOIR)
        self.reservoir, self.reservoir_weights = allv.astype(np.float32), w

    def merge(self, other: BandStats) -> None:
        """Fold another accumulator of the same band into this one."""
        self._sync()
        other._sync()
        if other.count == 0:
            return
        self._merge_moments(other.count, other.mean, other.m2, other.min, other.max)
        if self.exact and other.exact:
            self.hist_values, self.hist_counts = _merge_hist(
                self.hist_values, self.hist_counts, other.hist_values, other.hist_counts
            )
            return
        self._to_reservoir()
        if other.exact:
            self._add_to_reservoir(other.hist_values.astype(np.float32), other.hist_counts.astype(np.float64))
        else:
            self._add_to_reservoir(other.reservoir, other.reservoir_weights)

    # -- results -------------------------------------------------------------------------------

    @property
    def std(self) -> float:
        """Population standard deviation."""
        self._sync()
        return float(np.sqrt(self.m2 / self.count)) if self.count else 0.0

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile (0..100); exact mode follows numpy's ``method="lower"``."""
        self._sync()
        if self.count == 0:
            return float("nan")
        if self.exact:
            cum = np.cumsum(self.hist_counts)
            position = np.floor(q / 100.0 * (cum[-1] - 1))  # sorted index of the answer
            return float(self.hist_values[np.searchsorted(cum, position + 1, side="left")])
        order = np.argsort(self.reservoir)
        cum = np.cumsum(self.reservoir_weights[order])
        i = np.searchsorted(cum, q / 100.0 * cum[-1], side="left")
        return float(self.reservoir[order][min(int(i), cum.size - 1)])

    def summary(self) -> dict[str, float]:
        """count, mean, std, min, max, p01, p99."""
        self._sync()
        return {
            "count": self.count,
            "mean": self.mean,
            "std": self.std,
            "min": self.min if self.count else float("nan"),
            "max": self.max if self.count else float("nan"),
            "p01": self.percentile(1),
            "p99": self.percentile(99),
        }

    def band_summary(self) -> BandSummary:
        """:meth:`summary` as the typed ``index.json`` entry."""
        s = self.summary()
        return BandSummary(count=self.count, mean=s["mean"], std=s["std"], min=s["min"], max=s["max"],
                           p01=s["p01"], p99=s["p99"])

    def state(self) -> dict[str, Any]:
        """A JSON-able state for :meth:`from_state`."""
        self._sync()
        return {
            "count": self.count,
            "mean": self.mean,
            "m2": self.m2,
            "min": self.min if self.count else None,
            "max": self.max if self.count else None,
            "exact": self.exact,
            "hist_values": self.hist_values.tolist(),
            "hist_counts": self.hist_counts.tolist(),
            "reservoir": self.reservoir.tolist(),
            "reservoir_weights": self.reservoir_weights.tolist(),
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
        s.hist_values = np.asarray(state["hist_values"], dtype=np.int64)
        s.hist_counts = np.asarray(state["hist_counts"], dtype=np.int64)
        s.reservoir = np.asarray(state["reservoir"], dtype=np.float32)
        s.reservoir_weights = np.asarray(state["reservoir_weights"], dtype=np.float64)
        return s
