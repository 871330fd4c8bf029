"""The torchgeo side of ``gfm bench torchgeo``, run under an interpreter that has torchgeo; never imports gfm.

    python bench/torchgeo_child.py --stacked FILE [--jp2-dir DIR] --bands B01,B05,... --res 20
        [--size 64] [--batch-size 32] [--batches 4] [--workers 0 2] [--seed 0]

torchgeo as its users run it: a ``RasterDataset`` (over the stacked GeoTIFF, or over the per-band
files with ``separate_files = True``, every band read at ``--res``, bilinear, as torchgeo resamples
float images), a ``RandomGeoSampler`` of ``--size`` px patches, ``--batches × --batch-size`` samples per
pass, and ``torch.utils.data.DataLoader(collate_fn=stack_samples)``, persistent workers when there are
any (the parent's rows time the steady state: worker start is not in the timed passes).

Contract with the parent (``bench/vs_torchgeo.py``): JSON lines on stdout; everything else the child or
the libraries it imports print goes to stderr.

* First line, the hello: ``{"ok": true, "python", "torchgeo", "torch", "rasterio", "gdal", "jp2"}``
  (``jp2``: this rasterio's GDAL has the JP2OpenJPEG driver), or ``{"ok": false, "python", "error"}``
  and exit status 1 when torchgeo cannot be imported.
* Then, per line on stdin ``{"seconds": S, "sources": ["stacked", "jp2"]}``, one reply
  ``{"rows": [{"source", "workers", "seconds", "samples", "cpu", "shape", "dtype"}, ...]}``: every source
  with every ``--workers`` count, each measured by ``bench.timing.Row`` (set up, an untimed warm-up pass,
  whole passes for at least S seconds; ``cpu``: CPU seconds of this process and its workers).
* End of stdin: exit 0. An error: traceback on stderr, exit 1.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import platform
import sys
from typing import IO, Any

if __package__:
    from .timing import Pass, Row
else:  # run as a file by the torchgeo interpreter: bench/ is sys.path[0] and gfm need not be importable
    from timing import Pass, Row  # type: ignore[no-redef]

SOURCES = ("stacked", "jp2")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The child's arguments (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="torchgeo_child", description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--stacked", required=True, help="the stacked GeoTIFF (all bands on one grid)")
    ap.add_argument("--jp2-dir", help="folder of per-band JPEG 2000 files named s2_<band>.jp2")
    ap.add_argument("--bands", required=True, type=lambda s: tuple(s.split(",")), help="band names, comma-separated")
    ap.add_argument("--res", required=True, type=float, help="common resolution in CRS units (torchgeo's res)")
    ap.add_argument("--size", type=int, default=64, help="patch side in pixels")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--batches", type=int, default=4, help="batches per pass")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def hello() -> dict[str, Any]:
    """Versions, and whether this interpreter can run the rows; imports torchgeo."""
    out: dict[str, Any] = {"python": sys.executable}
    try:
        import rasterio
        import torch
        import torchgeo
        from rasterio.env import Env
        from torchgeo.datasets import RasterDataset, stack_samples  # noqa: F401  (what the rows need)
        from torchgeo.samplers import RandomGeoSampler  # noqa: F401
    except Exception as e:  # ImportError, or a torchgeo whose own imports fail (0.8.1 needs requests)
        return {**out, "ok": False, "error": f"{type(e).__name__}: {e}"}
    with Env() as env:
        jp2 = "JP2OpenJPEG" in env.drivers()
    return {**out, "ok": True, "torchgeo": torchgeo.__version__, "torch": torch.__version__,
            "rasterio": rasterio.__version__, "gdal": rasterio.__gdal_version__, "jp2": jp2,
            "platform": platform.platform()}


def datasets(args: argparse.Namespace) -> dict[str, Any]:
    """The two ``RasterDataset`` classes: the stacked GeoTIFF, and one file per band."""
    from torchgeo.datasets import RasterDataset

    class StackedScene(RasterDataset):  # type: ignore[misc]
        """All bands in one file, already on the ``res`` grid."""

        filename_glob = os.path.basename(args.stacked)
        all_bands = args.bands

    class BandFiles(RasterDataset):  # type: ignore[misc]
        """One JPEG 2000 file per band at its native resolution, as Sentinel-2 products come.

        Like torchgeo's own ``Sentinel2``: the glob names the first band's file only (one index entry
        per scene), and ``_update_filepath`` swaps the ``band`` group for each band read.
        """

        filename_glob = "s2_{}.jp2"
        filename_regex = r"^s2_(?P<band>B[0-9][0-9A])\.jp2$"
        separate_files = True
        all_bands = args.bands

        def __init__(self, paths: str, res: float, bands: tuple[str, ...]) -> None:
            self.filename_glob = self.filename_glob.format(bands[0])
            super().__init__(paths, res=res, bands=bands)

    return {"stacked": lambda: StackedScene(os.path.dirname(args.stacked), res=args.res),
            "jp2": lambda: BandFiles(args.jp2_dir, res=args.res, bands=args.bands)}


def torchgeo_pass(make_dataset: Any, workers: int, args: argparse.Namespace, seen: dict[str, Any]) -> Pass:
    """One pass = ``args.batches`` batches from a RandomGeoSampler through torch's DataLoader."""
    import torch
    from torch.utils.data import DataLoader
    from torchgeo.datasets import RasterDataset, stack_samples
    from torchgeo.samplers import RandomGeoSampler

    dataset = make_dataset()
    sampler = RandomGeoSampler(dataset, size=args.size, length=args.batches * args.batch_size,
                               generator=torch.Generator().manual_seed(args.seed))
    state = {"loader": DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, collate_fn=stack_samples,
                                  num_workers=workers, persistent_workers=workers > 0)}

    def run() -> int:
        n = 0
        for batch in state["loader"]:
            image = batch["image"]  # [B, C, size, size] float32
            n += image.shape[0]
        seen.update(shape=list(image.shape), dtype=str(image.dtype).removeprefix("torch."))
        return n

    def cleanup() -> None:
        state.clear()  # the last reference to the DataLoader: its iterator shuts the workers down
        RasterDataset._cached_load_warp_file.cache_clear()  # torchgeo's open-file cache (an lru_cache)
        gc.collect()

    return run, cleanup


def serve(args: argparse.Namespace, requests: IO[str], replies: IO[str]) -> None:
    """Answer each request line with the measured rows (see the module docstring)."""
    makers = datasets(args)
    for line in requests:
        if not line.strip():
            continue
        req = json.loads(line)
        out = []
        for source in req["sources"]:
            if source not in SOURCES:
                raise ValueError(f"unknown source {source!r} (known: {', '.join(SOURCES)})")
            for workers in args.workers:
                seen: dict[str, Any] = {}
                row = Row(f"{source} {workers}", functools.partial(torchgeo_pass, makers[source], workers, args, seen))
                row.measure(float(req["seconds"]))
                out.append({"source": source, "workers": workers, "seconds": row.seconds, "samples": row.samples,
                            "cpu": row.cpu, **seen})
        replies.write(json.dumps({"rows": out}) + "\n")
        replies.flush()


def main(argv: list[str] | None = None) -> int:
    """Say hello, then serve requests until stdin ends."""
    args = parse_args(argv)
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")  # the JSON lines; stdout itself now goes to stderr
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    info = hello()
    replies.write(json.dumps(info) + "\n")
    replies.flush()
    if not info["ok"]:
        return 1
    serve(args, sys.stdin, replies)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
