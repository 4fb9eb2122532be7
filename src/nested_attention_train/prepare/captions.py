"""Captions of the input photos: a sidecar ``NAME.txt`` beside ``NAME.jpg``, else a line of ``captions.jsonl`` at the
top of the input folder (``{"file_name": "sub/NAME.jpg", "caption": "..."}``, as Hugging Face's imagefolder has it),
else one a captioning model made in an earlier run, else an optional template such as ``"a photo of a {word}"``."""

from __future__ import annotations

import json
from pathlib import Path

from nested_attention.errors import NestedAttentionError

CAPTIONS_NAME = "captions.jsonl"
EXAMPLE = '{"file_name": "photos/0001.jpg", "caption": "a woman smiling on a beach"}'


class CaptionError(NestedAttentionError):
    """A caption file that cannot be used; the message names it."""


class Captions:
    """Finds the caption of each photo under `root` (paths relative to it)."""

    def __init__(self, root: Path, template: str | None = None, generated: dict[str, str] | None = None):
        self.root = root
        self.template = template
        self.listed = read_captions_jsonl(root / CAPTIONS_NAME) if (root / CAPTIONS_NAME).is_file() else {}
        self.generated = generated or {}

    def caption(self, relative: str, word: str) -> str | None:
        """The caption of photo `relative` (a POSIX path under root), or None if it has none; CaptionError if its
        sidecar file is unreadable."""
        sidecar = (self.root / relative).with_suffix(".txt")
        if sidecar.is_file():
            try:
                return sidecar.read_text(encoding="utf-8-sig").strip()
            except (OSError, UnicodeDecodeError) as error:
                raise CaptionError(
                    f"the caption file {sidecar} could not be read ({error.__class__.__name__}); save it as UTF-8 text "
                    f"with the caption on one line."
                ) from None
        if relative in self.listed:
            return self.listed[relative]
        if relative in self.generated:
            return self.generated[relative]
        return self.template.format(word=word) if self.template else None


def read_captions_jsonl(path: Path) -> dict[str, str]:
    """file name (relative POSIX path) -> caption, from a captions.jsonl; a bad line raises naming path:LINE."""
    captions: dict[str, str] = {}
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise CaptionError(f"{path} could not be read ({error.__class__.__name__}); save it as UTF-8 text.") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            entry = error
        name = entry.get("file_name", entry.get("file")) if isinstance(entry, dict) else None
        caption = entry.get("caption", entry.get("text")) if isinstance(entry, dict) else None
        if not (isinstance(name, str) and isinstance(caption, str)):
            raise CaptionError(
                f"{path}:{number}: expected one JSON object with \"file_name\" and \"caption\" strings such as "
                f"{EXAMPLE}, got {line.strip()[:80]!r}; fix or remove the line."
            )
        captions[Path(name).as_posix().removeprefix("./")] = caption.strip()
    return captions
