"""``gfm finetune`` / ``torchrun ... -m finetune``: fine-tune an encoder on labelled shards from a YAML config.

    gfm finetune --config finetune/configs/indian_pines_lora.yaml encoder.weights=runs/hsi method.name=full
    torchrun --nproc_per_node 2 -m finetune --config finetune/configs/sen1floods11_water.yaml
    gfm finetune --config finetune/configs/indian_pines_lora.yaml --merge seeds=[0,1,2]
    gfm finetune --config finetune/configs/indian_pines_lora.yaml method.name=random_forest

``method.name``: lora, linear_probe, full, scratch, or a classic baseline (random_forest, svm, knn: scikit-learn,
``pip install 'gfm[baselines]'``; fitted in one process, no model file saved, for comparison only).

Positional ``key=value`` arguments override the YAML (dotted keys, values read as YAML). ``--run-dir``,
``--resume``, ``--weights`` and ``--merge`` are shorthands for ``run_dir=``, ``checkpoint.resume=``,
``encoder.weights=`` and ``merge=true``. ``run_dir`` must be new, empty or a gfm finetune run (marked
.gfm-output); a directory gfm did not write is never written into, and a finished run (metrics.json) is
refused unless ``overwrite=true`` (replace it) or ``--resume``. Exit codes: 0 done, 2 bad config or input
(one line naming the culprit), 3 stopped by the non-finite guard.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gfm.config import ConfigError, dump_yaml, load

PROG = "gfm finetune"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line of ``gfm finetune``."""
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML run config (finetune/configs/*.yaml)")
    p.add_argument("--run-dir", help="run directory (overrides run_dir)")
    p.add_argument("--weights", help="encoder weights: run dir, checkpoint dir, model.safetensors, export dir, or the "
                                     "short name of a model shipped with gfm (gfm models; an existing path wins)")
    p.add_argument("--resume", help="'auto' or a checkpoint dir (needs checkpoint.every > 0)")
    p.add_argument("--merge", action="store_true", help="LoRA: also write the adapters merged into the encoder")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return p.parse_args(list(sys.argv[1:] if argv is None else argv))


def main(argv: Sequence[str] | None = None) -> int:
    """Load the config (exit 2 with one line on a config error), run, and turn bad input into one line."""
    args = parse_args(argv)
    from gfm.finetune.config import FinetuneConfig

    overrides = list(args.overrides)
    for flag, key in ((args.run_dir, "run_dir"), (args.resume, "checkpoint.resume"), (args.weights, "encoder.weights")):
        if flag is not None:
            overrides.append(f"{key}={flag}")
    if args.merge:
        overrides.append("merge=true")
    try:
        cfg = load(FinetuneConfig, args.config, overrides)
    except ConfigError as e:
        print(f"{PROG}: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0

    import torch.distributed

    from gfm import distributed as gdist
    from gfm.finetune.run import INPUT_ERRORS, run
    from gfm.train import NonFiniteError

    joined = torch.distributed.is_initialized()  # a caller's process group (tests, notebooks) is the caller's to end
    try:
        run(cfg)
    except NonFiniteError as e:
        print(f"{PROG}: {e}", file=sys.stderr, flush=True)
        return 3
    except INPUT_ERRORS as e:  # bad shards, split, weights or adapter: one line naming the culprit
        print(f"{PROG}: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if not joined:
            gdist.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
