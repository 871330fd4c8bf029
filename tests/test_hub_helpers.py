"""Test fixtures for the export tests: a pretraining worker that records the training-time model's output.

This file holds no tests. It builds the fixtures the export, inference and embedding tests share (a run
directory made by hand, a fine-tuning run made with ``gfm.finetune``'s own save path) and is the worker
the multi-rank export tests start: ``python tests/test_hub_helpers.py --reference OUT.safetensors key=value ...``
(or under ``torchrun``) runs :func:`gfm.train.runner.run_guarded` with the model the config names (a real
registered model, so an export can rebuild it from the config) and, after the last checkpoint, runs the
DeepSpeed engine's module in eval mode on a fixed batch on every rank (ZeRO-3 gathers its partitions) and
has rank 0 save that batch and the output as safetensors: what an export must reproduce exactly.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from gfm.batch import Batch  # noqa: E402

# the L8-like bands of tests/helpers_shards.py
WAVELENGTHS = [482.0, 561.4, 654.6]
BANDWIDTHS = [60.0, 57.0, 37.0]


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread, as the fresh processes of the tests do (CPU kernels reduce in a
    thread-count-dependent order, so bit-exact comparisons need the same count on both sides)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def make_run_dir(root: Path, patch_size: int = 4, depth: int | None = None) -> Path:
    """A pretraining run directory by hand: shards + index.json, config.yaml, model.safetensors, metrics.

    ``depth``: encoder blocks (None = the tiny variant's 12; fewer for a smaller model)."""
    import json

    import yaml
    from safetensors.torch import save_file

    from gfm.config import to_dict
    from gfm.model.registry import ModelConfig
    from tests.helpers_shards import write_dataset

    root.mkdir(parents=True, exist_ok=True)
    write_dataset(str(root / "data"), [4, 4], size=16)
    mc = ModelConfig(name="hypermae_less_tiny", patch_size=patch_size, depth=depth)
    cfg = {
        "run_dir": str(root), "steps": 3, "seed": 0,
        "data": {"source": "shards", "loader": {"shards": str(root / "data"), "crop_size": 16}},
        "model": to_dict(mc), "engine": {"zero_stage": 1, "precision": "fp32"},
    }
    torch.manual_seed(0)
    net = mc.build().eval()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(root / "model.safetensors"),
              metadata={"format": "pt", "step": "3", "config": yaml.safe_dump(cfg)})
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    (root / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)))
    return root


def make_finetune_run(
    base_export: Path, run_dir: Path, *, task: str = "segmentation", method: str = "lora", classes: int = 3,
    window: int = 0, seed: int = 0, bands: dict[str, Any] | None = None,
) -> tuple[Path, Any]:
    """A ``gfm finetune`` run directory written by ``gfm.finetune.artifacts.save_outputs``, without training.

    The LoRA B matrices and the head get random values (a fresh LoRA is the identity), so the adapter
    visibly changes the predictions. ``bands``: the band table the fine-tuning data was normalised with
    (``finetune.json`` ``bands``). Returns the run directory and the fine-tuned model in memory (a
    ``peft.PeftModel`` for LoRA) to compare against.
    """
    import copy
    import json

    import peft

    from gfm.finetune.artifacts import manifest, save_outputs, task_model
    from gfm.finetune.methods import LoraConfig, MethodConfig, apply_method
    from gfm.finetune.model import HeadConfig
    from gfm.finetune.weights import fingerprint
    from gfm.hub import from_pretrained

    base = from_pretrained(base_export)
    encoder = copy.deepcopy(base.encoder)
    base_state = {k: v.clone() for k, v in encoder.state_dict().items()}
    mcfg = MethodConfig(name=method, lora=LoraConfig(targets=["attention", "mlp"], rank=2, alpha=4))  # type: ignore[arg-type]
    doc = manifest(
        task=task, class_names=[f"class{i}" for i in range(classes)], label_values=list(range(1, classes + 1)),
        window=window, num_bands=3, num_rows=3,  # reference_batch's three observations, one token row each
        head=HeadConfig(), method=mcfg, arch={"model_config": base.config["model"]},
        source=str(base_export), fp=fingerprint(encoder), description="test", counts={"total": 0, "trainable": 0},
        bands=bands,
    )
    g = torch.Generator().manual_seed(seed)
    model = apply_method(task_model(doc, encoder), mcfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_B" in name or "task_head" in name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    run_dir.mkdir(parents=True, exist_ok=True)
    save_outputs(run_dir, doc, trained, base_state, merge=method == "lora")
    (run_dir / "metrics.json").write_text(json.dumps({
        "task": task, "method": method, "seed": seed, "steps": 10,
        "test": {"oa": 0.5, "aa": 0.25, "kappa": 0.1, "samples": 40, "per_class_f1": {"class0": 0.5}},
    }))
    model.eval()
    assert isinstance(model, peft.PeftModel) == (method == "lora")
    return run_dir, model


def reference_batch(size: int = 16) -> Batch:
    """A fixed, normalised batch of 2 tiles × 3 observations with some invalid pixels and known dates."""
    g = torch.Generator().manual_seed(1234)
    pixels = torch.randn(2, 3, size, size, generator=g)
    valid = torch.rand(2, 3, size, size, generator=g) > 0.1
    return Batch(
        pixels=torch.where(valid, pixels, torch.zeros_like(pixels)),
        wavelength=torch.tensor([WAVELENGTHS] * 2),
        bandwidth=torch.tensor([BANDWIDTHS] * 2),
        kind=torch.zeros(2, 3, dtype=torch.int64),
        time=torch.tensor([[16651.0] * 3, [math.nan] * 3]),
        valid=valid,
        gsd=torch.tensor([30.0, 30.0]),
    )


def forward(model: Any, batch: Batch) -> torch.Tensor:
    """The model's deterministic output on ``batch``: HyperMAE prediction with a fixed masking generator."""
    with torch.no_grad():
        out = model(batch, generator=torch.Generator().manual_seed(7))
    return out.pred if hasattr(out, "pred") else out


def _pytorch_linear() -> Any:
    """PyTorch's own ``torch.nn.functional.linear`` (DeepSpeed keeps it when it patches the function)."""
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses

    return getattr(InsertPostInitMethodToModuleSubClasses, "linear_bk", torch.nn.functional.linear)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--reference", required=True, help="where rank 0 saves the batch and the output")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    from safetensors.torch import save_file

    from gfm import distributed as gdist
    from gfm.config import load
    from gfm.train.config import TrainConfig
    from gfm.train.runner import run_guarded
    from gfm.train.trainer import Callback

    cfg = load(TrainConfig, None, args.overrides)

    class Reference(Callback):
        def on_end(self, trainer: Any) -> None:
            module = trainer.module.engine.module
            module.eval()
            batch = reference_batch()
            as_trained = forward(module, batch)  # every rank: ZeRO-3 gathers parameters collectively
            # At ZeRO-3 DeepSpeed replaces torch.nn.functional.linear process-wide by matmul + add (its
            # LinearFunctionForZeroStage3), which rounds differently from PyTorch's fused linear. The reference
            # is the same module and parameters with PyTorch's own linear, as a fresh process computes it.
            linear = torch.nn.functional.linear
            original = _pytorch_linear()
            torch.nn.functional.linear = original
            try:
                pred = forward(module, batch)
            finally:
                torch.nn.functional.linear = linear
            if gdist.is_main():
                tensors = {k: v.contiguous() for k, v in batch.tensors().items()}
                save_file({**tensors, "pred": pred.contiguous(), "pred_as_trained": as_trained.contiguous()},
                          args.reference)

    return run_guarded(cfg, extra_callbacks=[Reference()], prog="hub worker")


if __name__ == "__main__":
    sys.exit(main())
