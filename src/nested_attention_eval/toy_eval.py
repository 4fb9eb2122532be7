"""`nested-attention toy eval`: the shipped toy adapters on fresh held-out identities, against ground truth.

For each domain (``domains``), ``identities`` held-out subjects drawn from ``seed`` (never in any training data)
each get ``views`` input views (one by default) and ``contexts`` random contexts. Three kinds of image per (subject,
context): the adapter's generation from the input views and the generic prompt at each lambda (or strength), the
base model's generation for the same prompt (no adapter: it cannot know the subject) and the real render (the
oracle). It is a plan for the resumable evaluator (`harness`): every image and
its scores land in ``records.jsonl``, and running the same command again goes on where an interrupted run stopped.
Each image is scored with the toy metric models:

- ``id_top1``: the identity network retrieves the right subject among the ``identities`` input views;
- ``id_similarity``: cosine of the generation's identity embedding and its subject's input view's;
- ``prompt_accuracy``: the prompt-factor classifier's accuracy, mean over the context factors;
- ``clip_t``: the toy CLIP's image-prompt cosine;
- per domain, ``attribute_accuracy`` and ``attribute_<name>``: how often the identity network reads each of the
  subject's attributes (hair colour, species, ...) in the image: which parts of an identity come through;
- ``id_top1_by_<factor>``: ``id_top1`` per value of each context factor (style, size, ...), both domains together,
  with ``count_by_<factor>`` images each: in which contexts an identity comes through.

Person + pet scenes (both adapters at once, each bound to its word) are scored per subject with its domain's
identity network: ``scene_person_top1``, ``scene_pet_top1``, ``scene_both_top1``, ``scene_<domain>_attribute_accuracy``;
``scene_clip_t``; and ``scene_leakage``: how often one subject's colour (hair and fur, shirt and neckwear) is read on
the other where it could be and is not truly (`toy_scorers.colour_leaks`; leaks over ``scene_leak_chances``).
``contexts`` 0 scores the scenes alone.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nested_attention.errors import NestedAttentionError
from nested_attention_toy.metric_models import retrieval_hits
from nested_attention_toy.render import SCENE_SIZE, render_input, render_scene, render_target, split_scene
from nested_attention_toy.world import (
    CONTEXT_FACTORS,
    DOMAINS,
    FACTOR_NAMES,
    SCENE,
    Context,
    Identity,
    attribute_names,
    generic_caption,
    sample_context,
    sample_identities,
    scene_prompt,
)

from .harness import Evaluator, Job, JobScorer, Setting, summarize
from .report import write_plot
from .toy_scorers import ToyIdentityEmbedder, colour_leaks, to_uint8

KINDS = ("adapter", "baseline", "oracle")
PREFIX = {"adapter": "", "baseline": "baseline_", "oracle": "oracle_"}
SCENE_COLUMNS = ("scene_person_top1", "scene_pet_top1", "scene_both_top1")


@dataclass
class ToyEvalConfig:
    seed: int = 0
    identities: int = 20
    contexts: int = 4  # prompts per subject (0: the scenes alone)
    scenes: int = 20  # person + pet images
    lams: tuple[float, ...] = (1.0,)  # the first is the headline; more make the trade-off curve
    scales: tuple[float, ...] | None = None  # the adapters' strengths (a decoupled adapter's knob); None: as trained
    domains: tuple[str, ...] = DOMAINS  # scenes need both
    views: int = 1  # input views per subject, all given to the adapter; identity is retrieved among the first views
    steps: int = 20
    guidance: float = 5.0
    batch_size: int = 16


def label(identity: Identity) -> str:
    return f"{identity.domain}:{identity.index}"


class ToyPlan:
    """The jobs of one toy evaluation, drawn from ``config.seed``: per domain, ``identities`` held-out subjects with
    one input view (their ``subjects`` entry) and ``contexts`` prompts each; then ``scenes`` person + pet prompts;
    made by the ``adapters`` (domain -> adapter, bound to the domain's word), the base model and the renderer.
    A job's ``labels`` hold its ground truth: domain ("scene" for both), the subject's index among its domain's
    subjects (``owner``, or ``owners`` per domain), the context's factor values."""

    def __init__(self, config: ToyEvalConfig, adapters: dict[str, object]):
        check_config(config)
        self.config = config
        n, k = config.identities, config.contexts
        rng = np.random.default_rng(config.seed)
        self.identities: dict[str, list[Identity]] = {}
        self.subjects: dict[str, list[Image.Image]] = {}
        self.cases: list[tuple[str, str, int, dict]] = []  # (identity label, prompt, seed, labels), one per image
        for domain in DOMAINS:  # every domain's draws, so that one domain's subjects do not depend on the others'
            self.identities[domain] = sample_identities(domain, n, rng, held_out=True)
            for identity in self.identities[domain]:
                first = int(rng.integers(2**31))  # the other views follow it, so the first is that of one view
                self.subjects[label(identity)] = [render_input(identity, 64, first + v) for v in range(config.views)]
            contexts = [sample_context(rng, domain) for _ in range(n * k)]
            prompts = [generic_caption(domain, c, rng) for c in contexts]
            seeds = [int(s) for s in rng.integers(2**31, size=len(prompts))]
            for i, (context, prompt, seed) in enumerate(zip(contexts, prompts, seeds)):
                owner = i // k
                self.cases.append((label(self.identities[domain][owner]), prompt, seed,
                                   {"domain": domain, "owner": owner, "context": list(context.values)}))
        pairs = [(int(rng.integers(n)), int(rng.integers(n))) for _ in range(config.scenes)]
        contexts = [sample_context(rng, SCENE) for _ in pairs]
        pet_expressions = [int(rng.integers(len(CONTEXT_FACTORS["expression"]))) for _ in pairs]
        prompts = [scene_prompt("person", "pet", c, rng, pet_expression=e) for c, e in zip(contexts, pet_expressions)]
        seeds = [int(s) for s in rng.integers(2**31, size=len(prompts))]
        for (a, b), context, expression, prompt, seed in zip(pairs, contexts, pet_expressions, prompts, seeds):
            person, pet = self.identities["person"][a], self.identities["pet"][b]
            self.cases.append((f"{label(person)}+{label(pet)}", prompt, seed,
                               {"domain": SCENE, "owners": {"person": a, "pet": b}, "context": list(context.values),
                                "pet_expression": expression}))
        for domain in set(DOMAINS) - set(config.domains):
            self.cases = [c for c in self.cases if c[3]["domain"] != domain]
            self.subjects = {k: v for k, v in self.subjects.items() if not k.startswith(f"{domain}:")}
            del self.identities[domain]
        self.settings = [
            Setting("adapter", adapters={domain: adapters[domain] for domain in config.domains}),
            Setting("baseline"),
            Setting("oracle", render=self.render),
        ]

    def points(self, setting: Setting) -> list[tuple[float | None, float | None]]:
        """The (lambda, strength) pairs at which ``setting`` makes the plan's images, in job order."""
        if setting.shared or setting.render is not None:
            return [(None, None)]
        return [(lam, scale) for lam in self.config.lams for scale in (self.config.scales or [None])]

    def jobs(self, setting: Setting) -> list[Job]:
        jobs = []
        for lam, scale in self.points(setting):
            for identity, prompt, seed, labels in self.cases:
                bound = {}
                if setting.adapters is not None:
                    owners = labels["owners"] if labels["domain"] == SCENE else {labels["domain"]: labels["owner"]}
                    bound = {d: label(self.identities[d][o]) for d, o in owners.items()}
                size = SCENE_SIZE if labels["domain"] == SCENE else None
                jobs.append(Job(setting.name, identity, prompt, lam, seed, bound, labels, scale=scale, size=size))
        return jobs

    def render(self, job: Job) -> Image.Image:
        """The ground truth of a job: the real render of its subject(s) in its context."""
        labels, context = job.labels, Context(tuple(job.labels["context"]))
        if labels["domain"] == SCENE:
            person, pet = (self.identities[d][labels["owners"][d]] for d in DOMAINS)
            return render_scene(person, pet, context, 64, job.seed, pet_expression=labels["pet_expression"]).image
        return render_target(self.identities[labels["domain"]][labels["owner"]], context, 64, job.seed).image


class ToyScorer(JobScorer):
    """The toy metric models on a `ToyPlan`'s images: identity retrieval among the plan's subjects of the domain,
    attribute reading, prompt factors against the job's true context; per subject in scenes."""

    def __init__(self, plan: ToyPlan, factor_classifier, metrics: str | Path | None = None):
        self.classifier = factor_classifier
        self.embedders = {d: ToyIdentityEmbedder(d, metrics) for d in plan.identities}
        self.galleries = {d: self.embedders[d].embed([plan.subjects[label(i)][0] for i in plan.identities[d]])
                          for d in plan.identities}
        self.identities = plan.identities

    def score(self, images: list[Image.Image], jobs: list[Job], plan) -> dict[str, list]:
        columns: dict[str, list] = {}
        rows = {d: [r for r, j in enumerate(jobs) if j.labels["domain"] == d] for d in (*DOMAINS, SCENE)}
        domains = list(self.identities)
        scene_reads: dict[str, dict[str, torch.Tensor]] = {}

        def put(name: str, row: int, value) -> None:
            columns.setdefault(name, [None] * len(jobs))[row] = value

        for domain in domains:
            if rows[domain]:
                chosen = [images[r] for r in rows[domain]]
                owners = [jobs[r].labels["owner"] for r in rows[domain]]
                hits, cos = retrieval_hits(self.embedders[domain].embed(chosen), self.galleries[domain], torch.tensor(owners))
                read = self.embedders[domain].attributes(chosen)
                for i, (r, owner) in enumerate(zip(rows[domain], owners)):
                    put("id_top1", r, float(hits[i]))
                    put("id_similarity", r, float(cos[i]))
                    truth = self.identities[domain][owner].attributes
                    attribute_hits = [float(int(read[a][i]) == truth[k]) for k, a in enumerate(attribute_names(domain))]
                    for a, hit in zip(attribute_names(domain), attribute_hits):
                        put(f"attribute_{a}", r, hit)
                    put("attribute_accuracy", r, float(np.mean(attribute_hits)))
            if rows[SCENE]:  # each subject in the half the prompt puts it in
                chosen = [split_scene(images[r], Context(tuple(jobs[r].labels["context"])))[domain] for r in rows[SCENE]]
                owners = [jobs[r].labels["owners"][domain] for r in rows[SCENE]]
                hits, _ = retrieval_hits(self.embedders[domain].embed(chosen), self.galleries[domain], torch.tensor(owners))
                scene_reads[domain] = self.embedders[domain].attributes(chosen)
                for i, (r, owner) in enumerate(zip(rows[SCENE], owners)):
                    put(f"scene_{domain}_top1", r, float(hits[i]))
                    truth = self.identities[domain][owner].attributes
                    put(f"scene_{domain}_attribute_accuracy", r, float(np.mean(
                        [int(scene_reads[domain][a][i]) == truth[k] for k, a in enumerate(attribute_names(domain))])))
        for i, r in enumerate(rows[SCENE]):
            put("scene_both_top1", r, columns["scene_person_top1"][r] * columns["scene_pet_top1"][r])
            subjects = {d: self.identities[d][o] for d, o in jobs[r].labels["owners"].items()}
            chances, leaks = colour_leaks(subjects, {d: {a: int(v[i]) for a, v in scene_reads[d].items()}
                                                      for d in DOMAINS})
            put("scene_leak_chances", r, chances)
            put("scene_leaks", r, leaks)
        single = [r for d in domains for r in rows[d]]
        if single:
            predicted = self.classifier.predict(to_uint8([images[r] for r in single], 64))
            for i, r in enumerate(single):
                hits = [float(int(predicted[f][i]) == jobs[r].labels["context"][k]) for k, f in enumerate(FACTOR_NAMES)]
                for f, hit in zip(FACTOR_NAMES, hits):
                    put(f"factor_{f}", r, hit)
                put("prompt_accuracy", r, float(np.mean(hits)))
        return columns


def toy_eval(pipe, adapters: dict[str, object], out: str | Path, config: ToyEvalConfig, clip_scorer, factor_classifier,
             progress: bool = True, metrics: str | Path | None = None, pinned: dict | None = None) -> dict:
    """Run the evaluation (resuming what ``out`` already holds); ``adapters`` maps "person" and "pet" to adapter
    folders or loaded adapters. Writes ``records.jsonl``, ``images/``, ``metrics.json`` and ``samples.png`` in
    ``out`` (with several lambdas or strengths, also ``tradeoff.png``: ``id_top1`` against prompt following, a point
    per value; the metrics' top level is the first value's, ``by_lambda`` or ``by_scale`` holds each one's); returns
    the metrics.
    ``metrics``: the identity networks' build folder (default: the shipped build's); ``pinned``: what else a resumed
    folder must have been made with (model, adapters; see `Evaluator`)."""
    out = Path(out)
    plan = ToyPlan(config, adapters)
    pinned = dict(pinned or {}) | ({"views": config.views} if config.views > 1 else {})  # job keys do not say it
    evaluator = Evaluator(pipe, out, prompt_scorers=[clip_scorer], scorers=[ToyScorer(plan, factor_classifier, metrics)],
                          steps=config.steps, guidance=config.guidance, batch_size=config.batch_size, progress=progress,
                          pinned=pinned)
    if clip_scorer.name != "clip_t":
        raise ValueError(f"toy eval reports the CLIP score as clip_t; got a scorer named {clip_scorer.name!r}")
    records = {r["key"]: r for r in evaluator.run(plan)}
    made = {s.name: [records[j.key] for j in plan.jobs(s)] for s in plan.settings}
    cases, points = len(plan.cases), plan.points(plan.settings[0])
    by_point = {point: made["adapter"][i * cases:(i + 1) * cases] for i, point in enumerate(points)}
    made["adapter"] = by_point[points[0]]
    results = {"config": asdict(config)} | summarize_toy(made, config.domains)
    if len(points) > 1:
        varied, knob = (1, "by_scale") if config.scales is not None and len(config.scales) > 1 else (0, "by_lambda")
        results[knob] = {f"{point[varied]:g}": summarize_toy({"adapter": mine}, config.domains)
                         for point, mine in by_point.items()}
        single = [records[j.key] for s in plan.settings for j in plan.jobs(s) if j.labels["domain"] != SCENE]
        if single:
            write_plot(summarize(single), out / "tradeoff.png", y_column="id_top1")
    if len(points) == 1 or not config.contexts:
        (out / "tradeoff.png").unlink(missing_ok=True)  # an earlier run's curve, of lambdas this run does not score
    image_sheet(_sample_rows(plan, made, out)).save(out / "samples.png")
    (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _mean(records: list[dict], column: str) -> float:
    return float(np.mean([r[column] for r in records]))


def check_config(config: ToyEvalConfig) -> None:
    """One sentence for a configuration the plan cannot make."""
    domains = config.domains
    if not domains or any(d not in DOMAINS for d in domains) or len(set(domains)) < len(domains):
        raise NestedAttentionError(f"The toy evaluation's domains are {config.domains}; expected distinct names "
                                   f"among {', '.join(DOMAINS)}.")
    if config.scenes and set(config.domains) != set(DOMAINS):
        raise NestedAttentionError(f"{config.scenes} person + pet scenes were asked with the domains "
                                   f"{', '.join(config.domains)} only; scenes need both, so ask for 0 scenes "
                                   f"(--scenes 0).")
    if config.contexts < 0 or config.scenes < 0 or not (config.contexts or config.scenes):
        raise NestedAttentionError(f"The toy evaluation was asked for {config.contexts} prompts per subject and "
                                   f"{config.scenes} person + pet scenes; expected at least one image (0 prompts per "
                                   f"subject scores the scenes alone).")
    if config.views < 1:
        raise NestedAttentionError(f"The toy evaluation was asked for {config.views} input views per subject; "
                                   f"expected at least 1.")
    if config.scales is not None and len(config.scales) > 1 and len(config.lams) > 1:
        raise NestedAttentionError("Both lambda and the strength were given several values; one evaluation traces "
                                   "one trade-off curve, so vary one of them.")


def summarize_toy(made: dict[str, list[dict]], domains: tuple[str, ...] = DOMAINS) -> dict:
    """The metrics of ``made`` (kind -> its records in plan order): per kind overall and per domain, per context
    factor value, and for the scenes: each subject's identity and attributes, CLIP-T, and the colour leakage (leaks
    over chances, `colour_leaks`; None where no scene had a chance)."""
    results: dict = {}
    overall = ("id_top1", "id_similarity", "prompt_accuracy", "clip_t", *(f"factor_{f}" for f in FACTOR_NAMES))
    for kind, records in made.items():
        prefix = PREFIX[kind]
        single = [r for r in records if r["labels"]["domain"] != SCENE]
        if single:
            for column in overall:
                results[prefix + column] = _mean(single, column)
            for domain in domains:
                mine = [r for r in single if r["labels"]["domain"] == domain]
                names = (*overall, "attribute_accuracy", *(f"attribute_{a}" for a in attribute_names(domain)))
                results.setdefault(domain, {}).update({prefix + c: _mean(mine, c) for c in names})
            labels = torch.tensor([r["labels"]["context"] for r in single])
            hits = torch.tensor([r["id_top1"] for r in single])
            for i, factor in enumerate(FACTOR_NAMES):
                present = [(v, labels[:, i] == j) for j, v in enumerate(CONTEXT_FACTORS[factor])
                           if bool((labels[:, i] == j).any())]
                results[f"count_by_{factor}"] = {v: int(mask.sum()) for v, mask in present}
                results[f"{prefix}id_top1_by_{factor}"] = {v: float(hits[mask].mean()) for v, mask in present}
        scenes = [r for r in records if r["labels"]["domain"] == SCENE]
        if scenes:
            for column in SCENE_COLUMNS:
                results[prefix + column] = _mean(scenes, column)
            results[prefix + "scene_clip_t"] = _mean(scenes, "clip_t")
            if all("scene_leaks" in r for r in scenes):  # records scored before attributes were read in scenes lack it
                for domain in DOMAINS:
                    results[f"{prefix}scene_{domain}_attribute_accuracy"] = _mean(
                        scenes, f"scene_{domain}_attribute_accuracy")
                chances = sum(r["scene_leak_chances"] for r in scenes)
                results[prefix + "scene_leakage"] = sum(r["scene_leaks"] for r in scenes) / chances if chances else None
                results["scene_leak_chances"] = chances
    return results


def _sample_rows(plan: ToyPlan, made: dict[str, list[dict]], out: Path) -> list[list[Image.Image]]:
    """Per domain, up to 4 subjects: the input view, then up to 3 images of each kind; then up to 4 scenes: both
    input views and each kind's image."""
    k = plan.config.contexts
    open_ = lambda record: Image.open(out / record["image"]).convert("RGB")  # noqa: E731
    rows = []
    for domain in plan.identities:
        for owner, identity in enumerate(plan.identities[domain][:4]):
            row = [plan.subjects[label(identity)][0]]
            for kind in KINDS:
                mine = [r for r in made[kind] if r["labels"].get("owner") == owner and r["labels"]["domain"] == domain]
                row += [open_(r) for r in mine[: min(k, 3)]]
            rows.append(row)
    scenes = [i for i, r in enumerate(made["adapter"]) if r["labels"]["domain"] == SCENE][:4]
    for i in scenes:
        owners = made["adapter"][i]["labels"]["owners"]
        rows.append([plan.subjects[label(plan.identities[d][owners[d]])][0] for d in DOMAINS]
                    + [open_(made[kind][i]) for kind in KINDS])
    return rows


def image_sheet(rows: list[list[Image.Image]], size: int = 64, pad: int = 2) -> Image.Image:
    """The images in rows, a row per list, each tile ``size`` pixels tall (as wide as its aspect ratio makes it) on a
    white ground."""
    tiles = [[t.convert("RGB").resize((max(1, round(size * t.width / t.height)), size)) for t in row] for row in rows]
    width = max(pad + sum(t.width + pad for t in row) for row in tiles)
    sheet = Image.new("RGB", (width, pad + (size + pad) * len(rows)), "white")
    for r, row in enumerate(tiles):
        x = pad
        for tile in row:
            sheet.paste(tile, (x, pad + r * (size + pad)))
            x += tile.width + pad
    return sheet
