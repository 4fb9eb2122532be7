"""How often a toy base model draws an attribute that its prompt names: the learnability of the world's identities.

A text-to-image model that cannot draw "red hair" when told to cannot draw it from nested attention's per-pixel
values either. For held-out identities in random contexts this prompts the base model with a described caption that
names one of the identity's attributes ("a sad red hair person on the beach, on the left"), generates, and asks the
identity network which value it sees. ``named`` is how often it reads the named value; ``unnamed`` the same for the
generic prompt of the same context and seed (what the model draws of that value unprompted, the baseline).

``python -m nested_attention_eval.toy_named --model DIR [--domain pet] [--generations 64]`` prints both rates per
attribute; the identity networks are the build's own (``metrics/`` beside its pipeline), or the shipped ones.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from nested_attention.errors import NestedAttentionError, exits_on_error
from nested_attention_toy.assets import shipped_path
from nested_attention_toy.world import (
    DOMAINS,
    attribute_names,
    attribute_phrase,
    attribute_values,
    generic_caption,
    prompt,
    sample_context,
    sample_identities,
    side_size,
)

from .toy_scorers import ToyIdentityEmbedder, load_build_pipeline

NAME = "named"  # nested-attention toy diagnose NAME


def named_attributes(pipe, domain: str, generations: int = 64, seed: int = 0, metrics=None, steps: int = 20,
                     guidance: float = 5.0) -> dict[str, dict[str, float]]:
    """Per attribute that captions can name: ``{"named": rate, "unnamed": rate, "count": n}``, and ``"all"``."""
    rng = np.random.default_rng(seed)
    embedder = ToyIdentityEmbedder(domain, metrics)
    names = attribute_names(domain)
    pool = sample_identities(domain, min(generations, side_size(domain, held_out=True)), rng, held_out=True)
    described, plain, asked = [], [], []
    for i in range(generations):
        identity = pool[i % len(pool)]
        context = sample_context(rng, domain)
        options = [n for n in names if attribute_phrase(domain, n, identity.value(n))]
        name = options[int(rng.integers(len(options)))]
        described.append(prompt(domain, context, description=attribute_phrase(domain, name, identity.value(name))))
        plain.append(generic_caption(domain, context))
        asked.append((name, identity.attributes[names.index(name)]))
    seeds = [int(s) for s in rng.integers(2**31, size=generations)]
    reads = {}
    for kind, prompts in (("named", described), ("unnamed", plain)):
        images = []
        for i in range(0, generations, 16):
            images += pipe(prompts[i:i + 16], num_inference_steps=steps, guidance_scale=guidance,
                           generator=[torch.Generator().manual_seed(s) for s in seeds[i:i + 16]]).images
        reads[kind] = embedder.attributes(images)
    results: dict[str, dict[str, float]] = {}
    for name in names + ["all"]:
        rows = [i for i, (n, _) in enumerate(asked) if name in (n, "all")]
        if not rows:
            continue
        results[name] = {"count": len(rows)} | {
            kind: float(np.mean([int(reads[kind][asked[i][0]][i]) == asked[i][1] for i in rows])) for kind in reads}
    return results


@exits_on_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"nested-attention toy diagnose {NAME}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domain", choices=DOMAINS, default="person")
    parser.add_argument("--generations", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=str(shipped_path("pipeline")), help="toy build or pipeline folder (default: the shipped one)")
    args = parser.parse_args(argv)
    if args.generations < 1:
        raise NestedAttentionError(f"--generations is {args.generations}; expected at least 1.")
    pipe, metrics = load_build_pipeline(args.model)
    results = named_attributes(pipe, args.domain, args.generations, args.seed, metrics)
    for name, row in results.items():
        chance = "" if name == "all" else f" (chance {1 / len(attribute_values(args.domain, name)):.2f})"
        print(f"{args.domain} {name}: named {row['named']:.2f}, unnamed {row['unnamed']:.2f}, n={row['count']}{chance}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
