"""Models on the Hugging Face Hub, without a network: a cache laid out as huggingface_hub lays it out.

``org/name[@revision]`` is accepted wherever a model is (``gfm.from_pretrained``, ``gfm export``,
``encoder.weights``); offline, the cache alone serves, and a model or revision it lacks is one line naming
both. The card of a fine-tuned export carries the task's pipeline tag, the base model and the test
figures as Hub evaluation results.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, constants

from gfm import hub
from tests.test_hub_helpers import make_finetune_run, make_run_dir, reference_batch

COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "gfm-org/gfm-test"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A run, a LoRA fine-tune of its export, and the export with that adapter beside it."""
    root = tmp_path_factory.mktemp("remote")
    run = make_run_dir(root / "run", depth=1)
    hub.export(run, root / "base")
    ft, _ = make_finetune_run(root / "base", root / "ft")
    (ft / "config.yaml").write_text("data:\n  shards: /somewhere/shards/my_fields\n")
    hub.export(run, root / "with_adapter", adapter=ft)
    return {"run": run, "base": root / "base", "ft": ft, "with_adapter": root / "with_adapter"}


@pytest.fixture
def hub_cache(exported: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``REPO`` at commit ``COMMIT`` (branch ``main``) in a Hugging Face cache, and the Hub offline."""
    cache = tmp_path / "hf"
    repo = cache / f"models--{REPO.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(exported["with_adapter"], repo / "snapshots" / COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def _logits(model: hub.GFMModel) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model.net.logits(reference_batch())
    return out


def test_a_hub_id_loads_from_the_cache_as_the_local_export(exported: dict[str, Path], hub_cache: Path) -> None:
    local = hub.from_pretrained(exported["with_adapter"], adapter=exported["with_adapter"] / "adapter")
    for name in (REPO, f"{REPO}@main", f"{REPO}@{COMMIT}"):
        remote = hub.from_pretrained(name, adapter=hub.model_location(name) / "adapter")
        assert torch.equal(_logits(remote), _logits(local)), name
    assert hub.from_pretrained(REPO, revision=COMMIT, cache_dir=hub_cache).config == \
        hub.from_pretrained(exported["with_adapter"]).config


def test_a_missing_model_or_revision_is_one_line_naming_both(hub_cache: Path) -> None:
    for name, revision in (("gfm-org/absent", "main"), (f"{REPO}@v2", "v2")):
        with pytest.raises(hub.HubError) as e:
            hub.from_pretrained(name)
        msg = str(e.value)
        assert "\n" not in msg and f"at revision {revision}" in msg and "not in the local Hugging Face cache" in msg
    with pytest.raises(hub.HubError, match="names revision 'v2', and revision='main' was passed too"):
        hub.from_pretrained(f"{REPO}@v2", revision="main")


def test_a_hub_id_is_a_model_argument_everywhere(exported: dict[str, Path], hub_cache: Path, tmp_path: Path) -> None:
    from gfm.finetune.weights import EncoderConfig, load_encoder

    report = hub.export(REPO, tmp_path / "copy", dtype="bf16")
    assert report.source.name == REPO and (tmp_path / "copy" / "config.json").is_file()
    loaded = load_encoder(EncoderConfig(weights=REPO))
    assert loaded.name == REPO and "tensors loaded" in loaded.description
    # a fine-tune of a Hub base names it as the card's base_model
    ft, _ = make_finetune_run(exported["base"], tmp_path / "ft2")
    hub.export(REPO, tmp_path / "tuned", adapter=ft)
    assert ModelCard.load(tmp_path / "tuned" / "README.md").data.base_model == REPO


def test_the_card_carries_the_task_and_its_test_figures(exported: dict[str, Path]) -> None:
    card = ModelCard.load(exported["with_adapter"] / "README.md")
    assert card.data.pipeline_tag == "image-segmentation" and card.data.library_name == "gfm"
    assert card.data.datasets == ["my_fields"]
    metrics = json.loads((exported["ft"] / "metrics.json").read_text())["test"]
    got = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert got["overall accuracy"] == metrics["oa"] and got["Cohen's kappa"] == metrics["kappa"]
    assert all(r.dataset_split == "test" and r.task_type == "image-segmentation" for r in card.data.eval_results)
    base = ModelCard.load(exported["base"] / "README.md")
    assert base.data.pipeline_tag == "image-feature-extraction" and not base.data.eval_results


def test_predict_finds_the_adapter_of_a_hub_export(exported: dict[str, Path], hub_cache: Path) -> None:
    from gfm.infer.predictors import load_task_model

    remote, local = load_task_model(REPO), load_task_model(exported["with_adapter"])
    assert remote.info.classes == local.info.classes == ["class0", "class1", "class2"]
    assert hub.stats_of(remote.config) == hub.stats_of(local.config)
