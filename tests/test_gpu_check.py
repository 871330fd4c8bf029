"""The prepared GPU check (``bench/gpu_check.py``): dry mode end to end on the CPU, peaks, isolation, and
the wheels it installs on a GPU machine (``bench/gpu_wheels.py``), with toy wheels made here offline."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from bench import gpu_check, gpu_wheels

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
    assert text.splitlines()[-1].endswith("parts_ok=2/6")


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
    assert (tmp_path / "check.txt").read_text().splitlines()[-1].endswith("parts_ok=1/6")


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
    agreement = parts["agreement"]["rows"]
    assert set(agreement) == {"cpu fast fp32", "cpu bf16"}  # no CUDA here
    assert 0 < agreement["cpu fast fp32"]["max_rel"] < 1e-4 < agreement["cpu bf16"]["max_rel"] < 0.1
    assert set(report["derived"]) == {"mfu_eager", "dense_over_less", "loader_headroom"}
    table = (tmp_path / "gpu_check.txt").read_text()
    assert table in proc.stdout and table.splitlines()[-1].endswith("parts_ok=5/6")
    assert "mfu_compiled    skipped" in table


# ------------------------------------------------------------------------------------------------
# The wheels: gathered for CPython 3.12 manylinux x86_64, installed where missing, every import checked


def _toy_wheel(folder: Path, name: str, version: str, requires: tuple[str, ...] = (), body: str = "",
               data: dict[str, str] | None = None) -> Path:
    """A pure wheel of package ``name`` made by hand (what ``pip wheel`` of a one-module project writes)."""
    dist = f"{name}-{version}"
    files = {f"{name}/__init__.py": body or f"VERSION = {version!r}\n", **(data or {}),
             f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                                           + "".join(f"Requires-Dist: {r}\n" for r in requires),
             f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\n"
                                        "Tag: py3-none-any\n"}
    record = "".join(
        f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).decode().rstrip('=')},"
        f"{len(text.encode())}\n" for path, text in files.items()) + f"{dist}.dist-info/RECORD,,\n"
    wheel = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, text in {**files, f"{dist}.dist-info/RECORD": record}.items():
            z.writestr(path, text)
    return wheel


def _toy_folder(folder: Path) -> Path:
    """``gfmtoy_root`` 1.0 (needs ``gfmtoy_dep>=2``, and colorama on Windows only) and ``gfmtoy_dep`` 2.0,
    described and listed in a manifest by the gatherer's own code."""
    folder.mkdir()
    root = _toy_wheel(folder, "gfmtoy_root", "1.0", ("gfmtoy_dep>=2", 'colorama; sys_platform == "win32"'),
                      body="import gfmtoy_dep\n\nDEP = gfmtoy_dep.VERSION\n")
    dep = _toy_wheel(folder, "gfmtoy_dep", "2.0")
    gpu_wheels.write_manifest(folder, [Requirement("gfmtoy_root>=1")], [gpu_wheels.describe(w) for w in (root, dep)])
    return folder


@pytest.mark.parametrize(
    "file,fits",
    [
        ("deepspeed-0.19.8-py3-none-any.whl", True),
        ("braceexpand-0.1.7-py2.py3-none-any.whl", True),
        ("rasterio-1.4.4-cp312-cp312-manylinux_2_28_x86_64.whl", True),
        ("pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl", True),
        ("psutil-7.2.2-cp36-abi3-manylinux2010_x86_64.manylinux_2_12_x86_64.manylinux_2_28_x86_64.whl", True),
        ("rasterio-1.4.4-cp311-cp311-manylinux_2_28_x86_64.whl", False),  # this machine's Python, not the GPU's
        ("rasterio-1.4.4-cp312-cp312-manylinux_2_34_x86_64.whl", False),  # a newer glibc than CUDA torch needs
        ("rasterio-1.4.4-cp312-cp312-manylinux_2_28_aarch64.whl", False),
        ("rasterio-1.4.4-cp312-cp312-win_amd64.whl", False),
    ],
)
def test_wheel_tags_fit_the_gpu_machine(file: str, fits: bool) -> None:
    assert gpu_wheels.fits_target(file) is fits


def test_requirements_are_read_for_the_gpu_machine() -> None:
    reqs = gpu_wheels.for_target(["tqdm", 'colorama; platform_system == "Windows"', "pytest; extra == 'dev'",
                                  'tomli>=1; python_version < "3.12"',  # true here (3.11), false on the GPU's 3.12
                                  'typing-extensions>=4.12; python_version < "3.13"'])
    assert [str(r) for r in reqs] == ["tqdm", "typing-extensions>=4.12"]


def test_install_plan_keeps_what_is_there_and_follows_what_is_not() -> None:
    manifest = {"roots": ["deepspeed>=0.15", "webdataset"], "wheels": [
        {"name": "deepspeed", "version": "0.19.8", "requires": ["pydantic>=2", "numpy", "torch>=2"]},
        {"name": "pydantic", "version": "2.14.4", "requires": ["pydantic-core==2.50.5", "typing-extensions>=4.16"]},
        {"name": "pydantic-core", "version": "2.50.5", "requires": ["typing-extensions>=4.16"]},
        {"name": "typing-extensions", "version": "4.16.0", "requires": []},
        {"name": "webdataset", "version": "1.0.2", "requires": ["numpy"]},
    ]}
    machine = {"torch": "2.7.0", "numpy": "2.1.0", "webdataset": "0.2.100", "typing-extensions": "4.12.2"}
    plan = gpu_check.plan_install(manifest, machine.get)
    # its webdataset, numpy and torch stay; its typing-extensions is older than pydantic needs
    assert [r["name"] for r in plan] == ["deepspeed", "pydantic", "pydantic-core", "typing-extensions"]
    # a pydantic 2 already there keeps its own pydantic-core: nothing pins ours onto it
    assert [r["name"] for r in gpu_check.plan_install(manifest, {**machine, "pydantic": "2.9.0"}.get)] == ["deepspeed"]
    with pytest.raises(gpu_check.SetupError, match=r"deepspeed 0.19.8 needs numpy, which .* lacks and the wheel"):
        gpu_check.plan_install(manifest, {k: v for k, v in machine.items() if k != "numpy"}.get)


def test_wheels_install_into_a_scratch_folder_that_the_parts_import_from(tmp_path: Path) -> None:
    folder = _toy_folder(tmp_path / "wheels")
    manifest = json.loads((folder / gpu_check.MANIFEST).read_text())
    assert manifest["roots"] == ["gfmtoy_root>=1"] and manifest["python"] == "3.12"
    assert {r["name"]: r["requires"] for r in manifest["wheels"]} == {"gfmtoy-root": ["gfmtoy_dep>=2"],
                                                                       "gfmtoy-dep": []}  # colorama: Windows only
    setup = gpu_check.prepare(folder, ["gfmtoy_root"])
    try:
        assert setup.installed == ["gfmtoy-dep 2.0", "gfmtoy-root 1.0"] and setup.target is not None
        assert setup.env["PYTHONPATH"].split(os.pathsep)[:2] == [str(setup.target), str(REPO)]
        code = "import gfmtoy_root; print(gfmtoy_root.__file__, gfmtoy_root.DEP)"
        where = subprocess.run([sys.executable, "-c", code], env=setup.env, capture_output=True, text=True,
                               check=True).stdout.split()
        assert where == [str(setup.target / "gfmtoy_root" / "__init__.py"), "2.0"]
        failed = gpu_check.verify_imports(["gfmtoy_root", "gfmtoy_absent", "gfm.sensors"], setup.env)
        assert failed == {"gfmtoy_absent": "ModuleNotFoundError: No module named 'gfmtoy_absent'"}
    finally:
        if setup.target is not None:
            gpu_check.shutil.rmtree(setup.target)
    with pytest.raises(gpu_check.SetupError) as e:  # a module no wheel brings: named on one line
        gpu_check.prepare(folder, ["gfmtoy_root", "gfmtoy_absent"])
    assert "\n" not in str(e.value) and "gfmtoy_absent (ModuleNotFoundError" in str(e.value)
    assert "gfmtoy_root (" not in str(e.value) and "after installing 2 wheel(s)" in str(e.value)


def test_a_missing_or_changed_wheel_is_named_with_the_command_that_gathers_it(tmp_path: Path) -> None:
    folder = _toy_folder(tmp_path / "wheels")
    (folder / "gfmtoy_dep-2.0-py3-none-any.whl").unlink()
    with (folder / "gfmtoy_root-1.0-py3-none-any.whl").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(gpu_check.SetupError) as e:
        gpu_check.prepare(folder, ["gfmtoy_root"])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{folder}: 2 of the 2 wheels in manifest.json")
    assert "gfmtoy_dep-2.0-py3-none-any.whl (missing)" in msg
    assert "gfmtoy_root-1.0-py3-none-any.whl (sha256 differs)" in msg
    assert "`.venv/bin/python -m bench.gpu_wheels`" in msg


def test_unpacking_a_wheel_without_pip_lays_it_out_as_pip_does(tmp_path: Path) -> None:
    (tmp_path / "w").mkdir()
    wheel = _toy_wheel(tmp_path / "w", "gfmtoy_data", "1.0", data={
        "gfmtoy_data-1.0.data/purelib/gfmtoy_extra.py": "X = 1\n", "gfmtoy_data-1.0.data/scripts/tool": "#!/bin/sh\n"})
    gpu_check._unpack_wheel(wheel, tmp_path / "by_hand")
    gpu_check.install_wheels([wheel], tmp_path / "by_pip")
    by_hand = sorted(str(p.relative_to(tmp_path / "by_hand")) for p in (tmp_path / "by_hand").rglob("*.py"))
    assert by_hand == ["gfmtoy_data/__init__.py", "gfmtoy_extra.py"]
    assert by_hand == sorted(str(p.relative_to(tmp_path / "by_pip")) for p in (tmp_path / "by_pip").rglob("*.py"))
    assert not list((tmp_path / "by_hand").glob("*.data"))


def test_it_stops_with_one_line_without_gpu_or_wheels_and_runs_dry_only_when_asked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(gpu_check, "cuda_device", lambda: None)
    out = str(tmp_path / "check.json")
    assert gpu_check.main(["--out", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpu check: no CUDA device") and "--dry-if-no-gpu" in err and err.count("\n") == 1

    monkeypatch.setattr(gpu_check, "PART_MODULES", {p: ("gfm.sensors", "gfmtoy_absent") for p in gpu_check.PARTS})
    assert gpu_check.main(["--dry-if-no-gpu", "--wheels", str(tmp_path / "none"), "--out", out]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("gpu check: no CUDA device; running the dry mode") and len(err) == 2
    assert err[1].startswith(f"gpu check: {tmp_path / 'none'}/manifest.json: not found")
    assert "gfmtoy_absent (ModuleNotFoundError" in err[1] and "gfm.sensors" not in err[1]
    assert err[1].endswith(f"carry {tmp_path / 'none'}/ along") and "`.venv/bin/python -m bench.gpu_wheels`" in err[1]
    assert not Path(out).exists()  # stopped before any part

    monkeypatch.setattr(gpu_check, "PART_MODULES", {p: ("gfm.sensors",) for p in gpu_check.PARTS})
    ran = []
    monkeypatch.setattr(gpu_check, "_child", lambda name, dry, *_: ran.append((name, dry)) or {"status": "error"})
    assert gpu_check.main(["--dry-if-no-gpu", "--parts", "loader", "--wheels", str(tmp_path / "none"),
                           "--out", out]) == 1
    assert ran == [("loader", True)] and json.loads(Path(out).read_text())["dry"] is True
