"""Outputs gfm writes: whose a directory is, and which paths a command may write at all.

Nothing gfm did not write is overwritten or deleted. A directory a program creates (an export, a
fine-tuning run) gets a marker file, ``.gfm-output``, holding ``{"program": ..., "gfm_version": ...}``.
:func:`claim_dir` lets a program write into a directory only when it is new, empty, or holds that same
program's output (its marker; or, for directories written before markers existed, what the program's
own ``recognise`` finds, e.g. an export's ``config.json`` with ``"format": "gfm"``). Any other non-empty
directory is refused, even with ``overwrite``: ``overwrite`` only replaces what the program wrote.

No output may be or contain an input of the same command (``gfm export runs/x runs/x``, ``gfm export
runs/x/pretrain runs/x``, ``gfm predict s.tif --out s.tif``); an output *file* may not lie inside an input
directory either (``gfm embed shards --out shards/index.json``), and one command's output files must
differ from each other (:func:`check_files`). An output *directory* inside an input (``gfm export runs/x
runs/x/export``) is allowed: it only adds files, and whatever was there already is protected by the
marker rule. Paths are compared after resolving symlinks and ``..``.

Errors are :class:`OutputError` (a ``ValueError``), one line that starts with the refused path.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from gfm import __version__
from gfm.fileio import atomic_write

#: the marker file in every directory a gfm program created
MARKER = ".gfm-output"


class OutputError(ValueError):
    """gfm refuses to write an output path; the message starts with the path and says why.

    Attributes:
        path: the refused output.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")

    def __reduce__(self) -> tuple[type[OutputError], tuple[Path, str]]:  # picklable, e.g. across ranks
        return type(self), (self.path, self.reason)


class OutputExistsError(OutputError):
    """The output exists, was written by the same program, and overwriting was not asked for."""

    def __init__(self, path: str | Path, reason: str = "already exists (pass overwrite=True to replace it)") -> None:
        super().__init__(path, reason)


def write_marker(directory: str | Path, program: str) -> Path:
    """Mark ``directory`` as written by gfm ``program``; returns the marker's path."""
    doc = {"program": program, "gfm_version": __version__}
    return atomic_write(Path(directory) / MARKER, json.dumps(doc) + "\n")


def read_marker(directory: str | Path) -> dict[str, str] | None:
    """The marker of ``directory``, or None when it has none (or one that is not gfm's JSON object)."""
    path = Path(directory) / MARKER
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and isinstance(doc.get("program"), str) else None


def owner(directory: str | Path, recognise: Callable[[Path], bool] | None = None, program: str = "") -> str | None:
    """The gfm program that wrote ``directory``, or None.

    Its marker's program; else ``program`` when ``recognise`` finds that program's output written by a gfm
    version before markers; else None.
    """
    marker = read_marker(directory)
    if marker is not None:
        return marker["program"]
    if recognise is not None and recognise(Path(directory)):
        return program
    return None


def _resolved(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def check_sources(out: str | Path, sources: Iterable[str | Path | None], *, inside: bool = True) -> None:
    """Refuse an output that is, contains or (with ``inside``) lies inside one of ``sources`` (the inputs).

    Sources that do not exist as paths (a Hub id, a shipped model's short name, ``None``) are skipped.

    Raises:
        OutputError: naming the output and the input it overlaps.
    """
    target = _resolved(out)
    for source in sources:
        if source is None or str(source) == "" or not Path(source).exists():
            continue
        src = _resolved(source)
        if src == target:
            raise OutputError(out, f"is also an input of this command ({source}); write the output elsewhere")
        if target in src.parents:
            raise OutputError(out, f"contains an input of this command ({source}), which writing it would "
                                   "destroy; write the output elsewhere")
        if inside and src in target.parents:
            raise OutputError(out, f"lies inside an input of this command ({source}); write the output elsewhere")


def check_files(outputs: Mapping[str, str | Path | None], sources: Iterable[str | Path | None] = ()) -> None:
    """Refuse output files that coincide (after resolving), or that overlap an input (:func:`check_sources`).

    Args:
        outputs: ``{what: path}`` of one command, e.g. ``{"--out": ..., "--probabilities": ...}``; None
            entries (outputs not asked for) are skipped.
        sources: the command's inputs.

    Raises:
        OutputError: naming the path and both outputs, or the input.
    """
    seen: dict[Path, str] = {}
    named = [(what, path) for what, path in outputs.items() if path is not None and str(path) != ""]
    sources = list(sources)
    for what, path in named:
        key = _resolved(path)
        if key in seen:
            raise OutputError(path, f"given as both {seen[key]} and {what}; each output needs its own path")
        seen[key] = what
    for _, path in named:
        check_sources(path, sources)


def _shown(entries: list[str]) -> str:
    return ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")


def claim_dir(
    out: str | Path,
    program: str,
    *,
    overwrite: bool,
    sources: Iterable[str | Path | None] = (),
    recognise: Callable[[Path], bool] | None = None,
) -> bool:
    """Check that gfm ``program`` may write the directory ``out``; True when it holds that program's output.

    Allowed: a new or empty ``out``, or (with ``overwrite``) one holding ``program``'s own output: its
    :data:`MARKER`, or what ``recognise`` finds (output of a gfm version before markers). The caller
    writes :func:`write_marker` into the directory it creates.

    Raises:
        OutputError: ``out`` is or contains a source; is a file; is not empty and not ``program``'s (whatever
            ``overwrite`` says: a directory gfm did not write is never replaced).
        OutputExistsError: ``out`` holds ``program``'s output and ``overwrite`` is false.
    """
    path = Path(out)
    check_sources(path, sources, inside=False)  # a new directory inside an input deletes nothing
    if not path.exists() and not path.is_symlink():
        return False
    if not path.is_dir() or path.is_symlink():
        raise OutputError(path, "exists and is not a directory (a link or a file); use a new or empty directory")
    entries = sorted(p.name for p in path.iterdir())
    if not entries:
        return False
    who = owner(path, recognise, program)
    if who is None:
        raise OutputError(path, f"not empty ({_shown(entries)}) and not written by gfm {program} (no {MARKER}); "
                                "gfm never writes into or replaces such a directory, even with overwrite: use a new "
                                "or empty one")
    if who != program:
        raise OutputError(path, f"holds the output of gfm {who}, not of gfm {program}; use a new or empty directory")
    if not overwrite:
        raise OutputExistsError(path)
    return True
