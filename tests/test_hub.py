"""Export and strict reload (gfm.hub, gfm export).

Fast tests build a run directory by hand (config.yaml, model.safetensors, shards with an index.json);
slow ones train for real with DeepSpeed on 2 CPU ranks (ZeRO 2 and 3) and on 1 rank (ZeRO 0), export the
checkpoint and the run, reload the export in a fresh process and compare its output with the
training-time engine's, bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from gfm import hub
from gfm.config import to_dict
from gfm.model.registry import ModelConfig
from tests.helpers_shards import L8, write_dataset
from tests.test_hub_helpers import forward, make_run_dir, reference_batch, single_thread

REPO = Path(__file__).resolve().parents[1]
WORKER = str(REPO / "tests" / "test_hub_helpers.py")
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
BANDS = [f"landsat8/{b['name']}" for b in L8]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu")
    env.pop("RANK", None)
    return env


def reload_and_forward(export_dir: Path, reference: Path) -> str:
    """In a fresh process: gfm.from_pretrained(export_dir), forward the reference batch, compare exactly."""
    code = textwrap.dedent(f"""
        import torch
        torch.set_num_threads(1)
        from safetensors.torch import load_file
        import gfm
        from gfm.batch import Batch
        from tests.test_hub_helpers import forward
        ref = load_file({str(reference)!r})
        pred = ref.pop("pred")
        ref.pop("pred_as_trained", None)
        model = gfm.from_pretrained({str(export_dir)!r})
        assert not model.training
        out = forward(model, Batch(**ref))
        print("EQUAL" if torch.equal(out, pred) else f"DIFFER max {{(out - pred).abs().max().item()}}")
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def gfm_cli(*args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "gfm.cli", *args], env=_env(), capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert proc.returncode == expect, f"exit {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


# ------------------------------------------------------------------------------------------------
# A run directory made by hand


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run made by hand (tests/test_hub_helpers.make_run_dir) plus the model's output on the reference batch."""
    root = make_run_dir(tmp_path_factory.mktemp("run"))
    net = ModelConfig(name="hypermae_less_tiny", patch_size=4).build().eval()
    net.load_state_dict(load_file(str(root / "model.safetensors")))
    batch = reference_batch()
    with single_thread():  # as in the reloading process
        pred = forward(net, batch)
    save_file({**{k: v.contiguous() for k, v in batch.tensors().items()}, "pred": pred},
              str(root / "reference.safetensors"))
    return root


@pytest.fixture(scope="module")
def exported(run_dir: Path) -> Path:
    out = run_dir / "export"
    report = hub.export(run_dir, out, license="cc-by-4.0")
    assert report.source.kind == "run" and report.bands == 3
    return out


def test_export_dir_has_hf_files(exported: Path, run_dir: Path) -> None:
    assert sorted(p.name for p in exported.iterdir()) == [".gfm-output", "README.md", "config.json",
                                                           "model.safetensors"]  # + gfm.outputs' marker
    assert not list(run_dir.glob(".export.*"))  # no temporary directory left behind
    weights = load_file(str(exported / "model.safetensors"))
    original = load_file(str(run_dir / "model.safetensors"))
    assert weights.keys() == original.keys()
    assert all(torch.equal(weights[k], original[k]) for k in weights)


def test_config_json_contents(exported: Path) -> None:
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["format"] == "gfm" and cfg["format_version"] == 1
    assert cfg["gfm_version"] == __import__("gfm").__version__
    assert cfg["model"]["name"] == "hypermae_less_tiny" and cfg["model"]["patch_size"] == 4
    # every ModelConfig field travels, whatever fields the model config has
    assert set(cfg["model"]) == set(to_dict(ModelConfig()))
    arch = cfg["architecture"]
    assert arch["class"] == "HyperMAE" and arch["encoder"]["class"] == "LESSViT"
    assert arch["encoder"]["embed_dim"] == 192 and arch["encoder"]["depth"] == 12
    assert arch["parameters"] == sum(v.numel() for v in load_file(str(exported / "model.safetensors")).values())
    index = json.loads((exported.parent / "data" / "index.json").read_text())
    assert set(cfg["bands"]) == set(BANDS)
    b2 = cfg["bands"]["landsat8/B2"]
    assert b2["center_nm"] == 482.0 and b2["fwhm_nm"] == 60.0 and b2["kind"] == "reflectance"
    assert b2["gsd_m"] == 30.0 and b2["scale"] is not None and "nodata" in b2
    assert b2["stats"]["mean"] == index["stats"]["landsat8/B2"]["mean"]
    assert cfg["sensors"]["landsat8"]["bands"] == BANDS
    assert cfg["inputs"]["fields"]["time"]["unknown"] == "NaN"
    assert cfg["inputs"]["patch_size"] == 4 and cfg["inputs"]["tile_size_trained"] == 16
    train = cfg["training"]
    assert train["step"] == 3 and train["final_metrics"]["loss"] == pytest.approx(1 / 3)
    assert train["data"]["samples"] == 8 and train["data"]["shards"] == 2
    assert train["config"]["engine"]["zero_stage"] == 1
    assert cfg["license"] == "cc-by-4.0" and cfg["task"] is None


def test_model_card_contents(exported: Path) -> None:
    card = (exported / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: gfm" in card and "license: cc-by-4.0" in card
    for section in ("## Training", "## Bands seen in pretraining", "## Load and normalise", "## Evaluation",
                    "## Intended use and limits", "## Licence", "## Citation"):
        assert section in card, section
    assert "| B3 | landsat8 | 561.4 | 57 | reflectance | 30 |" in card
    assert "gfm.from_pretrained" in card and "arXiv:2503.12843" in card
    assert "8 tiles in 2 shard(s)" in card


def test_reload_in_fresh_process_is_exact(exported: Path, run_dir: Path) -> None:
    assert reload_and_forward(exported, run_dir / "reference.safetensors") == "EQUAL"


def test_strict_keys_missing_and_unexpected(exported: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((exported / "config.json").read_text())
    weights = load_file(str(exported / "model.safetensors"))
    weights.pop("encoder.cls_token")
    weights["encoder.extra.weight"] = torch.zeros(2)
    save_file(weights, str(bad / "model.safetensors"))
    with pytest.raises(hub.HubError) as e:
        hub.from_pretrained(bad)
    msg = str(e.value)
    assert "1 missing key(s): encoder.cls_token" in msg and "1 unexpected key(s): encoder.extra.weight" in msg
    assert "\n" not in msg
    with pytest.raises(hub.HubError, match="strict"):
        hub.GFMModel.from_pretrained(str(exported), strict=False)


def test_incomplete_checkpoint_is_one_line(tmp_path: Path) -> None:
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000004"
    ckpt.mkdir(parents=True)
    (ckpt / "mp_rank_00_model_states.pt").write_bytes(b"half")
    with pytest.raises(hub.HubError, match="incomplete checkpoint .no COMPLETE marker"):
        hub.export(ckpt, tmp_path / "out")
    proc = gfm_cli("export", str(ckpt), str(tmp_path / "out"), expect=2)
    assert proc.stderr.count("\n") == 1 and "no COMPLETE marker" in proc.stderr
    assert not (tmp_path / "out").exists()
    # the run directory itself: no complete checkpoint and no model.safetensors
    proc = gfm_cli("export", str(tmp_path / "run"), str(tmp_path / "out"), expect=2)
    assert "no complete checkpoint" in proc.stderr


def test_existing_output_refused_unless_overwrite(run_dir: Path, exported: Path, tmp_path: Path) -> None:
    out = tmp_path / "exists"
    hub.export(run_dir, out)  # an export; one gfm did not write is never replaced (tests/test_untrusted_outputs.py)
    (out / "keep").write_text("x")
    proc = gfm_cli("export", str(run_dir), str(out), expect=2)
    assert "already exists (pass --overwrite" in proc.stderr and (out / "keep").exists()
    proc = gfm_cli("export", str(run_dir), str(out), "--overwrite")
    assert "exported run" in proc.stdout and not (out / "keep").exists() and (out / "config.json").is_file()


def test_export_from_safetensors_file_and_from_export(run_dir: Path, exported: Path, tmp_path: Path) -> None:
    a = hub.export(run_dir / "model.safetensors", tmp_path / "a")
    assert a.source.kind == "safetensors" and a.bands == 3  # index found through the config in the metadata
    b = hub.export(exported, tmp_path / "b", license="mit")
    assert b.source.kind == "export"
    cfg_b = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg_b["license"] == "mit" and cfg_b["bands"] == json.loads((exported / "config.json").read_text())["bands"]


def test_export_without_index_then_with_index(tmp_path: Path, run_dir: Path) -> None:
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg["data"] = {"source": "synthetic"}
    src = tmp_path / "run"
    src.mkdir()
    save_file(load_file(str(run_dir / "model.safetensors")), str(src / "model.safetensors"),
              metadata={"step": "3", "config": yaml.safe_dump(cfg)})
    proc = gfm_cli("export", str(src), str(tmp_path / "noidx"))
    assert "no band statistics recorded (data.source is 'synthetic')" in proc.stderr
    proc = gfm_cli("export", str(src), str(tmp_path / "idx"), "--index", str(run_dir / "data" / "index.json"))
    assert "3 band(s) with statistics" in proc.stdout


# ------------------------------------------------------------------------------------------------
# Inputs from raw values


def test_prepare_matches_the_training_loader(exported: Path, run_dir: Path) -> None:
    from gfm.data.sources import load_index
    from gfm.data.transforms import Augment, BandTable, check_tile, collate
    from tests.helpers_shards import make_tile

    model = hub.from_pretrained(exported)
    tile = make_tile("s", 0, L8, 16, np.random.default_rng(3))
    tile.pixels[1, 3, 4] = 0  # nodata
    index = load_index(str(run_dir / "data" / "index.json"))
    check_tile(tile, None)
    geom = Augment().draw(np.random.default_rng(0), 16, 16)
    expected = collate([tile], [geom], BandTable.from_bands(tile.meta["bands"], index))
    got = model.prepare(tile.pixels, tile.meta["bands"], nodata=0, gsd=30.0)
    assert torch.equal(got.pixels, expected.pixels) and torch.equal(got.valid, expected.valid)
    for name in ("wavelength", "bandwidth", "kind", "time", "gsd"):
        assert torch.allclose(getattr(got, name), getattr(expected, name), equal_nan=True), name
    # band keys alone give the same descriptions
    by_key = model.prepare(tile.pixels, BANDS, nodata=0, gsd=30.0, dates=["2015-08-04"] * 3)
    assert torch.equal(by_key.pixels, expected.pixels) and torch.equal(by_key.wavelength, expected.wavelength)
    assert torch.equal(by_key.time, expected.time)


def test_prepare_unknown_band_names_it_and_the_fixes(exported: Path) -> None:
    model = hub.from_pretrained(exported)
    raw = np.full((4, 8, 8), 1000, dtype=np.uint16)
    bands = [*BANDS, "landsat8/B5"]
    with pytest.raises(hub.UnknownBandsError) as e:
        model.prepare(raw, bands)
    assert e.value.bands == ["landsat8/B5"] and "stats=" in str(e.value) and "unknown='drop'" in str(e.value)
    dropped = model.prepare(raw, bands, unknown="drop")
    assert dropped.pixels.shape == (1, 3, 8, 8)
    fixed = model.prepare(raw, bands, stats={"landsat8/B5": {"mean": 1000.0, "std": 10.0}})
    assert fixed.pixels.shape == (1, 4, 8, 8) and float(fixed.pixels[0, 3].abs().max()) == 0.0
    assert fixed.wavelength[0, 3].item() == pytest.approx(865.0, abs=1.0)  # from the sensor registry
    emb = model.embed(fixed)
    assert emb.shape == (1, 192) and torch.isfinite(emb).all()


# ------------------------------------------------------------------------------------------------
# Real DeepSpeed runs


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    write_dataset(str(root), [4, 4], size=16)
    return root


def train(run_dir: Path, shards: Path, zero: int, nproc: int) -> Path:
    reference = run_dir / "reference.safetensors"
    args = [
        WORKER, "--reference", str(reference), f"run_dir={run_dir}", "steps=2", "seed=0",
        "model.name=hypermae_less_tiny", "model.patch_size=4",
        "data.source=shards", f"data.loader.shards={shards}", "data.loader.num_workers=0",
        f"data.loader.batch_size={4 // nproc}",
        "optim.lr=1e-3", "schedule.warmup_steps=1", f"engine.zero_stage={zero}", "engine.precision=fp32",
        "checkpoint.every=0", "logging.progress=false", "logging.tensorboard=false", "logging.peak_flops=1e9",
    ]
    cmd = [sys.executable, *args] if nproc == 1 else [
        TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", *args]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert reference.is_file()
    return reference


@pytest.mark.slow
@pytest.mark.parametrize(("zero", "nproc"), [(2, 2), (3, 2), (0, 1)])
def test_export_deepspeed_checkpoint_and_run_reload_exact(
    tmp_path: Path, shards: Path, zero: int, nproc: int
) -> None:
    run_dir = tmp_path / f"zero{zero}"
    reference = train(run_dir, shards, zero, nproc)
    ckpt = run_dir / "checkpoints" / "step_00000002"
    assert (ckpt / "COMPLETE").is_file()
    from_ckpt = hub.export(ckpt, tmp_path / "from_ckpt")
    assert from_ckpt.source.kind == "checkpoint" and from_ckpt.bands == 3
    cfg = json.loads((tmp_path / "from_ckpt" / "config.json").read_text())
    assert cfg["training"]["zero_stage"] == zero and cfg["training"]["world_size"] == nproc
    assert cfg["training"]["step"] == 2 and cfg["training"]["samples_seen"] == 8
    assert reload_and_forward(tmp_path / "from_ckpt", reference) == "EQUAL"
    ref = load_file(str(reference))  # what the engine computed (ZeRO-3: with DeepSpeed's own linear)
    assert torch.allclose(ref["pred_as_trained"], ref["pred"], rtol=0, atol=1e-4)
    # the run directory: its model.safetensors (gathered in-process at the end) is as recent as the checkpoint
    proc = gfm_cli("export", str(run_dir), str(tmp_path / "from_run"))
    assert "exported run" in proc.stdout
    cfg = json.loads((tmp_path / "from_run" / "config.json").read_text())
    assert cfg["training"]["world_size"] == nproc and cfg["training"]["samples_seen"] == 8
    assert reload_and_forward(tmp_path / "from_run", reference) == "EQUAL"
    a = load_file(str(tmp_path / "from_ckpt" / "model.safetensors"))
    b = load_file(str(tmp_path / "from_run" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
