"""Pretrained models shipped inside the package, reachable by a short name (no download).

Each subfolder of this package is one exported model, exactly as ``gfm export`` writes it
(``config.json``, ``model.safetensors``, ``README.md``); the folder's name is the model's short name.
The registry finds models by looking at the subfolders (names starting with ``_`` or ``.``, such as
``__pycache__``, are not models); nothing lists them by hand. The folders travel as package data
(``pyproject.toml``: ``[tool.setuptools.package-data]``), so an installed wheel has them too.

**One version in the repository: replace it, never add a second.** The repository ships one small
pretrained encoder; a newer one replaces it (delete the old folder, add the new one, in one commit), so
clones and wheels never carry two. ``tests/test_pretrained.py`` fails when more than one model folder is
here. Weights are stored in bfloat16 (``gfm export SOURCE OUT --dtype bf16``) to stay within 15 MB; every
reader upcasts them into the model's fp32 parameters.

**Where the registry looks.** This package's folder; or the directory named by the environment
variable ``GFM_PRETRAINED_DIR`` when it is set (the tests point it at a temporary folder holding a tiny
generated model); or ``root=`` given to a function here, which wins over both.

**One rule for every model argument** (:func:`resolve`, used by ``gfm.from_pretrained``,
``encoder.weights`` of fine-tuning, ``gfm export SOURCE``, ``gfm predict/embed --model``):

1. an existing local path wins (a folder named like a shipped model in the working directory is used);
2. a string that looks like a path (it contains a path separator or starts with ``.``) and does not exist
   is an error naming it; it is never looked up as a short name (a ``pathlib.Path`` is always a path);
3. a shipped model's short name gives its folder;
4. anything else is an error that lists the shipped names.

``gfm.from_pretrained`` alone also takes a Hugging Face Hub id ``user/name`` when no such local path
exists and ``user`` is not a local directory (rule 2 yields to it there; ``runs/typo`` stays a path).
:func:`describe_pretrained` is what ``gfm models`` prints.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gfm.hub.base import CONFIG_NAME, WEIGHTS_NAME, HubError

#: environment variable naming another folder of shipped models (tests)
ENV_VAR = "GFM_PRETRAINED_DIR"


class PretrainedError(HubError):
    """A model argument that is neither an existing path nor a shipped model's short name."""


@dataclass(frozen=True)
class ModelRef:
    """Where a model argument points.

    Attributes:
        path: the local file or directory.
        name: the shipped model's short name when the argument was one, else None.
    """

    path: Path
    name: str | None = None
    hub: str | None = None

    def __str__(self) -> str:
        label = self.name or self.hub
        return f"{label} ({self.path})" if label else str(self.path)


def root_dir(root: str | Path | None = None) -> Path:
    """The folder holding the shipped models: ``root``, else ``$GFM_PRETRAINED_DIR``, else this package's folder."""
    if root is not None:
        return Path(root)
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else Path(__file__).resolve().parent


def list_pretrained(root: str | Path | None = None) -> list[str]:
    """Short names of the shipped models (their folder names), sorted."""
    folder = root_dir(root)
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))


def _known(root: str | Path | None) -> str:
    names = list_pretrained(root)
    return f"shipped: {', '.join(names)}" if names else f"no model is shipped in {root_dir(root)}"


def pretrained_path(name: str, root: str | Path | None = None) -> Path:
    """The folder of the shipped model ``name``.

    Raises:
        PretrainedError: no shipped model of that name (the message lists the known names), or its folder
            lacks ``config.json`` or ``model.safetensors``.
    """
    if name not in list_pretrained(root):
        raise PretrainedError(f"{name!r}: no such file or directory, and no shipped model of that name "
                              f"({_known(root)}; `gfm models` lists them)")
    path = root_dir(root) / name
    missing = [f for f in (CONFIG_NAME, WEIGHTS_NAME) if not (path / f).is_file()]
    if missing:
        raise PretrainedError(f"{path}: shipped model folder without {' and '.join(missing)} (an export written "
                              "by `gfm export` was expected)")
    return path


def looks_like_path(arg: str) -> bool:
    """True for a string a user means as a path: it holds a path separator or starts with ``.``."""
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return arg.startswith(".") or any(s in arg for s in seps)


def resolve(arg: str | os.PathLike[str], root: str | Path | None = None) -> ModelRef:
    """The local path behind a model or weights argument (the rule in the module docstring).

    A Hugging Face Hub id ``org/name[@revision]`` that is not a local path (:func:`gfm.hub.remote.parse_hub_id`)
    resolves to its snapshot in the Hugging Face cache, downloaded when needed (:func:`gfm.hub.remote.snapshot`).

    Raises:
        PretrainedError: a missing path-like argument (naming it), or an unknown short name (listing the
            shipped ones).
        HubError: a Hub id the Hub or the cache cannot give (naming the repository and revision).
    """
    path = Path(arg)
    if path.exists():
        return ModelRef(path)
    if path.is_symlink():
        raise PretrainedError(f"{arg}: a symbolic link to {os.readlink(path)}, which leads nowhere (no such target, "
                              "or a loop)")
    from gfm.hub.remote import parse_hub_id, snapshot

    ref = parse_hub_id(arg)
    if ref is not None:  # org/name[@revision]: its snapshot in the Hugging Face cache
        return ModelRef(snapshot(ref), hub=str(ref))
    if isinstance(arg, os.PathLike) or looks_like_path(str(arg)):
        raise PretrainedError(f"{arg}: no such file or directory")
    return ModelRef(pretrained_path(str(arg), root), str(arg))


# ------------------------------------------------------------------------------------------------
# What `gfm models` shows


@dataclass
class PretrainedInfo:
    """One shipped model as ``gfm models`` lists it (read from its folder and ``config.json``).

    Attributes:
        name: the short name.
        path: its folder.
        size_bytes: the folder's size on disk (every file).
        parameters: parameter count of the exported module (``architecture.parameters``).
        architecture: one line: variant, class, encoder width, depth, patch sizes, decoder depth.
        weights_dtype: how ``model.safetensors`` stores the weights (``float32`` or ``bfloat16``).
        step: optimizer steps of pretraining.
        corpus: the training summary's data section (source, samples, shards, sensors, dates, index).
        losses: the last logged losses (``loss``, ``loss_pos``, ``loss_obs``...).
        gfm_version: the gfm version that exported it.
    """

    name: str
    path: Path
    size_bytes: int
    parameters: int | None
    architecture: str
    weights_dtype: str
    step: int | None
    corpus: dict[str, Any] = field(default_factory=dict)
    losses: dict[str, float] = field(default_factory=dict)
    gfm_version: str | None = None

    def corpus_line(self) -> str:
        """The corpus in one line: samples, shards, sensors, dates, index."""
        c = self.corpus
        parts = [str(c.get("source") or "?")]
        if c.get("samples") is not None:
            parts.append(f"{c['samples']} samples")
        if isinstance(c.get("shards"), int):
            parts.append(f"{c['shards']} shards")
        if c.get("sensors"):
            parts.append("sensors " + ", ".join(c["sensors"]))
        if c.get("dates"):
            parts.append(" .. ".join(c["dates"]))
        where = c.get("index") or (c.get("shards") if isinstance(c.get("shards"), str) else None)
        return ", ".join(parts) + (f" ({where})" if where else "")


def architecture_line(config: dict[str, Any]) -> str:
    """One line from an exported ``config.json``: variant, class, encoder width and depth, patches, decoder."""
    arch = config.get("architecture") or {}
    enc = arch.get("encoder") or arch.get("hyperparameters") or {}  # an encoder-only export describes itself
    labels = (("attention", "attention"), ("embed_dim", "D"), ("depth", "depth"), ("patch_size", "p"),
              ("spectral_patch", "s"))
    shape = ", ".join(f"{label} {enc[key]}" for key, label in labels if enc.get(key) is not None)
    line = (f"{(config.get('model') or {}).get('name', '?')}: {arch.get('class', '?')}, encoder "
            f"{enc.get('class', '?')} ({shape})")
    decoder = (arch.get("hyperparameters") or {}).get("decoder_depth") if "encoder" in arch else None
    return line + (f", decoder depth {decoder}" if decoder is not None else "")


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def describe_pretrained(root: str | Path | None = None) -> list[PretrainedInfo]:
    """Every shipped model with its size, parameters, architecture and training summary (``gfm models``).

    Raises:
        PretrainedError: a model folder without its files, or a ``config.json`` that is not JSON.
    """
    out = []
    for name in list_pretrained(root):
        path = pretrained_path(name, root)
        try:
            config = json.loads((path / CONFIG_NAME).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise PretrainedError(f"{path / CONFIG_NAME}: cannot read it ({e})") from None
        training = config.get("training") or {}
        final = training.get("final_metrics") or {}
        out.append(PretrainedInfo(
            name=name,
            path=path,
            size_bytes=_size(path),
            parameters=(config.get("architecture") or {}).get("parameters"),
            architecture=architecture_line(config),
            weights_dtype=str(config.get("weights_dtype", "float32")),
            step=training.get("step"),
            corpus=dict(training.get("data") or {}),
            losses={k: float(v) for k, v in final.items() if k.startswith("loss") and isinstance(v, (int, float))},
            gfm_version=config.get("gfm_version"),
        ))
    return out
