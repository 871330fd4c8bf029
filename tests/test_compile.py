"""``engine.compile``: a compiled run follows the eager run's losses, block by block or whole model.

Each run is a real pretraining run in a fresh process (``gfm.train.run``, DeepSpeed on CPU, gloo, the
synthetic Sentinel-2 stream) with the worker at the bottom of this file: a small HyperMAE on LESS
blocks (regional compilation, one compiled graph per block shape) or the training tests' TinyMAE
(no gfm blocks: DeepSpeed's ``engine.compile()`` compiles the whole module).

Tolerance: both runs are fp32 with the same seeds, data and masks. Inductor fuses elementwise chains
and reorders reductions (LayerNorm, softmax, the loss sums), so a forward differs from eager by a few
fp32 ulps (~1e-7 relative); AdamW's first steps move each weight by about ``lr`` whatever the
gradient's size, so such differences enter the weights at ~1e-7 × lr and the loss after 4 steps moves
by far less than 1e-5 relative. The bound 1e-4 leaves room for the summation order yet fails for any
real difference (a different mask, a skipped term, a wrong block: the loss changes in the 2nd digit).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from gfm.batch import Batch  # noqa: E402
from gfm.model import LESSViT, fused  # noqa: E402
from gfm.model.attention import Block  # noqa: E402
from gfm.model.mae import HyperMAE  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                                reason="inductor on CPU needs a C++ compiler (g++ / $CXX)")

RTOL = 1e-4
STEPS = 4
COMMON = [
    f"steps={STEPS}", "seed=0", "data.source=synthetic", "data.synthetic.num_bands=5", "data.synthetic.tile=16",
    "data.synthetic.batch_size=4", "engine.zero_stage=1", "engine.precision=fp32", "schedule.warmup_steps=1",
    "optim.lr=1e-3", "checkpoint.every=0", "checkpoint.export=false", "logging.every=1",
    "logging.progress=false", "logging.tensorboard=false", "logging.peak_flops=1e9",
]


def small_mae() -> HyperMAE:
    """A HyperMAE on LESS blocks small enough to compile in seconds: 1 encoder and 1 decoder block."""
    torch.manual_seed(0)
    enc = LESSViT(embed_dim=32, depth=1, num_heads=2, rank=2, spectral_head_dim=2, patch_size=4,
                  perception_radius_m=100.0)
    return HyperMAE(enc, decoder_dim=16, decoder_depth=1, decoder_num_heads=2, decoder_rank=1,
                    decoder_spectral_head_dim=2)


def worker(argv: list[str]) -> int:
    """One run: ``argv[0]`` is ``less`` (small HyperMAE) or ``tiny`` (TinyMAE); the rest are overrides."""
    from gfm.config import load
    from gfm.train.config import TrainConfig
    from gfm.train.runner import run_guarded
    from tests.test_train_helpers import TinyMAE

    cfg = load(TrainConfig, None, argv[1:])
    torch.manual_seed(cfg.seed)
    model = small_mae() if argv[0] == "less" else TinyMAE()
    return run_guarded(cfg, model=model, prog="test_compile")


def _run(tmp: Path, model: str, *extra: str) -> dict[int, float]:
    run_dir = tmp / "_".join([model, *extra]).replace("=", "-").replace(".", "-")
    cmd = [sys.executable, str(Path(__file__)), model, *COMMON, f"run_dir={run_dir}", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu")
    env.pop("RANK", None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


@pytest.mark.slow
@pytest.mark.parametrize("model", ["less", "tiny"])
def test_compiled_run_follows_eager_losses(tmp_path: Path, model: str) -> None:
    eager = _run(tmp_path, model)
    compiled = _run(tmp_path, model, "engine.compile=true")
    assert sorted(eager) == sorted(compiled) == list(range(1, STEPS + 1))
    assert len(set(eager.values())) == STEPS  # the losses move, so equal values mean something
    for step in eager:
        assert abs(compiled[step] - eager[step]) <= RTOL * abs(eager[step]), (step, compiled, eager)


def _batch(C: int, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(
        pixels=torch.randn(2, C, 16, 16, generator=g),
        wavelength=torch.linspace(450.0, 2300.0, C).repeat(2, 1),
        bandwidth=torch.full((2, C), 20.0),
        kind=torch.zeros(2, C, dtype=torch.long),
        time=torch.full((2, C), 19000.0),
        valid=torch.ones(2, C, 16, 16, dtype=torch.bool),
        gsd=torch.full((2,), 10.0),
    )


@pytest.mark.slow
def test_compiled_blocks_follow_eager_as_the_band_count_changes() -> None:
    """Regional compilation with the default ``dynamic=None``: C = 5, 7, 9, 4 give eager's outputs and
    gradients, and after the first change of shape the blocks run one symbolic graph (no recompiles).

    Dynamo's graphs and guards are what decide recompiles, so the ``aot_eager`` backend (the same
    graphs, forward and backward, run without inductor's C++ code generation) keeps this test fast;
    inductor's numerics are checked by the runs above."""
    from torch._dynamo.utils import counters

    from gfm.config import load
    from gfm.train.engine_config import EngineConfig
    from gfm.train.module import compile_model

    torch._dynamo.reset()
    eager, compiled = small_mae(), small_mae()
    cfg = load(EngineConfig, None, ["compile=true"])
    regions = compile_model(None, compiled, cfg, backend="aot_eager")
    assert regions == sum(isinstance(m, Block) for m in compiled.modules()) == 2
    graphs = []
    for C in (5, 7, 9, 4):
        batch = _batch(C, C)
        outs = []
        for model in (eager, compiled):
            model.zero_grad()
            with fused.use_fused(False):  # compiled blocks run the reference path: compare like with like
                out = model(batch, generator=torch.Generator().manual_seed(C))
            out.loss.backward()
            outs.append((out.loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
        torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-6, atol=1e-7)
        for g_c, g_e in zip(outs[1][1], outs[0][1]):
            torch.testing.assert_close(g_c, g_e, rtol=1e-5, atol=1e-7)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[-1] == graphs[1] > graphs[0] > 0  # C = 9 and 4 reuse the symbolic graphs of C = 7


def test_compile_refused_with_zero3() -> None:
    from gfm.config import ConfigError, load
    from gfm.train.engine_config import EngineConfig

    with pytest.raises(ConfigError, match="compile: not supported with zero_stage 3"):
        load(EngineConfig, None, ["compile=true", "zero_stage=3"])


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1:]))
