"""Where weights come from: run directories, DeepSpeed checkpoints of any ZeRO stage, safetensors files, exports."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from gfm.hub.base import COMPLETE, CONFIG_NAME, FORMAT, WEIGHTS_NAME, HubError, upcast
from gfm.model.embed import with_kind_room

_STEP_DIR = re.compile(r"^step_(\d{8})$")


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
        name: the shipped model's short name (``gfm.pretrained``) or the Hub id ``org/name[@revision]`` when
            the user named one; ``path`` is then its folder (the snapshot in the Hugging Face cache).
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
    name: str | None = None

    def describe(self) -> str:
        """What the user named, for messages: ``name = folder`` for a shipped model, else the path."""
        return f"{self.name} = {self.path}" if self.name else str(self.path)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise HubError(f"{path}: cannot read the run config ({e})") from None
    if not isinstance(data, dict):
        raise HubError(f"{path}: the run config is not a mapping")
    return data


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object file (an export's ``config.json``, a checkpoint's ``trainer.json``) as a dict.

    Raises:
        HubError: the file cannot be read, is not JSON, or holds a JSON value that is not an object.
    """
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HubError(f"{path}: not readable as JSON ({e})") from None
    if not isinstance(doc, dict):
        raise HubError(f"{path}: expected a JSON object, found a JSON {type(doc).__name__}")
    return doc


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


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file as stored; a truncated or corrupt file is a one-line :class:`HubError`.

    A kind table saved before it had room for more kinds is padded (:func:`~gfm.model.embed.with_kind_room`).
    """
    from safetensors.torch import load_file

    try:
        return with_kind_room(load_file(str(path)))
    except Exception as e:  # SafetensorError (bad header, truncated data) or OSError
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise HubError(f"{path}: not a readable safetensors file ({first}); truncated or not written by "
                       "safetensors") from None


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
        meta = read_json_object(path / "trainer.json")
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
    ``.safetensors`` file whose metadata (or a ``config.yaml`` beside it) holds the run config, an
    exported directory (``config.json`` with ``"format": "gfm"``), the short name of a model shipped
    with gfm, or a Hub id ``org/name[@revision]`` (its snapshot). :func:`gfm.pretrained.resolve` decides
    which: an existing path wins over a short name, and a missing path-like string is an error naming it,
    never looked up as a name.

    Raises:
        HubError: nothing usable at ``path``, or an incomplete checkpoint (``gfm.pretrained.PretrainedError``,
            a ``HubError``, for a missing path or an unknown short name).
    """
    from gfm.pretrained import resolve  # gfm.pretrained imports gfm.hub.base: imported here, not at the top

    ref = resolve(path)
    src = _resolve_path(ref.path)
    src.name = ref.name or ref.hub
    return src


def _resolve_path(given: Path) -> WeightsSource:
    p = given
    if p.is_file():
        if p.suffix != ".safetensors":
            raise HubError(f"{p}: expected a run directory, a checkpoint directory or a .safetensors file")
        return _safetensors_source(p, given)
    if (p / CONFIG_NAME).is_file() and (p / WEIGHTS_NAME).is_file():
        exported = read_json_object(p / CONFIG_NAME)
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
            last = complete[-1][1] / "trainer.json" if complete else None
            if last is not None and last.is_file() and complete[-1][0] == src.step:
                src.meta = read_json_object(last)  # world size, ZeRO stage, effective batch of that run
            return src
    if complete:
        src = _checkpoint_source(complete[-1][1], given)
        src.kind, src.run_dir = "run", p
        return src
    if (p / "checkpoints").is_dir():
        raise HubError(f"{p}: the run has no complete checkpoint (no COMPLETE marker under checkpoints/) and no "
                       f"{WEIGHTS_NAME}")
    raise HubError(f"{p}: not a run directory (no {WEIGHTS_NAME}, no checkpoints/), checkpoint or exported model")


def load_checkpoint_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Consolidated fp32 weights of a DeepSpeed checkpoint directory written at any ZeRO stage.

    Nothing in the checkpoint is unpickled as code: every file is read with ``torch.load(weights_only=True)``
    (tensors and plain data only), so a checkpoint from outside cannot run a payload; a file naming any
    other global is refused with one line naming the file. ZeRO 1-3 (and bf16, whose fp32 master weights
    live in the optimizer partitions) are consolidated by :func:`gfm.hub.zero.consolidate`, which gives
    DeepSpeed's own ``zero_to_fp32`` result bit for bit. ZeRO 0 without optimizer partitions keeps the
    whole model in ``mp_rank_00_model_states.pt``. The files say how they were partitioned: the
    checkpoint's ``trainer.json`` is not needed.
    """
    from gfm.hub.zero import ZERO12_MODEL_STATES, consolidate, load_weights_only

    if any(path.glob("*_optim_states.pt")):
        return with_kind_room(upcast(consolidate(path)))
    file = path / ZERO12_MODEL_STATES
    if not file.is_file():
        raise HubError(f"{path}: no {ZERO12_MODEL_STATES} and no *_optim_states.pt (is this a DeepSpeed checkpoint?)")
    module = load_weights_only(file).get("module")
    if not isinstance(module, dict) or not all(isinstance(v, torch.Tensor) for v in module.values()):
        raise HubError(f"{file}: no 'module' weights inside")
    if any(v.dtype != torch.float32 for v in module.values() if v.is_floating_point()):
        raise HubError(f"{path}: a ZeRO 0 checkpoint without fp32 master weights holds only "
                       f"{next(v.dtype for v in module.values() if v.is_floating_point())} weights; export "
                       "the run's model.safetensors instead")
    return with_kind_room(upcast(module))


def load_state_dict(source: WeightsSource) -> dict[str, torch.Tensor]:
    """The fp32 weights of a resolved source (an export stored in bf16 is upcast)."""
    if source.weights.is_dir():
        return load_checkpoint_state_dict(source.weights)
    return upcast(read_safetensors(source.weights))
