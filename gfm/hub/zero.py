"""DeepSpeed checkpoints of any ZeRO stage consolidated into fp32 weights, without running their pickles.

DeepSpeed's own ``zero_to_fp32`` unpickles every checkpoint file with ``torch.load(weights_only=False)``,
so a crafted ``*_optim_states.pt`` runs its payload. Here every file is read with
``torch.load(weights_only=True)``: only tensors and plain containers are rebuilt. A genuine optimizer file
also names three DeepSpeed objects (its loss scaler, ``ZeroStageEnum``, the ``fragment_address`` of each
parameter slice); they are rebuilt as inert stand-ins (:class:`Inert`, the enum as its plain value),
never as DeepSpeed's classes, and the consolidation reads none of them. Any other global in a file is
refused with one line naming the file and the global.

The layout read here (DeepSpeed 0.15-0.19; ``W`` = data-parallel world size, one file per rank ``r``):

- ``param_shapes`` (model states): one ordered ``{name: shape}`` per optimizer parameter group; the
  trainable parameters, in the order they were flattened. ``buffer_names`` and ``module`` give the
  buffers, ``shared_params`` maps an alias to the name it shares storage with, and
  ``frozen_param_shapes`` / ``frozen_param_fragments`` hold parameters without gradients.
- **ZeRO 1/2, and the bf16 optimizer at ZeRO 0/1** (``mp_rank_00_model_states.pt``, and
  ``[bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt``): ``single_partition_of_fp32_groups[g]`` is
  rank ``r``'s contiguous slice of group ``g``'s flat fp32 vector. The slices in rank order make the flat
  vector: the group's parameters one after the other, each followed by ``param_alignment_paddings[g][i]``
  elements when that list is stored, then padding to a multiple of ``2 W`` (DeepSpeed's alignment).
  Frozen fragments are whole tensors.
- **ZeRO 3** (``zero_pp_rank_{r}_mp_rank_00_model_states.pt`` and ``..._optim_states.pt`` per rank):
  each parameter is split on its own into ``ceil(numel / W)`` elements per rank, the last rank
  zero-padded; rank ``r``'s ``fp32_flat_groups`` are its partitions of every parameter one after the
  other, in ``param_shapes`` order across the groups. Frozen fragments are split the same way.

The result equals DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` bit for bit on genuine
checkpoints (``tests/test_untrusted_checkpoints.py``), and also reads the bf16 optimizer's ZeRO 0/1
checkpoints, which that function refuses ("not a zero checkpoint").
"""

from __future__ import annotations

import math
import re
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from gfm.hub.base import HubError

#: ``[bf16_]zero_pp_rank_{r}_mp_rank_{m}_optim_states.pt`` / ``..._model_states.pt``
_RANK_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_(optim|model)_states\.pt$")
ZERO12_MODEL_STATES = "mp_rank_00_model_states.pt"
_UNSAFE_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
#: ZeRO 1/2 pad each flat group to a multiple of ``ALIGN_PER_RANK * world_size`` elements
ALIGN_PER_RANK = 2


class Inert:
    """Stands in for a DeepSpeed object in an optimizer file that consolidation never reads.

    Unpickling makes one with no constructor call and hands its state here, kept as plain data.
    """

    def __setstate__(self, state: object) -> None:
        self.state = state


def _enum_value(value: object) -> object:
    """Stands in for ``ZeroStageEnum(value)``: the plain value."""
    return value


#: the DeepSpeed globals a genuine checkpoint names, each mapped to an inert stand-in (never the class itself)
STAND_INS: tuple[tuple[Any, str], ...] = (
    (Inert, "deepspeed.runtime.fp16.loss_scaler.LossScaler"),
    (Inert, "deepspeed.utils.tensor_fragment.fragment_address"),
    (_enum_value, "deepspeed.runtime.zero.config.ZeroStageEnum"),
)


@contextmanager
def _stand_ins() -> Iterator[None]:
    if not hasattr(torch.serialization, "safe_globals") or torch.__version__ < torch.torch_version.TorchVersion("2.6"):
        raise HubError(f"reading a ZeRO checkpoint safely needs torch >= 2.6 (this is {torch.__version__})")
    with torch.serialization.safe_globals(list(STAND_INS)):
        yield


def load_weights_only(file: Path) -> dict[str, Any]:
    """``torch.load(file, weights_only=True)`` with the DeepSpeed stand-ins; refusals are one line.

    Raises:
        HubError: the file cannot be read, names a global that is not plain data (the message names the
            global and the file), or does not hold a dict.
    """
    if not zipfile.is_zipfile(file):
        raise HubError(f"{file}: not a torch checkpoint archive (truncated, missing, or torch's legacy format, which "
                       "DeepSpeed does not write)")
    try:
        with _stand_ins():
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except HubError:
        raise
    except Exception as e:  # UnpicklingError for a refused global; RuntimeError, EOFError... for a bad file
        text = str(e)
        unsafe = _UNSAFE_GLOBAL.search(text)
        if unsafe:
            raise HubError(
                f"{file}: refused: unpickling it would call {unsafe.group(1)}; gfm reads checkpoints as tensors "
                "and plain data only (a checkpoint you trust can be converted with DeepSpeed's zero_to_fp32.py "
                "--safe_serialization)"
            ) from None
        why = text.partition("WeightsUnpickler error:")[2] or text  # past torch's advice to unpickle anyway
        first = next((line.strip() for line in why.splitlines() if line.strip()), type(e).__name__)
        raise HubError(f"{file}: not a readable checkpoint file ({first})") from None
    if not isinstance(state, dict):
        raise HubError(f"{file}: expected a dict of checkpoint entries, found {type(state).__name__}")
    return state


def _rank_files(path: Path, kind: str) -> list[Path]:
    """The per-rank files of ``kind`` (``optim``/``model``) in rank order: ranks 0..W-1, model-parallel rank 0."""
    found: dict[int, Path] = {}
    for p in path.glob(f"*_{kind}_states.pt"):
        m = _RANK_FILE.match(p.name)
        if m is None:
            if kind == "model" and p.name == ZERO12_MODEL_STATES:
                continue
            raise HubError(f"{p}: unexpected file name (expected [bf16_]zero_pp_rank_R_mp_rank_00_{kind}_states.pt)")
        if m.group(2) != "00":
            raise HubError(f"{p}: model-parallel checkpoints are not supported (mp_rank {m.group(2)})")
        rank = int(m.group(1))
        if rank in found:
            raise HubError(f"{p}: rank {rank} appears twice (with {found[rank].name})")
        found[rank] = p
    if sorted(found) != list(range(len(found))):
        raise HubError(f"{path}: {kind} state files of ranks {sorted(found)}: expected ranks 0..{len(found) - 1}")
    return [found[r] for r in range(len(found))]


def _shape(value: Any, where: str) -> torch.Size:
    if not isinstance(value, (torch.Size, tuple, list)) or not all(isinstance(d, int) and d >= 0 for d in value):
        raise HubError(f"{where}: expected a shape (non-negative integers), found {value!r}")
    return torch.Size(value)


def _entry(state: Mapping[str, Any], key: str, kind: type | tuple[type, ...], file: Path) -> Any:
    value = state.get(key)
    if not isinstance(value, kind):
        raise HubError(f"{file}: '{key}' is {type(value).__name__}, not a DeepSpeed checkpoint entry")
    return value


def _param_groups(model_states: Mapping[str, Any], file: Path) -> list[dict[str, torch.Size]]:
    groups = _entry(model_states, "param_shapes", list, file)
    out = []
    for g, group in enumerate(groups):
        if not isinstance(group, Mapping):
            raise HubError(f"{file}: param_shapes[{g}] is {type(group).__name__}, expected name → shape")
        out.append({str(name): _shape(s, f"{file}: param_shapes[{g}][{name!r}]") for name, s in group.items()})
    return out


def _flat_groups(optim: Mapping[str, Any], key: str, file: Path) -> list[torch.Tensor]:
    groups = _entry(optim, key, list, file)
    if not all(isinstance(t, torch.Tensor) and t.dim() == 1 and t.is_floating_point() for t in groups):
        raise HubError(f"{file}: '{key}' must hold one flat floating-point tensor per parameter group")
    return [t.float() for t in groups]


def _world_size(optim: Mapping[str, Any], file: Path) -> int:
    count = optim.get("partition_count")
    counts = count if isinstance(count, list) else [count]
    if not counts or not all(isinstance(c, int) and c > 0 for c in counts):
        raise HubError(f"{file}: 'partition_count' is {count!r}, expected a positive integer (or a list of them)")
    return max(counts)


def _buffers(model_states: Mapping[str, Any], file: Path) -> dict[str, torch.Tensor]:
    names = set(_entry(model_states, "buffer_names", list, file))
    module = _entry(model_states, "module", Mapping, file)
    return {k: v.float() if v.is_floating_point() else v for k, v in module.items()
            if k in names and isinstance(v, torch.Tensor)}


def _take(flat: torch.Tensor, offset: int, shape: torch.Size, what: str) -> torch.Tensor:
    if offset + shape.numel() > flat.numel():
        raise HubError(f"{what}: needs elements {offset}..{offset + shape.numel()} of a flat vector of {flat.numel()}")
    return flat.narrow(0, offset, shape.numel()).view(shape).clone()


def _zero12_params(
    groups: list[dict[str, torch.Size]], partitions: Sequence[list[torch.Tensor]], world: int,
    paddings: Any, path: Path,
) -> dict[str, torch.Tensor]:
    """Trainable parameters of a ZeRO 1/2 checkpoint: rank slices joined into each group's flat vector."""
    if any(len(p) != len(groups) for p in partitions):
        raise HubError(f"{path}: {len(groups)} parameter groups in param_shapes, but the optimizer files hold "
                       f"{sorted({len(p) for p in partitions})}")
    if paddings is not None and (not isinstance(paddings, list) or len(paddings) != len(groups)):
        raise HubError(f"{path}: param_alignment_paddings does not have one list per parameter group")
    align = ALIGN_PER_RANK * world
    out: dict[str, torch.Tensor] = {}
    for g, shapes in enumerate(groups):
        flat = torch.cat([p[g] for p in partitions])  # [sum over ranks of the slice lengths]
        pads = paddings[g] if paddings is not None else [0] * len(shapes)
        counts_ok = isinstance(pads, list) and all(isinstance(n, int) and n >= 0 for n in pads)
        if not counts_ok or len(pads) != len(shapes):
            raise HubError(f"{path}: param_alignment_paddings[{g}] is not one count per parameter of group {g}")
        offset = 0
        for (name, shape), pad in zip(shapes.items(), pads):
            out[name] = _take(flat, offset, shape, f"{path}: {name}")
            offset += shape.numel() + pad
        if math.ceil(offset / align) != math.ceil(flat.numel() / align):
            raise HubError(f"{path}: parameter group {g} uses {offset} of {flat.numel()} elements (more than "
                           f"DeepSpeed's alignment to {align} explains)")
    return out


def _zero3_param(per_rank: Sequence[torch.Tensor], offset: int, shape: torch.Size, what: str) -> torch.Tensor:
    """One parameter of ZeRO 3: its ``ceil(numel / W)`` elements from every rank, joined, padding cut."""
    part = math.ceil(shape.numel() / len(per_rank))
    pieces = []
    for flat in per_rank:
        if offset + part > flat.numel():
            raise HubError(f"{what}: needs elements {offset}..{offset + part} of a rank's partition of {flat.numel()}")
        pieces.append(flat.narrow(0, offset, part))
    return torch.cat(pieces).narrow(0, 0, shape.numel()).view(shape).clone()


def _zero3_params(
    groups: list[dict[str, torch.Size]], partitions: Sequence[list[torch.Tensor]], path: Path,
) -> dict[str, torch.Tensor]:
    """Trainable parameters of a ZeRO 3 checkpoint: each parameter's partitions gathered from every rank."""
    per_rank = [torch.cat(p) if p else torch.zeros(0) for p in partitions]  # a rank's partitions of all groups
    if len({t.numel() for t in per_rank}) != 1:
        raise HubError(f"{path}: the ranks' fp32 partitions differ in length ({[t.numel() for t in per_rank]})")
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for shapes in groups:
        for name, shape in shapes.items():
            out[name] = _zero3_param(per_rank, offset, shape, f"{path}: {name}")
            offset += math.ceil(shape.numel() / len(per_rank))
    if offset != per_rank[0].numel():
        raise HubError(f"{path}: the parameters use {offset} of each rank's {per_rank[0].numel()} fp32 elements")
    return out


def _frozen(model_states: Sequence[Mapping[str, Any]], files: Sequence[Path], zero3: bool) -> dict[str, torch.Tensor]:
    """Parameters without gradients: whole in ZeRO 1/2, split like the trainable ones in ZeRO 3."""
    shapes = model_states[0].get("frozen_param_shapes") or {}
    if not isinstance(shapes, Mapping):
        raise HubError(f"{files[0]}: 'frozen_param_shapes' is {type(shapes).__name__}, expected name → shape")
    fragments = [_entry(s, "frozen_param_fragments", Mapping, f) if shapes else {} for s, f in zip(model_states, files)]
    out: dict[str, torch.Tensor] = {}
    for name, raw in shapes.items():
        shape = _shape(raw, f"{files[0]}: frozen_param_shapes[{name!r}]")
        pieces = [frag.get(name) for frag in fragments]
        if not all(isinstance(t, torch.Tensor) for t in pieces):
            raise HubError(f"{files[0].parent}: frozen parameter {name!r} has no fragment in every model state file")
        if zero3:
            out[name] = _zero3_param([t.reshape(-1) for t in pieces], 0, shape, f"{files[0].parent}: {name}")
        else:
            out[name] = _take(pieces[0].reshape(-1), 0, shape, f"{files[0]}: {name}")
    return {k: v.float() if v.is_floating_point() else v for k, v in out.items()}


def consolidate(path: Path) -> dict[str, torch.Tensor]:
    """The fp32 weights (and buffers) of the DeepSpeed checkpoint directory ``path`` written with ZeRO 1, 2 or 3.

    Every file is read with ``weights_only=True`` (:func:`load_weights_only`); the layout is in the module
    docstring. Tensors shared under two names (``shared_params``) come back as one tensor under both.

    Raises:
        HubError: a missing, unreadable or refused file, or entries that do not fit together (named).
    """
    optim_files = _rank_files(path, "optim")
    if not optim_files:
        raise HubError(f"{path}: no *_optim_states.pt files (not a ZeRO 1-3 checkpoint)")
    optims = [_entry(load_weights_only(f), "optimizer_state_dict", dict, f) for f in optim_files]
    zero3 = "fp32_flat_groups" in optims[0]
    world = _world_size(optims[0], optim_files[0])
    if world != len(optim_files):
        raise HubError(f"{path}: the optimizer state was partitioned over {world} ranks, but "
                       f"{len(optim_files)} *_optim_states.pt files are here (an incomplete or mixed checkpoint)")
    model_files = _rank_files(path, "model") if zero3 else [path / ZERO12_MODEL_STATES]
    if len(model_files) != (world if zero3 else 1) or not all(f.is_file() for f in model_files):
        raise HubError(f"{path}: expected {world if zero3 else 1} model state file(s) "
                       f"({'zero_pp_rank_R_mp_rank_00_model_states.pt' if zero3 else ZERO12_MODEL_STATES})")
    model_states = [load_weights_only(f) for f in model_files]
    groups = _param_groups(model_states[0], model_files[0])
    key = "fp32_flat_groups" if zero3 else "single_partition_of_fp32_groups"
    partitions = [_flat_groups(o, key, f) for o, f in zip(optims, optim_files)]

    state = _buffers(model_states[0], model_files[0])
    state.update(_frozen(model_states, model_files, zero3))
    if zero3:
        state.update(_zero3_params(groups, partitions, path))
    else:
        state.update(_zero12_params(groups, partitions, world, optims[0].get("param_alignment_paddings"), path))
    shared = model_states[0].get("shared_params") or {}
    if not isinstance(shared, Mapping):
        raise HubError(f"{model_files[0]}: 'shared_params' is {type(shared).__name__}, expected alias → name")
    for alias, name in shared.items():
        if name in state:
            state[alias] = state[name]
    return state
