"""What a toy build's VAE latents keep: the metric models read held-out renders after an encode-decode round trip.

The base model draws into the VAE's latents, so nothing the decoder loses can appear in a generation: the factor
classifier's accuracy on reconstructions is the ceiling of the base model's prompt-factor accuracy (the emotion
symbol, about 3 x 3 latent pixels, is what a plain L1 + MSE autoencoder loses first), and identity retrieval of
reconstructions the ceiling of an adapter's ``id_top1``.

``python -m nested_attention_toy.latent_check [--model DIR]`` (about a minute) prints, for 400 held-out renders in random contexts
(seed 7) and 50 held-out identities per domain (6 queries each against one input view, seed 11): the PSNR, the
factor classifier's accuracy per factor on the reconstructions and identity top-1 of the reconstructed queries. The
metric models are the build's own (or ``--metrics``: another build's, so that two VAEs are judged alike).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from nested_attention.errors import NestedAttentionError, exits_on_error

from .autoencoder import reconstruction_psnr, round_trip
from .build_metrics import make_set, retrieval_sets
from .metric_models import FactorClassifier, IdentityNet, head_accuracy, retrieval_top1
from .world import DOMAINS, sample_identities

NAME = "latents"  # nested-attention toy diagnose NAME


def vae_identity(vae: AutoencoderKL, metrics_dir, identities: int, queries: int, seed: int, workers: int = 2) -> dict:
    """Per domain, retrieval top-1 of VAE round trips of held-out target renders (``queries`` per identity) against
    one real input view of each of ``identities`` held-out identities: the ceiling of any generation's identity,
    whatever draws the latents."""
    result = {}
    for d, domain in enumerate(DOMAINS):
        net = IdentityNet.from_pretrained(Path(metrics_dir) / f"identity_{domain}")
        subjects = sample_identities(domain, identities, np.random.default_rng(seed + d), held_out=True)
        gallery, query, owners = retrieval_sets(domain, subjects, queries, 64, seed + d, workers)
        result[domain] = retrieval_top1(net, gallery, round_trip(vae, query), owners)
    return result


def latent_check(vae: AutoencoderKL, metrics_dir, renders: int = 400, identities: int = 50, queries: int = 6,
                 workers: int = 2) -> dict:
    """PSNR, ``factors`` (accuracy per factor on reconstructions) and ``id_top1`` per domain (reconstructed queries
    against real input views), on held-out identities only."""
    metrics_dir = Path(metrics_dir)
    vae = vae.float().eval()
    test = make_set(DOMAINS, renders, True, 64, 7, workers)
    return {"psnr_db": reconstruction_psnr(vae, test.images),
            "factors": head_accuracy(FactorClassifier.from_pretrained(metrics_dir / "factor_classifier"),
                                     round_trip(vae, test.images), test.factors),
            "id_top1": vae_identity(vae, metrics_dir, identities, queries, seed=11, workers=workers)}


@exits_on_error
def main(argv: list[str] | None = None) -> int:
    """``python -m nested_attention_toy.latent_check [--model DIR] [--metrics DIR] [--renders N] [--identities N]``."""
    import argparse

    from .assets import build_part, shipped_path

    parser = argparse.ArgumentParser(prog=f"nested-attention toy diagnose {NAME}", description=main.__doc__)
    parser.add_argument("--model", default=str(shipped_path("pipeline")), help="pipeline folder (default: the shipped toy)")
    parser.add_argument("--metrics", help="metric models (default: the build's own, else the shipped ones)")
    parser.add_argument("--renders", type=int, default=400, help="held-out renders for the factors (default: 400)")
    parser.add_argument("--identities", type=int, default=50, help="held-out identities per domain (default: 50)")
    args = parser.parse_args(argv)
    if args.renders < 1 or args.identities < 2:
        raise NestedAttentionError(f"--renders {args.renders} and --identities {args.identities}: expected at least "
                                   f"1 render and 2 identities to retrieve among.")
    model = build_part(args.model, "pipeline", "vae/config.json")
    beside = model.parent / "metrics"
    default = beside if (beside / "factor_classifier" / "config.json").is_file() else shipped_path("metrics")
    metrics = build_part(args.metrics or default, "metrics", "factor_classifier/config.json")
    vae = AutoencoderKL.from_pretrained(str(model / "vae"), torch_dtype=torch.float32)
    result = latent_check(vae, metrics, renders=args.renders, identities=args.identities)
    factors = ", ".join(f"{name} {100 * value:.1f} %" for name, value in result["factors"].items())
    ids = ", ".join(f"{domain} {value:.2f}" for domain, value in result["id_top1"].items())
    print(f"PSNR {result['psnr_db']:.1f} dB\nfactors read on reconstructions: {factors}\nidentity top-1 of reconstructions: {ids}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
