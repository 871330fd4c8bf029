"""gfm's backbones in terratorch's ``BACKBONE_REGISTRY`` (terratorch is optional: imported only when asked).

terratorch (1.1.1) finds backbones by name in ``terratorch.registry.BACKBONE_REGISTRY``, a registry of
sources keyed by prefix; it reads no entry points, so a package joins it by calling ``register_source``.
:func:`register_terratorch` adds :class:`TerratorchBackbones` as the source ``gfm``; then terratorch's
``EncoderDecoderFactory`` builds ``backbone: gfm_less_vit_tiny`` (random weights) or ``gfm_gfm-tiny``
(a shipped pretrained model, read from the package: no download) as a
:class:`~gfm.model.backbone.GFMBackbone`, its ``backbone_*`` arguments (``bands`` or ``wavelengths``,
``out_indices``, ...) passed through. With terratorch's command line, call it from a module in the
folder that ``custom_modules_path`` names.

This module sits outside ``gfm.model`` because loading a pretrained model goes through ``gfm.hub``, which
the model package never imports.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

from gfm.model.backbone import GFMBackbone

#: the prefix gfm's backbones take in terratorch's registry: ``gfm_less_vit_tiny``, ``gfm_gfm-tiny``
PREFIX = "gfm"


@functools.cache
def _not_found() -> type[Exception]:
    """The error type for an unknown name: ``KeyError``, and ``InvalidModelError`` too where terratorch is installed.

    terratorch's registry protocol asks for ``KeyError``; since 1.1 its multi-source ``build`` catches
    ``InvalidModelError`` to try its next source.
    """
    try:
        from terratorch.utils import InvalidModelError
    except ImportError:
        return KeyError
    return type("UnknownBackbone", (KeyError, InvalidModelError), {})


class TerratorchBackbones:
    """gfm's backbones as a source of terratorch's ``BACKBONE_REGISTRY`` (its ``BuildableRegistry`` protocol).

    Names: the shipped pretrained models (``gfm-tiny``: their weights) and every registered variant
    (``less_vit_tiny``, ...: random weights; a ``hypermae_*`` variant gives its encoder). ``build``
    raises ``KeyError`` for any other name, which terratorch's lookup relies on to try its next source.
    """

    def names(self) -> list[str]:
        """Shipped model short names, then registered variants."""
        from gfm.model.registry import list_models
        from gfm.pretrained import list_pretrained

        return list_pretrained() + list_models()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __contains__(self, name: object) -> bool:
        return name in self.names()

    def build(self, name: str, *args: Any, pretrained: bool | None = None, **kwargs: Any) -> GFMBackbone:
        """The backbone ``name``; ``args`` and ``kwargs`` are :class:`GFMBackbone`'s (for a variant also its builder's).

        terratorch's ``backbone_pretrained`` arrives as ``pretrained``: a shipped model always brings its
        weights (False is refused), a variant has none (True is refused). Keyword arguments that
        ``forward`` does not know (terratorch's tasks pass the other fields of their batch) are ignored
        unless ``ignore_extra=False`` is passed.

        Raises:
            KeyError: not a gfm backbone (the message lists the known names); with terratorch installed
                also its ``InvalidModelError``, which terratorch 1.1 catches to try its next source.
            ValueError: ``pretrained`` contradicts the name.
        """
        from gfm.pretrained import list_pretrained

        if name not in self:
            raise _not_found()(f"no gfm backbone {name!r}; known: {', '.join(self.names())}")
        kwargs.setdefault("ignore_extra", True)
        shipped = list_pretrained()
        if name in shipped:
            if pretrained is False:
                raise ValueError(f"{name!r} is a pretrained model; for random weights name a variant "
                                 "(less_vit_tiny, ...)")
            from gfm.hub import from_pretrained

            return GFMBackbone(from_pretrained(name).encoder.train(), *args, **kwargs)
        if pretrained:
            raise ValueError(f"{name!r} is an architecture without weights; pretrained models: "
                             f"{', '.join(shipped) or 'none shipped'}")
        return GFMBackbone.create(name, *args, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def register_terratorch(prefix: str = PREFIX) -> Any:
    """Add :class:`TerratorchBackbones` to terratorch's ``BACKBONE_REGISTRY`` as ``prefix``, once; returns that source.

    Raises:
        ModuleNotFoundError: terratorch is not installed.
    """
    from terratorch.registry import BACKBONE_REGISTRY

    if prefix not in BACKBONE_REGISTRY.keys():
        BACKBONE_REGISTRY.register_source(prefix, TerratorchBackbones())
    return BACKBONE_REGISTRY[prefix]
