"""Held-out reconstruction against the tile mean (gfm.train.heldout, python -m pretrain.evaluate)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from gfm.data import LoaderConfig  # noqa: E402
from gfm.model import create_model  # noqa: E402
from gfm.train.heldout import heldout_reconstruction, table  # noqa: E402
from tests.helpers_shards import write_dataset  # noqa: E402
from tests.test_hub_helpers import make_run_dir  # noqa: E402


def test_heldout_report_is_repeatable_and_names_its_sensors(tmp_path: Path) -> None:
    write_dataset(str(tmp_path), [6, 7, 8], mixed=True)
    torch.manual_seed(0)
    mae = create_model("hypermae_less_tiny", depth=1, patch_size=2, decoder_depth=1)

    def report():  # noqa: ANN202
        loader = LoaderConfig(shards=str(tmp_path), mode="epoch", batch_size=3, num_workers=0, crop_size=8,
                              hflip=False, vflip=False, rot90=False, shuffle_buffer=0).build(0, 1)
        return heldout_reconstruction(mae, loader, max_batches=20, seed=3,
                                      sensor_names={c: n for n, c in _codes().items()})

    a, b = report(), report()
    assert a.as_dict() == b.as_dict()  # same batches, same masks
    assert set(a.by_sensor) == {"landsat8", "sentinel1"}
    assert a.total.batches == sum(r.batches for r in a.by_sensor.values())
    assert a.total.samples == sum(r.samples for r in a.by_sensor.values()) >= 18  # 21 tiles, whole batches of 3
    assert a.total.loss > 0 and a.total.baseline > 0 and a.total.ratio == a.total.loss / a.total.baseline
    assert "landsat8" in table(a) and "all" in table(a)


def _codes() -> dict[str, int]:
    from gfm.batch import sensor_code

    return {name: sensor_code(name) for name in ("landsat8", "sentinel1")}


def test_program_prints_and_writes_the_table(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    from pretrain.evaluate import main

    run = make_run_dir(tmp_path / "run", depth=1)
    assert main([str(run), "--heldout", str(run / "data"), "--batches", "2", "--batch-size", "2", "--crop", "8",
                 "--pictures", str(tmp_path / "pics")]) == 0
    out = capsys.readouterr().out
    assert "tile mean" in out and "ratio" in out
    doc = json.loads((run / "heldout.json").read_text())
    assert doc["total"]["batches"] == 2 and doc["total"]["ratio"] > 0
    assert list((tmp_path / "pics").glob("heldout_*.png"))
    assert main([str(tmp_path / "nowhere"), "--heldout", str(run / "data")]) == 2
