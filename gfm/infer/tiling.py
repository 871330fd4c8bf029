"""Where tiles go and how overlapping predictions blend.

A scene of ``H × W`` pixels is covered by a fixed global grid of tiles: starts every ``stride`` pixels
along each axis, the last tile flush with the far edge, so every tile lies inside the scene (a scene
smaller than a tile is one tile of the scene's size). The output is written in blocks (``block × block``
pixels, aligned to the output file's internal tiles); each block gathers the global tiles that
intersect it, so its blended values are exactly those a whole-scene accumulation would give, while
memory holds one block and one batch of tiles, whatever the scene's size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Starts of tiles of size ``tile`` every ``stride`` pixels covering ``[0, length)``; the last is flush."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def blend_weights(height: int, width: int, overlap: int) -> np.ndarray:
    """``[height, width]`` float32 weights: 1 in the core, a raised-cosine taper over ``overlap`` pixels at each edge.

    The taper is evaluated at pixel centres, ``sin²(π (i + ½) / (2·overlap))``, so no weight is 0: a
    pixel that only one tile covers (at the scene border) still gets that tile's value after dividing by
    the summed weights. Where two tiles overlap by ``overlap`` pixels their weights sum to 1.
    """

    def ramp(n: int) -> np.ndarray:
        w = np.ones(n, dtype=np.float64)
        m = min(overlap, n // 2)
        if m > 0:
            i = np.arange(m)
            taper = np.sin(math.pi * (i + 0.5) / (2 * m)) ** 2
            w[:m] = taper
            w[n - m:] = taper[::-1]
        return w

    return np.outer(ramp(height), ramp(width)).astype(np.float32)


@dataclass(frozen=True)
class Layout:
    """The global tile grid of a scene and the output blocks.

    Attributes:
        height, width: the scene grid.
        tile_h, tile_w: tile size (the requested tile, or the scene's size when smaller).
        rows, cols: tile starts along each axis.
        block: output block side (a multiple of the output file's internal tile size).
    """

    height: int
    width: int
    tile_h: int
    tile_w: int
    rows: tuple[int, ...]
    cols: tuple[int, ...]
    block: int

    @classmethod
    def make(cls, height: int, width: int, tile: int, overlap: int, block: int) -> Layout:
        """The layout for a ``height × width`` scene: tiles of ``tile`` pixels overlapping by ``overlap``."""
        if tile < 1 or not 0 <= overlap < tile:
            raise ValueError(f"tile {tile} and overlap {overlap}: need tile >= 1 and 0 <= overlap < tile")
        th, tw = min(tile, height), min(tile, width)
        stride = tile - overlap
        return cls(height, width, th, tw, tuple(tile_starts(height, th, stride)),
                   tuple(tile_starts(width, tw, stride)), block)

    @property
    def tiles(self) -> int:
        """Number of tiles in the scene."""
        return len(self.rows) * len(self.cols)

    def blocks(self) -> Iterator[tuple[int, int, int, int]]:
        """Output blocks ``(row, col, height, width)`` in row-major order."""
        for r in range(0, self.height, self.block):
            for c in range(0, self.width, self.block):
                yield r, c, min(self.block, self.height - r), min(self.block, self.width - c)

    def tiles_in(self, r: int, c: int, h: int, w: int) -> list[tuple[int, int]]:
        """Tile origins ``(row, col)`` of the global grid that intersect the block at ``(r, c)`` of ``h × w``."""
        rows = [t for t in self.rows if t < r + h and t + self.tile_h > r]
        cols = [t for t in self.cols if t < c + w and t + self.tile_w > c]
        return [(tr, tc) for tr in rows for tc in cols]
