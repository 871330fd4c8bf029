"""``LoaderConfig``: the typed settings of the streaming loader, and ``build()`` for one rank.

This module imports the pipeline (and webdataset) only in :meth:`LoaderConfig.build`, so a run config
that nests a ``LoaderConfig`` loads, validates and prints without it.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from gfm.config import ConfigError

if TYPE_CHECKING:
    from gfm.data.pipeline import ShardLoader

log = logging.getLogger("gfm.data")

MODES = ("resampled", "epoch")
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def missing_local_shards(spec: str) -> str | None:
    """The first local path of shard ``spec`` that does not exist, or None.

    Only local paths are checked: URLs (``s3://``, ``https://``...) and ``pipe:`` commands are left to the
    loader. A ``::`` list and brace patterns are expanded (webdataset's rules); of a pattern's paths only the
    first and the last are looked at, so a spec naming 100k shards costs two ``stat`` calls per rank.
    """
    parts = [p for p in spec.split("::") if p]
    for part in parts:
        if part.startswith("file://"):
            part = part[len("file://") :]
        elif part.startswith("pipe:") or _SCHEME_RE.match(part):
            continue
        if "{" in part:
            from webdataset.shardlists import expand_urls

            paths = list(expand_urls(part))
            paths = paths[:1] + paths[-1:] if len(paths) > 1 else paths
        else:
            paths = [part]
        for path in paths:
            if not os.path.exists(path):
                return path
    return None


@dataclass
class LoaderConfig:
    """Settings of the streaming loader (all primitive, YAML-friendly).

    Attributes:
        shards: dataset directory, brace pattern, ``::`` list, list file (``.txt``) or URL (``s3://``,
            ``pipe:``...) — see :mod:`gfm.data.sources`.
        index: ``index.json`` location; default: in the dataset root / next to the first shard.
        norm_index: ``index.json`` whose per-band statistics normalise the samples; default: the dataset's
            own (``index``). Held-out shards are evaluated with the training set's statistics this way
            (``norm_index: <train>/index.json``) while their own index still lists their shards and counts.
        mode: ``"resampled"`` (shards drawn with replacement per worker; pretraining at scale) or
            ``"epoch"`` (every sample at most once per epoch, split by rank and worker).
        batch_size: samples per batch per rank.
        num_workers: DataLoader worker processes per rank (0 = read in the training process).
        crop_size: side of the random square crop in pixels; None/0 keeps the whole tile.
        shuffle_buffer: samples held per worker for shuffling. Memory per worker ≈ shuffle_buffer ×
            the mean sample size in the tars (``index.json`` bytes / samples), e.g. 1000 × 0.4 MB for
            13-band 128² uint16 tiles = 400 MB; 0 or 1 disables shuffling.
        seed: base seed; the stream is a function of (seed, rank, worker, epoch, restart count).
        hflip, vflip, rot90: random flips and quarter turns.
        oversample: resampled mode: ``{sensor: k}`` emits each tile holding that sensor ``k`` times, each with
            its own crop and flips (a small sensor in a large corpus, e.g. one hyperspectral scene beside
            thousands of Landsat tiles, is seen ``k`` times as often); a tile of several sensors takes the
            largest factor.
        obs_dropout: probability of dropping each observation (spectral dropout), same for a batch.
        time_dropout: probability of dropping all observations of one date (temporal dropout).
        min_obs: observations always kept by the dropouts.
        error_budget: corrupt samples + unreadable shards tolerated per rank per epoch; one more stops
            the run with :class:`~gfm.data.sources.LoaderError`.
        samples_per_epoch: resampled mode: samples per epoch over all ranks (default: the index total).
        replay_on_resume: resampled mode: on resume, regenerate the interrupted epoch's stream and drop the
            batches already consumed (as exact epochs always do), so a resumed run sees exactly the batches
            an uninterrupted one would. Costs re-reading and decoding up to one epoch per resume; the
            default (False) starts a fresh stream seeded with the restart count instead.
        pin_memory: pin batches when CUDA is present.
        prefetch_factor: batches each worker prepares ahead.
        allow_pipe: allow ``pipe:`` commands in ``shards`` and ``index`` (and in a list file's lines): they run
            a shell command. Off by default; names in an ``index.json`` are never commands either way.
        member_tables: read local shards through the member tables their ``index.json`` entries name (one
            ``pread`` per sample, checked against the tar; :mod:`gfm.data.reader`). False reads every
            shard as a tar stream, as ``pipe:`` commands, URLs and shards without a table always are.
    """

    shards: str = ""
    index: str | None = None
    norm_index: str | None = None
    mode: Literal["resampled", "epoch"] = "resampled"
    batch_size: int = 32
    num_workers: int = 2
    crop_size: int | None = None
    shuffle_buffer: int = 1000
    seed: int = 0
    hflip: bool = True
    vflip: bool = True
    rot90: bool = True
    oversample: dict[str, int] = field(default_factory=dict)
    obs_dropout: float = 0.0
    time_dropout: float = 0.0
    min_obs: int = 1
    error_budget: int = 100
    samples_per_epoch: int | None = None
    replay_on_resume: bool = False
    pin_memory: bool = True
    prefetch_factor: int = 2
    member_tables: bool = True
    allow_pipe: bool = False

    def validate(self) -> None:
        """Check values; raises :class:`~gfm.config.ConfigError` naming the first bad key (``mode: ...``).

        Paths are not checked here (:func:`missing_local_shards` does that for a run config); the run
        config prefixes the key with ``data.loader.``.
        """
        checks: list[tuple[bool, str]] = [
            (self.mode in MODES, f"mode: must be one of {list(MODES)}, got {self.mode!r}"),
            (self.batch_size >= 1, f"batch_size: must be >= 1, got {self.batch_size}"),
            (self.num_workers >= 0, f"num_workers: must be >= 0, got {self.num_workers}"),
            (self.crop_size is None or self.crop_size >= 0, f"crop_size: must be >= 0, got {self.crop_size}"),
            (self.shuffle_buffer >= 0, f"shuffle_buffer: must be >= 0, got {self.shuffle_buffer}"),
            (0.0 <= self.obs_dropout < 1.0, f"obs_dropout: must be in [0, 1), got {self.obs_dropout}"),
            (0.0 <= self.time_dropout < 1.0, f"time_dropout: must be in [0, 1), got {self.time_dropout}"),
            (self.min_obs >= 1, f"min_obs: must be >= 1, got {self.min_obs}"),
            (self.error_budget >= 0, f"error_budget: must be >= 0, got {self.error_budget}"),
            (
                self.samples_per_epoch is None or self.samples_per_epoch >= 1,
                f"samples_per_epoch: must be >= 1, got {self.samples_per_epoch}",
            ),
            (self.prefetch_factor >= 1, f"prefetch_factor: must be >= 1, got {self.prefetch_factor}"),
            (all(isinstance(k, int) and k >= 1 for k in self.oversample.values()),
             f"oversample: factors must be integers >= 1, got {self.oversample}"),
            (not self.oversample or self.mode == "resampled",
             "oversample: only in mode 'resampled' (exact epochs count each tile once)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(msg)

    def build(self, rank: int | None = None, world_size: int | None = None) -> ShardLoader:
        """The loader of one rank.

        Args:
            rank: this process's rank; None reads ``RANK`` (torchrun), else 0.
            world_size: number of ranks; None reads ``WORLD_SIZE``, else 1. No process group is needed
                or created.

        Raises:
            ConfigError: a bad value (``loader.<key>: ...``).
            LoaderError: no shards or index; counts that leave a (rank, worker) slot without a full
                batch (the message gives samples, shards, ranks and workers); crops larger than tiles.
        """
        from gfm.data.pipeline import Plan, ShardLoader
        from gfm.data.sources import LoaderError, load_index, resolve_shards
        from gfm.data.transforms import Augment

        try:
            self.validate()
        except ConfigError as e:
            raise ConfigError(f"loader.{e}") from None
        if world_size is None:
            world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if rank is None:
            rank = int(os.environ.get("RANK", "0"))
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        shards = resolve_shards(self.shards, self.index, allow_pipe=self.allow_pipe)
        idx = shards.index
        workers = max(1, self.num_workers)
        slots = world_size * workers
        tile = idx.raw.get("tile_size")
        if self.crop_size and isinstance(tile, int) and tile < self.crop_size:
            raise LoaderError(f"loader.crop_size={self.crop_size} exceeds the tiles ({tile} px) of {idx.url}")
        if idx.raw.get("missing_shards"):
            log.warning("%s lists missing shards: %s", idx.url, idx.raw["missing_shards"])
        norm = load_index(self.norm_index, allow_pipe=self.allow_pipe) if self.norm_index else idx
        for key in idx.raw.get("bands", {}):  # fail at start-up, not at the first batch
            sensor, _, band = key.partition("/")
            norm.norm(sensor, band)
        exact = self.mode == "epoch"
        if exact:
            unknown = [u for u, c in zip(shards.urls, shards.counts) if c is None]
            if unknown:
                raise LoaderError(
                    f"exact epochs need sample counts, but {idx.url} does not list {len(unknown)} of the "
                    f"shards (first: {unknown[0]})"
                )
            slot_samples = shards.total // slots
            per_slot = slot_samples // self.batch_size
            what = (
                f"{shards.total} samples in {len(shards.urls)} shards over {world_size} ranks × {workers} "
                f"workers = {slot_samples} samples per worker"
            )
        else:
            wanted = self.samples_per_epoch or idx.samples
            slot_samples = 0
            per_slot = wanted // (slots * self.batch_size)
            what = f"samples_per_epoch={wanted} over {world_size} ranks × {workers} workers"
        if per_slot < 1:
            hint = " or mode='resampled'" if exact else ""
            if not exact and self.samples_per_epoch is None:
                hint += (f", or a larger samples_per_epoch (default: the index's {idx.samples} samples"
                         + (", not counting oversample" if self.oversample else "") + ")")
            raise LoaderError(
                f"rank {rank} would get no full batch: {what}, batch_size={self.batch_size}; use fewer "
                f"ranks or workers, a smaller batch, more data{hint}"
            )
        if exact:
            dropped = shards.total - per_slot * self.batch_size * slots
            log.info("exact epoch: %d batches per rank; %d of %d samples left out per epoch (changes "
                     "with the epoch)", per_slot * workers, dropped, shards.total)
        if self.shuffle_buffer > 1 and idx.mean_sample_bytes:
            log.info("shuffle buffer: ~%.0f MB per worker", self.shuffle_buffer * idx.mean_sample_bytes / 1e6)
        plan = Plan(
            shards=shards,
            norm=norm,
            rank=rank,
            world_size=world_size,
            workers=workers,
            exact=exact,
            replay=exact or self.replay_on_resume,
            batch_size=self.batch_size,
            per_slot=per_slot,
            slot_samples=slot_samples,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            augment=Augment(self.crop_size or None, self.hflip, self.vflip, self.rot90),
            obs_dropout=self.obs_dropout,
            time_dropout=self.time_dropout,
            min_obs=self.min_obs,
            error_budget=self.error_budget,
            oversample=dict(self.oversample),
            member_tables=self.member_tables,
            pool=self.prefetch_factor + 3,  # queued + being made + the trainer's current and previous batch
        )
        return ShardLoader(plan, num_workers=self.num_workers, pin_memory=self.pin_memory,
                           prefetch_factor=self.prefetch_factor)
