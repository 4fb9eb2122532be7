"""Which noise levels a training step samples, and how much each one weighs in the loss.

The subject's identity is decided while the image is still mostly noise: at low noise the target is nearly visible
and every condition predicts the noise about equally well, so those steps add gradient noise and little identity.
Two standard knobs (the names and semantics of diffusers' training examples) move the effort to the noise levels
that matter:

- ``timestep_bias_strategy`` (``none`` | ``later`` | ``earlier`` | ``range``) with ``timestep_bias_multiplier`` and
  ``timestep_bias_portion`` (or ``timestep_bias_begin`` / ``timestep_bias_end`` for ``range``): timesteps in the
  chosen part are sampled ``multiplier`` times as often as the others ("later": the noisiest ``portion`` of the
  schedule);
- ``snr_gamma``: min-SNR-gamma loss weighting (Hang et al. 2023), ``min(SNR, gamma) / SNR`` for epsilon prediction
  (``/ (SNR + 1)`` for v-prediction, ``min(SNR, gamma)`` for sample prediction), which down-weights the nearly
  clean steps whose large loss says little.
"""

from __future__ import annotations

import torch
from diffusers.training_utils import compute_snr

from nested_attention.errors import NestedAttentionError

BIAS_STRATEGIES = ("none", "later", "earlier", "range")


def timestep_weights(strategy: str, num_timesteps: int, multiplier: float = 1.0, portion: float = 0.25,
                     begin: int = 0, end: int | None = None) -> torch.Tensor | None:
    """(num_timesteps,) relative sampling weights, or None for uniform sampling (``strategy`` none, or a multiplier
    of 1). ``later`` biases the last (noisiest) ``round(portion * num_timesteps)`` timesteps, ``earlier`` the first,
    ``range`` the timesteps ``begin <= t < end``."""
    if strategy not in BIAS_STRATEGIES:
        raise NestedAttentionError(f"The timestep bias strategy must be one of {', '.join(BIAS_STRATEGIES)}; got "
                                   f"{strategy!r}.")
    if strategy == "none" or multiplier == 1:
        return None
    if strategy == "range" and begin >= num_timesteps:
        raise NestedAttentionError(f"The timestep bias range begins at {begin} but the noise schedule has "
                                   f"{num_timesteps} timesteps (0 to {num_timesteps - 1}); set timestep_bias_begin "
                                   f"below {num_timesteps}.")
    count = round(portion * num_timesteps)
    chosen = {"later": slice(num_timesteps - count, num_timesteps), "earlier": slice(0, count),
              "range": slice(begin, num_timesteps if end is None else end)}[strategy]
    weights = torch.ones(num_timesteps)
    weights[chosen] = multiplier
    return weights


def sample_timesteps(weights: torch.Tensor | None, num_timesteps: int, batch_size: int,
                     device: torch.device | str) -> torch.Tensor:
    """(batch_size,) long timesteps: uniform, or drawn with replacement in proportion to ``weights``."""
    if weights is None:
        return torch.randint(0, num_timesteps, (batch_size,), device=device)
    return torch.multinomial(weights, batch_size, replacement=True).to(device)


def snr_loss_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """(B,) min-SNR-gamma weights of the per-sample loss for ``scheduler``'s prediction type."""
    snr = compute_snr(scheduler, timesteps)
    clipped = snr.clamp(max=gamma)
    prediction = scheduler.config.prediction_type
    if prediction == "epsilon":
        return clipped / snr
    if prediction == "v_prediction":
        return clipped / (snr + 1)
    return clipped  # "sample"
