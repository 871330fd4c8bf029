"""The loadable model: :class:`GFMModel` (``PyTorchModelHubMixin``, strict keys) and :func:`from_pretrained`."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard, PyTorchModelHubMixin
from torch import nn

from gfm.batch import Batch
from gfm.hub.adapters import check_own_adapter, finetune_dir, task_model_from, task_section
from gfm.hub.base import (
    CONFIG_NAME,
    FORMAT,
    PAPER_URL,
    WEIGHTS_NAME,
    HubError,
    Pooling,
    check_keys,
    stored_dtype,
    upcast,
)
from gfm.hub.card import model_card
from gfm.hub.config import build_net, stats_of, validate_config, with_task_bands
from gfm.hub.inputs import pool, prepare
from gfm.hub.sources import read_json_object, read_safetensors


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
        self.config = validate_config(config)
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

        dtype = stored_dtype(self.config)  # config.json's weights_dtype (gfm export --dtype)
        state = {k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous()
                 for k, v in self.net.state_dict().items()}
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
        model = cls(config=validate_config(model_kwargs["config"], f"{model_id}/{CONFIG_NAME}"))
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
    """Load ``weights`` (safetensors) into ``net``; any missing, unexpected, mis-shaped or mistyped key is an error.

    Weights stored in bf16 are upcast to fp32 first (the parameters stay fp32).
    """
    path = Path(weights)
    if not path.is_file():
        raise HubError(f"{path}: no weights file")
    state = upcast(read_safetensors(path))
    check_keys(net, state, str(path))
    expected = net.state_dict()
    for key, tensor in state.items():
        want = expected[key].dtype
        mistyped = tensor.dtype != want if not want.is_floating_point else not tensor.is_floating_point()
        if mistyped:
            raise HubError(f"{path}: tensor {key!r} is {tensor.dtype}, the model holds {want} there (load_state_dict "
                           "would cast it silently)")
    net.load_state_dict(state, strict=True)


def model_location(
    path: str | os.PathLike[str],
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
) -> Path:
    """The local export folder behind a model argument: a directory, a shipped model, or a Hub snapshot.

    ``org/name[@revision]`` that is not a local path is fetched into the Hugging Face cache
    (:func:`gfm.hub.remote.snapshot`; ``revision=`` names the revision instead of ``@``); anything else goes
    through :func:`gfm.pretrained.resolve` (an existing path, a shipped model's short name, or an error
    naming the path or listing the shipped names). A mistyped local path is never sent to the Hub.
    """
    from gfm.hub.remote import HubRef, parse_hub_id, snapshot
    from gfm.pretrained import resolve

    ref = parse_hub_id(path)
    if ref is not None:
        if revision is not None and ref.revision not in (None, revision):
            raise HubError(f"{path}: names revision {ref.revision!r}, and revision={revision!r} was passed too")
        ref = HubRef(ref.repo, revision or ref.revision)
        return snapshot(ref, token=token, cache_dir=cache_dir, local_files_only=local_files_only)
    if revision is not None:
        raise HubError(f"{path}: revision={revision!r} applies to a Hub id (org/name), not to a local path")
    local = resolve(path).path
    if not local.is_dir():
        raise HubError(f"{local}: expected an exported model directory ({CONFIG_NAME} + {WEIGHTS_NAME}), "
                       "a shipped model's short name or a Hub repository id")
    return local


def from_pretrained(
    path: str | os.PathLike[str],
    *,
    map_location: str = "cpu",
    adapter: str | Path | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
) -> GFMModel:
    """Load an exported model with strict keys, in eval mode.

    Args:
        path: the export directory, a model shipped with gfm by its short name (``gfm models`` lists
            them; :mod:`gfm.pretrained`), or ``org/name[@revision]`` on the Hugging Face Hub (when no such
            local path exists and ``org`` is not a local directory): its export is downloaded once into
            the Hugging Face cache, its ``adapter/`` included. Offline (``HF_HUB_OFFLINE``,
            ``local_files_only`` or no answer from the Hub) the cache alone serves.
        map_location: device for the weights.
        adapter: a fine-tuning run (or an export's ``adapter/``) to apply: ``net`` becomes the task model
            (a ``peft.PeftModel`` for LoRA). The export's own ``adapter/`` is applied only when named.
        revision: the Hub revision (branch, tag or commit); also ``org/name@revision``.
        token: a Hub token for private repositories (default: huggingface_hub's, e.g. ``HF_TOKEN``).
        cache_dir: the Hugging Face cache to use (default: huggingface_hub's, ``HF_HOME``).
        local_files_only: never ask the Hub; the cache must hold the model.

    Raises:
        HubError: no such directory or shipped model (``gfm.pretrained.PretrainedError``), a Hub id the Hub
            or the cache cannot give (naming the repository and revision), a ``config.json`` that is not a
            JSON object, a truncated weights file, or weights that do not match the config.
    """
    where = model_location(path, revision=revision, token=token, cache_dir=cache_dir,
                           local_files_only=local_files_only)
    if (where / CONFIG_NAME).is_file():
        read_json_object(where / CONFIG_NAME)  # one line for a config.json that is not a JSON object
    model = GFMModel.from_pretrained(str(where), map_location=map_location)
    if adapter is not None:
        apply_adapter(model, where, adapter)
    return model


def apply_adapter(model: GFMModel, export_dir: Path, adapter: str | Path) -> dict[str, Any]:
    """Make ``model`` the task model of ``adapter`` on its encoder; returns the adapter's ``finetune.json``.

    ``model.net`` becomes the task model (on the encoder's device), ``model.config`` takes the adapter's
    band statistics (:func:`gfm.hub.config.with_task_bands`: normalise as the fine-tuning did) and its
    ``task`` section. The export's own ``adapter/`` (in ``export_dir``) must describe the export's task.

    Raises:
        HubError: the adapter does not fit the encoder, or is an ``adapter/`` from another task.
    """
    device = next(model.encoder.parameters()).device
    net, doc = task_model_from(model.encoder, adapter)  # the pretraining net it leaves is dropped below
    check_own_adapter(export_dir, model.config.get("task"), adapter, doc)
    model.net = net.to(device)
    config = with_task_bands(model.config, doc.get("bands"))
    model.config = {**config, "task": task_section(doc, finetune_dir(adapter), merged=False)}
    return doc
