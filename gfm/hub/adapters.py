"""Fine-tuning outputs (``gfm finetune``) on an exported base: LoRA adapters (peft), probe heads, merging."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from gfm.hub.base import (
    ADAPTER_DIR,
    FINETUNE_MANIFEST,
    WEIGHTS_NAME,
    HubError,
    check_keys,
)


def finetune_dir(path: str | Path) -> Path:
    """The directory holding ``finetune.json``: a fine-tuning run, its ``adapter/``, or an export's ``adapter/``."""
    p = Path(path)
    for candidate in (p, p.parent):
        if (candidate / FINETUNE_MANIFEST).is_file():
            return candidate
    raise HubError(f"{p}: not a fine-tuning run or adapter directory (no {FINETUNE_MANIFEST})")


def read_finetune(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """``(directory, manifest)`` of a fine-tuning run or adapter directory that left a model.

    A classic baseline's run (``random_forest``, ``svm``, ``knn``) is refused in one line: it saves no model.
    """
    from gfm.finetune.artifacts import AdapterError, model_manifest

    where = finetune_dir(path)
    try:
        return where, model_manifest(where)
    except AdapterError as e:
        raise HubError(str(e)) from None


def _peft_dir(where: Path, doc: Mapping[str, Any]) -> Path:
    sub = where / (doc.get("files") or {}).get("adapter", ADAPTER_DIR)
    peft_dir = sub if (sub / "adapter_config.json").is_file() else where
    if not (peft_dir / "adapter_config.json").is_file():
        raise HubError(f"{where}: no adapter_config.json (peft adapter) in it or in {sub.name}/")
    return peft_dir


def task_model_from(encoder: nn.Module, adapter: str | Path, merge: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """The fine-tuned task model of ``adapter`` around ``encoder`` (which it may modify: pass a copy).

    LoRA adapters are applied with ``peft.PeftModel.from_pretrained`` (their task head travels in them as
    peft's ``modules_to_save``) and, with ``merge``, folded into the encoder (``merge_and_unload``); a
    linear probe's head is loaded strictly; a full or scratch fine-tune replaces every weight (``merge``
    only: there is no adapter to keep apart). The base encoder's fingerprint must be the one the adapter
    or probe was trained on.

    Returns:
        ``(task model in eval mode, the fine-tuning manifest)``.
    """
    from gfm.finetune.artifacts import task_model
    from gfm.finetune.methods import HEAD_NAME, get_method
    from gfm.finetune.weights import fingerprint
    from gfm.hub.sources import read_safetensors

    where, doc = read_finetune(adapter)
    method = get_method(doc["method"])
    files = doc.get("files") or {}
    if method.frozen_base:
        fp = fingerprint(encoder)
        if fp != doc["encoder"]["fingerprint"]:
            raise HubError(f"{where}: the {method.name} was trained on another base model (its fingerprint "
                           f"{doc['encoder']['fingerprint']}, this model's encoder {fp}, from "
                           f"{doc['encoder'].get('source') or 'a random init'})")
    model = task_model(doc, encoder)
    if method.saves == "adapter":
        import peft

        peft_dir = _peft_dir(where, doc)
        read_safetensors(peft_dir / "adapter_model.safetensors")  # a truncated file: one line, not peft's traceback
        wrapped = peft.PeftModel.from_pretrained(model, str(peft_dir))
        return (wrapped.merge_and_unload() if merge else wrapped).eval(), doc
    if method.saves == "head":
        path = where / files.get("head", "head.safetensors")
        if not path.is_file():
            raise HubError(f"{path}: the probe's head is missing")
        head = {k[len(HEAD_NAME) + 1:]: v for k, v in read_safetensors(path).items()}
        check_keys(model.task_head, head, str(path))
        model.task_head.load_state_dict(head, strict=True)
        return model.eval(), doc
    if not merge:
        raise HubError(f"{where}: a {method.name} fine-tune keeps no adapter (its model.safetensors is the whole "
                       "model); export it merged (merge=True)")
    path = where / files.get("model", WEIGHTS_NAME)
    state = read_safetensors(path)
    check_keys(model, state, str(path))
    model.load_state_dict(state, strict=True)
    return model.eval(), doc


def check_own_adapter(export_dir: str | Path, task: Mapping[str, Any] | None, adapter: str | Path,
                      doc: Mapping[str, Any]) -> None:
    """Refuse an export's own ``adapter/`` whose task is not the one the export's ``config.json`` describes.

    ``task`` is that ``config.json``'s ``task`` section and ``doc`` the adapter's ``finetune.json``. An
    adapter from elsewhere (another run, named on purpose) is not the export's and is not checked; nor is
    an export whose config describes no task.

    Raises:
        HubError: task type, class count or class names differ (naming both values): an ``adapter/`` copied
            in from another fine-tuning run would otherwise predict under the wrong class table.
    """
    own = (Path(export_dir) / ADAPTER_DIR).resolve()
    if not task or finetune_dir(adapter).resolve() != own:
        return
    for key, what in (("task", "task"), ("num_classes", "classes"), ("class_names", "class names")):
        mine, theirs = task.get(key), doc.get(key)
        if mine is not None and theirs is not None and mine != theirs:
            raise HubError(f"{own}: the adapter's {FINETUNE_MANIFEST} has {what} {theirs!r}, the export's config.json "
                           f"task has {mine!r} (an adapter/ from another fine-tuning run?)")


def task_section(doc: Mapping[str, Any], where: Path, merged: bool) -> dict[str, Any]:
    """The ``task`` part of ``config.json`` for a fine-tuning manifest."""
    from gfm.finetune.pictures import class_colors

    k = int(doc["num_classes"])
    return {
        "task": doc["task"],
        "type": doc["task"],
        "num_classes": k,
        "class_names": list(doc.get("class_names") or []),
        "label_values": list(doc.get("label_values") or []),
        "window": doc.get("window"),
        "num_bands": doc.get("num_bands"),
        "num_rows": doc.get("num_rows"),
        "head": doc["head"],
        "method": doc["method"],
        "lora": doc.get("lora"),
        "encoder_arch": doc["encoder"]["arch"],
        "encoder_fingerprint": doc["encoder"]["fingerprint"],
        "colors": [list(c) for c in class_colors(k)],
        "merged": merged,
        "adapter": None if merged else ADAPTER_DIR,
        "source": str(where),
    }


def evaluation_of(where: Path) -> dict[str, Any] | None:
    """The test figures of a fine-tuning run (its ``metrics.json``), when it has them."""
    path = where / "metrics.json"
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    test = doc.get("test") or {}
    return {
        "dataset": _dataset_name(where),
        "split": "test",
        "metrics": {k: v for k, v in test.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
        "per_class": {k: v for k, v in test.items() if isinstance(v, dict)},
        "method": doc.get("method"), "steps": doc.get("steps"), "seed": doc.get("seed"),
        "split_report": doc.get("split"), "source": str(path),
    }


def _dataset_name(where: Path) -> str | None:
    """The fine-tuning data's folder name (``data.shards`` of the run's ``config.yaml``), when there is one."""
    import yaml

    try:
        shards = ((yaml.safe_load((where / "config.yaml").read_text()) or {}).get("data") or {}).get("shards")
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return Path(str(shards).rstrip("/")).name or None if shards else None


def copy_adapter(where: Path, doc: Mapping[str, Any], dest: Path) -> None:
    """Put an adapter (peft files, or a probe's head) and its manifest into ``dest`` (an export's ``adapter/``)."""
    from gfm.finetune.methods import get_method
    from gfm.hub.config import portable

    dest.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    if get_method(doc["method"]).saves == "adapter":
        src = _peft_dir(where, doc)
        shutil.copy2(src / "adapter_model.safetensors", dest / "adapter_model.safetensors")
        peft_config = json.loads((src / "adapter_config.json").read_text())
        (dest / "adapter_config.json").write_text(json.dumps(portable(peft_config), indent=2) + "\n")
        files["adapter"] = "."
    else:
        head = (doc.get("files") or {}).get("head", "head.safetensors")
        shutil.copy2(where / head, dest / "head.safetensors")
        files["head"] = "head.safetensors"
    manifest = portable({**doc, "files": files, "base_file": None})
    (dest / FINETUNE_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
