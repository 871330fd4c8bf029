"""A rank that never arrives ends the run with a message naming the barrier, not a silent hang."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_missing_rank_times_out_with_a_clear_message(tmp_path):
    script = tmp_path / "hang.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from gfm import distributed as gdist
        info = gdist.init_distributed(timeout_s=4)
        if info.rank == 1:
            time.sleep(60)  # a rank stuck elsewhere: never reaches the barrier
        gdist.barrier("checkpoint step 3")
        print("barrier passed")
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", str(script)],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "barrier passed" not in out
    assert "not every rank reached 'checkpoint step 3' within 4 s" in out, out[-3000:]


def test_a_child_of_a_world_of_one_makes_its_own(tmp_path):
    """A process that trained in-process (a world of one on loopback) and then starts another gfm program
    passes RANK/MASTER_PORT on; the child must open its own store, not fail on the parent's port."""
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(f"""
        import os, subprocess, sys
        sys.path.insert(0, {str(REPO)!r})
        from gfm import distributed as gdist
        info = gdist.init_distributed()
        child = ("from gfm import distributed as g; i = g.init_distributed(); g.barrier('x'); "
                 "print('child', i.world_size)")
        out = subprocess.run([sys.executable, "-c", child], env=os.environ, capture_output=True, text=True,
                             cwd={str(REPO)!r}, timeout=120)
        print(out.stdout, out.stderr[-2000:], "rc", out.returncode)
        gdist.barrier("parent still works")
        print("parent", info.world_size)
    """))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR")}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240,
                          env={**env, "OMP_NUM_THREADS": "1"}, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "child 1" in out and "rc 0" in out and "parent 1" in out, out[-3000:]
