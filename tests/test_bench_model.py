"""``bench.model``: rows alternate over rounds, and the authors-src row runs code from the directory it is given.

The authors' code itself (``uiuctml/GeospatialFM``) is not part of gfm and not on a CI machine: the
authors-src plumbing is exercised with a stand-in package of the same module path, a small encoder with
their call signature, so what is tested is how the row finds, builds and times it.
"""

from __future__ import annotations

import math
import re
import textwrap
from pathlib import Path

import pytest

from bench import model as bench_model

STAND_IN = '''
import torch
from torch import nn


class SpatialSpectralLowRankViTConfig:
    def __init__(self, patch_size, embed_dim, depth, num_heads):
        self.patch_size, self.embed_dim, self.depth, self.num_heads = patch_size, embed_dim, depth, num_heads
        self.pretrain = True


class SpatialSpectralLowRankViTEncoder(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert not config.pretrain
        self.proj = nn.Linear(config.patch_size**2, config.embed_dim)
        self.p = config.patch_size

    def forward(self, optical, optical_channel_wv, spatial_resolution):
        assert optical_channel_wv.shape == (1, optical.shape[1])
        B, C, H, W = optical.shape
        patches = optical.unfold(2, self.p, self.p).unfold(3, self.p, self.p).reshape(B, C, -1, self.p**2)
        return (self.proj(patches),)
'''


def _result(out: str) -> dict[str, float]:
    line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
    return {k: float(v) for k, v in re.findall(r"(\w+)=([\w.+-]+)", line)}


def _stand_in(root: Path) -> None:
    """The stand-in package under ``root``, where ``--authors-src`` looks for their code."""
    package = root / "GeospatialFM" / "models"
    package.mkdir(parents=True)
    for init in (root / "GeospatialFM" / "__init__.py", package / "__init__.py"):
        init.write_text("")
    (package / "spatial_spectral_low_rank_vit.py").write_text(textwrap.dedent(STAND_IN))


def test_rows_alternate_and_the_authors_source_row_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _stand_in(tmp_path)
    bench_model.main(["--rows", "less,authors-src", "--sizes", "13", "--depth", "1", "--repeats", "1",
                      "--min-time", "0", "--rounds", "2", "--threads", "1", "--authors-src", str(tmp_path)])
    out = capsys.readouterr().out
    rows = [ln.split()[0] for ln in out.splitlines() if re.match(r"^(less|authors-src)\s+13\s", ln)]
    assert rows == ["less", "authors-src"], out  # one line per configuration, merged over the rounds
    assert "best over 2 round(s)" in out and "load average" in out
    result = _result(out)
    assert result["authors_src_time_c13"] > 0
    assert "authors_src_mem_c13" in result  # nan where the tiny run's peak is below the high-water mark
    assert str(result["authors_src_time_c200"]) == "nan"  # a size not run


def test_shared_timing_runs_the_rows_together(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--shared``: one process per size times every row in turn; its medians fill a column and the keys."""
    _stand_in(tmp_path)
    bench_model.main(["--rows", "less,less-mkl,authors-src", "--sizes", "13", "--depth", "1", "--repeats", "2",
                      "--min-time", "0", "--threads", "1", "--shared", "--authors-src", str(tmp_path)])
    out = capsys.readouterr().out
    row = re.compile(r"^(less|less-mkl|authors-src)\s+13\s")
    lines = {ln.split()[0]: ln.split() for ln in out.splitlines() if row.match(ln)}
    assert lines.keys() == {"less", "less-mkl", "authors-src"}, out
    assert all(len(v) == 7 and float(v[6]) > 0 for v in lines.values()), out  # the shared column, a time
    result = _result(out)
    for key in ("shared_authors_src_time_c13", "shared_onednn_gain_c13", "onednn_gain_c13"):
        assert 0 < result[key] < math.inf, key
    assert str(result["shared_authors_src_time_c200"]) == "nan"


def test_the_authors_source_row_needs_their_code(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="authors-src needs --authors-src DIR holding GeospatialFM/"):
        bench_model.main(["--rows", "authors-src", "--authors-src", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown row"):
        bench_model.main(["--rows", "less,fast"])


def test_rounds_keep_the_best_time_and_the_largest_peak() -> None:
    a = {"status": "ok", "time_s": 2.0, "peak_mb": 10.0}
    b = {"status": "ok", "time_s": 1.5, "peak_mb": 12.0}
    assert bench_model._merge(bench_model._merge(None, a), b) == {"status": "ok", "time_s": 1.5, "peak_mb": 12.0}
    assert bench_model._merge(a, {"status": "OOM"})["status"] == "OOM"
    assert bench_model._merge({"status": "TIMEOUT"}, a)["status"] == "TIMEOUT"


def test_paths_bench_times_both_paths(capsys: pytest.CaptureFixture[str]) -> None:
    """``bench.paths`` smoke: both paths timed on two small grids, one RESULT key per grid."""
    from bench import paths

    assert paths.main(["--grids", "16:3:2,2:5:9", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    result = dict(kv.split("=") for kv in out.strip().splitlines()[-1].removeprefix("RESULT ").split())
    assert set(result) == {"ref_over_fast_3x2", "ref_over_fast_5x9"} and all(float(v) > 0 for v in result.values())
