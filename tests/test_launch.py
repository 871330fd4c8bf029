"""The launch scripts: ``local_cluster.sh`` really runs 2 "nodes" × 1 process, and the README names the
variables the scripts read."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SMALL = [  # cpu_smoke.yaml cut down to a few seconds per step on a shared 2-core machine
    "steps=3", "data.synthetic.tile=16", "data.synthetic.num_bands=4", "data.synthetic.batch_size=2",
    "schedule.warmup_steps=1", "checkpoint.every=2", "checkpoint.export=false",
    "logging.every=1", "logging.progress=false", "logging.tensorboard=false", "logging.images_every=0",
    "logging.peak_flops=1e9",
]


@pytest.mark.slow
def test_local_cluster_two_nodes_one_process_each(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = dict(os.environ, NODES="2", NPROC="1", OMP_NUM_THREADS="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # an in-process world of one of an earlier test still holds its MASTER_PORT
    cmd = ["bash", str(LAUNCH / "local_cluster.sh"), str(REPO / "pretrain" / "configs" / "cpu_smoke.yaml"),
           f"run_dir={run_dir}", *SMALL]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the script's trap stops both launchers
        out, _ = proc.communicate(timeout=30)
        pytest.fail(f"local_cluster.sh did not finish in 300 s:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-4000:]
    assert "pretrain: 2 rank(s) on cpu/gloo" in out, out[-3000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss_finite"] for r in rows)
    ckpt = run_dir / "checkpoints" / "step_00000003"
    assert (ckpt / "COMPLETE").is_file()
    assert sorted(p.name for p in ckpt.glob("rank_*.pt")) == ["rank_00000.pt", "rank_00001.pt"]


def test_readme_names_every_variable_the_scripts_read() -> None:
    readme = (LAUNCH / "README.md").read_text()
    for script in sorted(LAUNCH.glob("*.s*")):
        text = script.read_text()
        read = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)[:}]", text)) | set(re.findall(r'\$([A-Z_][A-Z0-9_]*)', text))
        exported = set(re.findall(r"^export ([A-Z_][A-Z0-9_]*)=", text, flags=re.M))
        for var in sorted((read | exported) - {"SLURM_JOB_NODELIST", "SLURM_GPUS_ON_NODE", "SLURM_JOB_NUM_NODES",
                                               "SLURM_JOB_ID", "CONFIG", "NODE", "PIDS"}):
            assert f"`{var}`" in readme, f"{script.name} uses ${var}, which launch/README.md does not name"
