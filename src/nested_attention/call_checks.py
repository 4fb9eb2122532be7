"""The arguments of one generation call, checked before anything is encoded: one sentence per mistake."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

from .errors import NestedAttentionError


def check_call(pipe, prompt, num_images_per_prompt, pipe_kwargs: dict) -> list[str] | None:
    """The prompts as a list (None with `prompt_embeds`); refuses a missing or empty prompt, a prompt next to
    `prompt_embeds`, a row count below 1, and unusable sampler settings.

    `guidance_scale` must be finite and non-negative (diffusers turns guidance off at <= 1; NaN or infinity would
    give black images); `num_inference_steps` must lie between 1 and the scheduler's training timesteps.
    """
    with_embeds = pipe_kwargs.get("prompt_embeds") is not None
    if with_embeds and prompt is not None:
        raise NestedAttentionError(
            "Both prompt and prompt_embeds are given; give one: prompt strings, or prompt=None with prompt_embeds "
            "and subject_positions."
        )
    if with_embeds:
        prompts = None
    elif isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, Sequence) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    else:
        raise NestedAttentionError(
            f"prompt is {prompt!r}; expected a string or a non-empty list of strings, each containing the subject "
            f"word (or prompt=None with prompt_embeds and subject_positions)."
        )
    if not _is_int(num_images_per_prompt) or num_images_per_prompt < 1:
        raise NestedAttentionError(
            f"num_images_per_prompt is {num_images_per_prompt!r}; expected a whole number of at least 1."
        )
    guidance = pipe_kwargs.get("guidance_scale")
    if guidance is not None and not (
        isinstance(guidance, numbers.Real) and math.isfinite(guidance) and guidance >= 0
    ):
        raise NestedAttentionError(
            f"guidance_scale is {guidance!r}; expected a finite number of at least 0 (e.g. 7.5; at most 1 turns "
            f"classifier-free guidance off)."
        )
    steps = pipe_kwargs.get("num_inference_steps")
    limit = getattr(getattr(pipe, "scheduler", None), "config", {}).get("num_train_timesteps", None)
    if steps is not None and (not _is_int(steps) or steps < 1 or (limit is not None and steps > limit)):
        raise NestedAttentionError(
            f"num_inference_steps is {steps!r}; expected a whole number from 1 to {limit or 'the scheduler limit'} "
            f"(the scheduler's training timesteps; 20-50 is usual)."
        )
    return prompts


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
