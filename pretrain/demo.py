"""The pretraining step of ``gfm demo``: a short HyperMAE run on the shards the demo just built."""

from __future__ import annotations

import json
from pathlib import Path

CONFIG = Path(__file__).parent / "configs" / "demo_indian_pines.yaml"


def run_demo_pretraining(shards_dir: str | Path, out: str | Path, steps: int | None = None) -> int:
    """Pretrain LESS ViT-Tiny on ``shards_dir`` into ``out/run``; print where the results are."""
    from pretrain.__main__ import main as pretrain_main

    run_dir = Path(out) / "run"
    overrides = [f"data.loader.shards={shards_dir}", f"run_dir={run_dir}"]
    if steps is not None:
        overrides.append(f"steps={steps}")
    print(f"\n[4/4] gfm pretrain --config {CONFIG.relative_to(CONFIG.parents[2])} {' '.join(overrides)}", flush=True)
    rc = pretrain_main(["--config", str(CONFIG), *overrides])
    if rc:
        return rc
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        losses = [r["loss"] for r in rows if "loss" in r]
        if losses:
            print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} logged steps")
    pictures = sorted(run_dir.rglob("images/*.png")) + sorted(run_dir.glob("loss_curve.png"))
    print(f"run directory: {run_dir}")
    for p in pictures[-3:]:
        print(f"  picture: {p}")
    weights = sorted(run_dir.rglob("model.safetensors"))
    if weights:
        print(f"  weights: {weights[-1]}")
    return 0
