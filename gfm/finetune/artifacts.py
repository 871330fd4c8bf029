"""What a fine-tuning run leaves behind, and how to load it again with identical predictions.

``<run_dir>/finetune.json`` describes the run's model (task, classes, head, method, the encoder's
architecture, where its base weights came from and their fingerprint). Beside it, by method:

=================  ==============================================================================
method             files
=================  ==============================================================================
lora               ``adapter/adapter_config.json`` + ``adapter/adapter_model.safetensors`` (peft's
                   format; the head is in it as peft's ``modules_to_save``); with ``merge``,
                   ``merged/model.safetensors``: the adapters folded into the encoder, plus the head
linear_probe       ``head.safetensors``
full, scratch      ``model.safetensors`` (encoder + head)
random_forest,     nothing: classic baselines are for comparison only. Their fitted scikit-learn
svm, knn           model would be a pickle (executable code), which gfm never writes or reads;
                   ``finetune.json`` records the settings and says so, and loading refuses the run
=================  ==============================================================================

A LoRA adapter or a probe needs its base encoder: the weights it was trained on are read again from
``encoder.weights`` (or from ``base_encoder.safetensors``, written when the base was a random init; a base
shipped with gfm is found again by its short name when its folder moved), and their fingerprint must match
the one recorded, else loading stops naming both.

Tensors are saved in fp32 from DeepSpeed's fp32 master copy (``TrainModule.named_fp32_parameters``,
which every rank calls), so bf16 training and ZeRO partitioning do not leak into the files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gfm.fileio import atomic_write
from gfm.finetune.methods import HEAD_NAME, LoraConfig, Method, MethodConfig, apply_method, get_method
from gfm.finetune.model import HeadConfig, TaskModel
from gfm.finetune.weights import (
    EncoderLoadError,
    build_arch,
    encoder_state,
    fingerprint,
    read_weights,
)
from gfm.model.embed import with_kind_room

MANIFEST = "finetune.json"
MANIFEST_FORMAT = 1


class AdapterError(ValueError):
    """Saved fine-tuning outputs that cannot be loaded as asked; the message names files and fingerprints."""


def _config_of(obj: Any) -> dict[str, Any]:
    from gfm.config import to_dict

    out: dict[str, Any] = to_dict(obj)
    return out


def _task_part(task: str, class_names: list[str], label_values: list[int], window: int,
               num_bands: int, num_rows: int = 0) -> dict[str, Any]:
    """What every ``finetune.json`` starts with: its format and the task.

    ``num_bands``: the task's bands; ``num_rows``: the token rows the encoder makes of them.
    """
    return {"format": MANIFEST_FORMAT, "task": task, "class_names": class_names, "label_values": label_values,
            "num_classes": len(class_names), "window": window, "num_bands": num_bands, "num_rows": num_rows}


def manifest(*, task: str, class_names: list[str], label_values: list[int], window: int, num_bands: int,
             num_rows: int, head: HeadConfig, method: MethodConfig, arch: dict[str, Any], source: str, fp: str,
             description: str, counts: dict[str, int], pretrained: str = "",
             bands: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``finetune.json`` document.

    ``pretrained``: the shipped model's short name ``source`` came from. ``bands``: the band table the
    task's data was normalised with (``"sensor/band"`` → description and ``stats``,
    :func:`gfm.finetune.data.normalization_table`); exports of the run carry it into ``config.json``.
    """
    return {
        **_task_part(task, class_names, label_values, window, num_bands, num_rows),
        "head": _config_of(head),
        "method": method.name,
        "lora": get_method(method.name).settings(method),
        "encoder": {"arch": arch, "source": source, "fingerprint": fp, "description": description,
                    **({"pretrained": pretrained} if pretrained else {})},
        "base_file": None,
        "parameters": counts,
        "bands": dict(bands or {}),
    }


#: why a classic baseline's run has no model file (``finetune.json`` and the loading refusal say it)
CLASSIC_NOTE = ("classic baselines are for comparison only: the fitted scikit-learn model is not saved (it would "
                "be a pickle, which is executable code; gfm never writes or reads pickles)")


def classic_manifest(*, task: str, class_names: list[str], label_values: list[int], window: int,
                     num_bands: int, method: MethodConfig, estimator: str, fitted: dict[str, Any]) -> dict[str, Any]:
    """The ``finetune.json`` document of a classic baseline's run (no model file, no encoder).

    Args:
        task: the task.
        class_names: class names in class order.
        label_values: the label value of each class.
        window: the pixel task's window (0 for tile tasks).
        num_bands: the task's input bands.
        method: the method config (its registered settings are recorded).
        estimator: the fitted scikit-learn estimator as scikit-learn prints it.
        fitted: training samples, features per sample and what the fitted model holds.
    """
    return {
        **_task_part(task, class_names, label_values, window, num_bands),
        "method": method.name,
        "classic": get_method(method.name).settings(method),
        "estimator": estimator,
        "fitted": fitted,
        "model_saved": False,
        "note": CLASSIC_NOTE,
        "encoder": None,
        "files": {},
    }


def _registered(doc: dict[str, Any], where: Path) -> Method:
    try:
        return get_method(str(doc.get("method")))
    except ValueError as e:
        raise AdapterError(f"{where}: {e}") from None


def model_manifest(run_dir: str | Path) -> dict[str, Any]:
    """``finetune.json`` of a run that left a model; a classic baseline's run is refused in one line."""
    doc = read_manifest(run_dir)
    method = _registered(doc, Path(run_dir))
    if method.classic:
        raise AdapterError(f"{run_dir}: a {method.name} run has no model to load; {CLASSIC_NOTE}")
    return doc


def _head_config(doc: dict[str, Any]) -> HeadConfig:
    from gfm.config import from_dict

    return from_dict(HeadConfig, doc["head"], prefix="head")


def task_model(doc: dict[str, Any], encoder: nn.Module) -> TaskModel:
    """The task model ``doc`` describes around ``encoder`` (weights of the head still random)."""
    return TaskModel(encoder, doc["task"], int(doc["num_classes"]), _head_config(doc), int(doc["window"]),
                     int(doc.get("num_bands") or 0), int(doc.get("num_rows") or 0))


def _method(doc: dict[str, Any]) -> MethodConfig:
    from gfm.config import from_dict

    lora = from_dict(LoraConfig, doc["lora"], prefix="lora") if doc.get("lora") else LoraConfig()
    return MethodConfig(name=doc["method"], lora=lora)


def save_outputs(run_dir: Path, doc: dict[str, Any], trained: dict[str, torch.Tensor],
                 base_state: dict[str, torch.Tensor],                 merge: bool = False) -> dict[str, str]:
    """Write the run's model files (rank 0); returns ``{what: path}``.

    Args:
        run_dir: the run directory.
        doc: the manifest (:func:`manifest`); written as ``finetune.json``.
        trained: fp32 tensors of every trainable parameter, named as in the trained model.
        base_state: the encoder's state before training (the base of an adapter or a probe).
        merge: also fold LoRA adapters into the encoder (``merged/model.safetensors``).
    """
    from safetensors.torch import save_file

    method = get_method(doc["method"])
    files: dict[str, str] = {}
    if method.frozen_base and not doc["encoder"]["source"]:
        base = run_dir / "base_encoder.safetensors"  # a random base cannot be read again: keep it
        save_file({k: v.contiguous() for k, v in base_state.items()}, str(base))
        doc["base_file"] = base.name
        files["base"] = str(base)
    encoder = build_arch(doc["encoder"]["arch"])
    encoder.load_state_dict(base_state, strict=True)
    model: Any = apply_method(task_model(doc, encoder), _method(doc))
    params = dict(model.named_parameters())
    missing = sorted(set(trained) - set(params))
    if missing:
        raise AdapterError(f"cannot save: trained tensors {missing[:4]} have no place in a fresh {method.name} model")
    with torch.no_grad():
        for name, t in trained.items():
            params[name].copy_(t)
    if method.saves == "adapter":
        model.peft_config["default"].base_model_name_or_path = doc["encoder"]["source"] or "random-init"
        # save_embedding_layers=False: peft would otherwise look the base model up on the Hub
        model.save_pretrained(str(run_dir / "adapter"), save_embedding_layers=False)
        files["adapter"] = str(run_dir / "adapter")
        if merge:
            merged = model.merge_and_unload()
            (run_dir / "merged").mkdir(exist_ok=True)
            path = run_dir / "merged" / "model.safetensors"
            save_file({k: v.contiguous() for k, v in merged.state_dict().items()}, str(path), metadata={"format": "pt"})
            files["merged"] = str(path)
    elif method.saves == "head":
        head = {k: v for k, v in model.state_dict().items() if k.startswith(f"{HEAD_NAME}.")}
        save_file({k: v.contiguous() for k, v in head.items()}, str(run_dir / "head.safetensors"))
        files["head"] = str(run_dir / "head.safetensors")
    else:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(run_dir / "model.safetensors"),
                  metadata={"format": "pt"})
        files["model"] = str(run_dir / "model.safetensors")
    doc["files"] = {k: str(Path(v).relative_to(run_dir)) for k, v in files.items()}
    atomic_write(run_dir / MANIFEST, json.dumps(doc, indent=1) + "\n")
    return files


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    """``finetune.json`` of a run directory."""
    path = Path(run_dir) / MANIFEST
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"{path}: not a readable fine-tuning manifest ({e})") from None
    if doc.get("format") != MANIFEST_FORMAT:
        raise AdapterError(f"{path}: manifest format {doc.get('format')!r}, this gfm reads {MANIFEST_FORMAT}")
    return doc


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise AdapterError(f"{path} is missing")
    return with_kind_room(load_file(str(path)))


def _strict(module: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = module.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise AdapterError(f"{path}: keys do not match the model (missing: {missing[:5]}, "
                           f"unexpected: {unexpected[:5]})")
    module.load_state_dict(state, strict=True)


def load_finetuned(run_dir: str | Path, base_weights: str | None = None, merged: bool = False) -> nn.Module:
    """The fine-tuned model of ``run_dir`` (on the CPU, eval mode), predicting as it did when saved.

    Args:
        run_dir: a ``gfm finetune`` run directory (one seed).
        base_weights: the base encoder's weights for an adapter or a probe, instead of the recorded source.
        merged: load ``merged/model.safetensors`` (LoRA folded in) instead of base + adapter.

    Raises:
        AdapterError: missing files, keys that do not match, a base encoder whose fingerprint is not
            the one the adapter (or probe) was made for, or a classic baseline's run (it saves no model).
    """
    run_dir = Path(run_dir)
    doc = model_manifest(run_dir)
    encoder = build_arch(doc["encoder"]["arch"])
    method = _registered(doc, run_dir)
    if not method.frozen_base or merged:
        path = run_dir / ("merged/model.safetensors" if merged else "model.safetensors")
        model = task_model(doc, encoder)
        _strict(model, _load_safetensors(path), path)
        return model.eval()
    if base_weights is not None:
        where = base_weights
        state, _, _ = read_weights(base_weights)
        own, _ = encoder_state(state, encoder, base_weights)
    elif doc.get("base_file"):
        where = str(run_dir / doc["base_file"])
        own = _load_safetensors(run_dir / doc["base_file"])
    else:
        where = doc["encoder"]["source"]
        if not Path(where).exists() and doc["encoder"].get("pretrained"):
            where = doc["encoder"]["pretrained"]  # gfm was reinstalled elsewhere: its shipped model, by name
        try:
            state, _, _ = read_weights(where)
        except EncoderLoadError as e:
            raise AdapterError(f"{run_dir}: the base encoder {where} cannot be read ({e}); pass base_weights") from None
        own, _ = encoder_state(state, encoder, where)
    encoder.load_state_dict(own, strict=True)
    fp = fingerprint(encoder)
    if fp != doc["encoder"]["fingerprint"]:
        raise AdapterError(
            f"{run_dir}: this {method.name} was made for another base model: base {where} has fingerprint {fp}, the "
            f"{method.saves} was trained on {doc['encoder']['fingerprint']} "
            f"({doc['encoder']['source'] or 'a random init'})"
        )
    model = task_model(doc, encoder)
    if method.saves == "head":
        path = run_dir / "head.safetensors"
        head = {k[len(HEAD_NAME) + 1:]: v for k, v in _load_safetensors(path).items()}
        _strict(model.task_head, head, path)
        return model.eval()
    import peft

    adapter = run_dir / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise AdapterError(f"{adapter}: no adapter_config.json")
    return peft.PeftModel.from_pretrained(model, str(adapter)).eval()
