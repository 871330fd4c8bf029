"""Errors of the shard writer: one line naming the file or value and what was expected.

Where the fix is to set an option, the message names it through a placeholder (``{tile}``,
``{sensor}``...) that :meth:`ShardError.render` fills in: as the Python field
(``BuildOptions.tile=2000``, ``FileSpec.sensor``) in ``str(error)``, and as a command-line flag
(``--tile 2000``, ``--sensor``) where the ``gfm shards`` program prints it. The library never phrases
a message in terms of flags. URLs in messages are redacted (:func:`gfm.shards.remote.redact`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from gfm.shards.remote import redact

#: Option placeholder → the dataclass field it stands for.
FIELDS: dict[str, str] = {
    "tile": "BuildOptions.tile",
    "stride": "BuildOptions.stride",
    "min_valid": "BuildOptions.min_valid",
    "shard_size": "BuildOptions.shard_size",
    "workers": "BuildOptions.workers",
    "part": "BuildOptions.part",
    "resampling": "BuildOptions.resampling",
    "edge": "BuildOptions.edge",
    "force": "BuildOptions.force",
    "name": "BuildOptions.name",
    "holdout": "BuildOptions.holdout",
    "split": "BuildOptions.split",
    "crs": "SceneSpec.crs",
    "gsd": "SceneSpec.gsd",
    "label_field": "SceneSpec.label_field",
    "sensor": "FileSpec.sensor",
    "bands": "FileSpec.bands",
    "cube_key": "FileSpec.cube_key",
    "wavelengths": "FileSpec.wavelengths",
    "label_key": "SceneSpec.label_key",
    "date": "DateSpec.date",
    "assets": "load_stac(assets=...)",
}


def python_name(option: str, value: Any) -> str:
    """``BuildOptions.tile=2000`` (or just the field when there is no value to show)."""
    name = FIELDS.get(option, option)
    return name if value is None else f"{name}={value!r}"


class ShardError(Exception):
    """A problem with a shard build's input, options or output directory.

    Args:
        message: one line naming the file or value and what was expected; may hold ``{option}``
            placeholders for the options in ``options``.
        options: placeholder name (a key of :data:`FIELDS`) → the value to show, or None.
    """

    def __init__(self, message: str, **options: Any) -> None:
        self.template = message
        self.options: Mapping[str, Any] = options
        super().__init__(self.render(python_name))

    def render(self, name: Callable[[str, Any], str]) -> str:
        """The message with each option placeholder spelt by ``name(option, value)``."""
        text = self.template
        for option, value in self.options.items():  # str.replace, not format: paths may hold braces
            text = text.replace("{" + option + "}", name(option, value))
        return redact(text)  # a URL named in a message never shows its credentials

    def __reduce__(self) -> tuple[Any, ...]:
        # keep the options when an error crosses a process boundary (worker → parent)
        return (_restore, (type(self), self.template, dict(self.options)))


def _restore(cls: type[ShardError], template: str, options: dict[str, Any]) -> ShardError:
    return cls(template, **options)


class InputError(ShardError):
    """An input file, scene, band or sensor description that is wrong or cannot be read."""


class OptionError(ShardError):
    """An option value out of range, or options that leave nothing to write for the given scenes."""


class DatasetError(ShardError):
    """The output directory's state: shards of another build, a missing or unreadable shard or sidecar."""
