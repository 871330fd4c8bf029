"""Timing shared by the loader benchmarks: rows measured in whole passes, CPU seconds of a process tree.

Imports only the standard library (psutil when it is there), so that ``bench/torchgeo_child.py`` can use
it under an interpreter that has torchgeo and not gfm.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

Pass = tuple[Callable[[], int], Callable[[], None]]  # (one pass returning samples read, cleanup)


class Row:
    """One benchmark path: a factory for a pass over its samples, and what was measured so far."""

    def __init__(self, name: str, make: Callable[[], Pass] | None = None) -> None:
        self.name = name
        self.make = make  # None: the row is measured elsewhere (another process) and only added up here
        self.seconds = 0.0
        self.samples = 0
        self.cpu = 0.0  # CPU seconds of this process and its workers in the timed passes
        self.cpu_samples = 0

    def measure(self, seconds: float) -> None:
        """Set up, run one untimed warm-up pass, then whole passes for at least ``seconds``."""
        assert self.make is not None, f"row {self.name!r} has no pass to measure here"
        run, cleanup = self.make()
        run()
        cpu0 = cpu_seconds()
        n, t0 = 0, time.perf_counter()
        while True:
            n += run()
            dt = time.perf_counter() - t0
            if dt >= seconds:
                break
        cpu = cpu_seconds()
        cleanup()
        self.add(dt, n, sum(c - cpu0.get(pid, 0.0) for pid, c in cpu.items()))

    def add(self, seconds: float, samples: int, cpu: float) -> None:
        """Count timed passes: their wall seconds, samples, and CPU seconds of all processes of the row."""
        self.seconds += seconds
        self.samples += samples
        self.cpu += cpu
        self.cpu_samples += samples

    @property
    def rate(self) -> float:
        """Samples per second over all rounds."""
        return self.samples / self.seconds if self.seconds else float("nan")

    @property
    def cpu_us(self) -> float:
        """CPU microseconds per sample, all processes of the row together."""
        return 1e6 * self.cpu / self.cpu_samples if self.cpu_samples else float("nan")


def cpu_seconds() -> dict[int, float]:
    """User + system CPU seconds so far of this process and of each of its (live) descendants, by pid.

    With psutil when it is installed, else from ``/proc`` (Linux; a torchgeo environment has no psutil).
    """
    try:
        import psutil
    except ImportError:
        return _proc_cpu_seconds()
    me = psutil.Process()
    out = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        out[proc.pid] = t.user + t.system
    return out


def _proc_cpu_seconds() -> dict[int, float]:
    """:func:`cpu_seconds` from ``/proc/<pid>/stat`` (utime + stime, fields 14 and 15)."""
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                text = f.read()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
        pid = int(entry.name)
        parent[pid] = int(fields[1])
        cpu[pid] = (int(fields[11]) + int(fields[12])) / tick
    tree, todo = {os.getpid()}, [os.getpid()]
    while todo:
        pid = todo.pop()
        for child, ppid in parent.items():
            if ppid == pid and child not in tree:
                tree.add(child)
                todo.append(child)
    return {pid: cpu[pid] for pid in tree if pid in cpu}
