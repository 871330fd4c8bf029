"""The train module: model + optimizer + DeepSpeed engine, and one optimizer step over micro-batches.

The loop (:mod:`gfm.train.trainer`) decides when to step, log and save; this module decides how a step is
computed. Any ``nn.Module`` whose ``forward(batch, generator=...)`` returns an object (or mapping) with a
scalar ``loss`` can be trained; further scalar ``loss_*`` entries are reported as loss terms.

Non-finite values: a non-finite loss makes the gradients non-finite (the loss is still back-propagated,
which keeps DeepSpeed's micro-step bookkeeping and collectives identical on every rank). DeepSpeed's
ZeRO/bf16 optimizers and :class:`~gfm.train.optim.NonFiniteSkippingAdamW` check the reduced gradients,
which are non-finite on every rank as soon as one rank's are, and skip the update everywhere; the step is
then reported as skipped.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gfm import distributed as gdist
from gfm.batch import Batch
from gfm.train.config import TrainConfig
from gfm.train.engine_config import EngineConfig


@dataclass
class StepResult:
    """What one optimizer step produced (already reduced over ranks).

    Attributes:
        step: the 0-based optimizer step this was.
        loss: mean loss over micro-batches and ranks (non-finite when any was).
        terms: further loss terms (``loss_pos``, ``loss_obs``, ...), same averaging.
        grad_norm: global gradient norm before clipping (None when DeepSpeed does not report it).
        lr: learning rate used.
        skipped: True when the update was refused because of non-finite values.
        samples: samples in the step over all ranks.
        batches: the last micro-batch and model output of this rank, for pictures.
    """

    step: int
    loss: float
    terms: dict[str, float]
    grad_norm: float | None
    lr: float
    skipped: bool
    samples: int
    last_batch: Batch | None = None
    last_output: Any = None
    extra: dict[str, float] = field(default_factory=dict)


def _loss_terms(out: Any) -> dict[str, torch.Tensor]:
    items = out.items() if isinstance(out, Mapping) else vars(out).items()
    return {k: v for k, v in items if k.startswith("loss") and isinstance(v, torch.Tensor) and v.ndim == 0}


def compile_model(engine: Any, model: nn.Module, cfg: EngineConfig, backend: str = "inductor") -> int:
    """``torch.compile`` ``model`` inside its DeepSpeed ``engine`` as ``cfg`` says; returns the regions compiled.

    Regional compilation when the model is built of gfm transformer blocks
    (:class:`gfm.model.attention.Block`): each block is compiled in place. Blocks of one width share
    their code, so inductor compiles one graph per block shape and reuses it for every block; the
    embedding, masking and loss (host syncs, seeded RNG) stay eager instead of splitting the graph.
    Any other model is compiled whole through DeepSpeed's ``engine.compile()`` (returns 1).

    On CPU inductor writes C++ kernels: a missing compiler is reported here in one line rather than at
    the first step. ``backend`` is ``torch.compile``'s (tests use ``aot_eager`` to check graphs quickly).
    """
    from gfm.model.attention import Block

    device = next(model.parameters()).device
    if backend == "inductor" and device.type == "cpu" and shutil.which(os.environ.get("CXX", "g++")) is None:
        raise RuntimeError(f"engine.compile: inductor on CPU needs a C++ compiler; "
                           f"{os.environ.get('CXX', 'g++')!r} is not on PATH (set CXX, or engine.compile=false)")
    kwargs: dict[str, Any] = {"mode": cfg.compile_mode, "dynamic": cfg.compile_dynamic}
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    for block in blocks:
        block.compile(backend=backend, **kwargs)
    if blocks:
        return len(blocks)
    engine.compile(backend=backend, compile_kwargs=kwargs)
    return 1


class TrainModule:
    """A model wrapped in a DeepSpeed engine built from :class:`TrainConfig`."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, load_universal: bool = False) -> None:
        import deepspeed

        scalars = [name for name, p in model.named_parameters() if p.ndim == 0]
        if scalars:  # DeepSpeed broadcasts and flattens parameters as bytes, which a 0-dim tensor cannot be
            raise ValueError(f"DeepSpeed cannot train 0-dim parameters; give them shape [1]: {', '.join(scalars)}")
        self.cfg = cfg
        self.info = gdist.info()
        if self.info.device.type == "cuda":  # TF32 tensor cores for fp32 matmuls and convolutions (~10-bit mantissa)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        self.micro_batch = cfg.data.batch_size
        self.effective_batch = self.micro_batch * cfg.engine.grad_accum * self.info.world_size
        self.peak_lr = cfg.optim.peak_lr(self.effective_batch)
        self.ds_config = cfg.engine.deepspeed_config(self.micro_batch, self.info.world_size, load_universal)
        optimizer = cfg.optim.build(model, self.peak_lr)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.ds_config
        )
        self.model = model
        self.compiled_regions = compile_model(self.engine, model, cfg.engine) if cfg.engine.compile else 0
        self._takes_generator = "generator" in inspect.signature(model.forward).parameters
        self.autocast_dtype = torch.bfloat16 if cfg.engine.precision == "bf16" else None

    def write_deepspeed_config(self, run_dir: Path) -> Path:
        """Write the generated DeepSpeed JSON to the run directory (for reference; rank 0)."""
        path = run_dir / "deepspeed_config.json"
        if self.info.is_main:
            path.write_text(json.dumps(self.ds_config, indent=2) + "\n")
        return path

    def lr_at(self, step: int) -> float:
        """The learning rate of 0-based optimizer ``step``."""
        return self.peak_lr * self.cfg.schedule.factor(step, self.cfg.steps)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.info.device.type, dtype=self.autocast_dtype)

    def generator(self, step: int, micro: int) -> torch.Generator:
        """The masking RNG of (step, micro-batch, rank): a pure function of them, so resume is exact."""
        seed = (self.cfg.seed * 1_000_003 + step) * 1_009 + micro
        seed = seed * 65_537 + self.info.rank
        return torch.Generator(device=self.info.device).manual_seed(seed % (2**63 - 1))

    def forward(self, batch: Batch, step: int, micro: int) -> Any:
        """The model output for ``batch`` (autocast in bf16 runs)."""
        with self._autocast():
            if self._takes_generator:
                return self.engine(batch, generator=self.generator(step, micro))
            return self.engine(batch)

    def train_step(self, micro_batches: Sequence[Batch], step: int) -> StepResult:
        """Forward/backward over ``micro_batches`` (one per accumulation micro-step) and one update."""
        if len(micro_batches) != self.cfg.engine.grad_accum:
            raise ValueError(f"expected {self.cfg.engine.grad_accum} micro-batches, got {len(micro_batches)}")
        lr = self.lr_at(step)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self.engine.train()
        sums: dict[str, torch.Tensor] = {}
        out: Any = None
        batch: Batch | None = None
        for micro, cpu_batch in enumerate(micro_batches):
            batch = cpu_batch.to(self.info.device)
            out = self.forward(batch, step, micro)
            terms = _loss_terms(out)
            loss = terms["loss"]
            self.engine.backward(loss)
            self.engine.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, torch.zeros((), dtype=torch.float64)) + v.detach().double().cpu()
        names = sorted(sums)
        local = torch.stack([sums[k] for k in names]) / len(micro_batches)
        means = gdist.all_reduce_sum_tensor(local) / self.info.world_size
        reduced = dict(zip(names, means.tolist()))
        skipped = not self.engine.was_step_applied()
        norm = self.engine.get_global_grad_norm()
        grad_norm = None if norm is None else float(norm)
        return StepResult(
            step=step,
            loss=reduced.pop("loss"),
            terms=reduced,
            grad_norm=grad_norm,
            lr=lr,
            skipped=skipped,
            samples=self.micro_batch * len(micro_batches) * self.info.world_size,
            last_batch=batch,
            last_output=out,
        )

    def named_fp32_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, full fp32 tensor on CPU) for every parameter; collective under ZeRO-3 (all ranks call)."""
        from deepspeed.utils import safe_get_full_fp32_param

        for name, p in self.model.named_parameters():
            full = safe_get_full_fp32_param(p)
            tensor = p.detach() if full is None else full
            yield name, tensor.float().cpu().clone()
