"""Rendered training and evaluation sets of the toy world: images with captions and ground truth.

A corpus holds target views (one subject in a random context, captioned with the generic prompt) and input views
(captioned "a portrait of a ..., plain background"), or person + pet scenes (twice as wide: their own corpus, since a
batch has one shape). Everything is a function of the seed.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from .render import render_input, render_scene, render_target, split_scene
from .world import (
    DOMAINS,
    FACTOR_NAMES,
    SCENE,
    Identity,
    described_caption,
    generic_caption,
    input_caption,
    sample_context,
    sample_identities,
    scene_prompt,
    side_size,
)


def _render_one(job: tuple) -> np.ndarray:
    """(3 + M, S, W) uint8 with M mask planes (0, 1 or 2): a target view's subject coverage (0-255), then its emotion
    symbol's; a scene's (W = 2 S) person coverage, then its pet's; zeros for input views. Kind "scene-half" is the
    half of a scene that holds the subject's domain (subject: ((person, pet), domain)), square."""
    kind, subject, context, size, seed, *rest = job
    planes = rest[0] if rest else 0
    masks: list[np.ndarray] = []
    if kind == "input":
        image = render_input(subject, size=size, seed=seed)
    elif kind == "target":
        rendered = render_target(subject, context, size=size, seed=seed)
        image, masks = rendered.image, [rendered.subject, rendered.symbol][:planes]
    elif kind == "scene":
        rendered = render_scene(subject[0], subject[1], context, size=size, seed=seed)
        image, masks = rendered.image, [rendered.subject, rendered.pet][:planes]
    else:
        pair, domain = subject
        image = split_scene(render_scene(*pair, context, size=size, seed=seed).image, context)[domain]
    array = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)
    if not planes:
        return array
    extra = np.zeros((planes, *array.shape[1:]), np.uint8)
    for i, mask in enumerate(masks):
        extra[i] = np.round(mask * 255).astype(np.uint8)
    return np.concatenate([array, extra])


def render_jobs(jobs: list[tuple], workers: int, desc: str) -> torch.Tensor:
    """Render ``(kind, subject, context, size, seed[, mask_planes])`` jobs of one shape -> (N, 3 + mask_planes, S, W)
    uint8 (see ``_render_one``); kind is "input", "target" (subject an Identity), "scene" (subject a (person, pet)
    pair) or "scene-half".
    ``workers`` > 1 renders in that many processes."""
    if workers <= 1 or len(jobs) < 256:
        arrays = [_render_one(job) for job in tqdm(jobs, desc=desc, leave=False)]
    else:
        with ProcessPoolExecutor(workers) as pool:
            arrays = list(tqdm(pool.map(_render_one, jobs, chunksize=64), total=len(jobs), desc=desc, leave=False))
    return torch.from_numpy(np.stack(arrays))


@dataclass
class Corpus:
    """``images`` (N, 3, S, W) uint8 with their captions; ``factors`` (N, 4) context value indices (-1 for input
    views); ``domains`` (N,) 0 person, 1 pet, 2 person + pet scene; ``kinds`` "target" / "input" / "scene".
    ``make_corpus`` makes the square renders (targets and input views), ``make_scenes`` the scenes (W = 2 S).
    ``masks`` (N, S, W) uint8 coverage of the target views' subject or the scenes' person (zeros for input views), when
    made with masks; ``symbols`` that of the targets' emotion symbols (what the expression word names), when made with
    symbols; ``pets`` that of the scenes' pet."""

    images: torch.Tensor
    captions: list[str]
    factors: torch.Tensor
    domains: torch.Tensor
    kinds: list[str] = field(default_factory=list)
    masks: torch.Tensor | None = None
    symbols: torch.Tensor | None = None
    pets: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.captions)

    def factor_labels(self) -> dict[str, torch.Tensor]:
        return {f: self.factors[:, i] for i, f in enumerate(FACTOR_NAMES)}


def _pools(count: int, held_out: bool, identity_pool: int, rng: np.random.Generator) -> dict[str, list[Identity]]:
    return {d: sample_identities(d, min(identity_pool, max(1, count), side_size(d, held_out)), rng, held_out=held_out)
            for d in DOMAINS}


def _pick(pool: list[Identity], rng: np.random.Generator) -> Identity:
    return pool[int(rng.integers(len(pool)))]


def make_corpus(count: int, seed: int, size: int = 64, held_out: bool = False, workers: int = 2,
                input_fraction: float = 0.1, identity_pool: int = 4000, desc: str = "render", masks: bool = False,
                describe_rate: float = 0.0, symbols: bool = False) -> Corpus:
    """``count`` square renders of identities from one side of the split (train unless ``held_out``); captions draw
    their template at random. Domains alternate; ``input_fraction`` are input views, the rest target views.
    ``masks`` also keeps the target views' subject silhouettes, ``symbols`` (with ``masks``) their emotion symbols;
    the images are the same either way.
    ``describe_rate`` of the target and input views get a caption that also names a few of the subject's attributes
    (``described_caption``); it is drawn from its own random stream, so the images do not depend on it."""
    if symbols and not masks:
        raise ValueError("symbols=True needs masks=True")
    planes = 2 if symbols else 1 if masks else 0
    rng = np.random.default_rng(seed)
    describe_rng = np.random.default_rng([seed, 1])
    pools = _pools(count, held_out, identity_pool, rng)
    jobs, captions, factors, domains, kinds = [], [], [], [], []
    for i in range(count):
        u = rng.random()
        context = sample_context(rng)
        domain = i % 2
        subject = _pick(pools[DOMAINS[domain]], rng)
        if u < input_fraction:
            kind, caption = "input", input_caption(DOMAINS[domain])
        else:
            kind, caption = "target", generic_caption(DOMAINS[domain], context, rng)
        if describe_rng.random() < describe_rate:
            caption = described_caption(subject, context if kind == "target" else None, describe_rng)
        jobs.append((kind, subject, context if kind != "input" else None, size, int(rng.integers(2**31)), planes))
        captions.append(caption)
        factors.append(tuple(context.values) if kind != "input" else (-1,) * len(FACTOR_NAMES))
        domains.append(domain)
        kinds.append(kind)
    rendered = render_jobs(jobs, workers, desc)
    return Corpus(rendered[:, :3].contiguous(), captions, torch.tensor(factors, dtype=torch.long).view(-1, len(FACTOR_NAMES)),
                  torch.tensor(domains, dtype=torch.long), kinds, rendered[:, 3].contiguous() if planes else None,
                  rendered[:, 4].contiguous() if planes == 2 else None)


def make_scenes(count: int, seed: int, size: int = 64, held_out: bool = False, workers: int = 2,
                identity_pool: int = 4000, desc: str = "render scenes", masks: bool = False) -> Corpus:
    """``count`` person + pet scenes (``size`` x ``2 * size``) of random pairs from one side of the split, in random
    scene contexts, with their scene prompts (each subject's own expression); ``masks`` keeps the person's and the
    pet's coverage (``masks``, ``pets``)."""
    planes = 2 if masks else 0
    rng = np.random.default_rng([seed, 2])
    pools = _pools(count, held_out, identity_pool, rng)
    jobs, captions, factors = [], [], []
    for _ in range(count):
        context = sample_context(rng, SCENE)
        pair = (_pick(pools["person"], rng), _pick(pools["pet"], rng))
        captions.append(scene_prompt("person", "pet", context, rng))
        jobs.append(("scene", pair, context, size, int(rng.integers(2**31)), planes))
        factors.append(tuple(context.values))
    rendered = render_jobs(jobs, workers, desc)
    return Corpus(rendered[:, :3].contiguous(), captions, torch.tensor(factors, dtype=torch.long).view(-1, len(FACTOR_NAMES)),
                  torch.full((count,), 2, dtype=torch.long), ["scene"] * count,
                  rendered[:, 3].contiguous() if masks else None, None, rendered[:, 4].contiguous() if masks else None)
