"""`nested-attention data prepare`: a folder of photos -> a training folder (metadata.jsonl, subjects/, targets/).

The run reads each photo once in this process (:class:`intake.Intake`: its SHA-256 finds identical files and names
the outputs; its caption is found or made, and rewritten) and hands the rest to `workers` processes
(:func:`process.prepare_one`). Every outcome is appended to ``prepare-log.jsonl`` as it comes, so a second run into
the same folder skips the photos already done (same path, same content) and goes on with the rest;
``metadata.jsonl`` and the report are written again from the whole log at the end of each run.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from tqdm.auto import tqdm

from nested_attention.errors import NestedAttentionError
from nested_attention_train.data import METADATA_NAME, read_metadata, write_shards

from .captioner import GENERATED_NAME, Captioner, read_generated
from .captions import Captions
from .intake import Intake
from .process import ERRORS, Task, prepare_one
from .report import write_report
from .settings import IMAGE_SUFFIXES, PrepareSettings
from .words import WordReplacer

LOG_NAME = "prepare-log.jsonl"
SETTINGS_NAME = "prepare.json"
SHARDS = "shards/%06d.tar"


def prepare(
    in_dir: str | Path,
    out_dir: str | Path,
    settings: PrepareSettings,
    workers: int = 1,
    strict: bool = False,
    shards: bool = False,
    shard_size: int = 1000,
    progress: bool = True,
    caption_batch: int = 8,
) -> dict:
    """Prepare the photos under `in_dir` into `out_dir`; returns the report (also in out_dir/report.json).

    strict: stop at the first unusable input (an unreadable photo, a missing caption or one without a subject
    word) with its sentence, instead of counting it. shards: also write out_dir/shards/*.tar (WebDataset).
    caption_batch: photos per batch of the captioning model (settings.caption_model).
    Raises a NestedAttentionError for an unusable folder and when no photo gives a training record.
    """
    source, out = _input_folder(in_dir), Path(out_dir).resolve()
    excluded = [out] + ([Path(settings.masks)] if settings.masks else [])
    photos = scan(source, excluded)
    if not photos:
        raise NestedAttentionError(
            f"{source} holds no photos: expected image files ({', '.join(IMAGE_SUFFIXES)}) in it or its sub-folders; "
            f"check the folder."
        )
    _claim_output(out, settings)
    log = read_log(out / LOG_NAME)
    captioner = functools.partial(Captioner, settings.caption_model, settings.caption_prompt) \
        if settings.caption_model else None  # loaded when a photo without a caption comes
    cache = out / GENERATED_NAME
    captions = Captions(source, settings.caption_template, read_generated(cache))
    intake = Intake(source, log, captions, WordReplacer(settings.word, settings.subject_words), captioner, cache,
                    caption_batch)
    with (out / LOG_NAME).open("a", encoding="utf-8") as sink:
        def record(outcome: dict) -> None:
            sink.write(json.dumps(outcome) + "\n")
            sink.flush()
            log[outcome["file"]] = outcome
            if strict and outcome.get("reason") in ERRORS:
                raise NestedAttentionError(outcome["message"])

        tasks = []
        for item in intake.items(photos, progress):
            if isinstance(item, tuple):
                tasks.append(item)
            else:
                record(item)
        stamps = {task.relative: stamp for task, stamp in tasks}
        work = [task for task, _ in tasks]
        outcomes = _run(work, settings, out, workers)
        try:
            for outcome in tqdm(outcomes, total=len(work), desc=f"preparing {settings.domain}s", disable=not progress):
                record({**outcome, **stamps[outcome["file"]]})
        finally:
            outcomes.close()  # ends the worker processes at once when --strict stops the run
    records = _write_metadata(out, log)
    shard_files = _write_shards(out, settings.word, shard_size) if shards and records else []
    report = write_report(out, log, len(photos), settings, shard_files)
    if not records:
        raise NestedAttentionError(
            f"None of the {len(photos)} photos in {source} gave a training record ({_reasons(report)}); see "
            f"{out / 'report.json'} for each photo's reason."
        )
    return report


def scan(root: Path, excluded: Iterable[Path] = ()) -> list[str]:
    """The image files under `root` (POSIX paths relative to it, sorted), leaving out hidden and excluded folders."""
    excluded = [path.resolve() for path in excluded]
    found = []
    for folder, names, files in os.walk(root):
        here = Path(folder).resolve()
        names[:] = sorted(n for n in names if not n.startswith(".") and (here / n).resolve() not in excluded)
        found += [(here / f).relative_to(root.resolve()).as_posix() for f in files
                  if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES)]
    return sorted(found)


def read_log(path: Path) -> dict[str, dict]:
    """The last outcome of each photo in a prepare log (a line cut by an interruption is ignored)."""
    log: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and isinstance(entry.get("file"), str):
                log[entry["file"]] = entry
    return log


def _input_folder(in_dir: str | Path) -> Path:
    source = Path(in_dir).expanduser()
    if not source.is_dir():
        raise NestedAttentionError(
            f"The input {source} is not a folder; give the folder that holds the photos (and their captions)."
        )
    return source.resolve()


def _claim_output(out: Path, settings: PrepareSettings) -> None:
    """Make `out` a prepared folder with these settings: new or empty, or made by an earlier run with the same."""
    saved = out / SETTINGS_NAME
    if saved.is_file():
        try:
            earlier = PrepareSettings.from_json(json.loads(saved.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, TypeError, NestedAttentionError):
            earlier = None
        if earlier != settings:
            raise NestedAttentionError(
                f"{out} was prepared with other settings ({saved}); run again with the same settings to go on, or "
                f"give a new output folder."
            )
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise NestedAttentionError(
            f"The output {out} exists and is not a folder made by data prepare; give a new or empty folder."
        )
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(settings.as_json(), indent=2) + "\n", encoding="utf-8")


def _run(tasks: list[Task], settings: PrepareSettings, out: Path, workers: int) -> Iterator[dict]:
    """The outcomes of `tasks` (in any order), from `workers` processes (this one for 1)."""
    work = functools.partial(prepare_one, settings=settings, out=str(out))
    if workers <= 1 or len(tasks) <= 1:
        yield from map(work, tasks)
        return
    with multiprocessing.Pool(min(workers, len(tasks))) as pool:
        yield from pool.imap_unordered(work, tasks, chunksize=4)


def _write_metadata(out: Path, log: dict[str, dict]) -> list[dict]:
    """metadata.jsonl from the log's kept photos (sorted by photo), written atomically; returns its records."""
    records = [log[name]["record"] for name in sorted(log) if log[name].get("status") == "kept"]
    partial = out / f".{METADATA_NAME}.part"
    partial.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    os.replace(partial, out / METADATA_NAME)
    return records


def _write_shards(out: Path, word: str, shard_size: int) -> list[str]:
    """The prepared records as WebDataset shards in out/shards/ (written anew each run)."""
    folder = out / Path(SHARDS).parent
    for old in folder.glob("*.tar") if folder.is_dir() else ():
        old.unlink()
    records, _ = read_metadata(out, default_word=word)
    return [Path(path).relative_to(out).as_posix() for path in write_shards(records, str(out / SHARDS), shard_size)]


def _reasons(report: dict) -> str:
    counts = report["skipped"]
    return ", ".join(f"{reason}: {count}" for reason, count in counts.items()) or "no photo was processed"
