"""GFMBackbone (timm features_only style feature maps) and its terratorch registry source. Tiny, CPU."""

from __future__ import annotations

import copy
import sys
import types

import pytest
import torch

import gfm
from gfm.model import GFMBackbone, LESSViT, as_batch
from gfm.model.backbone import default_out_indices
from gfm.pretrained import list_pretrained
from gfm.terratorch import TerratorchBackbones, _not_found, register_terratorch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: a second thread only waits on the other (the machine's 2 cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


S2_BANDS = ["sentinel2_l2a/B02", "sentinel2_l2a/B03", "sentinel2_l2a/B04"]
HSI_WAVELENGTHS = torch.linspace(420.0, 2400.0, 7)


def tiny_encoder(depth: int = 3) -> LESSViT:
    torch.manual_seed(0)
    return LESSViT(embed_dim=32, depth=depth, num_heads=2, rank=2, spectral_head_dim=2, patch_size=4)


def pixels(B: int, C: int, H: int, W: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("out_indices, expected", [([0, 2], [0, 2]), (2, [1, 2]), ([-1, 0], [2, 0]), (None, [0, 1, 2])])
def test_maps_for_any_band_set(out_indices, expected) -> None:
    backbone = GFMBackbone(tiny_encoder(), out_indices, bands=S2_BANDS).eval()
    assert backbone.out_indices == (expected if out_indices is not None else default_out_indices(3))
    n = len(backbone.out_indices)
    assert backbone.out_channels == [32] * n
    assert backbone.feature_info.channels() == [32] * n and backbone.feature_info.reduction() == [4] * n
    with torch.no_grad():
        s2 = backbone(pixels(2, 3, 16, 12))  # the constructor's bands
        hsi = backbone(pixels(1, 7, 18, 8), HSI_WAVELENGTHS)  # another sensor, 7 bands, 18 rows: padded to 20
    assert [tuple(m.shape) for m in s2] == [(2, 32, 4, 3)] * n
    assert [tuple(m.shape) for m in hsi] == [(1, 32, 5, 2)] * n
    assert all(torch.isfinite(m).all() for m in s2 + hsi)
    tokens = GFMBackbone(tiny_encoder(), out_indices, reshape=False)(pixels(2, 7, 16, 12), HSI_WAVELENGTHS)
    assert [tuple(t.shape) for t in tokens] == [(2, 12, 32)] * n


def test_default_out_indices_are_evenly_spaced() -> None:
    assert default_out_indices(12) == [2, 5, 8, 11]
    assert default_out_indices(24) == [5, 11, 17, 23]
    assert default_out_indices(2) == [0, 0, 0, 1]


def test_summary_maps_equal_the_encoders_own_intermediates() -> None:
    """Against forward_intermediates on an unpruned copy, fed through as_batch (wavelengths only)."""
    encoder = tiny_encoder(depth=4)
    reference = copy.deepcopy(encoder).eval()
    backbone = GFMBackbone(encoder, [2, 0]).eval()
    assert len(backbone.encoder.blocks) == 3  # pruned after block 2, as timm's features_only
    x = pixels(2, 5, 12, 16)
    wl = torch.tensor([490.0, 560.0, 665.0, 842.0, 1610.0])
    with torch.no_grad():
        got = backbone(x, wl)
        want = reference.forward_intermediates(as_batch({"pixels": x, "wavelength": wl.expand(2, 5)}),
                                               indices=[2, 0], norm=True, intermediates_only=True)
    assert len(got) == 2  # in out_indices order; forward_intermediates returns block order
    torch.testing.assert_close(got[0], want[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[0], got[1])


def test_mean_maps_average_only_valid_observation_tokens() -> None:
    """Block outputs caught by hooks, normed and averaged over each position's valid rows by a loop."""
    encoder = tiny_encoder()
    reference = copy.deepcopy(encoder).eval()
    caught: list[torch.Tensor] = []
    reference.blocks[1].register_forward_hook(lambda mod, inp, out: caught.append(out))
    backbone = GFMBackbone(encoder, [1], reduce="mean").eval()
    B, C, H, W, p = 2, 4, 8, 8, 4
    x = pixels(B, C, H, W)
    valid = torch.ones(B, C, H, W, dtype=torch.bool)
    valid[0, 1, :4, :4] = False  # band 1 has no value in sample 0's first patch
    valid[1, :, 4:, 4:] = False  # sample 1's last patch has no value at all
    wl = torch.tensor([490.0, 560.0, 665.0, 842.0])
    with torch.no_grad():
        (got,) = backbone(x, wl, valid=valid, gsd=10.0)
        reference.forward_features(backbone.batch(x, wl, valid=valid, gsd=10.0))
    grid = reference.norm(caught[0])  # [B, C+1, N+1, D]
    want = torch.zeros(B, 32, H // p, W // p)
    for b in range(B):
        for n in range(4):
            i, j = divmod(n, 2)
            rows = [c for c in range(C) if valid[b, c, i * p:(i + 1) * p, j * p:(j + 1) * p].any()]
            if rows:
                want[b, :, i, j] = torch.stack([grid[b, 1 + c, 1 + n] for c in rows]).mean(dim=0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got[1, :, 1, 1].abs().sum() == 0  # no valid token: zeros
    naive = grid[0, 1:, 1].mean(dim=0)  # band 1's empty token included
    assert not torch.allclose(got[0, :, 0, 0], naive, atol=1e-4)


def test_gradients_reach_the_input_and_every_parameter() -> None:
    """Pruned, every parameter gets a gradient (DDP needs no find_unused_parameters); unpruned, the last block none."""
    backbone = GFMBackbone(tiny_encoder(), [0, 1], bands=S2_BANDS)
    assert len(backbone.encoder.blocks) == 2
    x = pixels(2, 3, 8, 8).requires_grad_()
    maps = backbone(x, gsd=10.0, time=19000.0, lonlat=torch.tensor([8.5, 47.4]))
    sum((m**2).mean() for m in maps).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, param in backbone.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        if name.startswith(("encoder.blocks", "encoder.patch_embed", "encoder.norm")) and "bias" not in name:
            assert param.grad.abs().sum() > 0, name
    unpruned = GFMBackbone(tiny_encoder(), [0, 1], bands=S2_BANDS, prune=False)
    sum((m**2).mean() for m in unpruned(pixels(2, 3, 8, 8))).backward()
    idle = {n.split(".")[2] for n, p in unpruned.encoder.named_parameters(prefix="encoder") if p.grad is None}
    assert idle == {"2"}


def test_wrong_band_count_names_both_counts() -> None:
    backbone = GFMBackbone(tiny_encoder(), [0], bands=S2_BANDS)
    with pytest.raises(ValueError, match=r"x has 4 bands .* but 3 wavelengths"):
        backbone(pixels(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"x has 3 bands .* but 2 bandwidths"):
        backbone(pixels(1, 3, 8, 8), [490.0, 560.0, 665.0], bandwidths=[20.0, 30.0])
    with pytest.raises(ValueError, match="no wavelengths"):
        GFMBackbone(tiny_encoder(), [0])(pixels(1, 3, 8, 8))
    with pytest.raises(ValueError, match="2 bandwidths were given for 3 wavelengths"):
        GFMBackbone(tiny_encoder(), [0], wavelengths=[490.0, 560.0, 665.0], bandwidths=[20.0, 30.0])


@pytest.mark.parametrize("out_indices", [[0, 3], [-4], [], 4, 0])
def test_out_indices_out_of_range_name_the_depth(out_indices) -> None:
    with pytest.raises(ValueError, match="depth 3"):
        GFMBackbone(tiny_encoder(), out_indices)


def test_unknown_keywords_are_an_error_unless_ignored() -> None:
    x = pixels(1, 3, 8, 8)
    with pytest.raises(TypeError, match="location_coords"):
        GFMBackbone(tiny_encoder(), [0], bands=S2_BANDS)(x, location_coords=torch.zeros(1, 2))
    (m,) = GFMBackbone(tiny_encoder(), [0], bands=S2_BANDS, ignore_extra=True)(x, location_coords=torch.zeros(1, 2))
    assert m.shape == (1, 32, 2, 2)


def test_create_splits_builder_and_backbone_arguments() -> None:
    backbone = GFMBackbone.create("less_vit_tiny", [1], depth=2, embed_dim=48, num_heads=2, wavelengths=[490.0, 665.0])
    assert backbone.depth == 2 and backbone.out_channels == [48] and backbone.patch_size == 8
    assert backbone(pixels(1, 2, 16, 16))[0].shape == (1, 48, 2, 2)
    mae = GFMBackbone.create("hypermae_less_tiny", 1, depth=1, embed_dim=48, num_heads=2)  # its encoder
    assert isinstance(mae.encoder, LESSViT)


def test_a_shipped_pretrained_model_as_backbone() -> None:
    if not list_pretrained():
        pytest.skip("no pretrained model is shipped")
    name = list_pretrained()[0]
    backbone = GFMBackbone(gfm.from_pretrained(name), 1)
    p, D = backbone.patch_size, backbone.embed_dim
    with torch.no_grad():
        (m,) = backbone(pixels(1, 30, 4 * p, 2 * p), torch.linspace(400.0, 2500.0, 30))
    assert m.shape == (1, D, 4, 2) and torch.isfinite(m).all()


# ------------------------------------------------------------------------------------------------
# terratorch


def test_terratorch_source_follows_the_registry_protocol() -> None:
    """What terratorch's MultiSourceRegistry asks of a source: in, iter, len, build, KeyError when unknown."""
    source = TerratorchBackbones()
    assert "less_vit_tiny" in source and "resnet50" not in source
    assert len(source) == len(list(source)) and set(list_pretrained()) <= set(source)
    with pytest.raises(KeyError, match="resnet50"):
        source.build("resnet50")
    backbone = source.build("less_vit_tiny", out_indices=[0], depth=1, wavelengths=[490.0, 665.0])
    assert isinstance(backbone, GFMBackbone) and backbone.ignore_extra  # terratorch passes its batch's fields
    assert backbone(pixels(1, 2, 8, 8), temporal_coords=None)[0].shape == (1, 192, 1, 1)
    with pytest.raises(ValueError, match="without weights"):
        source.build("less_vit_tiny", pretrained=True, depth=1)
    if list_pretrained():
        with pytest.raises(ValueError, match="is a pretrained model"):
            source.build(list_pretrained()[0], pretrained=False)


def test_register_terratorch_adds_one_source(monkeypatch: pytest.MonkeyPatch) -> None:
    """Against a stand-in for terratorch.registry with the calls terratorch 1.1.1 offers."""

    class Registry:
        def __init__(self) -> None:
            self.sources: dict[str, object] = {}

        def register_source(self, prefix: str, registry: object) -> None:
            if prefix in self.sources:
                raise KeyError(prefix)
            self.sources[prefix] = registry

        def keys(self):
            return self.sources.keys()

        def __getitem__(self, prefix: str) -> object:
            return self.sources[prefix]

    class InvalidModelError(Exception):  # what terratorch 1.1's multi-source build skips
        pass

    module = types.ModuleType("terratorch.registry")
    module.BACKBONE_REGISTRY = Registry()  # type: ignore[attr-defined]
    utils = types.ModuleType("terratorch.utils")
    utils.InvalidModelError = InvalidModelError  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "terratorch", types.ModuleType("terratorch"))
    monkeypatch.setitem(sys.modules, "terratorch.registry", module)
    monkeypatch.setitem(sys.modules, "terratorch.utils", utils)
    first = register_terratorch()
    assert isinstance(first, TerratorchBackbones) and register_terratorch() is first
    assert list(module.BACKBONE_REGISTRY.keys()) == ["gfm"]
    _not_found.cache_clear()
    try:
        with pytest.raises(KeyError, match="no gfm backbone 'resnet50'") as caught:
            first.build("resnet50")
        assert isinstance(caught.value, InvalidModelError)
    finally:
        _not_found.cache_clear()


def test_terratorch_builds_gfm_backbones() -> None:
    pytest.importorskip("terratorch", reason="terratorch is not installed (optional; not a gfm dependency)")
    from terratorch.registry import BACKBONE_REGISTRY

    register_terratorch()
    assert "gfm_less_vit_tiny" in BACKBONE_REGISTRY
    backbone = BACKBONE_REGISTRY.build("gfm_less_vit_tiny", out_indices=[0, 1], depth=2, bands=S2_BANDS)
    assert isinstance(backbone, GFMBackbone) and backbone.out_channels == [192, 192]
    maps = backbone(pixels(1, 3, 16, 16))
    assert [tuple(m.shape) for m in maps] == [(1, 192, 2, 2)] * 2
