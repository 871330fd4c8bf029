"""``gfm bench NAME [ARGS]``: run one of the benchmarks in ``bench/``."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

BENCHES = {
    "shards": "shard writing: tiles/s and MB/s, 1 vs 2 workers, vs a hand-rolled chipping loop",
    "loader": "loader: raw tar vs gfm pipeline (0/1/2 workers) vs rasterio windows per sample",
    "torchgeo": "loader vs torchgeo (RasterDataset + RandomGeoSampler) on one Sentinel-2 scene: GeoTIFF, JPEG 2000",
    "model": "LESS vs dense joint attention: time and peak memory over C",
    "paths": "the LESS block's reference path (what CUDA runs) vs the CPU fast paths, by grid size",
    "train": "training step: samples/s, FLOP utilisation, 1 vs 2 ranks, LESS vs dense, eager vs compiled",
    "gpu": "the prepared GPU check (<= 8 min on one GPU; --dry on CPU): NCCL/ZeRO path, MFU, LESS vs dense, loader",
    "finetune": "fine-tuning step: time and peak memory of LoRA vs full fine-tuning",
    "predict": "whole-scene prediction: peak memory for a scene and a 4x larger one (flat), tiles/s",
}

#: benches whose module is not ``bench.<name>``
MODULES = {"gpu": "gpu_check", "torchgeo": "vs_torchgeo"}


def main(argv: Sequence[str] | None = None) -> int:
    """Dispatch to ``bench.<name>.main(args)``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help") or args[0] not in BENCHES:
        print("usage: gfm bench {" + ",".join(BENCHES) + "} [ARGS]\n")
        for name, text in BENCHES.items():
            print(f"  {name:<8} {text}")
        return 0 if args and args[0] in ("-h", "--help") else 2
    module = importlib.import_module(f"bench.{MODULES.get(args[0], args[0])}")
    return int(module.main(args[1:]) or 0)
