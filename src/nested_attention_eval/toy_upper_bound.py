"""How much identity a toy base model can draw at all: the upper bounds of frozen-UNet methods and of nested attention.

Nested attention (like IP-Adapter or textual inversion) only conditions a frozen denoiser, so it cannot make the
denoiser draw a subject better than the denoiser can when trained on that very subject. ``--tune unet`` fine-tunes the
whole UNet on renders of one held-out identity (DreamBooth without a rare token: the generic captions every
generation uses, so the subject word comes to mean that identity). ``--tune tokens`` keeps the UNet frozen and
learns, for that one identity, the nested keys and values of every cross-attention layer directly (``--tokens`` of
them, with the adapter's norm regularization ``--alpha``): nested attention with a perfect encoder, the bound of any
adapter that feeds this mechanism. Either way it then generates the subject in fresh contexts and asks the identity
network to retrieve it among the held-out gallery, exactly as ``toy eval`` scores ``id_top1``.

``--domain scene`` does the same for person + pet images: a held-out person and a held-out pet together, trained on
scenes of the pair with scene prompts (``--tune tokens``: one set of tokens per subject, each bound to its word), and
scored as ``toy eval`` scores ``scene_both_top1``: each subject retrieved among its own domain's gallery, both at once.

``nested-attention toy diagnose bound [--tune tokens] [--domain pet|scene] [--steps 400] [--subjects 3]`` prints, per
tuned subject, top-1 among ``--identities`` held-out input views (chance 1/20) for the real renders of the fresh
contexts, their VAE round trip, the base and the tuned model, and which attributes the tuned model's generations
carry (how often the identity network reads the subject's true value); with ``--out DIR`` also
``DIR/subject-<k>.png``: the subject's input view(s), then a row per kind (real, VAE, base, tuned) of the first 8 fresh
contexts. The identity networks are the build's own (``metrics/`` beside its pipeline), or the shipped ones.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nested_attention import BoundSubject, install
from nested_attention.errors import NestedAttentionError, exits_on_error
from nested_attention_toy.assets import shipped_path
from nested_attention_toy.autoencoder import encode_latents, round_trip
from nested_attention_toy.diffusion import train_unet, training_scheduler
from nested_attention_toy.grounding import word_positions
from nested_attention_toy.metric_models import retrieval_hits
from nested_attention_toy.render import SCENE_SIZE, render_input, render_scene, render_target, split_scene
from nested_attention_toy.text_image import tokenize
from nested_attention_toy.world import (
    CONTEXT_FACTORS,
    DOMAINS,
    SCENE,
    Context,
    Identity,
    attribute_names,
    generic_caption,
    sample_context,
    sample_identities,
    scene_prompt,
)
from nested_attention_train.timesteps import snr_loss_weights

from .toy_eval import image_sheet
from .toy_scorers import ToyIdentityEmbedder, load_build_pipeline

NAME = "bound"  # nested-attention toy diagnose NAME
KINDS = ("real", "vae", "base", "tuned")  # the real renders of the fresh contexts, their VAE round trip, the models


@dataclass
class UpperBound:
    domain: str = "person"  # person, pet, or scene (both)
    tune: str = "unet"  # unet: the whole UNet; tokens: the nested keys and values of a frozen UNet
    identities: int = 20  # the retrieval gallery (held-out input views), per domain
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

    @property
    def words(self) -> tuple[str, ...]:
        """The subject words, one per tuned identity of a subject: its domain, or both in a scene."""
        return DOMAINS if self.domain == SCENE else (self.domain,)


def _contexts(rng: np.random.Generator, count: int, domain: str) -> tuple[list[Context], list[int | None]]:
    """Random contexts, and in scenes the pet's own expression for each."""
    contexts = [sample_context(rng, domain) for _ in range(count)]
    if domain != SCENE:
        return contexts, [None] * count
    return contexts, [int(rng.integers(len(CONTEXT_FACTORS["expression"]))) for _ in contexts]


def _captions(domain: str, contexts: list[Context], expressions: list[int | None], rng: np.random.Generator) -> list[str]:
    if domain != SCENE:
        return [generic_caption(domain, c, rng) for c in contexts]
    return [scene_prompt("person", "pet", c, rng, pet_expression=e) for c, e in zip(contexts, expressions)]


def _render(subjects: tuple[Identity, ...], context: Context, expression: int | None, seed: int):
    if len(subjects) == 2:
        return render_scene(*subjects, context, 64, seed, pet_expression=expression).image
    return render_target(subjects[0], context, 64, seed).image


def _word_mask(positions: torch.Tensor, length: int) -> torch.Tensor:
    """(N, length) bool: each row True at its word's token index alone (a `BoundSubject`'s ``token_mask``)."""
    return torch.nn.functional.one_hot(positions, length).bool()


def _generate(pipe, unet, prompts: list[str], seeds: list[int], config: UpperBound, tokens=None, controller=None):
    pipe.unet = unet.eval()
    width, height = SCENE_SIZE if config.domain == SCENE else (64, 64)
    kwargs = dict(num_inference_steps=config.sample_steps, guidance_scale=config.guidance, width=width, height=height,
                  generator=[torch.Generator().manual_seed(s) for s in seeds])
    if tokens is None:
        return pipe(prompts, **kwargs).images
    slots = torch.zeros(len(prompts), dtype=torch.long)
    length = pipe.tokenizer.model_max_length
    subjects = [BoundSubject(_word_mask(word_positions(pipe.tokenizer, prompts, [word] * len(prompts)), length), slots,
                             {path: (key.detach(), value.detach()) for path, (key, value) in mine.items()},
                             alpha=config.alpha)
                for word, mine in zip(config.words, tokens)]
    with controller.bound(subjects):
        return pipe(prompts, **kwargs).images


def tune_tokens(unet, controller, means, stds, scaling_factor: float, states: torch.Tensor,
                positions: list[torch.Tensor], config: UpperBound, seed: int) -> tuple[list[dict], list[float]]:
    """Nested keys and values for one subject per word (``positions``: each word's token index in every caption),
    learned together with the diffusion loss through the frozen ``unet`` (min-SNR-5 weighting, as the toy UNet
    trained). Values start at the word's own value in the first caption (the base model's output), keys at small
    random vectors. Returns per word layer path -> (K̆, V̆), each (1, H, M, d), and the loss every 50 steps."""
    generator = torch.Generator().manual_seed(seed)
    tokens = [{} for _ in positions]
    for path, layer in controller.layers.items():
        attention = unet.get_submodule(path)
        for mine, where in zip(tokens, positions):
            with torch.no_grad():
                own = attention.to_v(states[:1, where[0]]).view(1, layer.heads, 1, layer.head_dim)
            key = torch.randn((1, layer.heads, config.tokens, layer.head_dim), generator=generator) * 0.1
            value = own.expand(-1, -1, config.tokens, -1) + 0.01 * torch.randn(key.shape, generator=generator)
            mine[path] = (torch.nn.Parameter(key), torch.nn.Parameter(value.contiguous()))
    optimizer = torch.optim.Adam([p for mine in tokens for pair in mine.values() for p in pair], lr=config.token_lr)
    scheduler = training_scheduler()
    slots = torch.zeros(config.batch_size, dtype=torch.long)
    masks = [_word_mask(where, states.shape[1]) for where in positions]  # every caption's, once
    losses = []
    for _ in range(config.steps):
        index = torch.randint(len(means), (config.batch_size,), generator=generator)
        latents = (means[index] + stds[index] * torch.randn(means[index].shape, generator=generator)) * scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (config.batch_size,), generator=generator)
        subjects = [BoundSubject(mask[index], slots, dict(mine), alpha=config.alpha) for mine, mask in zip(tokens, masks)]
        with controller.bound(subjects):
            pred = unet(scheduler.add_noise(latents, noise, t), t, states[index]).sample
        loss = (snr_loss_weights(scheduler, t, 5.0) * (pred - noise).pow(2).flatten(1).mean(1)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return tokens, [float(np.mean(losses[i:i + 50])) for i in range(0, len(losses), 50)]


def _round_trip(vae, images: list[Image.Image]) -> list[Image.Image]:
    """The images through the VAE (decoded posterior mean): the most of them the base model's latents can hold."""
    return [Image.fromarray(a) for a in round_trip(vae, _pixels(images)).permute(0, 2, 3, 1).numpy()]


def _pixels(images: list[Image.Image]) -> torch.Tensor:
    """(N, 3, H, W) uint8 of images of one size, as they are."""
    return torch.from_numpy(np.stack([np.asarray(i.convert("RGB")) for i in images])).permute(0, 3, 1, 2).contiguous()


def _score(made: list[Image.Image], contexts: list[Context], who: int, subjects: tuple[Identity, ...], embedders: dict,
           galleries: dict, prefix: str, result: dict) -> None:
    """Top-1 of each subject among its domain's gallery (``<prefix>_<domain>_top1`` in scenes, read in the half of
    the scene its context puts it in), of all of them at once (``<prefix>_top1``), and how often each of their
    attributes is read (``<prefix>_attributes``)."""
    every = torch.ones(len(made))
    result[f"{prefix}_attributes"] = {}
    whole = made
    for identity in subjects:
        domain = identity.domain
        if len(subjects) > 1:
            made = [split_scene(image, context)[domain] for image, context in zip(whole, contexts)]
        hits, _ = retrieval_hits(embedders[domain].embed(made), galleries[domain], torch.full((len(made),), who))
        every *= hits.float()
        if len(subjects) > 1:
            result[f"{prefix}_{domain}_top1"] = float(hits.float().mean())
        read = embedders[domain].attributes(made)
        result[f"{prefix}_attributes"] |= {name: float((read[name] == identity.attributes[a]).float().mean())
                                           for a, name in enumerate(attribute_names(domain))}
    result[f"{prefix}_top1"] = float(every.mean())


def _line(result: dict, kind: str, words: tuple[str, ...]) -> str:
    if len(words) == 1:
        return f"{kind} {result[f'{kind}_top1']:.2f}"
    return f"{kind} {result[f'{kind}_top1']:.2f} (" + " / ".join(f"{result[f'{kind}_{w}_top1']:.2f}" for w in words) + ")"


def upper_bound(pipe, config: UpperBound, log=print, metrics=None, out: Path | None = None) -> list[dict]:
    """Per tuned subject: ``<kind>_top1`` and ``<kind>_attributes`` (name -> rate) for every kind of `KINDS` (in
    scenes also ``<kind>_person_top1`` and ``<kind>_pet_top1``; ``<kind>_top1`` is then both at once). ``pipe`` is
    a toy `StableDiffusionPipeline` (fp32); its UNet (and, for ``tune="tokens"``, its attention processors) is
    restored afterwards. ``metrics``: the build's metric-model folder (default: the shipped build's); ``out``: a
    folder for each subject's sample sheet."""
    if config.tune not in ("unet", "tokens"):
        raise NestedAttentionError(f"The bound tunes 'unet' or 'tokens'; got {config.tune!r}.")
    if config.domain not in (*DOMAINS, SCENE):
        raise NestedAttentionError(f"The bound's domain is one of {(*DOMAINS, SCENE)}; got {config.domain!r}.")
    rng = np.random.default_rng(config.seed)
    identities = {word: sample_identities(word, config.identities, rng, held_out=True) for word in config.words}
    embedders = {word: ToyIdentityEmbedder(word, metrics) for word in config.words}
    views = {word: [render_input(i, 64, int(rng.integers(2**31))) for i in identities[word]] for word in config.words}
    galleries = {word: embedders[word].embed(views[word]) for word in config.words}
    base = pipe.unet
    trainable = [p.requires_grad for p in base.parameters()]
    controller = install(base.requires_grad_(False)) if config.tune == "tokens" else None
    with torch.no_grad():
        null = pipe.text_encoder(tokenize(pipe.tokenizer, [""])).last_hidden_state[0]
    results = []
    try:
        for who in range(config.subjects):
            subjects = tuple(identities[word][who] for word in config.words)
            contexts, expressions = _contexts(rng, config.renders, config.domain)
            images = [_render(subjects, c, e, int(rng.integers(2**31))) for c, e in zip(contexts, expressions)]
            captions = _captions(config.domain, contexts, expressions, rng)
            with torch.no_grad():
                means, stds = encode_latents(pipe.vae, _pixels(images))
                states = pipe.text_encoder(tokenize(pipe.tokenizer, captions)).last_hidden_state
            if controller is None:
                tuned, losses = train_unet(copy.deepcopy(base), means, stds, pipe.vae.config.scaling_factor, states,
                                           null, config.steps, batch_size=config.batch_size, lr=config.lr,
                                           ema_decay=0.9, seed=who)
                tokens = None
            else:  # the UNet stays frozen; only the tokens learn
                positions = [word_positions(pipe.tokenizer, captions, [word] * len(captions)) for word in config.words]
                tokens, losses = tune_tokens(base, controller, means, stds, pipe.vae.config.scaling_factor, states,
                                             positions, config, seed=who)
                tuned = base
            fresh, fresh_expressions = _contexts(rng, config.generations, config.domain)
            prompts = _captions(config.domain, fresh, fresh_expressions, rng)
            seeds = [int(s) for s in rng.integers(2**31, size=len(prompts))]
            real = [_render(subjects, c, e, s) for c, e, s in zip(fresh, fresh_expressions, seeds)]
            made = {"real": real, "vae": _round_trip(pipe.vae, real),
                    "base": _generate(pipe, base, prompts, seeds, config),
                    "tuned": _generate(pipe, tuned, prompts, seeds, config, tokens, controller)}
            result = {"subject": who, "loss_first": losses[0], "loss_last": losses[-1]}
            for kind in KINDS:
                _score(made[kind], fresh, who, subjects, embedders, galleries, kind, result)
            log(f"{config.domain} subject {who}: top-1 among {config.identities} "
                + ", ".join(_line(result, kind, config.words) for kind in KINDS)
                + f" (loss {losses[0]:.3f} -> {losses[-1]:.3f}); tuned attributes "
                + ", ".join(f"{k} {v:.2f}" for k, v in result["tuned_attributes"].items()))
            results.append(result)
            if out is not None:
                out.mkdir(parents=True, exist_ok=True)
                image_sheet([[views[word][who] for word in config.words]]
                            + [made[kind][:8] for kind in KINDS]).save(out / f"subject-{who}.png")
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
    parser.add_argument("--domain", choices=(*DOMAINS, SCENE), default="person",
                        help="scene: a held-out person and a held-out pet together, each bound to its word")
    parser.add_argument("--tune", choices=("unet", "tokens"), default="unet",
                        help="unet: fine-tune the whole UNet (the frozen-UNet bound); tokens: learn the nested keys and "
                             "values of a frozen UNet (nested attention with a perfect encoder)")
    parser.add_argument("--tokens", type=int, default=UpperBound.tokens,
                        help="--tune tokens: nested tokens per layer (1: one learned value per layer, no per-pixel choice)")
    parser.add_argument("--steps", type=int, default=UpperBound.steps)
    parser.add_argument("--subjects", type=int, default=UpperBound.subjects)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=str(shipped_path("pipeline")), help="toy build or pipeline folder (default: the shipped one)")
    parser.add_argument("--out", type=Path, help="a folder for each subject's sample sheet (real, VAE, base, tuned)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        raise NestedAttentionError(f"--steps is {args.steps}; expected at least 1 training step.")
    if args.tokens < 1:
        raise NestedAttentionError(f"--tokens is {args.tokens}; expected at least 1 nested token per layer.")
    if not 1 <= args.subjects <= UpperBound.identities:
        raise NestedAttentionError(f"--subjects is {args.subjects}; expected 1 to {UpperBound.identities} (the "
                                   f"subjects are drawn from the {UpperBound.identities} held-out identities scored).")
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        raise NestedAttentionError(f"--out {args.out} is a file; expected a folder for the sample sheets.")
    pipe, metrics = load_build_pipeline(args.model)
    config = UpperBound(domain=args.domain, tune=args.tune, steps=args.steps, subjects=args.subjects, seed=args.seed,
                        tokens=args.tokens)
    results = upper_bound(pipe, config, metrics=metrics, out=args.out)
    print("mean top-1: " + ", ".join(f"{kind} {np.mean([r[f'{kind}_top1'] for r in results]):.3f}" for kind in KINDS)
          + ("" if config.domain != SCENE else " (both subjects at once)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
