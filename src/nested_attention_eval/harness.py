"""The evaluation loop: make every job's image once, score it, append its record to ``records.jsonl``. A record
already there is skipped, so an interrupted run resumes where it stopped.

A *plan* lists the jobs: `Plan` is the grid of (setting, subject, prompt, lambda, strength, seed) of
`nested-attention evaluate`; any object with ``settings``, ``subjects`` and ``jobs(setting)`` will do (the toy
world's evaluation lists its jobs one by one). A *setting* is one way of making images: adapters bound to words, the base model
(no adapter), whose images do not depend on the subject and are generated once per (prompt, seed), or a function
that renders a job's image (ground truth).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
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
    """One way of making images: ``adapter`` (a folder, or an already loaded `NestedAdapter`) bound to ``word``;
    several adapters at once with ``adapters`` (word -> adapter, each loaded under its word's name); the base model
    when neither is given; or, with ``render``, a function from a job to its image (no model). ``name`` labels its
    rows, curves and images."""

    name: str
    word: str | None = None
    adapter: str | Path | NestedAdapter | None = None
    adapters: Mapping[str, str | Path | NestedAdapter] | None = None
    render: Callable[[Job], Image.Image] | None = None

    def bound(self) -> list[tuple[str, str | Path | NestedAdapter, str]]:
        """(adapter name, adapter, word) of each adapter the setting loads."""
        if self.adapters is not None:
            return [(word, adapter, word) for word, adapter in self.adapters.items()]
        return [] if self.adapter is None else [(self.name, self.adapter, self.word)]

    @property
    def shared(self) -> bool:
        """The base model: its images depend on (prompt, seed) only, shared by every subject."""
        return not self.bound() and self.render is None


@dataclass
class Job:
    setting: str
    identity: str  # the scored subject's label (a plan's own labels, such as "person:3+pet:7", for several)
    prompt: str  # with the setting's word filled in
    lam: float | None  # None for the base model
    seed: int
    subjects: dict[str, str] = field(default_factory=dict)  # adapter name -> the subject label bound to it
    labels: dict = field(default_factory=dict)  # ground truth that a plan's own scorers read (JSON values)
    scale: float | None = None  # the bound adapters' strength (`NestedAttention.set_scale`); None: as trained
    size: tuple[int, int] | None = None  # (width, height) of the image; None: the pipeline's default

    @property
    def key(self) -> str:
        return f"{self.setting}|{self.identity}|{self.prompt}|{self.lam}|{self.seed}{self._variant}"

    def image_name(self, shared: bool) -> str:
        """The image file: the base model's images are shared by all subjects (identity left out of the name)."""
        key = f"{self.setting}|{'' if shared else self.identity}|{self.prompt}|{self.lam}|{self.seed}{self._variant}"
        return hashlib.sha1(key.encode()).hexdigest()[:16] + ".png"

    @property
    def _variant(self) -> str:
        scaled = "" if self.scale is None else f"|scale {self.scale:g}"
        return scaled + ("" if self.size is None else f"|{self.size[0]}x{self.size[1]}")


@dataclass
class Plan:
    settings: list[Setting]
    subjects: dict[str, list[Image.Image]]  # identity label -> its images (the adapter's input and the reference)
    prompts: list[str]  # may contain "{word}", replaced by each setting's word
    lams: list[float] = field(default_factory=lambda: [1.0])
    seeds: list[int] = field(default_factory=lambda: [0])
    scales: list[float] | None = None  # the adapters' strengths (e.g. a decoupled adapter's); None: as trained

    def __post_init__(self):
        if not self.settings:
            raise NestedAttentionError("Nothing to evaluate: give at least one adapter (or the base model).")
        if not self.subjects or any(not images for images in self.subjects.values()):
            raise NestedAttentionError("Every subject needs at least one image.")
        if not self.prompts:
            raise NestedAttentionError("The prompts file has no prompts.")
        if not self.lams or any(not lam > 0 for lam in self.lams):
            raise NestedAttentionError(f"Lambda values must be positive, got {self.lams}.")
        if self.scales is not None and (not self.scales or any(not 0 <= s <= 1 for s in self.scales)):
            raise NestedAttentionError(f"Strengths must lie in [0, 1] (1 = the adapter as trained), got {self.scales}.")
        names = [s.name for s in self.settings]
        if len(set(names)) != len(names):
            raise NestedAttentionError(f"Two settings share a name: {names}; name each adapter differently.")

    def prompt_for(self, setting: Setting, prompt: str) -> str:
        return fill_word(prompt, setting.word, setting.name)

    def jobs(self, setting: Setting) -> list[Job]:
        lams: Sequence[float | None] = [None] if setting.adapter is None else self.lams
        scales: Sequence[float | None] = [None] if setting.adapter is None or self.scales is None else self.scales
        return [Job(setting.name, identity, self.prompt_for(setting, p), lam, seed,
                    {setting.name: identity} if setting.adapter is not None else {}, scale=scale)
                for identity in self.subjects for lam in lams for scale in scales for p in self.prompts
                for seed in self.seeds]


class JobScorer:
    """Scores that need more than the prompt: ``score(images, jobs, plan)`` -> columns, one value (or None) per
    image, reading the jobs' ``labels`` (ground truth) and the plan's subjects."""

    def score(self, images: list[Image.Image], jobs: list[Job], plan) -> dict[str, list]:
        raise NotImplementedError


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
                 batch_size: int = 8, progress: bool = True, scorers: Iterable[JobScorer] = (),
                 pinned: dict | None = None):
        self.pipe, self.out = pipe, Path(out)
        self.identity, self.prompt_scorers, self.scorers = identity, list(prompt_scorers), list(scorers)
        self.steps, self.guidance, self.batch_size, self.progress = steps, guidance, batch_size, progress
        # as JSON reads it back (tuples become lists), so that a resumed run compares like with like
        self.pinned = json.loads(json.dumps({"steps": steps, "guidance": guidance} | dict(pinned or {})))
        self.records_path = self.out / "records.jsonl"

    def run(self, plan: Plan) -> list[dict]:
        from tqdm.auto import tqdm

        self._check_generation()
        (self.out / "images").mkdir(parents=True, exist_ok=True)
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

    def _check_generation(self) -> None:
        """A folder's images were made with one sampler setting (and whatever the caller ``pinned``, such as the
        model): resuming with another would mix them."""
        path = self.out / "generation.json"
        if path.is_file():
            before = json.loads(path.read_text())
            if before != self.pinned:
                changed = ", ".join(f"{k} {before.get(k)!r} -> {self.pinned.get(k)!r}"
                                    for k in sorted(before.keys() | self.pinned.keys()) if before.get(k) != self.pinned.get(k))
                raise NestedAttentionError(
                    f"{self.out} holds images made with other settings ({changed}); give a new --out folder, or the "
                    f"same settings to resume.")
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.pinned) + "\n")

    def _repair(self) -> list[dict]:
        """The records so far; a line an interruption cut short is dropped from the file, so appending goes on
        from a clean line end."""
        records = read_records(self.records_path)
        if self.records_path.is_file() and self.records_path.read_text() != "".join(json.dumps(r) + "\n" for r in records):
            self.records_path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return records

    # ---- one setting ---------------------------------------------------------------------------------------

    def _run_setting(self, na: NestedAttention, plan: Plan, setting: Setting, jobs: list[Job], references, bar) -> None:
        bound = setting.bound()
        for name, adapter, word in bound:
            na.load_adapter(adapter, word=word, name=name)
        try:
            groups: dict[tuple, list[Job]] = {}
            for job in jobs:  # one batch binds the same adapters with one lambda and one strength, at one size
                groups.setdefault((tuple(sorted(job.subjects)), job.lam, job.scale, job.size), []).append(job)
            for (_, _, scale, _), group in groups.items():
                for name, _, _ in bound:
                    na.set_scale(name, 1.0 if scale is None else scale)
                for start in range(0, len(group), self.batch_size):
                    chunk = group[start : start + self.batch_size]
                    images = self._images(na, plan, setting, chunk)
                    self._write(chunk, images, references, setting.shared, plan)
                    bar.update(len(chunk))
        finally:
            for name, _, _ in bound:
                na.unload_adapter(name)

    def _images(self, na: NestedAttention, plan: Plan, setting: Setting, jobs: list[Job]) -> list[Image.Image]:
        """The images of ``jobs``: read back where a previous run saved them, made otherwise (one batch)."""
        shared = setting.shared
        paths = [self.out / "images" / j.image_name(shared) for j in jobs]
        missing = [i for i, p in enumerate(paths) if not p.is_file()]
        if setting.render is not None:
            for i in missing:
                setting.render(jobs[i]).convert("RGB").save(paths[i])
            missing = []
        if shared:  # the base model's images: generate each (prompt, seed) once
            unique = list(dict.fromkeys((jobs[i].prompt, jobs[i].seed) for i in missing))
            made = dict(zip(unique, self._generate(na, [p for p, _ in unique], [seed for _, seed in unique],
                                                   size=jobs[0].size))) if unique else {}
            for i in missing:
                made[(jobs[i].prompt, jobs[i].seed)].save(paths[i])
        elif missing:
            chosen = [jobs[i] for i in missing]
            made: dict[tuple, Subject] = {}  # one Subject per (label, lambda): the pipeline encodes each once
            subjects = {name: [made.setdefault((j.subjects[name], j.lam), Subject(plan.subjects[j.subjects[name]], lam=j.lam))
                               for j in chosen] for name in chosen[0].subjects}
            for i, image in zip(missing, self._generate(na, [j.prompt for j in chosen], [j.seed for j in chosen], subjects,
                                                        size=chosen[0].size)):
                image.save(paths[i])
        return [Image.open(p).convert("RGB") for p in paths]

    def _generate(self, na: NestedAttention, prompts: list[str], seeds: list[int], subjects=None,
                  size: tuple[int, int] | None = None) -> list[Image.Image]:
        kwargs = dict(num_inference_steps=self.steps, guidance_scale=self.guidance,
                      generator=[torch.Generator().manual_seed(seed) for seed in seeds])
        if size is not None:
            kwargs |= {"width": size[0], "height": size[1]}
        if subjects is None:
            return self.pipe(prompts, **kwargs).images
        return na(prompts, subjects=subjects, **kwargs).images

    def _write(self, jobs: list[Job], images: list[Image.Image], references, shared: bool, plan: Plan) -> None:
        columns: dict[str, list] = {}
        for scorer in self.prompt_scorers:
            columns.update(scorer.score(images, [j.prompt for j in jobs]))
        if references is not None:
            columns.update(self._identity_scores(images, [j.identity for j in jobs], references))
        for job_scorer in self.scorers:
            columns.update(job_scorer.score(images, jobs, plan))
        with self.records_path.open("a") as file:
            for row, job in enumerate(jobs):
                record = {"key": job.key, "setting": job.setting, "identity": job.identity, "prompt": job.prompt,
                          "lam": job.lam, "seed": job.seed, "image": f"images/{job.image_name(shared)}"}
                if job.scale is not None:
                    record["scale"] = job.scale
                if job.labels:
                    record["labels"] = job.labels
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
            if identity not in labels:  # a job of several subjects: its plan's own scorers judge it
                similarity.append(None)
                top1.append(None)
                continue
            own = labels.index(identity)
            similarity.append(float((per_identity[own] @ embedded[row]).mean()))
            top1.append(float(int((gallery @ embedded[row]).argmax()) == own) if len(labels) > 1 else None)
        name = self.identity.name
        return {f"{name}_similarity": similarity, f"{name}_top1": top1}


def summarize(records: list[dict]) -> list[dict]:
    """One row per (setting, lambda, strength): the count and the mean of every score column (None values left
    out). A row has a ``scale`` only where its records were made at a set strength."""
    fixed = {"key", "setting", "identity", "prompt", "lam", "scale", "seed", "image", "labels"}
    columns = sorted({k for r in records for k, v in r.items() if k not in fixed and isinstance(v, (int, float))})
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        groups.setdefault((record["setting"], record["lam"], record.get("scale")), []).append(record)
    rows = []
    for (setting, lam, scale), group in groups.items():
        row = {"setting": setting, "lam": lam} | ({} if scale is None else {"scale": scale}) | {"images": len(group)}
        for column in columns:
            values = [r[column] for r in group if isinstance(r.get(column), (int, float))]
            row[column] = float(np.mean(values)) if values else None
        rows.append(row)
    return rows
