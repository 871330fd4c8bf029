"""Fine-tuning benchmark: step time and peak memory of ``lora`` vs ``full`` on the same model and batch.

Each method runs in a fresh subprocess through the fine-tuning engine itself: the task model (encoder +
scene-classification head), the method applied by :func:`gfm.finetune.methods.apply_method`, and
``gfm.train``'s ``TrainModule`` (DeepSpeed, ZeRO 0, AdamW with the fine-tuning parameter groups), one
optimizer step per ``train_step`` on a fixed random batch.

- **Time**: the best of ``--steps`` timed optimizer steps after two warm-up steps (forward, backward,
  update), best again over ``--rounds`` rounds that alternate the methods (a fresh process each), so a
  passing disturbance on a shared machine does not land on one method only.
- **Peak memory**: on CUDA, ``max_memory_allocated`` over model build, engine start and the steps; on
  the CPU, the growth of the process's peak resident set (``VmHWM``, reset after the imports, whose own
  peak would hide a small model; ``getrusage`` where that cannot be reset) from before the model is built
  to after the last step (the largest over the rounds). Both count weights, gradients, optimizer state
  and activations.

Run: ``python -m bench.finetune`` (``gfm bench finetune``); ``--model``, ``--depth``, ``--batch-size``,
``--channels``, ``--tile``, ``--rank`` change the workload. The last line is
``RESULT lora_mem_ratio=... lora_time_ratio=...`` (LoRA over full; lower is better).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Any, cast

METHODS = ("full", "lora")


def child(args: argparse.Namespace) -> None:
    """One method: build, start the engine, time optimizer steps, print a JSON line."""
    import torch

    from gfm import distributed as gdist

    torch.set_num_threads(args.threads)
    info = gdist.init_distributed()
    device = info.device
    import deepspeed  # noqa: F401  (imported by both methods before the baseline: not part of the figure)
    import peft  # noqa: F401

    from gfm.batch import Batch
    from gfm.config import load
    from gfm.finetune.config import FinetuneConfig
    from gfm.finetune.methods import apply_method, parameter_counts
    from gfm.finetune.model import TaskModel
    from gfm.model import create_model
    from gfm.train.module import TrainModule

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()  # the imports' own peak would hide a small model's growth
    rss0 = peak_rss_kib()  # after every import

    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    cfg = load(FinetuneConfig, None, [
        "data.shards=bench", "data.task=scene", f"data.batch_size={args.batch_size}", f"method.name={args.method}",
        f"method.lora.rank={args.rank}", f"method.lora.alpha={2 * args.rank}", "engine.zero_stage=0",
        f"engine.precision={precision}", "schedule.warmup_steps=1", "steps=100",
    ])
    torch.manual_seed(0)
    encoder = create_model(args.model, depth=args.depth, patch_size=8)
    model = apply_method(TaskModel(encoder, "scene", 10, cfg.head), cfg.method)
    counts = parameter_counts(model)
    module = TrainModule(model, cast(Any, cfg))
    B, C, S = args.batch_size, args.channels, args.tile
    g = torch.Generator().manual_seed(0)
    batch = Batch(
        pixels=torch.randn(B, C, S, S, generator=g),
        wavelength=torch.linspace(440.0, 2200.0, C).repeat(B, 1),
        bandwidth=torch.full((B, C), 30.0),
        kind=torch.zeros(B, C, dtype=torch.long),
        time=torch.full((B, C), 19000.0),
        valid=torch.ones(B, C, S, S, dtype=torch.bool),
        gsd=torch.full((B,), 10.0),
        label=torch.randint(0, 10, (B,), generator=g),
    )

    def step(i: int) -> float:
        t0 = time.perf_counter()
        module.train_step([batch], i)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    step(0)
    step(1)
    times = [step(2 + i) for i in range(args.steps)]
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
        how = "cuda max_memory_allocated"
    else:
        peak_mb = (peak_rss_kib() - rss0) / 1024
        how = "peak RSS growth (VmHWM)"
    print(json.dumps({"time_s": min(times), "peak_mb": peak_mb, "method": how, "device": str(device),
                      "precision": precision, **counts}))
    gdist.destroy()


def run_one(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """One method in a fresh subprocess (its own peak memory)."""
    cmd = [sys.executable, "-m", "bench.finetune", "--child", "--method", method, "--model", args.model,
           "--depth", str(args.depth), "--batch-size", str(args.batch_size), "--channels", str(args.channels),
           "--tile", str(args.tile), "--rank", str(args.rank), "--steps", str(args.steps),
           "--threads", str(args.threads)] + (["--precision", args.precision] if args.precision else [])
    # glibc: serve every allocation over 64 KiB from mmap, returned on free, so the resident set follows what
    # is live (by default the mmap threshold adapts upwards and freed activations linger in the heap)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MALLOC_MMAP_THRESHOLD_="65536")
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if res.returncode != 0:
        raise SystemExit(f"bench.finetune: {method} failed (rc {res.returncode}):\n{res.stderr[-3000:]}")
    out: dict[str, Any] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def reset_peak_rss() -> None:
    """Reset the process's peak resident set to its current size (Linux: ``5`` to ``/proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux, or not allowed: the peak then includes the imports'


def peak_rss_kib() -> int:
    """The process's peak resident set in KiB (``VmHWM``, which :func:`reset_peak_rss` resets; else getrusage)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _load() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    """Run both methods, print the table and the RESULT line."""
    p = argparse.ArgumentParser(prog="gfm bench finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="less_vit_small")
    p.add_argument("--depth", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--channels", type=int, default=13)
    p.add_argument("--tile", type=int, default=32)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--steps", type=int, default=5, help="timed optimizer steps (after 2 warm-up steps)")
    p.add_argument("--rounds", type=int, default=2, help="rounds alternating the methods (best time, largest peak)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--precision", choices=["fp32", "bf16"], help="default: bf16 on CUDA, fp32 on the CPU")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in METHODS}
    for _ in range(max(1, args.rounds)):
        for m in METHODS:
            runs[m].append(run_one(args, m))
    rows = {m: dict(r[0], time_s=min(x["time_s"] for x in r), peak_mb=max(x["peak_mb"] for x in r))
            for m, r in runs.items()}
    dev = rows["full"]["device"]
    print(f"# lora vs full fine-tuning step: {args.model} depth {args.depth}, batch {args.batch_size}, "
          f"{args.channels} bands {args.tile}x{args.tile}, p 8, LoRA r={args.rank} on attention+pools+MLP, "
          f"{dev} {rows['full']['precision']}, {args.threads} thread(s)")
    print(f"{'method':<8}{'trainable':>14}{'total':>14}{'share %':>9}{'step s':>10}{'peak MB':>10}")
    print("-" * 65)
    for m, r in rows.items():
        share = 100 * r["trainable"] / r["total"]
        print(f"{m:<8}{r['trainable']:>14,}{r['total']:>14,}{share:>9.2f}{r['time_s']:>10.3f}{r['peak_mb']:>10.0f}")
    mem = rows["lora"]["peak_mb"] / rows["full"]["peak_mb"]
    tim = rows["lora"]["time_s"] / rows["full"]["time_s"]
    print(f"{'lora/full':<36}{'':>9}{tim:>10.2f}{mem:>10.2f}")
    print(f"# time: best of {args.steps} optimizer steps after 2 warm-up, over {max(1, args.rounds)} alternating "
          f"rounds; memory: {rows['full']['method']} from before the model is built (weights, gradients, optimizer "
          f"state, activations), the largest over the rounds; load average {_load()}")
    print(f"RESULT lora_mem_ratio={mem:.3f} lora_time_ratio={tim:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
