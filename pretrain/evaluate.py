r"""``python -m pretrain.evaluate``: a pretrained HyperMAE's reconstruction on held-out tiles vs the tile mean.

    python -m pretrain.evaluate runs/corpus_tiny --heldout runs/corpus/heldout \
        --norm-index runs/corpus/train/index.json [--batches 40] [--batch-size 16] [--crop 16] [--pictures DIR]

Scores the model (a run directory, checkpoint, ``model.safetensors`` or export of a HyperMAE) on held-out
tiles with masks drawn from a fixed seed, next to predicting every hidden pixel as its band's mean over
the tile (``gfm.train.heldout``); prints a table per sensor set and writes it as JSON (``--out``, default
``RUN/heldout.json`` for a run directory). ``--pictures DIR`` also writes one reconstruction picture per
sensor set. The held-out tiles must be normalised with the training set's statistics (``--norm-index``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(prog="python -m pretrain.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="pretraining run directory, checkpoint, model.safetensors or export (a HyperMAE)")
    p.add_argument("--heldout", required=True, help="held-out shards (a dataset directory with index.json)")
    p.add_argument("--norm-index", help="index.json whose statistics normalise (the training set's)")
    p.add_argument("--batches", type=int, default=0, help="batches to score (default 0: every held-out tile)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="tiles per batch (default 1: a batch holds one sensor set, and a set whose tiles do not "
                        "fill a batch would be left out, as a small hyperspectral scene's few tiles are)")
    p.add_argument("--crop", type=int, default=16, help="crop side in pixels, as in pretraining (0 = whole tiles)")
    p.add_argument("--seed", type=int, default=0, help="seed of crops and masks (default 0)")
    p.add_argument("--out", help="JSON report (default: RUN/heldout.json for a run directory)")
    p.add_argument("--pictures", help="directory for one reconstruction PNG per sensor set")
    return p.parse_args(list(sys.argv[1:] if argv is None else argv))


def main(argv: Sequence[str] | None = None) -> int:
    """Load the model, stream the held-out tiles, print and write the table."""
    a = parse_args(argv)
    import torch

    from gfm.batch import sensor_code
    from gfm.config import ConfigError
    from gfm.data import LoaderConfig, LoaderError
    from gfm.hub.base import HubError  # the submodules, not the package: gfm.hub's adapters reach fine-tuning
    from gfm.hub.sources import load_state_dict, resolve_source
    from gfm.index import read as read_index
    from gfm.model import HyperMAE, ModelConfig
    from gfm.train.heldout import heldout_reconstruction, table, write_table
    from gfm.train.pictures import render

    try:
        source = resolve_source(a.model)
        model = ModelConfig.from_dict(source.model_config).build()
        model.load_state_dict(load_state_dict(source), strict=True)
        if not hasattr(model, "tile_mean_loss"):
            raise SystemExit(f"pretrain.evaluate: {a.model} is not a pretraining (HyperMAE) model")
        if isinstance(model, HyperMAE) and model.context == "pixel":  # the tile-mean reference and pictures need tiles
            print("pretrain.evaluate: the model was pretrained in pixel context; evaluated on whole tiles")
            model.context = "tile"
        loader = LoaderConfig(shards=a.heldout, norm_index=a.norm_index, mode="epoch", batch_size=a.batch_size,
                              num_workers=0, crop_size=a.crop or None, hflip=False, vflip=False, rot90=False,
                              shuffle_buffer=0, seed=a.seed).build(0, 1)
        index = read_index(a.heldout)
    except (HubError, ConfigError, LoaderError, ValueError, OSError) as e:
        print(f"pretrain.evaluate: {e}", file=sys.stderr)
        return 2
    names = {sensor_code(s): s for s in index.sensors}
    report = heldout_reconstruction(model, loader, max_batches=a.batches, seed=a.seed, sensor_names=names)
    step = f" at step {source.step}" if source.step is not None else ""
    print(table(report, f"# held-out reconstruction of {a.model}{step}: {a.heldout}, masks seeded {a.seed}; "
                        "ratio = model / tile mean (goal <= 0.5)"))
    out = Path(a.out) if a.out else (source.run_dir / "heldout.json" if source.run_dir else None)
    if out is not None:
        write_table(report, out, {"model": str(a.model), "step": source.step, "heldout": a.heldout})
        print(f"wrote {out}")
    if a.pictures:
        seen: set[tuple[str, int]] = set()
        generator = torch.Generator().manual_seed(a.seed)
        for batch in loader:
            sensors = "+".join(sorted({names.get(int(c), "?") for c in batch.sensor[0].tolist()})) \
                if batch.sensor is not None else "unknown"
            bands = batch.pixels.shape[1]
            if (sensors, bands) in seen:
                continue
            # one picture per sensor set and band count: a second band set of a sensor (Landsat's 3 and 11
            # bands) gets its count in the name instead of overwriting the first
            first = all(s != sensors for s, _ in seen)
            name = f"heldout_{sensors}.png" if first else f"heldout_{sensors}_{bands}bands.png"
            seen.add((sensors, bands))
            with torch.no_grad():
                out_batch = model(batch, generator)
            path = render(batch, out_batch, Path(a.pictures) / name, source.step or 0)
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
