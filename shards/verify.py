"""``gfm shards verify`` and ``gfm shards info``: check a dataset root, and summarise it."""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

from gfm.schema import SchemaError, decode, stats_key
from shards.build import INDEX_FILE
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
        h = hashlib.sha256(path.read_bytes()).hexdigest()
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
