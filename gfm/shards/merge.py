"""Merge the sidecars of every finished shard in a directory (all workers, all parts) into ``index.json``."""

from __future__ import annotations

from pathlib import Path

from gfm import __version__, index
from gfm.schema import SCHEMA_VERSION
from gfm.shards.errors import DatasetError
from gfm.shards.plan import plan_classes, planned_shards
from gfm.shards.sidecar import SIDECAR_SUFFIX, read_sidecar
from gfm.shards.stats import BandStats


def write_index(root: str | Path) -> index.Index:
    """Merge every shard sidecar in ``root`` into ``root/index.json`` and return the index.

    Band statistics merge exactly (counts, moments, histograms); shards the plan (``build.json``)
    lists but that are not finished are listed as ``missing_shards``; the plan's class names (vector
    labels) become ``classes``.

    Raises:
        DatasetError: no finished shard, an unreadable sidecar, a sidecar whose tar is missing, or
            sidecars that disagree (naming the file or key).
    """
    out = Path(root)
    plan = planned_shards(out)
    planned, tile_size = plan if plan is not None else (None, None)
    sidecars = sorted(out.glob("*" + SIDECAR_SUFFIX))
    if not sidecars:
        raise DatasetError(f"{out}: no finished shards (no *{SIDECAR_SUFFIX} files) to index")
    stats: dict[str, BandStats] = {}
    parts = []
    for path in sidecars:
        s = read_sidecar(path)
        parts.append(s.part())
        if not s.samples:
            continue
        if not (out / s.name).exists():
            raise DatasetError(f"{out / s.name}: listed by {path.name} but missing; delete the sidecar to rebuild it")
        for key, state in s.stats.items():
            bs = BandStats.from_state(state)
            if key in stats:
                stats[key].merge(bs)
            else:
                stats[key] = bs
    summaries = {k: s.band_summary() for k, s in stats.items()}
    try:
        merged = index.merge(parts, summaries, schema=SCHEMA_VERSION, created_by=f"gfm {__version__}",
                             planned=planned, tile_size=tile_size, classes=plan_classes(out))
    except index.IndexFileError as e:
        raise DatasetError(f"{out}: {e}") from None
    index.write(out, merged)
    return merged
