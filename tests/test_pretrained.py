"""Models shipped inside the package (gfm.pretrained): registry, short names everywhere, bf16 storage.

A tiny HyperMAE (LESS ViT-Tiny width, 2 blocks, p 4) made by code is exported in bf16 into a temporary
folder of shipped models, which ``GFM_PRETRAINED_DIR`` points the registry at. The one-version rule is
checked against the real ``gfm/pretrained/`` folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import gfm
from gfm import distributed as gdist
from gfm import hub
from gfm.config import ConfigError, load
from gfm.finetune.artifacts import load_finetuned
from gfm.finetune.config import FinetuneConfig
from gfm.finetune.run import run
from gfm.outputs import MARKER
from gfm.pretrained import (
    ENV_VAR,
    ModelRef,
    PretrainedError,
    describe_pretrained,
    list_pretrained,
    pretrained_path,
    resolve,
)
from tests.test_finetune_fixtures import finetune_overrides, pixel_dataset
from tests.test_hub_helpers import forward, make_run_dir, reference_batch, single_thread

NAME = "tiny_hypermae"
SHIPPED_ROOT = Path(gfm.__file__).resolve().parent / "pretrained"  # the real folder, whatever the env says
MAX_SHIPPED_BYTES = 15_000_000
#: bf16 keeps 8 significant bits: a weight rounded to nearest is off by at most u = 2^-8 of itself
BF16_U = 2.0**-8


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pretraining run by hand: tiny HyperMAE (2 encoder blocks), L8-like shards with index.json, metrics."""
    return make_run_dir(tmp_path_factory.mktemp("pretrained_run"), depth=2)


@pytest.fixture(scope="module")
def root(run_dir: Path) -> Path:
    """A folder of shipped models holding one: the tiny model exported in bf16 under the short name."""
    folder = run_dir.parent / "shipped"
    hub.export(run_dir, folder / NAME, dtype="bf16")
    return folder


@pytest.fixture(scope="module")
def fp32_export(run_dir: Path) -> Path:
    out = run_dir.parent / "fp32"
    hub.export(run_dir, out)
    return out


@pytest.fixture()
def shipped(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The registry looks at ``root`` (GFM_PRETRAINED_DIR) for this test; returns the model's folder."""
    monkeypatch.setenv(ENV_VAR, str(root))
    return root / NAME


# ------------------------------------------------------------------------------------------------
# The rule of the repository


def test_at_most_one_model_is_shipped_in_the_repository() -> None:
    """One version in the repo: replace the shipped model, never add a second (see gfm/pretrained/__init__.py)."""
    folders = [p for p in SHIPPED_ROOT.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))]
    assert len(folders) <= 1, (f"{SHIPPED_ROOT} holds {len(folders)} model folders "
                               f"({', '.join(sorted(p.name for p in folders))}): replace the old one, never add one")
    assert list_pretrained(SHIPPED_ROOT) == [p.name for p in folders]
    for folder in folders:  # the one there is: a complete bf16 export within the size budget
        shipped = sorted(p.name for p in folder.iterdir() if p.name != MARKER)  # gfm export's marker may be there
        assert shipped == ["README.md", "config.json", "model.safetensors"]
        assert json.loads((folder / "config.json").read_text())["weights_dtype"] == "bfloat16"
        assert sum(p.stat().st_size for p in folder.iterdir()) <= MAX_SHIPPED_BYTES


def test_shipped_models_are_package_data() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    data = tomllib.loads((SHIPPED_ROOT.parents[1] / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "pretrained/*/*" in data["package-data"]["gfm"]


# ------------------------------------------------------------------------------------------------
# Registry and resolution


def test_registry_lists_the_subfolders(root: Path, tmp_path: Path, shipped: Path) -> None:
    assert list_pretrained() == [NAME]  # through GFM_PRETRAINED_DIR
    assert pretrained_path(NAME) == shipped
    assert list_pretrained(tmp_path / "none") == []
    other = tmp_path / "models"
    shutil.copytree(root / NAME, other / "b_model")
    (other / "__pycache__").mkdir()
    (other / ".hidden").mkdir()
    (other / "notes.txt").write_text("not a model")
    (other / "a_broken").mkdir()
    assert list_pretrained(other) == ["a_broken", "b_model"]  # root= wins over the environment variable
    with pytest.raises(PretrainedError, match=r"a_broken: shipped model folder without config.json and model"):
        pretrained_path("a_broken", other)


def test_unknown_short_name_lists_the_shipped_ones(shipped: Path, tmp_path: Path) -> None:
    with pytest.raises(PretrainedError, match=rf"^'nope': no such file or directory, and no shipped model of that "
                                              rf"name \(shipped: {NAME}; `gfm models` lists them\)$"):
        resolve("nope")
    with pytest.raises(PretrainedError, match=r"\(no model is shipped in .*empty; `gfm models`"):
        pretrained_path("nope", tmp_path / "empty")


def test_resolution_precedence(shipped: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve(NAME) == ModelRef(shipped, NAME)
    assert str(resolve(NAME)) == f"{NAME} ({shipped})"
    # path-like strings and Path objects that do not exist name themselves; never looked up as short names
    # (``runs/NAME`` is a path because ``runs/`` is a directory here; without it, it could be a Hub id)
    (tmp_path / "runs").mkdir()
    for arg in (f"./{NAME}", f"runs/{NAME}", str(tmp_path / NAME), ".hidden"):
        with pytest.raises(PretrainedError, match=rf"^{arg}: no such file or directory$"):
            resolve(arg)
    with pytest.raises(PretrainedError, match=rf"^{NAME}: no such file or directory$"):
        resolve(Path(NAME))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(hub.HubError, match=rf"^nowhere/{NAME}: no such local directory, and as a Hub model"):
        resolve(f"nowhere/{NAME}")
    # an existing local path wins over the short name
    (tmp_path / NAME).mkdir()
    assert resolve(NAME) == ModelRef(Path(NAME), None)
    assert resolve(f"./{NAME}").path.resolve() == (tmp_path / NAME).resolve()


# ------------------------------------------------------------------------------------------------
# bf16 storage


def test_bf16_export_is_half_the_size_and_loads_into_fp32(run_dir: Path, root: Path, fp32_export: Path) -> None:
    bf16_file, fp32_file = root / NAME / "model.safetensors", fp32_export / "model.safetensors"
    assert 0.45 < bf16_file.stat().st_size / fp32_file.stat().st_size < 0.55
    assert json.loads((root / NAME / "config.json").read_text())["weights_dtype"] == "bfloat16"
    assert json.loads((fp32_export / "config.json").read_text())["weights_dtype"] == "float32"
    stored, original = load_file(str(bf16_file)), load_file(str(fp32_file))
    assert stored.keys() == original.keys() and {v.dtype for v in stored.values()} == {torch.bfloat16}
    assert all(torch.equal(stored[k], original[k].to(torch.bfloat16)) for k in stored)  # rounded to nearest

    fp32, bf16 = gfm.from_pretrained(fp32_export), gfm.from_pretrained(root / NAME)
    assert {p.dtype for p in bf16.parameters()} == {torch.float32}
    # an independent construction: the fp32 model with every weight rounded to bf16 (then fp32 compute)
    rounded = gfm.from_pretrained(fp32_export)
    rounded.net.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in rounded.net.state_dict().items()})
    batch = reference_batch()
    with single_thread(), torch.no_grad():
        y32, y16, y_rounded = forward(fp32, batch), forward(bf16, batch), forward(rounded, batch)
        e32, e16 = fp32.embed(batch), bf16.embed(batch)
    assert torch.equal(y16, y_rounded)  # the loaded model is exactly the rounded weights, upcast
    assert not torch.equal(y16, y32)
    # Tolerance: each weight is off by at most u = 2^-8 of itself. Through the patch embedding, two blocks
    # and the decoder the errors add up roughly in quadrature, so the outputs move by a few u: measured
    # 1.3 u (relative L2) and 1.5 u of the largest output (elementwise) for the prediction. Allowed: 4 u and
    # 8 u, which still fails if a tensor were stored any coarser (fp8 has u = 2^-4) or left unloaded.
    for ref, out in ((y32, y16), (e32, e16)):
        assert float((out - ref).norm() / ref.norm()) < 4 * BF16_U
        assert float((out - ref).abs().max()) < 8 * BF16_U * float(ref.abs().max())


def test_strict_keys_still_refuse_a_missing_key_in_bf16(root: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "models" / "broken"
    shutil.copytree(root / NAME, broken)
    state = load_file(str(broken / "model.safetensors"))
    state.pop("encoder.cls_token")
    save_file(state, str(broken / "model.safetensors"))
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "models"))
    with pytest.raises(hub.HubError, match=r"1 missing key\(s\): encoder.cls_token"):
        gfm.from_pretrained("broken")  # by its short name
    with pytest.raises(hub.HubError, match=r"1 missing key\(s\): encoder.cls_token"):
        hub.export("broken", tmp_path / "out")


# ------------------------------------------------------------------------------------------------
# Short names everywhere a model is taken


def test_from_pretrained_short_name(shipped: Path) -> None:
    model = gfm.from_pretrained(NAME)
    assert not model.training and model.config["weights_dtype"] == "bfloat16"
    stored = load_file(str(shipped / "model.safetensors"))
    assert all(torch.equal(v, stored[k].float()) for k, v in model.net.state_dict().items())
    for arg, message in (("nope", rf"'nope': .* \(shipped: {NAME};"), ("./nope", r"^./nope: no such file"),
                         ("runs/a/b", r"^runs/a/b: no such file or directory$")):
        with pytest.raises(hub.HubError, match=message):
            gfm.from_pretrained(arg)


def test_gfm_export_short_name(shipped: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from export.__main__ import main

    assert main([NAME, str(tmp_path / "copy")]) == 0
    out = capsys.readouterr().out
    assert f"exported export {NAME} = {shipped / 'model.safetensors'}" in out and "(fp32)" in out
    config = json.loads((tmp_path / "copy" / "config.json").read_text())
    assert config["weights_dtype"] == "float32"
    copied = load_file(str(tmp_path / "copy" / "model.safetensors"))
    stored = load_file(str(shipped / "model.safetensors"))
    assert all(torch.equal(copied[k], stored[k].float()) for k in stored)  # bf16 → fp32 is exact
    assert main(["nope", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"gfm export: 'nope': no such file or directory, and no shipped model of that name (shipped: "
                   f"{NAME}; `gfm models` lists them)")


def test_gfm_embed_and_predict_take_a_short_name(run_dir: Path, shipped: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from export.embed import main as embed
    from export.predict import main as predict

    out = tmp_path / "tiles.parquet"
    assert embed([str(run_dir / "data"), "--model", NAME, "--out", str(out), "--no-progress"]) == 0
    assert out.is_file() and "8 tiles x 192" in capsys.readouterr().out
    # a pretraining model has no task head: the refusal comes after the short name was resolved and loaded
    assert predict(["scene.tif", "--model", NAME, "--out", str(tmp_path / "pred.tif")]) == 2
    assert f"{NAME}: a pretraining export has no task head" in capsys.readouterr().err


def test_gfm_models_lists_size_parameters_architecture_and_training(shipped: Path, run_dir: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from gfm.cli import main

    (info,) = describe_pretrained()
    params = sum(t.numel() for t in load_file(str(shipped / "model.safetensors")).values())
    assert (info.name, info.path, info.parameters, info.weights_dtype) == (NAME, shipped, params, "bfloat16")
    assert info.size_bytes == sum(p.stat().st_size for p in shipped.iterdir())
    assert info.architecture == ("hypermae_less_tiny: HyperMAE, encoder LESSViT (attention less, D 192, depth 2, "
                                 "p 4, s 1), decoder depth 2")
    assert info.step == 3 and info.losses == {"loss": pytest.approx(1 / 3)}
    assert info.corpus["samples"] == 8 and info.corpus["sensors"] == ["landsat8"]
    assert info.corpus_line().startswith("shards, 8 samples, 2 shards, sensors landsat8, 2015-08-04 .. 2015-08-04 (")

    assert main(["models"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"{NAME}  ({info.size_bytes / 1e6:.1f} MB on disk, {params / 1e6:.2f} M parameters, "
                           "weights bfloat16)")
    assert "depth 2" in text and "3 steps; last logged losses: loss 0.3333" in text and "sensors landsat8" in text
    assert main(["models", "--json"]) == 0
    (doc,) = json.loads(capsys.readouterr().out)
    assert doc["name"] == NAME and doc["parameters"] == params and doc["path"] == str(shipped)
    assert main(["models", "--dir", str(shipped / "none")]) == 0
    assert capsys.readouterr().out.startswith("no pretrained model is shipped in")


# ------------------------------------------------------------------------------------------------
# Fine-tuning from a short name


@pytest.fixture(scope="module")
def pixel_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gdist.init_distributed()  # a world of one, as in tests/test_finetune_run.py
    return pixel_dataset(tmp_path_factory.mktemp("pretrained_ft"))


def test_finetune_from_a_short_name(pixel_shards: Path, shipped: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "probe"
    overrides = [*finetune_overrides(pixel_shards, run_dir, "pixel", "linear_probe", steps=3), "data.window=5",
                 "encoder.name=auto", "encoder.kwargs={}", f"encoder.weights={NAME}"]
    res = run(load(FinetuneConfig, None, overrides))
    assert res.model is not None
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("encoder: "))
    assert line.startswith("encoder: hypermae_less_tiny (") and f"from {NAME} = {shipped} (export" in line
    encoder = json.loads((run_dir / "finetune.json").read_text())["encoder"]
    assert encoder["source"] == str(shipped.resolve()) and encoder["pretrained"] == NAME
    assert f"{NAME} = {shipped}" in encoder["description"]
    # the frozen base is the shipped weights, upcast; the probe reloads from the recorded source
    stored = load_file(str(shipped / "model.safetensors"))
    reloaded = load_finetuned(run_dir)
    for k, v in reloaded.encoder.state_dict().items():  # type: ignore[union-attr]
        assert torch.equal(v, stored[f"encoder.{k}"].float()), k


def test_encoder_weights_validation_names_the_argument(shipped: Path, tmp_path: Path) -> None:
    base = finetune_overrides(tmp_path, tmp_path / "run", "pixel", "linear_probe")
    with pytest.raises(ConfigError, match=rf"encoder.weights: 'nope': no such file or directory, and no shipped "
                                          rf"model of that name \(shipped: {NAME};"):
        load(FinetuneConfig, None, [*base, "encoder.weights=nope"])
    with pytest.raises(ConfigError, match=r"encoder.weights: ./nope: no such file or directory$"):
        load(FinetuneConfig, None, [*base, "encoder.weights=./nope"])
