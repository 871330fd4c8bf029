"""``gfm export``: a run, a DeepSpeed checkpoint or a safetensors file as a Hugging Face model directory.

    gfm export runs/demo exported/demo
    gfm export runs/demo/checkpoints/step_00000200 exported/step200 --index shards/pines/index.json
    gfm export runs/demo exported/demo --push user/gfm-demo      # needs `hf auth login`
    gfm export runs/demo exported/pines --adapter runs/finetune/indian_pines_lora          # adapter beside
    gfm export runs/demo exported/pines_merged --adapter runs/finetune/indian_pines_lora --merge
    gfm export runs/demo gfm/pretrained/NAME --dtype bf16       # a model to ship inside gfm (bf16, half size)
    gfm export NAME exported/copy                               # a shipped model by its short name (gfm models)

The directory holds config.json (architecture, every hyper-parameter, bands and statistics, inputs,
training summary), model.safetensors (fp32, or bf16 with --dtype bf16) and a model card README.md; load it
with ``gfm.from_pretrained(DIR)``. A marker file, .gfm-output, says gfm wrote it: --overwrite replaces only
such a directory (or an export of an earlier gfm), never another one nor an input. See docs/export.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line of ``gfm export``."""
    p = argparse.ArgumentParser(prog="gfm export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT",
                   help="run directory, checkpoint directory (step_XXXXXXXX, any ZeRO stage), .safetensors file, "
                        "exported directory, or the short name of a model shipped with gfm (gfm models); an "
                        "existing path wins over a short name")
    p.add_argument("out", metavar="OUT_DIR",
                   help="directory to write: new or empty, or an earlier export with --overwrite; never an input "
                        "or a directory holding one")
    p.add_argument("--adapter", metavar="DIR",
                   help="a gfm finetune run: its adapter (peft format) or probe head travels in OUT_DIR/adapter/")
    p.add_argument("--merge", action="store_true",
                   help="with --adapter: fold it into the weights, the export is the fine-tuned model")
    p.add_argument("--index", help="index.json with the band statistics, when the run's own cannot be found")
    p.add_argument("--license", default="other", help="licence id for the model card metadata (default: other)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT_DIR if it holds an export (gfm never replaces a directory it did not write)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="how model.safetensors stores the weights: fp32 (default, exact) or bf16 (half the size, "
                        "each weight rounded; loaders upcast to fp32); recorded in config.json as weights_dtype")
    p.add_argument("--push", metavar="REPO_ID",
                   help="also upload OUT_DIR to the Hugging Face Hub as REPO_ID (needs a token: `hf auth login`)")
    return p.parse_args(list(sys.argv[1:] if argv is None else argv))


def main(argv: Sequence[str] | None = None) -> int:
    """Export; 0 on success, 2 with one line on stderr for a problem with the input."""
    args = parse_args(argv)
    from gfm.hub import HubError, OutputError, OutputExistsError, export

    try:
        if args.merge and not args.adapter:
            raise HubError("--merge needs --adapter DIR")
        report = export(args.source, args.out, adapter=args.adapter, merge=args.merge, index=args.index,
                        license=args.license, overwrite=args.overwrite, push=args.push, dtype=args.dtype)
    except OutputExistsError as e:
        print(f"gfm export: {e.path}: already exists (pass --overwrite to replace it)", file=sys.stderr)
        return 2
    except (HubError, OutputError) as e:
        print(f"gfm export: {e}".replace("index=INDEX.json", "--index INDEX.json"), file=sys.stderr)
        return 2
    src = report.source
    named = f"{src.name} = " if src.name else ""
    print(f"exported {src.kind} {named}{src.weights} (step {src.step}) to {report.out_dir}: {report.tensors} "
          f"tensors, {report.parameters / 1e6:.2f} M parameters ({args.dtype}), {report.bands} band(s) with "
          "statistics")
    if report.adapter:
        print(f"adapter: {report.adapter}")
    if report.bands == 0:
        print(f"note: no band statistics recorded ({report.stats_note or 'the index lists none'}); pass --index "
              "INDEX.json so users can normalise inputs", file=sys.stderr)
    if report.pushed:
        print(f"pushed to the Hub: {report.pushed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
