"""The Indian Pines experiment: a gfm-pretrained encoder vs random weights, LoRA vs linear probe vs full.

    python -m finetune.experiment_indian_pines --out runs/ip_experiment          # everything, resumable
    python -m finetune.experiment_indian_pines --out runs/ip_experiment --table  # only re-print the table

Steps (each skipped when its output already exists, so an interrupted study continues):

1. **Shards.** The unlabelled hyperspectral scenes of ``../shared/data`` for pretraining: the Indian Pines
   cube *without* its labels (AVIRIS, 200 bands, exact wavelength list) and the four ABU scenes
   (``hsi_abu_anomaly``: HYDICE 162 bands, ROSIS beach 102, AVIRIS urban 198, AVIRIS San Diego 189),
   which ship without wavelengths: they get nominal ones, evenly spaced over each instrument's range
   (San Diego: the AVIRIS grid minus its usual 35 water/noise bands), and approximate GSDs. Their
   anomaly maps are not used. Separately, the labelled Indian Pines shards for fine-tuning.
2. **Pretraining.** HyperMAE on LESS ViT-Tiny width (D 192, 3 heads) with ``--depth`` blocks (4 by
   default: 12 cost ~3 s per step of 32 windows on a shared 2-core CPU), patch 4, spectral patch 25,
   16 x 16 crops, ``--pretrain-steps`` steps (600), through ``gfm.train.run`` (``model.depth``); the
   fine-tuning configs name the same architecture explicitly and load its weights with strict keys.
3. **Fine-tuning.** Per-pixel classification with 7 x 7 windows, spatially disjoint split (16 px blocks,
   half the blocks for training; no training window overlaps a test window), two label budgets (5 % of
   each class's labelled pixels; 10 pixels per class), encoder pretrained vs random (scratch), methods
   ``lora`` / ``linear_probe`` / ``full``, seeds 0, 1, 2 (the seed draws the split, the labels, the head
   and the order). Learning rates are fixed in advance (no validation split to tune them on): full
   5e-4 with layer decay 0.75, LoRA 2e-3 (r 4, attention + pools + MLP), linear probe 5e-3.
4. **Table.** ``results.json`` and ``results.md``: OA / AA / kappa (mean ± std over seeds, %), trainable
   parameters, and the goal's three checks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

METHODS = ("lora", "linear_probe", "full")
INITS = ("pretrained", "scratch")
BUDGETS = {"5pct": ["split.fraction=0.05"], "10px": ["split.per_class=10"]}
LR = {"full": 5e-4, "lora": 2e-3, "linear_probe": 5e-3}
IP_NAMES = ["Alfalfa", "Corn-notill", "Corn-mintill", "Corn", "Grass-pasture", "Grass-trees", "Grass-pasture-mowed",
            "Hay-windrowed", "Oats", "Soybean-notill", "Soybean-mintill", "Soybean-clean", "Wheat", "Woods",
            "Buildings-Grass-Trees-Drives", "Stone-Steel-Towers"]

#: ABU scenes: (file, sensor name, bands, nominal range nm, approximate GSD m)
ABU = (
    ("HYDICE_data.mat", "hydice_abu", 162, (400.0, 2500.0), 2.0),
    ("abu-beach-4.mat", "rosis_abu_beach", 102, (430.0, 860.0), 1.3),
    ("abu-urban-2.mat", "aviris_abu_urban", 198, (400.0, 2500.0), 17.2),
)
# San Diego: the 224-channel AVIRIS grid (366-2496 nm) without channels 1-6, 33-35, 97, 107-113, 153-166, 221-224
_SD_DROPPED = {*range(1, 7), 33, 34, 35, 97, *range(107, 114), *range(153, 167), *range(221, 225)}


def _wavelengths_file(path: Path, values: Sequence[float] | np.ndarray) -> Path:
    path.write_text("\n".join(f"{v:.2f}" for v in values) + "\n")
    return path


def build_shards(out: Path, shared: Path) -> tuple[Path, Path]:
    """Pretraining shards (unlabelled scenes) and the labelled Indian Pines shards."""
    from gfm.shards import BuildOptions, load_manifest
    from gfm.shards import build as build_dataset

    pre, lab = out / "shards_pretrain", out / "shards_indian_pines"
    wl_dir = out / "wavelengths"
    wl_dir.mkdir(parents=True, exist_ok=True)
    ip = shared / "hsi_indian_pines"
    abu = shared / "hsi_abu_anomaly"
    scenes: list[dict[str, Any]] = [{
        "id": "indian_pines", "gsd": 20, "date": "1992-06-12",
        "files": [{"path": str(ip / "Indian_pines_corrected.npy"), "sensor": "aviris",
                   "wavelengths": str(ip / "wavelengths_nm.txt")}],
    }]
    for fname, sensor, n, (lo, hi), gsd in ABU:
        wl = _wavelengths_file(wl_dir / f"{sensor}.txt", np.linspace(lo, hi, n))
        scenes.append({"id": sensor, "gsd": gsd, "files": [{"path": str(abu / fname), "key": "data",
                                                            "sensor": sensor, "wavelengths": str(wl)}]})
    sd = [w for i, w in enumerate(np.linspace(366.0, 2496.0, 224), start=1) if i not in _SD_DROPPED]
    wl = _wavelengths_file(wl_dir / "aviris_abu_sandiego.txt", sd)
    scenes.append({"id": "aviris_abu_sandiego", "gsd": 3.5, "files": [{"path": str(abu / "sandiego_plane.mat"),
                   "key": "data", "sensor": "aviris_abu_sandiego", "wavelengths": str(wl)}]})
    manifest = out / "pretrain_scenes.yaml"
    import yaml

    manifest.write_text(yaml.safe_dump({"scenes": scenes}, sort_keys=False))
    if not (pre / "index.json").is_file():
        build_dataset(load_manifest(manifest), BuildOptions(out=str(pre), tile=32, stride=16, min_valid=0.5,
                                                            progress=False))
    if not (lab / "index.json").is_file():
        labelled = [{**scenes[0], "label": str(ip / "Indian_pines_gt.npy")}]
        manifest_l = out / "indian_pines_labelled.yaml"
        manifest_l.write_text(yaml.safe_dump({"scenes": labelled}, sort_keys=False))
        build_dataset(load_manifest(manifest_l), BuildOptions(out=str(lab), tile=29, min_valid=0.0, progress=False))
    return pre, lab


def encoder_kwargs(depth: int) -> dict[str, Any]:
    """The encoder architecture shared by pretraining and fine-tuning."""
    return {"depth": depth, "patch_size": 4, "spectral_patch": 25}


def pretrain(out: Path, shards: Path, steps: int, depth: int) -> Path:
    """HyperMAE pretraining on the unlabelled scenes; returns the run directory (with model.safetensors)."""
    from gfm.config import load
    from gfm.train import TrainConfig
    from gfm.train.runner import run

    run_dir = out / "pretrain"
    if (run_dir / "model.safetensors").is_file():
        return run_dir
    cfg = load(TrainConfig, None, [
        f"run_dir={run_dir}", f"steps={steps}", "seed=0", "data.source=shards", f"data.loader.shards={shards}",
        "data.loader.mode=resampled", "data.loader.batch_size=16", "data.loader.num_workers=1",
        "data.loader.crop_size=16", "data.loader.shuffle_buffer=200", "model.name=hypermae_less_tiny",
        f"model.depth={depth}", "model.patch_size=4", "model.spectral_patch=25", "model.norm_pix_loss=false",
        "optim.lr=1e-3",
        "optim.ref_batch=16", f"schedule.warmup_steps={max(1, steps // 20)}", "engine.zero_stage=0",
        "engine.precision=fp32", "checkpoint.every=0", "logging.every=25", "logging.tensorboard=false",
        "logging.peak_flops=1e11",
    ])
    run(cfg)
    return run_dir


def finetune_one(out: Path, shards: Path, weights: Path, budget: str, init: str, method: str, seed: int,
                 steps: int, depth: int) -> dict[str, Any]:
    """One fine-tuning run (skipped when its metrics exist); returns its metrics.json."""
    from gfm.config import load
    from gfm.finetune.config import FinetuneConfig
    from gfm.finetune.run import run_one

    run_dir = out / "finetune" / budget / init / method / f"seed_{seed}"
    if (run_dir / "metrics.json").is_file():
        return dict(json.loads((run_dir / "metrics.json").read_text()))
    kw = encoder_kwargs(depth)
    overrides = [
        f"run_dir={run_dir}", f"steps={steps}", f"seed={seed}", f"data.shards={shards}", "data.task=pixel",
        "data.window=7", "data.batch_size=32", "data.eval_batch_size=256", "data.labels.ignore=[0]",
        f"data.labels.names={json.dumps(IP_NAMES)}", "encoder.name=less_vit_tiny",
        f"encoder.kwargs={json.dumps(kw)}", f"encoder.weights={weights}", f"encoder.random_init={init == 'scratch'}",
        f"method.name={method}", "method.lora.rank=4", "method.lora.alpha=8", "split.mode=spatial", "split.block=16",
        "split.fractions=[0.5,0.0,0.5]", "split.empty_class=drop", f"optim.lr={LR[method]}", "optim.ref_batch=32",
        "optim.layer_decay=0.75", f"schedule.warmup_steps={max(1, steps // 10)}", "engine.zero_stage=0",
        "engine.precision=fp32", "logging.progress=false", "logging.tensorboard=false", "logging.peak_flops=1e11",
        *BUDGETS[budget],
    ]
    cfg = load(FinetuneConfig, None, overrides)
    res = run_one(cfg)
    return res.metrics


def _fmt(vals: list[float]) -> str:
    a = 100 * np.asarray(vals)
    return f"{a.mean():.1f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.1f}"


def table(results: dict[str, Any]) -> str:
    """The markdown table of ``results.json``."""
    lines = [
        "| labels | encoder | method | OA % | AA % | kappa × 100 | trainable params | trainable % | test px |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    summary: dict[tuple[str, str, str], float] = {}
    for budget in BUDGETS:
        for init in INITS:
            for method in METHODS:
                runs = results["runs"].get(f"{budget}/{init}/{method}", [])
                if not runs:
                    continue
                oa = [r["test"]["oa"] for r in runs]
                summary[(budget, init, method)] = float(np.mean(oa))
                p = runs[0]["parameters"]
                lines.append(
                    f"| {'5 % per class' if budget == '5pct' else '10 per class'} | {init} | {method} | {_fmt(oa)} | "
                    f"{_fmt([r['test']['aa'] for r in runs])} | {_fmt([r['test']['kappa'] for r in runs])} | "
                    f"{p['trainable']:,} | {100 * p['trainable'] / p['total']:.2f} | "
                    f"{int(np.mean([r['test']['samples'] for r in runs]))} |"
                )
    lines.append("")
    for budget in BUDGETS:
        keys = [(budget, i, m) for i in INITS for m in METHODS]
        if not all(k in summary for k in keys):
            continue
        gain = 100 * (summary[(budget, "pretrained", "lora")] - summary[(budget, "scratch", "lora")])
        gain_full = 100 * (summary[(budget, "pretrained", "lora")] - summary[(budget, "scratch", "full")])
        gap = 100 * (summary[(budget, "pretrained", "full")] - summary[(budget, "pretrained", "lora")])
        share = next(100 * r[0]["parameters"]["trainable"] / r[0]["parameters"]["total"]
                     for k, r in results["runs"].items() if k == f"{budget}/pretrained/lora")
        lines.append(
            f"- {budget}: pretrained+LoRA − scratch+LoRA = {gain:+.1f} OA points (− scratch+full: {gain_full:+.1f}; "
            f"goal ≥ +5: {'met' if min(gain, gain_full) >= 5 else 'not met'}); pretrained full − pretrained LoRA = "
            f"{gap:+.1f} points (goal ≤ 1: {'met' if gap <= 1 else 'not met'}); LoRA trains {share:.2f} % "
            f"(goal ≤ 5 %: {'met' if share <= 5 else 'not met'})"
        )
    dropped = sorted({c for runs in results["runs"].values() for r in runs for c in r["split"]["dropped_classes"]})
    lines.append(f"- classes left out of training and scoring in some split (too small to split spatially with 7 x 7 "
                 f"windows and 16 px blocks): {', '.join(dropped) or 'none'}; train/test window overlap: "
                 f"{sorted({r['split']['overlap_train_test'] for runs in results['runs'].values() for r in runs})}")
    return "\n".join(lines) + "\n"


def collect(out: Path) -> dict[str, list[dict[str, Any]]]:
    """Every finished run's metrics under ``out/finetune``, keyed ``budget/init/method`` (seeds in order)."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for path in sorted((out / "finetune").glob("*/*/*/seed_*/metrics.json"), key=lambda p: (p.parts, p.name)):
        budget, init, method = path.parts[-5:-2]
        runs.setdefault(f"{budget}/{init}/{method}", []).append(json.loads(path.read_text()))
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or continue) the study and write ``results.json`` and ``results.md``."""
    p = argparse.ArgumentParser(prog="python -m finetune.experiment_indian_pines", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/ip_experiment")
    p.add_argument("--shared", default=str(SHARED), help="the shared data folder")
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--steps", type=int, default=100, help="fine-tuning steps per run")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--budgets", nargs="+", default=list(BUDGETS), choices=list(BUDGETS),
                   help="label budgets to run (two processes may share --out, one budget each, once pretrained)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--table", action="store_true", help="only print the table of the runs done so far")
    p.add_argument("--pretrain-only", action="store_true", help="stop after building the shards and pretraining")
    a = p.parse_args(argv)
    out = Path(a.out).resolve()  # absolute: the manifests written there name files by absolute path
    out.mkdir(parents=True, exist_ok=True)
    if not a.table:
        import torch

        from gfm import distributed as gdist

        if a.threads:
            torch.set_num_threads(a.threads)
        gdist.init_distributed()
        t0 = time.time()
        pre, lab = build_shards(out, Path(a.shared))
        weights = pretrain(out, pre, a.pretrain_steps, a.depth)
        (out / "pretrain.json").write_text(json.dumps({
            "run_dir": str(weights), "steps": a.pretrain_steps, "depth": a.depth,
            "encoder": {"name": "less_vit_tiny", "kwargs": encoder_kwargs(a.depth)},
        }, indent=1) + "\n")
        for budget in [] if a.pretrain_only else a.budgets:
            for init in INITS:
                for method in METHODS:
                    for s in a.seeds:
                        finetune_one(out, lab, weights, budget, init, method, s, a.steps, a.depth)
        print(f"study done in {time.time() - t0:.0f} s")
        gdist.destroy()
    results = {"runs": collect(out)}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    text = table(results)
    (out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
