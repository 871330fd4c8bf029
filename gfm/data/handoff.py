"""Batches from DataLoader workers to the trainer's process: each byte written once, each buffer mapped once.

A worker carves every batch's tensors out of one shared-memory buffer (:func:`gfm.data.transforms.carve`)
taken from its own small :class:`BufferPool`, and the trainer's :class:`BufferLedger` turns the buffer
back into a :class:`Batch` of views. What a fresh buffer per batch would cost, and what this avoids:

* a page fault per 4 kB the worker writes (about 2,000 per 8.5 MB batch): buffers are reused;
* a file descriptor passed over a socket and a fresh ``mmap`` in the trainer per batch: a buffer is sent
  once; later batches in it send only its number (the trainer aliases its mapping with
  ``torch.frombuffer``, one storage per batch), unless batches are pinned for CUDA, where the DataLoader's
  pin thread copies each batch anyway and the buffer travels with every batch.

A buffer is written again only once the trainer has let go of the batch in it: the trainer watches the
storage of each batch it handed out (``StorageWeakRef``) and, when every tensor of that batch is gone,
publishes the batch's generation in ``released``; the worker reuses buffer ``j`` only when that equals
the generation it last sent in it. When all of a worker's buffers are still held (a trainer that keeps
batches), the worker allocates a one-off buffer instead of waiting. Batches the DataLoader drops unseen
(in flight when an iteration is abandoned) free their buffers at the next iteration: the trainer then
publishes which buffers it still holds (``held``), and the rest of those sent earlier are reclaimed.
"""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from gfm.batch import Batch
from gfm.data.sources import LoaderError
from gfm.data.transforms import Layout, views

#: (worker id, buffer number j or -1 for a one-off buffer, generation of the batch, version of the buffer)
Lease = tuple[int, int, int, int]


class HandoffState:
    """What workers and trainer share (small tensors in shared memory, made before the workers start).

    Attributes:
        released: ``[workers, pool]`` last generation of each buffer whose batch the trainer dropped.
        mapped: ``[workers, pool]`` version of each buffer the trainer has mapped (0: none).
        held: ``[workers, pool]`` generation of each buffer the trainer held when the iteration began.
        iteration: ``[1]`` iterations begun by the trainer.
    """

    def __init__(self, workers: int, pool: int) -> None:
        self.released = torch.zeros(workers, pool, dtype=torch.int64).share_memory_()
        self.mapped = torch.zeros(workers, pool, dtype=torch.int64).share_memory_()
        self.held = torch.zeros(workers, pool, dtype=torch.int64).share_memory_()
        self.iteration = torch.zeros(1, dtype=torch.int64).share_memory_()

    def reset(self) -> None:
        """Forget everything (new worker processes, new pools)."""
        for t in (self.released, self.mapped, self.held, self.iteration):
            t.zero_()


def shared_bytes(n: int) -> torch.Tensor:
    """``[n]`` uint8 allocated in shared memory, so sending it to the main process copies nothing."""
    try:
        storage = torch.UntypedStorage._new_shared(n)  # what share_memory_() uses, minus a copy
    except (AttributeError, RuntimeError):  # private API: fall back to a copy at send time
        return torch.empty(n, dtype=torch.uint8)
    return torch.empty(0, dtype=torch.uint8).set_(storage)


class BufferPool:
    """One worker's batch buffers (module docstring); call it for a buffer, then send :meth:`outgoing`."""

    def __init__(self, state: HandoffState, worker: int, send_once: bool) -> None:
        self.state = state
        self.worker = worker
        self.send_once = send_once
        self.size = state.released.shape[1]
        self.buffers: list[torch.Tensor] = []
        self.sent: list[int] = []  # generation last sent, per buffer
        self.version: list[int] = []  # bumped when a buffer is replaced by a larger one
        self.sent_in: list[int] = []  # iteration of the last send
        self.reclaimed: list[int] = []  # generation freed by a new iteration
        self.iteration = 0
        self.lease: Lease = (worker, -1, 0, 0)
        self._buffer: torch.Tensor | None = None

    def begin(self) -> None:
        """At the start of an iteration: reclaim buffers sent before it that the trainer does not hold."""
        self.iteration = int(self.state.iteration[0])
        held = self.state.held.numpy()[self.worker]
        for j in range(len(self.buffers)):
            if self.sent_in[j] < self.iteration and held[j] != self.sent[j]:
                self.reclaimed[j] = self.sent[j]

    def __call__(self, nbytes: int) -> torch.Tensor:
        """A shared uint8 buffer of at least ``nbytes`` for the next batch (its lease in :attr:`lease`)."""
        released = self.state.released.numpy()[self.worker]
        j = next((j for j in range(len(self.buffers))
                  if self.sent[j] in (released[j], self.reclaimed[j])), None)
        if j is None and len(self.buffers) < self.size:
            j = len(self.buffers)
            self.buffers.append(shared_bytes(nbytes))
            self.sent.append(0)
            self.version.append(1)
            self.sent_in.append(0)
            self.reclaimed.append(-1)
        if j is None:  # every buffer is still held: a one-off
            self.lease = (self.worker, -1, 0, 0)
            self._buffer = shared_bytes(nbytes)
            return self._buffer
        if self.buffers[j].numel() < nbytes:
            self.buffers[j] = shared_bytes(nbytes)
            self.version[j] += 1
        self.sent[j] += 1
        self.sent_in[j] = self.iteration
        self.lease = (self.worker, j, self.sent[j], self.version[j])
        self._buffer = self.buffers[j]
        return self._buffer

    def outgoing(self) -> torch.Tensor | None:
        """The last buffer handed out, to send with its batch; None when the trainer has it mapped already."""
        _, j, _, version = self.lease
        if j >= 0 and self.send_once and self.state.mapped.numpy()[self.worker, j] == version:
            return None
        return self._buffer


class BufferLedger:
    """The trainer's side: batches from received buffers, and which buffers it has let go of."""

    def __init__(self, state: HandoffState, send_once: bool) -> None:
        self.state = state
        self.send_once = send_once
        self.maps: dict[tuple[int, int], tuple[torch.Tensor, object]] = {}  # (worker, j) → buffer, numpy view
        self.lent: list[tuple[Lease, StorageWeakRef]] = []
        self.one_offs = 0  # batches that came in one-off buffers (every pooled one was held)

    def reset(self) -> None:
        """New worker processes: forget their buffers."""
        self.state.reset()
        self.maps.clear()
        self.lent = []

    def begin(self) -> None:
        """Before a new iteration starts the workers: publish the buffers still held, count the iteration."""
        self.release()
        held = self.state.held.numpy()
        held[...] = 0
        for (worker, j, generation, _), _ref in self.lent:
            held[worker, j] = generation
        self.state.iteration += 1

    def receive(self, buf: torch.Tensor | None, lease: Lease, layout: Layout, keys: list[str]) -> Batch:
        """The batch a worker sent (``buf`` None: in the buffer the trainer has mapped already)."""
        self.release()
        worker, j, _, version = lease
        if j < 0:
            assert buf is not None
            self.one_offs += 1
            return Batch(keys=keys, **views(buf, layout))
        if buf is not None and self.send_once:
            self.maps[(worker, j)] = (buf, buf.numpy())
            self.state.mapped.numpy()[worker, j] = version
        if self.send_once:
            mapped = self.maps.get((worker, j))
            if mapped is None:
                raise LoaderError(f"worker {worker} sent a batch in buffer {j}, which this process never received")
            buf = torch.frombuffer(mapped[1], dtype=torch.uint8)  # type: ignore[call-overload]  # own storage
        assert buf is not None
        self.lent.append((lease, StorageWeakRef(buf.untyped_storage())))
        return Batch(keys=keys, **views(buf, layout))

    def release(self) -> None:
        """Publish the buffers whose batches are gone (every tensor of them)."""
        released = self.state.released.numpy()
        still = []
        for lease, ref in self.lent:
            if ref.expired():
                worker, j, generation, _ = lease
                released[worker, j] = generation
            else:
                still.append((lease, ref))
        self.lent = still
