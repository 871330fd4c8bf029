"""LESS ViT / HyperMAE: shapes, invariances, masks, gradients, FLOPs. Tiny tensors, CPU."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from gfm.batch import Batch
from gfm.model import (
    ClassificationHead,
    HyperMAE,
    LESSViT,
    ModelConfig,
    PixelClassificationHead,
    SegmentationHead,
    UPerHead,
    create_model,
    list_models,
)
from gfm.model.attention import LESSAttention, perception_field_mask
from gfm.model.embed import grid_coords
from gfm.sensors import KIND_CODE, get_sensor, hyperspectral

torch.set_num_threads(2)


def tiny_encoder(**kw) -> LESSViT:
    args = dict(embed_dim=32, depth=2, rank=2, spectral_head_dim=2, patch_size=4)
    args.update(kw)
    torch.manual_seed(0)
    return LESSViT(**args)


def tiny_mae(**kw) -> HyperMAE:
    enc_kw = {k: v for k, v in kw.items() if not k.startswith(("decoder", "mask", "obs", "norm_pix", "min_obs"))}
    mae_kw = {k: v for k, v in kw.items() if k not in enc_kw}
    return HyperMAE(tiny_encoder(**enc_kw), decoder_dim=16, decoder_depth=1, decoder_rank=2,
                    decoder_spectral_head_dim=2, **mae_kw)


def make_batch(B=2, C=5, H=16, W=16, gsd=10.0, seed=0, sensors=None) -> Batch:
    g = torch.Generator().manual_seed(seed)
    if sensors is None:
        wl = torch.linspace(450, 2300, C)
        bw = torch.full((C,), 20.0)
        kind = torch.zeros(C, dtype=torch.long)
        time = torch.full((C,), 19000.0)
    else:
        wl, bw, kind, time = sensors
        C = len(wl)
    return Batch(
        pixels=torch.randn(B, C, H, W, generator=g),
        wavelength=wl.repeat(B, 1),
        bandwidth=bw.repeat(B, 1),
        kind=kind.repeat(B, 1),
        time=time.repeat(B, 1),
        valid=torch.ones(B, C, H, W, dtype=torch.bool),
        gsd=torch.full((B,), gsd),
    )


def mixed_sensors() -> tuple[torch.Tensor, ...]:
    """Sentinel-2 (13 bands, one date) + Sentinel-1 VV/VH (two dates, one unknown) + a
    24-band hyperspectral list + a Landsat thermal band."""
    bands = list(get_sensor("sentinel2_l1c").bands)
    times = [19500.0] * len(bands)
    s1 = get_sensor("sentinel1_grd")
    bands += [s1.band("VV"), s1.band("VH"), s1.band("VV"), s1.band("VH")]
    times += [19502.0, 19502.0, math.nan, math.nan]
    hsi = hyperspectral("hsi", torch.linspace(420, 2450, 24).tolist()).bands
    bands += list(hsi)
    times += [19510.0] * len(hsi)
    bands.append(get_sensor("landsat8").band("B10"))
    times.append(19400.0)
    return (
        torch.tensor([b.center_nm for b in bands]),
        torch.tensor([b.fwhm_nm for b in bands]),
        torch.tensor([b.kind_code for b in bands]),
        torch.tensor(times),
    )


# ------------------------------------------------------------------------------------------------
# Registry and config


def test_registry_and_config():
    names = list_models()
    for size in ("tiny", "small", "base", "large", "huge"):
        assert f"less_vit_{size}" in names and f"dense_vit_{size}" in names and f"hypermae_less_{size}" in names
    mae = create_model("hypermae_less_tiny", patch_size=8)
    assert isinstance(mae, HyperMAE) and mae.encoder.patch_size == 8
    cfg = ModelConfig.from_dict({"name": "hypermae_less_tiny", "patch_size": 4, "grad_checkpointing": True,
                                 "mask_ratio": 0.6})
    model = cfg.build()
    assert isinstance(model, HyperMAE) and model.mask_ratio == 0.6 and model.encoder.grad_checkpointing
    enc = ModelConfig(name="less_vit_tiny", num_classes=3).build()
    assert isinstance(enc, LESSViT) and enc.num_classes == 3
    with pytest.raises(ValueError, match="mask_ratoi"):
        ModelConfig.from_dict({"mask_ratoi": 0.5})
    with pytest.raises(ValueError, match="unknown model"):
        create_model("less_vit_gigantic")


# ------------------------------------------------------------------------------------------------
# Shapes: any C, T, image size, patch size, GSD, sensor mix


@pytest.mark.parametrize(
    "C,H,W,p,gsd,s",
    [(1, 8, 8, 4, 10.0, 1), (3, 20, 13, 4, 30.0, 1), (7, 16, 24, 8, 0.5, 1), (10, 12, 12, 4, 10.0, 4)],
)
def test_any_shape(C, H, W, p, gsd, s):
    enc = tiny_encoder(patch_size=p, spectral_patch=s)
    batch = make_batch(C=C, H=H, W=W, gsd=gsd)
    y = enc.forward_features(batch)
    N = math.ceil(H / p) * math.ceil(W / p)
    assert y.shape == (2, math.ceil(C / s) + 1, N + 1, 32)
    assert torch.isfinite(y).all()
    out = tiny_mae(patch_size=p, spectral_patch=s)(batch, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)
    assert out.pred.shape == (2, math.ceil(C / s), N, s * p * p)
    assert out.reconstruction().shape == (2, C, H, W)
    assert out.masked_pixels().shape == (2, C, H, W)


def test_mixed_sensors_one_model():
    enc = tiny_encoder(perception_radius_m=100.0)
    mae = tiny_mae()
    mixed = make_batch(C=0, sensors=mixed_sensors())
    y = enc.forward_features(mixed)
    assert y.shape[1] == mixed.pixels.shape[1] + 1 and torch.isfinite(y).all()
    assert torch.isfinite(mae(mixed).loss)
    # the same weights take each sensor alone, and plain tensors with defaults
    for sl in (slice(0, 13), slice(13, 17), slice(17, 41)):
        part = Batch(**{k: (v[:, sl] if v.dim() >= 2 else v) for k, v in mixed.tensors().items()})
        assert torch.isfinite(enc.forward_features(part)).all()
    plain = {"pixels": torch.randn(1, 3, 8, 8), "wavelength": torch.tensor([[490.0, 560.0, 665.0]])}
    assert enc(plain).shape == (1, 32)


def test_channel_embedding_spans_light_to_radar():
    enc = tiny_encoder()
    desc = make_batch(C=0, sensors=mixed_sensors())
    from gfm.model.embed import Descriptors

    d = Descriptors(desc.wavelength, desc.bandwidth, desc.kind, desc.time)
    feats = enc.pos_chan_embed.chan.features(d)
    assert torch.isfinite(feats).all()
    emb = enc.pos_chan_embed.chan(d)[0]
    # VV and VH share a wavelength but differ by kind; neighbouring S2 bands differ by wavelength
    assert not torch.allclose(emb[13], emb[14])
    assert not torch.allclose(emb[4], emb[5])
    assert KIND_CODE["sar_vv"] == int(desc.kind[0, 13])


# ------------------------------------------------------------------------------------------------
# Invariances


@pytest.mark.parametrize("attention", ["less", "dense"])
def test_permuting_observations(attention):
    enc = tiny_encoder(attention=attention, perception_radius_m=60.0).eval()
    batch = make_batch(C=6, sensors=None)
    batch.time[:, 2] = math.nan
    batch.kind[:, 5] = KIND_CODE["sar_vh"]
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    permuted = Batch(**{k: (v[:, perm] if k != "gsd" else v) for k, v in batch.tensors().items()})
    with torch.no_grad():
        y, yp = enc.forward_features(batch), enc.forward_features(permuted)
    torch.testing.assert_close(yp[:, 1:], y[:, 1:][:, perm], atol=1e-5, rtol=1e-4)  # per-observation tokens
    torch.testing.assert_close(yp[:, 0], y[:, 0], atol=1e-5, rtol=1e-4)  # CLS and summary row unchanged


def test_invalid_pixels_do_not_leak():
    enc = tiny_encoder().eval()
    batch = make_batch(C=4)
    batch.valid[:, 1, :5, :7] = False
    other = Batch(**batch.tensors())
    other.pixels = batch.pixels.clone()
    other.pixels[~batch.valid] = float("nan")  # fill values, even NaN, never reach a token
    with torch.no_grad():
        torch.testing.assert_close(enc.forward_features(batch), enc.forward_features(other))
    mae = tiny_mae()
    a = mae(batch, generator=torch.Generator().manual_seed(1))
    b = mae(other, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a.loss, b.loss)


# ------------------------------------------------------------------------------------------------
# Attention maths


def test_perception_field_mask_gradient():
    torch.manual_seed(0)
    attn = LESSAttention(dim=16, rank=2, spectral_head_dim=2).double()
    h = w = 4
    coords = grid_coords((h, w), patch_size=4, gsd=torch.tensor([10.0]))  # 40 m spacing
    radius = 60.0  # 4-neighbours and diagonals
    mask = perception_field_mask(coords, radius)
    x = torch.randn(1, 3, h * w + 1, 16, dtype=torch.double, requires_grad=True)
    i = 5  # patch (1, 1)
    _, spatial = attn.branches(x, mask)  # [B, r, N+1, d_s]
    spatial[:, :, i + 1].sum().backward()
    dist = torch.cdist(coords[0], coords[0])[i]
    grad = x.grad[0].abs().sum(dim=(0, 2))[1:]  # per patch
    assert (grad[dist > radius] == 0).all()
    assert (grad[dist <= radius] > 0).all()


def test_less_matches_kronecker_construction():
    torch.manual_seed(0)
    r, d_c, d_s = 2, 2, 3
    attn = LESSAttention(dim=r * d_c * d_s, rank=r, spectral_head_dim=d_c).double()
    x = torch.randn(1, 4, 5, r * d_c * d_s, dtype=torch.double)
    y = attn(x)

    spectral, spatial = attn.pool(x)
    spectral, spatial = attn.spectral_norm(spectral)[0], attn.spatial_norm(spatial)[0]  # [C, r d_c], [N, r d_s]

    def qkv(branch, t, head, d):
        q, k, v = branch.qkv(t).chunk(3, dim=-1)
        sl = slice(head * d, (head + 1) * d)
        return q[:, sl], k[:, sl], v[:, sl]

    heads = []
    for k in range(r):
        qc, kc, vc = qkv(attn.spectral, spectral, k, d_c)
        qs, ks, vs = qkv(attn.spatial, spatial, k, d_s)
        a_c = torch.softmax(qc @ kc.T / math.sqrt(d_c), dim=-1)
        a_s = torch.softmax(qs @ ks.T / math.sqrt(d_s), dim=-1)
        joint = torch.kron(a_c, a_s) @ torch.kron(vc, vs)  # [(C N), d_c d_s]: joint attention, Kronecker form
        heads.append(joint)
    expected = attn.proj(torch.cat(heads, dim=-1)).reshape(1, 4, 5, -1)
    torch.testing.assert_close(y, expected)


# ------------------------------------------------------------------------------------------------
# Gradients and NaN safety


def test_every_parameter_gets_a_gradient():
    enc = tiny_encoder(num_classes=3, perception_radius_m=50.0, init_values=0.1)
    batch = make_batch(C=0, H=8, W=8, sensors=mixed_sensors())
    enc(batch).square().sum().backward()
    mae = tiny_mae(spectral_patch=2)
    mae(batch).loss.backward()
    for model in (enc, mae):
        for name, p in model.named_parameters():
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
            if "kind_embed" not in name and "head" not in name:  # unused kinds' rows stay 0
                assert p.grad.abs().sum() > 0, name


def test_all_invalid_tile_is_finite():
    mae = tiny_mae(norm_pix_loss=True)
    batch = make_batch(C=4)
    batch.valid[:] = False
    batch.pixels[:] = float("nan")
    batch.time[:] = float("nan")
    batch.gsd[:] = float("nan")  # unknown GSD falls back to 10 m
    out = mae(batch)
    assert out.loss.item() == 0.0 and torch.isfinite(out.pred).all()
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in mae.parameters() if p.grad is not None)
    # one bad sample in a good batch: finite loss, only the good sample counts
    batch = make_batch(C=4)
    batch.valid[0] = False
    out = mae(batch)
    assert torch.isfinite(out.loss) and out.loss > 0
    assert out.weight[0].sum() == 0


def test_masking_counts_and_generator():
    mae = tiny_mae(mask_ratio=0.75, obs_mask_ratio=0.5)
    batch = make_batch(C=5, H=16, W=16)
    a = mae(batch, generator=torch.Generator().manual_seed(3))
    b = mae(batch, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.pos_mask, b.pos_mask) and torch.equal(a.obs_mask, b.obs_mask)
    assert (a.pos_mask.sum(1) == 12).all()  # 16 positions, 4 kept
    assert (a.obs_mask.sum(1) == 3).all()  # 5 observations, max(2, round(2.5)) = 2 kept
    assert not torch.equal(a.pos_mask[0], a.pos_mask[1]) or not torch.equal(a.obs_mask[0], a.obs_mask[1])
    two = mae(make_batch(C=2), generator=torch.Generator().manual_seed(0))
    assert not two.obs_mask.any()  # at least 2 observations always kept
    # reconstruction pastes visible tokens back
    rec = a.reconstruction()
    vis = ~a.masked_pixels()
    torch.testing.assert_close(rec[vis], batch.pixels[vis], atol=1e-4, rtol=1e-4)


def test_grad_checkpointing_same_result():
    mae = tiny_mae()
    batch = make_batch(C=3, H=8, W=8)
    out = mae(batch, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    grads = [p.grad.clone() for p in mae.parameters()]
    mae.zero_grad()
    mae.set_grad_checkpointing(True)
    out2 = mae(batch, generator=torch.Generator().manual_seed(0))
    out2.loss.backward()
    torch.testing.assert_close(out.loss, out2.loss)
    for g, p in zip(grads, mae.parameters()):
        torch.testing.assert_close(g, p.grad)


# ------------------------------------------------------------------------------------------------
# FLOPs


@pytest.mark.parametrize(
    "builder",
    [
        lambda: tiny_encoder(depth=2, num_classes=4),
        lambda: tiny_encoder(depth=2, attention="dense"),
        lambda: tiny_encoder(depth=1, spectral_patch=3, perception_radius_m=50.0),
        lambda: tiny_mae(),
    ],
)
def test_flops_match_counter(builder):
    model = builder()
    B, C, H = 2, 7, 24
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(make_batch(B=B, C=C, H=H, W=H))  # the math backend shows attention to the counter
    measured = counter.get_total_flops()
    assert abs(model.flops(B, C, H) - measured) / measured < 0.10


# ------------------------------------------------------------------------------------------------
# Heads


def test_heads():
    enc = tiny_encoder(depth=4)
    batch = make_batch(C=3, H=16, W=16)
    final, maps = enc.forward_intermediates(batch, indices=4)
    assert len(maps) == 4 and maps[0].shape == (2, 32, 4, 4)
    assert ClassificationHead(32, 5)(final).shape == (2, 5)
    assert ClassificationHead(32, 5, pool="mean")(final).shape == (2, 5)
    assert SegmentationHead(32, 6, patch_size=4, channels=32)(maps).shape == (2, 6, 16, 16)
    assert UPerHead(32, 6, patch_size=4, channels=16)(maps).shape == (2, 6, 16, 16)
    assert PixelClassificationHead(32, 6, patch_size=4)(maps).shape == (2, 6, 16, 16)
    nlc = enc.forward_intermediates(batch, indices=[-1], reduce="mean", output_fmt="NLC", intermediates_only=True)
    assert isinstance(nlc, list) and nlc[0].shape == (2, 16, 32)
