"""``gfm shards verify`` and ``gfm shards info``: check a dataset root, and summarise it."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

from gfm.schema import SchemaError, decode, stats_key
from shards.build import INDEX_FILE, sha256_file
from shards.scene import ShardError


def load_index(root: str | Path) -> dict[str, Any]:
    """Read ``index.json`` of a dataset root."""
    path = Path(root) / INDEX_FILE
    if not path.exists():
        raise ShardError(f"{path}: no index.json (run 'gfm shards build' or 'gfm shards index {root}')")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: not valid JSON ({e})") from None


def _iter_samples(path: Path) -> Any:
    """Group tar members into samples by key (the part of the name before the first dot)."""
    current: dict[str, Any] = {}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                raise SchemaError(f"member {member.name!r} is not a regular file")
            name = Path(member.name).name
            key, _, suffix = name.partition(".")
            if current and current["__key__"] != key:
                yield current
                current = {}
            f = tar.extractfile(member)
            assert f is not None
            current.setdefault("__key__", key)
            current[suffix] = f.read()
    if current:
        yield current


def verify(root: str | Path) -> dict[str, Any]:
    """Decode every sample of every shard; compare with ``index.json``.

    Returns:
        ``{"shards": n, "samples": n, "problems": [str, ...]}``; each problem names shard and key.
    """
    root = Path(root)
    index = load_index(root)
    problems: list[str] = []
    n_samples = 0
    for entry in index["shards"]:
        path = root / entry["name"]
        if not path.exists():
            problems.append(f"{entry['name']}: missing")
            continue
        h = sha256_file(path)
        if entry.get("sha256") and h != entry["sha256"]:
            problems.append(f"{entry['name']}: checksum differs from index.json (corrupt or modified)")
        seen = 0
        keys: Counter[str] = Counter()
        try:
            for sample in _iter_samples(path):
                key = sample["__key__"]
                keys[key] += 1
                try:
                    tile = decode(sample)
                except SchemaError as e:
                    problems.append(f"{entry['name']}: {e}")
                    continue
                for b in tile.meta["bands"]:
                    if stats_key(b["sensor"], b["name"]) not in index["stats"]:
                        problems.append(f"{entry['name']}: sample {key!r} band {b['sensor']}/{b['name']} has no stats")
                seen += 1
        except (tarfile.TarError, EOFError, OSError, SchemaError) as e:
            problems.append(f"{entry['name']}: unreadable tar after {seen} samples ({e})")
        dup = [k for k, c in keys.items() if c > 1]
        if dup:
            problems.append(f"{entry['name']}: duplicate keys {dup[:3]}")
        if seen != entry["samples"]:
            problems.append(f"{entry['name']}: {seen} readable samples, index.json says {entry['samples']}")
        n_samples += seen
    listed = {e["name"] for e in index["shards"]}
    for stray in sorted(p.name for p in root.glob("*.tar")):
        if stray not in listed:
            problems.append(f"{stray}: tar file not listed in index.json")
    for missing in index.get("missing_shards", []):
        problems.append(f"{missing}: planned but not built (finish all --part jobs, then 'gfm shards index')")
    return {"shards": len(index["shards"]), "samples": n_samples, "problems": problems}


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


def info_text(index: dict[str, Any]) -> str:
    """The human summary table of ``gfm shards info``."""
    lines = [
        f"shards   {len(index['shards'])} ({index.get('planned_shards', len(index['shards']))} planned, "
        f"{len(index.get('missing_shards', []))} missing)",
        f"samples  {index['samples']}   bytes {_fmt_bytes(index['bytes'])}   tile {index['tile_size']} px",
        f"sensors  {', '.join(index['sensors'])}",
        f"dates    {', '.join(index['dates']) if index['dates'] else '-'}",
    ]
    if index.get("dropped_low_valid"):
        lines.append(f"dropped  {index['dropped_low_valid']} tiles below --min-valid")
    lines.append("")
    header = (
        f"{'band':<24} {'centre nm':>11} {'fwhm nm':>9} {'kind':<11} "
        f"{'mean':>10} {'std':>10} {'p01':>10} {'p99':>10}"
    )
    lines.append(header)
    lines.append("-" * len(header))
    for key, b in sorted(index["bands"].items(), key=lambda kv: (kv[1]["sensor"], kv[1]["center_nm"], kv[0])):
        s = {k: index["stats"].get(key, {}).get(k, float("nan")) for k in ("mean", "std", "p01", "p99")}
        centre = f"{b['center_nm']:.4g}" if b["center_nm"] >= 1e5 else f"{b['center_nm']:.1f}"
        fwhm = f"{b['fwhm_nm']:.4g}" if b["fwhm_nm"] >= 1e5 else f"{b['fwhm_nm']:.1f}"
        lines.append(
            f"{key:<24} {centre:>11} {fwhm:>9} {b['kind']:<11} "
            f"{s['mean']:>10.4g} {s['std']:>10.4g} {s['p01']:>10.4g} {s['p99']:>10.4g}"
        )
    return "\n".join(lines)


def plot_band_stats(index: dict[str, Any], path: str | Path) -> Path:
    """Per-band mean ± std and 1st-99th percentile range against wavelength, one panel per sensor."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_sensor: dict[str, list[tuple[float, str, dict[str, float]]]] = {}
    for key, band in index["bands"].items():
        stats = index["stats"].get(key)
        if stats:
            by_sensor.setdefault(band["sensor"], []).append((band["center_nm"], band["name"], stats))
    n = max(1, len(by_sensor))
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 3.8), squeeze=False)
    for ax, (sensor, rows) in zip(axes[0], sorted(by_sensor.items())):
        rows.sort()
        x = [r[0] for r in rows]
        mean = [r[2]["mean"] for r in rows]
        std = [r[2]["std"] for r in rows]
        ax.fill_between(x, [r[2]["p01"] for r in rows], [r[2]["p99"] for r in rows], alpha=0.2, label="p01-p99")
        if len(x) < 30:
            ax.errorbar(x, mean, yerr=std, fmt="o-", ms=3, capsize=2, label="mean ± std")
        else:  # hyperspectral: a shaded band reads better than 200 error bars
            ax.plot(x, mean, "-", lw=1.2, label="mean")
            ax.fill_between(x, [m - d for m, d in zip(mean, std)], [m + d for m, d in zip(mean, std)], alpha=0.35,
                            label="± std")
        if len(x) <= 20:
            for cx, name, st in rows:
                ax.annotate(name, (cx, st["mean"]), textcoords="offset points", xytext=(0, 6), fontsize=7,
                            ha="center")
        if x and max(x) / min(x) > 20:
            ax.set_xscale("log")
        ax.set_title(sensor)
        ax.set_xlabel("centre wavelength (nm)")
        ax.set_ylabel("raw value (valid pixels)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{index['samples']} tiles, {len(index['bands'])} bands")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
