"""One training step (paper 3.3): the diffusion noise-prediction loss, conditioned on the subject image."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nested_attention import NestedAdapter, NestedAttentionController

from .models import BaseModel
from .timesteps import sample_timesteps, snr_loss_weights


class NestedTrainingModule(nn.Module):
    """Adapter + frozen base model; `forward(batch)` returns the loss.

    Only the adapter is a registered submodule: DDP wraps and synchronizes it, checkpoints hold it. The base
    model is frozen and kept beside it (not registered), so DDP never touches its parameters.
    """

    def __init__(self, adapter: NestedAdapter, base: BaseModel, controller: NestedAttentionController,
                 timestep_weights: torch.Tensor | None = None, snr_gamma: float | None = None,
                 subject_loss_weight: float | None = None, train_lambda: float = 1.0):
        super().__init__()
        self.adapter = adapter
        self.base = _Frozen(base)
        self.controller = controller
        self.timestep_weights = timestep_weights  # None: uniform (timesteps.py)
        self.snr_gamma = snr_gamma  # None: plain MSE
        self.subject_loss_weight = subject_loss_weight  # None: every pixel alike
        self.train_lambda = train_lambda  # on the subject word's logits; 1: as the paper trains

    @torch.no_grad()
    def encode_prompts(self, input_ids: list[torch.Tensor], batch: dict):
        """Text context (and SDXL's pooled text and size conditioning) exactly as the pipelines build it."""
        base = self.base.model
        encoders = base.text_encoders
        device = base.pipe.unet.device
        if not base.is_sdxl:
            return encoders[0](input_ids[0].to(device))[0], None
        hidden, pooled = [], None
        for encoder, ids in zip(encoders, input_ids):
            out = encoder(ids.to(device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # SDXL uses the penultimate layer of both encoders
            pooled = out[0]  # text_embeds of the second encoder (with projection)
        time_ids = torch.cat([batch["original_size"], batch["crop_top_left"], batch["target_size"]], dim=1)
        added = {"text_embeds": pooled, "time_ids": time_ids.to(device=device, dtype=pooled.dtype)}
        return torch.cat(hidden, dim=-1), added

    @torch.no_grad()
    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.base.model.pipe.vae
        latents = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist.sample()
        return latents * vae.config.scaling_factor

    def subject_tokens(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, n_images * n_q, width) tokens, and a (B, n_images * n_q) bias masking padded images."""
        pixels = batch["subject_pixels"]  # (B, n, 3, S, S)
        B, n = pixels.shape[:2]
        clip = self.adapter.encoder.image_encoder
        tokens = self.adapter.encoder(pixels.flatten(0, 1).to(device=clip.device, dtype=clip.dtype))
        tokens = tokens.view(B, n * tokens.shape[1], tokens.shape[2])
        present = batch["subject_image_mask"].to(tokens.device)  # (B, n)
        if bool(present.all()):
            return tokens, None
        n_q = tokens.shape[1] // n
        bias = torch.zeros(B, n, n_q, device=tokens.device).masked_fill(~present[:, :, None], float("-inf"))
        return tokens, bias.flatten(1)

    def forward(self, batch: dict) -> torch.Tensor:
        base = self.base.model
        scheduler = base.noise_scheduler
        latents = self.encode_latents(batch["target_pixels"])
        context, added = self.encode_prompts(batch["input_ids"], batch)
        noise = torch.randn_like(latents)
        timesteps = sample_timesteps(self.timestep_weights, scheduler.config.num_train_timesteps, latents.shape[0],
                                     latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        if scheduler.config.prediction_type == "epsilon":
            target = noise
        elif scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = latents  # "sample"

        tokens, bias = self.subject_tokens(batch)
        token_mask = batch["token_mask"]
        lam = None if self.train_lambda == 1 else torch.full((token_mask.shape[0],), self.train_lambda,
                                                             device=tokens.device, dtype=tokens.dtype)
        subject = self.adapter.subject_state(tokens, self.controller.layers, token_mask,
                                             torch.arange(token_mask.shape[0]), bias, lam)
        unet = base.pipe.unet
        # left bound through backward: gradient checkpointing re-runs the UNet forward there (the trainer clears it)
        self.controller.bind([subject])
        prediction = unet(
            noisy.to(unet.dtype), timesteps, encoder_hidden_states=context.to(unet.dtype), added_cond_kwargs=added
        ).sample
        mask = batch.get("target_mask")
        if self.snr_gamma is None and (self.subject_loss_weight is None or mask is None):
            loss = F.mse_loss(prediction.float(), target.float())
        else:
            squared = F.mse_loss(prediction.float(), target.float(), reduction="none")
            if self.subject_loss_weight is not None and mask is not None:
                per_sample = subject_weighted_mean(squared, mask.to(squared.device), self.subject_loss_weight)
            else:
                per_sample = squared.flatten(1).mean(1)
            if self.snr_gamma is not None:
                per_sample = snr_loss_weights(scheduler, timesteps, self.snr_gamma) * per_sample
            loss = per_sample.mean()
        if not bool(token_mask.any()):
            # no row is bound (all dropped): keep every adapter weight in the graph so DDP's reduction completes
            loss = loss + 0.0 * sum(t.sum() for state in subject.nested.values() for t in state)
        return loss


def subject_weighted_mean(squared: torch.Tensor, mask: torch.Tensor, weight: float) -> torch.Tensor:
    """Per sample, the mean of `squared` (B, C, h, w) with the subject's latent pixels weighing `weight` times the
    rest: the pixel mask (B, 1, H, W) in [0, 1] is averaged down to the latent grid, w = 1 + (weight - 1) mask, and
    the weights are normalized per sample (a sample without subject pixels keeps its plain mean)."""
    coverage = F.adaptive_avg_pool2d(mask.float(), squared.shape[-2:])  # (B, 1, h, w)
    weights = 1.0 + (weight - 1.0) * coverage
    return (squared * weights).flatten(1).sum(1) / (weights.flatten(1).sum(1) * squared.shape[1])


class _Frozen:
    """Holds the base model without registering it as a submodule."""

    def __init__(self, model: BaseModel):
        self.model = model
