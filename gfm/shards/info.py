"""Summarise a dataset from its ``index.json``: a table of sensors, bands and statistics, and a plot."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from gfm import index as index_file
from gfm.index import BandInfo, BandSummary, Index


@dataclass(frozen=True)
class BandRow:
    """One band of the summary: its key, description and statistics (None when the index has none)."""

    key: str
    band: BandInfo
    stats: BandSummary | None


@dataclass(frozen=True)
class DatasetInfo:
    """The summary of a dataset root (see :func:`info`).

    Attributes:
        index: the parsed ``index.json``.
        bands: one row per band.
        absent: shards ``index.json`` lists whose file is not in the root (deleted or not copied).
    """

    index: Index
    bands: list[BandRow]
    absent: list[str] = field(default_factory=list)

    @property
    def missing(self) -> list[str]:
        """Every shard the dataset lacks: planned but never built, and listed but absent."""
        return sorted(set(self.index.missing_shards) | set(self.absent))

    def text(self) -> str:
        """The human summary table that ``gfm shards info`` prints."""
        return info_text(self.index, absent=self.absent)


def band_rows(index: Index) -> list[BandRow]:
    """Every band of ``index`` ordered by sensor, then centre wavelength."""
    items = sorted(index.bands.items(), key=lambda kv: (kv[1].sensor, kv[1].center_nm, kv[0]))
    return [BandRow(key, band, index.stats.get(key)) for key, band in items]


def info(root: str | Path) -> DatasetInfo:
    """Read the ``index.json`` of ``root``, summarise it, and find the shards it lists that are not there.

    Raises:
        gfm.index.IndexFileError: no readable ``index.json`` (IndexNotFoundError when there is none).
    """
    idx = index_file.read(root)
    folder = index_file.index_path(root).parent
    absent = [s.name for s in idx.shards if not (folder / s.name).is_file()]
    return DatasetInfo(index=idx, bands=band_rows(idx), absent=absent)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


def _num(value: float | None) -> float:
    return float("nan") if value is None else value


def info_text(index: Index, *, min_valid: str = "min_valid", absent: Sequence[str] = ()) -> str:
    """The human summary table of an index: counts, sensors, dates, then one row per band.

    ``min_valid`` is how the table names the build option below which tiles were dropped; ``absent`` lists
    shards of the index whose file is missing (counted as missing, and named).
    """
    missing = sorted(set(index.missing_shards) | set(absent))
    lines = [
        f"shards   {len(index.shards)} ({index.planned_shards} planned, {len(missing)} missing)",
        f"samples  {index.samples}   bytes {_fmt_bytes(index.bytes or 0)}   tile {index.tile_size} px",
        f"sensors  {', '.join(index.sensors)}",
        f"dates    {', '.join(index.dates) if index.dates else '-'}",
    ]
    if absent:
        shown = ", ".join(list(absent)[:5]) + (f" and {len(absent) - 5} more" if len(absent) > 5 else "")
        lines.append(f"absent   {shown}: listed in index.json, no such file (deleted or not copied)")
    if index.missing_shards:
        shown = ", ".join(index.missing_shards[:5])
        more = f" and {len(index.missing_shards) - 5} more" if len(index.missing_shards) > 5 else ""
        lines.append(f"unbuilt  {shown}{more}: planned, not built yet")
    if index.dropped_low_valid:
        lines.append(f"dropped  {index.dropped_low_valid} tiles below {min_valid}")
    lines.append("")
    header = (
        f"{'band':<24} {'centre nm':>11} {'fwhm nm':>9} {'kind':<11} "
        f"{'mean':>10} {'std':>10} {'p01':>10} {'p99':>10}"
    )
    lines.append(header)
    lines.append("-" * len(header))
    for row in band_rows(index):
        b, s = row.band, row.stats
        mean, std, p01, p99 = (math.nan,) * 4 if s is None else (s.mean, s.std, _num(s.p01), _num(s.p99))
        centre = f"{b.center_nm:.4g}" if b.center_nm >= 1e5 else f"{b.center_nm:.1f}"
        fwhm = f"{b.fwhm_nm:.4g}" if b.fwhm_nm >= 1e5 else f"{b.fwhm_nm:.1f}"
        lines.append(
            f"{row.key:<24} {centre:>11} {fwhm:>9} {b.kind:<11} "
            f"{mean:>10.4g} {std:>10.4g} {p01:>10.4g} {p99:>10.4g}"
        )
    return "\n".join(lines)


def plot_band_stats(index: Index, path: str | Path) -> Path:
    """Per-band mean ± std and 1st-99th percentile range against wavelength, one panel per sensor (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_sensor: dict[str, list[tuple[float, str, BandSummary]]] = {}
    for row in band_rows(index):
        if row.stats is not None:
            by_sensor.setdefault(row.band.sensor, []).append((row.band.center_nm, row.band.name, row.stats))
    n = max(1, len(by_sensor))
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 3.8), squeeze=False)
    for ax, (sensor, rows) in zip(axes[0], sorted(by_sensor.items())):
        rows.sort(key=lambda r: (r[0], r[1]))
        x = [r[0] for r in rows]
        mean = [r[2].mean for r in rows]
        std = [r[2].std for r in rows]
        ax.fill_between(x, [_num(r[2].p01) for r in rows], [_num(r[2].p99) for r in rows], alpha=0.2,
                        label="p01-p99")
        if len(x) < 30:
            ax.errorbar(x, mean, yerr=std, fmt="o-", ms=3, capsize=2, label="mean ± std")
        else:  # hyperspectral: a shaded band reads better than 200 error bars
            ax.plot(x, mean, "-", lw=1.2, label="mean")
            ax.fill_between(x, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)], alpha=0.35,
                            label="± std")
        if len(x) <= 20:
            for cx, name, st in rows:
                ax.annotate(name, (cx, st.mean), textcoords="offset points", xytext=(0, 6), fontsize=7,
                            ha="center")
        if x and max(x) / min(x) > 20:
            ax.set_xscale("log")
        ax.set_title(sensor)
        ax.set_xlabel("centre wavelength (nm)")
        ax.set_ylabel("raw value (valid pixels)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{index.samples} tiles, {len(index.bands)} bands")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
