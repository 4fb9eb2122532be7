"""Build stage: the metric models (factor classifier, identity networks), trained on train identities and
measured on held-out ones against the issue's bars."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .corpus import render_jobs
from .metric_models import FactorClassifier, IdentityNet, MetricConfig, head_accuracy, retrieval_top1, train_multihead
from .world import (
    CONTEXT_FACTORS,
    DOMAINS,
    FACTOR_NAMES,
    SCENE,
    attribute_names,
    attribute_values,
    sample_context,
    sample_identities,
    side_size,
)


@dataclass
class Rendered:
    """Renders and their ground truth: images (N, 3, S, S) uint8, factor and attribute labels, domain per image."""

    images: torch.Tensor
    factors: dict[str, torch.Tensor]
    attributes: dict[str, torch.Tensor]  # only for single-domain sets
    domains: torch.Tensor


def make_set(domains, count, held_out, size, seed, workers, input_fraction=0.0, desc="render") -> Rendered:
    """`count` renders split evenly over `domains`, identities from one side of the split, random contexts.
    ``input_fraction`` of them are input views."""
    rng = np.random.default_rng(seed)
    jobs, factor_labels, attribute_labels, domain_labels = [], [], [], []
    for d, domain in enumerate(domains):
        n = count // len(domains)
        pool = sample_identities(domain, min(n, 4000, side_size(domain, held_out)), rng, held_out=held_out)
        for _ in range(n):
            identity = pool[int(rng.integers(len(pool)))]
            context = sample_context(rng, domain)
            kind = "input" if rng.random() < input_fraction else "target"
            jobs.append((kind, identity, context, size, int(rng.integers(2**31))))
            factor_labels.append(tuple(context.values))
            attribute_labels.append(identity.attributes)
            domain_labels.append(d)
    images = render_jobs(jobs, workers, desc)
    factors = torch.tensor(factor_labels)
    rendered = Rendered(images, {f: factors[:, i] for i, f in enumerate(FACTOR_NAMES)}, {}, torch.tensor(domain_labels))
    if len(domains) == 1:
        attributes = torch.tensor(attribute_labels)
        rendered.attributes = {a: attributes[:, i] for i, a in enumerate(attribute_names(domains[0]))}
    return rendered


def retrieval_sets(domain, identities, queries_per_identity, size, seed, workers, partners=None):
    """Gallery: one input view per held-out identity; queries: target renders in random contexts, or with
    ``partners`` (identities of the other domain) the identity's half of person + pet scenes with a random partner."""
    rng = np.random.default_rng(seed)
    gallery_jobs = [("input", identity, None, size, int(rng.integers(2**31))) for identity in identities]
    query_jobs, query_ids = [], []
    for i, identity in enumerate(identities):
        for _ in range(queries_per_identity):
            if partners is None:
                context = sample_context(rng, domain)
                query_jobs.append(("target", identity, context, size, int(rng.integers(2**31))))
            else:
                context = sample_context(rng, SCENE)
                partner = partners[int(rng.integers(len(partners)))]
                pair = (identity, partner) if domain == "person" else (partner, identity)
                query_jobs.append(("scene-half", (pair, domain), context, size, int(rng.integers(2**31))))
            query_ids.append(i)
    return (render_jobs(gallery_jobs, workers, f"{domain} gallery"), render_jobs(query_jobs, workers, f"{domain} queries"),
            torch.tensor(query_ids))


def build_metric_models(out: Path, size: int = 64, train_count: int = 40000, epochs: int = 6, seed: int = 0,
                        workers: int = 2, eval_identities: int = 50, identity_width: int = 48, device: str = "cpu",
                        test_count: int = 2000, queries_per_identity: int = 10, identity_count: int | None = None,
                        identity_epochs: int | None = None, identity_blur: float = 0.0, log=print) -> dict:
    """Train and save `out/factor_classifier` (``train_count`` renders, ``epochs``) and `out/identity_<domain>`
    (``identity_count`` renders per domain, default half of ``train_count``, ``identity_epochs``, default ``epochs``,
    blur augmentation up to ``identity_blur`` pixels); return the held-out measurements (retrieval among
    ``eval_identities`` of single-subject renders and of the subject's half of person + pet scenes)."""
    identity_count = train_count // 2 if identity_count is None else identity_count
    identity_epochs = epochs if identity_epochs is None else identity_epochs
    torch.manual_seed(seed)
    results: dict = {"train_count": train_count, "epochs": epochs, "identity_count": identity_count,
                     "identity_epochs": identity_epochs, "size": size}
    started = time.perf_counter()

    train = make_set(DOMAINS, train_count, held_out=False, size=size, seed=seed, workers=workers, desc="factor train")
    classifier = FactorClassifier(MetricConfig({f: len(v) for f, v in CONTEXT_FACTORS.items()}, image_size=size))
    losses = train_multihead(classifier, train.images, train.factors, epochs=epochs, seed=seed, device=device)
    test = make_set(DOMAINS, test_count, held_out=True, size=size, seed=seed + 1, workers=workers, desc="factor test")
    results["factor_accuracy"] = head_accuracy(classifier, test.images, test.factors)
    results["factor_losses"] = losses
    classifier.save_pretrained(out / "factor_classifier")
    log(f"factor classifier: held-out accuracy {results['factor_accuracy']}")

    for d, domain in enumerate(DOMAINS):
        train = make_set((domain,), identity_count, held_out=False, size=size, seed=seed + 10 + d, workers=workers,
                         input_fraction=0.25, desc=f"{domain} train")
        heads = {a: len(attribute_values(domain, a)) for a in attribute_names(domain)}
        net = IdentityNet(MetricConfig(heads, image_size=size, width=identity_width))
        train_multihead(net, train.images, train.attributes, epochs=identity_epochs, seed=seed, device=device,
                        blur=identity_blur)
        test = make_set((domain,), test_count, held_out=True, size=size, seed=seed + 20 + d, workers=workers, desc=f"{domain} test")
        results[f"identity_{domain}_attribute_accuracy"] = head_accuracy(net, test.images, test.attributes)
        identities = sample_identities(domain, eval_identities, np.random.default_rng(seed + 30 + d), held_out=True)
        gallery, queries, query_ids = retrieval_sets(domain, identities, queries_per_identity, size, seed + 40 + d, workers)
        results[f"identity_{domain}_top1"] = retrieval_top1(net, gallery, queries, query_ids)
        other = DOMAINS[1 - d]
        partners = sample_identities(other, eval_identities, np.random.default_rng(seed + 50 + d), held_out=True)
        _, scenes, scene_ids = retrieval_sets(domain, identities, queries_per_identity, size, seed + 60 + d, workers,
                                              partners=partners)
        results[f"identity_{domain}_scene_top1"] = retrieval_top1(net, gallery, scenes, scene_ids)
        net.save_pretrained(out / f"identity_{domain}")
        log(f"identity {domain}: retrieval top-1 among {eval_identities} held-out identities "
            f"{results[f'identity_{domain}_top1']:.3f}, in person + pet scenes {results[f'identity_{domain}_scene_top1']:.3f}")
    results["seconds"] = time.perf_counter() - started
    (out / "metric_models.json").write_text(json.dumps(results, indent=2))
    return results
