"""Measurements of a built toy stack on held-out identities: VAE reconstruction, CLIP zero-shot and CLIP-T, and the
base model's prompt-factor accuracy (no adapter), judged by the factor classifier; plus a sample sheet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from tqdm.auto import tqdm
from transformers import CLIPModel, CLIPTokenizer

from .autoencoder import reconstruction_psnr
from .corpus import make_corpus
from .latent_check import vae_identity
from .metric_models import FactorClassifier, head_accuracy
from .render import SCENE_SIZE, render_scene, render_target
from .text_image import clip_similarity, zero_shot_accuracy
from .world import (
    DOMAINS,
    FACTOR_NAMES,
    SCENE_POSITIONS,
    example_context,
    generic_caption,
    sample_context,
    sample_identities,
    scene_prompt,
)

VAE_IDENTITIES = 20  # the gallery of the VAE round-trip retrieval, as `toy eval` scores identity (fewer at smoke size)


def load_stack(root: str | Path):
    """(pipeline, clip, tokenizer, factor classifier) of a built stack, loaded the way a user loads them."""
    root = Path(root)
    pipe = StableDiffusionPipeline.from_pretrained(root / "pipeline", torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    clip = CLIPModel.from_pretrained(root / "clip", torch_dtype=torch.float32).eval()
    tokenizer = CLIPTokenizer.from_pretrained(root / "clip")
    classifier = FactorClassifier.from_pretrained(root / "metrics" / "factor_classifier")
    return pipe, clip, tokenizer, classifier


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], steps: int, guidance_scale: float, batch_size: int = 50,
             progress=None, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Base-model images for ``prompts`` (one seed each) -> (N, 3, H, W) uint8; ``size`` (width, height), default the
    model's square."""
    out = []
    width, height = size or (None, None)
    for i in range(0, len(prompts), batch_size):
        generators = [torch.Generator().manual_seed(s) for s in seeds[i : i + batch_size]]
        images = pipe(prompts[i : i + batch_size], num_inference_steps=steps, guidance_scale=guidance_scale,
                      generator=generators, output_type="np", width=width, height=height).images
        out.append(torch.from_numpy(np.round(images * 255).astype(np.uint8)).permute(0, 3, 1, 2))  # on the CPU
        if progress is not None:
            progress.update(len(generators))
    return torch.cat(out)


def evaluate_stack(root: str | Path, size, seed: int, workers: int = 2, device: str = "cpu", log=print) -> dict:
    """Every quality measurement of the issue on held-out identities; writes ``root/samples.png``. Generation runs
    on ``device``; the measurements on the CPU."""
    pipe, clip, tokenizer, classifier = load_stack(root)
    pipe.to(device)
    results: dict = {}
    held_out = make_corpus(size.eval_renders, seed=seed, held_out=True, workers=workers, input_fraction=0.0,
                           desc="held-out renders")
    results["vae_psnr_db"] = reconstruction_psnr(pipe.vae.to("cpu"), held_out.images)
    pipe.vae.to(device)
    log(f"VAE reconstruction PSNR on {len(held_out)} held-out renders: {results['vae_psnr_db']:.2f} dB")
    gallery = min(VAE_IDENTITIES, size.eval_identities)
    results["vae_identity_top1"] = vae_identity(pipe.vae.to("cpu"), Path(root) / "metrics", gallery, 8,
                                                seed=seed + 40, workers=workers)
    pipe.vae.to(device)
    log(f"identity top-1 among {gallery} held-out identities after a VAE round trip: "
        f"{_fmt(results['vae_identity_top1'])}")
    results["clip_zero_shot_accuracy"] = zero_shot_accuracy(clip, tokenizer, held_out.images, held_out.factors,
                                                            held_out.domains, seed=seed)
    log(f"CLIP zero-shot factor accuracy: {_fmt(results['clip_zero_shot_accuracy'])}")
    results["oracle_clip_t"] = float(clip_similarity(clip, tokenizer, held_out.images, held_out.captions).mean())
    results["oracle_factor_accuracy"] = head_accuracy(classifier, held_out.images, held_out.factor_labels())

    rng = np.random.default_rng(seed + 1)
    contexts = [sample_context(rng) for _ in range(size.eval_generations)]
    domains = [DOMAINS[i % 2] for i in range(size.eval_generations)]
    prompts = [generic_caption(d, c, rng) for d, c in zip(domains, contexts)]
    seeds = [int(s) for s in rng.integers(2**31, size=len(prompts))]
    with tqdm(total=len(prompts), desc="base generations", leave=False) as bar:
        images = generate(pipe, prompts, seeds, size.sample_steps, size.guidance_scale, progress=bar)
    labels = torch.tensor([c.values for c in contexts], dtype=torch.long).view(-1, len(FACTOR_NAMES))
    accuracy = head_accuracy(classifier, images, {f: labels[:, i] for i, f in enumerate(FACTOR_NAMES)})
    results["base_prompt_factor_accuracy"] = accuracy
    results["base_prompt_accuracy_mean"] = float(np.mean(list(accuracy.values())))
    results["base_clip_t"] = float(clip_similarity(clip, tokenizer, images, prompts).mean())
    results["base_generation"] = {"count": len(prompts), "steps": size.sample_steps, "guidance_scale": size.guidance_scale}
    log(f"base model prompt-factor accuracy ({len(prompts)} generations): {_fmt(accuracy)}; "
        f"CLIP-T {results['base_clip_t']:.3f} (real renders {results['oracle_clip_t']:.3f})")

    sample_sheet(pipe, size, seed).save(Path(root) / "samples.png", optimize=True)
    return results


def sample_sheet(pipe, size, seed: int, columns: int = 8, rows_per_domain: int = 2) -> Image.Image:
    """Pairs of rows: a held-out identity's render in 8 contexts (``example_context``), then the base model's
    generation for the same prompts (it knows no identity: only the context should match); last, person + pet scenes
    of a held-out pair (twice as wide) and the base model's for their prompts."""
    rng = np.random.default_rng(seed + 2)
    tiles: list[list[Image.Image]] = []
    for d, domain in enumerate(DOMAINS):
        for r in range(rows_per_domain):
            identity = sample_identities(domain, 1, rng, held_out=True)[0]
            contexts = [example_context(2 * r + d, c) for c in range(columns)]
            renders = [render_target(identity, c, 64, seed).image for c in contexts]
            prompts = [generic_caption(domain, c) for c in contexts]
            images = generate(pipe, prompts, [seed + 1000 * r + c for c in range(columns)], size.sample_steps,
                              size.guidance_scale)
            tiles.append(renders)
            tiles.append([Image.fromarray(x.permute(1, 2, 0).numpy()) for x in images])
    person, pet = (sample_identities(domain, 1, rng, held_out=True)[0] for domain in DOMAINS)
    contexts = [example_context(2 * rows_per_domain, c).replace(position=SCENE_POSITIONS[c % 2])
                for c in range(columns // 2)]
    tiles.append([render_scene(person, pet, c, 64, seed).image for c in contexts])
    images = generate(pipe, [scene_prompt("person", "pet", c) for c in contexts],
                      [seed + 5000 + c for c in range(len(contexts))], size.sample_steps, size.guidance_scale,
                      size=SCENE_SIZE)
    tiles.append([Image.fromarray(x.permute(1, 2, 0).numpy()) for x in images])
    pad, s = 2, 64
    sheet = Image.new("RGB", (pad + (s + pad) * columns, pad + (s + pad) * len(tiles) + pad * (len(tiles) // 2)), "white")
    for r, row in enumerate(tiles):
        x = pad
        for tile in row:  # a scene takes two columns
            sheet.paste(tile, (x, pad + r * (s + pad) + pad * (r // 2)))
            x += (tile.width // s) * (s + pad)
    return sheet


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in values.items())

