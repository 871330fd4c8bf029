"""Untrusted weights and model arguments: nothing executed, one line naming the culprit, or the right result.

A crafted run directory whose checkpoint pickles call ``os.system`` must not run the payload under
``gfm export`` or fine-tuning's ``encoder.weights``; gfm's own ZeRO reader (:mod:`gfm.hub.zero`) must give
DeepSpeed's consolidation bit for bit (fast: files laid out as DeepSpeed does, with padding, frozen,
shared and buffer tensors; slow: genuine 2-rank bf16 checkpoints of ZeRO 1 and 3). Then one test per
weak case of loading an export: truncated weights, a config.json that is not a JSON object, a symlinked
export, a mistyped local path, a Hub id offline, an ``adapter/`` from another task.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import shlex
import shutil
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from gfm import hub
from gfm.finetune.weights import EncoderConfig, EncoderLoadError, load_encoder
from gfm.hub.zero import consolidate
from tests.test_hub_helpers import make_finetune_run, make_run_dir

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's reference consolidation, imported in-process


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a run directory made by hand, its export), a one-block model."""
    root = tmp_path_factory.mktemp("untrusted")
    run = make_run_dir(root / "run", depth=1)
    hub.export(run, root / "export")
    return run, root / "export"


def one_line(e: BaseException | str) -> str:
    text = str(e)
    assert text and "\n" not in text.strip(), text
    return text


# ------------------------------------------------------------------------------------------------
# A crafted checkpoint: its pickles call os.system


class Payload:
    """Unpickling this calls ``os.system("touch MARKER")``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def crafted_run(run: Path, root: Path, marker: Path) -> Path:
    """A run directory gfm did not write: latest → a complete ZeRO 2 step whose state files carry the payload."""
    evil = root / "evil_run"
    step = evil / "checkpoints" / "step_00000005"
    step.mkdir(parents=True)
    shutil.copy(run / "config.yaml", evil / "config.yaml")
    shutil.copy(run / "config.yaml", step / "config.yaml")
    (step / "trainer.json").write_text('{"step": 5, "zero_stage": 2, "world_size": 1, "precision": "fp32"}')
    (evil / "checkpoints" / "latest").write_text("step_00000005")
    torch.save({"module": {}, "param_shapes": [], "x": Payload(marker)}, step / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {"zero_stage": 2, "x": Payload(marker)}},
               step / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (step / "COMPLETE").write_text("")
    return evil


def test_the_crafted_payload_is_live(base: tuple[Path, Path], tmp_path: Path) -> None:
    """The fixture is a real exploit: a plain unpickling runs it (so the refusals below mean something)."""
    marker = tmp_path / "ran"
    evil = crafted_run(base[0], tmp_path, marker)
    torch.load(evil / "checkpoints" / "step_00000005" / "mp_rank_00_model_states.pt", weights_only=False)
    assert marker.exists()


def test_export_of_a_crafted_checkpoint_runs_nothing(base: tuple[Path, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from export.__main__ import main as export_main

    marker = tmp_path / "ran"
    evil = crafted_run(base[0], tmp_path, marker)
    for source in (evil, evil / "checkpoints" / "step_00000005"):
        assert export_main([str(source), str(tmp_path / "out")]) == 2
        err = one_line(capsys.readouterr().err)
        assert "_states.pt: refused: unpickling it would call" in err and "system" in err, err
        assert not (tmp_path / "out").exists()
    assert not marker.exists()


def test_finetune_weights_from_a_crafted_checkpoint_run_nothing(base: tuple[Path, Path], tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    evil = crafted_run(base[0], tmp_path, marker)
    with pytest.raises(EncoderLoadError) as e:
        load_encoder(EncoderConfig(weights=str(evil)))
    assert "encoder.weights:" in one_line(e.value) and "_states.pt: refused" in str(e.value)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------
# gfm's ZeRO reader against DeepSpeed's, on files laid out as DeepSpeed writes them


def _deepspeed_objects() -> tuple[Any, Any, Any]:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return LossScaler, ZeroStageEnum, fragment_address


def _deepspeed_consolidation(step: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return dict(get_fp32_state_dict_from_zero_checkpoint(str(step.parent), tag=step.name))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


WORLD = 3
SHAPES = [OrderedDict(a=torch.Size([3, 5]), b=torch.Size([7])), OrderedDict(c=torch.Size([2, 3]))]


def _model_states(params: dict[str, torch.Tensor], frozen: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {
        "module": OrderedDict(buf=torch.tensor([1.5, -2.0]), steps=torch.tensor([3]),
                              a=params["a"].bfloat16()),  # a bf16 copy of a parameter: not a buffer, not read
        "buffer_names": ["buf", "steps"], "param_shapes": SHAPES, "shared_params": {"alias": "c"},
        "frozen_param_shapes": OrderedDict((k, v.shape) for k, v in frozen.items()), "ds_version": "0.19.8",
    }


def _params() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    params = {k: torch.randn(s, generator=g) for group in SHAPES for k, s in group.items()}
    return params, {"f": torch.randn(5, generator=g)}


def write_zero2(step: Path) -> dict[str, torch.Tensor]:
    """ZeRO 2 over 3 ranks: group 0 is a, 1 element of alignment padding, b, then padding to 6k elements."""
    loss_scaler, stage, fragment = _deepspeed_objects()
    params, frozen = _params()
    step.mkdir(parents=True)
    pads = [[1, 0], [0]]
    flats = []
    for shapes, gpads in zip(SHAPES, pads):
        pieces = []
        for (name, _), pad in zip(shapes.items(), gpads):
            pieces += [params[name].reshape(-1), torch.full((pad,), 999.0)]
        flat = torch.cat(pieces)
        align = 2 * WORLD
        flats.append(torch.cat([flat, torch.full((align * math.ceil(flat.numel() / align) - flat.numel(),), 777.0)]))
    torch.save({**_model_states(params, frozen), "frozen_param_fragments": frozen}, step / "mp_rank_00_model_states.pt")
    for r in range(WORLD):
        torch.save({"optimizer_state_dict": {
            "loss_scaler": loss_scaler(1.0), "zero_stage": stage(2), "partition_count": [WORLD, WORLD],
            "single_partition_of_fp32_groups": [f.chunk(WORLD)[r].clone() for f in flats],
            "param_alignment_paddings": pads, "param_slice_mappings": [{"a": fragment(numel=3, start=0)}],
        }}, step / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    return {**params, **frozen}


def _zero3_split(t: torch.Tensor) -> list[torch.Tensor]:
    part = math.ceil(t.numel() / WORLD)
    padded = torch.cat([t.reshape(-1), torch.full((part * WORLD - t.numel(),), 555.0)])
    return list(padded.chunk(WORLD))


def write_zero3(step: Path) -> dict[str, torch.Tensor]:
    """ZeRO 3 over 3 ranks: every parameter (and the frozen one) split on its own, the last rank padded."""
    loss_scaler, stage, _ = _deepspeed_objects()
    params, frozen = _params()
    step.mkdir(parents=True)
    for r in range(WORLD):
        groups = [torch.cat([_zero3_split(params[n])[r] for n in shapes]) for shapes in SHAPES]
        fragments = {k: _zero3_split(v)[r].clone() for k, v in frozen.items()}
        torch.save({**_model_states(params, frozen), "frozen_param_fragments": fragments},
                   step / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
        torch.save({"optimizer_state_dict": {"zero_stage": stage(3), "loss_scaler": loss_scaler(1.0),
                                             "partition_count": WORLD, "fp32_flat_groups": groups}},
                   step / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    return {**params, **frozen}


@pytest.mark.parametrize("write", [write_zero2, write_zero3])
def test_zero_reader_equals_deepspeed_on_its_layout(tmp_path: Path, write: Any) -> None:
    step = tmp_path / "checkpoints" / "step_00000001"
    expected = write(step)
    mine = consolidate(step)
    assert_same(mine, _deepspeed_consolidation(step))
    for name, value in expected.items():  # and both are the tensors that were partitioned
        assert torch.equal(mine[name], value), name
    assert mine["alias"] is mine["c"] and mine["steps"].dtype == torch.int64
    assert torch.equal(mine["buf"], torch.tensor([1.5, -2.0]))


def test_zero_reader_refuses_a_missing_rank(tmp_path: Path) -> None:
    step = tmp_path / "checkpoints" / "step_00000001"
    write_zero2(step)
    (step / "zero_pp_rank_2_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(hub.HubError, match="partitioned over 3 ranks, but 2"):
        consolidate(step)


def test_zero_reader_refuses_a_truncated_file(tmp_path: Path) -> None:
    step = tmp_path / "checkpoints" / "step_00000001"
    write_zero2(step)
    optim = step / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    optim.write_bytes(optim.read_bytes()[:100])
    with pytest.raises(hub.HubError, match=f"{optim}: not a torch checkpoint archive") as e:
        consolidate(step)
    one_line(e.value)


@pytest.mark.slow
# ZeRO 2 and 3 in fp32 go through the same reader in tests/test_hub.py's exact-reload test
@pytest.mark.parametrize(("zero", "precision"), [(1, "bf16"), (3, "bf16")])
def test_zero_reader_equals_deepspeed_on_genuine_checkpoints(tmp_path: Path, zero: int, precision: str) -> None:
    """Two CPU ranks train the tiny fixture model for 2 steps (tests/test_train.py's worker)."""
    from tests.test_train import run_worker

    run_worker(tmp_path, "steps=2", f"engine.zero_stage={zero}", f"engine.precision={precision}", nproc=2)
    step = tmp_path / "checkpoints" / "step_00000002"
    mine = consolidate(step)
    from safetensors.torch import load_file

    gathered = load_file(str(tmp_path / "model.safetensors"))  # gathered by the engine at the end of the run
    assert mine.keys() == gathered.keys() and all(torch.equal(mine[k], gathered[k]) for k in mine)
    if (zero, precision) == (1, "bf16"):  # the bf16 optimizer's files: DeepSpeed's consolidation refuses them
        with pytest.raises(ValueError, match="is not a zero checkpoint"):
            _deepspeed_consolidation(step)
    else:
        assert_same(mine, _deepspeed_consolidation(step))


# ------------------------------------------------------------------------------------------------
# Loading an export: one line, or the right result


def test_truncated_weights_are_one_line(base: tuple[Path, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from export.__main__ import main as export_main

    bad = tmp_path / "truncated"
    shutil.copytree(base[1], bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(hub.HubError) as e:
        hub.from_pretrained(bad)
    assert f"{weights}: not a readable safetensors file" in one_line(e.value)
    with pytest.raises(EncoderLoadError, match="not a readable safetensors file") as e2:
        load_encoder(EncoderConfig(weights=str(bad)))
    one_line(e2.value)
    with pytest.raises(EncoderLoadError, match="not a readable safetensors file"):
        load_encoder(EncoderConfig(weights=str(weights)))  # the file itself
    assert export_main([str(bad), str(tmp_path / "out")]) == 2
    assert "not a readable safetensors file" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize(("text", "expected"), [
    ("{not json", "config.json: not readable as JSON"),
    ("[1, 2]", "config.json: expected a JSON object, found a JSON list"),
])
def test_config_json_that_is_not_a_json_object_is_one_line(base: tuple[Path, Path], tmp_path: Path, text: str,
                                                          expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    from export.__main__ import main as export_main

    bad = tmp_path / "bad"
    shutil.copytree(base[1], bad)
    (bad / "config.json").write_text(text)
    with pytest.raises(hub.HubError) as e:
        hub.from_pretrained(bad)
    assert expected in one_line(e.value)
    assert export_main([str(bad), str(tmp_path / "out")]) == 2
    assert expected in one_line(capsys.readouterr().err)


def test_a_symlinked_export_is_followed(base: tuple[Path, Path], tmp_path: Path) -> None:
    """A symlink to an export loads, re-exports and fine-tunes as the export itself; a dangling one is one line."""
    link = tmp_path / "link"
    link.symlink_to(base[1], target_is_directory=True)
    direct, linked = hub.from_pretrained(base[1]), hub.from_pretrained(str(link))
    a, b = direct.state_dict(), linked.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    report = hub.export(link, tmp_path / "again")
    assert report.source.kind == "export" and (tmp_path / "again" / "model.safetensors").is_file()
    assert "61 tensors loaded" in load_encoder(EncoderConfig(weights=str(link))).description
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(hub.HubError, match="a symbolic link to .*nowhere, which leads nowhere") as e:
        hub.from_pretrained(dangling)
    one_line(e.value)


@pytest.mark.parametrize("arg", ["./runs/typo", "runs/typo/", "runs/typo", "/abs/missing/model"])
def test_a_mistyped_local_path_never_reaches_the_hub(arg: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    import gfm.hub.model
    import gfm.hub.remote
    from export.embed import main as embed_main

    def no_hub(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the Hub was consulted")

    monkeypatch.setattr(gfm.hub.remote, "hub_offline_reason", no_hub)
    monkeypatch.setattr(gfm.hub.remote, "snapshot", no_hub)
    monkeypatch.setattr(gfm.hub.model.GFMModel, "from_pretrained", no_hub)
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(hub.HubError) as e:
        hub.from_pretrained(arg)
    assert one_line(e.value) == f"{arg}: no such file or directory"
    assert embed_main(["--model", arg, str(tmp_path / "runs"), "--out", str(tmp_path / "e.parquet")]) == 2
    assert f"{arg}: no such file or directory" in one_line(capsys.readouterr().err)


def test_a_hub_id_offline_is_one_quick_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(hub.HubError, match="HF_HUB_OFFLINE is set") as e:
        hub.from_pretrained("someone/gfm-nowhere")
    one_line(e.value)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # no network: a port nothing listens on
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(hub.HubError, match="not in the local Hugging Face cache while the Hub cannot be reached") as e:
        hub.from_pretrained("someone/gfm-nowhere")
    assert time.monotonic() - start < 10  # not huggingface_hub's ~23 s of retries
    assert one_line(e.value).startswith("someone/gfm-nowhere: no such local directory, and as a Hub model")


def test_an_adapter_from_another_task_is_refused(base: tuple[Path, Path], tmp_path: Path) -> None:
    from gfm.infer.predictors import load_task_model

    run, export_dir = base
    ft16, _ = make_finetune_run(export_dir, tmp_path / "ft16", classes=16)
    ft3, _ = make_finetune_run(export_dir, tmp_path / "ft3", classes=3, seed=1)
    hub.export(run, tmp_path / "e16", adapter=ft16)
    hub.export(run, tmp_path / "e3", adapter=ft3)
    assert load_task_model(tmp_path / "e3").info.classes == [f"class{i}" for i in range(3)]  # the genuine pair loads
    shutil.rmtree(tmp_path / "e16" / "adapter")
    shutil.copytree(tmp_path / "e3" / "adapter", tmp_path / "e16" / "adapter")  # swapped in from another task
    with pytest.raises(hub.HubError) as e:
        load_task_model(tmp_path / "e16")
    assert "has classes 3, the export's config.json task has 16" in one_line(e.value)
    with pytest.raises(hub.HubError, match="has classes 3, the export's config.json task has 16"):
        hub.from_pretrained(tmp_path / "e16", adapter=tmp_path / "e16" / "adapter")
    model = hub.from_pretrained(tmp_path / "e16", adapter=ft3)  # another run's adapter, named on purpose
    assert model.config["task"]["num_classes"] == 3


def test_crafted_trainer_json_is_one_line(base: tuple[Path, Path], tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    evil = crafted_run(base[0], tmp_path, marker)
    (evil / "checkpoints" / "step_00000005" / "trainer.json").write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(hub.HubError, match="trainer.json: not readable as JSON") as e:
        hub.resolve_source(evil)
    one_line(e.value)


def test_a_truncated_adapter_or_head_is_one_line(base: tuple[Path, Path], tmp_path: Path) -> None:
    from gfm.infer.predictors import load_task_model

    _, export_dir = base
    for method, name in (("lora", "adapter_model.safetensors"), ("linear_probe", "head.safetensors")):
        ft, _ = make_finetune_run(export_dir, tmp_path / method, method=method)
        (weights,) = ft.rglob(name)
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        with pytest.raises(hub.HubError) as e:
            load_task_model(export_dir, ft)
        assert f"{name}: not a readable safetensors file" in one_line(e.value)
