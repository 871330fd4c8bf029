"""gfm: pretrain and adapt geospatial foundation models on any sensor.

``gfm.from_pretrained(DIR_OR_REPO_OR_NAME)`` loads an exported model (:func:`gfm.hub.from_pretrained`), or
a model shipped inside the package by its short name (:mod:`gfm.pretrained`); it is imported on first use,
so ``import gfm`` stays light. ``gfm.predict(MODEL, SCENE, ...)`` predicts a class map over a scene (files,
URLs or a numpy array ``[bands, H, W]`` with its wavelengths), as arrays or written as a COG
(:func:`gfm.infer.api.predict`, what ``gfm predict`` runs); it too is imported on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "from_pretrained", "predict"]


def __getattr__(name: str) -> Any:
    if name == "from_pretrained":
        from gfm.hub import from_pretrained

        return from_pretrained
    if name == "predict":
        from gfm.infer.api import predict

        return predict
    raise AttributeError(f"module 'gfm' has no attribute {name!r}")
