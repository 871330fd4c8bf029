"""The DeepSpeed side of a run as a typed config; the DeepSpeed JSON is generated from it, never edited."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from gfm.config import ConfigError


@dataclass
class EngineConfig:
    """Parallelism, precision and gradient handling.

    Attributes:
        zero_stage: ZeRO stage 0-3 (0 = plain data parallel; 1 shards optimizer state, 2 also
            gradients, 3 also parameters).
        precision: ``bf16`` (bf16 compute and communication, fp32 master weights) or ``fp32``.
        grad_accum: micro-batches per optimizer step; gradients accumulate in fp32.
        grad_clip: global gradient-norm clip (0 disables).
        timeout_s: collective timeout; a rank that does not arrive within it ends the run with an error.
        deepspeed: extra DeepSpeed JSON keys merged last (e.g. ``zero_optimization.overlap_comm``),
            for knobs this config does not model.
        compile: ``torch.compile`` the model (inductor: C++ kernels on CPU, Triton on GPU). A model
            built of gfm transformer blocks is compiled block by block (regional compilation: the
            embedding, masking and loss, with their host syncs and RNG, stay eager); any other model
            whole, through DeepSpeed's ``engine.compile()``. See docs/train.md for measurements.
        compile_mode: ``torch.compile`` mode: ``default``; ``reduce-overhead`` adds CUDA graphs on GPU
            (one graph per input shape); ``max-autotune`` / ``max-autotune-no-cudagraphs`` tune kernels
            longer.
        compile_dynamic: ``torch.compile``'s ``dynamic``: None compiles the first shapes statically
            and recompiles once with symbolic sizes when a size changes (band count between buckets,
            kept rows under observation masking); True starts symbolic; False recompiles per shape.
    """

    zero_stage: int = 1
    precision: Literal["bf16", "fp32"] = "bf16"
    grad_accum: int = 1
    grad_clip: float = 1.0
    timeout_s: float = 600.0
    deepspeed: dict[str, Any] = field(default_factory=dict)
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    compile_dynamic: bool | None = None

    def validate(self) -> None:
        """Check values; raises :class:`ConfigError` naming the field."""
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.grad_accum < 1:
            raise ConfigError(f"grad_accum: must be >= 1, got {self.grad_accum}")
        if self.grad_clip < 0:
            raise ConfigError(f"grad_clip: must be >= 0, got {self.grad_clip}")
        if self.timeout_s <= 0:
            raise ConfigError(f"timeout_s: must be > 0, got {self.timeout_s}")
        if self.compile and self.zero_stage == 3:
            raise ConfigError("compile: not supported with zero_stage 3 (ZeRO-3 gathers parameters in module "
                              "hooks that a compiled block would trace); use zero_stage 1 or 2, or compile: false")

    def deepspeed_config(self, micro_batch: int, world_size: int, load_universal: bool = False) -> dict[str, Any]:
        """The DeepSpeed JSON for ``micro_batch`` samples per rank per micro-step on ``world_size`` ranks.

        The optimizer and lr schedule are not in it: the optimizer is built by :class:`OptimConfig`
        (torch AdamW, no fused kernels needed) and the lr is set each step from :class:`ScheduleConfig`.
        """
        zero: dict[str, Any] = {"stage": self.zero_stage}
        if self.zero_stage >= 1:
            zero.update(contiguous_gradients=True, overlap_comm=False, reduce_scatter=True)
        cfg: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": self.grad_accum,
            "train_batch_size": micro_batch * self.grad_accum * world_size,
            "gradient_clipping": self.grad_clip,
            "zero_optimization": zero,
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": self.precision == "bf16"},
            "steps_per_print": 2**31 - 1,  # our own metrics callback reports
            "wall_clock_breakdown": False,
            "checkpoint": {"load_universal": load_universal},
        }
        if self.precision == "bf16":
            cfg["data_types"] = {"grad_accum_dtype": "fp32"}
        return _merge(cfg, self.deepspeed)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
