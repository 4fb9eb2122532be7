"""Local paths given by a user: telling a folder from a hub id, and checking that an output can be written."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import NestedAttentionError


def looks_like_local_path(name: str) -> bool:
    """Whether `name` can only be a local path, never a hub id ("owner/name"): absolute, ./ ../ ~, or deeper."""
    return Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") > 1


def check_writable(path: str | os.PathLike, what: str) -> None:
    """Refuse, before any work, an output `path` that cannot be created: under a regular file, or unwritable.

    Nothing is created: the nearest existing folder above `path` (or `path` itself) is checked by writing
    and removing a temporary file in it.
    """
    path = Path(path).expanduser().absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NestedAttentionError(
            f"{what} {path} cannot be created: {existing} is a file, not a folder; choose another path."
        )
    try:
        descriptor, probe = tempfile.mkstemp(dir=existing, prefix=".write-check-")
    except OSError as error:
        raise NestedAttentionError(
            f"{what} {path} cannot be written: the folder {existing} does not accept new files "
            f"({error.strerror or error}); choose a folder you can write to."
        ) from None
    os.close(descriptor)
    os.unlink(probe)
