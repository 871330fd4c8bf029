"""What happens around the step: metrics, checkpoints, pictures, each a :class:`~gfm.train.trainer.Callback`.

Built from their config sections (``LoggingConfig.build``, ``CheckpointConfig.build``); the loop itself
never names them.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from gfm import distributed as gdist
from gfm.config import dump_yaml, to_dict
from gfm.train import flops as flops_mod
from gfm.train.checkpoint import CheckpointManager, rng_state
from gfm.train.module import StepResult
from gfm.train.trainer import Callback, Trainer


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
    return rss_kb / 2**20


class MetricsCallback(Callback):
    """Loss terms, lr, grad norm, throughput and FLOP utilisation → JSONL, TensorBoard and tqdm (rank 0).

    Throughput is averaged over the steps since the previous log line; ``flop_util`` is the achieved
    FLOP/s of all ranks over ``world_size ×`` the per-rank peak (measured by a matmul probe on every
    rank at start, or given as ``logging.peak_flops``).
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.jsonl: Any = None
        self.tb: Any = None
        self.bar: Any = None
        self.peak = 0.0
        self._t0 = 0.0
        self._samples = 0
        self._tokens = 0
        self._flops = 0.0
        self._steps = 0

    def on_start(self, trainer: Trainer) -> None:
        """Open the outputs; measure the peak FLOP/s unless configured."""
        cfg = trainer.cfg.logging
        info = gdist.info()
        if cfg.peak_flops > 0:
            self.peak = cfg.peak_flops
        else:
            gdist.barrier("peak FLOP/s probe")  # all ranks probe together: the figure includes contention
            dtype = torch.bfloat16 if trainer.cfg.engine.precision == "bf16" else torch.float32
            peak = flops_mod.measure_peak_flops(info.device, dtype)
            self.peak = gdist.all_reduce_sum(peak) / info.world_size
        if info.is_main:
            self.jsonl = (self.run_dir / "metrics.jsonl").open("a")
            if cfg.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=trainer.step)
            if cfg.progress:
                from tqdm import tqdm

                self.bar = tqdm(total=trainer.cfg.steps, initial=trainer.step, desc="pretrain",
                                dynamic_ncols=True, file=sys.stderr)
        self._t0 = time.perf_counter()

    def on_step(self, trainer: Trainer, result: StepResult) -> None:
        """Called after every optimizer step."""
        model, info = trainer.module.model, gdist.info()
        if result.last_batch is not None:
            per_micro = result.samples // max(1, trainer.cfg.engine.grad_accum)
            scale = per_micro / max(1, result.last_batch.size)  # last batch is one rank's micro-batch
            accum = trainer.cfg.engine.grad_accum
            self._tokens += int(flops_mod.tokens_in(model, result.last_batch) * scale * accum)
            step_flops = flops_mod.train_flops(model, result.last_batch)
            self._flops += (step_flops or 0.0) * scale * accum
        self._samples += result.samples
        self._steps += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{result.lr:.2e}", refresh=False)
        if trainer.step % trainer.cfg.logging.every and trainer.step != trainer.cfg.steps:
            return
        dt = max(time.perf_counter() - self._t0, 1e-9)
        row: dict[str, Any] = {
            "step": trainer.step,
            "loss": result.loss,
            **result.terms,
            "lr": result.lr,
            "grad_norm": result.grad_norm,
            "skipped": result.skipped,
            "nonfinite_total": trainer.nonfinite_total,
            "samples_per_s": self._samples / dt,
            "tokens_per_s": self._tokens / dt,
            "flops_per_s": self._flops / dt,
            "flop_util": self._flops / dt / (self.peak * info.world_size) if self.peak else None,
            "peak_flops_per_rank": self.peak,
            "memory_gb": _memory_gb(info.device),
            "epoch": trainer.epoch,
            "time": time.time(),
        }
        if info.is_main:
            clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
            clean["loss_finite"] = math.isfinite(result.loss)
            self.jsonl.write(json.dumps(clean) + "\n")
            self.jsonl.flush()
            if self.tb is not None:
                for k, v in row.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time"):
                        self.tb.add_scalar(f"train/{k}", v, trainer.step)
        self._t0, self._samples, self._tokens, self._flops, self._steps = time.perf_counter(), 0, 0, 0.0, 0

    def on_end(self, trainer: Trainer) -> None:
        """Close the outputs; draw the loss curve (``loss_curve.png``) on rank 0."""
        for closer in (self.bar, self.tb, self.jsonl):
            if closer is not None:
                closer.close()
        metrics = self.run_dir / "metrics.jsonl"
        if gdist.is_main() and metrics.exists():
            from gfm.train.pictures import plot_loss_curve

            plot_loss_curve(metrics, self.run_dir / "loss_curve.png")


class CheckpointCallback(Callback):
    """Checkpoint every ``checkpoint.every`` steps and at the end; export fp32 safetensors at the end."""

    def __init__(self, manager: CheckpointManager) -> None:
        self.manager = manager
        self.last_saved = -1

    def save(self, trainer: Trainer) -> Path:
        """Write a checkpoint of the trainer's current state (all ranks)."""
        cfg = trainer.cfg
        data_state = trainer.data_state()
        client = {
            "step": trainer.step,
            "epoch": trainer.epoch,
            "nonfinite_total": trainer.nonfinite_total,
            "data_state": data_state,
            "config": to_dict(cfg),
        }
        rank_state = {"data_state": data_state, "rng": rng_state(), "epoch": trainer.epoch}
        meta = {"zero_stage": cfg.engine.zero_stage, "precision": cfg.engine.precision,
                "effective_batch": trainer.module.effective_batch}
        path = self.manager.save(trainer.module.engine, trainer.step, client, rank_state, meta, dump_yaml(cfg))
        self.last_saved = trainer.step
        gdist.print0(f"checkpoint: {path}")
        return path

    def on_step(self, trainer: Trainer, result: StepResult) -> None:
        """Called after every optimizer step."""
        every = trainer.cfg.checkpoint.every
        if every and trainer.step % every == 0 and trainer.step < trainer.cfg.steps:
            self.save(trainer)

    def on_end(self, trainer: Trainer) -> None:
        """Called after the last step."""
        if self.last_saved != trainer.step:
            self.save(trainer)
        if trainer.cfg.checkpoint.export:
            export_safetensors(trainer, trainer.run_dir / "model.safetensors")


def export_safetensors(trainer: Trainer, path: Path) -> Path:
    """Consolidated fp32 weights of the whole model (encoder and decoder) as safetensors (all ranks call)."""
    from safetensors.torch import save_file

    tensors = dict(trainer.module.named_fp32_parameters())  # collective under ZeRO-3
    if gdist.is_main():
        metadata = {"format": "pt", "step": str(trainer.step), "config": dump_yaml(trainer.cfg)}
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        tmp.replace(path)
        gdist.print0(f"exported {len(tensors)} fp32 tensors to {path}")
    gdist.barrier("export")
    return path


class PicturesCallback(Callback):
    """Every ``logging.images_every`` steps, rank 0 writes ``images/step_XXXXXXXX.png``."""

    def on_step(self, trainer: Trainer, result: StepResult) -> None:
        """Called after every optimizer step."""
        every = trainer.cfg.logging.images_every
        if not every or trainer.step % every or not gdist.is_main():
            return
        out, batch = result.last_output, result.last_batch
        if batch is None or not hasattr(out, "reconstruction"):
            return
        from gfm.train.pictures import render

        path = trainer.run_dir / "images" / f"step_{trainer.step:08d}.png"
        render(batch, out, path, trainer.step, trainer.cfg.logging.image_nm)
