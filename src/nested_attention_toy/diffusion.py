"""The toy world's denoiser: a diffusers `UNet2DConditionModel` on 16 x 16 x 4 latents, conditioned on a CLIP text
encoder (the toy CLIP's text tower, optionally trained along: `TextTraining`), trained from scratch text-to-image
(epsilon prediction, SD 1.5's noise schedule) with min-SNR loss weighting and an EMA of the weights."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from .grounding import grounding_loss, install_recorder, word_positions
from .loop import LossLog, warmup_cosine
from .resume import has_state, load_state, save_state
from .world import CONTEXT_FACTORS, DOMAINS, FACTOR_NAMES

SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def make_unet(cross_attention_dim: int, widths=(32, 64, 128), sample_size: int = 16, latent_channels: int = 4) -> UNet2DConditionModel:
    """Cross-attention at every resolution (16, 8 and 4 latent pixels), as SD 1.5 has it at three of its four."""
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=latent_channels, out_channels=latent_channels, layers_per_block=1,
        block_out_channels=tuple(widths), down_block_types=("CrossAttnDownBlock2D",) * len(widths),
        up_block_types=("CrossAttnUpBlock2D",) * len(widths), cross_attention_dim=cross_attention_dim,
        attention_head_dim=4, norm_num_groups=16,
    )


def training_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**SCHEDULE, prediction_type="epsilon", clip_sample=False)


def sampling_scheduler() -> DPMSolverMultistepScheduler:
    """DPM-Solver++ (2M), the pipeline's scheduler: good samples in 20 steps."""
    return DPMSolverMultistepScheduler(**SCHEDULE, prediction_type="epsilon", steps_offset=1)


@dataclass
class TextTraining:
    """Train the text encoder with the UNet (as LDM trained its text transformer with the denoiser) instead of
    conditioning on frozen, precomputed states: ``token_ids`` (N, L) of the N captions, ``null_ids`` (L,) the empty
    prompt's, ``lr`` the encoder's learning rate. After training ``encoder`` holds its EMA weights."""

    encoder: torch.nn.Module
    token_ids: torch.Tensor
    null_ids: torch.Tensor
    lr: float


@dataclass
class Grounding:
    """What the word grounding loss needs, per training sample: the grounded words' token indices (N,) or (N, K),
    the pixels each names (N, S, S) or (N, K, S, S) uint8 coverage, and whether it has them (N,) or (N, K) (target
    views only); ``weights`` scale the loss, one per word (K of them, or one); ``target`` is the attention inside
    the pixels that stops counting (see ``grounding_loss``)."""

    positions: torch.Tensor
    masks: torch.Tensor
    has_mask: torch.Tensor
    weights: tuple[float, ...]
    target: float = 1.0

    @classmethod
    def from_corpus(cls, tokenizer, corpus, weight: float, expression_weight: float = 0.0,
                    target: float = 1.0) -> Grounding:
        """The subject word on the subject's silhouette for ``corpus`` (made with masks), with ``weight``; with
        ``expression_weight`` > 0 also the expression word on its emotion symbol (target views whose symbol shows),
        with that weight."""
        targets = torch.tensor([k == "target" for k in corpus.kinds])
        positions = word_positions(tokenizer, corpus.captions, [DOMAINS[d] for d in corpus.domains.tolist()])
        if expression_weight <= 0:
            return cls(positions, corpus.masks, targets, (weight,), target)
        if corpus.symbols is None:
            raise ValueError("grounding the expression word needs a corpus made with symbols=True")
        named = FACTOR_NAMES.index("expression")
        rows = targets.nonzero().flatten().tolist()
        feeling = torch.zeros_like(positions)
        if rows:
            values = CONTEXT_FACTORS["expression"]
            feeling[rows] = word_positions(tokenizer, [corpus.captions[i] for i in rows],
                                           [values[int(corpus.factors[i, named])] for i in rows])
        shows = targets & (corpus.symbols.flatten(1).amax(1) > 0)
        return cls(torch.stack([positions, feeling], 1), torch.stack([corpus.masks, corpus.symbols], 1),
                   torch.stack([targets, shows], 1), (weight, expression_weight), target)

    @classmethod
    def from_scenes(cls, tokenizer, scenes, weight: float, target: float = 1.0) -> Grounding:
        """Both subject words of person + pet ``scenes`` (made with masks) on their own subject's coverage."""
        positions = torch.stack([word_positions(tokenizer, scenes.captions, [word] * len(scenes)) for word in DOMAINS], 1)
        return cls(positions, torch.stack([scenes.masks, scenes.pets], 1), torch.ones(len(scenes), 2, dtype=torch.bool),
                   (weight, weight), target)


@dataclass
class SceneBatches:
    """A second shape of training samples (the person + pet scenes, twice as wide as tall) that every ``every``-th step
    trains on instead of the main set, ``batch_size`` at a time (half the main batch has the same pixels): posterior
    means and stds (M, C, h, 2h), the captions' token ids (M, L) when the text encoder trains along or their states
    (M, L, D) when it does not, and their grounding (both subject words on their silhouettes)."""

    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    captions: torch.Tensor
    grounding: Grounding | None
    batch_size: int
    every: int


@dataclass
class _Source:
    """What one step gathers its batch from (the main set or the scenes), on the training device."""

    mean: torch.Tensor
    std: torch.Tensor
    captions: torch.Tensor | None
    grounding: Grounding | None
    batch_size: int


def train_unet(unet: UNet2DConditionModel, latent_mean: torch.Tensor, latent_std: torch.Tensor, scaling_factor: float,
               text_states: torch.Tensor | None, null_state: torch.Tensor | None, steps: int, batch_size: int = 64, lr: float = 5e-4,
               caption_dropout: float = 0.1, snr_gamma: float = 5.0, ema_decay: float = 0.999, seed: int = 0,
               device: str = "cpu", progress=None, grounding: Grounding | None = None,
               text: TextTraining | None = None, checkpoint: Path | None = None,
               checkpoint_every: int = 500, scenes: SceneBatches | None = None) -> tuple[UNet2DConditionModel, list[float]]:
    """Train on precomputed latents (posterior mean and std, sampled every step) and text encoder states.

    ``text_states`` (N, L, D) for the N latents, ``null_state`` (L, D) the empty prompt's, used for
    ``caption_dropout`` of the samples so that classifier-free guidance works. ``grounding`` adds the word
    grounding loss (see grounding.py) on the samples that have a silhouette. ``text`` trains the text encoder too
    (``text_states`` and ``null_state`` are then unused). Returns the EMA model and the denoising loss every 50 steps.

    ``checkpoint``: a folder for the loop's whole state (resume.py), written every ``checkpoint_every`` steps and at
    the end; when it holds a state, training goes on from there and ends with the weights of an uninterrupted run.

    ``scenes``: a second set of another shape, trained on every ``scenes.every``-th step (`SceneBatches`).
    """
    device = torch.device(device)
    unet.to(device).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    # fp32 everywhere: on a CPU bf16 does not speed this UNet up, and on an H100 a step is host-bound (a few ms of
    # GPU work behind many kernel launches), where autocast's casts made it slower (151 vs 122 ms, docs/toyworld-design.md)
    scheduler = training_scheduler()
    alphas = scheduler.alphas_cumprod.to(device)
    generator = torch.Generator().manual_seed(seed)
    groups = [{"params": list(unet.parameters()), "lr": lr}]
    pairs = [(ema, unet)]
    if text is not None:
        text.encoder.to(device).train()
        pairs.append((copy.deepcopy(text.encoder).eval().requires_grad_(False), text.encoder))
        groups.append({"params": list(text.encoder.parameters()), "lr": text.lr})
    ema_params = [(list(averaged.parameters()), list(model.parameters())) for averaged, model in pairs]
    # a step of this small UNet is about 12 ms of GPU work behind many kernel launches: on CUDA the optimizer is fused
    optimizer = torch.optim.AdamW(groups, weight_decay=1e-2, fused=True if device.type == "cuda" else None)
    # what every step gathers from lives on the device once, not copied there batch by batch
    if text_states is not None:
        null_state = null_state.to(device)

    def on_device(grounded: Grounding | None) -> Grounding | None:
        if grounded is None:
            return None
        return replace(grounded, masks=grounded.masks.to(device), has_mask=grounded.has_mask.to(device))

    sources = [_Source(latent_mean.to(device), latent_std.to(device),
                       (text.token_ids if text is not None else text_states).to(device), on_device(grounding), batch_size)]
    if scenes is not None:
        sources.append(_Source(scenes.latent_mean.to(device), scenes.latent_std.to(device), scenes.captions.to(device),
                               on_device(scenes.grounding), scenes.batch_size))
    warmup = max(1, steps // 25)
    schedule = warmup_cosine(optimizer, steps, warmup, floor=0.1)
    log = LossLog(steps)
    grounded = [source.grounding for source in sources if source.grounding is not None]
    recorder = install_recorder(unet) if any(any(g.weights) for g in grounded) else None
    models = {"unet": unet, "ema": ema}
    if text is not None:
        models |= {"text": text.encoder, "text_ema": pairs[1][0]}
    start, seconds, began = 0, 0.0, time.perf_counter()
    if checkpoint is not None and has_state(checkpoint):
        start, seconds = load_state(checkpoint, models, optimizer, schedule, generator, log)
        if progress is not None:
            progress.update(start)
    for step in range(start, steps):
        source = sources[1 if scenes is not None and step % scenes.every == scenes.every - 1 else 0]
        batch = source.batch_size
        index = torch.randint(len(source.mean), (batch,), generator=generator)
        noise_in = torch.randn((batch, *source.mean.shape[1:]), generator=generator).to(device)
        at = index.to(device)
        latents = (source.mean[at].float() + source.std[at].float() * noise_in) * scaling_factor
        noise = torch.randn(latents.shape, generator=generator).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator).to(device)
        drop = (torch.rand(batch, generator=generator) < caption_dropout).to(device)
        if text is None:
            states = source.captions[at].float()
            states[drop] = null_state.float()
        else:
            ids = source.captions[at]
            ids[drop] = text.null_ids.to(device)
            states = text.encoder(ids).last_hidden_state
        noisy = scheduler.add_noise(latents, noise, t)
        grounds = recorder is not None and source.grounding is not None
        if recorder is not None:  # a source without grounding runs the recorder as a plain processor
            recorder.positions, recorder.maps = source.grounding.positions[index] if grounds else None, []
        pred = unet(noisy, t, states.to(device)).sample.float()
        snr = alphas[t] / (1 - alphas[t])
        weight = snr.clamp(max=snr_gamma) / snr  # min-SNR-gamma (Hang et al. 2023), epsilon form
        loss = (weight * (pred - noise).pow(2).flatten(1).mean(1)).mean()
        total = loss
        if grounds:
            masks, has_mask = source.grounding.masks, source.grounding.has_mask
            covered = masks[at].float().view(batch, -1, *masks.shape[-2:]) / 255
            keep = ~drop.view(-1, *[1] * (has_mask.dim() - 1)) & has_mask[at]
            total = loss + grounding_loss([m.float() for m in recorder.maps], covered, keep, source.grounding.weights,
                                          source.grounding.target)
            recorder.maps = []
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        for group in groups:  # each model clipped on its own: the UNet's step does not depend on the encoder's
            torch.nn.utils.clip_grad_norm_(group["params"], 1.0)
        optimizer.step()
        schedule.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():  # one fused update per model, not one kernel launch per tensor
            for averaged, model in ema_params:
                torch._foreach_lerp_(averaged, model, 1 - decay)
        log.add(step, loss)
        if progress is not None:
            progress.update(1)
        if checkpoint is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
            save_state(checkpoint, models, optimizer, schedule, generator, log, step + 1,
                       seconds + time.perf_counter() - began)
    if recorder is not None:
        unet.set_attn_processor(AttnProcessor2_0())
    unet.to("cpu")
    if text is not None:
        text.encoder.load_state_dict(pairs[1][0].state_dict())
        text.encoder.to("cpu").eval().requires_grad_(False)
    return ema.to("cpu").eval(), log.means
