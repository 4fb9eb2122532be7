"""The toy world's autoencoder: a small diffusers `AutoencoderKL` (64 px -> 16 x 16 x 4 latents), trained from
scratch. Fully convolutional (no attention in its middle block), so it trains on random 32 px crops, four times
cheaper than whole images, and runs on whole images afterwards."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

from .loop import LossLog, warmup_cosine
from .metric_models import bf16_autocast_supported


def make_vae(width: int = 32, latent_channels: int = 4) -> AutoencoderKL:
    """Three resolutions (two downsamplings, a factor of 4), ``width``, 2x, 2x channels, one resnet per block."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, layers_per_block=1,
        block_out_channels=(width, 2 * width, 2 * width), norm_num_groups=16, mid_block_add_attention=False,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, sample_size=64,
    )


def _to_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1


def train_vae(vae: AutoencoderKL, images: torch.Tensor, steps: int, batch_size: int = 64, crop: int = 32,
              lr: float = 1e-3, kl_weight: float = 1e-6, seed: int = 0, device: str = "cpu", progress=None,
              weights: tuple[tuple[torch.Tensor, float], ...] = ()) -> list[float]:
    """L1 + MSE reconstruction of random ``crop``-pixel crops plus a small KL term (SD's VAE recipe without the
    perceptual and adversarial losses, whose networks cannot be downloaded here). Returns the loss every 50 steps.

    ``weights``: (coverage, weight) pairs, coverage (N, S, S) uint8 (255 = covered) per image: a pixel's
    reconstruction error counts ``1 + sum(weight * coverage)`` times, normalized to a mean of 1 per batch, so that
    small parts that matter (the emotion symbol: about 1 % of the pixels) are not averaged away."""
    for coverage, _ in weights:
        if coverage.shape != (images.shape[0], *images.shape[2:]):
            raise ValueError(f"each weight's coverage must be (N, S, S) = {(images.shape[0], *images.shape[2:])}, got {tuple(coverage.shape)}")
    device = torch.device(device)
    vae.to(device, memory_format=torch.channels_last).train()
    # bf16 autocast where it is faster: a CPU with native bf16 (93 vs 110 ms a step here), not an H100, where this
    # small VAE's step is host-bound and the casts made it slower (32 vs 22 ms, docs/toyworld-design.md)
    amp = device.type == "cpu" and bf16_autocast_supported(device)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0, fused=True if device.type == "cuda" else None)
    # the corpus lives on the device once (uint8: 0.7 GB for the full build's 60,000), not copied there every step
    images = images.to(device)
    weights = tuple((coverage.to(device), weight) for coverage, weight in weights)
    warmup = max(1, steps // 20)
    schedule = warmup_cosine(optimizer, steps, warmup)
    size = images.shape[-1]
    log = LossLog(steps)
    for step in range(steps):
        index = torch.randint(len(images), (batch_size,), generator=generator)
        x0, y0 = (int(v) for v in torch.randint(0, size - crop + 1, (2,), generator=generator))
        x0, y0 = x0 // 4 * 4, y0 // 4 * 4  # latent-aligned crops
        index = index.to(device)
        batch = _to_float(images[index, :, y0 : y0 + crop, x0 : x0 + crop]).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            posterior = vae.encode(batch).latent_dist
            recon = vae.decode(posterior.sample(generator=None)).sample.float()
        error = (recon - batch).abs() + (recon - batch).pow(2)
        if weights:
            w = 1 + sum(weight * coverage[index, None, y0 : y0 + crop, x0 : x0 + crop].float() / 255
                        for coverage, weight in weights)
            error = error * (w / w.mean())
        loss = error.mean() + kl_weight * posterior.kl().float().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        log.add(step, loss)
        if progress is not None:
            progress.update(1)
    vae.to("cpu", memory_format=torch.contiguous_format).eval()
    return log.means


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, S, S) uint8 -> posterior means and standard deviations, (N, C, S/4, S/4) each, unscaled."""
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        dist = vae.encode(_to_float(images[i : i + batch_size])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def reconstructions(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256):
    """Yield (x, decode(mean of encode(x))) batch by batch, both in [-1, 1], for (N, 3, S, S) uint8 images."""
    for i in range(0, len(images), batch_size):
        x = _to_float(images[i : i + batch_size])
        yield x, vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)


@torch.no_grad()
def round_trip(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, 3, S, S) uint8 -> decode(mean of encode(x)) as uint8."""
    return torch.cat([((y + 1) * 127.5).round().to(torch.uint8) for _, y in reconstructions(vae, images, batch_size)])


@torch.no_grad()
def reconstruction_psnr(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 256) -> float:
    """Mean PSNR (dB, images in [0, 255]) of decode(mean of encode(x)) over whole images."""
    values = []
    for x, y in reconstructions(vae, images, batch_size):
        mse = ((y - x) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
        values.append(-10 * torch.log10(mse))
    return float(torch.cat(values).mean())
