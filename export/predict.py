r"""``gfm predict``: a fine-tuned model over whole scenes → a tiled, compressed, georeferenced COG of classes.

    gfm predict LC08_*_B*.TIF --model exported/l8_seg --out pred.tif
    gfm predict pines.npy --wavelengths wl.txt --sensor aviris --gsd 20 --model exported/base \
        --adapter runs/finetune/indian_pines_lora --out pines_pred.tif --probabilities pines_probs.tif

The scene is opened as ``gfm shards build`` opens it (same sensor and band recognition, grid and
alignment) and read window by window; tiles overlap and blend with a raised-cosine window; the output is
written block by block (memory flat in the scene's size), under a temporary name renamed at the end.
Input nodata becomes output nodata (255). Class names and a colour map are in the file.

Per-pixel models (pixel task, dense head, the encoder sees each pixel alone: the default) predict every
pixel of a tile in one dense pass, each pixel computed once (--pixel-batch pixels per forward); pixel
models whose encoder sees the whole window, and older ones, run one window per pixel (--window-batch),
about window^2 times the work. A dense head serves the band count it was trained on: another one is
refused, naming both. See docs/export.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from export.scene_args import add_model_arguments, add_scene_arguments, explain


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line of ``gfm predict``."""
    p = argparse.ArgumentParser(prog="gfm predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", metavar="SCENE_FILE",
                   help="the scene's rasters (GeoTIFF, JP2, anything GDAL reads) or one .npy/.mat cube")
    p.add_argument("--out", required=True,
                   help="class map to write (Cloud-Optimized GeoTIFF); not an input, nor the --probabilities path")
    p.add_argument("--adapter", help="fine-tuning run directory (or an export's adapter/) to apply to --model")
    p.add_argument("--probabilities", metavar="TIF", help="also write class probabilities (uint8, p x 254) here")
    p.add_argument("--tile", type=int, help="tile side in pixels (default: the model's training tile, else 64)")
    p.add_argument("--overlap", type=int,
                   help="pixels shared by neighbouring tiles (default: tile/4; 0 for pixel-task models)")
    p.add_argument("--block", type=int, default=512, help="output block side in pixels (default 512)")
    p.add_argument("--region", nargs=4, type=int, metavar=("ROW", "COL", "HEIGHT", "WIDTH"),
                   help="predict only this window of the scene grid (pixels); the output covers it")
    p.add_argument("--pixel-batch", type=int, default=512,
                   help="per-pixel models (one dense pass per tile): pixels per forward (default 512)")
    p.add_argument("--window-batch", type=int, default=256,
                   help="pixel models that see the whole window: windows per forward (default 256)")
    add_model_arguments(p)
    add_scene_arguments(p)
    return p.parse_args(list(sys.argv[1:] if argv is None else argv))


def main(argv: Sequence[str] | None = None) -> int:
    """Predict with :func:`gfm.predict`; 0 on success, 2 with one line on stderr for a problem with the input."""
    a = parse_args(argv)
    from gfm.hub import HubError
    from gfm.infer.api import predict
    from gfm.outputs import OutputError, check_files
    from gfm.shards import ShardError

    try:  # outputs first, named by their flags: a refused path costs no model load
        check_files({"--out": a.out, "--probabilities": a.probabilities},
                    [*a.files, a.model, a.adapter, a.stats, a.wavelengths, a.fwhm])
        report = predict(
            a.model, a.files, out=a.out, probabilities=a.probabilities, adapter=a.adapter, sensor=a.sensor,
            bands=[b.strip() for b in a.bands.split(",")] if a.bands else None, wavelengths=a.wavelengths,
            bandwidths=a.fwhm, date=a.date, gsd=a.gsd, nodata=a.nodata, cube_key=a.key, scene_id=a.scene_id,
            resampling=a.resampling, sensors_yaml=a.sensors_yaml, stats=a.stats,
            unknown="drop" if a.drop_unknown_bands else "error", tile=a.tile, overlap=a.overlap, block=a.block,
            region=tuple(a.region) if a.region else None, batch_size=a.batch_size, pixel_batch=a.pixel_batch,
            window_batch=a.window_batch, device=a.device, overwrite=a.overwrite, progress=not a.no_progress,
            log=lambda notice: print(notice, file=sys.stderr),
        ).report
    except (HubError, ShardError, OutputError) as e:
        print(explain("gfm predict", e), file=sys.stderr)
        return 2
    top = ", ".join(f"{k} {v}" for k, v in sorted(report.counts.items(), key=lambda kv: -kv[1])[:5])
    print(f"wrote {report.out} ({report.width}x{report.height}, {len(report.classes)} classes; {report.tiles} "
          f"tiles, {report.forwards} forwards in {report.seconds:.1f} s); most pixels: {top or 'none'}")
    if report.probabilities:
        print(f"wrote {report.probabilities} (class probabilities, uint8 = p x 254, 255 = nodata)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
