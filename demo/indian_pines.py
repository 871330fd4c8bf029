"""The demo's data: the AVIRIS Indian Pines cube that the ``tensorly`` package ships, and its wavelengths.

The cube (145 x 145 x 200, 1992-06-12, 20 m) and its ground truth ship inside tensorly without the
wavelength list. :func:`aviris_indian_pines_wavelengths` gives the nominal AVIRIS band centres (linear
within each of the instrument's spectrometers, within ~11 nm of the calibrated list) with the 20
water-absorption bands of the "corrected" product removed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

# The 220 recorded channels as (first centre nm, spacing nm, count) runs, one per spectrometer stretch.
_AVIRIS_1992_RUNS = ((399.6, 9.88, 31), (687.3, 9.61, 63), (1284.1, 9.78, 95), (2260.2, 9.93, 2), (2232.2, 9.88, 29))
# 0-based channels removed in Indian_pines_corrected (water absorption): 104-108, 150-163, 220 (1-based).
_WATER_BANDS = set(range(103, 108)) | set(range(149, 163)) | {219}


class DemoDataError(RuntimeError):
    """The demo's dataset is not installed (the message says what to install)."""


def aviris_indian_pines_wavelengths() -> list[float]:
    """Nominal centre wavelengths (nm) of the 200 bands of Indian_pines_corrected."""
    centres = np.concatenate([start + step * np.arange(n) for start, step, n in _AVIRIS_1992_RUNS])
    return [round(float(c), 2) for i, c in enumerate(centres) if i not in _WATER_BANDS]


def tensorly_indian_pines() -> tuple[Path, Path]:
    """Paths of the Indian Pines cube and ground truth inside the installed tensorly package.

    Raises:
        DemoDataError: tensorly is not installed, or this version does not ship the cube.
    """
    spec = importlib.util.find_spec("tensorly")
    if spec is None or spec.origin is None:
        raise DemoDataError("needs the 'tensorly' package (pip install tensorly), which ships Indian Pines")
    base = Path(spec.origin).parent / "datasets" / "data"
    cube, gt = base / "Indian_pines_corrected.npy", base / "Indian_pines_gt.npy"
    if not cube.exists():
        raise DemoDataError(f"{cube} not found in this tensorly version")
    return cube, gt
