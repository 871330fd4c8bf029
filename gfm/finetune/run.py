"""The composition root of a fine-tuning run: config → data, split, encoder, method → engine → outputs → metrics.

:func:`run` is what ``gfm finetune`` and ``torchrun -m finetune`` call. Training goes through the
pretraining engine's own pieces (``gfm.train``'s ``TrainModule`` for the DeepSpeed step, ``Trainer`` for
the loop, its metrics and checkpoint callbacks). After the last step the trained tensors are gathered
in fp32 and written as adapters / head / model (:mod:`gfm.finetune.artifacts`); the model is then
*loaded back from those files* on every rank and evaluated on the test split, so the reported figures
are those of the files a user gets. A classic baseline (``random_forest``, ``svm``, ``knn``) takes its own
short branch after the split: no encoder, engine or loop; a scikit-learn model fitted in one process on
the same samples (:mod:`gfm.finetune.classic`), scored and pictured as the networks are, no model file.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import yaml
from torch import nn

from gfm import distributed as gdist
from gfm.config import dump_yaml, save_yaml
from gfm.fileio import atomic_write
from gfm.finetune import artifacts, classic
from gfm.finetune.config import FinetuneConfig
from gfm.finetune.data import TaskData, TaskLoader
from gfm.finetune.evaluate import Evaluation, evaluate, score
from gfm.finetune.methods import ClassicMethod, Method, apply_method, get_method, parameter_counts, trainable_names
from gfm.finetune.metrics import summarize
from gfm.finetune.model import TaskModel
from gfm.finetune.splits import Split, load_split, make_split
from gfm.finetune.weights import LoadedEncoder, load_encoder
from gfm.outputs import OutputError, OutputExistsError, claim_dir, write_marker
from gfm.train.callbacks import MetricsCallback
from gfm.train.checkpoint import resolve_resume
from gfm.train.module import StepResult, TrainModule
from gfm.train.runner import seed_everything
from gfm.train.trainer import Callback, Trainer

if TYPE_CHECKING:  # the engine is typed on the pretraining config, whose engine sections FinetuneConfig carries
    from gfm.train.config import TrainConfig


def _input_errors() -> tuple[type[Exception], ...]:
    from gfm.config import ConfigError
    from gfm.data.sources import LoaderError
    from gfm.finetune.artifacts import AdapterError
    from gfm.finetune.classic import ClassicError
    from gfm.finetune.data import TaskDataError
    from gfm.finetune.splits import SplitError
    from gfm.finetune.weights import EncoderLoadError
    from gfm.hub import HubError
    from gfm.outputs import OutputError
    from gfm.schema import SchemaError

    return (TaskDataError, SplitError, EncoderLoadError, AdapterError, ConfigError, LoaderError, SchemaError, HubError,
            ClassicError, OutputError)


#: exceptions that mean bad input (shards, labels, split, weights, adapter, run_dir), not a bug: programs print
#: one line
INPUT_ERRORS = _input_errors()
#: the program name in a run directory's ``.gfm-output`` marker (:mod:`gfm.outputs`)
PROGRAM = "finetune"
#: sections only a resolved run config holds all of (:func:`is_finetune_run`)
_RUN_SECTIONS = {"run_dir", "steps", "data", "encoder", "method", "head", "split", "optim", "engine"}
_SEED_DIR = re.compile(r"seed_\d+")


@dataclass
class FinetuneResult:
    """What one fine-tuning run produced.

    Attributes:
        run_dir: its directory.
        metrics: the ``metrics.json`` document (test figures under ``test``).
        split: the split used.
        model: the trained model (the module DeepSpeed trained; for tests and notebooks).
        data: the task data.
    """

    run_dir: Path
    metrics: dict[str, Any]
    split: Split
    model: nn.Module | None = None
    data: TaskData | None = None
    seeds: list[FinetuneResult] = field(default_factory=list)


class FinetuneMetrics(MetricsCallback):
    """The engine's metrics callback (JSONL, TensorBoard, tqdm on rank 0), its bar labelled ``finetune``."""

    def on_start(self, trainer: Trainer) -> None:
        """Open the outputs as the engine does, then relabel the progress bar."""
        super().on_start(trainer)
        if self.bar is not None:
            self.bar.set_description("finetune")


class ValidationCallback(Callback):
    """Every ``eval.every`` steps: metrics of the validation split in ``<run_dir>/val.jsonl`` (rank 0 writes)."""

    def __init__(self, data: TaskData, split: Split, every: int, batch_size: int, run_dir: Path) -> None:
        self.data, self.split, self.every, self.batch_size = data, split, every, batch_size
        self.path = run_dir / "val.jsonl"

    def on_step(self, trainer: Trainer, result: StepResult) -> None:
        """Evaluate the engine's current model on the validation split."""
        if not len(self.split.val) or trainer.step % self.every:
            return
        ev = evaluate(trainer.module.engine.module, self.data, self.split.val, self.batch_size, maps=False,
                      dropped_classes=self.split.dropped_classes)
        if gdist.is_main():
            row = {"step": trainer.step, **{k: v for k, v in ev.metrics.items() if isinstance(v, float)}}
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            gdist.print0(f"step {trainer.step}: val OA {row.get('oa', float('nan')):.4f}")


def _split(cfg: FinetuneConfig, data: TaskData, run_dir: Path) -> Split:
    if cfg.split.load:
        split = load_split(cfg.split.load, data.windows)
    else:
        split = make_split(data.windows, cfg.split, cfg.seed)
    if gdist.is_main():
        split.save(run_dir / "split.json", data.windows)
    rep = split.report
    guard = rep.get("dropped_by_guard")
    gdist.print0(
        f"split: {rep.get('mode', cfg.split.mode)}"
        + (f", {cfg.split.block} px blocks {rep['blocks']}" if rep.get("blocks") else "")
        + f"; train {len(split.train)} / val {len(split.val)} / test {len(split.test)} samples"
        + (f"; guard band dropped {guard['val']} val + {guard['test']} test windows" if guard else "")
        + f"; train/test window overlap {rep.get('overlap_train_test', '?')}"
        + (f"; classes left out (no train or test sample): {', '.join(rep['dropped_classes'])}"
           if rep.get("dropped_classes") else "")
    )
    if rep.get("budget_shortfall"):
        gdist.print0(f"split: fewer training labels than asked for {rep['budget_shortfall']}")
    return split


def _encoder(cfg: FinetuneConfig, method: Method) -> LoadedEncoder:
    enc = cfg.encoder
    if method.random_init and not enc.random_init:
        enc = replace(enc, random_init=True)
    loaded = load_encoder(enc)
    gdist.print0(f"encoder: {loaded.description}")
    return loaded


def _describe_method(cfg: FinetuneConfig, method: Method, model: nn.Module, counts: dict[str, int]) -> str:
    share = 100.0 * counts["trainable"] / max(1, counts["total"])
    line = (f"method {cfg.method.name}: {counts['trainable']:,} trainable of {counts['total']:,} parameters "
            f"({share:.2f} %)")
    detail = method.describe(cfg.method, model, cfg.optim.layer_decay)
    return f"{line}; {detail}" if detail else line


def _maps_and_pictures(run_dir: Path, data: TaskData, split: Split, ev: Evaluation, title: str) -> list[str]:
    from gfm.finetune.pictures import confusion_png, prediction_png

    written = []
    if not data.multilabel:
        written.append(str(confusion_png(ev.confusion, data.class_names, run_dir / "confusion_matrix.png", title)))
    for s, pred in enumerate(ev.maps):
        if pred is None or s >= len(data.label_mosaics):
            continue
        labels = data.label_mosaics[s]
        split_map = np.zeros(labels.shape, dtype=np.int64)
        w = data.windows
        for code, idx in ((1, split.train), (2, split.val), (3, split.test)):
            sel = idx[w.scene[idx] == s]
            if data.task == "pixel":
                split_map[w.top[sel] + data.window // 2, w.left[sel] + data.window // 2] = code
            else:
                for i in sel:
                    split_map[w.top[i] : w.top[i] + w.height[i], w.left[i] : w.left[i] + w.width[i]] = code
        name = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in data.scenes[s])
        path = run_dir / f"prediction_map_{name}.png"
        picture = prediction_png(labels, pred, split_map, data.class_names, path, f"{title} — {data.scenes[s]}")
        written.append(str(picture))
    return written


def is_finetune_run(path: Path) -> bool:
    """Whether ``path`` holds a fine-tuning run written by a gfm version before output markers.

    Its manifest (``finetune.json``); or the resolved config (``config.yaml`` with every section of a run)
    beside the ``split.json`` a run writes next; or only ``seed_<n>/`` runs and ``summary.json``.
    """
    if (path / artifacts.MANIFEST).is_file():
        return True
    try:
        saved = yaml.safe_load((path / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        saved = None
    if isinstance(saved, dict) and _RUN_SECTIONS <= set(saved) and (path / "split.json").is_file():
        return True
    entries = list(path.iterdir())
    return bool(entries) and all(p.name == "summary.json" or (_SEED_DIR.fullmatch(p.name) and p.is_dir())
                                 for p in entries)


def claim_run_dir(cfg: FinetuneConfig, run_dir: Path, finished: str) -> OutputError | None:
    """Check that this run may write ``run_dir``, and prepare it (rank 0); the refusal, for every rank to raise.

    ``run_dir`` may be new, empty or a fine-tuning run (:func:`gfm.outputs.claim_dir`, :func:`is_finetune_run`);
    a run there that is not ``finished`` (that file absent: it was interrupted) is continued or restarted in
    place, a finished one is refused unless ``cfg.overwrite`` (delete it first) or ``checkpoint.resume``.
    """
    try:
        # overwrite=True: a run may write into its own directory (restarts and resumes); finished runs below
        ours = claim_dir(run_dir, PROGRAM, overwrite=True, sources=[cfg.data.shards, cfg.encoder.weights],
                         recognise=is_finetune_run)
        if ours and cfg.overwrite:
            shutil.rmtree(run_dir)
        elif ours and (run_dir / finished).is_file() and not cfg.checkpoint.resume:
            raise OutputExistsError(run_dir, f"a finished fine-tuning run ({finished}); choose a new run_dir, or "
                                             "overwrite=true to replace it")
    except OutputError as e:
        return e
    run_dir.mkdir(parents=True, exist_ok=True)
    write_marker(run_dir, PROGRAM)
    return None


def run_one(cfg: FinetuneConfig, data: TaskData | None = None) -> FinetuneResult:
    """One fine-tuning run (one seed) on however many ranks the process group has."""
    info = gdist.init_distributed(cfg.engine.timeout_s)
    run_dir = Path(cfg.run_dir)
    refused = gdist.broadcast_object(claim_run_dir(cfg, run_dir, "metrics.json") if info.is_main else None)
    if refused is not None:
        raise refused
    if info.is_main:
        save_yaml(cfg, run_dir / "config.yaml")
    gdist.barrier("run directory")
    t0 = time.time()
    seed_everything(cfg.seed)
    if data is None:
        data = cfg.data.build()
    gdist.print0(f"finetune: task {data.task}, {data.num_classes} classes ({', '.join(data.class_names)}), "
                 f"{len(data)} labelled samples in {len(data.scenes)} scene(s) from {data.source}")
    split = _split(cfg, data, run_dir)
    method = get_method(cfg.method.name)
    if isinstance(method, ClassicMethod):
        return _run_classic(cfg, method, data, split, t0)

    loaded = _encoder(cfg, method)
    base_state = {k: v.detach().cpu().clone() for k, v in loaded.model.state_dict().items()}
    encoder: Any = loaded.model
    num_rows = int(encoder.num_rows(data.tiles[0]))
    task_model = TaskModel(loaded.model, data.task, data.num_classes, cfg.head, data.window, data.num_bands, num_rows)
    model = apply_method(task_model, cfg.method)
    counts = parameter_counts(model)
    gdist.print0(_describe_method(cfg, method, model, counts))
    trainable = set(trainable_names(model))

    # the engine is typed on the pretraining config; FinetuneConfig carries the same engine sections
    engine_cfg = cast("TrainConfig", cfg)
    checkpoints = cfg.checkpoint.build(run_dir) if cfg.checkpoint.every > 0 else None
    resume = gdist.broadcast_object(resolve_resume(cfg.checkpoint.resume, run_dir) if info.is_main else None)
    universal = False
    if resume is not None and checkpoints is not None:
        meta = checkpoints.manager.read_meta(resume)
        universal = checkpoints.manager.needs_universal(meta, info.world_size, cfg.engine.zero_stage,
                                                        cfg.engine.precision)
        if universal:
            checkpoints.manager.make_universal(resume)
    module = TrainModule(model, engine_cfg, load_universal=universal)
    module.write_deepspeed_config(run_dir)
    loader = TaskLoader(data, split.train, cfg.data.batch_size, info.rank, info.world_size, cfg.seed,
                        (cfg.data.hflip, cfg.data.vflip, cfg.data.rot90))
    eval_bs = cfg.eval.batch_size or cfg.data.eval_batch_size
    callbacks: list[Callback] = [FinetuneMetrics(run_dir)]
    if cfg.eval.every:
        callbacks.append(ValidationCallback(data, split, cfg.eval.every, eval_bs, run_dir))
    if checkpoints is not None:
        callbacks.append(checkpoints)
    trainer = Trainer(engine_cfg, module, loader, callbacks, run_dir)
    if resume is not None and checkpoints is not None:
        trainer.restore(checkpoints.manager.load(module.engine, resume, universal))
        gdist.print0(f"resumed from {resume} at step {trainer.step}")
    else:
        loader.set_epoch(0)
    trainer.fit()
    train_s = time.time() - t0

    # fp32 tensors of what trained (a collective: every rank iterates), written by rank 0
    trained = {n: t for n, t in module.named_fp32_parameters() if n in trainable}
    doc = artifacts.manifest(
        task=data.task, class_names=data.class_names, label_values=data.label_values, window=data.window,
        num_bands=data.num_bands, num_rows=num_rows, head=cfg.head, method=cfg.method, arch=loaded.arch,
        source=loaded.source, fp=loaded.fingerprint,
        description=loaded.description, counts=counts, pretrained=loaded.name, bands=data.bands,
    )
    if info.is_main:
        files = artifacts.save_outputs(run_dir, doc, trained, base_state, merge=cfg.merge)
        gdist.print0(f"wrote {', '.join(sorted(files.values()))}")
    gdist.barrier("outputs written")

    # evaluate the model as loaded back from the files
    reloaded = artifacts.load_finetuned(run_dir).to(info.device)
    ev = evaluate(reloaded, data, split.test, eval_bs, dropped_classes=split.dropped_classes, maps=cfg.eval.maps)
    doc_metrics = _metrics_doc(cfg, data, split, ev, loaded.description, counts, cfg.steps, train_s, t0)
    if info.is_main:
        _write_metrics(cfg, data, split, ev, doc_metrics)
    gdist.barrier("metrics written")
    return FinetuneResult(run_dir, doc_metrics, split, module.model, data)


def _metrics_doc(cfg: FinetuneConfig, data: TaskData, split: Split, ev: Evaluation, encoder: str,
                 counts: dict[str, Any], steps: int | None, train_s: float, t0: float) -> dict[str, Any]:
    """The ``metrics.json`` document, the same keys for every method."""
    return {
        "task": data.task, "method": cfg.method.name, "seed": cfg.seed, "steps": steps,
        "encoder": encoder, "parameters": counts,
        "trainable_fraction": counts["trainable"] / max(1, counts["total"]),
        "class_names": data.class_names, "split": {k: v for k, v in split.report.items() if k != "per_class_samples"},
        "test": ev.metrics, "train_seconds": train_s, "seconds": time.time() - t0,
    }


def _write_metrics(cfg: FinetuneConfig, data: TaskData, split: Split, ev: Evaluation, doc: dict[str, Any]) -> None:
    """``metrics.json``, the pictures and the test figures' line (rank 0)."""
    run_dir = Path(cfg.run_dir)
    atomic_write(run_dir / "metrics.json", json.dumps(doc, indent=1) + "\n")
    title = f"{data.task} · {cfg.method.name} · seed {cfg.seed}"
    pictures = _maps_and_pictures(run_dir, data, split, ev, title) if cfg.eval.maps else []
    m = ev.metrics
    figures = " ".join(f"{k} {m[k]:.4f}" for k in ("oa", "aa", "kappa", "macro_f1", "miou", "micro_f1")
                       if isinstance(m.get(k), float))
    gdist.print0(f"test ({m['samples']} samples): {figures}")
    gdist.print0(f"wrote {run_dir / 'metrics.json'}" + (f", {', '.join(pictures)}" if pictures else ""))


def _run_classic(cfg: FinetuneConfig, method: ClassicMethod, data: TaskData, split: Split,
                 t0: float) -> FinetuneResult:
    """A classic baseline on the run's samples and split: fit, predict the test split, score, write (no model).

    One process only: the fit is scikit-learn's (``method.classic.n_jobs`` workers), not the ranks'.
    """
    info = gdist.info()
    if info.world_size > 1:
        raise classic.ClassicError(f"method {method.name} is a classic baseline fitted in one process; run it "
                                   f"without torchrun (world size is {info.world_size})")
    run_dir = Path(cfg.run_dir)
    settings = cfg.method.classic
    gdist.print0(f"method {method.name}: a classic baseline on the samples' pixel values; encoder, head, optim, "
                 "schedule, engine, checkpoint, guard, steps and augmentation settings are ignored")
    gdist.print0(f"method {method.name}: {method.describe(cfg.method, None, cfg.optim.layer_decay)}")
    batch_size = cfg.eval.batch_size or cfg.data.eval_batch_size
    fitted = classic.fit(method, settings, data, split.train, cfg.seed, batch_size)
    train_s = time.time() - t0
    size = fitted.size()
    gdist.print0(f"fitted {method.name} on {fitted.samples:,} training samples of {fitted.features:,} values in "
                 f"{train_s:.1f} s: {', '.join(f'{k} {v:,}' for k, v in size.items()) or 'constant targets'}")
    targets, preds = classic.predict(fitted, data, split.test, settings.features, batch_size)
    ev = score(data, split.test, targets, preds, dropped_classes=split.dropped_classes, maps=cfg.eval.maps)
    counts: dict[str, Any] = {"trainable": 0, "total": 0, "fitted": size}  # no network parameter
    encoder = (f"none: classic baseline {method.name} on {settings.features} features "
               f"({fitted.features} values per sample)")
    doc_metrics = _metrics_doc(cfg, data, split, ev, encoder, counts, None, train_s, t0)
    estimator = " ".join(str(fitted.model).split())
    doc = artifacts.classic_manifest(
        task=data.task, class_names=data.class_names, label_values=data.label_values, window=data.window,
        num_bands=data.num_bands,
        method=cfg.method, estimator=estimator,
        fitted={"samples": fitted.samples, "features": fitted.features, **size},
    )
    atomic_write(run_dir / artifacts.MANIFEST, json.dumps(doc, indent=1) + "\n")
    gdist.print0(f"wrote {run_dir / artifacts.MANIFEST} (no model file: {artifacts.CLASSIC_NOTE})")
    _write_metrics(cfg, data, split, ev, doc_metrics)
    return FinetuneResult(run_dir, doc_metrics, split, None, data)


def _finished_seed(cfg: FinetuneConfig) -> dict[str, Any] | None:
    """The ``metrics.json`` of ``cfg.run_dir`` when a run of exactly this config finished there, else None."""
    run_dir = Path(cfg.run_dir)
    if cfg.overwrite or not (run_dir / "metrics.json").is_file() or not (run_dir / "split.json").is_file():
        return None
    try:
        same = yaml.safe_load((run_dir / "config.yaml").read_text()) == yaml.safe_load(dump_yaml(cfg))
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    return metrics if same and isinstance(metrics, dict) and "test" in metrics else None


def run(cfg: FinetuneConfig) -> FinetuneResult:
    """Fine-tune as ``cfg`` says: one run, or one per ``cfg.seeds`` plus ``summary.json`` (mean ± std)."""
    if not cfg.seeds:
        return run_one(cfg)
    info = gdist.init_distributed(cfg.engine.timeout_s)
    refused = gdist.broadcast_object(claim_run_dir(cfg, Path(cfg.run_dir), "summary.json") if info.is_main else None)
    if refused is not None:
        raise refused
    data = cfg.data.build()
    results = []
    for s in cfg.seeds:
        one = replace(cfg, seed=s, seeds=[], run_dir=str(Path(cfg.run_dir) / f"seed_{s}"))
        done = gdist.broadcast_object(_finished_seed(one) if info.is_main else None)
        if done is not None:  # an interrupted multi-seed run continues where it stopped
            gdist.print0(f"\n=== seed {s}: finished earlier with this config, kept ({one.run_dir}/metrics.json) ===")
            results.append(FinetuneResult(Path(one.run_dir), done, load_split(Path(one.run_dir) / "split.json",
                                                                             data.windows), None, data))
            continue
        gdist.print0(f"\n=== seed {s} ===")
        results.append(run_one(one, data))
        results[-1].model = None  # keep memory flat over seeds
    summary = {
        "runs": [str(r.run_dir) for r in results],
        "seeds": list(cfg.seeds),
        "method": cfg.method.name,
        "parameters": results[0].metrics["parameters"],
        "test": summarize([r.metrics["test"] for r in results]),
    }
    if gdist.is_main():
        atomic_write(Path(cfg.run_dir) / "summary.json", json.dumps(summary, indent=1) + "\n")
        figures = " ".join(f"{k} {100 * v['mean']:.2f} ± {100 * v['std']:.2f}" for k, v in summary["test"].items()
                           if k in ("oa", "aa", "kappa", "macro_f1", "miou"))
        gdist.print0(f"\nover seeds {cfg.seeds}: {figures} (%)\nwrote {Path(cfg.run_dir) / 'summary.json'}")
    return FinetuneResult(Path(cfg.run_dir), summary, results[-1].split, None, data, results)
