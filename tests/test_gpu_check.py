"""The prepared GPU check (``bench/gpu_check.py``): dry mode end to end on the CPU, peaks, isolation."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_check

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "name,peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_datasheet_peak_by_device_name(name: str, peak: float | None) -> None:
    assert gpu_check.datasheet_peak(name) == peak


def test_gpu_sizes_fit_eight_minutes() -> None:
    assert set(gpu_check.GPU.boxes) == set(gpu_check.DRY.boxes) == set(gpu_check.PARTS)
    assert sum(gpu_check.GPU.boxes.values()) <= 8 * 60 - 30  # start-up and the report fit in the rest


def test_table_reports_failed_parts_and_counts(tmp_path: Path) -> None:
    parts = {
        "mfu_eager": {"status": "ok", "model": "m", "batch": 2, "bands": 4, "tile": 16, "step_s": 0.5,
                      "samples_per_s": 4.0, "tflops": 1.0, "mfu": 0.25, "peak_tflops": 4.0,
                      "peak_source": "measured", "warmup_s": 1.0, "wall_s": 3.0},
        "mfu_compiled": {"status": "ok", "model": "m", "batch": 2, "bands": 4, "tile": 16, "step_s": 0.25,
                         "samples_per_s": 8.0, "tflops": 2.0, "mfu": 0.5, "peak_tflops": 4.0,
                         "peak_source": "measured", "warmup_s": 9.0, "wall_s": 12.0},
        "loader": {"status": "error", "error": "ValueError: shards missing", "wall_s": 1.0},
        "train": {"status": "timeout", "error": "killed after its 100 s box", "wall_s": 100.0},
    }
    derived = gpu_check.derive(parts)
    assert derived == {"mfu_eager": 0.25, "mfu_compiled": 0.5, "compiled_speedup": 2.0}
    report = {"dry": True, "environment": {"device": "cpu", "torch": "x", "deepspeed": "y", "cpus": 2},
              "parts": parts, "derived": derived, "total_s": 116.0, "dense_channels": 12}
    text = gpu_check.table(report)
    assert "ValueError: shards missing" in text and "killed after its 100 s box" in text
    assert "less_vs_dense   skipped" in text
    assert text.splitlines()[-1].startswith("RESULT mfu_eager=0.2500 mfu_compiled=0.5000 compiled_speedup=2.000")
    assert text.splitlines()[-1].endswith("parts_ok=2/5")


@pytest.mark.slow
def test_a_part_past_its_box_is_stopped_and_the_rest_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    boxes = dict(gpu_check.DRY.boxes, less_vs_dense=1.0)
    monkeypatch.setattr(gpu_check, "DRY", dataclasses.replace(gpu_check.DRY, boxes=boxes))
    monkeypatch.setattr(gpu_check, "MIN_BOX_S", 0.5)  # start it: importing torch alone outlasts 1 s
    out = tmp_path / "check.json"
    assert gpu_check.main(["--dry", "--parts", "less_vs_dense,loader", "--out", str(out)]) == 1
    report = json.loads(out.read_text())
    assert report["parts"]["less_vs_dense"]["status"] == "timeout"
    assert report["parts"]["loader"]["status"] == "ok", report["parts"]["loader"]
    assert report["parts"]["loader"]["samples_per_s"] > 0
    assert (tmp_path / "check.txt").read_text().splitlines()[-1].endswith("parts_ok=1/5")


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path: Path) -> None:
    """``bench/gpu_check.sh --dry``: every part but the compiled one runs its real code path on the CPU and
    succeeds. The compiled step is ``gfm.train.module.compile_model`` then the same step as ``mfu_eager``;
    inductor on CPU spends ~60 s compiling it, and ``tests/test_compile.py`` already runs that compile."""
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_TIMEOUT="600", OMP_NUM_THREADS="1")
    wanted = [p for p in gpu_check.PARTS if p != "mfu_compiled"]
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--dry", "--out", str(out),
                           "--parts", ",".join(wanted)], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=700)
    report = json.loads(out.read_text())
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:] + json.dumps(report["parts"])[-3000:]
    parts = report["parts"]
    assert sorted(parts) == sorted(wanted) and [p for p in wanted if parts[p]["status"] != "ok"] == []
    assert parts["train"]["backend"] == "cpu/gloo" and parts["train"]["finite"]
    assert not parts["mfu_eager"]["compiled"]
    assert 0 < parts["mfu_eager"]["mfu"] < 1 and parts["mfu_eager"]["peak_source"] == "measured fp32 matmul"
    assert set(parts["less_vs_dense"]["rows"]) == {"less_vit_tiny", "dense_vit_tiny"}
    assert parts["loader"]["tiles_written"] == (128 // 16) ** 2 and parts["loader"]["samples_per_s"] > 0
    assert set(report["derived"]) == {"mfu_eager", "dense_over_less", "loader_headroom"}
    table = (tmp_path / "gpu_check.txt").read_text()
    assert table in proc.stdout and table.splitlines()[-1].endswith("parts_ok=4/5")
    assert "mfu_compiled    skipped" in table
