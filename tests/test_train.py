"""Training engine with real processes on the CPU (gloo, DeepSpeed): one rank, two ranks on ZeRO 1/2/3,
two "nodes", kill -9 and resume, a kill during a checkpoint write, resume on another rank count, NaN.

Every run uses the fixture model and worker of ``tests/test_train_helpers.py`` on the synthetic stream,
whose samples per optimizer step do not depend on the rank count, so runs with the same global batch
must follow the same loss trajectory.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HELPER = str(REPO / "tests" / "test_train_helpers.py")
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
STEPS = 8
COMMON = [
    f"steps={STEPS}", "seed=3",
    "data.source=synthetic", "data.synthetic.tile=16", "data.synthetic.num_bands=4",
    "data.synthetic.samples_per_epoch=48",  # 6 steps per epoch at global batch 8: crosses an epoch
    "optim.lr=1e-2", "optim.ref_batch=8", "schedule.warmup_steps=2",
    "engine.precision=bf16", "engine.grad_clip=1.0",
    "checkpoint.every=2", "checkpoint.keep=0",
    "logging.every=1", "logging.progress=false", "logging.tensorboard=false", "logging.peak_flops=1e9",
]
BF16_RTOL = 2e-2


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu")
    env.pop("RANK", None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_worker(run_dir: Path, *extra: str, nproc: int = 1, expect: int = 0, batch: int = 8) -> str:
    """Run the worker on ``nproc`` local ranks with a global batch of ``batch``; returns its output."""
    args = [HELPER, *COMMON, f"run_dir={run_dir}", f"data.synthetic.batch_size={batch // nproc}", *extra]
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", *args]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=REPO)
    out = proc.stdout + proc.stderr
    assert proc.returncode == expect, f"exit {proc.returncode} (wanted {expect}):\n{out[-4000:]}"
    return out


def losses(run_dir: Path) -> dict[int, float]:
    """Step → loss from metrics.jsonl (the last entry wins, as after a resume)."""
    out: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = row["loss"] if row["loss"] is not None else float("nan")
    return out


def assert_close(a: dict[int, float], b: dict[int, float], steps: range, rtol: float) -> None:
    for s in steps:
        assert abs(a[s] - b[s]) <= rtol * abs(b[s]), f"step {s}: {a[s]} vs {b[s]}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted single-process run: ZeRO 1, global batch 8, checkpoints every 2 steps."""
    run_dir = tmp_path_factory.mktemp("reference")
    run_worker(run_dir, "engine.zero_stage=1")
    return run_dir


def test_single_process_outputs(reference: Path) -> None:
    rows = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(r["loss"] is not None and r["grad_norm"] is not None for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[-1]["epoch"] == 1  # the 6-step epoch rolled over
    for key in ("loss_pos", "loss_obs", "lr", "samples_per_s", "tokens_per_s", "flop_util", "memory_gb"):
        assert key in rows[-1]
    ds = json.loads((reference / "deepspeed_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 1 and ds["train_batch_size"] == 8
    assert ds["bf16"]["enabled"] and ds["data_types"]["grad_accum_dtype"] == "fp32"
    ckpts = sorted(p.name for p in (reference / "checkpoints").glob("step_*"))
    assert ckpts == [f"step_{s:08d}" for s in (2, 4, 6, 8)]
    for name in ckpts:
        assert (reference / "checkpoints" / name / "COMPLETE").is_file()
        assert (reference / "checkpoints" / name / "config.yaml").is_file()
    from safetensors.torch import load_file

    weights = load_file(str(reference / "model.safetensors"))
    assert {"embed.weight", "head.weight"} <= set(weights)
    assert all(str(t.dtype) == "torch.float32" for t in weights.values())


def test_resolved_config_in_run_dir_and_checkpoints_holds_every_default(reference: Path) -> None:
    import yaml

    from gfm.config import load
    from gfm.data import LoaderConfig
    from gfm.train.config import TrainConfig

    saved = yaml.safe_load((reference / "config.yaml").read_text())
    assert list(saved["data"]["loader"]) == list(LoaderConfig.__dataclass_fields__)  # all 19, in order
    assert set(saved) == set(TrainConfig.__dataclass_fields__)
    cfg = load(TrainConfig, reference / "config.yaml")
    assert cfg.steps == STEPS and cfg.data.synthetic.num_bands == 4
    in_checkpoint = yaml.safe_load((reference / "checkpoints" / f"step_{STEPS:08d}" / "config.yaml").read_text())
    assert in_checkpoint == saved


@pytest.mark.slow
def test_kill9_then_resume_auto_reproduces(reference: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_worker(run_dir, "engine.zero_stage=1", "--kill-after-step", "5", expect=-9)
    assert max(losses(run_dir)) == 5
    run_worker(run_dir, "engine.zero_stage=1", "checkpoint.resume=auto")
    ref, got = losses(reference), losses(run_dir)
    assert_close(got, ref, range(5, STEPS + 1), rtol=1e-6)  # resumed from step 4: steps 5.. recomputed


@pytest.mark.slow
def test_kill_during_checkpoint_write_keeps_previous(reference: Path, tmp_path: Path) -> None:
    from gfm.train.checkpoint import list_checkpoints, resolve_resume

    run_dir = tmp_path / "run"
    run_worker(run_dir, "engine.zero_stage=1", "--kill-in-checkpoint", "4", expect=-9)
    partial = run_dir / "checkpoints" / "step_00000004"
    assert partial.is_dir() and any(partial.glob("*.pt")) and not (partial / "COMPLETE").exists()
    assert resolve_resume("auto", run_dir) == run_dir / "checkpoints" / "step_00000002"
    run_worker(run_dir, "engine.zero_stage=1", "checkpoint.resume=auto")
    assert_close(losses(run_dir), losses(reference), range(3, STEPS + 1), rtol=1e-6)
    assert [s for s, _ in list_checkpoints(run_dir / "checkpoints")] == [2, 4, 6, 8]


def test_nan_steps_skipped_counted_then_stop(tmp_path: Path) -> None:
    # global batch 8, so samples 16..23 are step 3 and 32..47 steps 5 and 6
    run_dir = tmp_path / "run"
    out = run_worker(run_dir, "engine.zero_stage=0", "engine.precision=fp32", "guard.max_nonfinite=2",
                     "--nan-samples", "17,35,44", expect=3)
    rows = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    assert rows[3]["skipped"] and rows[3]["loss_finite"] is False and rows[3]["nonfinite_total"] == 1
    assert not rows[4]["skipped"] and rows[4]["loss_finite"] and rows[4]["nonfinite_total"] == 1
    assert rows[6]["nonfinite_total"] == 3 and 7 not in rows
    assert "2 steps in a row had a non-finite loss or gradient" in out


def _two_rank_dir(tmp_path_factory: pytest.TempPathFactory, stage: int) -> Path:
    run_dir = tmp_path_factory.mktemp(f"zero{stage}")
    run_worker(run_dir, f"engine.zero_stage={stage}", nproc=2)
    return run_dir


@pytest.fixture(scope="module")
def zero2_two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _two_rank_dir(tmp_path_factory, 2)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_two_ranks_match_one(reference: Path, tmp_path_factory: pytest.TempPathFactory, stage: int) -> None:
    run_dir = _two_rank_dir(tmp_path_factory, stage)
    assert_close(losses(run_dir), losses(reference), range(1, STEPS + 1), rtol=BF16_RTOL)
    assert (run_dir / "model.safetensors").is_file()


@pytest.mark.slow
def test_two_ranks_zero2_match_one(reference: Path, zero2_two_ranks: Path) -> None:
    assert_close(losses(zero2_two_ranks), losses(reference), range(1, STEPS + 1), rtol=BF16_RTOL)


@pytest.mark.slow
def test_resume_two_rank_checkpoint_on_one_rank(zero2_two_ranks: Path, tmp_path: Path) -> None:
    source = zero2_two_ranks / "checkpoints" / "step_00000004"
    run_dir = tmp_path / "one"
    out = run_worker(run_dir, "engine.zero_stage=2", f"checkpoint.resume={source}")
    assert "converting to a universal checkpoint" in out
    assert (source / "universal" / "COMPLETE").is_file()
    assert min(losses(run_dir)) == 5
    assert_close(losses(run_dir), losses(zero2_two_ranks), range(5, STEPS + 1), rtol=BF16_RTOL)


@pytest.mark.slow
def test_two_nodes_two_launchers(reference: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "nodes"
    port = _free_port()
    args = [HELPER, *COMMON, f"run_dir={run_dir}", "data.synthetic.batch_size=4", "engine.zero_stage=2"]
    procs = [
        subprocess.Popen(
            [TORCHRUN, "--nnodes=2", "--nproc_per_node=1", f"--node_rank={i}", "--master_addr=127.0.0.1",
             f"--master_port={port}", *args],
            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "2 rank(s)" in outs[0]
    assert_close(losses(run_dir), losses(reference), range(1, STEPS + 1), rtol=BF16_RTOL)
