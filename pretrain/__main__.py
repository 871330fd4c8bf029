"""``gfm pretrain`` / ``torchrun ... -m pretrain``: pretrain a model from a YAML config.

    gfm pretrain --config pretrain/configs/cpu_smoke.yaml steps=50 optim.lr=3e-4
    torchrun --nproc_per_node 2 -m pretrain --config pretrain/configs/cpu_smoke.yaml --resume auto

Positional ``key=value`` arguments override the YAML (dotted keys, values read as YAML). ``--resume``
and ``--run-dir`` are shorthands for ``checkpoint.resume=`` and ``run_dir=``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from gfm.config import ConfigError, dump_yaml, load


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line of ``gfm pretrain``."""
    p = argparse.ArgumentParser(prog="gfm pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML run config (pretrain/configs/*.yaml)")
    p.add_argument("--resume", help="'auto' (latest complete checkpoint of the run dir) or a checkpoint dir")
    p.add_argument("--run-dir", help="run directory (overrides run_dir)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return p.parse_args(list(sys.argv[1:] if argv is None else argv))


def main(argv: Sequence[str] | None = None) -> int:
    """Load the config and run: 0 done, 2 (one line) on a config or data error, 3 stopped by the guard."""
    args = parse_args(argv)
    from gfm.train.config import TrainConfig

    overrides = list(args.overrides)
    if args.resume is not None:
        overrides.append(f"checkpoint.resume={args.resume}")
    if args.run_dir is not None:
        overrides.append(f"run_dir={args.run_dir}")
    try:
        cfg = load(TrainConfig, args.config, overrides)
    except ConfigError as e:
        print(f"gfm pretrain: config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0

    from gfm.data import LoaderError
    from gfm.train import run_guarded

    try:
        return run_guarded(cfg, prog="gfm pretrain")
    except ConfigError as e:  # found once the run starts: init_weights that do not fit the model
        print(f"gfm pretrain: config error: {e}", file=sys.stderr)
        return 2
    except LoaderError as e:  # shards that cannot feed the batches asked for
        print(f"gfm pretrain: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
