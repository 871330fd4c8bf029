"""Names every part of the hub shares: file names, the format version, errors, the strict key check."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from gfm.outputs import OutputError as OutputError  # outputs' errors have one home: gfm.outputs
from gfm.outputs import OutputExistsError as OutputExistsError

FORMAT = "gfm"
FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
ADAPTER_DIR = "adapter"
COMPLETE = "COMPLETE"  # the checkpoint marker written last by gfm.train.checkpoint
PAPER_URL = "https://arxiv.org/abs/2503.12843"
FINETUNE_MANIFEST = "finetune.json"
#: how ``model.safetensors`` stores floating-point weights (``config.json``: ``weights_dtype``, absent = float32).
#: Readers upcast to the model's fp32 parameters; an old reader does too (``load_state_dict`` copies into the
#: parameters' dtype), so bf16 storage needs no new ``FORMAT_VERSION``.
WEIGHTS_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: the ``gfm export --dtype`` spellings
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16"}

Pooling = Literal["mean", "cls"]


class HubError(ValueError):
    """An export or load problem, in one line naming the file, key or value and what was expected."""


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


def weights_dtype(name: str) -> str:
    """The ``config.json`` name of a storage dtype given as ``fp32``/``bf16`` or ``float32``/``bfloat16``."""
    canonical = DTYPE_ALIASES.get(name, name)
    if canonical not in WEIGHTS_DTYPES:
        raise HubError(f"weights dtype {name!r}: expected one of {', '.join([*DTYPE_ALIASES, *WEIGHTS_DTYPES])}")
    return canonical


def stored_dtype(config: Mapping[str, Any]) -> torch.dtype:
    """The dtype an exported ``config.json`` says its ``model.safetensors`` holds (float32 when it says nothing)."""
    return WEIGHTS_DTYPES[weights_dtype(str(config.get("weights_dtype") or "float32"))]


def upcast(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with floating tensors in fp32 (bf16 storage → the model's fp32 parameters; others untouched)."""
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


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
