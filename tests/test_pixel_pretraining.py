"""Continued pretraining (``init_weights``), pixel-context HyperMAE, and the per-pixel fast paths it needs:
spectral patch weights made once per distinct band, and the summary pools batched over many small grids."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import gfm.model.attention as attention
from gfm.batch import pixels_as_samples
from gfm.config import ConfigError, load, save_yaml
from gfm.model import HyperMAE, ModelConfig, fused
from gfm.train.config import TrainConfig
from gfm.train.runner import load_init_weights
from tests.test_model import NO_META_DROPOUT, make_batch, tiny_encoder

REPO = Path(__file__).resolve().parents[1]


def pixel_mae(**kw) -> HyperMAE:
    return HyperMAE(tiny_encoder(patch_size=1, patch_embed="spectral", spectral_patch=2), decoder_dim=16,
                    decoder_depth=1, decoder_num_heads=2, decoder_rank=2, decoder_spectral_head_dim=2,
                    obs_mask_ratio=0.5, min_obs_keep=1, norm_pix_loss=False, metadata_dropout=NO_META_DROPOUT,
                    context="pixel", **kw)


def test_pixel_context_makes_each_valid_pixel_a_sample_and_hides_only_rows() -> None:
    batch = make_batch(B=2, C=6, H=4, W=4)
    batch.valid[0, :, 0, :2] = False  # two pixels with no valid band: no sample
    mae = pixel_mae()
    out = mae(batch, generator=torch.Generator().manual_seed(0))
    assert out.pred.shape[:3] == (2 * 16 - 2, 3, 1)  # one position per sample, 6 bands in 3 rows
    assert out.loss_pos.item() == 0.0 and not out.pos_mask.any()  # nothing spatial to hide
    assert out.obs_mask.sum(1).tolist() == [2] * 30  # half of the 3 rows, floored, hidden in each sample
    assert torch.isfinite(out.loss) and out.loss_obs > 0
    out.loss.backward()
    grads = [p.grad for n, p in mae.named_parameters() if n.startswith("encoder.blocks")]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # the same numbers as the tile model on the pixels as samples, masks drawn alike
    tile = HyperMAE(mae.encoder, decoder_dim=16, decoder_depth=1, decoder_num_heads=2, decoder_rank=2,
                    decoder_spectral_head_dim=2, obs_mask_ratio=0.5, min_obs_keep=1, norm_pix_loss=False,
                    metadata_dropout=NO_META_DROPOUT)
    tile.load_state_dict(mae.state_dict())
    where = torch.nonzero(batch.valid.any(1).flatten()).squeeze(1)
    same = tile(pixels_as_samples(batch, where), generator=torch.Generator().manual_seed(0))
    assert torch.equal(same.pred, out.pred)


def test_pixel_context_flops_count_every_pixel_as_a_sample() -> None:
    mae = pixel_mae().eval()
    batch = make_batch(B=2, C=6, H=4, W=4)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad(), \
                fused.use_fused(False):
        mae(batch)
    measured = counter.get_total_flops()
    assert abs(mae.flops(2, 6, 4) - measured) / measured < 1e-3


def test_context_is_a_model_config_key() -> None:
    model = ModelConfig(name="hypermae_less_tiny", depth=1, patch_size=1, context="pixel").build()
    assert isinstance(model, HyperMAE) and model.context == "pixel"
    with pytest.raises(ValueError, match="context: expected 'tile' or 'pixel'"):
        ModelConfig(context="window").validate()
    with pytest.raises(ConfigError, match="logging.images_every"):
        load(TrainConfig, None, ["model.context=pixel", "logging.images_every=10"])


def test_spectral_patch_weights_made_once_per_distinct_band_equal_per_slot_weights() -> None:
    embed = tiny_encoder(patch_size=2, patch_embed="spectral", spectral_patch=3).patch_embed
    wl = torch.tensor([[450.0, 560.0, math.nan, 800.0], [450.0, 560.0, 665.0, -1.0], [450.0, 560.0, math.nan, 800.0]])
    bw = torch.tensor([[20.0, math.nan, 30.0, 40.0], [20.0, 35.0, 30.0, 40.0], [20.0, math.nan, 30.0, 40.0]])
    per_slot = embed.weights(wl, bw)
    assert torch.allclose(embed.slot_weights(wl, bw), per_slot, atol=1e-6)
    # gradients reach the generator and the unknown-value parameters as before
    w = embed.slot_weights(wl, bw)
    (w * torch.randn_like(w)).sum().backward()
    assert embed.unknown_weight.grad.abs().sum() > 0 and embed.unknown_bandwidth.grad.abs().sum() > 0


@pytest.mark.parametrize("shape", [(64, 3, 2), (3, 5, 7)])
def test_summary_pools_batched_and_per_sample_agree(shape: tuple[int, int, int], monkeypatch) -> None:
    torch.manual_seed(0)
    pool = attention.SummaryPool(24, 2, 8, 8)
    x = torch.randn(*shape, 24, dtype=torch.float64, requires_grad=True)
    pool = pool.double()

    def run(threshold: int) -> list[torch.Tensor]:
        monkeypatch.setattr(fused, "_BATCHED_GRID_ELEMENTS", threshold)
        x.grad = None
        pool.zero_grad()
        tokens = fused.summary_pools(pool, x, None, None)  # called directly: such grids take the reference in a block
        assert tokens is not None
        c, s = tokens
        (c.sin().sum() + s.cos().sum()).backward()
        grads = [p.grad.clone() for p in pool.parameters() if p.grad is not None]
        return [c.detach(), s.detach(), x.grad.clone(), *grads]

    batched, looped = run(2**40), run(0)
    for a, b in zip(batched, looped):
        assert torch.allclose(a, b, atol=1e-10)


def _run_dir(tmp_path: Path, depth: int) -> Path:
    """A pretraining run directory as gfm writes it: the resolved config and the exported weights."""
    run = tmp_path / f"run_depth{depth}"
    run.mkdir()
    cfg = load(TrainConfig, None, ["model.name=hypermae_less_tiny", f"model.depth={depth}", "model.patch_size=4",
                                   "model.decoder_depth=1"])
    torch.manual_seed(depth)
    model = cfg.model.build()
    save_yaml(cfg, run / "config.yaml")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, run / "model.safetensors")
    return run


def test_load_init_weights_strictly(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, depth=1)
    cfg = load(TrainConfig, None, ["model.name=hypermae_less_tiny", "model.depth=1", "model.patch_size=4",
                                   "model.decoder_depth=1", f"init_weights={run}"])
    torch.manual_seed(99)
    model = cfg.model.build()
    line = load_init_weights(model, cfg.init_weights)
    saved = ModelConfig(name="hypermae_less_tiny", depth=1, patch_size=4, decoder_depth=1)
    torch.manual_seed(1)
    reference = saved.build().state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    assert line.startswith(f"init: {len(reference)} tensors from {run}")
    deeper = ModelConfig(name="hypermae_less_tiny", depth=2, patch_size=4, decoder_depth=1).build()
    with pytest.raises(ConfigError, match=r"init_weights: .* does not fit model HyperMAE \(\d+ missing: encoder.bl"):
        load_init_weights(deeper, str(run))
    with pytest.raises(ConfigError, match="init_weights: ./nowhere: no such file or directory"):
        load(TrainConfig, None, ["init_weights=./nowhere"])


def test_pretrain_program_continues_from_weights(tmp_path: Path) -> None:
    run = _run_dir(tmp_path, depth=1)
    out = tmp_path / "continued"
    cmd = [sys.executable, "-m", "pretrain", "--run-dir", str(out), f"init_weights={run}", "steps=2", "seed=5",
           "model.name=hypermae_less_tiny", "model.depth=1", "model.patch_size=4", "model.decoder_depth=1",
           "data.source=synthetic", "data.synthetic.tile=16", "data.synthetic.num_bands=4",
           "data.synthetic.batch_size=2", "schedule.warmup_steps=1", "logging.progress=false",
           "logging.tensorboard=false", "checkpoint.every=0", "engine.precision=fp32"]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tensors = len(ModelConfig(name="hypermae_less_tiny", depth=1, patch_size=4, decoder_depth=1).build().state_dict())
    assert f"init: {tensors} tensors from {run}" in proc.stdout + proc.stderr
    assert (out / "model.safetensors").is_file()
    bad = subprocess.run([*cmd[:-1], "model.depth=2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "gfm pretrain: config error: init_weights:" in bad.stderr and "does not fit model HyperMAE" in bad.stderr
