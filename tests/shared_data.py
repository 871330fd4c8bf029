"""Where the real test data lives (``../shared/data`` beside the repository), and a skip marker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GFM_SHARED_DATA", REPO.parent / "shared" / "data"))

needs_shared_data = pytest.mark.skipif(
    not (SHARED_DATA / "README.md").exists(),
    reason=f"real satellite data not found at {SHARED_DATA} (a user's clone has no ../shared; set GFM_SHARED_DATA)",
)


def data(*parts: str) -> Path:
    """A path under the shared data folder."""
    return SHARED_DATA.joinpath(*parts)
