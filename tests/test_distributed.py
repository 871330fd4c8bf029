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
