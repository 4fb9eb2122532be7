"""What a run does with each photo before the workers see it: done already, a duplicate, without a usable caption,
or a :class:`Task` with its rewritten prompt. Runs in the main process, which reads each new photo once."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

from tqdm.auto import tqdm

from .captioner import Captioner, generate_captions
from .captions import CaptionError, Captions
from .process import Task, skipped
from .words import WordReplacer


class Intake:
    """Turns the photos under `source` into tasks or outcomes, given the log of the runs before (`log`)."""

    def __init__(self, source: Path, log: dict[str, dict], captions: Captions, replace: WordReplacer,
                 captioner: Callable[[], Captioner] | None = None, cache: Path | None = None, caption_batch: int = 8):
        """`captioner` makes the captioning model when the first photo without a caption needs it; its captions
        are appended to `cache`."""
        self.source, self.log, self.captions, self.replace = source, log, captions, replace
        self.captioner, self.cache, self.caption_batch = captioner, cache, caption_batch
        self.hashes = {entry["sha256"]: name for name, entry in log.items()
                       if "sha256" in entry and entry.get("reason") != "duplicate"}

    def items(self, photos: list[str], progress: bool = True) -> Iterator[dict | tuple[Task, dict]]:
        """For each photo not done yet: (Task, stamp) to prepare, or its outcome (skipped, or done with a new stamp).

        Photos without a caption go to the captioner (when there is one) after all the others were read.
        """
        uncaptioned: dict[str, dict] = {}
        for relative in tqdm(photos, desc="reading", disable=not progress, leave=False):
            stamp = self._stamp(relative)
            if stamp is None:  # done
                continue
            if "status" in stamp:  # an outcome already: unreadable, a duplicate, or done with a new stamp
                yield stamp
                continue
            try:
                caption = self.captions.caption(relative, self.replace.word)
            except CaptionError as error:
                yield {**skipped(relative, "no_caption", str(error)), **stamp}
                continue
            if caption is None and self.captioner is not None:
                uncaptioned[relative] = stamp
            else:
                yield self._prompt(relative, stamp, caption)
        if uncaptioned:
            made = generate_captions(self.captioner(), self.source, list(uncaptioned), self.cache, self.caption_batch)
            for relative, caption, problem in tqdm(made, total=len(uncaptioned), desc="captioning",
                                                   disable=not progress):
                if problem:
                    yield {**skipped(relative, "unreadable", problem), **uncaptioned[relative]}
                else:
                    yield self._prompt(relative, uncaptioned[relative], caption)

    def _stamp(self, relative: str) -> dict | None:
        """The photo's stamp (sha256, size, mtime_ns) if it is to be prepared, None if it is done, else its outcome.

        A photo whose size and modification time match its log entry is done without being read again, so resuming
        a large folder costs a stat per photo.
        """
        path = self.source / relative
        try:
            stat = path.stat()
            done = self.log.get(relative, {})
            if done.get("size") == stat.st_size and done.get("mtime_ns") == stat.st_mtime_ns and "sha256" in done:
                return None
            sha = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as error:
            return skipped(relative, "unreadable", f"the photo {relative} could not be read ({error.strerror}).")
        stamp = {"sha256": sha, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        if done.get("sha256") == sha:
            return {**done, **stamp}  # touched but unchanged: done, with its new stamp
        first = self.hashes.setdefault(sha, relative)
        if first != relative:
            return {**skipped(relative, "duplicate", f"{relative} is the same file as {first}."), **stamp}
        return stamp

    def _prompt(self, relative: str, stamp: dict, caption: str | None) -> dict | tuple[Task, dict]:
        """(Task, stamp) with the caption rewritten to the domain word, or why the caption cannot be used."""
        if caption is None:
            return {**skipped(relative, "no_caption",
                              f"{relative} has no caption: expected {Path(relative).with_suffix('.txt').name} beside "
                              f"it or a line in captions.jsonl (or give a caption template or model)."), **stamp}
        rewrite = self.replace(caption)
        if rewrite.prompt is None:
            return {**skipped(relative, "no_subject_word",
                              f"{relative}: {rewrite.reason}; add the word to the list (--words) or fix the "
                              f"caption."), **stamp}
        return Task(relative, str(self.source / relative), stamp["sha256"][:16], rewrite.prompt), stamp
