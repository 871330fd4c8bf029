"""Every registered model variant builds at its full size and runs a forward pass on a tiny input.

Full-size models are built on the meta device (no memory, no init cost) to check the constructor
arguments of every variant and the parameter count its builder's docstring states. The forward pass
runs on real CPU tensors: tiny and small variants at full depth; base and wider (90-750 M parameters)
with their full width but 2 encoder and 2 decoder blocks, which exercises the same code in ~1 s each.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from gfm.model import HyperMAE, LESSViT, create_model, list_models
from gfm.model.encoder import as_batch
from gfm.model.registry import _MODELS

REPO = Path(__file__).resolve().parents[1]
VARIANTS = list_models()
WIDE = 768  # base and wider run their forward with 2 encoder (and 2 decoder) blocks
REDUCED = {"depth": 2}
REDUCED_MAE = {"depth": 2, "decoder_depth": 2}


def test_the_registry_lists_every_family_and_size() -> None:
    for family in ("less_vit", "dense_vit", "hypermae_less"):
        assert {f"{family}_{size}" for size in ("tiny", "small", "base", "large", "huge")} <= set(VARIANTS)


@pytest.mark.parametrize("name", VARIANTS)
def test_full_size_builds_with_the_documented_parameter_count(name: str) -> None:
    with torch.device("meta"):
        model = create_model(name)
    stated = re.search(r"\(([\d.]+) M params\)", _MODELS[name].__doc__ or "")
    assert stated, f"{name}: the builder's docstring states no parameter count"
    # DeepSpeed broadcasts and flattens parameters viewed as bytes, which a 0-dim tensor cannot be
    assert not [n for n, p in model.named_parameters() if p.ndim == 0], f"{name} has 0-dim parameters"
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert round(count, 1) == float(stated.group(1)), f"{name}: {count:.2f} M parameters, docstring says {stated[1]}"


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_on_a_tiny_input(name: str) -> None:
    with torch.device("meta"):
        probe = create_model(name)
    mae = isinstance(probe, HyperMAE)
    width = (probe.encoder if mae else probe).embed_dim
    kwargs = (REDUCED_MAE if mae else REDUCED) if width >= WIDE else {}
    torch.manual_seed(0)
    model = create_model(name, **kwargs).eval()
    g = torch.Generator().manual_seed(0)
    batch = as_batch({  # 3 bands, 16 × 16 pixels: 2 × 2 patches of 8 px
        "pixels": torch.randn(2, 3, 16, 16, generator=g),
        "wavelength": torch.tensor([[490.0, 560.0, 665.0]]).repeat(2, 1),
    })
    with torch.no_grad():
        if isinstance(model, HyperMAE):
            out = model(batch, generator=torch.Generator().manual_seed(0))
            assert out.loss.ndim == 0 and torch.isfinite(out.loss)
        else:
            assert isinstance(model, LESSViT)
            features = model(batch)
            assert features.shape == (2, model.embed_dim) and torch.isfinite(features).all()


def test_importing_the_model_does_not_import_the_data_pipeline() -> None:
    # `import torch` itself imports torch.utils.data, so that module cannot be asserted on; what gfm
    # controls is that gfm.model pulls in neither the pipeline (gfm.data), the shard writer (gfm.shards,
    # shards) nor their dependencies (webdataset, rasterio).
    code = textwrap.dedent("""
        import sys
        import gfm.model
        gfm.model.create_model("less_vit_tiny")
        bad = sorted(m for m in sys.modules if m.split(".")[0] in {"webdataset", "rasterio", "shards"}
                     or m == "gfm.data" or m.startswith(("gfm.data.", "gfm.shards", "gfm.train")))
        print("IMPORTED", bad)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "IMPORTED []" in proc.stdout, proc.stdout
