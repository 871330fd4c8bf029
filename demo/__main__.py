"""``gfm demo``: the whole path end to end on a real scene that a PyPI package ships, with no input.

The AVIRIS Indian Pines cube (145 x 145 x 200, 1992-06-12, 20 m, 16 crop and land-cover classes) ships
inside ``tensorly``. The demo runs what a user would, each step as its own program in a fresh process:

1. ``gfm shards build`` the cube and its labels into WebDataset shards, then ``info`` and ``verify``;
2. ``torchrun --nproc_per_node 2 -m pretrain``: a brief HyperMAE pretraining of LESS ViT-Tiny with
   DeepSpeed on 2 CPU processes (gloo), checkpoints, loss curve and reconstruction pictures: the path a
   user's own pretraining takes (minutes here; the fine-tuning below starts from the encoder shipped in
   gfm, ``gfm-tiny``, which the recipe ``pretrain/configs/corpus_tiny.yaml`` made);
3. ``gfm finetune``: per-pixel classification on a spatially disjoint split with 5 % of the labels, like
   with like on one split: LoRA on ``gfm-tiny``, the same LoRA recipe from random weights (same steps),
   and a random forest on the pixels' bands, evaluated on the held-out blocks (confusion matrices,
   prediction maps);
4. ``gfm export`` ``gfm-tiny`` with the LoRA adapter as a Hugging Face directory;
5. ``gfm predict`` the whole scene with the export in a fresh process (strict loading) into a
   Cloud-Optimized GeoTIFF, scored on the LoRA run's held-out pixels: the figure must equal the
   fine-tuning run's own test OA (``--predict-size N``: only the top-left N x N pixels, faster);
   ``gfm embed`` the tiles to GeoParquet;
6. ``OUT/REPORT.md``: what ran, the metrics table, trainable parameters, timings and the pictures.

Each program's own log goes to ``OUT/logs/``; the terminal shows one line per step, progress bars and
the figures. Re-running resumes: steps whose results exist are skipped (``--fresh`` starts over).

tensorly ships the cube without its wavelength list. The demo uses the nominal AVIRIS band centres
(linear within each of the instrument's spectrometers, within ~11 nm of the calibrated list) with the
20 water-absorption bands of the "corrected" product removed; pass ``--wavelengths`` for exact ones.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from demo.indian_pines import DemoDataError, aviris_indian_pines_wavelengths, tensorly_indian_pines
from demo.report import Step, check_prediction, prediction_png, write_report

PRETRAIN_CONFIG = "demo_indian_pines.yaml"
FINETUNE_CONFIG = "indian_pines_lora.yaml"
#: the pretrained encoder shipped inside gfm (gfm models) that the fine-tuning rows start from
SHIPPED = "gfm-tiny"


@dataclass
class Demo:
    """Where the demo writes, and the steps it ran (for the report)."""

    out: Path
    ranks: int
    steps: list[Step] = field(default_factory=list)
    aliases: dict[str, str] = field(default_factory=dict)  # long paths shown by a short name

    @property
    def logs(self) -> Path:
        """One log file per program run."""
        return self.out / "logs"

    def run(self, title: str, name: str, argv: list[str], *, done: Path | None = None, torchrun: bool = False) -> Step:
        """Run one program as a user would (a fresh process); its stdout goes to ``logs/NAME.log``.

        Progress bars (stderr) stay on the terminal. A step whose ``done`` file exists is skipped.
        Raises ``SystemExit`` with the log's tail when the program fails.
        """
        shown = (f"torchrun --nproc_per_node {self.ranks} -m " if torchrun else "gfm ") + " ".join(argv)
        for long, short in self.aliases.items():
            shown = shown.replace(long, short)
        n = len(self.steps) + 1
        print(f"\n[{n}] {title}\n    $ {shown}", flush=True)
        step = Step(n=n, title=title, command=shown, log=self.logs / f"{name}.log")
        self.steps.append(step)
        if done is not None and done.exists():
            print(f"    done already ({done}); skipped", flush=True)
            step.skipped = True
            return step
        if torchrun:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(self.ranks), "-m", *argv]
        else:
            cmd = [sys.executable, "-m", "gfm.cli", *argv]
        env = dict(os.environ)
        # one compute thread per rank on a small machine; the programs honour an explicit setting
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // (self.ranks if torchrun else 1))))
        self.logs.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        with open(step.log, "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=None, env=env).returncode
        step.seconds = time.time() - t0
        if rc:
            tail = "\n".join(step.log.read_text().splitlines()[-15:])
            raise SystemExit(f"{tail}\ngfm demo: step {n} ({title}) failed with exit code {rc}; log: {step.log}")
        print(f"    ok in {step.seconds:.0f} s (log: {step.log})", flush=True)
        return step


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``gfm demo``."""
    p = argparse.ArgumentParser(
        prog="gfm demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="runs/demo", help="working directory (default runs/demo)")
    p.add_argument("--wavelengths", help="exact wavelength list for the cube (default: nominal AVIRIS centres)")
    p.add_argument("--ranks", type=int, default=2, help="pretraining processes (default 2)")
    p.add_argument("--pretrain-steps", type=int, default=300, help="pretraining optimizer steps (default 300)")
    p.add_argument("--finetune-steps", type=int, default=300,
                   help="fine-tuning steps of each network run (default 300; the experiment runs 1000)")
    p.add_argument("--predict-size", type=int, default=0,
                   help="predict only the top-left N x N pixels (default 0: the whole 145 x 145 scene, about a "
                        "minute on 2 cores)")
    p.add_argument("--shards-only", action="store_true", help="stop after building and checking the shards")
    p.add_argument("--fresh", action="store_true", help="delete OUT first instead of resuming")
    a = p.parse_args(argv)

    out = Path(a.out)
    if a.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    demo = Demo(out=out, ranks=a.ranks)
    t_start = time.time()
    try:
        cube, gt = tensorly_indian_pines()
    except DemoDataError as e:
        raise SystemExit(f"gfm demo: {e}") from None
    wl = Path(a.wavelengths) if a.wavelengths else out / "aviris_indian_pines_wavelengths_nm.txt"
    if not a.wavelengths:
        wl.write_text("\n".join(f"{w:.2f}" for w in aviris_indian_pines_wavelengths()) + "\n")
    demo.aliases = {str(cube.parent): "<tensorly data>", str(resources.files("pretrain")): "pretrain",
                    str(resources.files("finetune")): "finetune"}
    scene = [str(cube), "--wavelengths", str(wl), "--sensor", "aviris", "--scene-id", "indian_pines",
             "--date", "1992-06-12", "--gsd", "20"]

    # 1. shards
    shards = out / "shards"
    demo.run("shards: tile the cube and its labels", "shards_build",
             ["shards", "build", *scene, "--label", str(gt), "--tile", "32", "--stride", "16",
              "--shard-size", "16MB", "--workers", "2", "--out", str(shards)],
             done=shards / "index.json")
    demo.run("shards: summary (band table in the log) and statistics plot", "shards_info",
             ["shards", "info", str(shards), "--plot", str(out / "band_stats.png")])
    demo.run("shards: verify every sample against index.json", "shards_verify", ["shards", "verify", str(shards)])
    if a.shards_only:
        return 0

    # 2. pretraining, DeepSpeed on 2 processes
    pre = out / "pretrain"
    pre_cfg = resources.files("pretrain") / "configs" / PRETRAIN_CONFIG
    demo.run("pretrain: HyperMAE LESS ViT-Tiny, DeepSpeed", "pretrain",
             ["pretrain", "--config", str(pre_cfg), f"data.loader.shards={shards}", f"run_dir={pre}",
              f"steps={a.pretrain_steps}", "logging.progress=true"],
             done=pre / "model.safetensors", torchrun=True)

    # 3. fine-tuning, like with like on one split: LoRA on the shipped encoder, the same LoRA recipe from
    # random weights (same architecture, steps and learning rate), and a classic baseline
    ft_cfg = resources.files("finetune") / "configs" / FINETUNE_CONFIG
    steps = [f"steps={a.finetune_steps}", f"schedule.warmup_steps={max(1, a.finetune_steps // 10)}"]
    runs = {}
    for key, what, extra in (
        ("lora", f"LoRA on the shipped encoder {SHIPPED}", ["method.name=lora", f"encoder.weights={SHIPPED}"]),
        ("scratch_lora", "the same LoRA recipe from random weights",
         ["method.name=lora", f"encoder.weights={SHIPPED}", "encoder.random_init=true"]),
        ("random_forest", "a random forest on the pixels' bands (classic baseline)", ["method.name=random_forest"]),
    ):
        run_dir = out / "finetune" / key
        demo.run(f"finetune: {what}", f"finetune_{key}",
                 ["finetune", "--config", str(ft_cfg), f"data.shards={shards}", f"run_dir={run_dir}", *steps, *extra],
                 done=run_dir / "metrics.json")
        runs[key] = run_dir

    # 4. export the shipped encoder with the LoRA adapter beside it
    export = out / "export"
    demo.run("export: Hugging Face directory with the LoRA adapter", "export",
             ["export", SHIPPED, str(export), "--adapter", str(runs["lora"]), "--overwrite"],
             done=None)

    # 5. whole-scene prediction and embeddings, each loading the export in a fresh process
    pred = out / "prediction.tif"
    region = ["--region", "0", "0", str(a.predict_size), str(a.predict_size)] if a.predict_size else []
    demo.run("predict: the scene (or its top-left corner) into a Cloud-Optimized GeoTIFF", "predict",
             ["predict", *scene, "--model", str(export), "--out", str(pred), *region, "--overwrite"])
    emb = out / "embeddings.parquet"
    demo.run("embed: one embedding per tile into GeoParquet", "embed",
             ["embed", str(shards), "--model", str(export), "--out", str(emb), "--overwrite"])

    # 6. checks and the report
    check = check_prediction(pred, gt, runs["lora"] / "split.json", _read_json(runs["lora"] / "metrics.json"))
    picture = prediction_png(pred, gt, out / "prediction_map.png")
    report = write_report(out, demo.steps, pretrain_dir=pre, finetune_runs=runs, export_dir=export,
                          prediction=pred, prediction_check=check, prediction_picture=picture,
                          embeddings=emb, total_seconds=time.time() - t_start)
    print(f"\n{check.summary}")
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
