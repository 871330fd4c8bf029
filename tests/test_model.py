"""LESS ViT / HyperMAE: shapes, invariances, masks, gradients, loss, metadata, FLOPs. Tiny tensors, CPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from timm.layers import DropPath, LayerScale
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from gfm.batch import Batch, sensor_code
from gfm.model import (
    ClassificationHead,
    HyperMAE,
    LESSViT,
    ModelConfig,
    PixelClassificationHead,
    SegmentationHead,
    UPerHead,
    create_model,
    fused,
    list_models,
)
from gfm.model.attention import (
    AxisAttention,
    GridMask,
    LESSAttention,
    grid_sq_distances,
    perception_field_mask,
)
from gfm.model.embed import grid_coords, spectral_groups, spherical_harmonics
from gfm.model.mae import LOSS_GROUPS, keep_count
from gfm.sensors import KIND_CODE, get_sensor, hyperspectral

torch.set_num_threads(2)
CONFIGS = Path(__file__).resolve().parents[1] / "pretrain" / "configs"
NO_META_DROPOUT = {"location": 0.0, "time": 0.0, "gsd": 0.0, "bandwidth": 0.0}


def tiny_encoder(**kw) -> LESSViT:
    args = dict(embed_dim=32, depth=2, num_heads=2, rank=2, spectral_head_dim=2, patch_size=4)
    args.update(kw)
    torch.manual_seed(0)
    return LESSViT(**args)


def tiny_mae(**kw) -> HyperMAE:
    mae_keys = ("decoder", "mask", "obs", "norm_pix", "min_obs", "loss", "metadata")
    enc_kw = {k: v for k, v in kw.items() if not k.startswith(mae_keys)}
    mae_kw = {k: v for k, v in kw.items() if k not in enc_kw}
    mae_kw = {"decoder_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2, "decoder_rank": 2,
              "decoder_spectral_head_dim": 2, **mae_kw}
    return HyperMAE(tiny_encoder(**enc_kw), **mae_kw)


def make_batch(B=2, C=5, H=16, W=16, gsd=10.0, seed=0, sensors=None, lonlat=(-88.2, 40.1)) -> Batch:
    g = torch.Generator().manual_seed(seed)
    if sensors is None:
        wl = torch.linspace(450, 2300, C)
        bw = torch.full((C,), 20.0)
        kind = torch.zeros(C, dtype=torch.long)
        time = torch.full((C,), 19000.0)
        sensor = torch.full((C,), sensor_code("hsi"))
    else:
        wl, bw, kind, time, sensor = sensors
        C = len(wl)
    return Batch(
        pixels=torch.randn(B, C, H, W, generator=g),
        wavelength=wl.repeat(B, 1),
        bandwidth=bw.repeat(B, 1),
        kind=kind.repeat(B, 1),
        time=time.repeat(B, 1),
        valid=torch.ones(B, C, H, W, dtype=torch.bool),
        gsd=torch.full((B,), gsd),
        lonlat=torch.tensor([lonlat] * B, dtype=torch.float32),
        sensor=sensor.repeat(B, 1),
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
        torch.tensor([sensor_code(b.sensor) for b in bands]),
    )


def subset(batch: Batch, obs: slice | torch.Tensor) -> Batch:
    """The batch with only some observations (per-observation fields sliced, per-tile fields kept)."""
    per_obs = ("pixels", "wavelength", "bandwidth", "kind", "time", "valid", "sensor")
    return Batch(**{k: (v[:, obs] if k in per_obs else v) for k, v in batch.tensors().items()})


def build_meta(cfg: ModelConfig):
    with torch.device("meta"):  # shapes and settings only: no memory, no init cost
        return cfg.build()


# ------------------------------------------------------------------------------------------------
# Registry and config


def test_registry_and_config():
    names = list_models()
    for size in ("tiny", "small", "base", "large", "huge"):
        assert f"less_vit_{size}" in names and f"dense_vit_{size}" in names and f"hypermae_less_{size}" in names
    mae = create_model("hypermae_less_tiny", patch_size=8)
    assert isinstance(mae, HyperMAE) and mae.encoder.patch_size == 8
    attn = mae.encoder.blocks[0].attn
    assert (attn.num_heads, attn.rank, attn.spectral_head_dim, attn.spatial_head_dim) == (3, 1, 4, 16)
    cfg = ModelConfig.from_dict({"name": "hypermae_less_tiny", "patch_size": 4, "grad_checkpointing": True,
                                 "mask_ratio": 0.6, "rank": 2, "loss_group_weights": {"sar": 2.0}})
    model = cfg.build()
    assert isinstance(model, HyperMAE) and model.mask_ratio == 0.6 and model.encoder.grad_checkpointing
    assert model.encoder.blocks[0].attn.rank == 2 and model.group_weights[LOSS_GROUPS.index("sar")] == 2.0
    enc = ModelConfig(name="less_vit_tiny", num_classes=3).build()
    assert isinstance(enc, LESSViT) and enc.num_classes == 3
    with pytest.raises(ValueError, match="mask_ratoi"):
        ModelConfig.from_dict({"mask_ratoi": 0.5})
    with pytest.raises(ValueError, match="metadata_dropout"):
        ModelConfig.from_dict({"metadata_dropout": {"weather": 0.5}})
    with pytest.raises(ValueError, match="unknown model"):
        create_model("less_vit_gigantic")


def test_less_paper_b_reproduces_the_authors_launch():
    mae = build_meta(ModelConfig(name="less_paper_b"))
    enc = mae.encoder
    assert enc.patch_size == 16 and enc.embed_dim == 768 and len(enc.blocks) == 12
    assert enc.perception_radius_m == 640.0 and mae.decoder_perception_radius_m == 640.0
    assert not mae.norm_pix_loss and (mae.mask_ratio, mae.obs_mask_ratio) == (0.75, 0.5)
    for blocks, dim, heads in ((enc.blocks, 768, 12), (mae.decoder_blocks, 512, 16)):
        a = blocks[0].attn
        assert (blocks[0].dim, a.num_heads, a.rank, a.spectral_head_dim) == (dim, heads, 8, 2)
        assert a.spectral.attn_drop == 0.1 and a.proj_drop.p == 0.1 and blocks[0].mlp.drop1.p == 0.1
        assert isinstance(blocks[0].ls1, LayerScale)
        assert isinstance(blocks[-1].drop_path1, DropPath) and blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    assert len(mae.decoder_blocks) == 4 and enc.block_options["init_values"] == 1.0
    # every knob is a ModelConfig field, so the launch is also expressible from hypermae_less_base
    knobs = dict(patch_size=16, num_heads=12, rank=8, spectral_head_dim=2, perception_radius_m=640.0,
                 init_values=1.0, drop_path=0.1, attn_drop=0.1, proj_drop=0.1, decoder_dim=512, decoder_depth=4,
                 decoder_num_heads=16, decoder_rank=8, decoder_spectral_head_dim=2, norm_pix_loss=False)
    same = build_meta(ModelConfig(name="hypermae_less_base", **knobs))
    assert [(n, p.shape) for n, p in same.named_parameters()] == [(n, p.shape) for n, p in mae.named_parameters()]


def test_shipped_configs_use_the_perception_field():
    paths = sorted(CONFIGS.glob("*.yaml"))
    assert paths
    for path in paths:
        section = yaml.safe_load(path.read_text())["model"]
        mae = build_meta(ModelConfig.from_dict(section))
        assert mae.encoder.perception_radius_m > 0, path.name
        assert mae.decoder_perception_radius_m > 0, path.name


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
    # the same weights take each sensor alone, and plain tensors with everything else unknown
    for sl in (slice(0, 13), slice(13, 17), slice(17, 41)):
        assert torch.isfinite(enc.forward_features(subset(mixed, sl))).all()
    plain = {"pixels": torch.randn(1, 3, 8, 8), "wavelength": torch.tensor([[490.0, 560.0, 665.0]])}
    assert enc(plain).shape == (1, 32)


def test_channel_embedding_spans_light_to_radar():
    enc = tiny_encoder()
    b = make_batch(C=0, sensors=mixed_sensors())
    from gfm.model.embed import Descriptors

    emb = enc.pos_chan_embed.chan(Descriptors(b.wavelength, b.bandwidth, b.kind, b.time))[0]
    assert torch.isfinite(emb).all()
    # VV and VH share a wavelength but differ by kind; neighbouring S2 bands differ by wavelength
    assert not torch.allclose(emb[13], emb[14])
    assert not torch.allclose(emb[4], emb[5])
    assert KIND_CODE["sar_vv"] == int(b.kind[0, 13])


# ------------------------------------------------------------------------------------------------
# Invariances


@pytest.mark.parametrize("attention", ["less", "dense"])
def test_permuting_observations(attention):
    enc = tiny_encoder(attention=attention, perception_radius_m=60.0).eval()
    batch = make_batch(C=6, sensors=None)
    batch.time[:, 2] = math.nan
    batch.kind[:, 5] = KIND_CODE["sar_vh"]
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    permuted = subset(batch, perm)
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


@pytest.mark.parametrize("attention", ["less", "dense"])
def test_invalid_tokens_neither_attend_nor_are_attended(attention):
    """Outputs of valid tokens have zero gradient w.r.t. every invalid token (patches, and the summary
    tokens of rows/positions without a valid patch), through several blocks and the perception field."""
    enc = tiny_encoder(attention=attention, depth=3, perception_radius_m=100.0).double().eval()
    batch = make_batch(C=4, H=12, W=12)  # p 4: 3 x 3 positions
    batch.valid[:, :, 8:, 8:] = False  # position 8: no valid pixel in any observation
    batch.valid[:, 2] = False  # observation 2: no valid pixel anywhere
    batch.valid[:, 1, :4, :4] = False  # one patch: observation 1 at position 0
    batch.pixels = batch.pixels.double()
    tokens = enc.embed(batch)
    x = tokens.x.detach().double().requires_grad_(True)
    mask = enc.grid_mask(tokens.token_valid, tokens.pitch, tokens.grid_hw)
    assert isinstance(mask, GridMask) and mask.cell is not None
    y, _ = enc.forward_tokens(x, mask)
    valid = mask.cell  # [B, C+1, N+1]
    assert not valid[0, 3].any() and not valid[0, :, 9].any() and not valid[0, 2, 1] and valid[0, 0, 0]
    (y * valid[..., None]).sum().backward()
    grad = x.grad.abs().sum(-1)
    assert (grad[~valid] == 0).all()
    assert (grad[valid] > 0).all()


def test_invalid_tokens_cost_nothing():
    mae = tiny_mae(metadata_dropout=NO_META_DROPOUT)
    batch = make_batch(C=4, H=8, W=8)
    batch.valid[:, 1, :4, :4] = False
    out = mae(batch, generator=torch.Generator().manual_seed(0))
    assert (out.weight[:, 1, 0] == 0).all()
    # changing the prediction of the invalid token does not change the loss
    loss = mae.forward_loss(out.pred, out.target, out.weight, out.obs_mask, out.pos_mask,
                            mae.row_groups(batch.kind))
    pred = out.pred.clone()
    pred[:, 1, 0] += 100.0
    moved = mae.forward_loss(pred, out.target, out.weight, out.obs_mask, out.pos_mask, mae.row_groups(batch.kind))
    torch.testing.assert_close(loss["loss_pos"], moved["loss_pos"])
    torch.testing.assert_close(loss["loss_obs"], moved["loss_obs"])


# ------------------------------------------------------------------------------------------------
# Perception field


@pytest.mark.parametrize("pitch", [80.0, 160.0, 128.0, 4.0, 3.3, 240.0, 0.8])
def test_perception_field_matches_brute_force(pitch):
    h, w, radius = 7, 9, 640.0
    pitches = torch.tensor([pitch, pitch * 2, 10.0])
    coords = grid_coords((h, w), pitches).double()  # [B, N, 2] metres
    brute = torch.cdist(coords, coords) <= radius  # the metric definition
    mask = perception_field_mask((h, w), pitches, radius)
    assert mask.dtype == torch.bool and mask.shape == (3, 1, h * w + 1, h * w + 1)
    assert mask[:, 0, 0].all() and mask[:, 0, :, 0].all()  # the summary token sees and is seen by all
    assert torch.equal(mask[:, 0, 1:, 1:], brute)
    # subsets of positions, as the masked encoder sees them
    positions = torch.stack([torch.randperm(h * w, generator=torch.Generator().manual_seed(i))[:20] for i in range(3)])
    sub = perception_field_mask((h, w), pitches, radius, positions)
    picked = torch.stack([brute[b][positions[b]][:, positions[b]] for b in range(3)])
    assert torch.equal(sub[:, 0, 1:, 1:], picked)
    assert grid_sq_distances(h, w, torch.device("cpu")) is grid_sq_distances(h, w, torch.device("cpu"))  # cached


def test_perception_field_mask_gradient():
    torch.manual_seed(0)
    attn = LESSAttention(dim=16, num_heads=2, rank=2, spectral_head_dim=2).double()
    h = w = 4
    pitch = torch.tensor([40.0])
    radius = 60.0  # 4-neighbours and diagonals
    mask = GridMask(spatial=perception_field_mask((h, w), pitch, radius))
    x = torch.randn(1, 3, h * w + 1, 16, dtype=torch.double, requires_grad=True)
    i = 5  # patch (1, 1)
    _, spatial = attn.branches(x, mask)  # [B, r, h, N+1, d_s]
    spatial[:, :, :, i + 1].sum().backward()
    coords = grid_coords((h, w), pitch)[0]
    dist = torch.cdist(coords, coords)[i]
    grad = x.grad[0].abs().sum(dim=(0, 2))[1:]  # per patch
    assert (grad[dist > radius] == 0).all()
    assert (grad[dist <= radius] > 0).all()


def test_decoder_uses_the_perception_field():
    mae = tiny_mae(perception_radius_m=50.0, metadata_dropout=NO_META_DROPOUT)  # 40 m pitch: 4-neighbours
    seen = []
    mae.decoder_blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[1]))
    batch = make_batch(C=3, H=16, W=16)
    mae(batch, generator=torch.Generator().manual_seed(0))
    mask = seen[0].spatial
    coords = grid_coords((4, 4), torch.full((2,), 40.0)).double()
    assert torch.equal(mask[:, 0, 1:, 1:], (torch.cdist(coords, coords) <= 50.0)[:1].expand(2, -1, -1))
    assert mae.decoder_perception_radius_m == 50.0


# ------------------------------------------------------------------------------------------------
# Attention maths


@pytest.mark.parametrize("heads,rank", [(1, 1), (2, 1), (2, 3)])
def test_less_matches_kronecker_construction(heads, rank):
    """Each head is joint attention whose matrix is the mean of ``rank`` Kronecker products of spectral
    and spatial attention matrices, applied to the Kronecker product of the head's values."""
    torch.manual_seed(0)
    d_c, d_s, C1, N1 = 2, 3, 4, 5
    dim = heads * d_c * d_s
    attn = LESSAttention(dim=dim, num_heads=heads, rank=rank, spectral_head_dim=d_c).double()
    x = torch.randn(1, C1, N1, dim, dtype=torch.double)
    y = attn(x)

    spectral, spatial = attn.pool(x)
    spectral, spatial = attn.spectral_norm(spectral)[0], attn.spatial_norm(spatial)[0]  # [C, h d_c], [N, h d_s]

    def qkv(branch: AxisAttention, t: torch.Tensor, head: int, term: int, d: int):
        W = heads * d
        out = branch.qkv(t)
        q = out[:, :rank * W].reshape(-1, rank, heads, d)[:, term, head]
        k = out[:, rank * W:2 * rank * W].reshape(-1, rank, heads, d)[:, term, head]
        v = out[:, 2 * rank * W:].reshape(-1, heads, d)[:, head]
        return q, k, v

    outputs = []
    for head in range(heads):
        joint = torch.zeros(C1 * N1, C1 * N1, dtype=torch.double)
        for term in range(rank):
            qc, kc, _ = qkv(attn.spectral, spectral, head, term, d_c)
            qs, ks, _ = qkv(attn.spatial, spatial, head, term, d_s)
            a_c = torch.softmax(qc @ kc.T / math.sqrt(d_c), dim=-1)
            a_s = torch.softmax(qs @ ks.T / math.sqrt(d_s), dim=-1)
            joint += torch.kron(a_c, a_s) / rank  # [(C N), (C N)]
        _, _, vc = qkv(attn.spectral, spectral, head, 0, d_c)
        _, _, vs = qkv(attn.spatial, spatial, head, 0, d_s)
        torch.testing.assert_close(joint.sum(-1), torch.ones(C1 * N1, dtype=torch.double))  # row-stochastic
        outputs.append(joint @ torch.kron(vc, vs))  # [(C N), d_c d_s]
    expected = attn.proj(torch.cat(outputs, dim=-1)).reshape(1, C1, N1, -1)
    torch.testing.assert_close(y, expected)


# ------------------------------------------------------------------------------------------------
# Spectral patching


def test_spectral_groups_never_cross_sensor_date_or_kind():
    s2 = get_sensor("sentinel2_l2a").bands[:5]
    s1 = get_sensor("sentinel1_grd")
    l8 = get_sensor("landsat8").bands[:3]
    bands = [*s2, s1.band("VV"), s1.band("VH"), *s2, *l8]
    times = [19000.0] * 5 + [19001.0] * 2 + [19010.0] * 5 + [19010.0] * 3
    sensors = (
        torch.tensor([b.center_nm for b in bands]), torch.tensor([b.fwhm_nm for b in bands]),
        torch.tensor([b.kind_code for b in bands]), torch.tensor(times),
        torch.tensor([sensor_code(b.sensor) for b in bands]),
    )
    batch = make_batch(B=2, H=8, W=8, sensors=sensors)
    batch.time[1, 9] = math.nan  # sample 1: one band of its second S2 date has an unknown date
    s = 4
    groups = spectral_groups(batch.kind, batch.time, batch.sensor, s)
    member, filled = groups.member, groups.filled
    C = batch.pixels.shape[1]
    for b in range(2):
        got = member[b][filled[b]]
        assert sorted(got.tolist()) == list(range(C))  # every observation exactly once
        for g in range(groups.num_groups):
            obs = member[b, g * s:(g + 1) * s][filled[b, g * s:(g + 1) * s]].tolist()
            assert obs == sorted(obs) and (not obs or obs == list(range(obs[0], obs[0] + len(obs))))
            for key in (batch.kind, batch.sensor):
                assert len({int(key[b, o]) for o in obs}) <= 1
            assert len({str(float(batch.time[b, o])) for o in obs}) <= 1  # NaN == NaN here
    # sample 0: S2 5 -> 2 groups, VV, VH, S2 5 -> 2, Landsat 3 -> 1: 7 rows; sample 1 has one more
    assert int(filled[0].view(-1, s).any(-1).sum()) == 7 and groups.num_groups == 8
    x = torch.randn(2, C, 3)
    torch.testing.assert_close(groups.ungroup(groups.group(x)), x)
    enc = tiny_encoder(spectral_patch=s)
    tokens = enc.embed(batch)
    assert not tokens.token_valid[0, 7].any() and tokens.token_valid[1, 7].all()  # sample 0's empty row
    # a group of S2 bands is described by the span it covers, kind and date of its members
    assert torch.isclose(tokens.desc.wavelength[0, 0], torch.tensor(
        (min(b.center_nm - b.fwhm_nm / 2 for b in s2[:4]) + max(b.center_nm + b.fwhm_nm / 2 for b in s2[:4])) / 2))
    assert int(tokens.desc.kind[0, 2]) == KIND_CODE["sar_vv"] and float(tokens.desc.time[0, 2]) == 19001.0
    out = tiny_mae(spectral_patch=s)(batch, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss) and out.reconstruction().shape == batch.pixels.shape


# ------------------------------------------------------------------------------------------------
# Loss


def s1s2_batch(B=3, H=8, W=8) -> Batch:
    s2 = get_sensor("sentinel2_l2a").bands[1:5]
    s1 = get_sensor("sentinel1_grd")
    bands = [*s2, s1.band("VV"), s1.band("VH")]
    sensors = (
        torch.tensor([b.center_nm for b in bands]), torch.tensor([b.fwhm_nm for b in bands]),
        torch.tensor([b.kind_code for b in bands]), torch.tensor([19000.0] * 4 + [19002.0] * 2),
        torch.tensor([sensor_code(b.sensor) for b in bands]),
    )
    return make_batch(B=B, H=H, W=W, sensors=sensors)


def test_balanced_loss_matches_authors_formula_on_s1_s2():
    """All pixels valid: the authors' ``calculate_modal_loss`` written out (per-patch mean error, mean
    over a modality's channels, mean over the hidden positions or channels, mean over modalities)."""
    mae = tiny_mae(norm_pix_loss=False, metadata_dropout=NO_META_DROPOUT, mask_ratio=0.5)
    batch = s1s2_batch()
    out = mae(batch, generator=torch.Generator().manual_seed(2))
    patch_error = (out.pred.detach() - out.target).square().mean(-1)  # [B, C, N]
    pos, chan = out.pos_mask.float(), out.obs_mask.float()
    pos_terms, chan_terms = [], []
    for rows in (slice(0, 4), slice(4, 6)):  # optical, radar
        err, cmask = patch_error[:, rows], chan[:, rows]
        pos_terms.append((err.mean(1) * pos).sum() / pos.sum())
        if cmask.sum() > 0:
            chan_terms.append((err.mean(2) * cmask).sum() / cmask.sum())
    torch.testing.assert_close(out.loss_pos.detach(), sum(pos_terms) / len(pos_terms))
    torch.testing.assert_close(out.loss_obs.detach(), sum(chan_terms) / len(chan_terms))
    # radar (2 bands) weighs as much as optical (4 bands)
    optical, sar = LOSS_GROUPS.index("optical"), LOSS_GROUPS.index("sar")
    torch.testing.assert_close(out.group_loss_pos[[optical, sar]].detach(), torch.stack(pos_terms))


def test_balanced_loss_hand_computation_with_invalid_pixels_and_weights():
    mae = tiny_mae(norm_pix_loss=False, metadata_dropout=NO_META_DROPOUT, loss_group_weights={"sar": 3.0})
    batch = s1s2_batch()
    g = torch.Generator().manual_seed(5)
    batch.valid &= torch.rand(batch.valid.shape, generator=g) > 0.3  # ~30 % invalid pixels
    batch.valid[:, 4:, :, :4] = False  # radar missing on the left half
    out = mae(batch, generator=torch.Generator().manual_seed(3))
    pred, target, weight = out.pred.detach(), out.target, out.weight
    B, C, N, _ = pred.shape
    group_of = {0: "optical", 1: "optical", 2: "optical", 3: "optical", 4: "sar", 5: "sar"}
    sums = {(t, grp): [0.0, 0.0] for t in ("pos", "obs") for grp in ("optical", "sar")}
    for b in range(B):
        for c in range(C):
            for n in range(N):
                err = float(((pred[b, c, n] - target[b, c, n]).square() * weight[b, c, n]).sum())
                cnt = float(weight[b, c, n].sum())
                if out.pos_mask[b, n]:  # hidden position: every row counts, hidden rows included
                    sums["pos", group_of[c]][0] += err
                    sums["pos", group_of[c]][1] += cnt
                if out.obs_mask[b, c]:  # hidden row: every position counts
                    sums["obs", group_of[c]][0] += err
                    sums["obs", group_of[c]][1] += cnt
    weights = {"optical": 1.0, "sar": 3.0}
    for term, value in (("pos", out.loss_pos), ("obs", out.loss_obs)):
        present = [grp for grp in weights if sums[term, grp][1] > 0]
        expected = sum(weights[grp] * sums[term, grp][0] / sums[term, grp][1] for grp in present)
        expected /= sum(weights[grp] for grp in present)
        assert value.item() == pytest.approx(expected, rel=1e-5)
    # pooling pixels instead gives the old, unbalanced figure
    pooled = mae.forward_loss(out.pred, target, weight, out.obs_mask, out.pos_mask,
                              torch.zeros(B, C, dtype=torch.long))["loss_pos"]
    pos_all = [sum(sums["pos", grp][i] for grp in weights) for i in (0, 1)]
    assert pooled.item() == pytest.approx(pos_all[0] / pos_all[1], rel=1e-5)


def test_keep_counts_floor_like_the_authors():
    assert keep_count(16, 0.75) == 4 and keep_count(7, 0.5, 2) == 3 and keep_count(5, 0.5, 2) == 2
    assert keep_count(2, 0.5, 2) == 2 and keep_count(1, 0.9) == 1 and keep_count(10, 0.7) == 3


# ------------------------------------------------------------------------------------------------
# Metadata: location, date, GSD, bandwidth, unknowns, dropout


def test_spherical_harmonics_are_orthonormal_and_match_scipy():
    scipy_special = pytest.importorskip("scipy.special")
    import numpy as np

    degree = 6
    # Gauss-Legendre in cos(colatitude) x uniform longitude integrates these products exactly
    nodes, weights = np.polynomial.legendre.leggauss(12)
    lon = np.linspace(-180, 180, 24, endpoint=False)
    lat = np.degrees(np.arcsin(nodes))
    grid = torch.tensor([[lo, la] for la in lat for lo in lon])
    Y = spherical_harmonics(grid, degree).double()  # [P, degree²]
    w = torch.tensor([wt * 2 * math.pi / len(lon) for wt in weights for _ in lon], dtype=torch.double)
    gram = Y.T @ (Y * w[:, None])
    torch.testing.assert_close(gram, torch.eye(degree**2, dtype=torch.double), atol=1e-5, rtol=0)
    # against scipy's complex harmonics: real Y_l^m = sqrt(2) (-1)^m Re/Im of the complex one
    pts = torch.tensor([[-88.2, 40.1], [151.2, -33.9], [0.0, 0.0], [179.9, 89.0]])
    ours = spherical_harmonics(pts, degree).double()
    theta = np.radians(90.0 - pts[:, 1].numpy())
    phi = np.radians(pts[:, 0].numpy())
    col = 0
    for ell in range(degree):
        for m in range(-ell, ell + 1):
            z = scipy_special.sph_harm_y(ell, abs(m), theta, phi)
            ref = z.real if m == 0 else math.sqrt(2) * (-1) ** m * (z.real if m > 0 else z.imag)
            np.testing.assert_allclose(ours[:, col].numpy(), ref, atol=1e-5)
            col += 1


def test_location_embedding_is_continuous_on_the_sphere():
    emb = tiny_encoder().pos_chan_embed.meta
    gsd = torch.full((2,), 10.0)
    seam = emb.per_tile(torch.tensor([[180.0, 12.0], [-180.0, 12.0]]), gsd)
    torch.testing.assert_close(seam[0], seam[1], atol=1e-5, rtol=0)  # no seam at the antimeridian
    pole = emb.per_tile(torch.tensor([[10.0, 90.0], [-120.0, 90.0]]), gsd)
    torch.testing.assert_close(pole[0], pole[1], atol=1e-5, rtol=0)  # the pole has no longitude
    apart = emb.per_tile(torch.tensor([[10.0, 45.0], [10.0, -45.0]]), gsd)
    assert not torch.allclose(apart[0], apart[1])  # hemispheres differ


def test_all_metadata_hidden_runs_on_the_unknown_embeddings():
    mae = tiny_mae(metadata_dropout=NO_META_DROPOUT)
    batch = make_batch(C=4, H=8, W=8)
    hidden = Batch(**{**batch.tensors(), "time": torch.full_like(batch.time, math.nan),
                      "bandwidth": torch.full_like(batch.bandwidth, math.nan),
                      "gsd": torch.full_like(batch.gsd, math.nan),
                      "lonlat": torch.full_like(batch.lonlat, math.nan)})
    out = mae(hidden, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss) and torch.isfinite(out.pred).all()
    out.loss.backward()
    for module in (mae.encoder.pos_chan_embed, mae.decoder_pos_chan_embed):
        meta = module.meta
        for part in (meta.time, meta.location, meta.gsd):
            assert part.unknown.grad.abs().sum() > 0  # the learned "unknown" embedding is used ...
            assert part.fc1.weight.grad is None or (part.fc1.weight.grad == 0).all()  # ... not the features
        assert module.chan.unknown_bandwidth.grad.abs().sum() > 0
    # hidden values are never read: any stand-in for "unknown" gives the same tokens
    enc = mae.encoder.eval()
    other = Batch(**{**hidden.tensors(), "gsd": torch.full_like(batch.gsd, -1.0),
                     "bandwidth": torch.zeros_like(batch.bandwidth)})
    other.lonlat = None
    with torch.no_grad():
        torch.testing.assert_close(enc.forward_features(hidden), enc.forward_features(other))
    # unknown GSD: positions at the nominal GSD, and an embedding that differs from a known 10 m
    with torch.no_grad():
        assert not torch.allclose(enc.forward_features(hidden), enc.forward_features(
            Batch(**{**hidden.tensors(), "gsd": torch.full_like(batch.gsd, 10.0)})))


def test_metadata_dropout_hides_each_kind():
    mae = tiny_mae(metadata_dropout={"location": 1.0, "time": 1.0, "gsd": 1.0, "bandwidth": 1.0})
    batch = make_batch(C=3, H=8, W=8)
    hidden = Batch(**{**batch.tensors(), "time": torch.full_like(batch.time, math.nan),
                      "bandwidth": torch.full_like(batch.bandwidth, math.nan),
                      "gsd": torch.full_like(batch.gsd, math.nan),
                      "lonlat": torch.full_like(batch.lonlat, math.nan)})
    a = mae(batch, generator=torch.Generator().manual_seed(0))
    ref = tiny_mae(metadata_dropout=NO_META_DROPOUT)
    ref.load_state_dict(mae.state_dict())
    g = torch.Generator().manual_seed(0)
    torch.rand(2, 4, generator=g)  # the dropout's draws, to keep the masking stream aligned
    b = ref(hidden, generator=g)
    torch.testing.assert_close(a.loss, b.loss)
    mae.eval()  # never in evaluation
    c = mae(batch, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(c.loss, a.loss)
    assert mae.metadata_dropout != NO_META_DROPOUT and tiny_mae().metadata_dropout["time"] > 0  # on by default


def test_position_periods_respect_nyquist():
    enc = tiny_encoder(patch_size=8, finest_gsd_m=10.0)
    pos = enc.pos_chan_embed.pos
    assert float(pos.periods.min()) == pytest.approx(2 * 8 * 10.0)
    coords = grid_coords((3, 3), torch.tensor([80.0, 240.0]))
    feats = pos(coords, torch.tensor([80.0, 240.0]))  # [B, N, D]
    K = pos.periods.numel()
    fine, coarse = feats[0, :, :K], feats[1, :, :K]  # row sines
    assert (fine.abs().sum(0) > 0).sum() > (coarse.abs().sum(0) > 0).sum()  # coarse GSD: short periods faded
    assert (coarse[:, pos.periods < 240.0] == 0).all()


# ------------------------------------------------------------------------------------------------
# Gradients and NaN safety


def test_every_parameter_gets_a_gradient():
    enc = tiny_encoder(num_classes=3, perception_radius_m=50.0, init_values=0.1)
    batch = make_batch(C=0, H=8, W=8, sensors=mixed_sensors())
    batch.lonlat[1] = math.nan  # one tile of unknown location, ...
    batch.gsd[1] = math.nan  # ... and GSD
    batch.bandwidth[:, 3] = math.nan
    batch.wavelength[:, 5] = math.nan
    enc(batch).square().sum().backward()
    mae = tiny_mae(spectral_patch=2, metadata_dropout=NO_META_DROPOUT)
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
    batch.gsd[:] = float("nan")  # unknown GSD: the learned "unknown" embedding
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
    assert (a.obs_mask.sum(1) == 3).all()  # 5 observations, max(2, floor(2.5)) = 2 kept
    assert not torch.equal(a.pos_mask[0], a.pos_mask[1]) or not torch.equal(a.obs_mask[0], a.obs_mask[1])
    two = mae(make_batch(C=2), generator=torch.Generator().manual_seed(0))
    assert not two.obs_mask.any()  # at least 2 observations always kept
    # reconstruction pastes visible tokens back
    rec = a.reconstruction()
    vis = ~a.masked_pixels()
    torch.testing.assert_close(rec[vis], batch.pixels[vis], atol=1e-4, rtol=1e-4)


def test_grad_checkpointing_same_result():
    mae = tiny_mae(perception_radius_m=50.0)
    batch = make_batch(C=3, H=8, W=8)
    batch.valid[:, 1, :4, :4] = False
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
        lambda: tiny_encoder(depth=1, spectral_patch=3, perception_radius_m=50.0, rank=3),
        lambda: tiny_encoder(depth=1, num_heads=1, rank=4, spectral_head_dim=4),
        lambda: tiny_mae(),
        lambda: tiny_mae(rank=3, decoder_rank=3, perception_radius_m=0.0),
    ],
)
def test_flops_match_counter(builder):
    model = builder().eval()
    B, C, H = 2, 7, 24
    batch = make_batch(B=B, C=C, H=H, W=H)
    batch.valid[:, 1, :8, :8] = False  # masks on: their cost is elementwise, as counted
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad(), \
                fused.use_fused(False):
        model(batch)  # the math backend shows attention to the counter
    measured = counter.get_total_flops()
    assert abs(model.flops(B, C, H) - measured) / measured < 1e-3


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


# ------------------------------------------------------------------------------------------------
# Spectral patch embedding and the dense pixel head


def test_spectral_patch_embedding_weighs_a_band_by_its_wavelength_not_its_slot():
    from gfm.model.embed import SpectralPatchEmbed

    torch.manual_seed(0)
    embed = SpectralPatchEmbed(patch_size=2, embed_dim=8, spectral_patch=4)
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(1, 4, 4, 4, generator=g)
    wl = torch.tensor([[450.0, 560.0, 665.0, 842.0]])
    bw = torch.tensor([[65.0, 35.0, 30.0, 115.0]])
    filled = torch.ones(1, 4, dtype=torch.bool)
    tokens = embed(pixels, wl, bw, filled)
    assert tokens.shape == (1, 1, 4, 8)
    order = torch.tensor([3, 0, 2, 1])  # the same bands in other slots: the same token
    assert torch.allclose(embed(pixels[:, order], wl[:, order], bw[:, order], filled), tokens, atol=1e-6)
    # an empty slot adds nothing (the mean runs over filled slots only)
    padded = torch.cat([pixels[:, :3], torch.randn(1, 1, 4, 4, generator=g)], dim=1)
    empty = torch.tensor([[True, True, True, False]])
    reference = SpectralPatchEmbed(patch_size=2, embed_dim=8, spectral_patch=3)
    reference.load_state_dict(embed.state_dict())
    assert torch.allclose(embed(padded, wl, bw, empty), reference(pixels[:, :3], wl[:, :3], bw[:, :3], empty[:, :3]),
                          atol=1e-6)
    # a different wavelength in the same slot is a different token; an unknown one takes the learned weight
    assert not torch.allclose(embed(pixels, wl + 300.0, bw, filled), tokens)
    unknown = embed(pixels, torch.full_like(wl, math.nan), bw, filled)
    expected = torch.einsum("gk,kd->gd", rearrange_patches(pixels, 2),
                            embed.unknown_weight.view(4, 8).repeat(4, 1)) / 4 + embed.bias
    assert torch.allclose(unknown[0, 0], expected, atol=1e-5)


def rearrange_patches(pixels: torch.Tensor, p: int) -> torch.Tensor:
    """``[1, S, H, W]`` → the patch vectors ``[N, S·p²]`` of one group (as ``patchify`` orders them)."""
    from gfm.model.embed import patchify

    return patchify(pixels, p, pixels.shape[1])[0, 0]


def test_spectral_patch_embedding_trains_in_every_model_and_counts_its_flops():
    enc = tiny_encoder(patch_embed="spectral", spectral_patch=3)
    batch = make_batch(C=0, H=8, W=8, sensors=mixed_sensors())
    batch.wavelength[:, 5] = math.nan  # the unknown weight and the unknown bandwidth features train too
    batch.bandwidth[:, 3] = math.nan
    enc(batch).square().sum().backward()
    mae = tiny_mae(patch_embed="spectral", spectral_patch=3, metadata_dropout=NO_META_DROPOUT)
    mae(batch).loss.backward()
    for model in (enc, mae):
        for name, p in model.named_parameters():
            if "patch_embed" in name:
                assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    plain = make_batch(B=2, C=7, H=24, W=24)
    for model in (tiny_encoder(patch_embed="spectral", spectral_patch=3).eval(),
                  tiny_mae(patch_embed="spectral", spectral_patch=3).eval()):
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.no_grad(), \
                fused.use_fused(False):
            model(plain)
        measured = counter.get_total_flops()
        assert abs(model.flops(2, 7, 24) - measured) / measured < 1e-3
    with pytest.raises(ValueError, match="patch_embed"):
        tiny_encoder(patch_embed="conv")


def test_dense_pixel_head_and_smoothing():
    from gfm.model.heads import DensePixelHead, smooth_probabilities

    enc = tiny_encoder(patch_size=4)
    batch = make_batch(C=3, H=10, W=10)
    x = enc.forward_features(batch)
    head = DensePixelHead(32, num_rows=3, num_bands=3, num_classes=5, patch_size=4, hidden=16)
    logits = head(x, batch.pixels, (3, 3))
    assert logits.shape == (2, 5, 10, 10)
    # the pixel path reaches each pixel alone: changing one pixel's bands changes only its own logits
    # when the tokens are held fixed
    other = batch.pixels.clone()
    other[:, :, 4, 6] += 3.0
    diff = (head(x, other, (3, 3)) - logits).abs().sum(dim=(0, 1))
    assert diff[4, 6] > 0 and diff.sum() == diff[4, 6]
    with pytest.raises(ValueError, match="3 bands"):
        head(x, batch.pixels[:, :2], (3, 3))
    with pytest.raises(ValueError, match="3 token rows"):
        head(x[:, :3], batch.pixels, (3, 3))
    # the rows of a position are concatenated, not averaged: swapping two rows' tokens changes the logits
    swapped = x.clone()
    swapped[:, [1, 2]] = x[:, [2, 1]]
    assert not torch.allclose(head(swapped, batch.pixels, (3, 3)), logits)
    # smoothing: a box average of probabilities over valid pixels; size 1 = softmax
    prob = smooth_probabilities(logits, 1)
    assert torch.allclose(prob, logits.softmax(1))
    valid = torch.ones(2, 10, 10, dtype=torch.bool)
    valid[:, 0, :] = False
    smoothed = smooth_probabilities(logits, 3, valid)
    by_hand = logits.softmax(1)[0, :, 1:3, 2:5].mean(dim=(1, 2))  # pixel (1, 3): rows 0..2, row 0 invalid
    assert torch.allclose(smoothed[0, :, 1, 3], by_hand, atol=1e-6)
    assert torch.allclose(smoothed.sum(1), torch.ones(2, 10, 10), atol=1e-5)
    with pytest.raises(ValueError, match="odd"):
        smooth_probabilities(logits, 4)


def test_tile_mean_baseline_scores_the_per_band_tile_mean_with_the_same_masks():
    mae = tiny_mae(norm_pix_loss=False, loss_balance="pixel", spectral_patch=2, metadata_dropout=NO_META_DROPOUT)
    batch = make_batch(B=2, C=4, H=8, W=8)
    batch.valid[0, 1, :4, :4] = False  # invalid pixels neither count in the mean nor in the loss
    out = mae(batch, torch.Generator().manual_seed(0))
    base = mae.tile_mean_loss(out)
    x, v = batch.pixels, batch.valid.float()
    band_mean = (x * v).sum((2, 3), keepdim=True) / v.sum((2, 3), keepdim=True)
    err = (x - band_mean).square() * v  # [B, C, H, W]
    hidden = out.masked_pixels().float()  # hidden by position or by row
    by_position = out.unpatchify(out.pos_mask[:, None, :, None].expand_as(out.pred).float())
    expected_pos = (err * by_position).sum() / (v * by_position).sum()
    assert torch.allclose(base["loss_pos"], expected_pos, atol=1e-5)
    assert (hidden >= by_position).all()
    flat = make_batch(B=2, C=4, H=8, W=8)
    flat.pixels[:] = torch.arange(4.0)[None, :, None, None]  # every band constant over its tile
    out = mae(flat, torch.Generator().manual_seed(0))
    assert float(mae.tile_mean_loss(out)["loss_pos"]) == 0.0 and float(out.loss.detach()) > 0
