"""Training benchmark: samples/s and FLOP utilisation of the real engine, 1 vs 2 ranks, LESS vs dense.

Each row is a real pretraining run (``gfm.train.run``: DeepSpeed, ZeRO 1, the synthetic
Sentinel-2 stream, 12 bands, 32 × 32 tiles, batch 8 per rank) of HyperMAE-Tiny in a fresh process
(``torchrun`` for 2 ranks), each rank with ``--threads-per-rank`` CPU threads (default 1).
Throughput is read from the run's ``metrics.jsonl`` over the steps after
the first logging window (start-up, the peak probe and the first steps are excluded). FLOP utilisation
is the model's analytic training FLOPs per second (3 × forward) over the matmul peak that every rank
measures at start (``gfm.train.flops.measure_peak_flops``, same precision as the run).

Rows:

- ``less 1 rank`` / ``less 2 ranks``: HyperMAE on LESS ViT-Tiny; scaling = 2-rank samples/s ÷ (2 × 1-rank);
- ``dense 1 rank``: the same HyperMAE with the dense joint-attention reference encoder;
- ``less compiled``: ``less 1 rank`` with ``engine.compile=true`` (each LESS block compiled by
  inductor; the compile happens in the first logging window, which is not timed);
- ``less reference``: ``less 1 rank`` on the reference path of :mod:`gfm.model.attention` (``GFM_FUSED=0``:
  the CPU fast paths of :mod:`gfm.model.fused` off; what CUDA runs).

Run: ``python -m bench.train`` (``--steps``, ``--precision``, ``--tile``, ``--rows``). The last line is
``RESULT flop_util=<tiny, 1 rank> scaling_2=<2-rank samples/s ÷ (2 × 1-rank)>
compiled_speedup=<less compiled ÷ less 1 rank samples/s> fused_speedup=<less 1 rank ÷ less reference samples/s>``.
FLOP utilisation counts the model's FLOPs (the reference path's) whichever path runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def overrides(args: argparse.Namespace, run_dir: Path) -> list[str]:
    """The config overrides of one benchmark run."""
    return [
        f"run_dir={run_dir}", f"steps={args.steps}", "seed=0",
        "data.source=synthetic", f"data.synthetic.tile={args.tile}", "data.synthetic.batch_size=8",
        "model.name=hypermae_less_tiny", "model.patch_size=8",
        "schedule.warmup_steps=2", "optim.ref_batch=16",
        "engine.zero_stage=1", f"engine.precision={args.precision}",
        "checkpoint.every=0", "checkpoint.export=false",
        f"logging.every={args.window}", "logging.progress=false", "logging.tensorboard=false",
    ]


def worker(argv: list[str]) -> int:
    """One run in this process (under torchrun for several ranks)."""
    from gfm.config import load
    from gfm.model.registry import create_model
    from gfm.train.config import TrainConfig
    from gfm.train.runner import run_guarded, seed_everything

    attention, rest = argv[0], argv[1:]
    cfg = load(TrainConfig, None, rest)
    seed_everything(cfg.seed)
    model = create_model(cfg.model.name, patch_size=cfg.model.patch_size, attention=attention)
    return run_guarded(cfg, model=model, prog="bench.train")


#: (row, attention, ranks, extra config overrides, extra environment)
ROWS: tuple[tuple[str, str, int, tuple[str, ...], dict[str, str]], ...] = (
    ("less 1 rank", "less", 1, (), {}),
    ("less 2 ranks", "less", 2, (), {}),
    ("dense 1 rank", "dense", 1, (), {}),
    ("less compiled", "less", 1, ("engine.compile=true",), {}),
    ("less reference", "less", 1, (), {"GFM_FUSED": "0"}),
)


def measure(args: argparse.Namespace, attention: str, nproc: int, extra: tuple[str, ...] = (),
            environ: dict[str, str] | None = None) -> dict[str, float]:
    """Run one configuration in fresh processes; its mean throughput and FLOP utilisation after warm-up."""
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        run_dir = Path(tmp) / "run"
        cmd_args = ["-m", "bench.train", "--worker", attention, *overrides(args, run_dir), *extra]
        if nproc == 1:
            cmd = [sys.executable, *cmd_args]
        else:
            torchrun = str(Path(sys.executable).with_name("torchrun"))
            cmd = [torchrun, "--standalone", f"--nproc_per_node={nproc}", *cmd_args]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads_per_rank), PYTHONPATH=str(REPO), **(environ or {}))
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{attention} × {nproc} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = rows[1:] or rows  # the first window holds start-up effects
    sps = sum(r["samples_per_s"] for r in timed) / len(timed)
    return {
        "samples_per_s": sps,
        "flops_per_s": sum(r["flops_per_s"] for r in timed) / len(timed),
        "flop_util": sum(r["flop_util"] for r in timed) / len(timed),
        "peak": timed[-1]["peak_flops_per_rank"],
        "loss": timed[-1]["loss"],
    }


def main(argv: list[str] | None = None) -> int:
    """Run the three configurations and print the table (``--worker`` runs one of them in-process)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--worker":
        return worker(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--window", type=int, default=4, help="steps per throughput window")
    p.add_argument("--tile", type=int, default=32)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--threads-per-rank", type=int, default=1,
                   help="CPU threads per rank (the same for 1 and 2 ranks: scaling is per worker)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per run (a compiled run compiles first)")
    p.add_argument("--rows", default=",".join(r[0] for r in ROWS), help="comma-separated rows to run")
    args = p.parse_args(argv)

    wanted = set(args.rows.split(","))
    unknown = wanted - {r[0] for r in ROWS}
    if unknown:
        p.error(f"--rows: unknown {sorted(unknown)} (known: {', '.join(r[0] for r in ROWS)})")
    load_before = os.getloadavg()[0]
    results = {}
    for name, attention, nproc, extra, environ in ROWS:
        if name in wanted:
            results[name] = r = measure(args, attention, nproc, extra, environ)
            print(f"  {name}: {r['samples_per_s']:.2f} samples/s", file=sys.stderr, flush=True)

    nan = {"samples_per_s": math.nan, "flop_util": math.nan}
    one = results.get("less 1 rank", nan)
    scaling = results.get("less 2 ranks", nan)["samples_per_s"] / (2 * one["samples_per_s"])
    print(f"HyperMAE-Tiny, synthetic S2 (12 bands, {args.tile}²), batch 8/rank, ZeRO 1, {args.precision}, "
          f"{args.steps} steps, {args.threads_per_rank} thread(s) per rank; load average "
          f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"{'run':<14} {'samples/s':>10} {'GFLOP/s':>9} {'peak GFLOP/s/rank':>18} {'FLOP util':>10}")
    for name, r in results.items():
        print(f"{name:<14} {r['samples_per_s']:>10.2f} {r['flops_per_s'] / 1e9:>9.2f} "
              f"{r['peak'] / 1e9:>18.1f} {r['flop_util']:>10.3f}")
    ratio = one["samples_per_s"] / results.get("dense 1 rank", nan)["samples_per_s"]
    compiled = results.get("less compiled", nan)["samples_per_s"] / one["samples_per_s"]
    fast = one["samples_per_s"] / results.get("less reference", nan)["samples_per_s"]
    print(f"scaling 2 ranks: {scaling:.2f}; LESS / dense samples/s: {ratio:.2f}; compiled / eager: {compiled:.2f}; "
          f"fast paths / reference: {fast:.2f}")
    print(f"RESULT flop_util={one['flop_util']:.4f} scaling_2={scaling:.3f} compiled_speedup={compiled:.3f} "
          f"fused_speedup={fast:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
