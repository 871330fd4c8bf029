"""Hugging Face export and import: a trained gfm model as a directory anyone can load, strictly.

An exported model is a directory (or a Hub repository) holding

- ``config.json``: everything needed to rebuild and feed the model (see :func:`hub_config`): the model
  config (``gfm.model.ModelConfig`` fields, rebuilt with ``ModelConfig.build()``), a description of the
  architecture, the bands and sensors seen in pretraining with their physical description, scale/offset,
  nodata and normalisation statistics, what each input tensor means and what to pass when a value is
  unknown, a training summary and the gfm version;
- ``model.safetensors``: the fp32 weights, names exactly as in the training-time module;
- ``README.md``: a generated model card;
- ``adapter/`` (optional): a peft LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``)
  and its task head, beside the base weights.

Weights come from a run directory, a DeepSpeed checkpoint of any ZeRO stage (consolidated with
DeepSpeed's own ``zero_to_fp32`` utilities), a ``model.safetensors`` file or an exported directory.
:func:`from_pretrained` loads with strict keys: a weight the config does not expect, or one it expects
but the file lacks, is an error listing them (``huggingface_hub``'s mixin defaults to ``strict=False``,
which silently leaves missing weights at their random initialisation).

:func:`prepare` turns raw sensor values plus band descriptions into the model's input with the stored
statistics: ``(raw - mean) / std`` per band, exactly as the training loader normalised.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from huggingface_hub import ModelCard, ModelCardData, PyTorchModelHubMixin
from torch import nn

from gfm import __version__
from gfm.batch import Batch
from gfm.config import ConfigError, from_dict, to_dict
from gfm.sensors import KIND_CODE, SensorError, get_sensor

FORMAT = "gfm"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
ADAPTER_DIR = "adapter"
COMPLETE = "COMPLETE"  # the checkpoint marker written last by gfm.train.checkpoint
PAPER_URL = "https://arxiv.org/abs/2503.12843"
_STEP_DIR = re.compile(r"^step_(\d{8})$")

Pooling = Literal["mean", "cls"]


class HubError(ValueError):
    """An export or load problem, in one line naming the file, key or value and what was expected."""


class OutputExistsError(HubError):
    """The output path exists and overwriting was not asked for."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        super().__init__(f"{path}: already exists (pass overwrite=True to replace it)")


class UnknownBandsError(HubError):
    """Bands with no normalisation statistics in the model.

    Attributes:
        bands: the ``"sensor/band"`` keys that lack statistics.
        known: the keys the model has statistics for.
    """

    def __init__(self, bands: Sequence[str], known: Sequence[str], where: str = "") -> None:
        self.bands = list(bands)
        self.known = list(known)
        self.where = where
        shown = ", ".join(self.known[:12]) + (" ..." if len(self.known) > 12 else "")
        super().__init__(
            f"{where}band(s) {', '.join(self.bands)} have no normalisation statistics in this model "
            f"(it has: {shown or 'none'}); pass stats={{'<sensor>/<band>': {{'mean': m, 'std': s}}}} or an "
            "index.json with them, or unknown='drop' to leave these bands out"
        )


# ------------------------------------------------------------------------------------------------
# Where weights come from


@dataclass
class WeightsSource:
    """A resolved export source.

    Attributes:
        kind: ``run`` (a run directory), ``checkpoint`` (a DeepSpeed checkpoint directory),
            ``safetensors`` (a consolidated weights file) or ``export`` (an exported directory).
        path: what the user named.
        weights: the checkpoint directory or safetensors file the weights are read from.
        run_config: the resolved run config as plain data (``{}`` when unknown).
        model_config: the ``model`` section (``ModelConfig`` fields).
        step: optimizer step of the weights, when known.
        meta: the checkpoint's ``trainer.json`` (ZeRO stage, precision, world size...), when there is one.
        run_dir: the run directory, when known (metrics, index).
        exported: an exported directory's ``config.json`` (kind ``export`` only).
    """

    kind: str
    path: Path
    weights: Path
    run_config: dict[str, Any]
    model_config: dict[str, Any]
    step: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None
    exported: dict[str, Any] = field(default_factory=dict)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise HubError(f"{path}: cannot read the run config ({e})") from None
    if not isinstance(data, dict):
        raise HubError(f"{path}: the run config is not a mapping")
    return data


def _model_section(run_config: Mapping[str, Any], where: Path) -> dict[str, Any]:
    model = run_config.get("model")
    if not isinstance(model, dict):
        raise HubError(f"{where}: the run config has no 'model' section")
    return dict(model)


def _safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own SafetensorError on a bad header
        raise HubError(f"{path}: not a readable safetensors file ({e})") from None


def _complete_steps(ckpt_dir: Path) -> list[tuple[int, Path]]:
    found = []
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir() and (p / COMPLETE).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def _is_checkpoint_dir(path: Path) -> bool:
    return bool(
        _STEP_DIR.match(path.name)
        or (path / "trainer.json").is_file()
        or any(path.glob("*model_states.pt"))
    )


def _checkpoint_source(path: Path, given: Path) -> WeightsSource:
    if not (path / COMPLETE).is_file():
        complete = [p.name for _, p in _complete_steps(path.parent)]
        hint = f"complete ones beside it: {', '.join(complete)}" if complete else "no complete checkpoint beside it"
        raise HubError(f"{path}: incomplete checkpoint (no {COMPLETE} marker: it was still being written "
                       f"when the run stopped); {hint}")
    config_path = path / "config.yaml"
    if not config_path.is_file():
        raise HubError(f"{path}: checkpoint has no config.yaml (the resolved run config)")
    run_config = _read_yaml(config_path)
    meta: dict[str, Any] = {}
    if (path / "trainer.json").is_file():
        meta = json.loads((path / "trainer.json").read_text())
    m = _STEP_DIR.match(path.name)
    step = int(meta.get("step", int(m.group(1)) if m else -1))
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
    return WeightsSource("checkpoint", given, path, run_config, _model_section(run_config, config_path),
                         step if step >= 0 else None, meta, run_dir)


def _safetensors_source(path: Path, given: Path, run_dir: Path | None = None) -> WeightsSource:
    meta = _safetensors_metadata(path)
    run_config: dict[str, Any] = {}
    if "config" in meta:
        loaded = yaml.safe_load(meta["config"])
        run_config = loaded if isinstance(loaded, dict) else {}
    elif (path.parent / "config.yaml").is_file():
        run_config = _read_yaml(path.parent / "config.yaml")
    if not run_config:
        raise HubError(f"{path}: no run config in its metadata and no config.yaml beside it; cannot tell which "
                       "model these weights belong to")
    step = int(meta["step"]) if meta.get("step", "").isdigit() else None
    if run_dir is None and (path.parent / "config.yaml").is_file():
        run_dir = path.parent
    return WeightsSource("safetensors", given, path, run_config, _model_section(run_config, path), step, {}, run_dir)


def resolve_source(path: str | Path) -> WeightsSource:
    """Find the weights and config behind ``path``.

    ``path`` may be a run directory (its ``model.safetensors`` when that is at least as recent as the
    latest complete checkpoint, else that checkpoint), a ``checkpoints/`` directory (its latest complete
    checkpoint), one checkpoint directory ``step_XXXXXXXX`` (which must hold the ``COMPLETE`` marker), a
    ``.safetensors`` file whose metadata (or a ``config.yaml`` beside it) holds the run config, or an
    exported directory (``config.json`` with ``"format": "gfm"``).

    Raises:
        HubError: nothing usable at ``path``, or an incomplete checkpoint.
    """
    given = Path(path)
    p = given
    if not p.exists():
        raise HubError(f"{p}: no such file or directory")
    if p.is_file():
        if p.suffix != ".safetensors":
            raise HubError(f"{p}: expected a run directory, a checkpoint directory or a .safetensors file")
        return _safetensors_source(p, given)
    if (p / CONFIG_NAME).is_file() and (p / WEIGHTS_NAME).is_file():
        exported = json.loads((p / CONFIG_NAME).read_text())
        if exported.get("format") == FORMAT:
            return WeightsSource("export", given, p / WEIGHTS_NAME, exported.get("training", {}).get("config", {}),
                                 dict(exported["model"]), exported.get("training", {}).get("step"),
                                 exported=exported)
    if _is_checkpoint_dir(p):
        return _checkpoint_source(p, given)
    if p.name == "checkpoints" and not (p / "config.yaml").exists():
        complete = _complete_steps(p)
        if not complete:
            raise HubError(f"{p}: no complete checkpoint (no step_XXXXXXXX directory with a {COMPLETE} marker)")
        return _checkpoint_source(complete[-1][1], given)
    # a run directory
    complete = _complete_steps(p / "checkpoints")
    weights = p / WEIGHTS_NAME
    if weights.is_file():
        src = _safetensors_source(weights, given, run_dir=p)
        if not complete or (src.step is not None and src.step >= complete[-1][0]):
            src.kind = "run"
            return src
    if complete:
        src = _checkpoint_source(complete[-1][1], given)
        src.kind, src.run_dir = "run", p
        return src
    if (p / "checkpoints").is_dir():
        raise HubError(f"{p}: the run has no complete checkpoint (no COMPLETE marker under checkpoints/) and no "
                       f"{WEIGHTS_NAME}")
    raise HubError(f"{p}: not a run directory (no {WEIGHTS_NAME}, no checkpoints/), checkpoint or exported model")


def _zero_stage(path: Path, meta: Mapping[str, Any]) -> int:
    if "zero_stage" in meta:
        return int(meta["zero_stage"])
    if any(path.glob("zero_pp_rank_*_model_states.pt")):
        return 3
    return 1 if any(path.glob("*_optim_states.pt")) else 0


def load_checkpoint_state_dict(path: Path, meta: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Consolidated fp32 weights of a DeepSpeed checkpoint directory written at any ZeRO stage.

    ZeRO 1-3 (and bf16, whose fp32 master weights live in the optimizer partitions) go through
    DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint``; it unpickles the checkpoint files with
    ``torch.load(weights_only=False)`` (DeepSpeed's own code, not configurable), so only export
    checkpoints you wrote or trust. ZeRO 0 keeps the whole model in ``mp_rank_00_model_states.pt``, read
    here with ``weights_only=True``.
    """
    meta = meta or {}
    stage = _zero_stage(path, meta)
    has_optim = any(path.glob("*_optim_states.pt"))
    if stage == 0 and not has_optim:
        file = path / "mp_rank_00_model_states.pt"
        if not file.is_file():
            raise HubError(f"{path}: no mp_rank_00_model_states.pt (is this a DeepSpeed checkpoint?)")
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:  # an UnpicklingError names the global it refused
            raise HubError(f"{file}: cannot read the weights safely ({str(e).splitlines()[0]})") from None
        module = state.get("module")
        if not isinstance(module, dict):
            raise HubError(f"{file}: no 'module' weights inside")
        if any(v.dtype != torch.float32 for v in module.values() if v.is_floating_point()):
            raise HubError(f"{path}: a ZeRO 0 checkpoint without fp32 master weights holds only "
                           f"{next(v.dtype for v in module.values() if v.is_floating_point())} weights; export "
                           "the run's model.safetensors instead")
        return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        try:
            state_dict = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
        except (FileNotFoundError, ValueError) as e:
            raise HubError(f"{path}: DeepSpeed cannot consolidate this checkpoint ({e})") from None
    return {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}


def load_state_dict(source: WeightsSource) -> dict[str, torch.Tensor]:
    """The fp32 weights of a resolved source."""
    if source.weights.is_dir():
        return load_checkpoint_state_dict(source.weights, source.meta)
    from safetensors.torch import load_file

    return load_file(str(source.weights))


# ------------------------------------------------------------------------------------------------
# Building the model a config describes


def model_config(values: Mapping[str, Any]) -> Any:
    """``values`` as a typed ``gfm.model.ModelConfig`` (unknown keys are named in the error)."""
    from gfm.model.registry import ModelConfig

    try:
        return from_dict(ModelConfig, dict(values), prefix="model")
    except ConfigError as e:
        raise HubError(f"model config: {e}") from None


def build_net(config: Mapping[str, Any]) -> nn.Module:
    """The module an exported ``config.json`` (or any mapping with a ``model`` section) describes."""
    net = model_config(config["model"]).build()
    net.eval()
    return net


def _scalars(module: nn.Module) -> dict[str, Any]:
    return {k: v for k, v in sorted(vars(module).items())
            if not k.startswith("_") and k != "training" and isinstance(v, (bool, int, float, str))}


def describe_architecture(net: nn.Module) -> dict[str, Any]:
    """Class, parameter count and the scalar hyper-parameters a module and its encoder carry."""
    encoder = getattr(net, "encoder", net)
    out: dict[str, Any] = {
        "class": type(net).__name__,
        "parameters": sum(p.numel() for p in net.parameters()),
        "tensors": len(net.state_dict()),
        "hyperparameters": _scalars(net),
    }
    blocks = getattr(encoder, "blocks", None)
    enc: dict[str, Any] = {"class": type(encoder).__name__, **_scalars(encoder)}
    if blocks is not None:
        enc["depth"] = len(blocks)
    if encoder is not net:
        out["encoder"] = enc
        decoder_blocks = getattr(net, "decoder_blocks", None)
        if decoder_blocks is not None:
            out["hyperparameters"]["decoder_depth"] = len(decoder_blocks)
    else:
        out["hyperparameters"] = enc
    return out


# ------------------------------------------------------------------------------------------------
# Band table and statistics


def _sensor_facts(name: str) -> dict[str, Any]:
    try:
        s = get_sensor(name)
    except (SensorError, KeyError):
        return {}
    return {
        "description": s.description,
        "scale": s.scale,
        "offset": s.offset,
        "nodata": s.nodata,
        "gsd_m": {b.name: b.gsd_m for b in s.bands if b.gsd_m},
    }


def band_table(index: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(bands, sensors)`` for ``config.json`` from an ``index.json`` document.

    ``bands``: ``"sensor/band"`` → physical description (name, sensor, center_nm, fwhm_nm, kind), the
    sensor's native GSD, scale, offset and nodata when the sensor is registered, and the statistics
    (mean, std and whatever else the index holds). ``sensors``: name → description, scale, offset,
    nodata and the band keys seen.
    """
    stats = index.get("stats") or {}
    described = index.get("bands") or {}
    bands: dict[str, Any] = {}
    sensors: dict[str, Any] = {}
    for key in sorted(set(stats) | set(described)):
        desc = dict(described.get(key) or {})
        sensor, _, name = key.partition("/")
        facts = _sensor_facts(desc.get("sensor", sensor))
        entry = {
            "name": desc.get("name", name),
            "sensor": desc.get("sensor", sensor),
            "center_nm": desc.get("center_nm"),
            "fwhm_nm": desc.get("fwhm_nm"),
            "kind": desc.get("kind"),
            "gsd_m": facts.get("gsd_m", {}).get(desc.get("name", name)),
            "scale": facts.get("scale"),
            "offset": facts.get("offset"),
            "nodata": facts.get("nodata"),
            "stats": dict(stats.get(key) or {}),
        }
        bands[key] = entry
        s = sensors.setdefault(entry["sensor"], {
            "description": facts.get("description"), "scale": facts.get("scale"), "offset": facts.get("offset"),
            "nodata": facts.get("nodata"), "bands": [],
        })
        s["bands"].append(key)
    return bands, sensors


def stats_of(config: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """``"sensor/band"`` → ``{"mean", "std"}`` from an exported config (bands that have both)."""
    out = {}
    for key, b in (config.get("bands") or {}).items():
        st = b.get("stats") or {}
        if "mean" in st and "std" in st:
            out[key] = {"mean": float(st["mean"]), "std": float(st["std"])}
    return out


def read_index(path: str | Path) -> dict[str, Any]:
    """An ``index.json`` (a file or a dataset root) as a validated plain document (:mod:`gfm.index`)."""
    from gfm import index as index_contract

    try:
        return index_contract.read(path).to_dict()
    except index_contract.IndexFileError as e:
        raise HubError(str(e)) from None


def read_stats(path: str | Path) -> dict[str, dict[str, Any]]:
    """Statistics from an ``index.json``, an exported ``config.json`` or a plain ``{"sensor/band": {...}}`` file."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HubError(f"{p}: cannot read statistics ({e})") from None
    if not isinstance(doc, dict):
        raise HubError(f"{p}: expected a JSON object of statistics")
    if doc.get("format") == FORMAT:
        return stats_of(doc)
    table = doc.get("stats", doc)
    out = {}
    for key, st in table.items():
        if not (isinstance(st, dict) and "/" in key and "mean" in st and "std" in st):
            raise HubError(f"{p}: entry {key!r} is not '<sensor>/<band>': {{'mean': .., 'std': ..}}")
        out[key] = dict(st)
    return out


def _index_for_run(run_config: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The run's ``index.json`` document and where it was found (None and a reason when not found)."""
    data = run_config.get("data") or {}
    if data.get("source", "shards") != "shards":
        return None, f"data.source is {data.get('source')!r}"
    loader = data.get("loader") or {}
    spec, index = loader.get("shards"), loader.get("index")
    if not spec:
        return None, "data.loader.shards is empty"
    try:
        from gfm.data.sources import resolve_shards

        found = resolve_shards(str(spec), index)
    except Exception as e:  # LoaderError and friends: report, let the caller ask for --index
        return None, str(e).splitlines()[0]
    return dict(found.index.raw), str(found.index.url)


# ------------------------------------------------------------------------------------------------
# config.json


#: What each Batch field means for a user feeding the model, and the value to pass when it is unknown.
INPUTS: dict[str, dict[str, Any]] = {
    "pixels": {"shape": "[B, C, H, W] float32", "meaning": "(raw - mean) / std per observation, with the "
               "statistics of 'bands'; pixels marked invalid may hold anything", "unknown": None},
    "wavelength": {"shape": "[B, C] float32", "meaning": "centre wavelength in nm (radar wavelength for SAR)",
                   "unknown": "required"},
    "bandwidth": {"shape": "[B, C] float32", "meaning": "band FWHM in nm", "unknown": 10.0},
    "kind": {"shape": "[B, C] int64", "meaning": "observation kind code", "codes": KIND_CODE,
             "unknown": KIND_CODE["reflectance"]},
    "time": {"shape": "[B, C] float32", "meaning": "acquisition date, days since 1970-01-01",
             "unknown": "NaN"},
    "valid": {"shape": "[B, C, H, W] bool", "meaning": "True = usable pixel (not nodata, cloud or fill)",
              "unknown": "all True"},
    "gsd": {"shape": "[B] float32", "meaning": "ground sampling distance in metres", "unknown": "NaN"},
    "lonlat": {"shape": "[B, 2] float32", "meaning": "tile centre (longitude, latitude), WGS84 degrees",
               "unknown": "NaN or omit"},
    "sensor": {"shape": "[B, C] int64", "meaning": "sensor id: gfm.batch.sensor_code(name)", "unknown": "omit"},
}


def inputs_section(net: nn.Module, tile_size: int | None) -> dict[str, Any]:
    """The ``inputs`` part of ``config.json``: fields of :class:`gfm.batch.Batch` the model reads."""
    encoder = getattr(net, "encoder", net)
    names = [f.name for f in fields(Batch) if f.name not in ("label", "keys")]
    return {
        "fields": {n: INPUTS.get(n, {"meaning": "see gfm.batch.Batch", "unknown": "omit"}) for n in names},
        "patch_size": getattr(encoder, "patch_size", None),
        "spectral_patch": getattr(encoder, "spectral_patch", None),
        "tile_size_trained": tile_size,
        "any_band_set": "any number and order of observations; each carries its own wavelength, bandwidth, "
                        "kind and date, so unseen bands embed from their physical description",
        "helper": "gfm.hub.prepare(pixels, bands, stats) or model.prepare(...) builds this from raw values",
    }


def _metrics_tail(run_dir: Path | None) -> dict[str, Any]:
    if run_dir is None or not (run_dir / "metrics.jsonl").is_file():
        return {}
    last: dict[str, Any] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            last = json.loads(line)
    return {k: last[k] for k in ("step", "loss", "loss_pos", "loss_obs", "lr") if k in last}


def training_summary(source: WeightsSource, index: Mapping[str, Any] | None, index_url: str) -> dict[str, Any]:
    """Where the weights came from, how long and how they were trained, on which data."""
    rc = source.run_config
    engine = rc.get("engine") or {}
    meta = source.meta
    step = source.step if source.step is not None else meta.get("step")
    effective = meta.get("effective_batch")
    data = rc.get("data") or {}
    summary: dict[str, Any] = {
        "source": {"kind": source.kind, "path": str(source.path), "weights": str(source.weights)},
        "step": step,
        "world_size": meta.get("world_size"),
        "zero_stage": meta.get("zero_stage", engine.get("zero_stage")),
        "precision": meta.get("precision", engine.get("precision")),
        "effective_batch": effective,
        "samples_seen": step * effective if step is not None and effective else None,
        "final_metrics": _metrics_tail(source.run_dir),
        "data": {"source": data.get("source"), "shards": (data.get("loader") or {}).get("shards")},
        "config": rc,
    }
    if index is not None:
        summary["data"].update({
            "index": index_url,
            "samples": index.get("samples"),
            "shards": len(index.get("shards") or []),
            "sensors": index.get("sensors"),
            "dates": [index["dates"][0], index["dates"][-1]] if index.get("dates") else [],
            "tile_size": index.get("tile_size"),
        })
    return summary


def hub_config(
    source: WeightsSource,
    net: nn.Module,
    index: Mapping[str, Any] | None,
    index_url: str = "",
    task: Mapping[str, Any] | None = None,
    evaluation: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``config.json`` of an export (plain JSON data; :func:`build_net` rebuilds the model from it)."""
    bands, sensors = band_table(index or {})
    tile = (index or {}).get("tile_size")
    crop = ((source.run_config.get("data") or {}).get("loader") or {}).get("crop_size")
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "gfm_version": __version__,
        "model": to_dict(model_config(source.model_config)),
        "architecture": describe_architecture(net),
        "task": dict(task) if task else None,
        "bands": bands,
        "sensors": sensors,
        "normalization": {
            "formula": "x = (raw - mean) / std per observation, statistics keyed '<sensor>/<band>' in 'bands'",
            "raw": "the stored pixel values (digital numbers), before the sensor's scale/offset",
            "invalid": "nodata, NaN and masked pixels are set to 0 and marked False in 'valid'",
            "std_zero": "a std <= 0 is replaced by 1",
            "source": index_url or None,
        },
        "inputs": inputs_section(net, crop or tile),
        "training": training_summary(source, index, index_url),
        "evaluation": dict(evaluation) if evaluation else None,
    }


# ------------------------------------------------------------------------------------------------
# The loadable model


class GFMModel(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="gfm",
    paper_url=PAPER_URL,
    tags=["gfm", "earth-observation", "remote-sensing", "geospatial", "multispectral", "hyperspectral"],
):
    """An exported gfm model: the training-time module (``net``) plus its ``config.json``.

    ``GFMModel.from_pretrained(DIR_OR_REPO)`` (or :func:`from_pretrained`) rebuilds ``net`` from the
    config and loads ``model.safetensors`` with strict keys. Calling the model calls ``net``.

    Args:
        config: the exported ``config.json`` as a dict.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        if config.get("format") != FORMAT:
            raise HubError(f"config.json: 'format' is {config.get('format')!r}, expected {FORMAT!r} (not a gfm export)")
        self.config = config
        self.net = build_net(config)

    @property
    def encoder(self) -> nn.Module:
        """The encoder (``net.encoder`` for a pretraining model, else ``net``)."""
        enc: nn.Module = getattr(self.net, "encoder", self.net)
        return enc

    @property
    def embed_dim(self) -> int:
        """Token width ``D`` of the encoder."""
        return _int_attr(self.encoder, "embed_dim")

    @property
    def patch_size(self) -> int:
        """Patch side ``p`` in pixels."""
        return _int_attr(self.encoder, "patch_size")

    @property
    def stats(self) -> dict[str, dict[str, float]]:
        """``"sensor/band"`` → ``{"mean", "std"}`` used in pretraining."""
        return stats_of(self.config)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """``net(*args, **kwargs)``: the training-time module's own forward."""
        return self.net(*args, **kwargs)

    def prepare(self, pixels: Any, bands: Sequence[Any], **kwargs: Any) -> Batch:
        """:func:`prepare` with this model's statistics and band table."""
        return prepare(pixels, bands, self.config, **kwargs)

    def features(self, inputs: Batch | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Encoder token grid ``[B, C+1, N+1, D]`` (``[:, 0, 0]`` CLS, ``[:, 0, 1:]`` one token per position)."""
        out: torch.Tensor = self.encoder.forward_features(inputs)  # type: ignore[operator]
        return out

    def embed(self, inputs: Batch | Mapping[str, torch.Tensor], pooling: Pooling = "mean") -> torch.Tensor:
        """One ``[B, D]`` vector per tile: see :func:`pool`."""
        return pool(self.features(inputs), inputs, pooling, self.patch_size)

    # -- mixin hooks ------------------------------------------------------------------------------

    def _save_pretrained(self, save_directory: Path) -> None:
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        save_file(state, str(save_directory / WEIGHTS_NAME), metadata={"format": "pt", "gfm_format": FORMAT})
        (save_directory / CONFIG_NAME).write_text(json.dumps(self.config, indent=2, default=str) + "\n")

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        """The model card (``README.md``) written from ``config.json``."""
        return ModelCard(model_card(self.config))

    @classmethod
    def _from_pretrained(  # type: ignore[override]
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str = "cpu",
        strict: bool = True,
        **model_kwargs: Any,
    ) -> GFMModel:
        if not strict:
            raise HubError("gfm loads exported models with strict keys only (strict=False was asked)")
        if os.path.isdir(model_id):
            weights = Path(model_id) / WEIGHTS_NAME
        else:  # a Hub repository id
            from huggingface_hub import hf_hub_download

            weights = Path(hf_hub_download(
                repo_id=model_id, filename=WEIGHTS_NAME, revision=revision, cache_dir=cache_dir,
                force_download=force_download, token=token, local_files_only=local_files_only,
            ))
        if "config" not in model_kwargs or not model_kwargs["config"]:
            raise HubError(f"{model_id}: no {CONFIG_NAME}; not an exported gfm model")
        model = cls(config=model_kwargs["config"])
        load_strict(model.net, weights)
        model.to(map_location)
        model.eval()
        return model


def _int_attr(module: nn.Module, name: str) -> int:
    value = getattr(module, name, None)
    if not isinstance(value, int):
        raise HubError(f"{type(module).__name__} has no integer attribute {name!r}")
    return value


def load_strict(net: nn.Module, weights: str | Path) -> None:
    """Load ``weights`` (safetensors) into ``net``; any missing, unexpected or mis-shaped key is an error."""
    from safetensors.torch import load_file

    path = Path(weights)
    if not path.is_file():
        raise HubError(f"{path}: no weights file")
    state = load_file(str(path))
    check_keys(net, state, str(path))
    net.load_state_dict(state, strict=True)


def check_keys(net: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    """Raise :class:`HubError` listing missing/unexpected keys and shape mismatches of ``state`` for ``net``."""
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))

    def show(keys: list[str]) -> str:
        return ", ".join(keys[:8]) + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")

    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {show(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {show(unexpected)}")
    if shapes:
        problems.append("shape mismatch: " + ", ".join(
            f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in shapes[:4]))
    if problems:
        raise HubError(f"{where}: the weights do not match the model its config describes: {'; '.join(problems)}")


def from_pretrained(path: str | Path, *, map_location: str = "cpu", adapter: str | Path | None = None) -> GFMModel:
    """Load an exported model (a directory or a Hub repository id) with strict keys, in eval mode.

    Args:
        path: the export directory (or ``user/repo`` on the Hub).
        map_location: device for the weights.
        adapter: a peft adapter directory to apply on top (the export's own ``adapter/`` is not applied
            unless named here).
    """
    model = GFMModel.from_pretrained(str(path), map_location=map_location)
    if adapter is not None:
        raise HubError("adapters: not available in this build")
    return model


# ------------------------------------------------------------------------------------------------
# Inputs from raw values


def _band_key(band: Any) -> tuple[str, dict[str, Any]]:
    """``("sensor/name", description)`` of a band given as a key string, a mapping or a ``gfm.sensors.Band``."""
    if isinstance(band, str):
        if "/" not in band:
            raise HubError(f"band {band!r}: name bands as '<sensor>/<band>' (e.g. 'sentinel2_l2a/B04')")
        sensor, _, name = band.partition("/")
        return band, {"sensor": sensor, "name": name}
    if isinstance(band, Mapping):
        d = dict(band)
    elif hasattr(band, "to_dict"):
        d = dict(band.to_dict())
    else:
        raise HubError(f"band {band!r}: expected '<sensor>/<band>', a mapping or a gfm.sensors.Band")
    if "sensor" not in d or "name" not in d:
        raise HubError(f"band {d!r}: a band description needs 'sensor' and 'name'")
    return f"{d['sensor']}/{d['name']}", d


def _days(date: Any) -> float:
    if date is None or (isinstance(date, float) and math.isnan(date)):
        return math.nan
    return float((np.datetime64(str(date)[:10], "D") - np.datetime64("1970-01-01", "D")).astype(np.int64))


@dataclass
class InputBands:
    """A band set matched to the model's statistics: turns raw arrays into :class:`Batch` objects.

    Attributes:
        keep: indices of the observations used (bands without statistics dropped with ``unknown="drop"``).
        table: per kept observation, its description (name, sensor, center_nm, fwhm_nm, kind, time) with
            its ``mean`` and ``std``.
        dropped: ``"sensor/band"`` keys left out.
    """

    keep: list[int]
    table: list[dict[str, Any]]
    dropped: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        std = np.array([t["std"] for t in self.table], dtype=np.float32)
        self.mean = np.array([t["mean"] for t in self.table], dtype=np.float32)
        self.std = np.where(std > 0, std, np.float32(1.0)).astype(np.float32)
        self.wavelength = torch.tensor([t["center_nm"] for t in self.table], dtype=torch.float32)
        self.bandwidth = torch.tensor([t["fwhm_nm"] or 10.0 for t in self.table], dtype=torch.float32)
        self.kind = torch.tensor([KIND_CODE[t["kind"] or "reflectance"] for t in self.table], dtype=torch.int64)
        self.time = torch.tensor([_days(t["time"]) for t in self.table], dtype=torch.float32)
        from gfm import batch as batch_module

        code = getattr(batch_module, "sensor_code", None)
        self.sensor = torch.tensor([code(t["sensor"]) for t in self.table]) if code is not None else None

    @property
    def keys(self) -> list[str]:
        """``"sensor/band"`` of each kept observation."""
        return [f"{t['sensor']}/{t['name']}" for t in self.table]

    def batch(
        self,
        pixels: np.ndarray,
        valid: np.ndarray,
        *,
        gsd: float | None = None,
        lonlat: np.ndarray | None = None,
        keys: Sequence[str] = (),
    ) -> Batch:
        """``pixels [B, C, H, W]`` raw values of *all* observations + ``valid`` (same shape) → a Batch.

        Normalises as the training loader does, ``(raw - mean) / std`` in float32 with invalid pixels set
        to 0; ``lonlat`` is ``[B, 2]`` (NaN rows: unknown).
        """
        px, mask = pixels[:, self.keep], valid[:, self.keep]
        x = px.astype(np.float32)
        x -= self.mean[None, :, None, None]
        x *= (1.0 / self.std)[None, :, None, None]
        x[~mask] = 0.0
        b, c = x.shape[:2]
        tensors: dict[str, Any] = {
            "pixels": torch.from_numpy(x),
            "wavelength": self.wavelength.expand(b, c).clone(),
            "bandwidth": self.bandwidth.expand(b, c).clone(),
            "kind": self.kind.expand(b, c).clone(),
            "time": self.time.expand(b, c).clone(),
            "valid": torch.from_numpy(np.ascontiguousarray(mask)),
            "gsd": torch.full((b,), math.nan if gsd is None else float(gsd), dtype=torch.float32),
            "keys": list(keys),
        }
        optional = {f.name for f in fields(Batch)}
        if "lonlat" in optional and lonlat is not None:
            tensors["lonlat"] = torch.as_tensor(np.asarray(lonlat, dtype=np.float32).reshape(b, 2))
        if "sensor" in optional and self.sensor is not None:
            tensors["sensor"] = self.sensor.expand(b, c).clone()
        return Batch(**tensors)


def input_bands(
    bands: Sequence[Any],
    config: Mapping[str, Any],
    stats: Mapping[str, Mapping[str, Any]] | None = None,
    unknown: Literal["error", "drop"] = "error",
    where: str = "",
) -> InputBands:
    """Match band descriptions to the model's statistics (explicit ``stats`` win over the model's own).

    Args:
        bands: one per observation: ``"sensor/band"``, a mapping (``name``, ``sensor`` and optionally
            ``center_nm``, ``fwhm_nm``, ``kind``, ``time``) or a ``gfm.sensors.Band``.
        config: the exported ``config.json``.
        stats: extra or overriding ``"sensor/band"`` → ``{"mean", "std"}``.
        unknown: ``"error"`` refuses bands without statistics, ``"drop"`` leaves them out.
        where: prefix of error messages (the scene or file).

    Raises:
        UnknownBandsError: a band has no statistics and ``unknown`` is ``"error"`` (or no band is left).
    """
    table = dict(config.get("bands") or {})
    known = stats_of(config)
    known.update({k: {"mean": float(v["mean"]), "std": float(v["std"])} for k, v in (stats or {}).items()})
    keep: list[int] = []
    out: list[dict[str, Any]] = []
    missing: list[str] = []
    for i, band in enumerate(bands):
        key, desc = _band_key(band)
        if key not in known:
            missing.append(key)
            continue
        ref = table.get(key, {})
        full = {k: desc.get(k, ref.get(k)) for k in ("name", "sensor", "center_nm", "fwhm_nm", "kind")}
        if full["center_nm"] is None:
            try:
                b = get_sensor(full["sensor"]).band(full["name"])
                full.update(center_nm=b.center_nm, fwhm_nm=b.fwhm_nm, kind=b.kind)
            except (SensorError, KeyError):
                raise HubError(f"{where}band {key!r}: no wavelength given and none known for it") from None
        full["time"] = desc.get("time")
        full.update(known[key])
        keep.append(i)
        out.append(full)
    if missing and unknown == "error":
        raise UnknownBandsError(missing, sorted(known), where)
    if not out:
        raise UnknownBandsError(missing, sorted(known), f"{where}no band left: ")
    return InputBands(keep, out, missing)


def prepare(
    pixels: Any,
    bands: Sequence[Any],
    config: Mapping[str, Any],
    *,
    valid: Any = None,
    nodata: float | Sequence[float | None] | None = None,
    dates: Sequence[str | None] | None = None,
    gsd: float | None = None,
    lonlat: Sequence[float] | None = None,
    stats: Mapping[str, Mapping[str, Any]] | None = None,
    unknown: Literal["error", "drop"] = "error",
) -> Batch:
    """Raw sensor values + band descriptions → the model's input, normalised as in pretraining.

    Args:
        pixels: ``[C, H, W]`` or ``[B, C, H, W]`` raw values (numpy or torch; any dtype).
        bands: one per observation: ``"sensor/band"``, a mapping (``name``, ``sensor`` and optionally
            ``center_nm``, ``fwhm_nm``, ``kind``, ``time``) or a ``gfm.sensors.Band``.
        config: the exported ``config.json`` (its statistics and band table).
        valid: optional mask (same shape as ``pixels`` or ``[.., H, W]``), True = usable.
        nodata: raw value(s) that mean "no data" (one, or one per observation).
        dates: acquisition date per observation (``YYYY-MM-DD``), overriding the bands' ``time``.
        gsd: ground sampling distance in metres (unknown: NaN, the model's "unknown" path).
        lonlat: tile centre (longitude, latitude), when known.
        stats: extra or overriding statistics ``"sensor/band"`` → ``{"mean", "std"}``.
        unknown: ``"error"`` (default) refuses bands without statistics; ``"drop"`` leaves them out.

    Returns:
        A :class:`Batch`; invalid pixels are 0 and False in ``valid``.
    """
    px = pixels.detach().cpu().numpy() if isinstance(pixels, torch.Tensor) else np.asarray(pixels)
    squeeze = px.ndim == 3
    if squeeze:
        px = px[None]
    if px.ndim != 4:
        raise HubError(f"pixels: expected [C, H, W] or [B, C, H, W], got shape {px.shape}")
    b, c, h, w = px.shape
    if len(bands) != c:
        raise HubError(f"bands: {len(bands)} descriptions for {c} observations in pixels")
    if dates is not None:
        if len(dates) != c:
            raise HubError(f"dates: {len(dates)} dates for {c} observations")
        bands = [{**_band_key(band)[1], "time": d} for band, d in zip(bands, dates)]
    spec = input_bands(bands, config, stats, unknown)
    mask = np.ones(px.shape, dtype=bool)
    if valid is not None:
        v = (valid.detach().cpu().numpy() if isinstance(valid, torch.Tensor) else np.asarray(valid)).astype(bool)
        if squeeze:
            v = v[None]  # [1, C, H, W] or [1, H, W]
        if v.ndim == 3:
            v = v[:, None]  # one mask for every observation
        try:
            mask &= np.broadcast_to(v, px.shape)
        except ValueError:
            raise HubError(f"valid: shape {np.shape(valid)} does not fit pixels {px.shape}") from None
    if nodata is not None:
        nd = list(nodata) if isinstance(nodata, Sequence) else [nodata] * c
        if len(nd) != c:
            raise HubError(f"nodata: {len(nd)} values for {c} observations")
        for i, value in enumerate(nd):
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                mask[:, i] &= px[:, i] != value
    if px.dtype.kind == "f":
        mask &= np.isfinite(px)
    ll = None if lonlat is None else np.tile(np.asarray(lonlat, dtype=np.float32), (b, 1))
    return spec.batch(px, mask, gsd=gsd, lonlat=ll)


def pool(
    tokens: torch.Tensor, inputs: Batch | Mapping[str, torch.Tensor], pooling: Pooling, patch: int
) -> torch.Tensor:
    """``[B, C+1, N+1, D]`` tokens → ``[B, D]``.

    ``cls``: the global CLS token. ``mean``: the mean of the per-position summary tokens
    ``tokens[:, 0, 1:]`` over positions with at least one valid pixel (all positions when none is).
    """
    if pooling == "cls":
        return tokens[:, 0, 0]
    if pooling != "mean":
        raise HubError(f"pooling: expected 'mean' or 'cls', got {pooling!r}")
    per_pos = tokens[:, 0, 1:]  # [B, N, D]
    valid = inputs.valid if isinstance(inputs, Batch) else inputs.get("valid")
    if valid is None:
        return per_pos.mean(dim=1)
    weight = position_validity(valid, patch).to(per_pos.dtype)  # [B, N]
    weight = torch.where(weight.sum(1, keepdim=True) > 0, weight, torch.ones_like(weight))
    return (per_pos * weight[..., None]).sum(1) / weight.sum(1, keepdim=True)


def position_validity(valid: torch.Tensor, patch: int) -> torch.Tensor:
    """``[B, C, H, W]`` pixel validity → ``[B, N]``: True where a patch holds any valid pixel (padding invalid)."""
    any_obs = valid.any(dim=1).float()  # [B, H, W]
    h, w = any_obs.shape[-2:]
    ph, pw = -h % patch, -w % patch
    any_obs = torch.nn.functional.pad(any_obs, (0, pw, 0, ph))
    pooled = torch.nn.functional.max_pool2d(any_obs[:, None], patch)[:, 0]  # [B, h/p, w/p]
    return pooled.flatten(1) > 0


# ------------------------------------------------------------------------------------------------
# Model card


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def model_card(config: Mapping[str, Any], license: str = "other") -> str:
    """The generated ``README.md`` of an export: what, data, bands, load and normalise, results, limits."""
    arch = config.get("architecture") or {}
    train = config.get("training") or {}
    data = train.get("data") or {}
    task = config.get("task")
    bands = config.get("bands") or {}
    sensors = sorted(config.get("sensors") or {})
    name = (config.get("model") or {}).get("name", "gfm model")
    params = arch.get("parameters")
    card_data = ModelCardData(
        library_name="gfm",
        license=config.get("license", license),
        tags=["gfm", "earth-observation", "remote-sensing", "geospatial", "masked-autoencoder", *sensors],
        pipeline_tag="image-segmentation" if task else "image-feature-extraction",
    )
    lines = [
        "---", card_data.to_yaml(), "---", "",
        f"# {name}", "",
        f"A {'fine-tuned ' if task else ''}{arch.get('class', 'gfm')} geospatial model "
        f"({params / 1e6:.1f} M parameters) exported by gfm {config.get('gfm_version')}. "
        "The encoder is a LESS ViT: any number of bands from any sensor, each embedded from its "
        "physical description (wavelength, bandwidth, kind, date), on a token grid of observations × positions."
        if params else f"A gfm model exported by gfm {config.get('gfm_version')}.",
        "",
        "## Training", "",
        f"- weights: {train.get('source', {}).get('kind')} at step {_fmt(train.get('step'))}"
        f" ({_fmt(train.get('samples_seen'))} samples seen, effective batch {_fmt(train.get('effective_batch'))})",
        f"- engine: {_fmt(train.get('world_size'))} rank(s), ZeRO {_fmt(train.get('zero_stage'))}, "
        f"{_fmt(train.get('precision'))}",
        f"- data: {_fmt(data.get('source'))}; {_fmt(data.get('samples'))} tiles in {_fmt(data.get('shards'))} "
        f"shard(s), sensors {', '.join(data.get('sensors') or []) or '—'}, dates "
        f"{' .. '.join(data.get('dates') or []) or '—'}, tile {_fmt(data.get('tile_size'))} px",
    ]
    final = train.get("final_metrics") or {}
    if final:
        lines.append("- last logged: " + ", ".join(f"{k} {_fmt(v)}" for k, v in final.items()))
    lines += ["", "## Bands seen in pretraining", ""]
    if bands:
        lines += ["| band | sensor | centre nm | FWHM nm | kind | GSD m | mean | std |",
                  "|---|---|---|---|---|---|---|---|"]
        for b in list(bands.values())[:60]:
            st = b.get("stats") or {}
            lines.append(f"| {b.get('name')} | {b.get('sensor')} | {_fmt(b.get('center_nm'))} | "
                         f"{_fmt(b.get('fwhm_nm'))} | {b.get('kind')} | {_fmt(b.get('gsd_m'))} | "
                         f"{_fmt(st.get('mean'))} | {_fmt(st.get('std'))} |")
        if len(bands) > 60:
            lines.append(f"\n{len(bands) - 60} more bands: see `bands` in config.json.")
    else:
        lines.append("No band statistics were recorded (the run did not read shards with an index.json); "
                     "`prepare` needs `stats=` for every band.")
    lines += [
        "", "## Load and normalise", "",
        "```python",
        "import gfm",
        f"model = gfm.from_pretrained(\"{config.get('_repo', 'PATH_OR_REPO')}\")  # strict keys, eval mode",
        "batch = model.prepare(raw, bands=[\"sensor/B04\", ...], gsd=10.0, dates=[\"2021-06-01\", ...])",
        "emb = model.embed(batch)            # [B, D], valid-weighted mean of per-position tokens",
        "tokens = model.features(batch)      # [B, C+1, N+1, D]",
        "```", "",
        "`prepare` normalises raw values as in pretraining: `(raw - mean) / std` per band with the statistics "
        "above (the stored digital numbers, before the sensor's scale/offset); nodata, NaN and masked pixels "
        "become invalid. A band without statistics is refused with its name; pass `stats=` (or "
        "`gfm predict/embed --stats index.json`) or drop it. Unknown metadata: date NaN, GSD NaN, "
        "location omitted; the model has an 'unknown' path for each (see `inputs` in config.json).",
        "", "Command line: `gfm embed SHARDS_OR_SCENE --model DIR --out tiles.parquet` (GeoParquet), "
        "`gfm predict SCENE.tif --model DIR --out pred.tif` (Cloud-Optimized GeoTIFF, with a task head).",
    ]
    if task:
        lines += ["", "## Task", "", f"{task.get('type')}: {len(task.get('classes') or [])} classes "
                  f"({', '.join(str(c) for c in (task.get('classes') or [])[:20])})."]
    evaluation = config.get("evaluation")
    lines += ["", "## Evaluation", ""]
    if evaluation:
        lines += ["| metric | value |", "|---|---|"]
        for k, v in evaluation.items():
            if isinstance(v, (int, float, str)) or v is None:
                lines.append(f"| {k} | {_fmt(v)} |")
    else:
        lines.append("No evaluation results came with this run (pretraining only).")
    lines += [
        "", "## Intended use and limits", "",
        "Feature extraction, embeddings and fine-tuning on multispectral, hyperspectral, SAR and "
        "multi-temporal rasters. Limits: the model only knows the sensors, places and seasons of its training "
        "data (above); band statistics outside those seen make inputs out of distribution; a pretraining-only "
        "export has no task head and predicts no classes; outputs are not validated for operational or "
        "safety-critical decisions.",
        "", "## Licence", "",
        f"`{card_data.license}` for these weights as set at export; the training data's own licences apply.",
        "", "## Citation", "",
        "```bibtex",
        "@article{si2025less,",
        "  title   = {Towards Scalable Foundation Model for Multi-modal and Hyperspectral Geospatial Data},",
        "  author  = {Si, Haozhe and Wan, Yuxuan and Do, Minh and Vasisht, Deepak and Zhao, Han and "
        "Hamann, Hendrik F.},",
        "  journal = {arXiv preprint arXiv:2503.12843},",
        "  year    = {2025}",
        "}",
        "```", "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Export


@dataclass
class ExportReport:
    """What :func:`export` wrote."""

    out_dir: Path
    source: WeightsSource
    tensors: int
    parameters: int
    bands: int
    stats_note: str = ""
    adapter: str | None = None
    pushed: str | None = None


def export(
    source: str | Path,
    out_dir: str | Path,
    *,
    index: str | Path | None = None,
    license: str = "other",
    overwrite: bool = False,
    push: str | None = None,
) -> ExportReport:
    """Write an exported model directory from a run, checkpoint, safetensors file or export.

    The directory is assembled under a temporary name beside ``out_dir`` and renamed into place at the
    end, so an interrupted export never leaves a directory that looks complete.

    Args:
        source: see :func:`resolve_source`.
        out_dir: the directory to create.
        index: an ``index.json`` with the band statistics, when the run's own cannot be found.
        license: the licence identifier written into the model card metadata.
        overwrite: replace an existing ``out_dir``.
        push: a Hub repository id to upload the directory to (needs a token; never run in tests).
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise OutputExistsError(out)
    src = resolve_source(source)
    net = build_net({"model": src.model_config})
    state = load_state_dict(src)
    check_keys(net, state, str(src.weights))
    net.load_state_dict(state, strict=True)
    note = ""
    if index is not None:
        index_doc: dict[str, Any] | None = read_index(index)
        index_url = str(index)
    elif src.kind == "export":
        index_doc, index_url = None, ""
    else:
        index_doc, index_url = _index_for_run(src.run_config)
        if index_doc is None:
            note, index_url = index_url, ""
    if src.kind == "export":
        config = dict(src.exported)
    else:
        config = hub_config(src, net, index_doc, index_url)
    if index_doc is not None and src.kind == "export":
        config["bands"], config["sensors"] = band_table(index_doc)
    config["license"] = license
    model = GFMModel.__new__(GFMModel)
    nn.Module.__init__(model)
    model.config, model.net = config, net
    model._hub_mixin_config = config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report = ExportReport(out, src, len(state), sum(v.numel() for v in state.values()), len(config["bands"]), note)
    if push:
        report.pushed = push_to_hub(out, push)
    return report


def push_to_hub(folder: str | Path, repo_id: str, private: bool | None = None) -> str:
    """Upload an exported directory to the Hugging Face Hub (creates the repository); returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    repo = api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model").repo_id
    commit = api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model",
                               commit_message=f"gfm {__version__} export")
    return str(commit)
