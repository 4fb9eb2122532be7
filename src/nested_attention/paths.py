"""Local paths given by a user: telling a folder from a hub id, and checking that an output can be written."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import NestedAttentionError


def looks_like_local_path(name: str) -> bool:
    """Whether `name` can only be a local path, never a hub id ("owner/name"): absolute, ./ ../ ~, or deeper."""
    return Path(name).is_absolute() or name.startswith((".", "~")) or name.count("/") > 1


def hub_or_local_folder(name: str | os.PathLike, what: str, allow_patterns: list[str], cache_dir=None,
                        revision: str | None = None) -> Path:
    """The local folder `name`, or the snapshot of hub repository `name` ("owner/name": downloaded once, then read
    from the cache, also offline). One sentence (NestedAttentionError) when it is neither."""
    local = Path(name).expanduser()
    if local.is_dir() or looks_like_local_path(str(name)) or str(name).count("/") != 1:
        return local
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return Path(snapshot_download(str(name), revision=revision, cache_dir=cache_dir, allow_patterns=allow_patterns))
    except (HfHubHTTPError, OSError, ValueError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")
        raise NestedAttentionError(
            f"{what} {str(name)!r} is no local folder and could not be fetched as a hub repository ({reason}); give "
            f"an existing folder, or a hub id (owner/name) that is reachable or already cached."
        ) from None


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
