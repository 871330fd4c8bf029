"""The gfm experiment: three labelled tasks, the shipped encoder vs random weights vs classic baselines.

    python -m finetune.experiment --out runs/experiment                  # everything, resumable
    python -m finetune.experiment --out runs/experiment --table          # only re-print the tables
    python -m finetune.experiment --out runs/experiment --pretrain-run runs/corpus_tiny   # + accuracy vs steps

One program, one fixed protocol (fixed before the final runs; docs/finetune.md says how it was chosen):

=====================  ==========================================================================
task                   data and split
=====================  ==========================================================================
``indian_pines``       AVIRIS Indian Pines, 200 bands, 16 classes, per-pixel (7 x 7 windows), 16 px
                       blocks half train / half test, 5 % of each class's labelled pixels train
``slovenia``           eo-learn Slovenia, Sentinel-2 L1C 13 bands (2015-08-20), land cover, 5 classes,
                       segmentation of 24 px tiles, 24 px blocks half train / half test
``sen1floods11``       Sen1Floods11 Spain chip, Sentinel-2 L1C 13 bands, water / dry, segmentation of
                       32 px tiles, 128 px blocks half train / half test
=====================  ==========================================================================

Sentinel-2 is absent from the pretraining corpus (``pretrain/corpus/shared_data.yaml``): two of the three
tasks are on a sensor the encoder never saw. Every task runs, for seeds 0, 1, 2 (the seed draws the split,
so all rows of one seed share the split's sample ids): ``random_forest`` and ``svm`` on the pixels' band
values; LoRA on the shipped encoder (``pretrained + lora``) and on the same architecture from random
weights (``scratch + lora``), same steps and learning rate; Indian Pines also full fine-tuning of the
shipped encoder and from random weights. Steps are the task configs' (Indian Pines 1000 of 32 pixels;
the segmentation tasks 150 of 4 tiles, which is what 2 cores allow in the hour). With ``--pretrain-run``
the Indian Pines LoRA row is also run from that pretraining run's intermediate checkpoints (downstream
accuracy against pretraining steps, 0 = random weights). With ``--adapted RUN`` (a continued pretraining of
the shipped encoder on the Indian Pines scene without labels, ``pretrain/configs/adapt_indian_pines.yaml``)
the Indian Pines LoRA row is also run from that run's weights (``adapted + lora``: transductive, the
scene's unlabelled pixels, test pixels included, were seen by its pretraining). ``--rows`` runs some rows
only (the order runs are done in; the tables take every finished run).

Outputs in ``--out``: every run's directory (``TASK/ROW/seed_S``: metrics, confusion matrix, maps),
``results.json``, ``results.md`` (a table per task, mean ± sample std over seeds, and the issue's targets
checked one by one) and pictures (``experiment.png``, ``pretraining_steps.png``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
CONFIGS = REPO / "finetune" / "configs"
#: the shipped encoder every "pretrained" row starts from (gfm models)
ENCODER = "gfm-tiny"
SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Row:
    """One row of a task's table: a method and where its encoder's weights come from."""

    name: str
    method: str
    init: str  # "pretrained", "scratch" or "none" (classic baselines)
    overrides: tuple[str, ...] = ()

    @property
    def classic(self) -> bool:
        """A scikit-learn baseline."""
        return self.init == "none"


CLASSIC = (Row("random_forest", "random_forest", "none"), Row("svm", "svm", "none"))
LORA = (Row("scratch + lora", "lora", "scratch"), Row("pretrained + lora", "lora", "pretrained"))
FULL = (Row("pretrained + full", "full", "pretrained"), Row("scratch + full", "full", "scratch"))
#: LoRA from the shipped encoder after continued pretraining on the task's own unlabelled scene (--adapted)
ADAPTED = Row("adapted + lora", "lora", "pretrained")
#: LoRA with slow adapters and a fast head (--head-lr-rows): the adapters at lr 2e-4, the new, randomly
#: initialised head at 5 x that (1e-3, the protocol's lr), so fine-tuning moves pretrained features gently
SLOW_ADAPTERS = ("optim.lr=2e-4", "optim.head_lr_scale=5")
LORA_H5 = (Row("scratch + lora-h5", "lora", "scratch", SLOW_ADAPTERS),
           Row("pretrained + lora-h5", "lora", "pretrained", SLOW_ADAPTERS))
ADAPTED_H5 = Row("adapted + lora-h5", "lora", "pretrained", SLOW_ADAPTERS)


@dataclass(frozen=True)
class Task:
    """A labelled task: its shards, its fine-tuning config and its rows."""

    name: str
    title: str
    config: str
    build: Callable[[Path, Path], Path]
    rows: tuple[Row, ...]
    segmentation: bool = False
    overrides: tuple[str, ...] = field(default=())


def _build(out: Path, scenes: list[dict[str, Any]], tile: int, min_valid: float = 0.0) -> Path:
    """Shards of ``scenes`` (a manifest's ``scenes`` list) into ``out`` (skipped when built already)."""
    import yaml

    from gfm.shards import BuildOptions, build, load_manifest

    if (out / "index.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    manifest = out.parent / f"{out.name}.yaml"
    manifest.write_text(yaml.safe_dump({"scenes": scenes}, sort_keys=False))
    build(load_manifest(manifest), BuildOptions(out=str(out), tile=tile, min_valid=min_valid, progress=False))
    return out


def indian_pines_shards(out: Path, shared: Path) -> Path:
    """The Indian Pines cube with its labels (29 px tiles: the mosaic is put back together for windows)."""
    d = shared / "hsi_indian_pines"
    return _build(out / "shards" / "indian_pines", [{
        "id": "indian_pines", "gsd": 20, "date": "1992-06-12", "label": str(d / "Indian_pines_gt.npy"),
        "files": [{"path": str(d / "Indian_pines_corrected.npy"), "sensor": "aviris",
                   "wavelengths": str(d / "wavelengths_nm.txt")}],
    }], tile=29)


def slovenia_shards(out: Path, shared: Path) -> Path:
    """eo-learn's Slovenia patch, the 2015-08-20 Sentinel-2 scene, with its land-cover map."""
    d = shared / "ts_eolearn_slovenia"
    lulc = np.load(d / "TestEOPatch" / "mask_timeless" / "LULC.npy")
    label = out / "shards" / "slovenia_lulc.npy"
    label.parent.mkdir(parents=True, exist_ok=True)
    np.save(label, lulc.reshape(lulc.shape[:2]).astype(np.int16))
    return _build(out / "shards" / "slovenia", [{
        "id": "slovenia", "sensor": "sentinel2_l1c", "crs": "EPSG:32633",
        "bounds": [465181.05, 5079244.89, 466180.53, 5080254.63], "label": str(label),
        "observations": [{"date": "2015-08-20", "files": [{"path": str(d / "REFERENCE_SCENES.npy"), "index": 0}]}],
    }], tile=24)


def sen1floods11_shards(out: Path, shared: Path) -> Path:
    """The Sen1Floods11 Spain chip: Sentinel-2 L1C and its hand-drawn water labels (-1 = no label)."""
    d = shared / "s2_sen1floods11"
    return _build(out / "shards" / "sen1floods11", [{
        "id": "sen1floods11_spain", "date": "2019-09-17", "label": str(d / "Spain_7370579_LabelHand.tif"),
        "files": [{"path": str(d / "Spain_7370579_S2Hand.tif"), "sensor": "sentinel2_l1c"}],
    }], tile=32)


TASKS: dict[str, Task] = {
    "indian_pines": Task("indian_pines", "Indian Pines (AVIRIS, per-pixel, 5 % of the labels)",
                         "indian_pines_lora.yaml", indian_pines_shards,
                         (*CLASSIC, *LORA, *FULL)),
    "slovenia": Task("slovenia", "eo-learn Slovenia land cover (Sentinel-2, segmentation)", "eolearn_landcover.yaml",
                     slovenia_shards, (*CLASSIC, *LORA), segmentation=True),
    "sen1floods11": Task("sen1floods11", "Sen1Floods11 water (Sentinel-2, segmentation)", "sen1floods11_water.yaml",
                         sen1floods11_shards, (*CLASSIC, *LORA), segmentation=True,
                         # the SVM's fit grows with the square of its samples: 50,000 training pixels for
                         # both baselines (of ~130,000), drawn with the run's seed
                         overrides=("method.classic.max_train_pixels=50000",)),
}


def row_dir(out: Path, task: Task, row: Row) -> Path:
    """Where a row's seeds run."""
    return out / task.name / row.name.replace(" + ", "_").replace(" ", "_").replace("@", "_at_")


def run_row(out: Path, task: Task, row: Row, shards: Path, seed: int, weights: str) -> dict[str, Any]:
    """One seed of one row (skipped when its metrics exist); returns its metrics.json."""
    from gfm.config import load
    from gfm.finetune.config import FinetuneConfig
    from gfm.finetune.run import run_one

    run_dir = row_dir(out, task, row) / f"seed_{seed}"
    done = run_dir / "metrics.json"
    if done.is_file():
        return dict(json.loads(done.read_text()))
    overrides = [f"run_dir={run_dir}", f"seed={seed}", f"data.shards={shards}", f"method.name={row.method}",
                 "logging.progress=false", "logging.tensorboard=false", "logging.peak_flops=1e11",
                 *task.overrides, *row.overrides]
    if not row.classic:
        overrides += [f"encoder.weights={weights}", f"encoder.random_init={row.init == 'scratch'}"]
    print(f"[{task.name}] {row.name}, seed {seed}", flush=True)
    cfg = load(FinetuneConfig, CONFIGS / task.config, overrides)
    return run_one(cfg).metrics


def curve_rows(pretrain_run: Path, steps: Sequence[int]) -> list[tuple[int, Row, str]]:
    """Indian Pines LoRA rows from the pretraining run's checkpoints at ``steps`` (those that exist)."""
    rows = []
    for s in steps:
        ckpt = pretrain_run / "checkpoints" / f"step_{s:08d}"
        if (ckpt / "COMPLETE").exists():
            rows.append((s, Row(f"pretrained@{s} + lora", "lora", "pretrained"), str(ckpt)))
    return rows


# ------------------------------------------------------------------------------------------------
# Tables and targets


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    a = 100 * np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def _fmt(values: Sequence[float]) -> str:
    m, s = _mean_std(values)
    return f"{m:.1f} ± {s:.1f}"


def _majority(metrics: dict[str, Any]) -> float:
    """The test share of the most frequent class (what predicting it everywhere scores)."""
    support = metrics["test"].get("support") or {}
    total = sum(support.values())
    return max(support.values()) / total if total else float("nan")


def summarize(results: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per task and row: mean and std (%) of OA, AA, kappa, mIoU; trainable share; seconds; majority share."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for task, rows in results.items():
        for row, runs in rows.items():
            if not runs:
                continue
            s: dict[str, Any] = {"seeds": [r["seed"] for r in runs]}
            for key in ("oa", "aa", "kappa", "miou"):
                vals = [r["test"][key] for r in runs if isinstance(r["test"].get(key), float)]
                if vals:
                    s[key] = _mean_std(vals)
            p = runs[0].get("parameters") or {}
            s["trainable_pct"] = 100 * p["trainable"] / p["total"] if p.get("total") else None
            s["seconds"] = float(np.mean([r.get("seconds", 0.0) for r in runs]))
            s["majority"] = 100 * float(np.mean([_majority(r) for r in runs]))
            s["test_samples"] = int(np.mean([r["test"]["samples"] for r in runs]))
            out.setdefault(task, {})[row] = s
    return out


def table(task: Task, summary: dict[str, dict[str, Any]], results: dict[str, list[dict[str, Any]]]) -> str:
    """The markdown table of one task."""
    seg = task.segmentation
    head = "| row | OA % | AA % | " + ("mIoU % | " if seg else "kappa × 100 | ") + "trainable % | s / run | test |"
    lines = [f"**{task.title}**", "", head, "|---|---|---|---|---|---|---|"]
    for row, s in summary.items():
        runs = results[row]
        third = _fmt([r["test"]["miou"] for r in runs]) if seg else _fmt([r["test"]["kappa"] for r in runs])
        share = f"{s['trainable_pct']:.2f}" if s.get("trainable_pct") is not None else "-"
        lines.append(f"| {row} | {_fmt([r['test']['oa'] for r in runs])} | {_fmt([r['test']['aa'] for r in runs])} "
                     f"| {third} | {share} | {s['seconds']:.0f} | {s['test_samples']} |")
    any_row = next(iter(summary.values()), None)
    if any_row is not None:
        lines.append(f"\nmajority class: {any_row['majority']:.1f} % of the test {'pixels' if seg else 'samples'}; "
                     f"seeds {', '.join(map(str, any_row['seeds']))}")
    return "\n".join(lines)


def targets(summary: dict[str, dict[str, dict[str, Any]]],
            results: dict[str, dict[str, list[dict[str, Any]]]] | None = None) -> list[str]:
    """The issue's targets, each checked against the table (a line each, 'met' or 'not met')."""

    def oa(task: str, row: str) -> tuple[float, float] | None:
        s = summary.get(task, {}).get(row)
        return s["oa"] if s and "oa" in s else None

    def verdict(ok: bool) -> str:
        return "met" if ok else "**not met**"

    results = results or {}
    lines = []
    ip = summary.get("indian_pines", {})
    classic = [oa("indian_pines", r.name) for r in CLASSIC]
    nets = [oa("indian_pines", r) for r in ip if summary["indian_pines"][r].get("trainable_pct") is not None
            and "@" not in r]
    if all(classic) and all(nets) and nets:
        best_c = max(c[0] for c in classic if c)
        best_n = max(n[0] for n in nets if n)
        lines.append(f"- Indian Pines: best gfm row {best_n:.1f} vs best classic {best_c:.1f}: "
                     f"{best_n - best_c:+.1f} points (target ≥ +5: {verdict(best_n - best_c >= 5)})")
    for row, base in (("pretrained + lora", "scratch + lora"), (ADAPTED.name, "scratch + lora"),
                      (LORA_H5[1].name, LORA_H5[0].name), (ADAPTED_H5.name, LORA_H5[0].name)):
        pl, sl = oa("indian_pines", row), oa("indian_pines", base)
        if not (pl and sl):
            continue
        gain = pl[0] - sl[0]
        diffs = paired(results.get("indian_pines", {}), row, base)
        pair = (f"; paired by seed (same split) {_fmt(diffs)} ({', '.join(f'{100 * d:+.1f}' for d in diffs)})"
                if len(diffs) > 1 else "")
        lines.append(f"- Indian Pines: {row} − {base} = {gain:+.1f} points, seeds' std "
                     f"{pl[1]:.1f} / {sl[1]:.1f}{pair} (target ≥ +3 and above the std: "
                     f"{verdict(gain >= 3 and gain > max(pl[1], sl[1]))})")
    for task in ("slovenia", "sen1floods11"):
        pl, sl = oa(task, "pretrained + lora"), oa(task, "scratch + lora")
        found = [c[0] for c in (oa(task, r.name) for r in CLASSIC) if c]
        if pl and sl and found:
            lines.append(f"- {task} (Sentinel-2, absent from pretraining): pretrained + LoRA {pl[0]:.1f} vs "
                         f"scratch + LoRA {sl[0]:.1f} ({verdict(pl[0] >= sl[0])}) and vs the best classic "
                         f"{max(found):.1f} ({verdict(pl[0] >= max(found))})")
    seg = summary.get("slovenia", {})
    rf = seg.get("random_forest")
    if rf and "miou" in rf:
        for row, s in seg.items():
            if s.get("trainable_pct") is None or "miou" not in s:
                continue
            ok = s["oa"][0] >= rf["oa"][0] and s["miou"][0] >= rf["miou"][0] and s["oa"][0] > s["majority"] + 5
            lines.append(f"- slovenia segmentation, {row}: OA {s['oa'][0]:.1f} / mIoU {s['miou'][0]:.1f} vs random "
                         f"forest {rf['oa'][0]:.1f} / {rf['miou'][0]:.1f}, majority class {s['majority']:.1f} "
                         f"(target: ≥ the forest in both, well above the majority: {verdict(ok)})")
    for task, rows in summary.items():
        lo, fu = rows.get("pretrained + lora"), rows.get("pretrained + full")
        if lo and fu:
            gap = fu["oa"][0] - lo["oa"][0]
            lines.append(f"- {task}: pretrained full − pretrained LoRA = {gap:+.1f} points (target ≤ 2: "
                         f"{verdict(gap <= 2)}); LoRA trains {lo['trainable_pct']:.2f} % of the parameters "
                         f"(target ≤ 5 %: {verdict(lo['trainable_pct'] <= 5)})")
    return lines


def paired(runs: dict[str, list[dict[str, Any]]], row: str, base: str) -> list[float]:
    """OA of ``row`` minus OA of ``base`` seed by seed (the seeds both have; the seed draws the split)."""
    by_seed = {r["seed"]: r["test"]["oa"] for r in runs.get(base, [])}
    return [r["test"]["oa"] - by_seed[r["seed"]] for r in runs.get(row, []) if r["seed"] in by_seed]


def collect(out: Path, tasks: Sequence[Task], extra: dict[str, list[Row]]) -> dict[str, dict[str, list[dict]]]:
    """Every finished run's metrics, per task and row, seeds in order."""
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for task in tasks:
        for row in (*task.rows, *extra.get(task.name, [])):
            runs = [json.loads(p.read_text()) for p in sorted(row_dir(out, task, row).glob("seed_*/metrics.json"))]
            results.setdefault(task.name, {})[row.name] = runs
    return results


def pictures(out: Path, summary: dict[str, dict[str, dict[str, Any]]],
             curve: list[tuple[int, float, float]]) -> list[Path]:
    """``experiment.png`` (OA per row and task, std as error bars) and ``pretraining_steps.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    tasks = [t for t in summary if summary[t]]
    if tasks:
        fig, axes = plt.subplots(1, len(tasks), figsize=(4.6 * len(tasks), 3.8), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            rows = [r for r in summary[task] if "@" not in r]
            means = [summary[task][r]["oa"][0] for r in rows]
            stds = [summary[task][r]["oa"][1] for r in rows]
            colors = ["tab:gray" if summary[task][r].get("trainable_pct") is None else
                      ("tab:blue" if r.startswith("pretrained") else "tab:orange") for r in rows]
            ax.bar(range(len(rows)), means, yerr=stds, color=colors, capsize=3)
            ax.set_xticks(range(len(rows)), rows, rotation=40, ha="right", fontsize=7)
            ax.set_ylabel("overall accuracy % (mean ± std, 3 seeds)")
            ax.set_ylim(max(0.0, min(means) - 15), 100)
            ax.set_title(TASKS[task].title, fontsize=8)
        fig.tight_layout()
        path = out / "experiment.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    if curve:
        ordered = sorted(curve)
        fig, ax = plt.subplots(figsize=(5, 3.6))
        ax.errorbar([c[0] for c in ordered], [c[1] for c in ordered], yerr=[c[2] for c in ordered], marker="o",
                    capsize=3)
        ax.set_xlabel("pretraining steps (0 = random weights)")
        ax.set_ylabel("Indian Pines OA % (LoRA, 3 seeds)")
        ax.set_title("downstream accuracy against pretraining", fontsize=9)
        fig.tight_layout()
        path = out / "pretraining_steps.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or continue) the experiment, then write and print the tables."""
    p = argparse.ArgumentParser(prog="python -m finetune.experiment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/experiment", help="working directory (default runs/experiment)")
    p.add_argument("--shared", default=str(SHARED), help="the shared data folder (default ../shared/data)")
    p.add_argument("--encoder", default=ENCODER, help=f"pretrained encoder: a shipped name or a path ({ENCODER})")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"tasks to run (default all: {', '.join(TASKS)})")
    p.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="seeds (default 0,1,2)")
    p.add_argument("--pretrain-run", help="a pretraining run: also run Indian Pines LoRA from its checkpoints")
    p.add_argument("--adapted", help="a continued-pretraining run of the shipped encoder on the Indian Pines scene "
                   "(pretrain/configs/adapt_indian_pines.yaml): also run Indian Pines LoRA from it ('adapted + lora')")
    p.add_argument("--head-lr-rows", action="store_true",
                   help="also run the Indian Pines LoRA rows with slow adapters and a fast head (lr 2e-4, head x 5): "
                   "'scratch + lora-h5', 'pretrained + lora-h5' and, with --adapted, 'adapted + lora-h5'")
    p.add_argument("--curve-steps", default="800", help="checkpoint steps for --pretrain-run (default 800; with 0 = "
                   "random weights and the final step, three points)")
    p.add_argument("--rows", help="run only these rows, comma-separated (default all; e.g. random_forest,svm,"
                   "scratch + lora while the encoder is still pretraining)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--table", action="store_true", help="only print the tables of the runs done so far")
    a = p.parse_args(argv)
    out = Path(a.out).resolve()  # absolute: the manifests written there name files by absolute path
    names = [t for t in a.tasks.split(",") if t]
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        p.error(f"unknown task(s) {unknown}; known: {', '.join(TASKS)}")
    tasks = [TASKS[t] for t in names]
    seeds = [int(s) for s in a.seeds.split(",")]
    shared = Path(a.shared).resolve()  # the manifests written under --out name files by absolute path
    curve = (curve_rows(Path(a.pretrain_run), [int(s) for s in a.curve_steps.split(",")])
             if a.pretrain_run and "indian_pines" in names else [])
    # the Indian Pines rows beyond the task's own: the curve's checkpoints, and the adapted encoder
    weighted = [(row, ckpt) for _, row, ckpt in curve]
    if a.adapted and "indian_pines" in names:
        weighted.append((ADAPTED, str(Path(a.adapted).resolve())))
    if a.head_lr_rows and "indian_pines" in names:
        weighted += [(row, a.encoder) for row in LORA_H5]
        if a.adapted:
            weighted.append((ADAPTED_H5, str(Path(a.adapted).resolve())))
    extra = {"indian_pines": [row for row, _ in weighted]}
    only = {r.strip() for r in a.rows.split(",")} if a.rows else None

    def chosen(row: Row) -> bool:
        return only is None or row.name in only
    if not a.table:
        if not shared.is_dir():
            print(f"finetune.experiment: {shared} is not there: the experiment runs on ../shared/data "
                  "(pass --shared DIR)", file=sys.stderr)
            return 2
        import torch

        from gfm import distributed as gdist

        if a.threads:
            torch.set_num_threads(a.threads)
        gdist.init_distributed()
        t0 = time.time()
        for task in tasks:
            shards = task.build(out, shared)
            for seed in seeds:
                for row in task.rows:
                    if chosen(row):
                        run_row(out, task, row, shards, seed, a.encoder)
                if task.name == "indian_pines":
                    for row, weights in weighted:
                        if chosen(row):
                            run_row(out, task, row, shards, seed, weights)
        print(f"experiment done in {time.time() - t0:.0f} s")
        gdist.destroy()
    results = collect(out, tasks, extra)
    summary = summarize(results)
    points = []
    ip = summary.get("indian_pines", {})
    if curve and "scratch + lora" in ip and "pretrained + lora" in ip:
        final = _final_step(Path(a.pretrain_run))
        points = [(0, *ip["scratch + lora"]["oa"])]
        points += [(s, *ip[row.name]["oa"]) for s, row, _ in curve if row.name in ip]
        if final is not None:
            points.append((final, *ip["pretrained + lora"]["oa"]))
    text = "\n\n".join(table(t, summary.get(t.name, {}), results.get(t.name, {})) for t in tasks)
    text += "\n\nTargets:\n" + "\n".join(targets(summary, results))
    if points:
        text += "\n\nIndian Pines LoRA OA against pretraining steps: " + ", ".join(
            f"{s}: {m:.1f} ± {d:.1f}" for s, m, d in points)
    (out / "results.json").write_text(json.dumps({"summary": summary, "runs": results, "curve": points}, indent=1))
    (out / "results.md").write_text(text + "\n")
    for path in pictures(out, summary, points):
        text += f"\nwrote {path}"
    print(text)
    return 0


def _final_step(pretrain_run: Path) -> int | None:
    """The step of the pretraining run's last complete checkpoint (what its model.safetensors holds)."""
    steps = [int(p.name.split("_")[1]) for p in (pretrain_run / "checkpoints").glob("step_*")
             if (p / "COMPLETE").exists()]
    return max(steps) if steps else None


if __name__ == "__main__":
    sys.exit(main())
