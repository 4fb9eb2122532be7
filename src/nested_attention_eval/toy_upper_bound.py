"""How much identity a toy base model can draw at all: the upper bound of any method that leaves its UNet frozen.

Nested attention (like IP-Adapter or textual inversion) only conditions a frozen denoiser, so it cannot make the
denoiser draw a subject better than the denoiser can when trained on that very subject. This fine-tunes the whole
UNet on renders of one held-out identity (DreamBooth without a rare token: the generic captions every generation
uses, so the subject word comes to mean that identity), then generates it in fresh contexts and asks the identity
network to retrieve it among the held-out gallery, exactly as ``toy eval`` scores ``id_top1``.

``python -m nested_attention_eval.toy_upper_bound [--domain pet] [--steps 400] [--subjects 3]`` prints, per tuned
subject, top-1 among ``--identities`` held-out input views (chance 1/20) for the base and the tuned UNet, and which
attributes the tuned UNet's generations carry (how often the identity network reads the subject's true value). The
identity networks are the build's own (``metrics/`` beside its pipeline), or the shipped ones.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass

import numpy as np
import torch

from nested_attention.errors import NestedAttentionError, exits_on_error
from nested_attention_toy.assets import shipped_path
from nested_attention_toy.autoencoder import encode_latents
from nested_attention_toy.diffusion import train_unet
from nested_attention_toy.metric_models import retrieval_hits
from nested_attention_toy.render import render_input, render_target
from nested_attention_toy.text_image import tokenize
from nested_attention_toy.world import DOMAINS, attribute_names, generic_caption, sample_context, sample_identities

from .toy_scorers import ToyIdentityEmbedder, load_build_pipeline, to_uint8

NAME = "bound"  # nested-attention toy diagnose NAME


@dataclass
class UpperBound:
    domain: str = "person"
    identities: int = 20  # the retrieval gallery (held-out input views)
    subjects: int = 3  # how many of them get a UNet tuned on them
    renders: int = 256  # training renders of a subject, random contexts
    steps: int = 400
    batch_size: int = 16
    lr: float = 1e-4
    generations: int = 16  # per subject, fresh contexts
    sample_steps: int = 20
    guidance: float = 5.0
    seed: int = 0


def _generate(pipe, unet, prompts: list[str], seeds: list[int], config: UpperBound):
    pipe.unet = unet.eval()
    return pipe(prompts, num_inference_steps=config.sample_steps, guidance_scale=config.guidance,
                generator=[torch.Generator().manual_seed(s) for s in seeds]).images


def upper_bound(pipe, config: UpperBound, log=print, metrics=None) -> list[dict]:
    """Per tuned subject: ``base_top1``, ``tuned_top1`` and ``tuned_attributes`` (name -> rate). ``pipe`` is a toy
    `StableDiffusionPipeline` (fp32); its UNet is restored afterwards. ``metrics``: the build's metric-model folder
    (default: the shipped build's)."""
    rng = np.random.default_rng(config.seed)
    identities = sample_identities(config.domain, config.identities, rng, held_out=True)
    embedder = ToyIdentityEmbedder(config.domain, metrics)
    gallery = embedder.embed([render_input(identity, 64, int(rng.integers(2**31))) for identity in identities])
    base = pipe.unet
    with torch.no_grad():
        null = pipe.text_encoder(tokenize(pipe.tokenizer, [""])).last_hidden_state[0]
    results = []
    try:
        for who in range(config.subjects):
            contexts = [sample_context(rng, config.domain) for _ in range(config.renders)]
            images = [render_target(identities[who], c, 64, int(rng.integers(2**31))).image for c in contexts]
            captions = [generic_caption(config.domain, c, rng) for c in contexts]
            with torch.no_grad():
                means, stds = encode_latents(pipe.vae, to_uint8(images, 64))
                states = pipe.text_encoder(tokenize(pipe.tokenizer, captions)).last_hidden_state
            tuned, losses = train_unet(copy.deepcopy(base), means, stds, pipe.vae.config.scaling_factor, states, null,
                                       config.steps, batch_size=config.batch_size, lr=config.lr, ema_decay=0.9, seed=who)
            fresh = [sample_context(rng, config.domain) for _ in range(config.generations)]
            prompts = [generic_caption(config.domain, c, rng) for c in fresh]
            seeds = [int(s) for s in rng.integers(2**31, size=len(prompts))]
            result = {"subject": who, "loss_first": losses[0], "loss_last": losses[-1]}
            for kind, unet in (("base", base), ("tuned", tuned)):
                made = _generate(pipe, unet, prompts, seeds, config)
                hits, _ = retrieval_hits(embedder.embed(made), gallery, torch.full((len(made),), who))
                result[f"{kind}_top1"] = float(hits.float().mean())
                read = embedder.attributes(made)
                result[f"{kind}_attributes"] = {name: float((read[name] == identities[who].attributes[a]).float().mean())
                                                for a, name in enumerate(attribute_names(config.domain))}
            log(f"{config.domain} subject {who}: top-1 among {config.identities} base {result['base_top1']:.2f}, "
                f"tuned {result['tuned_top1']:.2f} (loss {losses[0]:.3f} -> {losses[-1]:.3f}); tuned attributes "
                + ", ".join(f"{k} {v:.2f}" for k, v in result["tuned_attributes"].items()))
            results.append(result)
    finally:
        pipe.unet = base
    return results


@exits_on_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"nested-attention toy diagnose {NAME}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domain", choices=DOMAINS, default="person")
    parser.add_argument("--steps", type=int, default=UpperBound.steps)
    parser.add_argument("--subjects", type=int, default=UpperBound.subjects)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=str(shipped_path("pipeline")), help="toy build or pipeline folder (default: the shipped one)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        raise NestedAttentionError(f"--steps is {args.steps}; expected at least 1 training step.")
    if not 1 <= args.subjects <= UpperBound.identities:
        raise NestedAttentionError(f"--subjects is {args.subjects}; expected 1 to {UpperBound.identities} (the "
                                   f"subjects are drawn from the {UpperBound.identities} held-out identities scored).")
    pipe, metrics = load_build_pipeline(args.model)
    results = upper_bound(pipe, UpperBound(domain=args.domain, steps=args.steps, subjects=args.subjects, seed=args.seed),
                          metrics=metrics)
    print(f"mean top-1: base {np.mean([r['base_top1'] for r in results]):.3f}, "
          f"tuned {np.mean([r['tuned_top1'] for r in results]):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
