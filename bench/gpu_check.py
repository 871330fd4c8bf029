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
- ``loader``: synthetic 13-band shards written by ``gfm.shards.build`` into a temporary directory, then
  the shard loader with one worker per CPU core delivering batches to the GPU; samples/s against the
  rate the eager LESS-B step consumes (``loader_headroom`` > 1: the loader keeps up).

``--dry`` runs the same code on the CPU with tiny sizes (gloo instead of NCCL, the measured matmul
peak instead of a datasheet one), which is what the tests run. The JSON (``--out``, default
``runs/gpu_check/gpu_check.json``) is rewritten after every part, so a run cut short keeps what it
measured; the table is printed and written beside it (``.txt``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

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
    boxes={"train": 100, "mfu_eager": 60, "mfu_compiled": 150, "less_vs_dense": 60, "loader": 60},
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
    boxes={"train": 300, "mfu_eager": 120, "mfu_compiled": 600, "less_vs_dense": 120, "loader": 180},
)
PARTS = ("train", "mfu_eager", "mfu_compiled", "less_vs_dense", "loader")
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
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--standalone", "--nproc_per_node=1", "-m", "pretrain", f"run_dir={run_dir}",
           f"steps={sizes.train_steps}", f"model.name={sizes.train_model}", "model.patch_size=8",
           "data.source=synthetic", f"data.synthetic.tile={sizes.train_tile}",
           f"data.synthetic.batch_size={sizes.train_batch}", "engine.zero_stage=1", "engine.precision=bf16",
           "schedule.warmup_steps=1", "checkpoint.every=0", "checkpoint.export=false",
           f"logging.every={max(1, sizes.train_steps // 3)}", "logging.progress=false", "logging.tensorboard=false",
           f"logging.peak_flops={peak or 0.0}"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
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


PART_FUNCS: dict[str, Callable[[Sizes, Path], dict[str, Any]]] = {
    "train": part_train, "mfu_eager": part_mfu_eager, "mfu_compiled": part_mfu_compiled,
    "less_vs_dense": part_less_vs_dense, "loader": part_loader,
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
# Parent: run the parts, time-boxed, and report


def environment() -> dict[str, Any]:
    """Versions and the device, for the JSON header."""
    import torch

    env: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "cpus": os.cpu_count(),
                           "device": "cpu", "load_average": os.getloadavg()[0]}
    try:
        import deepspeed

        env["deepspeed"] = deepspeed.__version__
    except ImportError as e:
        env["deepspeed"] = f"unavailable: {e}"
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
    lines = [f"gfm GPU check ({'dry, CPU' if report['dry'] else 'GPU'}): {env['device']}, torch {env['torch']}, "
             f"deepspeed {env.get('deepspeed')}, {env['cpus']} CPUs, {report['total_s']:.0f} s"]
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
    """Run every part (or ``--parts``) in its own time-boxed process; write the JSON and the table."""
    p = argparse.ArgumentParser(prog="gfm bench gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", action="store_true", help="the same code on the CPU with tiny sizes")
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
    sizes = DRY if args.dry else GPU
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the running part too (see _child)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    budget = args.budget if args.budget is not None else sum(sizes.boxes[n] for n in parts)
    start = time.monotonic()
    report: dict[str, Any] = {"dry": args.dry, "environment": environment(), "sizes": asdict(sizes),
                              "dense_channels": sizes.dense_channels, "parts": {}, "derived": {}, "total_s": 0.0}
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if args.dry:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the dry run is the CPU path even on a GPU machine
    for name in parts:
        left = budget - (time.monotonic() - start)
        box = min(sizes.boxes[name], left)
        t0 = time.monotonic()
        if box < MIN_BOX_S:
            result: dict[str, Any] = {"status": "skipped", "error": f"no time left in the {budget:.0f} s budget"}
        else:
            result = _child(name, args.dry, box, env, out.parent)
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
