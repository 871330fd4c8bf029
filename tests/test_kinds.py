"""Kinds with room: the kind table has ``KIND_SLOTS`` rows, so adding a kind keeps earlier exports loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import gfm.model.embed as embed
import gfm.sensors as sensors
from gfm.hub.sources import read_safetensors
from gfm.model.embed import KindEmbedding, with_kind_room
from gfm.sensors import KIND_SLOTS, KINDS
from tests.test_model import make_batch, tiny_encoder


def test_the_table_has_room_and_only_known_kinds_are_drawn() -> None:
    assert len(KINDS) <= KIND_SLOTS
    torch.manual_seed(0)
    table = KindEmbedding(16)
    torch.manual_seed(0)
    plain = nn.Embedding(len(KINDS), 16)  # what the table was before it had room: the same draws
    assert table.weight.shape == (KIND_SLOTS, 16)
    assert torch.equal(table.weight[: len(KINDS)], plain.weight)
    assert not table.weight[len(KINDS):].any()
    enc = tiny_encoder()
    rows = [m.weight for m in enc.modules() if isinstance(m, KindEmbedding)]
    assert len(rows) == 1 and not rows[0][len(KINDS):].any()  # init_module_weights keeps the reserved rows zero


def _old_export(tmp_path: Path) -> tuple[nn.Module, Path]:
    """An encoder and its weights as an export made before the table had room (one row per kind)."""
    torch.manual_seed(0)
    enc = tiny_encoder().eval()
    state = {k: v.clone() for k, v in enc.state_dict().items()}
    key = next(k for k in state if k.endswith(embed.KIND_TABLE))
    state[key] = state[key][: len(KINDS)].contiguous()
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    return enc, path


def test_an_export_from_before_the_room_loads_strictly_and_computes_the_same(tmp_path: Path) -> None:
    enc, path = _old_export(tmp_path)
    state = read_safetensors(path)
    fresh = tiny_encoder().eval()
    fresh.load_state_dict(state, strict=True)
    batch = make_batch(B=2, C=5, H=16, W=16)
    with torch.no_grad():
        assert torch.equal(fresh(batch), enc(batch))


def test_adding_a_kind_keeps_the_shape_and_earlier_exports_loading(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    enc, path = _old_export(tmp_path)
    more = (*KINDS, "lidar_intensity")
    monkeypatch.setattr(sensors, "KINDS", more)
    monkeypatch.setattr(sensors, "KIND_CODE", {k: i for i, k in enumerate(more)})
    monkeypatch.setattr(embed, "KINDS", more)
    after = tiny_encoder().eval()
    assert {k: v.shape for k, v in after.state_dict().items()} == {k: v.shape for k, v in enc.state_dict().items()}
    after.load_state_dict(read_safetensors(path), strict=True)
    table = next(m for m in after.modules() if isinstance(m, KindEmbedding))
    assert not table.weight[len(KINDS)].any()  # the new kind adds nothing until a model is trained with it


def test_with_kind_room_pads_only_short_kind_tables() -> None:
    state = {"a.kind_embed.weight": torch.ones(3, 4), "b.weight": torch.ones(3, 4),
             "c.kind_embed.weight": torch.ones(KIND_SLOTS, 4)}
    out = with_kind_room(dict(state))
    assert out["a.kind_embed.weight"].shape == (KIND_SLOTS, 4) and out["a.kind_embed.weight"][3:].abs().sum() == 0
    assert out["b.weight"] is state["b.weight"] and out["c.kind_embed.weight"] is state["c.kind_embed.weight"]
