"""The report of a prepared folder: ``report.json`` (counts, each skipped photo's reason) and ``contact-sheet.png``
(a seeded sample of the prepared pairs, subject crop beside its target)."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from PIL import Image

from .settings import PrepareSettings

REPORT_NAME = "report.json"
SHEET_NAME = "contact-sheet.png"
SHEET_COUNT = 48  # pairs on the contact sheet
THUMB = 128
COLUMNS = 6


def write_report(out: Path, log: dict[str, dict], photos: int, settings: PrepareSettings,
                 shards: list[str] = ()) -> dict:
    """Count the log's outcomes into out/report.json and draw out/contact-sheet.png; returns the report.

    `photos`: how many photos the input folder holds now; `shards`: the shard files written (relative to out).
    """
    entries = [log[name] for name in sorted(log)]
    kept = [entry for entry in entries if entry.get("status") == "kept"]
    skipped = [entry for entry in entries if entry.get("status") == "skipped"]
    report = {
        "domain": settings.domain,
        "word": settings.word,
        "photos_found": photos,
        "photos_done": len(entries),
        "kept": len(kept),
        "skipped": dict(Counter(entry["reason"] for entry in skipped).most_common()),
        "notes": dict(Counter(note for entry in kept for note in entry.get("notes", ())).most_common()),
        "skipped_photos": [{key: entry[key] for key in ("file", "reason", "message")} for entry in skipped],
        "contact_sheet": contact_sheet(out, [entry["record"] for entry in kept]),
        "shards": list(shards),
    }
    (out / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def contact_sheet(out: Path, records: list[dict], count: int = SHEET_COUNT) -> str | None:
    """Draw up to `count` records (a sample seeded with 0) as subject | target cells; returns the file name."""
    if not records:
        return None
    sample = random.Random(0).sample(records, min(count, len(records)))
    columns = min(COLUMNS, len(sample))
    rows = -(-len(sample) // columns)
    sheet = Image.new("RGB", (columns * (2 * THUMB + 8), rows * (THUMB + 8)), (255, 255, 255))
    for index, record in enumerate(sample):
        left, top = (index % columns) * (2 * THUMB + 8), (index // columns) * (THUMB + 8)
        for offset, name in enumerate((record["subject"], record["target"])):
            with Image.open(out / name) as image:
                sheet.paste(image.convert("RGB").resize((THUMB, THUMB), Image.Resampling.LANCZOS),
                            (left + offset * THUMB, top))
    sheet.save(out / SHEET_NAME)
    return SHEET_NAME


def summary_lines(report: dict) -> list[str]:
    """The report in a few lines for the terminal."""
    lines = [f"{report['kept']} of {report['photos_done']} photos prepared as {report['word']} triplets"]
    for reason, count in report["skipped"].items():
        lines.append(f"  skipped {count}: {reason}")
    for note, count in report["notes"].items():
        lines.append(f"  note {count}: {note}")
    return lines
