"""Writing an export directory (and uploading it to the Hub)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from gfm import __version__
from gfm.hub.adapters import (
    copy_adapter,
    evaluation_of,
    read_finetune,
    task_model_from,
    task_section,
)
from gfm.hub.base import (
    ADAPTER_DIR,
    CONFIG_NAME,
    FORMAT,
    WEIGHTS_NAME,
    HubError,
    check_keys,
    weights_dtype,
)
from gfm.hub.config import (
    _index_for_run,
    band_table,
    build_net,
    describe_architecture,
    hub_config,
    portable,
    read_index,
    with_task_bands,
)
from gfm.hub.model import GFMModel
from gfm.hub.sources import WeightsSource, load_state_dict, resolve_source
from gfm.outputs import MARKER, claim_dir, write_marker

#: the program name in an export's ``.gfm-output`` marker (:mod:`gfm.outputs`)
PROGRAM = "export"


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
    adapter: str | Path | None = None,
    merge: bool = False,
    index: str | Path | None = None,
    license: str = "other",
    overwrite: bool = False,
    push: str | None = None,
    dtype: str = "fp32",
) -> ExportReport:
    """Write an exported model directory from a run, checkpoint, safetensors file or export.

    The directory is assembled under a temporary name beside ``out_dir`` and renamed into place at the
    end, so an interrupted export never leaves a directory that looks complete. It carries the marker
    ``.gfm-output`` (:mod:`gfm.outputs`). ``out_dir`` may be new or empty, or, with ``overwrite``, an
    export (its marker, or ``config.json`` with ``"format": "gfm"`` beside ``model.safetensors``: an export
    of a gfm version before markers); any other non-empty directory is refused, even with ``overwrite``, and
    so is an ``out_dir`` that is or contains ``source``, ``adapter`` or ``index``.

    Args:
        source: see :func:`resolve_source`.
        out_dir: the directory to create.
        adapter: a ``gfm finetune`` run directory (or an export's ``adapter/``): its LoRA adapter (peft
            format) or probe head travels beside the base weights in ``adapter/``, its task and test
            figures go into ``config.json`` and the model card.
        merge: fold the adapter into the weights instead: the export *is* the fine-tuned task model.
        index: an ``index.json`` with the band statistics, when the run's own cannot be found.
        license: the licence identifier written into the model card metadata.
        overwrite: replace an existing ``out_dir`` that holds an export (see above).
        push: a Hub repository id to upload the directory to (needs a token; never run in tests).
        dtype: how ``model.safetensors`` stores the floating-point weights: ``fp32`` (default, exact) or
            ``bf16`` (half the size, each weight rounded to bfloat16; what the models shipped in
            ``gfm/pretrained/`` use). Recorded in ``config.json`` as ``weights_dtype``; every reader loads
            the weights into fp32 parameters.

    Raises:
        OutputError: ``out_dir`` is refused (:class:`~gfm.outputs.OutputExistsError` when it holds an export
            and ``overwrite`` is false).
        HubError: a problem with the source, adapter or index.
    """
    out = Path(out_dir)
    if merge and adapter is None:
        raise HubError("merge=True needs an adapter to merge")
    stored = weights_dtype(dtype)
    src = resolve_source(source)
    inputs = [src.path, src.weights, src.run_dir, adapter, index]
    claim_dir(out, PROGRAM, overwrite=overwrite, sources=inputs, recognise=is_export_dir)
    net = build_net(src.exported if src.kind == "export" else {"model": src.model_config})
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
        index_doc, index_url = _index_for_run(src.run_config, src.describe())
        if index_doc is None:
            note, index_url = index_url, ""
    config = dict(src.exported) if src.kind == "export" else hub_config(src, net, index_doc, index_url)
    if index_doc is not None and src.kind == "export":
        config["bands"], config["sensors"] = band_table(index_doc)
    where: Path | None = None
    doc: dict[str, Any] = {}
    if adapter is not None:
        if (config.get("task") or {}).get("merged"):
            raise HubError(f"{source}: already a merged fine-tuned model; export its base model with the adapter")
        where, doc = read_finetune(adapter)
        if merge:
            net, _ = task_model_from(copy.deepcopy(getattr(net, "encoder", net)), where, merge=True)
            config["architecture"] = describe_architecture(net)
        else:
            task_model_from(copy.deepcopy(getattr(net, "encoder", net)), where)  # fits this base: checked now
        config = with_task_bands(config, doc.get("bands"))  # normalise as the fine-tuning did
        config["task"] = task_section(doc, where, merged=merge)
        if src.name and "/" in src.name:  # the base came from the Hub: the card names it as base_model
            config["task"]["base_model"] = src.name.split("@")[0]
        config["evaluation"] = evaluation_of(where)
    config["license"] = license
    config["weights_dtype"] = stored
    config = portable(config)  # no local directory of this machine in what may be published
    model = GFMModel.__new__(GFMModel)
    nn.Module.__init__(model)
    model.config, model.net = config, net
    model._hub_mixin_config = config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        if where is not None and not merge:
            copy_adapter(where, doc, tmp / ADAPTER_DIR)
        write_marker(tmp, PROGRAM)
        if claim_dir(out, PROGRAM, overwrite=overwrite, sources=inputs, recognise=is_export_dir):  # again: just before
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tensors = net.state_dict()
    report = ExportReport(out, src, len(tensors), sum(v.numel() for v in tensors.values()), len(config["bands"]),
                          note, adapter=None if where is None else f"{doc['method']} {'merged' if merge else 'beside'}")
    if push:
        report.pushed = push_to_hub(out, push)
    return report


def is_export_dir(path: Path) -> bool:
    """Whether ``path`` holds an export (``config.json`` with ``"format": "gfm"`` and ``model.safetensors``)."""
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and config.get("format") == FORMAT and (path / WEIGHTS_NAME).is_file()


def push_to_hub(folder: str | Path, repo_id: str, private: bool | None = None) -> str:
    """Upload an exported directory to the Hugging Face Hub (creates the repository); returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    repo = api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model").repo_id
    commit = api.upload_folder(repo_id=repo, folder_path=str(folder), repo_type="model",
                               commit_message=f"gfm {__version__} export", ignore_patterns=[MARKER])
    return str(commit)
