"""The prepared GPU check: one command, ≤ 8 minutes on one GPU, one JSON and one table.

GPU time comes unannounced and in slots of minutes, so everything worth knowing about gfm on a GPU is
measured in one go (``gfm bench gpu`` or ``bench/gpu_check.sh``). Parts, each in its own process with
its own time box (a part that fails, hangs or runs out of memory records its error and the rest run):

- ``train``: the real training path: ``torchrun`` with one process, NCCL, DeepSpeed ZeRO 1, bf16,
  a few steps of HyperMAE on the synthetic stream (``gfm.train``); loss, samples/s, memory, backend;
- ``mfu_eager`` / ``mfu_compiled``: one training step of HyperMAE LESS-B (forward + backward + AdamW,
  bf16 autocast) on a fixed batch, without and with ``engine.compile`` (regional ``torch.compile``),
  against the GPU's datasheet bf16 dense peak (:data:`PEAK_BF16_DENSE`, matched by device name);
  MFU = analytic training FLOPs (3 × forward) per second ÷ that peak;
- ``less_vs_dense``: forward + backward time and peak memory of LESS and of the dense joint-attention
  reference at C = 200 observations (base width, 4 blocks);
- ``agreement``: one LESS encoder (tiny width, the same seeded weights and batch) forward + backward on
  the CPU's reference path in fp32 against every other way gfm runs it here: the CPU fast paths
  (:mod:`gfm.model.fused`), CPU bf16 autocast, and on a GPU CUDA fp32 and bf16 autocast; max absolute and
  relative (to the reference's largest magnitude) differences of the output grid and of all gradients;
- ``loader``: synthetic 13-band shards written by ``gfm.shards.build`` into a temporary directory, then
  the shard loader with one worker per CPU core delivering batches to the GPU; samples/s against the
  rate the eager LESS-B step consumes (``loader_headroom`` > 1: the loader keeps up).

Before any part, the check makes its imports work (:func:`prepare`). A lent GPU machine has CUDA
PyTorch but not DeepSpeed, webdataset or rasterio, and no network; ``python -m bench.gpu_wheels``, run
where a registry can be reached, gathers their wheels into :data:`WHEELS` (``bench/wheels/``, carried
along). The check installs those of them this interpreter lacks into a scratch folder with ``pip install
--no-index --no-deps --target``, puts it on ``PYTHONPATH`` for every part (torchrun's workers too),
then imports every module the chosen parts need (:data:`PART_MODULES`) in a fresh process; a missing
wheel or module stops it with one line and exit code 2 before any part has spent time. So does a missing
CUDA device, unless ``--dry-if-no-gpu`` asks for the dry mode instead.

``--dry`` runs the same code on the CPU with tiny sizes (gloo instead of NCCL, the measured matmul
peak instead of a datasheet one), which is what the tests run. The JSON (``--out``, default
``runs/gpu_check/gpu_check.json``) is rewritten after every part, so a run cut short keeps what it
measured; the table is printed and written beside it (``.txt``).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
#: The wheels a GPU machine lacks, gathered by ``python -m bench.gpu_wheels`` (git-ignored, carried along).
WHEELS = REPO / "bench" / "wheels"
MANIFEST = "manifest.json"
#: What to run, where a package registry can be reached, to (re)build :data:`WHEELS`.
GATHER = ".venv/bin/python -m bench.gpu_wheels"

#: Datasheet bf16 dense tensor-core peaks (FLOP/s, without sparsity), matched in order against the
#: device name (most specific first): NVIDIA H100 / H200 / A100 product briefs.
PEAK_BF16_DENSE: tuple[tuple[str, float], ...] = (
    ("GH200", 989e12),
    ("H200 NVL", 835e12),
    ("H200", 989e12),
    ("H100 NVL", 835e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM5 (HBM3)
    ("A100", 312e12),  # SXM4 and PCIe
)


def datasheet_peak(device_name: str) -> float | None:
    """The bf16 dense peak of ``device_name`` from :data:`PEAK_BF16_DENSE`, or None when it is not listed."""
    for key, peak in PEAK_BF16_DENSE:
        if key.lower() in device_name.lower():
            return peak
    return None


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU run and the dry run on CPU.

    Attributes:
        train_model, train_tile, train_batch, train_steps: the ``train`` part's run.
        mfu_model, mfu_overrides, mfu_tile, mfu_bands, mfu_batch, mfu_warmup, mfu_steps: the MFU step.
        dense_width, dense_depth, dense_batch, dense_channels, dense_tile: LESS vs dense.
        cube_side, loader_tile, loader_batch, loader_seconds: the loader part (a ``cube_side²`` 13-band
            scene cut into ``loader_tile`` tiles).
        precision: ``bf16`` (bf16 weights under bf16 autocast, as DeepSpeed's bf16 mode) or ``fp32``
            for the MFU and LESS-vs-dense parts (the ``train`` part always runs bf16).
        boxes: seconds allowed per part.
    """

    train_model: str
    train_tile: int
    train_batch: int
    train_steps: int
    mfu_model: str
    mfu_overrides: dict[str, Any]
    mfu_tile: int
    mfu_bands: int
    mfu_batch: int
    mfu_warmup: int
    mfu_steps: int
    dense_width: str
    dense_depth: int
    dense_batch: int
    dense_channels: int
    dense_tile: int
    cube_side: int
    loader_tile: int
    loader_batch: int
    loader_seconds: float
    precision: str = "bf16"
    boxes: dict[str, float] = field(default_factory=dict)


#: One GPU, ≤ 8 minutes with start-up (the boxes add up to 430 s).
GPU = Sizes(
    train_model="hypermae_less_small", train_tile=64, train_batch=32, train_steps=30,
    mfu_model="hypermae_less_base", mfu_overrides={}, mfu_tile=64, mfu_bands=12, mfu_batch=64,
    mfu_warmup=3, mfu_steps=10,
    dense_width="base", dense_depth=4, dense_batch=4, dense_channels=200, dense_tile=64,
    cube_side=2048, loader_tile=64, loader_batch=64, loader_seconds=25.0,
    boxes={"train": 100, "mfu_eager": 60, "mfu_compiled": 130, "less_vs_dense": 60, "loader": 60, "agreement": 20},
)
#: The same code on the CPU, sized for seconds (compiling is what takes longest); fp32 steps, since
#: CPUs without bf16 matmul units run bf16 many times slower (and inductor compiles it slower too).
DRY = Sizes(
    train_model="hypermae_less_tiny", train_tile=16, train_batch=2, train_steps=2,
    mfu_model="hypermae_less_tiny",
    mfu_overrides={"embed_dim": 32, "depth": 1, "num_heads": 2, "decoder_dim": 16, "decoder_depth": 1,
                   "decoder_num_heads": 2},
    mfu_tile=16, mfu_bands=4, mfu_batch=2, mfu_warmup=1, mfu_steps=2,
    dense_width="tiny", dense_depth=1, dense_batch=1, dense_channels=12, dense_tile=16,
    cube_side=128, loader_tile=16, loader_batch=8, loader_seconds=2.0, precision="fp32",
    boxes={"train": 300, "mfu_eager": 120, "mfu_compiled": 600, "less_vs_dense": 120, "loader": 180,
           "agreement": 60},
)
PARTS = ("train", "mfu_eager", "mfu_compiled", "less_vs_dense", "loader", "agreement")
#: What each part imports, checked in a fresh process before any part runs (:func:`verify_imports`).
PART_MODULES: dict[str, tuple[str, ...]] = {
    "train": ("deepspeed", "pretrain.__main__", "gfm.distributed", "gfm.train.runner", "gfm.data.synthetic"),
    "mfu_eager": ("gfm.model", "gfm.train.engine_config", "gfm.train.module", "gfm.train.flops",
                  "gfm.data.synthetic"),
    "mfu_compiled": ("gfm.model", "gfm.train.engine_config", "gfm.train.module", "gfm.train.flops",
                     "gfm.data.synthetic"),
    "less_vs_dense": ("gfm.model", "bench.model"),
    "loader": ("rasterio", "webdataset", "gfm.shards", "gfm.data.config", "gfm.data.pipeline", "gfm.sensors"),
    "agreement": ("gfm.model", "gfm.model.fused", "bench.model"),
}
#: A part whose box (or what is left of the budget) is shorter than this is skipped, not started.
MIN_BOX_S = 5.0


# ------------------------------------------------------------------------------------------------
# Parts (each runs in its own process: ``python -m bench.gpu_check --part NAME``)


def _device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _dtype(sizes: Sizes) -> Any:
    import torch

    return torch.bfloat16 if sizes.precision == "bf16" else torch.float32


def _autocast(device: Any, sizes: Sizes) -> Any:
    import contextlib

    import torch

    if sizes.precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _peak(device: Any, sizes: Sizes) -> tuple[float, str]:
    """The FLOP/s that MFU is measured against, and where it comes from."""
    import torch

    if device.type == "cuda" and sizes.precision == "bf16":
        name = torch.cuda.get_device_name(device)
        peak = datasheet_peak(name)
        if peak is not None:
            return peak, f"datasheet bf16 dense ({name})"
    from gfm.train.flops import measure_peak_flops

    return measure_peak_flops(device, _dtype(sizes)), f"measured {sizes.precision} matmul"


def _synthetic_batch(bands: int, tile: int, batch: int, device: Any) -> Any:
    from gfm.data.synthetic import SyntheticDataConfig

    stream = SyntheticDataConfig(num_bands=bands, tile=tile, batch_size=batch).build(0, 1)
    return next(iter(stream)).to(device)


def part_train(sizes: Sizes, work: Path) -> dict[str, Any]:
    """A few real training steps through torchrun (1 process), DeepSpeed ZeRO 1, bf16."""
    import torch

    run_dir = work / "train_run"
    peak = datasheet_peak(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
    # torchrun as a module of this interpreter: its script need not lie beside it (a system python3)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "pretrain",
           f"run_dir={run_dir}", f"steps={sizes.train_steps}", f"model.name={sizes.train_model}", "model.patch_size=8",
           "data.source=synthetic", f"data.synthetic.tile={sizes.train_tile}",
           f"data.synthetic.batch_size={sizes.train_batch}", "engine.zero_stage=1", "engine.precision=bf16",
           "schedule.warmup_steps=1", "checkpoint.every=0", "checkpoint.export=false",
           f"logging.every={max(1, sizes.train_steps // 3)}", "logging.progress=false", "logging.tensorboard=false",
           f"logging.peak_flops={peak or 0.0}"]
    env = dict(os.environ, PYTHONPATH=_pythonpath([REPO]))  # keeps the installed wheels' folder (prepare)
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun exited {proc.returncode}: {out.strip()[-1500:]}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    started = next((ln for ln in out.splitlines() if ln.startswith("pretrain:")), "")
    backend = started.split(" on ", 1)[1].split(",", 1)[0] if " on " in started else "?"
    return {
        "backend": backend, "steps": last["step"], "loss_first": rows[0]["loss"], "loss_last": last["loss"],
        "finite": all(r["loss"] is not None and r["loss"] == r["loss"] for r in rows),
        "samples_per_s": last["samples_per_s"], "flop_util": last["flop_util"],
        "peak_flops_per_rank": last["peak_flops_per_rank"], "memory_gb": last["memory_gb"],
        "model": sizes.train_model, "batch": sizes.train_batch, "tile": sizes.train_tile,
    }


def _mfu(sizes: Sizes, compiled: bool) -> dict[str, Any]:
    import torch

    from gfm.model import create_model
    from gfm.train.engine_config import EngineConfig
    from gfm.train.module import compile_model

    device = _device()
    torch.manual_seed(0)
    # bf16: bf16 weights under bf16 autocast, as DeepSpeed's bf16 mode trains (its fp32 master copy aside)
    model = create_model(sizes.mfu_model, patch_size=8, **sizes.mfu_overrides).to(device, _dtype(sizes)).train()
    t0 = time.perf_counter()
    if compiled:
        compile_model(None, model, EngineConfig(compile=True))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    batch = _synthetic_batch(sizes.mfu_bands, sizes.mfu_tile, sizes.mfu_batch, device)

    def step(i: int) -> None:
        with _autocast(device, sizes):
            out = model(batch, generator=torch.Generator(device).manual_seed(i))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(sizes.mfu_warmup):
        step(i)
    _sync(device)
    warm_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for i in range(sizes.mfu_steps):
        step(sizes.mfu_warmup + i)
    _sync(device)
    step_s = (time.perf_counter() - t0) / sizes.mfu_steps
    B, C, H, W = batch.pixels.shape
    flops = 3 * model.flops(B, C, (H, W))  # type: ignore[operator]
    peak, source = _peak(device, sizes)
    return {
        "model": sizes.mfu_model, "batch": B, "bands": C, "tile": H, "compiled": compiled,
        "precision": sizes.precision,
        "step_s": step_s, "samples_per_s": B / step_s, "tflops": flops / step_s / 1e12,
        "mfu": flops / step_s / peak, "peak_tflops": peak / 1e12, "peak_source": source,
        "warmup_s": warm_s,
        "memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
    }


def part_mfu_eager(sizes: Sizes, work: Path) -> dict[str, Any]:
    """LESS-B HyperMAE step MFU, eager."""
    return _mfu(sizes, compiled=False)


def part_mfu_compiled(sizes: Sizes, work: Path) -> dict[str, Any]:
    """LESS-B HyperMAE step MFU with the blocks compiled as ``engine.compile`` does."""
    return _mfu(sizes, compiled=True)


def _time_encoder(name: str, sizes: Sizes, batch: Any, device: Any) -> dict[str, Any]:
    """Best of 3 forward + backward steps of encoder ``name`` (bf16 autocast) and its peak memory growth."""
    import torch

    from gfm.model import create_model

    torch.manual_seed(0)
    model = create_model(name, depth=sizes.dense_depth, patch_size=8).to(device)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with _autocast(device, sizes):
            y = model.forward_features(batch)  # type: ignore[operator]
        y.float().square().mean().backward()
        _sync(device)

    step()  # warm-up (kernels, allocator)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30 if device.type == "cuda" else None
    B, C, H, _ = batch.pixels.shape
    return {"status": "ok", "time_s": min(times), "peak_gb": peak, "flops": model.flops(B, C, H)}  # type: ignore[operator]


def part_less_vs_dense(sizes: Sizes, work: Path) -> dict[str, Any]:
    """Forward + backward time and peak memory of LESS and dense encoders at C = ``dense_channels``."""
    import torch

    from bench.model import reflectance_batch

    device = _device()
    B, C, S = sizes.dense_batch, sizes.dense_channels, sizes.dense_tile
    batch = reflectance_batch(B, C, S).to(device)
    rows: dict[str, Any] = {}
    for name in (f"less_vit_{sizes.dense_width}", f"dense_vit_{sizes.dense_width}"):
        try:
            rows[name] = _time_encoder(name, sizes, batch, device)
        except torch.cuda.OutOfMemoryError:
            rows[name] = {"status": "OOM"}
        if device.type == "cuda":
            torch.cuda.empty_cache()
    less, dense = rows[f"less_vit_{sizes.dense_width}"], rows[f"dense_vit_{sizes.dense_width}"]
    both = less["status"] == dense["status"] == "ok"
    return {
        "channels": C, "batch": B, "tile": S, "depth": sizes.dense_depth, "precision": sizes.precision, "rows": rows,
        "speedup": dense["time_s"] / less["time_s"] if both else None,
        "memory_ratio": dense["peak_gb"] / less["peak_gb"] if both and less["peak_gb"] else None,
    }


def part_loader(sizes: Sizes, work: Path) -> dict[str, Any]:
    """Shards written by ``gfm.shards.build``, read by the loader with a worker per core, moved to the device."""
    import numpy as np

    from gfm.data.config import LoaderConfig
    from gfm.sensors import get_sensor
    from gfm.shards import BuildOptions, DateSpec, FileSpec, SceneSpec, build

    device = _device()
    cores = os.cpu_count() or 1
    bands = get_sensor("sentinel2_l1c").bands  # 13 bands
    rng = np.random.default_rng(0)
    cube = rng.integers(1, 10_000, size=(sizes.cube_side, sizes.cube_side, len(bands)), dtype=np.uint16)
    np.save(work / "cube.npy", cube)
    (work / "wl.txt").write_text(" ".join(str(b.center_nm) for b in bands) + "\n")
    t0 = time.perf_counter()
    report = build([SceneSpec("synthetic", [DateSpec("2021-06-01", [FileSpec(
        str(work / "cube.npy"), wavelengths=str(work / "wl.txt"))])], gsd=10.0)],
        BuildOptions(out=str(work / "shards"), tile=sizes.loader_tile, workers=cores, progress=False,
                     shard_size=64 * 1024**2))
    build_s = time.perf_counter() - t0
    workers = max(1, cores - 1)  # one core is left to the process that feeds the GPU
    data = LoaderConfig(shards=str(work / "shards"), batch_size=sizes.loader_batch, num_workers=workers,
                        pin_memory=device.type == "cuda").build(0, 1)
    samples, epoch, started = 0, 0, None
    while True:
        data.set_epoch(epoch)
        for batch in data:
            batch = batch.to(device, non_blocking=True)
            if started is None:  # the first batch pays for starting the workers
                _sync(device)
                started = time.perf_counter()
                continue
            samples += int(batch.pixels.shape[0])
            if time.perf_counter() - started >= sizes.loader_seconds:
                break
        else:
            epoch += 1
            continue
        break
    _sync(device)
    assert started is not None
    rate = samples / (time.perf_counter() - started)
    return {"cores": cores, "workers": workers, "tiles_written": report.samples, "build_s": build_s,
            "batch": sizes.loader_batch, "bands": len(bands), "tile": sizes.loader_tile,
            "samples_per_s": rate}


def part_agreement(sizes: Sizes, work: Path) -> dict[str, Any]:
    """Differences from the CPU reference path in fp32: CPU fast paths, CPU bf16, CUDA fp32 and bf16."""
    import torch

    from bench.model import reflectance_batch
    from gfm.model import create_model, fused

    torch.manual_seed(0)
    model = create_model("less_vit_tiny", depth=2, patch_size=8)
    batch = reflectance_batch(2, 13, 32)

    def run(device: str, fast: bool, bf16: bool) -> torch.Tensor:
        m = model.to(device)
        m.zero_grad(set_to_none=True)
        with fused.use_fused(fast), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            y = m.forward_features(batch.to(device))  # type: ignore[operator]
        (y.float() * torch.linspace(-1, 1, y.shape[-1], device=device)).sum().backward()
        grads = [p.grad.flatten() for p in m.parameters() if p.grad is not None]
        return torch.cat([y.detach().float().flatten(), *grads]).double().cpu()

    ref = run("cpu", False, False)
    scale = ref.abs().max().item()
    rows: dict[str, Any] = {}
    ways = [("cpu fast fp32", "cpu", True, False), ("cpu bf16", "cpu", False, True)]
    if torch.cuda.is_available():
        ways += [("cuda fp32", "cuda", False, False), ("cuda bf16", "cuda", False, True)]
    for name, device, fast, bf16 in ways:
        diff = (run(device, fast, bf16) - ref).abs()
        rows[name] = {"max_abs": diff.max().item(), "max_rel": diff.max().item() / scale,
                      "mean_abs": diff.mean().item()}
    return {"model": "less_vit_tiny depth 2", "batch": "2 × 13 bands × 32²", "values": ref.numel(), "rows": rows}


PART_FUNCS: dict[str, Callable[[Sizes, Path], dict[str, Any]]] = {
    "train": part_train, "mfu_eager": part_mfu_eager, "mfu_compiled": part_mfu_compiled,
    "less_vs_dense": part_less_vs_dense, "loader": part_loader, "agreement": part_agreement,
}


def run_part(name: str, dry: bool, result: Path) -> int:
    """Child process: run one part and write its JSON to ``result`` (the error, if any, too)."""
    sizes = DRY if dry else GPU
    with tempfile.TemporaryDirectory(prefix=f"gpu_check_{name}_") as tmp:
        try:
            out = {"status": "ok", **PART_FUNCS[name](sizes, Path(tmp))}
        except Exception as e:  # recorded and reported by the parent; the other parts still run
            out = {"status": "error", "error": f"{type(e).__name__}: {e}"[-2000:],
                   "traceback": traceback.format_exc()[-4000:]}
    result.write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0 if out["status"] == "ok" else 1


# ------------------------------------------------------------------------------------------------
# Setup: the wheels this machine lacks, installed into a scratch folder, and every import checked


class SetupError(RuntimeError):
    """The check cannot start (a wheel, a module or the GPU is missing); the message says which and what to run."""


@dataclass
class Setup:
    """What :func:`prepare` did: the environment every part runs in and the wheels it installed.

    Attributes:
        env: the parts' environment: ``PYTHONPATH`` = ``target`` (if any), the repository, what was there.
        target: the scratch folder the wheels went into (removed when the check ends), or None.
        installed: ``name version`` of each wheel installed there.
        seconds: time spent installing and checking imports.
    """

    env: dict[str, str]
    target: Path | None
    installed: list[str]
    seconds: float


def _pythonpath(first: Iterable[Path | str]) -> str:
    """``first`` ahead of the ``PYTHONPATH`` this process was given, without repeats."""
    paths = [str(x) for x in first] + os.environ.get("PYTHONPATH", "").split(os.pathsep)
    return os.pathsep.join(dict.fromkeys(x for x in paths if x))


def _where(folder: Path) -> str:
    return str(folder.relative_to(REPO)) if folder.is_relative_to(REPO) else str(folder)


def _packaging() -> tuple[Any, Any]:
    """``Requirement`` and ``canonicalize_name`` from packaging, or from the copy pip carries."""
    for base in ("packaging", "pip._vendor.packaging"):
        try:
            return (importlib.import_module(f"{base}.requirements").Requirement,
                    importlib.import_module(f"{base}.utils").canonicalize_name)
        except ImportError:
            continue
    raise SetupError(f"{sys.executable} can import neither packaging nor pip, which reading {MANIFEST} needs")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """``folder/manifest.json`` with every wheel it lists checked, or None when there is none.

    The manifest (written by ``bench.gpu_wheels``) holds ``roots`` (the requirements to install from,
    ``deepspeed>=0.15`` ...) and ``wheels``: rows of ``name`` (canonical), ``version``, ``file``, ``sha256``
    and ``requires`` (that wheel's own requirements on the GPU machine, markers evaluated, extras dropped).
    A wheel missing from ``folder`` or changed since is a :class:`SetupError` naming it and the command
    that gathers it again.
    """
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
        rows = [(str(r["name"]), str(r["file"]), str(r["sha256"]), list(r["requires"])) for r in manifest["wheels"]]
        list(manifest["roots"])
    except (ValueError, KeyError, TypeError) as e:
        raise SetupError(f"{path}: not a wheel manifest ({type(e).__name__}: {e}); gather it again with "
                         f"`{GATHER}`") from e
    bad = []
    for _, file, sha256, _ in rows:
        wheel = folder / file
        if not wheel.is_file():
            bad.append(f"{file} (missing)")
        elif _sha256(wheel) != sha256:
            bad.append(f"{file} (sha256 differs)")
    if bad:
        raise SetupError(f"{_where(folder)}: {len(bad)} of the {len(rows)} wheels in {MANIFEST} are not there as "
                         f"gathered: {', '.join(bad)}; gather them with `{GATHER}` where a package registry can be "
                         f"reached and carry {_where(folder)}/ along")
    return manifest


def _installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def plan_install(manifest: dict[str, Any],
                 installed: Callable[[str], str | None] = _installed_version) -> list[dict[str, Any]]:
    """The manifest's wheels that this interpreter needs, from the manifest's roots down.

    Each requirement this interpreter does not already meet (``installed(name)`` gives the version it
    has, or None) takes its wheel, and that wheel's own requirements are followed. A distribution this
    interpreter has at a fitting version stays (its numpy, its typing-extensions), so the check measures
    the machine's own stack; one it lacks, or has at a version that does not fit, comes from the manifest.
    A requirement met neither way is a :class:`SetupError`.
    """
    Requirement, canonicalize_name = _packaging()
    rows = {canonicalize_name(r["name"]): r for r in manifest["wheels"]}
    chosen: dict[str, dict[str, Any]] = {}
    todo = [(str(r), "the check") for r in manifest["roots"]]
    while todo:
        line, wanted_by = todo.pop(0)
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if name in chosen:
            continue
        have = installed(name)
        if have is not None and req.specifier.contains(have, prereleases=True):
            continue
        if name not in rows:
            raise SetupError(f"{wanted_by} needs {req}, which {sys.executable} "
                             f"{'has at ' + have if have else 'lacks'} and the wheel folder does not hold")
        chosen[name] = rows[name]
        todo.extend((r, f"{name} {rows[name]['version']}") for r in rows[name]["requires"])
    return sorted(chosen.values(), key=lambda r: str(r["name"]))


def _unpack_wheel(wheel: Path, target: Path) -> None:
    """What ``pip install --target`` does with ``wheel``, for an interpreter without pip.

    Unpack it and lift ``*.data/purelib`` and ``*.data/platlib`` to the top (scripts and headers are not needed).
    """
    with zipfile.ZipFile(wheel) as z:
        z.extractall(target)
    for data in target.glob("*.data"):
        for kind in ("purelib", "platlib"):
            if (data / kind).is_dir():
                shutil.copytree(data / kind, target, dirs_exist_ok=True)
        shutil.rmtree(data)


def install_wheels(wheels: list[Path], target: Path) -> None:
    """``pip install --no-index --no-deps --target target`` of ``wheels`` with this interpreter.

    Where the interpreter has no pip, :func:`_unpack_wheel` does it; a failure is a :class:`SetupError`
    with pip's last lines.
    """
    target.mkdir(parents=True, exist_ok=True)
    if importlib.util.find_spec("pip") is None:
        for wheel in wheels:
            _unpack_wheel(wheel, target)
        return
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--disable-pip-version-check", "--target", str(target), *map(str, wheels)]
    env = dict(os.environ, PIP_ROOT_USER_ACTION="ignore", PIP_NO_INPUT="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
        raise SetupError(f"pip install --target {target} of {len(wheels)} wheel(s) exited {proc.returncode}: {tail}")


_VERIFY = """
import importlib, json, sys
failed = {}
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except BaseException as e:  # whatever an import raises (ImportError, OSError of a shared library, ...)
        failed[name] = (type(e).__name__ + ": " + str(e)).splitlines()[0][:300]
print("gpu_check imports " + json.dumps(failed))
"""


def verify_imports(modules: Iterable[str], env: dict[str, str], timeout: float = 300.0) -> dict[str, str]:
    """Import ``modules`` in a fresh process with ``env`` (as the parts will); the ones that fail, with why."""
    names = list(dict.fromkeys(modules))
    try:
        proc = subprocess.run([sys.executable, "-c", _VERIFY, *names], env=env, cwd=REPO, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise SetupError(f"importing {', '.join(names)} took more than {timeout:.0f} s") from e
    line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("gpu_check imports ")), None)
    if line is None:
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
        raise SetupError(f"importing {', '.join(names)} exited {proc.returncode} without a result: {tail}")
    failed: dict[str, str] = json.loads(line.removeprefix("gpu_check imports "))
    return failed


def prepare(folder: Path, modules: Iterable[str], dry: bool = False) -> Setup:
    """Install what this interpreter lacks from the wheel folder, then check that ``modules`` import.

    Without a manifest in ``folder`` nothing is installed, which is enough where the project's ``.venv``
    runs the check; with one, :func:`plan_install` picks the wheels and :func:`install_wheels` puts them
    into a fresh scratch folder. Either way every module is imported in a fresh process with the parts'
    environment before any part runs; a failure is a :class:`SetupError` naming the modules and what to do.
    """
    t0 = time.monotonic()
    manifest = read_manifest(folder)
    target: Path | None = None
    installed: list[str] = []
    if manifest is not None:
        rows = plan_install(manifest)
        if rows:
            target = Path(tempfile.mkdtemp(prefix="gpu_check_site_"))
            try:
                install_wheels([folder / r["file"] for r in rows], target)
            except BaseException:
                shutil.rmtree(target, ignore_errors=True)
                raise
            installed = [f"{r['name']} {r['version']}" for r in rows]
    env = dict(os.environ, PYTHONPATH=_pythonpath([*([target] if target else []), REPO]))
    if dry:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is the CPU path even on a GPU machine
    failed = verify_imports(modules, env)
    if failed:
        if target is not None:
            shutil.rmtree(target, ignore_errors=True)
        what = "; ".join(f"{m} ({why})" for m, why in failed.items())
        if manifest is None:
            raise SetupError(f"{_where(folder)}/{MANIFEST}: not found, and what the parts need does not import "
                             f"here: {what}; gather the wheels with `{GATHER}` where a package registry can be "
                             f"reached and carry {_where(folder)}/ along")
        raise SetupError(f"what the parts need does not import after installing {len(installed)} wheel(s) from "
                         f"{_where(folder)}: {what}")
    return Setup(env, target, installed, time.monotonic() - t0)


def cuda_device() -> str | None:
    """The first CUDA device's name, or None when torch sees none."""
    try:
        import torch
    except ImportError as e:
        raise SetupError(f"{sys.executable} cannot import torch ({e}); the check measures the machine's own "
                         "PyTorch") from e
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


# ------------------------------------------------------------------------------------------------
# Parent: run the parts, time-boxed, and report


def environment(setup: Setup | None = None) -> dict[str, Any]:
    """Versions and the device, for the JSON header (DeepSpeed's as the parts see it, wheels included)."""
    import torch

    env: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "cpus": os.cpu_count(),
                           "device": "cpu", "load_average": os.getloadavg()[0]}
    paths = ([str(setup.target)] if setup is not None and setup.target is not None else []) + sys.path
    dist = next(iter(importlib.metadata.distributions(name="deepspeed", path=paths)), None)
    env["deepspeed"] = dist.version if dist is not None else "not installed"
    if setup is not None:
        env["wheels_installed"] = setup.installed
        env["setup_s"] = setup.seconds
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["gpu_memory_gb"] = torch.cuda.get_device_properties(0).total_memory / 2**30
        env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        env["datasheet_peak_tflops"] = (datasheet_peak(env["device"]) or 0.0) / 1e12
    return env


def _fmt(v: Any, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(report: dict[str, Any]) -> str:
    """The report as a plain-text table (what is printed and written beside the JSON)."""
    p = report["parts"]
    env = report["environment"]
    wheels = f", {len(env['wheels_installed'])} wheels installed" if env.get("wheels_installed") else ""
    lines = [f"gfm GPU check ({'dry, CPU' if report['dry'] else 'GPU'}): {env['device']}, torch {env['torch']}, "
             f"deepspeed {env.get('deepspeed')}{wheels}, {env['cpus']} CPUs, {report['total_s']:.0f} s"]
    lines.append(f"{'part':<15} {'status':<8} {'s':>6}  figures")
    for name in PARTS:
        r = p.get(name, {"status": "skipped"})
        figures = ""
        if r["status"] == "ok":
            if name == "train":
                figures = (f"{r['backend']}, ZeRO 1 bf16, {r['model']}: loss {r['loss_first']:.3f} -> "
                           f"{r['loss_last']:.3f}, {r['samples_per_s']:.1f} samples/s, MFU "
                           f"{_fmt(r['flop_util'], '.3f')}, {_fmt(r['memory_gb'], '.1f')} GB")
            elif name.startswith("mfu"):
                figures = (f"{r['model']} B{r['batch']} C{r['bands']} {r['tile']}²: {r['step_s'] * 1e3:.1f} ms/step, "
                           f"{r['samples_per_s']:.0f} samples/s, {r['tflops']:.3g} TFLOP/s, MFU {r['mfu']:.3f} "
                           f"(peak {r['peak_tflops']:.3g}, {r['peak_source']}), warm-up {r['warmup_s']:.0f} s")
            elif name == "less_vs_dense":
                cells = []
                for model, row in r["rows"].items():
                    cells.append(f"{model} {row['time_s']:.3f} s {_fmt(row['peak_gb'], '.2f')} GB"
                                 if row["status"] == "ok" else f"{model} {row['status']}")
                figures = (f"C {r['channels']}, B {r['batch']}: " + "; ".join(cells)
                           + f"; dense/LESS time {_fmt(r['speedup'], '.2f')}, memory {_fmt(r['memory_ratio'], '.2f')}")
            elif name == "agreement":
                figures = "vs CPU reference fp32: " + "; ".join(
                    f"{way} max abs {row['max_abs']:.2g} rel {row['max_rel']:.2g}" for way, row in r["rows"].items())
            elif name == "loader":
                figures = (f"{r['workers']} workers, {r['bands']} bands {r['tile']}²: {r['samples_per_s']:.0f} "
                           f"samples/s to the device ({r['tiles_written']} tiles written in {r['build_s']:.0f} s)")
        else:
            figures = r.get("error", "")[-200:]
        lines.append(f"{name:<15} {r['status']:<8} {_fmt(r.get('wall_s'), '6.0f')}  {figures}")
    d = report["derived"]
    lines.append(f"RESULT mfu_eager={_fmt(d.get('mfu_eager'), '.4f')} "
                 f"mfu_compiled={_fmt(d.get('mfu_compiled'), '.4f')} "
                 f"compiled_speedup={_fmt(d.get('compiled_speedup'), '.3f')} "
                 f"dense_over_less_c{report.get('dense_channels')}={_fmt(d.get('dense_over_less'), '.2f')} "
                 f"loader_headroom={_fmt(d.get('loader_headroom'), '.2f')} "
                 f"parts_ok={sum(p[n]['status'] == 'ok' for n in p)}/{len(PARTS)}")
    return "\n".join(lines)


def derive(parts: dict[str, Any]) -> dict[str, Any]:
    """Ratios across parts: compiled vs eager, dense vs LESS, loader vs the eager step's demand."""
    def ok(name: str) -> dict[str, Any] | None:
        r = parts.get(name)
        return r if r is not None and r["status"] == "ok" else None

    d: dict[str, Any] = {}
    eager, compiled, dense, loader = ok("mfu_eager"), ok("mfu_compiled"), ok("less_vs_dense"), ok("loader")
    if eager:
        d["mfu_eager"] = eager["mfu"]
    if compiled:
        d["mfu_compiled"] = compiled["mfu"]
    if eager and compiled:
        d["compiled_speedup"] = eager["step_s"] / compiled["step_s"]
    if dense:
        d["dense_over_less"] = dense["speedup"]
    if loader and eager:
        d["loader_headroom"] = loader["samples_per_s"] / eager["samples_per_s"]
    return d


def main(argv: list[str] | None = None) -> int:
    """Install and check what the parts import, then run each part in its own time-boxed process.

    Writes the JSON and the table. Exit 0 when every part is ok, 1 when one is not, 2 when the check cannot
    start (one line on stderr says why: no GPU, a wheel or a module missing).
    """
    p = argparse.ArgumentParser(prog="gfm bench gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", action="store_true", help="the same code on the CPU with tiny sizes")
    p.add_argument("--dry-if-no-gpu", action="store_true",
                   help="where torch sees no CUDA device, run --dry instead of stopping")
    p.add_argument("--wheels", type=Path, default=WHEELS,
                   help=f"wheel folder from `{GATHER}` (default: {_where(WHEELS)}); installed where needed")
    p.add_argument("--out", default="runs/gpu_check/gpu_check.json", help="JSON report (table beside it, .txt)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for all parts together (default: the sum of the parts' boxes)")
    p.add_argument("--part", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.part:
        return run_part(args.part, args.dry, Path(args.result))

    parts = [x for x in args.parts.split(",") if x]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"--parts: unknown {unknown} (known: {', '.join(PARTS)})")
    try:
        if not args.dry and cuda_device() is None:
            if not args.dry_if_no_gpu:
                raise SetupError("no CUDA device: torch sees none here; run this on a GPU machine, or pass --dry "
                                 "(or --dry-if-no-gpu) for the same code on the CPU at tiny sizes")
            print("gpu check: no CUDA device; running the dry mode on the CPU (--dry-if-no-gpu)", file=sys.stderr)
            args.dry = True
        setup = prepare(args.wheels, [m for n in parts for m in PART_MODULES[n]], args.dry)
    except SetupError as e:
        print(f"gpu check: {e}", file=sys.stderr)
        return 2
    print(f"  setup: {len(setup.installed)} wheel(s) installed"
          f"{f' into {setup.target}' if setup.target else ''}, imports ok ({setup.seconds:.0f} s)",
          file=sys.stderr, flush=True)
    try:
        return _run(args, parts, setup)
    finally:
        if setup.target is not None:
            shutil.rmtree(setup.target, ignore_errors=True)


def _run(args: argparse.Namespace, parts: list[str], setup: Setup) -> int:
    """The parts one after the other within the budget, the JSON after each, the table at the end."""
    sizes = DRY if args.dry else GPU
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the running part too (see _child)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    budget = args.budget if args.budget is not None else sum(sizes.boxes[n] for n in parts)
    start = time.monotonic()
    report: dict[str, Any] = {"dry": args.dry, "environment": environment(setup), "sizes": asdict(sizes),
                              "dense_channels": sizes.dense_channels, "parts": {}, "derived": {}, "total_s": 0.0}
    for name in parts:
        left = budget - (time.monotonic() - start)
        box = min(sizes.boxes[name], left)
        t0 = time.monotonic()
        if box < MIN_BOX_S:
            result: dict[str, Any] = {"status": "skipped", "error": f"no time left in the {budget:.0f} s budget"}
        else:
            result = _child(name, args.dry, box, setup.env, out.parent)
        result["wall_s"] = time.monotonic() - t0
        report["parts"][name] = result
        report["derived"] = derive(report["parts"])
        report["total_s"] = time.monotonic() - start
        out.write_text(json.dumps(report, indent=2, default=str) + "\n")  # a cut-short run keeps its parts
        print(f"  {name}: {result['status']} ({result['wall_s']:.0f} s)", file=sys.stderr, flush=True)
    text = table(report)
    out.with_suffix(".txt").write_text(text + "\n")
    print(text)
    print(f"wrote {out} and {out.with_suffix('.txt')}")
    return 0 if all(r["status"] == "ok" for r in report["parts"].values()) else 1


def _child(name: str, dry: bool, box: float, env: dict[str, str], where: Path) -> dict[str, Any]:
    """Run one part in a fresh process group, killed after ``box`` seconds; its result or its error."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=where, delete=False) as f:
        result_path = Path(f.name)
    cmd = [sys.executable, "-m", "bench.gpu_check", "--part", name, "--result", str(result_path)]
    cmd += ["--dry"] if dry else []
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=box)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the part and anything it started (torchrun, loader workers)
        log, _ = proc.communicate()
        result_path.unlink(missing_ok=True)
        return {"status": "timeout", "error": f"killed after its {box:.0f} s box; last output: "
                                              f"{(log or '').strip()[-800:]}"}
    finally:
        if proc.poll() is None:  # the check itself is being stopped (SIGTERM from gpu_check.sh's timeout)
            os.killpg(proc.pid, signal.SIGKILL)
    try:
        result: dict[str, Any] = json.loads(result_path.read_text())
    except (OSError, json.JSONDecodeError):
        result = {"status": "error", "error": f"exit {proc.returncode} without a result: "
                                              f"{(log or '').strip()[-1500:]}"}
    result_path.unlink(missing_ok=True)
    return result


if __name__ == "__main__":
    sys.exit(main())
