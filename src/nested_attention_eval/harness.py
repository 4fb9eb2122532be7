"""The evaluation loop: generate every (setting, subject, prompt, lambda, seed) image once, score it, append its
record to ``records.jsonl``. A record already there is skipped, so an interrupted run resumes where it stopped.

A *setting* is an adapter bound to a word, or the base model (``adapter=None``), whose images do not depend on the
subject: they are generated once per (prompt, seed) and scored against every subject.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nested_attention import NestedAttention, Subject
from nested_attention.adapter import NestedAdapter
from nested_attention.errors import NestedAttentionError

from .scorers import IdentityEmbedder, PromptScorer

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass
class Setting:
    """One way of generating: ``adapter`` (a folder, or an already loaded `NestedAdapter`) bound to ``word``, or the
    base model when ``adapter`` is None. ``name`` labels its rows, curves and images."""

    name: str
    word: str
    adapter: str | Path | NestedAdapter | None = None


@dataclass
class Job:
    setting: str
    identity: str
    prompt: str  # with the setting's word filled in
    lam: float | None  # None for the base model
    seed: int

    @property
    def key(self) -> str:
        return f"{self.setting}|{self.identity}|{self.prompt}|{self.lam}|{self.seed}"

    def image_name(self, shared: bool) -> str:
        """The image file: the base model's images are shared by all subjects (identity left out of the name)."""
        key = f"{self.setting}|{'' if shared else self.identity}|{self.prompt}|{self.lam}|{self.seed}"
        return hashlib.sha1(key.encode()).hexdigest()[:16] + ".png"


@dataclass
class Plan:
    settings: list[Setting]
    subjects: dict[str, list[Image.Image]]  # identity label -> its images (the adapter's input and the reference)
    prompts: list[str]  # may contain "{word}", replaced by each setting's word
    lams: list[float] = field(default_factory=lambda: [1.0])
    seeds: list[int] = field(default_factory=lambda: [0])

    def __post_init__(self):
        if not self.settings:
            raise NestedAttentionError("Nothing to evaluate: give at least one adapter (or the base model).")
        if not self.subjects or any(not images for images in self.subjects.values()):
            raise NestedAttentionError("Every subject needs at least one image.")
        if not self.prompts:
            raise NestedAttentionError("The prompts file has no prompts.")
        if not self.lams or any(not lam > 0 for lam in self.lams):
            raise NestedAttentionError(f"Lambda values must be positive, got {self.lams}.")
        names = [s.name for s in self.settings]
        if len(set(names)) != len(names):
            raise NestedAttentionError(f"Two settings share a name: {names}; name each adapter differently.")

    def prompt_for(self, setting: Setting, prompt: str) -> str:
        return fill_word(prompt, setting.word, setting.name)

    def jobs(self, setting: Setting) -> list[Job]:
        lams: Sequence[float | None] = [None] if setting.adapter is None else self.lams
        return [Job(setting.name, identity, self.prompt_for(setting, p), lam, seed)
                for identity in self.subjects for lam in lams for p in self.prompts for seed in self.seeds]


def fill_word(prompt: str, word: str, setting: str) -> str:
    """``prompt`` with ``{word}`` replaced by ``word``, which it must then contain as a word."""
    text = prompt.replace("{word}", word)
    if f" {word.lower()} " not in f" {''.join(c if c.isalnum() else ' ' for c in text.lower())} ":
        raise NestedAttentionError(
            f"The prompt {prompt!r} does not contain the subject word {word!r} of {setting}; write the word in it, "
            f"or {{word}} to have each setting's word filled in."
        )
    return text


def load_subjects(folder: str | Path) -> dict[str, list[Path]]:
    """A folder of subjects: one sub-folder per identity (its name is the label) holding that subject's images, or
    image files directly in ``folder`` (each its own identity, labelled by its file name)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise NestedAttentionError(f"The subjects folder {folder} does not exist; give a folder of images or of one folder per subject.")
    subjects = {d.name: sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
                for d in sorted(folder.iterdir()) if d.is_dir()}
    subjects = {label: files for label, files in subjects.items() if files}
    if not subjects:
        subjects = {f.stem: [f] for f in sorted(folder.iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES}
    if not subjects:
        raise NestedAttentionError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}), directly or in sub-folders.")
    return subjects


def read_prompts(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    if not path.is_file():
        raise NestedAttentionError(f"The prompts file {path} does not exist; give a text file with one prompt per line.")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise NestedAttentionError(f"The prompts file {path} has no prompts (one per line; # starts a comment).")
    return prompts


def read_records(path: Path) -> list[dict]:
    """The records of a run so far; a last line cut short by an interruption is dropped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class Evaluator:
    """Generates and scores a `Plan` into ``out`` (``records.jsonl`` and ``images/``)."""

    def __init__(self, pipe, out: str | Path, identity: IdentityEmbedder | None = None,
                 prompt_scorers: Iterable[PromptScorer] = (), steps: int = 30, guidance: float = 5.0,
                 batch_size: int = 8, progress: bool = True):
        self.pipe, self.out = pipe, Path(out)
        self.identity, self.prompt_scorers = identity, list(prompt_scorers)
        self.steps, self.guidance, self.batch_size, self.progress = steps, guidance, batch_size, progress
        self.records_path = self.out / "records.jsonl"
        (self.out / "images").mkdir(parents=True, exist_ok=True)

    def run(self, plan: Plan) -> list[dict]:
        from tqdm.auto import tqdm

        done = {r["key"] for r in self._repair()}
        todo = {s.name: [j for j in plan.jobs(s) if j.key not in done] for s in plan.settings}
        references = self._references(plan) if self.identity is not None else None
        na = NestedAttention(self.pipe)
        try:
            with tqdm(total=sum(map(len, todo.values())), desc="evaluate", disable=not self.progress) as bar:
                for setting in plan.settings:
                    if todo[setting.name]:
                        self._run_setting(na, plan, setting, todo[setting.name], references, bar)
        finally:
            na.uninstall()
        wanted = {j.key for s in plan.settings for j in plan.jobs(s)}  # a resumed folder may hold other plans' records
        return [r for r in read_records(self.records_path) if r["key"] in wanted]

    def _repair(self) -> list[dict]:
        """The records so far; a line an interruption cut short is dropped from the file, so appending goes on
        from a clean line end."""
        records = read_records(self.records_path)
        if self.records_path.is_file() and self.records_path.read_text() != "".join(json.dumps(r) + "\n" for r in records):
            self.records_path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return records

    # ---- one setting ---------------------------------------------------------------------------------------

    def _run_setting(self, na: NestedAttention, plan: Plan, setting: Setting, jobs: list[Job], references, bar) -> None:
        shared = setting.adapter is None
        if not shared:
            na.load_adapter(setting.adapter, word=setting.word, name=setting.name)
        try:
            groups: dict[tuple, list[Job]] = {}
            for job in jobs:  # the base model's images do not depend on the subject: one group for all
                groups.setdefault((None if shared else job.identity, job.lam), []).append(job)
            for (identity, lam), group in groups.items():
                subject = None if shared else Subject(plan.subjects[identity], lam=lam)
                for start in range(0, len(group), self.batch_size):
                    chunk = group[start : start + self.batch_size]
                    images = self._images(na, setting, subject, chunk, shared)
                    self._write(chunk, images, references, shared)
                    bar.update(len(chunk))
        finally:
            if not shared:
                na.unload_adapter(setting.name)

    def _images(self, na: NestedAttention, setting: Setting, subject: Subject | None, jobs: list[Job], shared: bool) -> list[Image.Image]:
        """The images of ``jobs``: read back where a previous run saved them, generated otherwise (one batch)."""
        paths = [self.out / "images" / j.image_name(shared) for j in jobs]
        missing = [i for i, p in enumerate(paths) if not p.is_file()]
        # the base model's images are shared: generate each (prompt, seed) once
        unique = list(dict.fromkeys((jobs[i].prompt, jobs[i].seed) for i in missing))
        if unique:
            kwargs = dict(num_inference_steps=self.steps, guidance_scale=self.guidance,
                          generator=[torch.Generator().manual_seed(seed) for _, seed in unique])
            prompts = [p for p, _ in unique]
            if subject is None:
                images = self.pipe(prompts, **kwargs).images
            else:
                images = na(prompts, subjects={setting.name: subject}, **kwargs).images
            made = dict(zip(unique, images))
            for i in missing:
                made[(jobs[i].prompt, jobs[i].seed)].save(paths[i])
        return [Image.open(p).convert("RGB") for p in paths]

    def _write(self, jobs: list[Job], images: list[Image.Image], references, shared: bool) -> None:
        columns: dict[str, list] = {}
        for scorer in self.prompt_scorers:
            columns.update(scorer.score(images, [j.prompt for j in jobs]))
        if references is not None:
            columns.update(self._identity_scores(images, [j.identity for j in jobs], references))
        with self.records_path.open("a") as file:
            for row, job in enumerate(jobs):
                record = {"key": job.key, "setting": job.setting, "identity": job.identity, "prompt": job.prompt,
                          "lam": job.lam, "seed": job.seed, "image": f"images/{job.image_name(shared)}"}
                record.update({name: values[row] for name, values in columns.items()})
                file.write(json.dumps(record) + "\n")

    # ---- identity --------------------------------------------------------------------------------------------

    def _references(self, plan: Plan) -> tuple[list[str], torch.Tensor, list[torch.Tensor]]:
        """Per identity: its reference embeddings, and their normalized mean (the retrieval gallery)."""
        labels = list(plan.subjects)
        per_identity = [self.identity.embed(plan.subjects[label]) for label in labels]
        gallery = torch.nn.functional.normalize(torch.stack([e.mean(0) for e in per_identity]), dim=-1)
        return labels, gallery, per_identity

    def _identity_scores(self, images: list[Image.Image], identities: list[str], references) -> dict[str, list]:
        labels, gallery, per_identity = references
        embedded = self.identity.embed(images)
        similarity, top1 = [], []
        for row, identity in enumerate(identities):
            own = labels.index(identity)
            similarity.append(float((per_identity[own] @ embedded[row]).mean()))
            top1.append(float(int((gallery @ embedded[row]).argmax()) == own) if len(labels) > 1 else None)
        name = self.identity.name
        return {f"{name}_similarity": similarity, f"{name}_top1": top1}


def summarize(records: list[dict]) -> list[dict]:
    """One row per (setting, lambda): the count and the mean of every score column (None values left out)."""
    fixed = {"key", "setting", "identity", "prompt", "lam", "seed", "image"}
    columns = sorted({k for r in records for k, v in r.items() if k not in fixed and isinstance(v, (int, float))})
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        groups.setdefault((record["setting"], record["lam"]), []).append(record)
    rows = []
    for (setting, lam), group in groups.items():
        row = {"setting": setting, "lam": lam, "images": len(group)}
        for column in columns:
            values = [r[column] for r in group if isinstance(r.get(column), (int, float))]
            row[column] = float(np.mean(values)) if values else None
        rows.append(row)
    return rows
