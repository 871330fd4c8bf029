"""Checkpoints: written by every rank, counted only once complete, resumable on any rank count.

Layout of ``<run_dir>/checkpoints/step_00001000/``::

    mp_rank_00_model_states.pt, *_optim_states.pt   DeepSpeed's files (client state inside)
    rank_00000.pt, rank_00001.pt, ...               per-rank state: data-stream position, RNG states
    trainer.json                                    step, world size, ZeRO stage, precision
    config.yaml                                     the resolved run config
    COMPLETE                                        written last, by rank 0, after a barrier
    universal/                                      made on demand when resuming on another rank count

A checkpoint counts only when ``COMPLETE`` exists; it is written (temp file + rename) after every rank has
finished its files, so a kill at any moment leaves the previous complete checkpoint as the latest.
``latest`` in the checkpoints directory is a convenience for people; resuming never trusts it and scans
for the highest complete step instead.

Loading and trust: the per-rank files (``rank_*.pt``) hold only tensors, numbers, strings and containers
(the RNG states as plain lists) and are loaded with ``torch.load(weights_only=True)`` (:func:`load_rank_state`),
as are ``trainer.json`` and ``config.yaml`` (plain JSON and YAML). DeepSpeed's own files (model and optimizer
states) are read by ``engine.load_checkpoint`` and by the universal conversion, both of which call
``torch.load(weights_only=False)`` inside DeepSpeed (not configurable): resume only from checkpoints you
wrote or trust.

Resuming on a different number of ranks (or ZeRO stage) uses DeepSpeed's universal checkpoint: rank 0
converts the checkpoint once with ``deepspeed.checkpoint.ds_to_universal`` into ``universal/``, and the
engine is started with ``checkpoint.load_universal`` so every rank loads its new slice of parameters and
Adam moments. Model weights, optimizer state, step and schedule carry over exactly; the data stream
continues from the global sample position (per-rank streams are re-sliced), and per-rank RNG states
start from the run seed and step.
"""

from __future__ import annotations

import argparse
import json
import pickle
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gfm import distributed as gdist
from gfm.fileio import atomic_save, atomic_write

COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer.json"
_TAG_RE = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    """The checkpoint directory name for optimizer ``step``."""
    return f"step_{step:08d}"


def list_checkpoints(ckpt_dir: Path, complete_only: bool = True) -> list[tuple[int, Path]]:
    """``[(step, path)]`` of checkpoints under ``ckpt_dir`` by increasing step."""
    out = []
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            m = _TAG_RE.match(p.name)
            if m and p.is_dir() and (not complete_only or (p / COMPLETE).is_file()):
                out.append((int(m.group(1)), p))
    return sorted(out)


def resolve_resume(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint directory to resume from: ``auto`` → latest complete (or None), a path → itself."""
    if not resume:
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir / "checkpoints")
        return found[-1][1] if found else None
    path = Path(resume)
    if not (path / COMPLETE).is_file():
        raise FileNotFoundError(f"checkpoint.resume: {path} is not a complete checkpoint (no {COMPLETE} marker)")
    return path


def rng_state() -> dict[str, Any]:
    """The Python, NumPy and torch RNG states of this process, as plain data (loadable with ``weights_only``).

    NumPy's state is stored as ``[name, keys (list of int), pos, has_gauss, cached_gaussian]`` rather than
    the tuple with an ndarray that ``np.random.get_state`` returns, so no numpy object is pickled.
    """
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [str(name), [int(k) for k in keys], int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (also the ndarray form written by earlier versions)."""
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_rank_state(path: Path) -> dict[str, Any]:
    """A per-rank state file, unpickled with ``torch.load(weights_only=True)``.

    Only tensors, numbers, strings and containers load; anything else is refused with an error naming the
    file. NumPy arrays and dtypes are allowed too, for rank files written before the RNG state was stored
    as plain lists (they hold ``np.random.get_state()``'s ndarray).
    """
    allowed: list[Any] = [np.ndarray, np.dtype, np.dtypes.UInt32DType]
    core = np._core if hasattr(np, "_core") else np.core  # numpy 2 / 1
    reconstruct = core.multiarray._reconstruct
    try:
        with torch.serialization.safe_globals([*allowed, reconstruct]):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = next((ln for ln in lines if "GLOBAL" in ln or "global" in ln), lines[0] if lines else "")
        raise RuntimeError(f"{path}: refused to load: it holds more than tensors and plain data ({detail})") from None
    if not isinstance(state, dict):
        raise RuntimeError(f"{path}: expected a dict of rank state, got {type(state).__name__}")
    return state


@dataclass
class Resumed:
    """What a checkpoint hands back to the trainer.

    Attributes:
        step: optimizer steps already done.
        client: the client state saved by rank 0 (counters, metrics).
        rank_state: this rank's own state (data stream, RNG) when the rank count matches, else None.
        data_state: rank 0's data-stream state (for re-slicing on a different rank count).
        universal: whether the checkpoint was loaded through a universal conversion.
    """

    step: int
    client: dict[str, Any]
    rank_state: dict[str, Any] | None
    data_state: dict[str, Any] | None
    universal: bool


class CheckpointManager:
    """Saves and loads checkpoints of a DeepSpeed engine under ``<run_dir>/checkpoints``."""

    def __init__(self, run_dir: Path, keep: int) -> None:
        self.dir = run_dir / "checkpoints"
        self.keep = keep

    def save(
        self,
        engine: Any,
        step: int,
        client_state: dict[str, Any],
        rank_state: dict[str, Any],
        meta: dict[str, Any],
        config_yaml: str,
    ) -> Path:
        """Write checkpoint ``step`` from every rank; returns its directory once marked complete."""
        info = gdist.info()
        tag = tag_for(step)
        path = self.dir / tag
        if info.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            if path.exists():  # leftover of a write that was killed: never complete, safe to drop
                shutil.rmtree(path)
        gdist.barrier(f"checkpoint {tag} start")
        client = dict(client_state, universal_checkpoint_info={"universal_checkpoint_version": 0.4})
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client, save_latest=False)
        atomic_save(path / f"rank_{info.rank:05d}.pt", lambda tmp: torch.save(rank_state, tmp))
        gdist.barrier(f"checkpoint {tag} files written")
        if info.is_main:
            meta = dict(meta, step=step, world_size=info.world_size, time=time.time())
            (path / TRAINER_STATE).write_text(json.dumps(meta, indent=2))
            (path / "config.yaml").write_text(config_yaml)
            atomic_write(path / COMPLETE, f"{step}\n")
            atomic_write(self.dir / "latest", f"{tag}\n")
            self.prune()
        return path

    def prune(self) -> None:
        """Drop complete checkpoints beyond the last ``keep`` and incomplete ones older than the latest."""
        complete = list_checkpoints(self.dir)
        if not complete:
            return
        latest = complete[-1][0]
        doomed = [p for _, p in complete[: -self.keep]] if self.keep else []
        doomed += [p for s, p in list_checkpoints(self.dir, complete_only=False)
                   if s < latest and not (p / COMPLETE).is_file()]
        for p in doomed:
            (p / COMPLETE).unlink(missing_ok=True)  # first, so a half-deleted one never looks complete
            shutil.rmtree(p, ignore_errors=True)

    @staticmethod
    def read_meta(path: Path) -> dict[str, Any]:
        """The ``trainer.json`` of checkpoint ``path``."""
        meta: dict[str, Any] = json.loads((path / TRAINER_STATE).read_text())
        return meta

    @staticmethod
    def needs_universal(meta: dict[str, Any], world_size: int, zero_stage: int, precision: str) -> bool:
        """Whether loading ``meta``'s checkpoint here needs the universal (re-partitioning) path."""
        if meta["world_size"] == world_size and meta["zero_stage"] == zero_stage:
            return False
        partitioned = meta["zero_stage"] > 0 or meta["precision"] == "bf16"
        return partitioned or zero_stage > 0 or precision == "bf16"

    @staticmethod
    def make_universal(path: Path) -> Path:
        """Convert checkpoint ``path`` to a universal checkpoint in ``path/universal`` (rank 0; cached)."""
        out = path / "universal"
        if gdist.is_main() and not (out / COMPLETE).is_file():
            from deepspeed.checkpoint import ds_to_universal

            shutil.rmtree(out, ignore_errors=True)
            args = argparse.Namespace(
                input_folder=str(path), output_folder=str(out), num_extract_workers=1, num_merge_workers=1,
                keep_temp_folder=False, strict=True, inject_missing_state=True,
            )
            ds_to_universal.main(args)
            atomic_write(out / COMPLETE, "universal\n")
        gdist.barrier("universal checkpoint conversion")
        return out

    def load(self, engine: Any, path: Path, universal: bool) -> Resumed:
        """Load model, optimizer and client state from checkpoint ``path`` into ``engine``."""
        info = gdist.info()
        meta = self.read_meta(path)
        if universal:
            load_dir, tag = path, "universal"
        else:
            load_dir, tag = path.parent, path.name
        loaded, client = engine.load_checkpoint(
            str(load_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {path}")
        client = client or {}
        rank_file = path / f"rank_{info.rank:05d}.pt"
        same_world = meta["world_size"] == info.world_size
        rank_state = load_rank_state(rank_file) if same_world and rank_file.is_file() else None
        return Resumed(
            step=int(meta["step"]), client=client, rank_state=rank_state,
            data_state=client.get("data_state"), universal=universal,
        )
