"""Worker processes of a build: they never outlive it, and a stopped build stops them at once.

* Each worker asks the kernel to kill it when its parent dies, whatever the signal (``prctl`` with
  ``PR_SET_PDEATHSIG`` on Linux); elsewhere a thread in the worker polls its parent's pid and exits when
  the parent is gone. A parent that died before the worker got that far is noticed at start.
* Workers ignore SIGINT: a Ctrl-C (to the whole process group) or a SIGINT to the build alone stops the
  parent, which kills every worker (SIGKILL) instead of letting them finish their shards.
* When the parent leaves the pool through any exception (an error, KeyboardInterrupt, a SIGTERM turned
  into one by the ``gfm shards`` program) the workers are killed and their queued jobs dropped.

What a killed worker was writing stays under a temporary name (:mod:`gfm.shards.outdir` removes it).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from types import TracebackType
from typing import Any, TypeVar

J = TypeVar("J")
R = TypeVar("R")

_PR_SET_PDEATHSIG = 1
_POLL_S = 0.5


def _watch_parent(parent: int) -> None:
    while True:
        time.sleep(_POLL_S)
        if os.getppid() != parent:
            os._exit(1)


def _init_worker(parent: int) -> None:
    """Pool initializer: die with the parent, leave SIGINT and SIGTERM to it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler (inherited through fork)
    armed = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent,), name="gfm-parent-watch", daemon=True).start()
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(1)


class WorkerPool:
    """A process pool for :func:`gfm.shards.build` (see the module docstring); use as a context manager."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._before: set[int] = set()
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> WorkerPool:
        self._before = {p.pid for p in multiprocessing.active_children() if p.pid is not None}
        self._pool = ProcessPoolExecutor(max_workers=self.workers, initializer=_init_worker,
                                         initargs=(os.getpid(),))
        return self

    def imap_unordered(self, fn: Callable[[J], R], jobs: Sequence[J]) -> Iterator[tuple[J, R]]:
        """``(job, fn(job))`` as each finishes; an exception raised by ``fn`` is raised here."""
        assert self._pool is not None
        pending: dict[Future[R], J] = {self._pool.submit(fn, job): job for job in jobs}
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                yield pending.pop(fut), fut.result()

    def kill(self) -> None:
        """Kill every worker now (SIGKILL) and drop queued jobs."""
        if self._pool is None:
            return
        for p in multiprocessing.active_children():
            if p.pid is not None and p.pid not in self._before:
                p.kill()
        for p in multiprocessing.active_children():
            if p.pid is not None and p.pid not in self._before:
                p.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> Any:
        if kind is not None:
            self.kill()
        elif self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        return None
