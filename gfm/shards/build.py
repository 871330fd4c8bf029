"""The whole build: check every input, plan, write the shards (in parallel, resumably), merge the index.

Every scene is opened once before anything is written, so input errors surface first. The plan is
a pure function of the inputs and options; a re-run skips the shards whose sidecar exists, unless an
input they were built from has changed since (:func:`gfm.shards.plan.reconcile_plan`), and a build
split into parts (``BuildOptions.part``) writes only its share, to be merged by
:func:`gfm.shards.write_index` once every part has finished. Workers never outlive the build
(:mod:`gfm.shards.workers`); temporary files of a killed build are removed by the next
(:mod:`gfm.shards.outdir`).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from gfm.index import Index
from gfm.shards.errors import DatasetError, OptionError, ShardError
from gfm.shards.holdout import select_tiles
from gfm.shards.labels import class_table
from gfm.shards.merge import write_index
from gfm.shards.options import BuildOptions
from gfm.shards.outdir import check_writable, claim, remove_temporaries
from gfm.shards.plan import (
    fingerprint_inputs,
    make_plan,
    plan_doc,
    reconcile_plan,
    scene_digest,
    tile_origins,
    uncovered_fraction,
)
from gfm.shards.remote import redact
from gfm.shards.scene import open_scene
from gfm.shards.sidecar import ShardSummary, is_complete
from gfm.shards.spec import SceneSpec, check_specs
from gfm.shards.workers import WorkerPool
from gfm.shards.write import ShardJob, close_cached_scenes, write_shard

_logger = logging.getLogger("gfm.shards")


@dataclass(frozen=True)
class BuildReport:
    """What one :func:`build` call did.

    Attributes:
        planned_shards: shards in the whole plan (every part).
        part: ``(i, n)`` of this call.
        written: shards written by this call (a shard whose tiles were all dropped writes no tar).
        skipped_complete: shards of this part already complete from an earlier run.
        tiles_read: candidate tiles read by this call.
        samples: tiles written as samples.
        dropped_low_valid: tiles dropped below ``min_valid``.
        bytes: bytes of the tars written.
        seconds: wall time of reading and writing (after planning).
        index: the merged ``index.json`` when the build is not split into parts, else None.
        notices: what was noticed on the way (resampled files, skipped layers, resumed shards).
    """

    planned_shards: int
    part: tuple[int, int]
    written: int
    skipped_complete: int
    tiles_read: int
    samples: int
    dropped_low_valid: int
    bytes: int
    seconds: float
    index: Index | None
    notices: tuple[str, ...]

    @property
    def tiles_per_second(self) -> float:
        """Tiles read per second of writing."""
        return self.tiles_read / self.seconds if self.seconds > 0 else 0.0


def _worker(job: ShardJob) -> ShardSummary | ShardError:
    """Run in a worker process: a :class:`ShardError` comes back as a value, anything else is raised."""
    try:
        return write_shard(job)
    except ShardError as e:
        return e


def build(
    scenes: Sequence[SceneSpec], options: BuildOptions, *, log: Callable[[str], None] | None = None
) -> BuildReport:
    """Build (or resume) the shards of ``scenes`` into ``options.out``; merge ``index.json`` unless split.

    Args:
        scenes: the scenes to tile, in order (sample order follows it).
        options: tiling, filtering, sharding and parallelism.
        log: called with each notice (default: the ``gfm.shards`` logger at INFO).

    Returns:
        A :class:`BuildReport`.

    Raises:
        InputError: bad input (raised before any shard is written, except a file that turns out to be
            unreadable while its tiles are read).
        OptionError: no tile fits a scene, or no tile of a scene is valid enough.
        DatasetError: ``options.out`` holds shards of a different build, is not empty and not a gfm dataset,
            cannot be written, or a finished shard is unreadable.
    """
    notices: list[str] = []

    def emit(message: str) -> None:
        message = redact(message)  # notices name files: a URL's credentials stay out
        notices.append(message)
        (log or _log_info)(message)

    opts = options
    out = Path(opts.out)
    check_specs(scenes)
    specs = list(scenes)

    # Open every scene once up front: all input errors surface before anything is written.
    classes = class_table(specs)
    opened = []
    try:
        for spec in specs:
            scene = open_scene(spec, resampling=opts.resampling, classes=classes)
            opened.append(scene)
            for notice in [scene.grid_notice, *scene.notices] if scene.grid_notice else scene.notices:
                emit(notice)
        empty = [s for s in opened
                 if not tile_origins(s.grid.height, s.grid.width, opts.tile, opts.step, opts.edge)]
        if empty:
            sizes = ", ".join(f"{s.spec.id} ({s.grid.width}x{s.grid.height})" for s in empty)
            raise OptionError(f"no tile fits in scene(s) {sizes} at {{tile}}; {{edge}} writes partial tiles",
                              tile=opts.tile, edge="pad")
        for s in opened:
            lost = uncovered_fraction(s.grid.height, s.grid.width, opts.tile, opts.step, opts.edge)
            if lost > 0:
                emit(f"notice: scene {s.spec.id!r}: {lost:.0%} of its {s.grid.width}x{s.grid.height} pixels lie past "
                     "the last whole tile and are not written (edge 'pad' writes them as partial tiles)")
        selection = select_tiles(opened, opts)
        if opts.holdout > 0:
            emit(selection.notice(opts))
        plans = make_plan(opened, opts, selection.tiles)
        digests = [scene_digest(s, classes) for s in opened]
    finally:
        for s in opened:
            s.close()
    fingerprints = fingerprint_inputs(specs)

    check_writable(out)
    claim(out, [p.name for p in plans], force=opts.force)
    i, n = opts.part
    mine = [p for p in plans if p.index % n == i]
    stale_tmp = remove_temporaries(out, [p.name for p in mine], plan_files=n == 1)
    if stale_tmp:
        emit(f"notice: removed {len(stale_tmp)} temporary file(s) left by an interrupted build ({stale_tmp[0]}...)")
    for notice in reconcile_plan(out, specs, plan_doc(specs, opts, plans, fingerprints, digests, classes)):
        emit(notice)
    todo = [p for p in mine if not is_complete(out, p.name)]
    skipped = len(mine) - len(todo)
    if skipped:
        emit(f"resuming: {skipped} of {len(mine)} shards already complete")
    total_tiles = sum(len(p.tiles) for p in todo)
    t0 = time.perf_counter()
    results: list[ShardSummary] = []
    bar = tqdm(total=total_tiles, unit="tile", desc="shards", disable=not opts.progress, file=sys.stderr)
    jobs = [ShardJob(p, specs, opts, classes) for p in todo]
    try:
        if opts.workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                results.append(write_shard(job, on_tile=bar.update))
        else:
            with WorkerPool(min(opts.workers, len(jobs))) as pool:
                try:
                    for job, res in pool.imap_unordered(_worker, jobs):
                        if isinstance(res, ShardError):
                            raise res  # leaving the pool kills the other workers
                        results.append(res)
                        bar.update(len(job.plan.tiles))
                except BrokenProcessPool:
                    raise DatasetError(f"{out}: a worker process died while writing shards (killed, or out of "
                                       "memory?); finished shards are kept, re-run to resume") from None
    except BaseException:
        # workers are gone (killed by the pool); their unfinished shards stay under temporary names
        remove_temporaries(out, [p.name for p in todo], plan_files=False)
        raise
    finally:
        bar.close()
        close_cached_scenes()
    seconds = time.perf_counter() - t0
    index = None
    if n == 1:
        index = write_index(out)
        no_valid = [sid for sid, c in index.scenes.items() if c.samples == 0]
        if no_valid:
            raise OptionError(
                f"no tile of scene(s) {', '.join(no_valid)} has a valid fraction >= {{min_valid}}",
                min_valid=opts.min_valid,
            )
    return BuildReport(
        planned_shards=len(plans),
        part=(i, n),
        written=sum(1 for r in results if r.samples),
        skipped_complete=skipped,
        tiles_read=total_tiles,
        samples=sum(r.samples for r in results),
        dropped_low_valid=sum(r.dropped_low_valid for r in results),
        bytes=sum(r.bytes for r in results),
        seconds=seconds,
        index=index,
        notices=tuple(notices),
    )


def _log_info(message: str) -> None:
    _logger.info(message)
