"""Process groups, ranks and devices: the one place that touches ``torch.distributed`` setup.

Every program calls :func:`init_distributed` once. Under ``torchrun`` it reads ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; run plainly (``gfm pretrain ...``) it becomes a
world of one on a free loopback port, so DeepSpeed always sees a process group. The backend follows the
hardware: NCCL with one CUDA device per local rank when a GPU is present, gloo on the CPU otherwise
(``DS_ACCELERATOR=cpu`` is then set before DeepSpeed is imported). Every collective has a timeout, so a
rank that never arrives ends the run with an error naming the timeout instead of a silent hang.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job.

    Attributes:
        rank: global rank.
        world_size: number of processes.
        local_rank: rank on this node (selects the GPU).
        local_world_size: processes on this node.
        device: the device this rank computes on.
        backend: ``nccl`` or ``gloo``.
        timeout_s: collective timeout in seconds.
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str
    timeout_s: float

    @property
    def is_main(self) -> bool:
        """True on global rank 0."""
        return self.rank == 0


_INFO: DistInfo | None = None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: Set beside the variables a world of one puts in ``os.environ`` (DeepSpeed reads them from there).
_WORLD_OF_ONE = "GFM_WORLD_OF_ONE_PORT"


def _inherited_world_of_one() -> bool:
    """True when RANK/MASTER_PORT... were set by a parent's world of one, not by a launcher.

    A program that fine-tunes in-process and then starts ``python -m pretrain`` passes its environment on;
    the child must not take the parent's store port (still held by the parent: EADDRINUSE) for its own.
    A launcher (torchrun, SLURM) sets its own MASTER_PORT, which differs from the recorded one.
    """
    port = os.environ.get(_WORLD_OF_ONE)
    return port is not None and os.environ.get("MASTER_PORT") == port and os.environ.get("WORLD_SIZE") == "1"


def _choose_backend() -> tuple[str, torch.device, str]:
    """(backend, device type, DeepSpeed accelerator) for this machine: NCCL/CUDA or gloo/CPU."""
    if torch.cuda.is_available():
        return "nccl", torch.device("cuda"), "cuda"
    return "gloo", torch.device("cpu"), "cpu"


def init_distributed(timeout_s: float = DEFAULT_TIMEOUT_S) -> DistInfo:
    """Join (or create) the process group once and return this rank's :class:`DistInfo`.

    Idempotent: later calls return the first result. Must run before DeepSpeed is imported elsewhere so
    that its accelerator matches the backend chosen here.
    """
    global _INFO
    if _INFO is not None:
        return _INFO
    backend, device, accelerator = _choose_backend()
    os.environ.setdefault("DS_ACCELERATOR", accelerator)
    if "RANK" not in os.environ or _inherited_world_of_one():  # plain single process: a world of one
        port = str(_free_port())
        os.environ.update(
            RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **{_WORLD_OF_ONE: port},
        )
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    import deepspeed  # after DS_ACCELERATOR is set

    if device.type == "cpu" and os.environ.get("GFM_DS_SHM_COMM", "0") != "1":
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (minutes, on every new machine)
        # that only its inference all-reduce uses; training collectives go through gloo. Mark it unavailable
        # (DeepSpeed keeps edits to this dict); GFM_DS_SHM_COMM=1 keeps it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend=backend,
            timeout=datetime.timedelta(seconds=timeout_s),
            auto_mpi_discovery=False,
            verbose=False,
        )
    _INFO = DistInfo(rank, world_size, local_rank, local_world_size, device, backend, timeout_s)
    _quiet_libraries(rank)
    return _INFO


def _quiet_libraries(rank: int) -> None:
    """Rank 0 alone speaks: DeepSpeed's info chatter off everywhere, warnings off on other ranks."""
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING if rank == 0 else logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.*", category=FutureWarning)
    if rank != 0:
        warnings.simplefilter("ignore")


def info() -> DistInfo:
    """The :class:`DistInfo` of :func:`init_distributed` (raises if it has not run)."""
    if _INFO is None:
        raise RuntimeError("gfm.distributed.init_distributed() has not been called")
    return _INFO


def is_main() -> bool:
    """True on global rank 0, or when no process group exists."""
    if _INFO is not None:
        return _INFO.is_main
    return int(os.environ.get("RANK", "0")) == 0


def print0(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only (flushed, so logs interleave sensibly)."""
    if is_main():
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def barrier(what: str = "barrier") -> None:
    """Wait for every rank; on timeout, raise with a message naming ``what`` and the timeout."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    try:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=info().timeout_s), wait_all_ranks=True)
    except RuntimeError as e:
        raise RuntimeError(
            f"rank {dist.get_rank()}: not every rank reached '{what}' within {info().timeout_s:.0f} s "
            f"(a rank crashed or hangs; see its log): {e}"
        ) from e


def all_reduce_sum(value: float) -> float:
    """The sum of ``value`` over ranks."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=info().device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def all_reduce_sum_tensor(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of a small CPU tensor over ranks (returned on the CPU, float64)."""
    t = values.detach().to(torch.float64)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t.cpu()
    t = t.to(info().device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def destroy() -> None:
    """Leave the process group (end of a program)."""
    global _INFO
    if dist.is_initialized():
        dist.destroy_process_group()
    _INFO = None
