"""IP-Adapter's image attention next to nested attention in the same cross-attention layer.

diffusers' IP-Adapter processors receive ``encoder_hidden_states = (text_states, [image_states, ...])`` and add,
per IP-Adapter, ``scale * softmax(q K_ipᵀ / sqrt(d)) V_ip`` to the text attention before the output projection
(decoupled cross-attention, Ye et al. 2023, eq. 5). On rows that carry a subject, the nested processor computes the
text attention itself and adds the same image term, read from the IP-Adapter processor it wraps (its ``to_k_ip``,
``to_v_ip`` and ``scale``), so ``set_ip_adapter_scale`` and IP-Adapter masks keep working.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.image_processor import IPAdapterMaskProcessor
from diffusers.models.attention_processor import (
    IPAdapterAttnProcessor,
    IPAdapterAttnProcessor2_0,
    IPAdapterXFormersAttnProcessor,
)

from .errors import NestedAttentionError

IP_ADAPTER_PROCESSORS = (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0, IPAdapterXFormersAttnProcessor)


def split_encoder_states(encoder_hidden_states, processor, layer_path: str):
    """(text states, list of IP-Adapter image states or None) from what a cross-attention layer received."""
    if not isinstance(encoder_hidden_states, tuple):
        return encoder_hidden_states, None
    if not isinstance(processor, IP_ADAPTER_PROCESSORS):
        raise NestedAttentionError(
            f"Layer {layer_path} received image-prompt states next to the text, but its processor is "
            f"{type(processor).__name__}, not one of diffusers' IP-Adapter processors; load the IP-Adapter with "
            f"pipe.load_ip_adapter and call reinstall() so that nested attention wraps its processors."
        )
    text_states, image_states = encoder_hidden_states
    return text_states, list(image_states)


def _is_off(scale) -> bool:
    return all(s == 0 for s in scale) if isinstance(scale, list) else scale == 0


def _heads(states: torch.Tensor, batch: int, heads: int, head_dim: int) -> torch.Tensor:
    return states.reshape(batch, -1, heads, head_dim).transpose(1, 2)  # (B, H, tokens, d)


def image_attention(
    processor, query: torch.Tensor, image_states: list[torch.Tensor], ip_adapter_masks=None
) -> torch.Tensor | None:
    """The IP-Adapters' image attention of one layer, to be added to the text attention before ``to_out``.

    Args:
        processor: the layer's diffusers IP-Adapter processor (weights ``to_k_ip``, ``to_v_ip``; ``scale``).
        query: (B, H, N, d) the layer's queries.
        image_states: one tensor per IP-Adapter, (B, images, tokens, width) or (B, tokens, width).
        ip_adapter_masks: diffusers' optional masks, one (1, images, height, width) tensor per IP-Adapter.

    Returns:
        (B, N, H * d), or None when every IP-Adapter's scale is 0.
    """
    batch, heads, _, head_dim = query.shape
    if ip_adapter_masks is not None and not isinstance(ip_adapter_masks, list):
        ip_adapter_masks = list(ip_adapter_masks.unsqueeze(1))  # diffusers' older (adapters, 1, h, w) tensor
    masks = ip_adapter_masks or [None] * len(image_states)
    total = None
    for states, scale, to_k_ip, to_v_ip, mask in zip(
        image_states, processor.scale, processor.to_k_ip, processor.to_v_ip, masks
    ):
        if _is_off(scale):
            continue
        if mask is None:
            parts = [(states, scale, None)]
        else:  # one masked term per image
            scales = scale if isinstance(scale, list) else [scale] * mask.shape[1]
            parts = [(states[:, i], scales[i], mask[:, i]) for i in range(mask.shape[1])]
        for image_tokens, image_scale, image_mask in parts:
            ip_key = _heads(to_k_ip(image_tokens), batch, heads, head_dim)
            ip_value = _heads(to_v_ip(image_tokens), batch, heads, head_dim)
            term = F.scaled_dot_product_attention(query, ip_key, ip_value)  # (B, H, N, d)
            term = term.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
            if image_mask is not None:
                weight = IPAdapterMaskProcessor.downsample(image_mask, batch, term.shape[1], term.shape[2])
                term = term * weight.to(dtype=query.dtype, device=query.device)
            term = image_scale * term
            total = term if total is None else total + term
    return total
