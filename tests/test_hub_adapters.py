"""Adapters travel with an export (gfm export --adapter [--merge]) and reload to the same predictions.

The fine-tuning runs are written by ``gfm.finetune.artifacts.save_outputs`` (the path ``gfm finetune`` uses)
from a LoRA / probe / full model made in the test with random adapter weights, so no training is needed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from gfm import hub
from tests.test_hub import _env, gfm_cli
from tests.test_hub_helpers import make_finetune_run, make_run_dir, reference_batch, single_thread

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(run directory, its export)."""
    root = tmp_path_factory.mktemp("adapters")
    run = make_run_dir(root / "run")
    hub.export(run, root / "base")
    return run, root / "base"


@pytest.fixture(scope="module")
def lora(base: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.Tensor]:
    """A LoRA segmentation fine-tune of the base and its logits on the reference batch."""
    ft, model = make_finetune_run(base[1], tmp_path_factory.mktemp("ft") / "lora")
    with torch.no_grad(), single_thread():
        logits = model.logits(reference_batch())
    return ft, logits


def _logits_in_fresh_process(export_dir: Path, adapter: Path | None, out: Path) -> torch.Tensor:
    code = textwrap.dedent(f"""
        import torch
        from safetensors.torch import save_file
        import gfm
        from tests.test_hub_helpers import reference_batch
        model = gfm.from_pretrained({str(export_dir)!r}, adapter={str(adapter) if adapter else None!r})
        with torch.no_grad():
            save_file({{"logits": model.net.logits(reference_batch()).contiguous()}}, {str(out)!r})
    """)
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return load_file(str(out))["logits"]


def test_adapter_travels_beside_and_reloads_exactly(base: tuple[Path, Path], lora: tuple[Path, torch.Tensor],
                                                    tmp_path: Path) -> None:
    run, _ = base
    ft, expected = lora
    out = tmp_path / "export"
    proc = gfm_cli("export", str(run), str(out), "--adapter", str(ft))
    assert "adapter: lora beside" in proc.stdout
    files = sorted(p.name for p in (out / "adapter").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "finetune.json"]
    peft_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert peft_cfg["peft_type"] == "LORA" and peft_cfg["modules_to_save"] == ["task_head"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["task"]["merged"] is False and cfg["task"]["adapter"] == "adapter"
    assert cfg["task"]["class_names"] == ["class0", "class1", "class2"] and cfg["task"]["method"] == "lora"
    assert cfg["architecture"]["class"] == "HyperMAE"  # the base stays the pretraining model
    assert cfg["evaluation"]["metrics"]["oa"] == 0.5 and cfg["evaluation"]["split"] == "test"
    card = (out / "README.md").read_text()
    assert "## Task" in card and "in `adapter/` (peft format)" in card and "| oa | 0.5 |" in card
    got = _logits_in_fresh_process(out, out / "adapter", tmp_path / "logits.safetensors")
    assert torch.equal(got, expected)


def test_merged_export_is_the_task_model(base: tuple[Path, Path], lora: tuple[Path, torch.Tensor],
                                         tmp_path: Path) -> None:
    from gfm.finetune.artifacts import load_finetuned

    run, _ = base
    ft, unmerged = lora
    out = tmp_path / "merged"
    proc = gfm_cli("export", str(run), str(out), "--adapter", str(ft), "--merge")
    assert "adapter: lora merged" in proc.stdout and not (out / "adapter").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["task"]["merged"] is True and cfg["architecture"]["class"] == "TaskModel"
    keys = load_file(str(out / "model.safetensors")).keys()
    assert {k.split(".")[0] for k in keys} == {"encoder", "task_head"} and not any("lora" in k for k in keys)
    got = _logits_in_fresh_process(out, None, tmp_path / "logits.safetensors")
    with torch.no_grad(), single_thread():
        theirs = load_finetuned(ft, merged=True).logits(reference_batch())  # gfm finetune's own merged model
    assert torch.equal(got, theirs)
    assert torch.allclose(got, unmerged, atol=1e-5)  # merging W + BA rounds differently from x·W + x·B·A


def test_adapter_for_another_base_is_refused(base: tuple[Path, Path], lora: tuple[Path, torch.Tensor],
                                             tmp_path: Path) -> None:
    run, _ = base
    ft, _ = lora
    other = tmp_path / "other.safetensors"
    weights = load_file(str(run / "model.safetensors"))
    weights["encoder.cls_token"] = weights["encoder.cls_token"] + 1.0
    save_file(weights, str(other), metadata={"step": "3", "config": (run / "config.yaml").read_text()})
    with pytest.raises(hub.HubError, match="trained on another base model"):
        hub.export(other, tmp_path / "out", adapter=ft)
    assert not (tmp_path / "out").exists()
    proc = gfm_cli("export", str(other), str(tmp_path / "out"), "--adapter", str(ft), expect=2)
    assert proc.stderr.count("\n") == 1 and "fingerprint" in proc.stderr


def test_linear_probe_and_full_fine_tunes(base: tuple[Path, Path], tmp_path: Path) -> None:
    run, base_export = base
    probe, probe_model = make_finetune_run(base_export, tmp_path / "probe", method="linear_probe", seed=1)
    hub.export(run, tmp_path / "probe_export", adapter=probe)
    assert (tmp_path / "probe_export" / "adapter" / "head.safetensors").is_file()
    model = hub.from_pretrained(tmp_path / "probe_export", adapter=tmp_path / "probe_export" / "adapter")
    with torch.no_grad():
        assert torch.equal(model.net.logits(reference_batch()), probe_model.logits(reference_batch()))
    full, full_model = make_finetune_run(base_export, tmp_path / "full", method="full", seed=2)
    with pytest.raises(hub.HubError, match="keeps no adapter"):
        hub.export(run, tmp_path / "full_export", adapter=full)
    hub.export(run, tmp_path / "full_export", adapter=full, merge=True)
    merged = hub.from_pretrained(tmp_path / "full_export")
    with torch.no_grad():
        assert torch.equal(merged.net.logits(reference_batch()), full_model.logits(reference_batch()))
