"""The streaming loader: one deterministic sample stream per (rank, worker) slot, batched in the worker.

Stages inside each DataLoader worker (or the main process with ``num_workers=0``)::

    segments of shards ─ read: member table → sample references (local shards, gfm.data.reader)
                               | tar stream → raw bytes (webdataset; pipe:, URLs, shards without table)
      ─ shuffle buffer ─ decode (one pread per referenced sample; .npy/.json only)
      ─ draw crop/flip/rot90 ─ bucket by band set ─ normalise + mask + collate into one buffer
      ─ (buffer, layout, keys, faults, slot, lease)

A worker carves each batch out of a shared-memory buffer of its own small pool, reused once the trainer
has let go of the batch in it, and sent to the trainer's process only once (:mod:`gfm.data.handoff`).

Every random choice comes from generators seeded with (seed, epoch, rank, slot, restart), so a
stream is a pure function of those numbers and the data. Each slot yields exactly
``batches_per_epoch / num_workers`` batches per epoch, so every rank yields the same count.

Resuming mid-epoch (``load_state_dict``): in exact-epoch mode the epoch's streams are replayed from
the start and the already consumed batches are dropped before collation, so the run continues with
exactly the batches it would have seen, none repeated; in resampled mode each slot starts a fresh
stream seeded with the incremented restart count and yields only the batches still owed to the epoch
(re-reading would cost IO for nothing, since resampled draws repeat by design), unless
``replay_on_resume`` asks for the exact-epoch behaviour.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

from gfm.batch import Batch
from gfm.data.decode import TileDecoder
from gfm.data.handoff import BufferLedger, BufferPool, HandoffState, Lease
from gfm.data.reader import SampleRef, TableCache, sample_refs
from gfm.data.sources import (
    DatasetIndex,
    LoaderError,
    Segment,
    ShardSet,
    epoch_order,
    local_path,
    open_url,
    slot_segments,
)
from gfm.data.transforms import Augment, BandTable, Geometry, Layout, check_tile, collate, draw_keep
from gfm.schema import SchemaError, Tile

log = logging.getLogger("gfm.data")

Pending = list[tuple[Tile, Geometry]]
_T = TypeVar("_T")


class Faults:
    """Corrupt samples and unreadable shards seen by one slot; raises once the budget is exceeded."""

    def __init__(self, budget: int, where: str) -> None:
        self.budget = budget
        self.where = where
        self.samples = 0
        self.shards = 0

    @property
    def total(self) -> int:
        """All faults counted so far."""
        return self.samples + self.shards

    def as_dict(self) -> dict[str, int]:
        """Counts by kind (sent with every batch to the main process)."""
        return {"samples": self.samples, "shards": self.shards}

    def sample(self, url: str, key: str, err: BaseException) -> None:
        """Count and log one skipped sample."""
        self.samples += 1
        log.warning("%s: skipped corrupt sample %r in shard %s: %s", self.where, key, url, err)
        self._check(f"last: sample {key!r} in {url}: {err}")

    def shard(self, url: str, err: BaseException, after: str | None) -> None:
        """Count and log a shard that could not be (fully) read."""
        self.shards += 1
        pos = f"after sample {after!r}" if after else "at its start"
        log.warning("%s: shard %s unreadable %s, rest skipped: %s", self.where, url, pos, err)
        self._check(f"last: shard {url} {pos}: {err}")

    def _check(self, last: str) -> None:
        if self.total > self.budget:
            raise LoaderError(
                f"{self.where}: {self.total} faults ({self.samples} corrupt samples, "
                f"{self.shards} unreadable shards) exceed loader.error_budget={self.budget}; {last}"
            )


@dataclass
class Plan:
    """Everything a slot needs to produce its stream; fixed at build time, shipped to the workers.

    Attributes:
        per_slot: batches each slot yields in a full epoch (K).
        slot_samples: samples each slot owns per exact epoch (Q); 0 in resampled mode.
    """

    shards: ShardSet
    norm: DatasetIndex  # whose statistics normalise: the dataset's own index, or LoaderConfig.norm_index
    rank: int
    world_size: int
    workers: int  # slots per rank: max(1, num_workers)
    exact: bool
    replay: bool  # resume by replaying the epoch's stream and dropping consumed batches
    batch_size: int
    per_slot: int
    slot_samples: int
    seed: int
    shuffle_buffer: int
    augment: Augment
    obs_dropout: float
    time_dropout: float
    min_obs: int
    error_budget: int
    member_tables: bool = True  # read local shards through their member tables when they have one
    oversample: dict[str, int] = field(default_factory=dict)  # resampled mode: sensor -> times each tile is emitted
    pool: int = 5  # shared buffers each worker reuses for its batches


class SlotStream(IterableDataset):  # type: ignore[type-arg]
    """The iterable each DataLoader worker runs: yields one epoch of packed batches.

    Items are ``(buffer, layout, keys, faults, slot, lease)``; :class:`~gfm.data.handoff.BufferLedger`
    turns them back into a :class:`Batch` (in the training process itself, ``(batch, None, ...)``:
    nothing to transfer). The position (epoch, restart count, batches of the epoch already consumed) lives in a
    small shared-memory tensor that :class:`ShardLoader` writes before every epoch, so persistent
    workers see it without being re-created; ``handoff`` is what the buffer pools share with the trainer.
    """

    def __init__(self, plan: Plan) -> None:
        super().__init__()
        self.plan = plan
        self.position = torch.zeros(3, dtype=torch.int64).share_memory_()  # epoch, restart, consumed
        self.handoff = HandoffState(plan.workers, plan.pool)
        self.send_once = True  # False when the DataLoader pins (and so copies) every batch
        self._tables: dict[str, BandTable] = {}
        self._decode = TileDecoder()
        self._members = TableCache()
        self._pool: BufferPool | None = None  # created in the worker process

    @property
    def epoch(self) -> int:
        """Epoch being read."""
        return int(self.position[0])

    @property
    def restart(self) -> int:
        """Restart count of the run."""
        return int(self.position[1])

    @property
    def consumed(self) -> int:
        """Batches of this rank's epoch already handed out before the current iteration."""
        return int(self.position[2])

    # --- which slot, how many batches ---------------------------------------------------------

    def _slot(self) -> int:
        info = get_worker_info()
        if info is None:
            return 0
        if info.num_workers != self.plan.workers:
            raise LoaderError(f"DataLoader has {info.num_workers} workers, the plan {self.plan.workers}")
        # rotate so that the first worker continues where the interrupted round robin stopped
        return (info.id + self.consumed) % self.plan.workers

    def _skip(self, slot: int) -> int:
        """Batches of ``slot`` among the first ``consumed`` batches of the epoch (round robin)."""
        n, w = self.consumed, self.plan.workers
        return (n - slot + w - 1) // w if n > slot else 0

    def __iter__(
        self,
    ) -> Iterator[tuple[torch.Tensor | Batch | None, Layout | None, list[str], dict[str, int], int, Lease | None]]:
        p = self.plan
        info = get_worker_info()
        if info is not None:
            if self._pool is None:
                self._pool = BufferPool(self.handoff, info.id, self.send_once)
            self._pool.begin()
        slot = self._slot()
        skip = self._skip(slot)
        restart = 0 if p.replay else self.restart  # replaying streams ignore restarts to resume exactly
        where = f"rank {p.rank} worker {slot}"
        faults = Faults(p.error_budget, where)
        ident = (p.seed, self.epoch, p.rank, slot, restart)
        rng = random.Random("gfm-stream/" + "/".join(map(str, ident)))
        geo_rng = np.random.default_rng([*ident, 1])
        keep_rng = np.random.default_rng([*ident, 2])
        remaining = p.per_slot - skip
        if remaining <= 0:
            return
        dropped = skip if p.replay else 0  # a replayed stream drops what was consumed
        emitted = 0
        for pending in self._batches(slot, rng, geo_rng, faults, where):
            keep = draw_keep(
                keep_rng, [b["time"] for b in pending[0][0].meta["bands"]],
                p.obs_dropout, p.time_dropout, p.min_obs,
            )
            if dropped:
                dropped -= 1  # consumed before the restart: dropped before the costly part
                continue
            tiles = [t for t, _ in pending]
            pool = self._pool
            batch = collate(tiles, [g for _, g in pending], self._table(tiles[0]), keep, buffer=pool)
            if pool is not None:  # the batch's tensors are views into the buffer the pool gave
                layout = [(name, int(t.storage_offset()) * t.element_size(), str(t.dtype).removeprefix("torch."),
                           tuple(t.shape)) for name, t in batch.tensors().items()]
                yield pool.outgoing(), layout, batch.keys, faults.as_dict(), slot, pool.lease
            else:  # same process: no transfer
                yield batch, None, batch.keys, faults.as_dict(), slot, None
            emitted += 1
            if emitted >= remaining:
                return

    def _table(self, tile: Tile) -> BandTable:
        sig = self._decode.signature(tile.meta["bands"])
        table = self._tables.get(sig)
        if table is None:
            table = self._tables[sig] = BandTable.from_bands(tile.meta["bands"], self.plan.norm)
        return table

    # --- samples → pending batches -------------------------------------------------------------

    def _batches(
        self, slot: int, rng: random.Random, geo_rng: np.random.Generator, faults: Faults, where: str
    ) -> Iterator[Pending]:
        p = self.plan
        if not p.exact:
            yield from self._fill(self._resampled_segments(rng), rng, geo_rng, faults, flush=False)
            return
        urls, counts = p.shards.urls, [int(c or 0) for c in p.shards.counts]
        order = epoch_order(len(urls), p.seed, self.epoch)
        s = p.rank * p.workers + slot
        start, stop = s * p.slot_samples, (s + 1) * p.slot_samples
        n = 0
        own = slot_segments(urls, counts, order, start, stop)
        for pending in self._fill(own, rng, geo_rng, faults, True):
            n += 1
            yield pending
            if n >= p.per_slot:
                return
        # Faults ate into this slot's samples: top up from the following ranges so that every rank
        # still yields the same number of batches (the alternative is a hang at the epoch's end).
        log.warning(
            "%s: epoch %d short of %d batches after faults; topping up from the next slots' samples "
            "(they repeat within this epoch)", where, self.epoch, p.per_slot - n,
        )
        others = slot_segments(urls, counts, order, stop, stop + sum(counts))
        for pending in self._fill(others, rng, geo_rng, faults, True):
            n += 1
            yield pending
            if n >= p.per_slot:
                return
        raise LoaderError(f"{where}: no readable samples left for epoch {self.epoch} ({faults.as_dict()})")

    def _resampled_segments(self, rng: random.Random) -> Iterator[Segment]:
        urls, counts = self.plan.shards.urls, self.plan.shards.counts
        weights = [float(c) if c is not None else 1.0 for c in counts]  # uniform over samples when known
        while True:
            url = rng.choices(urls, weights)[0]
            yield Segment(url, 0, 1 << 62)

    def _read(self, segments: Iterator[Segment], faults: Faults) -> Iterator[SampleRef | dict[str, Any]]:
        """Each segment's samples in tar order.

        References into the shard for a local shard with a usable member table, else raw samples streamed
        from the tar.
        """
        shards = self.plan.shards
        position = {u: i for i, u in enumerate(shards.urls)}
        for seg in segments:
            i = position[seg.url]
            table = shards.members[i] if self.plan.member_tables and shards.members else None
            if table is not None:
                path = local_path(seg.url)
                assert path is not None  # tables are only given for local shards
                try:
                    shard = self._members.open(path, table, shards.counts[i])
                except OSError as e:  # missing or unreadable shard: a fault, as on the tar path
                    faults.shard(seg.url, e, None)
                    continue
                if shard is not None:
                    yield from sample_refs(shard, seg.start, seg.stop)
                    continue
            yield from _read_tar(seg, faults, shards.allow_pipe)

    def _fill(
        self,
        segments: Iterator[Segment],
        rng: random.Random,
        geo_rng: np.random.Generator,
        faults: Faults,
        flush: bool,
    ) -> Iterator[Pending]:
        """Raw samples → shuffle → decode → geometry → buckets; full buckets come out as batches.

        With ``flush`` the partly filled buckets are emitted too when the samples run out, largest
        first (only happens when a slot's samples hold several band sets).
        """
        p = self.plan
        buckets: dict[tuple[Any, ...], Pending] = {}
        for raw in _shuffled(self._read(segments, faults), p.shuffle_buffer, rng):
            try:
                if isinstance(raw, SampleRef):
                    key, url = raw.key, raw.shard.path
                    raw = raw.load()  # one pread, checked against the tar
                else:
                    key, url = str(raw.get("__key__")), str(raw.get("__url__"))
                tile = self._decode(raw)
                check_tile(tile, p.augment.crop_size)
            except SchemaError as e:
                faults.sample(url, key, e)
                continue
            h, w = tile.pixels.shape[-2:]
            repeats = max((p.oversample.get(b.get("sensor", ""), 1) for b in tile.meta["bands"]), default=1)
            for _ in range(repeats):  # each copy its own crop and flips
                g = p.augment.draw(geo_rng, h, w)
                label_kind = type(tile.label).__name__
                out_hw = (g.w, g.h) if g.k % 2 else (g.h, g.w)  # a quarter turn swaps the sides
                bkey = (self._decode.signature(tile.meta["bands"]), *out_hw, label_kind)
                bucket = buckets.setdefault(bkey, [])
                bucket.append((tile, g))
                if len(bucket) == p.batch_size:
                    del buckets[bkey]
                    yield bucket
        if flush:
            for bucket in sorted(buckets.values(), key=len, reverse=True):
                yield bucket


def _as_is(item: Any) -> Any:
    """The DataLoader's ``collate_fn``: items are finished batches already (nothing to convert)."""
    return item


def _read_tar(seg: Segment, faults: Faults, allow_pipe: bool = False) -> Iterator[dict[str, Any]]:
    """Raw samples (``__key__``, ``__url__`` and bytes per member) of one segment, streamed from the tar."""
    last: list[str | None] = [None]
    failed = [False]

    def handler(exn: BaseException) -> bool:
        failed[0] = True
        faults.shard(seg.url, exn, last[0])
        return True  # skip the rest of this shard, go on with the next

    try:
        stream = open_url(seg.url, allow_pipe=allow_pipe)
    except Exception as e:  # missing file, failed command, network error: a fault, not a crash
        handler(e)
        return
    to_end = False
    try:
        files = tar_file_expander([{"url": seg.url, "stream": stream}], handler=handler)
        for i, sample in enumerate(group_by_keys(files, handler=handler)):
            if i >= seg.stop:
                break
            last[0] = sample.get("__key__")
            if i >= seg.start:
                yield sample
        else:
            to_end = True
    finally:
        try:
            stream.close()  # a pipe: command reports its exit status here
        except Exception as e:
            if to_end and not failed[0]:  # stopping early makes commands fail (SIGPIPE): not a fault
                handler(e)


def _shuffled(items: Iterator[_T], size: int, rng: random.Random) -> Iterator[_T]:
    """A shuffle buffer of ``size`` samples (0 or 1: no shuffling)."""
    if size <= 1:
        yield from items
        return
    buf: list[_T] = []
    for x in items:
        if len(buf) < size:
            buf.append(x)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = x
    rng.shuffle(buf)
    yield from buf


class ShardLoader:
    """One rank's loader: iterate it for one epoch of :class:`Batch` objects.

    ``for batch in loader`` runs the current epoch from where it stands and then moves to the next
    epoch; ``len(loader) == loader.batches_per_epoch`` on every rank. Made by :meth:`LoaderConfig.build`.
    """

    def __init__(self, plan: Plan, *, num_workers: int = 0, pin_memory: bool = False, prefetch_factor: int = 2) -> None:
        self.plan = plan
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        self.dataset = SlotStream(plan)
        self._loader: DataLoader | None = None  # type: ignore[type-arg]
        pin = pin_memory and torch.cuda.is_available()
        self.dataset.send_once = not pin
        self._ledger = BufferLedger(self.dataset.handoff, send_once=not pin)
        self.epoch = 0
        self.batches = 0  # batches of the current epoch handed out
        self.restart = 0
        self._faults: dict[int, dict[str, int]] = {}

    @property
    def batches_per_epoch(self) -> int:
        """Batches every rank yields per epoch (identical on all ranks)."""
        return self.plan.per_slot * self.plan.workers

    @property
    def samples_per_epoch(self) -> int:
        """Samples every rank yields per epoch with full batches."""
        return self.batches_per_epoch * self.plan.batch_size

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def faults(self) -> dict[str, int]:
        """Corrupt samples and unreadable shards this rank has skipped in the current iteration."""
        out = {"samples": 0, "shards": 0}
        for f in self._faults.values():
            for k in out:
                out[k] += f[k]
        return out

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning (a no-op when already positioned inside that epoch)."""
        if epoch != self.epoch:
            self.epoch, self.batches = epoch, 0

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to resume the data stream without replay."""
        return {
            "epoch": self.epoch,
            "batches": self.batches,
            "restart": self.restart,
            "faults": self.faults,
            "layout": self._layout(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` output; counts as a restart.

        With a different layout (ranks, workers, batch size, mode, seed), the exact-epoch stream cannot
        be continued without repeats, so the rest of that epoch is skipped; a resampled stream carries
        on with the samples still owed to the epoch.
        """
        self.restart = int(state.get("restart", 0)) + 1
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])
        old = state.get("layout", {})
        if old and old != self._layout():
            if self.plan.exact and self.batches:
                log.warning("loader layout changed (%s → %s): skipping the rest of epoch %d to avoid "
                            "repeating samples", old, self._layout(), self.epoch)
                self.epoch, self.batches = self.epoch + 1, 0
            elif not self.plan.exact:
                seen = self.batches * old.get("batch_size", 1) * old.get("world_size", 1)
                per_step = self.plan.batch_size * self.plan.world_size
                self.batches = min(self.batches_per_epoch, -(-seen // per_step))
        if self.batches >= self.batches_per_epoch:
            self.epoch, self.batches = self.epoch + 1, 0

    def _layout(self) -> dict[str, Any]:
        p = self.plan
        return {
            "mode": "epoch" if p.exact else "resampled", "world_size": p.world_size, "workers": p.workers,
            "batch_size": p.batch_size, "seed": p.seed,
        }

    def close(self) -> None:
        """Stop the persistent worker processes now (otherwise they stop when the loader is collected)."""
        it = getattr(self._loader, "_iterator", None)
        shutdown = getattr(it, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        self._loader = None

    def __iter__(self) -> Iterator[Batch]:
        self.dataset.position.copy_(torch.tensor([self.epoch, self.restart, self.batches]))
        self._faults = {}
        pin = self.pin_memory and torch.cuda.is_available()
        workers = self.num_workers
        if workers == 0:  # in this process: no DataLoader between the stream and the trainer
            items: Iterator[Any] = iter(self.dataset)
        else:
            if self._loader is None:
                self._ledger.reset()  # new workers, new pools
                self._loader = DataLoader(
                    self.dataset,
                    batch_size=None,
                    collate_fn=_as_is,
                    num_workers=workers,
                    prefetch_factor=self.prefetch_factor,
                    persistent_workers=True,  # started once; each epoch re-runs their __iter__
                    pin_memory=pin,  # pins the one buffer
                )
            self._ledger.begin()
            items = iter(self._loader)
        for buf, layout, keys, faults, slot, lease in items:
            if layout is None:
                batch = buf.pin_memory() if pin else buf
            else:
                assert lease is not None
                batch = self._ledger.receive(buf, lease, layout, keys)
            del buf
            self._faults[slot] = faults
            total = sum(self.faults.values())
            if total > self.plan.error_budget:
                raise LoaderError(
                    f"rank {self.plan.rank}: {total} faults ({self.faults}) exceed "
                    f"loader.error_budget={self.plan.error_budget}; see the warnings logged by gfm.data"
                )
            self.batches += 1  # counted before the hand-out so a checkpoint taken now includes it
            yield batch
        if self.batches != self.batches_per_epoch:
            raise LoaderError(
                f"rank {self.plan.rank}: epoch {self.epoch} gave {self.batches} batches, expected "
                f"{self.batches_per_epoch}"
            )
        self.epoch, self.batches = self.epoch + 1, 0
