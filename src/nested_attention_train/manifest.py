"""Folders that verify themselves: a manifest of every file's size and SHA-256, written last and synced to disk.

A folder counts as whole only if its manifest exists and every file it lists is there with its size and hash,
and nothing else has been added. Folders are removed by first renaming them out of the way (one atomic step),
so a removal cut short by a kill never leaves a half-deleted folder under its old name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

MANIFEST = "manifest.json"
TRASH_PREFIX = ".removing-"
_CHUNK = 1 << 20


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _fsync(path: Path) -> None:
    """Flush a file or a folder's entries to the disk (folders cannot be opened on Windows: skipped there)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except (IsADirectoryError, PermissionError):
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_manifest(folder: Path) -> None:
    """Sync every file under `folder` to disk, then write and sync the manifest listing their sizes and hashes."""
    files = _files(folder)
    for path in files:
        _fsync(path)
    entries = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256(p)} for p in files}
    manifest = folder / MANIFEST
    manifest.write_text(json.dumps({"files": entries}, indent=1, sort_keys=True) + "\n")
    _fsync(manifest)
    for sub in {folder, *(p.parent for p in files)}:
        _fsync(sub)


def damage(folder: Path) -> str | None:
    """None if `folder` is whole; otherwise what is wrong with it, naming the file (one clause, for messages)."""
    try:
        entries = json.loads((folder / MANIFEST).read_text())["files"]
        if not isinstance(entries, dict):
            raise TypeError
    except FileNotFoundError:
        return f"it has no {MANIFEST} (it was never finished, or predates manifests)"
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for name, entry in sorted(entries.items()):
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        try:
            size, expected = int(entry["size"]), str(entry["sha256"])
        except (KeyError, TypeError, ValueError):
            return f"{MANIFEST} is unreadable"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, not the {size} it was written with"
        if sha256(path) != expected:
            return f"{name} has changed since it was written (its SHA-256 differs)"
    present = {p.relative_to(folder).as_posix() for p in _files(folder) if not p.name.startswith(".")}
    extra = sorted(present - set(entries))  # hidden files (.DS_Store) are the file browser's, not a change
    if extra:
        return f"{extra[0]} was not part of it when it was written"
    return None


def _set_aside(folder: Path) -> Path:
    """Rename `folder` to a `.removing-*` name in one atomic step; returns the new path."""
    aside = folder.with_name(f"{TRASH_PREFIX}{folder.name}-{os.getpid()}")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(folder, aside)
    return aside


def remove_folder(folder: Path) -> None:
    """Remove `folder`: renamed aside first, so a kill half way leaves only a `.removing-*` folder."""
    aside = _set_aside(folder)
    _fsync(folder.parent)
    shutil.rmtree(aside)


def move_into_place(source: Path, target: Path) -> None:
    """Rename the finished folder `source` to `target`, replacing a folder there (set aside first, then removed)."""
    aside = _set_aside(target) if target.exists() else None
    os.replace(source, target)
    _fsync(target.parent)
    if aside is not None:
        shutil.rmtree(aside)
