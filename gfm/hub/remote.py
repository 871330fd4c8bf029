"""Models on the Hugging Face Hub: ``org/name[@revision]`` arguments and their local snapshots.

Every gfm program that takes a model (``gfm.from_pretrained``, ``finetune encoder.weights``, ``gfm export``,
``gfm predict``/``embed --model``) resolves a Hub id here into a local folder, then reads that folder
exactly as a local export. :func:`snapshot` downloads only what an export holds (``config.json``,
``model.safetensors``, the card and ``adapter/``) through huggingface_hub's cache (``HF_HOME``,
``cache_dir``), so a second use reads the cache. Offline (``HF_HUB_OFFLINE=1``, ``local_files_only``, or no
answer from the Hub) the cache alone serves; a model or revision it lacks is one line naming both.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from gfm.hub.base import ADAPTER_DIR, CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, HubError

#: the files of an export a snapshot fetches (an export's own ``adapter/`` included)
HUB_FILES = [CONFIG_NAME, WEIGHTS_NAME, CARD_NAME, f"{ADAPTER_DIR}/*"]

#: ``org/name`` or ``org/name@revision`` (a branch, tag or commit)
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?")


@dataclass(frozen=True)
class HubRef:
    """A model on the Hub: its repository id and revision (None: the default branch)."""

    repo: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo + (f"@{self.revision}" if self.revision else "")


def parse_hub_id(arg: str | os.PathLike[str]) -> HubRef | None:
    """The :class:`HubRef` an argument names, or None when it is (or may be) a local path.

    A ``pathlib.Path``, anything that exists here, anything starting with ``.``, ``/`` or ``~``, and
    ``dir/name`` where ``dir`` is a local directory (``runs/typo``: a mistyped path, never sent to the Hub)
    are paths.
    """
    if isinstance(arg, os.PathLike):
        return None
    text = str(arg)
    m = _HUB_ID.fullmatch(text)
    if m is None or text.startswith((".", "/", "~")) or os.path.exists(text):
        return None
    if os.path.isdir(m.group("repo").split("/")[0]):
        return None
    return HubRef(m.group("repo"), m.group("revision"))


def hub_offline_reason() -> str | None:
    """Why the Hub cannot be reached now (``HF_HUB_OFFLINE``, or no answer to one request), or None."""
    from huggingface_hub import constants, get_session

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        get_session().head(constants.ENDPOINT, timeout=5.0)
    except Exception as e:  # requests' or httpx's connection and timeout errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"{type(e).__name__}: {first}" if first else type(e).__name__
    return None


def snapshot(
    ref: HubRef,
    *,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
) -> Path:
    """The local folder of ``ref``'s export (downloaded once into the Hugging Face cache).

    Raises:
        HubError: one line naming the repository and revision: not in the cache while offline, no such
            repository or revision, no access (token), or not a gfm export (no ``config.json``).
    """
    from huggingface_hub import snapshot_download

    offline = "local_files_only=True" if local_files_only else hub_offline_reason()
    try:
        folder = Path(snapshot_download(
            repo_id=ref.repo, revision=ref.revision, allow_patterns=HUB_FILES, token=token, cache_dir=cache_dir,
            local_files_only=offline is not None, library_name="gfm",
        ))
    except Exception as e:  # huggingface_hub's LocalEntryNotFound, RepositoryNotFound, RevisionNotFound, HTTP errors
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        where = f"{ref}: no such local directory, and as a Hub model ({ref.repo} at revision {ref.revision or 'main'})"
        if offline is not None:
            raise HubError(f"{where} not in the local Hugging Face cache while the Hub cannot be reached "
                           f"({offline})") from None
        raise HubError(f"{where} the Hub gives none ({type(e).__name__}: {first})") from None
    if not (folder / CONFIG_NAME).is_file():
        raise HubError(f"{ref}: the snapshot has no {CONFIG_NAME}; not an exported gfm model")
    return folder
