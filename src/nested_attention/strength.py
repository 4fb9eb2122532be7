"""The strength dial: how much of an adapter's nested attention each cross-attention layer applies, from 0 to 1."""

from __future__ import annotations

import math
import numbers

from torch import nn

from .errors import NestedAttentionError

_FORMAT = (
    "give a number from 0 (the base model) to 1 (the full adapter), or per block in the format of diffusers' "
    "set_ip_adapter_scale, e.g. {'down': 0.5, 'mid': 1.0, 'up': {'block_0': [0.0, 1.0, 0.0]}} (blocks left out get 0)"
)


def _check(value, given) -> float:
    if not (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            and 0 <= value <= 1):
        raise NestedAttentionError(f"The strength {given!r} holds {value!r}; {_FORMAT}.")
    return float(value)


def _check_blocks(unet: nn.Module, scale: dict) -> None:
    """Refuse names diffusers' expansion would skip in silence (a typo would leave a block at strength 0)."""
    known = {name: [f"block_{i}" for i, block in enumerate(getattr(unet, f"{name}_blocks", [])) if
                    hasattr(block, "attentions")] for name in ("down", "up")}
    for part, value in scale.items():
        if part not in ("down", "mid", "up"):
            raise NestedAttentionError(f"The strength {scale!r} names {part!r}; {_FORMAT}.")
        unknown = sorted(set(value) - set(known[part])) if isinstance(value, dict) and part in known else []
        if unknown:
            raise NestedAttentionError(
                f"The strength {scale!r} names {unknown[0]!r}, but this UNet's {part} blocks with cross-attention "
                f"are {known[part]}; {_FORMAT}."
            )


def layer_strengths(unet: nn.Module, layer_paths, scale) -> dict[str, float] | None:
    """The strength of every nested layer for `scale`, or None when it is 1 everywhere (the adapter as trained).

    Args:
        unet: the UNet (its blocks, for the per-block format).
        layer_paths: the module paths of its cross-attention layers.
        scale: a number from 0 to 1 for every layer, or a dict in the format of diffusers' `set_ip_adapter_scale`
            ({"down": ..., "mid": ..., "up": {"block_i": number or one number per transformer}}), expanded by
            diffusers' own helper; blocks it leaves out get 0, as with IP-Adapter.
    """
    if isinstance(scale, dict):
        _check_blocks(unet, scale)
        from diffusers.loaders.unet_loader_utils import _maybe_expand_lora_scales  # set_ip_adapter_scale's parser

        try:
            [per_block] = _maybe_expand_lora_scales(unet, [scale], default_scale=0.0)
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            reason = str(error).rstrip(".")
            raise NestedAttentionError(f"The strength {scale!r} does not fit this UNet ({reason}); {_FORMAT}.") from None
        strengths = {}
        for path in layer_paths:
            blocks = [prefix for prefix in per_block if path.startswith(prefix + ".")]
            strengths[path] = _check(per_block[blocks[0]], scale) if blocks else 0.0
    else:
        strengths = dict.fromkeys(layer_paths, _check(scale, scale))
    return None if all(s == 1.0 for s in strengths.values()) else strengths
