"""The options of one build: everything that decides which tiles land in which shard, and how."""

from __future__ import annotations

import re
from dataclasses import dataclass

from gfm.shards.errors import OptionError

#: Resampling methods for bands not on the scene grid (labels and quality layers always use nearest).
RESAMPLING: tuple[str, ...] = ("nearest", "bilinear", "cubic", "average", "lanczos", "mode")

#: What to do with the partial tiles at a scene's right and bottom edges (see :class:`BuildOptions`).
EDGES: tuple[str, ...] = ("full", "pad")

#: Which side of the hold-out rule a build writes (see :mod:`gfm.shards.holdout`).
SPLITS: tuple[str, ...] = ("train", "heldout")

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+\-]*")


@dataclass
class BuildOptions:
    """Options of one build.

    Attributes:
        out: output directory (shards, sidecars, ``build.json`` and ``index.json``).
        tile: tile size in pixels.
        stride: tile stride in pixels (None: the tile size, no overlap).
        min_valid: tiles whose valid fraction is below this are dropped (and counted).
        shard_size: target shard size in bytes (estimated from tile size, bands and dtype).
        workers: parallel worker processes.
        part: ``(i, n)``: build only the shards whose index is ``i`` modulo ``n`` (several machines);
            ``index.json`` is written only when ``n == 1``, else merge with :func:`gfm.shards.write_index`.
        name: shard file name prefix (``<name>-<index:06d>.tar``).
        resampling: one of :data:`RESAMPLING`.
        progress: show a progress bar on stderr.
        edge: ``"full"``: only whole tiles (pixels past the last whole tile of a row or column are not
            written; a notice says how many); ``"pad"``: partial tiles at the right and bottom edges are
            written full-size with the part outside the scene marked invalid (it counts against
            ``min_valid``).
        force: write into an existing directory that is not a gfm dataset (its files are never overwritten).
        holdout: fraction of each scene's tiles held out (0: none), chosen by a stable hash of the tile's
            scene id and position (:mod:`gfm.shards.holdout`).
        split: with ``holdout``, the side this build writes: ``"train"`` (every tile but the held-out ones
            and the tiles overlapping them on the ground) or ``"heldout"`` (the held-out tiles only).

    Raises:
        OptionError: a value out of range, naming the field and what was expected.
    """

    out: str
    tile: int = 64
    stride: int | None = None
    min_valid: float = 0.5
    shard_size: int = 256 * 1024**2
    workers: int = 1
    part: tuple[int, int] = (0, 1)
    name: str = "gfm"
    resampling: str = "bilinear"
    progress: bool = True
    edge: str = "full"
    force: bool = False
    holdout: float = 0.0
    split: str = "train"

    def __post_init__(self) -> None:
        if self.tile < 1:
            raise OptionError("{tile}: expected a positive number of pixels", tile=self.tile)
        if self.stride is not None and self.stride < 1:
            raise OptionError("{stride}: expected a positive number of pixels", stride=self.stride)
        if not 0.0 <= self.min_valid <= 1.0:
            raise OptionError("{min_valid}: expected a fraction in [0, 1]", min_valid=self.min_valid)
        if self.shard_size < 1:
            raise OptionError("{shard_size}: expected a positive number of bytes", shard_size=self.shard_size)
        i, n = self.part
        if not (n >= 1 and 0 <= i < n):
            raise OptionError("{part}: expected i/n with 0 <= i < n", part=self.part)
        if self.resampling not in RESAMPLING:
            raise OptionError(f"{{resampling}}: expected one of {', '.join(RESAMPLING)}", resampling=self.resampling)
        if self.edge not in EDGES:
            raise OptionError(f"{{edge}}: expected one of {', '.join(EDGES)}", edge=self.edge)
        if not 0.0 <= self.holdout < 1.0:
            raise OptionError("{holdout}: expected a fraction in [0, 1)", holdout=self.holdout)
        if self.split not in SPLITS:
            raise OptionError(f"{{split}}: expected one of {', '.join(SPLITS)}", split=self.split)
        if self.split == "heldout" and self.holdout == 0:
            raise OptionError("{split}: nothing is held out; set {holdout} to a fraction > 0",
                              split=self.split, holdout=None)
        if not _NAME.fullmatch(self.name):
            raise OptionError("{name}: expected a plain file name prefix (letters, digits, '_', '-', '.', '+')",
                              name=self.name)

    @property
    def step(self) -> int:
        """Tile stride in pixels (the tile size when no stride is given)."""
        return self.stride or self.tile
