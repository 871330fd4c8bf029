"""``gfm models``: the pretrained models shipped inside gfm, usable by their short name without a download.

    gfm models                    # name, size on disk, parameters, storage dtype, architecture, training
    gfm models --json             # the same as JSON (a list, one object per model)

A short name works wherever a model path does: ``gfm finetune ... encoder.weights=NAME``,
``gfm.from_pretrained("NAME")``, ``gfm export NAME OUT``, ``gfm predict/embed --model NAME``; an existing
local path of the same name wins. The models live in ``gfm/pretrained/`` (one folder each, as ``gfm export``
writes it); ``GFM_PRETRAINED_DIR`` points the registry at another folder. Library:
``gfm.pretrained.describe_pretrained``. See docs/export.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line of ``gfm models``."""
    p = argparse.ArgumentParser(prog="gfm models", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--dir", metavar="DIR",
                   help="list this folder of models instead (default: $GFM_PRETRAINED_DIR, else gfm/pretrained/)")
    return p.parse_args(list(sys.argv[1:] if argv is None else argv))


def main(argv: Sequence[str] | None = None) -> int:
    """List; 0 on success (also when none is shipped), 2 with one line on stderr for a broken model folder."""
    args = parse_args(argv)
    from gfm.pretrained import PretrainedError, describe_pretrained, root_dir

    try:
        models = describe_pretrained(args.dir)
    except PretrainedError as e:
        print(f"gfm models: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([{**dataclasses.asdict(m), "path": str(m.path)} for m in models], indent=2))
        return 0
    if not models:
        print(f"no pretrained model is shipped in {root_dir(args.dir)}")
        return 0
    for m in models:
        params = f"{m.parameters / 1e6:.2f} M parameters" if m.parameters else "parameters unknown"
        losses = ", ".join(f"{k} {v:.4g}" for k, v in m.losses.items()) or "none recorded"
        print(f"{m.name}  ({m.size_bytes / 1e6:.1f} MB on disk, {params}, weights {m.weights_dtype})")
        print(f"  architecture: {m.architecture}")
        print(f"  training:     {m.step if m.step is not None else '?'} steps; last logged losses: {losses}")
        print(f"  corpus:       {m.corpus_line()}")
        print(f"  folder:       {m.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
