"""The LESS block's two paths on this CPU: the reference (what CUDA runs) against the fast paths, by grid size.

Two blocks of width 192 (``less_vit_tiny``'s: 3 heads, ``d_c`` 4, rank 1), forward + backward (loss = mean
square of the output), on grids from a batch of one-pixel samples (pixel context, per-pixel fine-tuning:
a few rows, one position) to one tile of 200 observations (``201 × 65`` tokens). Each grid runs both
paths in one process, a step of each in turn (``gfm.model.fused.use_fused``), after a warm-up step of
each; the time is each path's median step. ``ref / fast`` above 1: the fast paths pay there. Grids under
``gfm.model.fused._MIN_GRID_TOKENS`` tokens take the reference path in a model whatever the switch says;
here both are forced, so the table shows why that threshold sits where it does.

Run: ``python -m bench.paths`` (``--threads``, ``--steps``, ``--grids B:R:P,...``). The last line is
``RESULT ref_over_fast_<R>x<P>=... ...``, one per grid.
"""

from __future__ import annotations

import argparse
import os
import time

GRIDS = "2048:3:2,1024:5:2,512:9:2,64:5:17,8:9:65,2:14:65,1:51:65,1:201:65"


def main(argv: list[str] | None = None) -> int:
    """Time both paths on every grid; print the table and the RESULT line."""
    p = argparse.ArgumentParser(prog="python -m bench.paths", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per path and grid (median reported)")
    p.add_argument("--grids", default=GRIDS, help="comma-separated batch:rows:cols (rows = C+1, cols = N+1)")
    args = p.parse_args(argv)

    import torch

    from gfm.model import fused
    from gfm.model.attention import Block

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    blocks = torch.nn.Sequential(*(Block(192, "less", 3, 1, 4) for _ in range(2)))

    def step(x: torch.Tensor, fast: bool) -> float:
        blocks.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        with fused.use_fused(fast):
            y = x
            for block in blocks:
                y = block(y)
        y.square().mean().backward()
        return time.perf_counter() - t0

    load = os.getloadavg()[0]
    print(f"# LESS block paths: 2 blocks, D 192, 3 heads, d_c 4, rank 1, fp32, forward + backward, {args.threads} "
          f"thread(s), median of {args.steps} steps a path, alternating")
    print(f"{'batch':>6} {'grid':>9} {'tokens':>8} {'fast ms':>9} {'ref ms':>9} {'ref/fast':>9}")
    results = {}
    for spec in args.grids.split(","):
        b, r, c = (int(v) for v in spec.split(":"))
        x = torch.randn(b, r, c, 192)
        times: dict[bool, list[float]] = {True: [], False: []}
        for fast in (True, False):
            step(x, fast)  # warm-up
        for _ in range(args.steps):
            for fast in (True, False):
                times[fast].append(step(x, fast))
        fast_s, ref_s = (sorted(times[f])[len(times[f]) // 2] for f in (True, False))
        results[f"{r}x{c}"] = ref_s / fast_s
        print(f"{b:>6} {f'{r}x{c}':>9} {b * r * c:>8} {fast_s * 1e3:>9.1f} {ref_s * 1e3:>9.1f} {ref_s / fast_s:>9.2f}")
    print(f"# load average {load:.1f} before, {os.getloadavg()[0]:.1f} after")
    print("RESULT " + " ".join(f"ref_over_fast_{k}={v:.2f}" for k, v in results.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
