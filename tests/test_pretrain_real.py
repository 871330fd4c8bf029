"""End to end on real data: shards from the AVIRIS cube that tensorly ships → loader → HyperMAE → DeepSpeed.

A run killed with SIGKILL right after a checkpoint and resumed with ``--resume auto`` reproduces the
uninterrupted run's losses exactly (exact-epoch loader, one worker).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from demo.indian_pines import aviris_indian_pines_wavelengths, tensorly_indian_pines
from shards.cli import main as shards_main

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "pretrain" / "configs" / "demo_indian_pines.yaml"


@pytest.fixture(scope="module")
def pines_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("pines")
    cube, gt = tensorly_indian_pines()
    wl = out / "wl.txt"
    wl.write_text("\n".join(map(str, aviris_indian_pines_wavelengths())))
    rc = shards_main(["build", str(cube), "--wavelengths", str(wl), "--label", str(gt), "--sensor", "aviris",
                      "--gsd", "20", "--tile", "32", "--stride", "16", "--out", str(out / "shards"), "--no-progress"])
    assert rc == 0
    return out / "shards"


def _cmd(shards: Path, run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pretrain", "--config", str(CONFIG), f"data.loader.shards={shards}",
            f"run_dir={run_dir}", "steps=8", "checkpoint.every=4", "logging.every=1", "logging.progress=false",
            "logging.images_every=0", "data.loader.crop_size=16", "data.loader.batch_size=4",
            "model.spectral_patch=25", *extra]


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows}


@pytest.mark.slow
def test_kill9_and_resume_on_real_shards_reproduces_losses(pines_shards, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_cmd(pines_shards, full), check=True, env=env, cwd=REPO, capture_output=True, timeout=300)
    proc = subprocess.Popen(_cmd(pines_shards, killed), env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    marker = killed / "checkpoints" / "step_00000004" / "COMPLETE"
    deadline = time.time() + 240
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the run never completed its step-4 checkpoint"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    subprocess.run(_cmd(pines_shards, killed, "--resume", "auto"), check=True, env=env, cwd=REPO,
                   capture_output=True, timeout=300)
    a, b = _losses(full), _losses(killed)
    assert sorted(a) == list(range(1, 9))
    for step in range(5, 9):
        assert b[step] == a[step], (step, a[step], b[step])
    assert (killed / "model.safetensors").exists() and (killed / "loss_curve.png").exists()
