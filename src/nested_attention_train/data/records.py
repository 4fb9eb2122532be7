"""Training records: ``metadata.jsonl`` lines (subject image(s), prompt with its subject word, target image)
read and checked into :class:`Record`s; bad lines raise a :class:`DataError` naming ``metadata.jsonl:LINE``."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from nested_attention.errors import NestedAttentionError

METADATA_NAME = "metadata.jsonl"
EXAMPLE_LINE = (
    '{"subject": "faces/0001.png", "target": "images/0001.jpg", "prompt": "a photo of a person at the beach", '
    '"word": "person"}'
)


class DataError(NestedAttentionError):
    """Unusable training data; the message names the file and line (or shard and key) and what to do."""


@dataclass
class Record:
    """One training triplet, checked cheaply (fields, word in prompt, files exist) but not yet decoded."""

    subject_images: list[str]  # absolute paths (for WebDataset: entry names inside the sample)
    target_image: str
    prompt: str
    word: str
    source: str  # "path/metadata.jsonl:LINE" or "shard.tar:KEY", for messages
    target_mask: str | None = None  # where the subject is in the target (white), for `subject_loss_weight`


# ---------------------------------------------------------------------------------------------- metadata.jsonl


def read_metadata(
    root: str | Path, default_word: str | None = None, skip_bad: bool = False
) -> tuple[list[Record], list[str]]:
    """Read and check `root/metadata.jsonl` (or `root` itself if it is a .jsonl file).

    Returns the records and the messages of the lines skipped (only with skip_bad=True; otherwise the first bad
    line raises a DataError). Raises a DataError if no valid record remains.
    """
    path = _metadata_path(Path(root))
    folder = path.parent.resolve()
    records, problems = [], []
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            source = f"{path}:{number}"
            try:
                text = raw.decode("utf-8").lstrip("\ufeff").strip()
                if text:
                    records.append(_parse_line(text, folder, default_word, source))
            except UnicodeDecodeError as error:
                problems.append(_bad(f"{source}: the line is not UTF-8 text ({error.reason}); save the file as UTF-8.",
                                     skip_bad))
            except DataError as error:
                problems.append(_bad(str(error), skip_bad))
    if not records:
        detail = f"all {len(problems)} lines are bad; the first: {problems[0]}" if problems else "it has no records"
        raise DataError(
            f"{path} gives no training records: {detail}. Each line must be one JSON object such as {EXAMPLE_LINE}."
        )
    return records, problems


def _metadata_path(root: Path) -> Path:
    """The metadata.jsonl file for a folder or a .jsonl path."""
    path = root / METADATA_NAME if root.is_dir() else root
    if not path.is_file():
        raise DataError(
            f"No training metadata at {path}: expected a folder containing {METADATA_NAME} or the path of a .jsonl "
            f"file, one JSON object per line such as {EXAMPLE_LINE}."
        )
    return path


def _bad(message: str, skip_bad: bool) -> str:
    """Raise a bad line's message as a DataError, or (skip_bad) return it to be reported."""
    if not skip_bad:
        raise DataError(message) from None
    return message


def _parse_line(text: str, folder: Path, default_word: str | None, source: str) -> Record:
    """One metadata line -> a Record whose image paths exist; a DataError naming `source` otherwise."""
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{source}: not valid JSON ({error.msg} at column {error.colno}); each line must be one JSON object "
            f"such as {EXAMPLE_LINE}."
        ) from None
    if not isinstance(entry, dict):
        raise DataError(f"{source}: expected a JSON object such as {EXAMPLE_LINE}, got {type(entry).__name__}.")
    for name in ("subject", "target", "prompt"):
        if name not in entry:
            raise DataError(
                f'{source}: the required field "{name}" is missing; each line needs "subject", "target" and '
                f'"prompt", e.g. {EXAMPLE_LINE}.'
            )
    subjects = entry["subject"]
    if isinstance(subjects, str):
        subjects = [subjects]
    if not (isinstance(subjects, list) and subjects and all(isinstance(s, str) for s in subjects)):
        raise DataError(
            f'{source}: "subject" must be an image path or a non-empty list of image paths, got {entry["subject"]!r}.'
        )
    if not isinstance(entry["target"], str):
        raise DataError(f'{source}: "target" must be an image path (a string), got {entry["target"]!r}.')
    mask = entry.get("target_mask")
    if mask is not None and not isinstance(mask, str):
        raise DataError(f'{source}: "target_mask" must be an image path (a string), got {mask!r}.')
    prompt, word = prompt_and_word(entry, default_word, source)
    return Record(
        subject_images=[_image_path(s, folder, "subject", source) for s in subjects],
        target_image=_image_path(entry["target"], folder, "target", source),
        prompt=prompt,
        word=word,
        source=source,
        target_mask=None if mask is None else _image_path(mask, folder, "target_mask", source),
    )


def prompt_and_word(entry: dict, default_word: str | None, source: str) -> tuple[str, str]:
    """The prompt and subject word of a metadata line or shard sample, checked to agree."""
    prompt = entry.get("prompt")
    if not isinstance(prompt, str):
        raise DataError(f'{source}: "prompt" must be a string, got {prompt!r}.')
    word = entry.get("word", default_word)
    if word is None:
        raise DataError(
            f'{source}: no subject word: give "word" on the line (e.g. "word": "person") or a default word for '
            f"the whole dataset."
        )
    if not isinstance(word, str) or not word.strip():
        raise DataError(f'{source}: "word" must be a non-empty string such as "person", got {word!r}.')
    word = word.strip()
    if not re.search(rf"\b{re.escape(word)}\b", prompt, flags=re.IGNORECASE):
        raise DataError(
            f"{source}: the prompt {prompt!r} does not contain the subject word {word!r} as a whole word; add it "
            f"where the subject appears (e.g. 'a photo of a {word} at the beach') or fix the word."
        )
    return prompt, word


def _image_path(value: str, folder: Path, field: str, source: str) -> str:
    """The absolute path of an image named on a metadata line (relative to the line's folder); it must exist."""
    path = Path(value).expanduser()
    resolved = path if path.is_absolute() else folder / path
    if not resolved.is_file():
        raise DataError(
            f'{source}: "{field}" image {value} does not exist (looked in {resolved}); fix the path (relative '
            f"paths start at {folder}) or remove the line."
        )
    return str(resolved)


