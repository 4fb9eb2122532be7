"""A quick check of every training record before step 0, so bad data stops the run before the work starts.

The subject word is checked against the tokenizers (a whole single token, before the length limit) and every
image file's header and size, and, where Pillow can verify without decoding (PNG), its data; the decoding
itself happens in training, where a problem still names the file and line.
"""

from __future__ import annotations

from collections.abc import Sequence

from nested_attention.errors import NestedAttentionError
from nested_attention.images import check_image_file

from .data import EXAMPLE_LINE, DataError, Record, SampleBuilder


def check_records(records: Sequence[Record], builder: SampleBuilder, skip_bad: bool) -> tuple[list[Record], list[str]]:
    """The records that pass, and the messages of those that do not (skip_bad); otherwise the first bad one raises."""
    kept, problems = [], []
    for record in records:
        try:
            builder.check(record)
            check_image_file(record.target_image, f"Target image {record.target_image}")
            for path in record.subject_images:
                check_image_file(path, f"Subject image {path}")
        except NestedAttentionError as error:
            if not skip_bad:
                raise DataError(f"{record.source}: {error}") from None
            problems.append(f"{record.source}: {error}")
            continue
        kept.append(record)
    if not kept:
        raise DataError(
            f"No training record passes the checks ({len(problems)} bad; the first: {problems[0]}). Each line must "
            f"be one JSON object such as {EXAMPLE_LINE}."
        )
    return kept, problems
