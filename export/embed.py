"""``gfm embed``: one embedding per tile of shards or of a scene → GeoParquet (and a dense per-patch COG).

    gfm embed shards/l8 --model exported/base --out l8_tiles.parquet
    gfm embed LC08_*_B*.TIF --model exported/base --out scene.parquet --tile 64 --dense scene_emb.tif

A directory with an index.json (or a .tar shard) is read sample by sample; anything else is a scene's
files, opened as ``gfm shards build`` opens them and cut into non-overlapping tiles. Rows carry the tile
footprint in WGS84 (WKB), the source CRS, dates, sensor, bands and the embedding as a fixed-size list;
the pooling is recorded in the file's metadata. Readable by geopandas, DuckDB and pyarrow. See
docs/export.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from export.scene_args import add_model_arguments, add_scene_arguments, explain, open_scene_from, stats_from


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line of ``gfm embed``."""
    p = argparse.ArgumentParser(prog="gfm embed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", metavar="SHARDS_OR_SCENE",
                   help="a shard dataset (directory with index.json, or a .tar) or a scene's files")
    p.add_argument("--out", required=True, help="GeoParquet file to write (not an input, nor the --dense path)")
    p.add_argument("--pooling", choices=["mean", "cls"], default="mean",
                   help="mean of the valid per-position tokens (default) or the global CLS token")
    p.add_argument("--tile", type=int, help="scenes: tile side in pixels (default: the model's training tile)")
    p.add_argument("--dense", metavar="TIF", help="scenes: also write per-patch embeddings as a COG")
    add_model_arguments(p)
    add_scene_arguments(p)
    return p.parse_args(list(sys.argv[1:] if argv is None else argv))


def _is_shards(files: Sequence[str]) -> bool:
    p = Path(files[0])
    return len(files) == 1 and ((p.is_dir() and (p / "index.json").is_file()) or p.suffix == ".tar")


def main(argv: Sequence[str] | None = None) -> int:
    """Embed; 0 on success, 2 with one line on stderr for a problem with the input."""
    a = parse_args(argv)
    from gfm.hub import HubError, from_pretrained
    from gfm.index import IndexFileError
    from gfm.infer.embed import EmbedOptions, embed_scene, embed_shards
    from gfm.outputs import OutputError, check_files
    from gfm.schema import SchemaError
    from gfm.shards import ShardError

    opts = EmbedOptions(pooling=a.pooling, batch_size=a.batch_size, tile=a.tile, stats=stats_from(a),
                        unknown="drop" if a.drop_unknown_bands else "error", dense=a.dense,
                        overwrite=a.overwrite, progress=not a.no_progress, device=a.device)
    try:  # outputs first: a refused path costs no model load
        check_files({"--out": a.out, "--dense": a.dense}, [*a.files, a.model, a.stats, a.wavelengths, a.fwhm])
        model = from_pretrained(a.model, map_location=a.device)
        if _is_shards(a.files):
            if a.dense:
                raise HubError("--dense needs a scene (files), not shards")
            report = embed_shards(model, a.files[0], a.out, opts)
        else:
            scene = open_scene_from(a)
            report = embed_scene(model, scene, a.out, opts)
            for notice in scene.notices:  # after the run: an error stays one line
                print(notice, file=sys.stderr)
    except (HubError, ShardError, IndexFileError, SchemaError, OutputError) as e:
        print(explain("gfm embed", e), file=sys.stderr)
        return 2
    skipped = f"; {report.skipped} tiles without a valid pixel skipped" if report.skipped else ""
    print(f"wrote {report.out}: {report.rows} tiles x {report.dim} ({report.pooling} pooling) in "
          f"{report.seconds:.1f} s{skipped}")
    if report.dropped_bands:
        print(f"notice: left out band(s) without statistics: {', '.join(report.dropped_bands)}", file=sys.stderr)
    if report.dense:
        print(f"wrote {report.dense} (per-patch embeddings, float32, NaN = no valid pixel)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
