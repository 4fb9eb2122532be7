"""How much identity a toy base model can draw at all: the upper bounds of frozen-UNet methods and of nested attention.

Nested attention (like IP-Adapter or textual inversion) only conditions a frozen denoiser, so it cannot make the
denoiser draw a subject better than the denoiser can when trained on that very subject. ``--tune unet`` fine-tunes the
whole UNet on renders of one held-out identity (DreamBooth without a rare token: the generic captions every
generation uses, so the subject word comes to mean that identity). ``--tune tokens`` keeps the UNet frozen and
learns, for that one identity, the nested keys and values of every cross-attention layer directly (``--tokens`` of
them, with the adapter's norm regularization ``--alpha``): nested attention with a perfect encoder, the bound of any
adapter that feeds this mechanism. Either way it then generates the subject in fresh contexts and asks the identity
network to retrieve it among the held-out gallery, exactly as ``toy eval`` scores ``id_top1``.

``nested-attention toy diagnose bound [--tune tokens] [--domain pet] [--steps 400] [--subjects 3]`` prints, per tuned
subject, top-1 among ``--identities`` held-out input views (chance 1/20) for the base and the tuned model, and which
attributes the tuned model's generations carry (how often the identity network reads the subject's true value). The
identity networks are the build's own (``metrics/`` beside its pipeline), or the shipped ones.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass

import numpy as np
import torch

from nested_attention import BoundSubject, install
from nested_attention.errors import NestedAttentionError, exits_on_error
from nested_attention_toy.assets import shipped_path
from nested_attention_toy.autoencoder import encode_latents
from nested_attention_toy.diffusion import train_unet, training_scheduler
from nested_attention_toy.grounding import word_positions
from nested_attention_toy.metric_models import retrieval_hits
from nested_attention_toy.render import render_input, render_target
from nested_attention_toy.text_image import tokenize
from nested_attention_toy.world import DOMAINS, attribute_names, generic_caption, sample_context, sample_identities
from nested_attention_train.timesteps import snr_loss_weights

from .toy_scorers import ToyIdentityEmbedder, load_build_pipeline, to_uint8

NAME = "bound"  # nested-attention toy diagnose NAME


@dataclass
class UpperBound:
    domain: str = "person"
    tune: str = "unet"  # unet: the whole UNet; tokens: the nested keys and values of a frozen UNet
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
    tokens: int = 16  # tune tokens: nested tokens per layer (the toy adapters' num_queries)
    alpha: float | None = 2.0  # tune tokens: the norm regularization (the toy adapters' alpha)
    token_lr: float = 1e-2  # tune tokens: Adam's learning rate


def _generate(pipe, unet, prompts: list[str], seeds: list[int], config: UpperBound, tokens=None, controller=None):
    pipe.unet = unet.eval()
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    if tokens is None:
        return pipe(prompts, num_inference_steps=config.sample_steps, guidance_scale=config.guidance,
                    generator=generators).images
    positions = word_positions(pipe.tokenizer, prompts, [config.domain] * len(prompts))
    mask = torch.zeros(len(prompts), pipe.tokenizer.model_max_length, dtype=torch.bool)
    mask[torch.arange(len(prompts)), positions] = True
    nested = {path: (key.detach(), value.detach()) for path, (key, value) in tokens.items()}
    subject = BoundSubject(mask, torch.zeros(len(prompts), dtype=torch.long), nested, alpha=config.alpha)
    with controller.bound([subject]):
        return pipe(prompts, num_inference_steps=config.sample_steps, guidance_scale=config.guidance,
                    generator=generators).images


def tune_tokens(unet, controller, means, stds, scaling_factor: float, states: torch.Tensor, positions: torch.Tensor,
                config: UpperBound, seed: int) -> tuple[dict, list[float]]:
    """Nested keys and values for one subject learned with the diffusion loss through the frozen ``unet`` (min-SNR-5
    weighting, as the toy UNet trained). Values start at the subject word's own value in the first caption (the
    base model's output), keys at small random vectors. Returns layer path -> (K̆, V̆), each (1, H, M, d), and the
    loss every 50 steps."""
    generator = torch.Generator().manual_seed(seed)
    tokens = {}
    for path, layer in controller.layers.items():
        attention = unet.get_submodule(path)
        with torch.no_grad():
            own = attention.to_v(states[:1, positions[0]]).view(1, layer.heads, 1, layer.head_dim)
        key = torch.randn((1, layer.heads, config.tokens, layer.head_dim), generator=generator) * 0.1
        value = own.expand(-1, -1, config.tokens, -1) + 0.01 * torch.randn(key.shape, generator=generator)
        tokens[path] = (torch.nn.Parameter(key), torch.nn.Parameter(value.contiguous()))
    optimizer = torch.optim.Adam([p for pair in tokens.values() for p in pair], lr=config.token_lr)
    scheduler = training_scheduler()
    losses = []
    for _ in range(config.steps):
        index = torch.randint(len(means), (config.batch_size,), generator=generator)
        latents = (means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)) * scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (config.batch_size,), generator=generator)
        mask = torch.zeros(config.batch_size, states.shape[1], dtype=torch.bool)
        mask[torch.arange(config.batch_size), positions[index]] = True
        subject = BoundSubject(mask, torch.zeros(config.batch_size, dtype=torch.long), dict(tokens), alpha=config.alpha)
        with controller.bound([subject]):
            pred = unet(scheduler.add_noise(latents, noise, t), t, states[index]).sample
        loss = (snr_loss_weights(scheduler, t, 5.0) * (pred - noise).pow(2).flatten(1).mean(1)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return tokens, [float(np.mean(losses[i:i + 50])) for i in range(0, len(losses), 50)]


def upper_bound(pipe, config: UpperBound, log=print, metrics=None) -> list[dict]:
    """Per tuned subject: ``base_top1``, ``tuned_top1`` and ``tuned_attributes`` (name -> rate). ``pipe`` is a toy
    `StableDiffusionPipeline` (fp32); its UNet (and, for ``tune="tokens"``, its attention processors) is restored
    afterwards. ``metrics``: the build's metric-model folder (default: the shipped build's)."""
    if config.tune not in ("unet", "tokens"):
        raise NestedAttentionError(f"The bound tunes 'unet' or 'tokens'; got {config.tune!r}.")
    rng = np.random.default_rng(config.seed)
    identities = sample_identities(config.domain, config.identities, rng, held_out=True)
    embedder = ToyIdentityEmbedder(config.domain, metrics)
    gallery = embedder.embed([render_input(identity, 64, int(rng.integers(2**31))) for identity in identities])
    base = pipe.unet
    trainable = [p.requires_grad for p in base.parameters()]
    controller = install(base.requires_grad_(False)) if config.tune == "tokens" else None
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
            if controller is None:
                tuned, losses = train_unet(copy.deepcopy(base), means, stds, pipe.vae.config.scaling_factor, states,
                                           null, config.steps, batch_size=config.batch_size, lr=config.lr,
                                           ema_decay=0.9, seed=who)
                subject = None
            else:  # the UNet stays frozen; only the tokens learn
                positions = word_positions(pipe.tokenizer, captions, [config.domain] * len(captions))
                subject, losses = tune_tokens(base, controller, means, stds, pipe.vae.config.scaling_factor, states,
                                              positions, config, seed=who)
                tuned = base
            fresh = [sample_context(rng, config.domain) for _ in range(config.generations)]
            prompts = [generic_caption(config.domain, c, rng) for c in fresh]
            seeds = [int(s) for s in rng.integers(2**31, size=len(prompts))]
            result = {"subject": who, "loss_first": losses[0], "loss_last": losses[-1]}
            for kind, unet, bound in (("base", base, None), ("tuned", tuned, subject)):
                made = _generate(pipe, unet, prompts, seeds, config, bound, controller)
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
        if controller is not None:
            controller.uninstall()
        for parameter, flag in zip(base.parameters(), trainable):
            parameter.requires_grad_(flag)
    return results


@exits_on_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"nested-attention toy diagnose {NAME}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domain", choices=DOMAINS, default="person")
    parser.add_argument("--tune", choices=("unet", "tokens"), default="unet",
                        help="unet: fine-tune the whole UNet (the frozen-UNet bound); tokens: learn the nested keys and "
                             "values of a frozen UNet (nested attention with a perfect encoder)")
    parser.add_argument("--tokens", type=int, default=UpperBound.tokens,
                        help="--tune tokens: nested tokens per layer (1: one learned value per layer, no per-pixel choice)")
    parser.add_argument("--steps", type=int, default=UpperBound.steps)
    parser.add_argument("--subjects", type=int, default=UpperBound.subjects)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=str(shipped_path("pipeline")), help="toy build or pipeline folder (default: the shipped one)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        raise NestedAttentionError(f"--steps is {args.steps}; expected at least 1 training step.")
    if args.tokens < 1:
        raise NestedAttentionError(f"--tokens is {args.tokens}; expected at least 1 nested token per layer.")
    if not 1 <= args.subjects <= UpperBound.identities:
        raise NestedAttentionError(f"--subjects is {args.subjects}; expected 1 to {UpperBound.identities} (the "
                                   f"subjects are drawn from the {UpperBound.identities} held-out identities scored).")
    pipe, metrics = load_build_pipeline(args.model)
    config = UpperBound(domain=args.domain, tune=args.tune, steps=args.steps, subjects=args.subjects, seed=args.seed,
                        tokens=args.tokens)
    results = upper_bound(pipe, config, metrics=metrics)
    print(f"mean top-1: base {np.mean([r['base_top1'] for r in results]):.3f}, "
          f"tuned {np.mean([r['tuned_top1'] for r in results]):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
