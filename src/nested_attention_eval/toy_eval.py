"""`nested-attention toy eval`: the shipped toy adapters on fresh held-out identities, against ground truth.

For each domain, ``identities`` held-out subjects drawn from ``seed`` (never in any training data) each get one input
view and ``contexts`` random contexts. Three kinds of image per (subject, context): the adapter's generation from the
input view and the generic prompt, the base model's generation for the same prompt (no adapter: it cannot know the
subject) and the real render (the oracle). Each is scored with the toy metric models:

- ``id_top1``: the identity network retrieves the right subject among the ``identities`` input views;
- ``id_similarity``: cosine of the generation's identity embedding and its subject's input view's;
- ``prompt_accuracy``: the prompt-factor classifier's accuracy, mean over the context factors;
- ``clip_t``: the toy CLIP's image-prompt cosine;
- per domain, ``attribute_accuracy`` and ``attribute_<name>``: how often the identity network reads each of the
  subject's attributes (hair colour, species, ...) in the image: which parts of an identity come through;
- ``id_top1_by_<factor>``: ``id_top1`` per value of each context factor (style, size, ...), both domains together,
  with ``count_by_<factor>`` images each: in which contexts an identity comes through.

Person + pet scenes (both adapters at once, each bound to its word) are scored per subject with its domain's
identity network: ``scene_person_top1``, ``scene_pet_top1`` and ``scene_both_top1``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nested_attention import NestedAttention, Subject
from nested_attention_toy.metric_models import retrieval_hits
from nested_attention_toy.render import render_input, render_scene, render_target
from nested_attention_toy.world import (
    CONTEXT_FACTORS,
    DOMAINS,
    FACTOR_NAMES,
    attribute_names,
    generic_caption,
    sample_context,
    sample_identities,
    scene_prompt,
)

from .toy_scorers import ToyIdentityEmbedder, to_uint8

KINDS = ("adapter", "baseline", "oracle")
PREFIX = {"adapter": "", "baseline": "baseline_", "oracle": "oracle_"}


@dataclass
class ToyEvalConfig:
    seed: int = 0
    identities: int = 20
    contexts: int = 4  # prompts per subject
    scenes: int = 20  # person + pet images
    lam: float = 1.0
    steps: int = 20
    guidance: float = 5.0
    batch_size: int = 16


def _generate(pipe, na: NestedAttention | None, prompts: list[str], subjects: list[dict] | None, seeds: list[int],
              config: ToyEvalConfig, progress) -> list[Image.Image]:
    """Images for ``prompts`` (one seed each); ``subjects[i]`` maps adapter names to prompt i's Subject."""
    images: list[Image.Image] = []
    for start in range(0, len(prompts), config.batch_size):
        end = min(start + config.batch_size, len(prompts))
        kwargs = dict(num_inference_steps=config.steps, guidance_scale=config.guidance,
                      generator=[torch.Generator().manual_seed(s) for s in seeds[start:end]])
        if na is None:
            images += pipe(prompts[start:end], **kwargs).images
        else:
            names = subjects[start]
            batch = {name: [s[name] for s in subjects[start:end]] for name in names}
            images += na(prompts[start:end], subjects=batch, **kwargs).images
        progress.update(end - start)
    return images


def _scores(images: list[Image.Image], embedder: ToyIdentityEmbedder, gallery: torch.Tensor, owners: list[int]) -> tuple[list[float], list[float]]:
    """Per image: top-1 retrieval (0/1) among the gallery and cosine to its own gallery entry."""
    hits, cos = retrieval_hits(embedder.embed(images), gallery, torch.tensor(owners))
    return hits.float().tolist(), cos.tolist()


def _attribute_hits(images: list[Image.Image], embedder: ToyIdentityEmbedder, subjects: list) -> dict[str, np.ndarray]:
    """Per image and identity attribute, 1 where the identity network reads the subject's true value; the mean over
    attributes as ``attribute_accuracy``."""
    read = embedder.attributes(images)
    truth = torch.tensor([s.attributes for s in subjects]).view(len(subjects), -1)
    hits = {f"attribute_{name}": (read[name] == truth[:, a]).float().numpy()
            for a, name in enumerate(attribute_names(embedder.domain))}
    return {"attribute_accuracy": np.mean(list(hits.values()), axis=0)} | hits


def toy_eval(pipe, adapters: dict[str, object], out: str | Path, config: ToyEvalConfig, clip_scorer, factor_classifier,
             progress: bool = True, metrics: str | Path | None = None) -> dict:
    """Run the evaluation; ``adapters`` maps "person" and "pet" to adapter folders or loaded adapters. Writes
    ``metrics.json`` and ``samples.png`` in ``out``; returns the metrics. ``metrics``: the identity networks' build
    folder (default: the shipped build's)."""
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(config.seed)
    na = NestedAttention(pipe)
    for domain in DOMAINS:
        na.load_adapter(adapters[domain], word=domain, name=domain)
    n, k = config.identities, config.contexts
    embedders = {d: ToyIdentityEmbedder(d, metrics) for d in DOMAINS}
    results: dict = {"config": asdict(config)}
    per_kind: dict[str, dict[str, list[float]]] = {kind: {} for kind in KINDS}
    samples: list[list[Image.Image]] = []
    context_labels: list[torch.Tensor] = []
    total = 2 * (2 * n * k) + 2 * config.scenes
    try:
        with tqdm(total=total, desc="toy eval", disable=not progress) as bar:
            identities, views, galleries = {}, {}, {}
            for domain in DOMAINS:
                identities[domain] = sample_identities(domain, n, rng, held_out=True)
                views[domain] = [render_input(identity, 64, int(rng.integers(2**31))) for identity in identities[domain]]
                galleries[domain] = embedders[domain].embed(views[domain])
                contexts = [sample_context(rng, domain) for _ in range(n * k)]
                owners = [i for i in range(n) for _ in range(k)]
                prompts = [generic_caption(domain, c, rng) for c in contexts]
                seeds = [int(s) for s in rng.integers(2**31, size=len(prompts))]
                labels = torch.tensor([c.values for c in contexts])
                context_labels.append(labels)
                made = {
                    "adapter": _generate(pipe, na, prompts, [{domain: Subject(views[domain][o], lam=config.lam)} for o in owners],
                                         seeds, config, bar),
                    "baseline": _generate(pipe, None, prompts, None, seeds, config, bar),
                    "oracle": [render_target(identities[domain][o], c, 64, s).image for o, c, s in zip(owners, contexts, seeds)],
                }
                for kind, images in made.items():
                    top1, similarity = _scores(images, embedders[domain], galleries[domain], owners)
                    predicted = factor_classifier.predict(to_uint8(images, 64))
                    accuracy = torch.stack([(predicted[f] == labels[:, i]).float() for i, f in enumerate(FACTOR_NAMES)], 1)
                    clip_t = clip_scorer.score(images, prompts)[clip_scorer.name]
                    scores = {"id_top1": top1, "id_similarity": similarity, "prompt_accuracy": accuracy.mean(1).tolist(),
                              "clip_t": clip_t}
                    scores |= {f"factor_{f}": accuracy[:, i].tolist() for i, f in enumerate(FACTOR_NAMES)}
                    for name, values in scores.items():
                        per_kind[kind].setdefault(name, []).extend(values)
                        results.setdefault(domain, {})[PREFIX[kind] + name] = float(np.mean(values))
                    attributes = _attribute_hits(images, embedders[domain], [identities[domain][o] for o in owners])
                    for name, values in attributes.items():
                        results[domain][PREFIX[kind] + name] = float(np.mean(values))
                for row in range(min(n, 4)):
                    samples.append([views[domain][row]] + [made[kind][row * k + j] for kind in KINDS for j in range(min(k, 3))])
            scene_results = _scenes(pipe, na, identities, views, galleries, embedders, config, rng, bar)
    finally:
        na.uninstall()
    for kind in KINDS:
        for name, values in per_kind[kind].items():
            results[PREFIX[kind] + name] = float(np.mean(values))
    results |= _by_factor(torch.cat(context_labels), {kind: per_kind[kind]["id_top1"] for kind in KINDS})
    results.update(scene_results.pop("metrics"))
    _sheet(samples + scene_results["rows"]).save(out / "samples.png")
    (out / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _by_factor(labels: torch.Tensor, top1: dict[str, list[float]]) -> dict:
    """``count_by_<factor>`` (value -> images) and, per kind, ``id_top1_by_<factor>`` (value -> mean top-1) for the
    images whose contexts are ``labels`` (N, factors)."""
    out: dict = {}
    for i, factor in enumerate(FACTOR_NAMES):
        present = [(v, labels[:, i] == j) for j, v in enumerate(CONTEXT_FACTORS[factor]) if bool((labels[:, i] == j).any())]
        out[f"count_by_{factor}"] = {v: int(mask.sum()) for v, mask in present}
        for kind, hits in top1.items():
            hits_t = torch.tensor(hits)
            out[f"{PREFIX[kind]}id_top1_by_{factor}"] = {v: float(hits_t[mask].mean()) for v, mask in present}
    return out


def _scenes(pipe, na, identities, views, galleries, embedders, config: ToyEvalConfig, rng, bar) -> dict:
    """Person + pet images: both adapters, each subject bound to its own word."""
    n = config.identities
    pairs = [(int(rng.integers(n)), int(rng.integers(n))) for _ in range(config.scenes)]
    contexts = [sample_context(rng) for _ in pairs]
    pet_expressions = [int(rng.integers(len(CONTEXT_FACTORS["expression"]))) for _ in pairs]
    prompts = [scene_prompt("person", "pet", c, rng, pet_expression=e) for c, e in zip(contexts, pet_expressions)]
    seeds = [int(s) for s in rng.integers(2**31, size=len(prompts))]
    subjects = [{"person": Subject(views["person"][a], lam=config.lam), "pet": Subject(views["pet"][b], lam=config.lam)} for a, b in pairs]
    made = {
        "adapter": _generate(pipe, na, prompts, subjects, seeds, config, bar) if pairs else [],
        "baseline": _generate(pipe, None, prompts, None, seeds, config, bar) if pairs else [],
        "oracle": [render_scene(identities["person"][a], identities["pet"][b], c, 64, s, pet_expression=e).image
                   for (a, b), c, s, e in zip(pairs, contexts, seeds, pet_expressions)],
    }
    metrics = {}
    for kind, images in made.items():
        if not images:
            continue
        hits = {}
        for d, domain in enumerate(DOMAINS):
            hits[domain], _ = _scores(images, embedders[domain], galleries[domain], [p[d] for p in pairs])
            metrics[f"{PREFIX[kind]}scene_{domain}_top1"] = float(np.mean(hits[domain]))
        metrics[f"{PREFIX[kind]}scene_both_top1"] = float(np.mean([a * b for a, b in zip(hits["person"], hits["pet"])]))
    rows = [[views["person"][a], views["pet"][b]] + [made[kind][i] for kind in KINDS]
            for i, (a, b) in enumerate(pairs[:4])]
    return {"metrics": metrics, "rows": rows}


def _sheet(rows: list[list[Image.Image]], size: int = 64, pad: int = 2) -> Image.Image:
    columns = max(len(r) for r in rows)
    sheet = Image.new("RGB", (pad + (size + pad) * columns, pad + (size + pad) * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            sheet.paste(tile.convert("RGB").resize((size, size)), (pad + c * (size + pad), pad + r * (size + pad)))
    return sheet
