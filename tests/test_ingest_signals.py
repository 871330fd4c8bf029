"""Real signals to a real ``gfm shards build --workers 2``: workers never outlive the build.

SIGKILL to the build: the kernel kills the workers (PR_SET_PDEATHSIG); the next build removes the
temporary files they left and finishes, and the dataset verifies. SIGTERM or SIGINT to the build alone:
it kills its workers and exits at once (143 / 130), keeping only finished shards, leaving no temporary
file. A worker killed from outside fails the build with one line.
"""

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from rasterio.transform import Affine

from gfm.shards import verify
from tests.helpers_ingest import CRS
from tests.helpers_rasters import write_raster

pytestmark = pytest.mark.slow

GFM = str(Path(sys.executable).parent / "gfm")
SIDE = 1024  # 1024 tiles of 32 px in ~90 shards: long enough to signal in the middle


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("signals")
    rng = np.random.default_rng(0)
    files = []
    for band in ("B2", "B3", "B4"):
        a = rng.integers(1, 9000, size=(SIDE, SIDE), dtype=np.uint16)
        files.append(str(write_raster(root / f"LC08_L1TP_035032_20200101_{band}.tif", a,
                                      Affine(30, 0, 500_000, 0, -30, 4_400_000), CRS, nodata=0)))
    return files


def start(files: list[str], out: Path) -> subprocess.Popen:
    cmd = [GFM, "shards", "build", *files, "--out", str(out), "--tile", "32", "--shard-size", "150KB",
           "--workers", "2", "--no-progress"]
    # SIGINT at its default in the build even when the tests run as a background job (which starts with
    # SIGINT ignored, and an ignored SIGINT is inherited: the build would rightly ignore it too)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def shard_temporaries(out: Path) -> list[str]:
    """Shards being written (``.<shard>.<pid>.tmp``), not the build's own write-check probe in ``out``."""
    return glob.glob(str(out / ".gfm-*.tar.*.tmp"))


def workers_of(p: subprocess.Popen, out: Path) -> list[int]:
    """The build's worker pids, once a worker is writing a shard (a shard's temporary file exists)."""
    deadline = time.monotonic() + 120
    while not shard_temporaries(out):
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, "no shard was started"
        time.sleep(0.02)
    kids = [int(k) for k in Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split()]
    assert len(kids) == 2, kids
    return kids


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def finished(out: Path) -> int:
    return len(list(out.glob("*.stats.json")))


def planned(out: Path) -> int:
    return len(json.loads((out / "build.json").read_text())["shards"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkill_to_the_build_kills_its_workers_and_the_next_build_cleans_up(scene: list[str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    p = start(scene, out)
    kids = workers_of(p, out)
    p.kill()
    p.wait()
    assert wait_gone(kids, 10) == [], "workers outlived a SIGKILLed build"
    left = sorted(Path(f).name for f in shard_temporaries(out))
    assert left and finished(out) < planned(out)
    done = subprocess.run([GFM, "shards", "build", *scene, "--out", str(out), "--tile", "32", "--shard-size", "150KB",
                           "--workers", "2", "--no-progress"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"notice: removed {len(left)} temporary file(s) left by an interrupted build" in done.stderr
    assert not [f.name for f in out.iterdir() if f.name.startswith(".")]
    assert finished(out) == planned(out) and verify(out).ok
    assert json.loads((out / "index.json").read_text())["samples"] == (SIDE // 32) ** 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_or_sigint_to_the_build_alone_stops_everything_at_once(
    scene: list[str], tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    out = tmp_path / "out"
    p = start(scene, out)
    kids = workers_of(p, out)
    p.send_signal(sig)
    t0 = time.monotonic()
    _, err = p.communicate(timeout=60)
    took = time.monotonic() - t0
    assert p.returncode == code, err
    assert took < 10, f"the build took {took:.1f} s to stop"
    assert wait_gone(kids, 5) == []
    assert err.strip().splitlines()[-1].endswith("finished shards are kept, re-run to resume")
    assert finished(out) < planned(out)  # it did not run to the end
    assert not [f.name for f in out.iterdir() if f.name.startswith(".")]  # nothing half-written left


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_worker_fails_the_build_with_one_line(scene: list[str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    p = start(scene, out)
    kids = workers_of(p, out)
    os.kill(kids[0], signal.SIGKILL)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (f"gfm shards build: error: {out}: a worker process died while writing "
                                            "shards (killed, or out of memory?); finished shards are kept, re-run "
                                            "to resume")
    assert wait_gone(kids, 5) == []
    assert not [f.name for f in out.iterdir() if f.name.startswith(".")]
