"""Training triplets of the toy world for the adapter trainer: subject input view(s) -> prompt -> target view.

``masks/`` holds each target's subject silhouette (``target_mask``, for the trainer's ``subject_loss_weight``).

``write_triplets`` writes a folder the trainer reads as it is (``metadata.jsonl`` + PNGs; convert it to WebDataset
shards with ``python -m nested_attention_train.make_shards`` for streaming). Identities come from the training side
of the split only; each line also records the identity index and the context, for analysis.
"""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .render import render_input, render_target
from .world import (
    FACTOR_NAMES,
    identity_from_index,
    prompt,
    sample_context,
    sample_identities,
    side_size,
)


def _write_one(job: tuple) -> None:
    root, domain, index, context_values, size, seeds, name = job
    from .world import Context

    identity = identity_from_index(domain, index)
    for k, seed in enumerate(seeds[1:]):
        render_input(identity, size=size, seed=seed).save(root / "subjects" / f"{name}-{k}.png")
    context = Context(tuple(context_values))
    target = render_target(identity, context, size=size, seed=seeds[0])
    target.image.save(root / "targets" / f"{name}.png")
    Image.fromarray(np.round(target.subject * 255).astype(np.uint8), mode="L").save(root / "masks" / f"{name}.png")


def write_triplets(out: str | Path, domain: str, count: int, seed: int = 0, size: int = 64, subject_images: int = 1,
                   identities: int | None = None, workers: int = 2) -> Path:
    """Write ``count`` triplets of ``domain`` (train identities only) to the new folder ``out``; returns the
    metadata.jsonl path. ``identities`` bounds how many distinct identities are used (default: as many as
    triplets, or all training identities when there are fewer, so most appear once); ``subject_images`` input views
    per triplet, each with its own pose jitter."""
    root = Path(out)
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} is not empty; give a new folder.")
    if count < 1 or subject_images < 1:
        raise ValueError("count and subject_images must be >= 1")
    (root / "subjects").mkdir(parents=True, exist_ok=True)
    (root / "targets").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    available = side_size(domain, held_out=False)
    if identities is not None and identities > available:
        raise ValueError(f"asked for {identities} {domain} identities; the training side has {available}")
    # more triplets than training identities: every identity is used, and some more than once
    pool = sample_identities(domain, min(identities or count, count, available), rng, held_out=False)
    jobs, lines = [], []
    for i in range(count):
        identity = pool[i % len(pool)] if identities is None else pool[int(rng.integers(len(pool)))]
        context = sample_context(rng, domain)
        seeds = [int(s) for s in rng.integers(2**31, size=1 + subject_images)]
        name = f"{i:07d}"
        text = prompt(domain, context, rng)
        jobs.append((root, domain, identity.index, tuple(context.values), size, seeds, name))
        line = {
            "subject": [f"subjects/{name}-{k}.png" for k in range(subject_images)],
            "target": f"targets/{name}.png",
            "prompt": text,
            "word": domain,
            "identity": identity.index,
            "context": dict(zip(FACTOR_NAMES, (int(v) for v in context.values))),
        }
        line["target_mask"] = f"masks/{name}.png"
        lines.append(line)
    if workers > 1 and count >= 256:
        with ProcessPoolExecutor(workers) as pool_:
            list(tqdm(pool_.map(_write_one, jobs, chunksize=64), total=count, desc=f"{domain} triplets", leave=False))
    else:
        for job in tqdm(jobs, desc=f"{domain} triplets", leave=False):
            _write_one(job)
    path = root / "metadata.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path
