"""The encoder to fine-tune: its architecture and weights, from wherever pretraining left them.

``encoder.weights`` may name

- a pretraining **run directory** (``config.yaml`` + ``model.safetensors``, or only checkpoints: the
  latest complete one is used);
- a **DeepSpeed checkpoint** directory (``step_XXXXXXXX`` with ``COMPLETE``), consolidated to fp32 by
  :mod:`gfm.hub.zero` (any ZeRO stage; every file is read with ``torch.load(weights_only=True)``, so a
  crafted checkpoint's pickles cannot run code: they are refused with one line naming the file);
- a **``model.safetensors``** file (a pretraining export, or a fine-tuned model of ``gfm finetune``);
- an **exported Hugging Face directory** (``config.json`` + ``model.safetensors``, ``gfm export``);
- the **short name of a model shipped with gfm** (``gfm models``; :mod:`gfm.pretrained`: an existing
  local path of the same name wins);
- nothing: random initialisation.

Sources are resolved by ``gfm.hub`` (one reader for export and fine-tuning).

Keys are matched strictly: a HyperMAE's ``encoder.*`` tensors are taken and its decoder's are set aside
(and counted), and any encoder key missing from the file, any unexpected one and any shape that differs
is an error listing them. The architecture comes from the weights' own run config (``model`` section)
unless ``model.name`` names an encoder explicitly.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gfm.config import ConfigError


class EncoderLoadError(ValueError):
    """Weights that cannot be loaded into the encoder; the message names the file and the keys."""


@dataclass
class EncoderConfig:
    """The encoder and its initial weights.

    Attributes:
        weights: run directory, DeepSpeed checkpoint directory, ``model.safetensors`` file, exported
            Hugging Face directory, a shipped model's short name (``gfm models``) or a Hub id
            ``org/name[@revision]`` (fetched into the Hugging Face cache); empty = random initialisation.
        random_init: keep the architecture ``weights`` describes but start from random weights (what
            method ``scratch`` does; with ``lora``/``linear_probe`` it gives the random-encoder baseline).
        name: the encoder variant (``gfm.model.list_models``); ``auto`` = the one the weights' run
            config describes (a HyperMAE's encoder), or ``less_vit_tiny`` without weights.
        kwargs: constructor overrides of an explicitly named encoder (``patch_size``, ``spectral_patch``,
            ``depth``...); only with an explicit ``name``.
        grad_checkpointing: recompute each block's activations in the backward pass (activation
            checkpointing: the blocks keep only their inputs, for about one more forward pass of compute);
            not part of the architecture, so it goes with any weights.
    """

    weights: str = ""
    random_init: bool = False
    name: str = "auto"
    kwargs: dict[str, Any] = field(default_factory=dict)
    grad_checkpointing: bool = False

    def validate(self) -> None:
        """Check values; raises :class:`ConfigError` naming the field."""
        if self.kwargs and self.name == "auto":
            raise ConfigError("kwargs: constructor overrides need an explicit encoder name (encoder.name)")
        if self.name != "auto":
            from gfm.model import list_models

            known = list_models()
            if self.name not in known:
                raise ConfigError(f"name: unknown model {self.name!r} (known: {', '.join(known)})")
        if self.weights:
            from gfm.pretrained import PretrainedError, resolve

            try:
                resolve(self.weights)
            except PretrainedError as e:
                raise ConfigError(f"weights: {e}") from None


@dataclass
class LoadedEncoder:
    """An encoder and an account of where it came from.

    Attributes:
        model: the encoder module.
        arch: how to build it again: ``{"name": ..., "kwargs": {...}}`` or ``{"model_config": {...}}``.
        source: the file or directory the weights came from ("" for random init).
        description: one line for people (what was loaded, how many tensors, what was set aside).
        fingerprint: sha256 over the encoder's initial state (names, shapes, bytes): adapters and probes
            record it, and refuse a base whose fingerprint differs.
        name: the shipped model's short name or Hub id when ``encoder.weights`` was one ("" otherwise).
    """

    model: nn.Module
    arch: dict[str, Any]
    source: str
    description: str
    fingerprint: str
    name: str = ""


# ------------------------------------------------------------------------------------------------
# Finding the weights (gfm.hub resolves every source the export knows)


def load_hf_export(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, str]:
    """Weights and model config of an exported Hugging Face directory (``config.json`` + ``model.safetensors``).

    The hook for exports: ``gfm.hub.resolve_source`` recognises them (``"format": "gfm"``); a hub export's
    model section rebuilds the pretraining model, whose encoder is taken as from a run.
    """
    return read_weights(str(path))


def read_weights(weights: str) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, str]:
    """``(fp32 state dict, run config or None, description)`` from any source ``encoder.weights`` accepts.

    Run directories, checkpoints (any ZeRO stage), ``.safetensors`` files with a run config, and exported
    directories go through ``gfm.hub``; a ``.safetensors`` file without a run config (a fine-tuned model of
    ``gfm finetune``) is read as is, and the encoder must then be named (``encoder.name``).
    """
    from gfm.hub.base import HubError, upcast
    from gfm.hub.sources import load_state_dict, read_safetensors, resolve_source

    path = Path(weights)
    if path.is_file() and path.suffix != ".safetensors":
        raise EncoderLoadError(f"encoder.weights: {path} is not a .safetensors file (gfm never unpickles a "
                               "weights file; give a run directory or a checkpoint directory instead)")
    try:
        src = resolve_source(weights)  # the string as given: './x' is a path, a bare name may be a shipped model
    except HubError as e:
        if path.is_file():  # safetensors without a run config
            try:
                return upcast(read_safetensors(path)), None, str(path)
            except HubError as unreadable:
                raise EncoderLoadError(f"encoder.weights: {unreadable}") from None
        raise EncoderLoadError(f"encoder.weights: {e}") from None
    try:
        state = load_state_dict(src)
    except HubError as e:
        raise EncoderLoadError(f"encoder.weights: {e}") from None
    step = f", step {src.step}" if src.step is not None else ""
    where = f"{src.describe()} ({src.kind}{step}" + (f": {src.weights.name}" if src.weights != src.path else "") + ")"
    return upcast(state), {"model": src.model_config}, where


# ------------------------------------------------------------------------------------------------
# Building and loading


def _encoder_of(model: nn.Module) -> nn.Module:
    return getattr(model, "encoder", model)


def build_architecture(cfg: EncoderConfig, run_config: dict[str, Any] | None) -> tuple[nn.Module, dict[str, Any]]:
    """The encoder module (random weights) and the recipe to build it again."""
    from gfm.model import create_model

    if cfg.name != "auto":
        arch: dict[str, Any] = {"name": cfg.name, "kwargs": dict(cfg.kwargs)}
        return _encoder_of(create_model(cfg.name, **cfg.kwargs)), arch
    if run_config is None or not isinstance(run_config.get("model"), dict):
        if cfg.weights:
            raise EncoderLoadError(
                f"encoder.weights: {cfg.weights} carries no run config with a model section; name the encoder "
                "(encoder.name, encoder.kwargs)"
            )
        return _encoder_of(create_model("less_vit_tiny")), {"name": "less_vit_tiny", "kwargs": {}}
    return build_from_model_config(run_config["model"]), {"model_config": run_config["model"]}


def build_from_model_config(section: dict[str, Any]) -> nn.Module:
    """The encoder of a run config's ``model`` section (a HyperMAE's encoder, or the encoder itself)."""
    from gfm.config import from_dict
    from gfm.model import ModelConfig

    try:
        mcfg = from_dict(ModelConfig, section, prefix="model")
    except ConfigError as e:
        raise EncoderLoadError(f"encoder.weights: the run config's model section does not load here: {e}") from None
    return _encoder_of(mcfg.build())


def build_arch(arch: dict[str, Any]) -> nn.Module:
    """Rebuild an encoder from the ``arch`` recipe :func:`load_encoder` recorded."""
    from gfm.model import create_model

    if "model_config" in arch:
        return build_from_model_config(arch["model_config"])
    return _encoder_of(create_model(arch["name"], **arch.get("kwargs", {})))


def _listing(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def encoder_state(
    state: dict[str, torch.Tensor], target: nn.Module, source: str
) -> tuple[dict[str, torch.Tensor], int]:
    """The tensors of ``state`` that belong to the encoder, checked strictly against ``target``.

    A HyperMAE state (``encoder.*``, ``decoder.*``...) gives its ``encoder.*`` tensors; a fine-tuned task
    model's ``encoder.*`` likewise (its ``task_head.*`` set aside). Returns the encoder state and how many
    tensors were set aside.

    Raises:
        EncoderLoadError: missing or unexpected encoder keys, or shapes that differ (all listed).
    """
    if any(k.startswith("encoder.") for k in state):
        own = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    else:
        own = dict(state)
    aside = len(state) - len(own)
    expected = target.state_dict()
    missing = sorted(set(expected) - set(own))
    unexpected = sorted(set(own) - set(expected))
    shapes = sorted(k for k in set(own) & set(expected) if tuple(own[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {_listing(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected: {_listing(unexpected)}")
        if shapes:
            parts.append("shape mismatch: " + _listing(
                [f"{k} {tuple(own[k].shape)} vs {tuple(expected[k].shape)}" for k in shapes]))
        raise EncoderLoadError(f"encoder.weights: {source} does not fit the encoder ({'; '.join(parts)}); "
                               "check encoder.name/kwargs against the pretraining model")
    return own, aside


def fingerprint(module: nn.Module) -> str:
    """sha256 of a module's state (sorted names, shapes and fp32 bytes), 16 hex digits."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(json.dumps(list(t.shape)).encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def load_encoder(cfg: EncoderConfig) -> LoadedEncoder:
    """Build the encoder ``cfg`` describes and load its weights strictly (or keep random weights)."""
    from gfm.pretrained import resolve

    state: dict[str, torch.Tensor] | None = None
    run_config: dict[str, Any] | None = None
    where = ""
    ref = None
    if cfg.weights:
        state, run_config, where = read_weights(cfg.weights)
        ref = resolve(cfg.weights)  # read_weights has resolved it already: a local path or a shipped model
    encoder, arch = build_architecture(cfg, run_config)
    if cfg.grad_checkpointing:
        encoder.set_grad_checkpointing(True)  # type: ignore[operator]
    n = sum(p.numel() for p in encoder.parameters())
    name = arch.get("name") or arch["model_config"].get("name", "?")
    if state is None or cfg.random_init:
        why = f" (architecture of {where})" if where else ""
        description = f"{name} ({n / 1e6:.2f} M parameters), random init{why}"
        source = ""
    else:
        own, aside = encoder_state(state, encoder, where)
        encoder.load_state_dict(own, strict=True)
        extra = f", {aside} other tensors (decoder, head) set aside" if aside else ""
        description = f"{name} ({n / 1e6:.2f} M parameters) from {where}: {len(own)} tensors loaded{extra}"
        source = str(ref.path.resolve()) if ref else ""
    return LoadedEncoder(encoder, arch, source, description, fingerprint(encoder),
                         (ref.name or ref.hub or "") if ref else "")
