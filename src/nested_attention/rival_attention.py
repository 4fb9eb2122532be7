"""The attention arithmetic of the four rival injection mechanisms (paper Fig. 10), as pure functions.

Shapes as in attention.py: B batch, H heads, N image queries, T text tokens, M encoder tokens, d head size,
K subjects bound in the prompt. Each function takes the subjects' per-layer tensors already gathered per row.
The `global_v` mechanism needs no function of its own: it is `personalized_attention` with a subject value
that does not depend on the query (see `mechanisms.GlobalV`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .attention import lambda_logits


def joined_mask(attn_mask: torch.Tensor | None, extra: Sequence[torch.Tensor], text_length: int) -> torch.Tensor:
    """The additive mask over [text tokens | extra tokens]: `attn_mask` (broadcastable to (B, H, N, T), or None
    for none) followed by each (B, 1, 1, M_k) bias of `extra`, broadcast to one shape."""
    first = extra[0]
    text = attn_mask if attn_mask is not None else first.new_zeros(first.shape[0], 1, 1, text_length)
    parts = [text, *extra]
    shape = torch.broadcast_shapes(*(p.shape[:-1] for p in parts))
    return torch.cat([p.expand(*shape, p.shape[-1]) for p in parts], dim=-1)


def decoupled_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    image_keys: Sequence[torch.Tensor],
    image_values: Sequence[torch.Tensor],
    image_scales: Sequence[torch.Tensor | float],
    image_biases: Sequence[torch.Tensor | None],
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """IP-Adapter's decoupled cross-attention: out = softmax(q Kᵀ/√d) V + Σ_k s_k softmax(q K_kᵀ/√d + b_k) V_k.

    Every query of the image gets the image terms; the text attention is left as it is.

    Args:
        query: (B, H, N, d); key, value: (B, H, T, d) the text's.
        image_keys, image_values: K tensors (B, H, M, d), per-layer projections of each subject's encoder tokens.
        image_scales: K scales s_k, each a number or broadcastable to (B, 1, 1, 1) (0 on rows without subject k).
        image_biases: K additive logit biases broadcastable to (B, H, N, M) (log image weights, -inf padding),
            or None.
        attn_mask: optional additive mask of the text attention, broadcastable to (B, H, N, T).

    Returns:
        (B, H, N, d).
    """
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask)
    for image_key, image_value, scale, bias in zip(image_keys, image_values, image_scales, image_biases):
        image = F.scaled_dot_product_attention(query, image_key, image_value, attn_mask=bias)
        out = out + scale * image
    return out


def simple_adapter_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    extra_keys: Sequence[torch.Tensor],
    extra_values: Sequence[torch.Tensor],
    extra_biases: Sequence[torch.Tensor | None],
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The 'simple adapter': the encoder tokens appended to the text tokens, one softmax over both.

    out = softmax(q [K; K_1; ...; K_K]ᵀ/√d + [mask; b_1; ...; b_K]) [V; V_1; ...; V_K]

    Args:
        query: (B, H, N, d); key, value: (B, H, T, d) the text's.
        extra_keys, extra_values: K tensors (B, H, M_k, d), per-layer projections of each subject's tokens.
        extra_biases: K additive logit biases (B, 1, 1, M_k) (log image weights; -inf on padding and on rows
            that do not carry subject k), or None.
        attn_mask: optional additive mask of the text tokens, broadcastable to (B, H, N, T).

    Returns:
        (B, H, N, d).
    """
    keys = torch.cat([key, *extra_keys], dim=2)  # (B, H, T + ΣM, d)
    values = torch.cat([value, *extra_values], dim=2)
    mask = attn_mask
    if any(b is not None for b in extra_biases):
        zero = [b if b is not None else k.new_zeros(k.shape[0], 1, 1, k.shape[2])
                for b, k in zip(extra_biases, extra_keys)]
        mask = joined_mask(attn_mask, zero, key.shape[2])
    elif attn_mask is not None:
        mask = F.pad(attn_mask, (0, keys.shape[2] - key.shape[2]))
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask)


def multi_token_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mean_values: Sequence[torch.Tensor],
    counts: Sequence[torch.Tensor],
    subject_masks: torch.Tensor,
    lam: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """'Multiple tokens': every bound token s brings M extra tokens, each with s's key K[s] and its own value
    V̆_m (logit bias b_m), all in one softmax with the text tokens.

    The extra tokens share s's logit l, so s and its extras together weigh e^l (1 + c), c = Σ_m e^{b_m}, and
    contribute e^l (V[s] + c V̄), V̄ = softmax(b) V̆. They are therefore exactly one token with logit
    l + log(1 + c) and value (V[s] + c V̄) / (1 + c): one attention over T tokens, no (B, H, N, T + M) tensor.
    lambda changes the logit l of s and of its extras alike (they share its key).

    Args:
        query: (B, H, N, d); key, value: (B, H, T, d) the text's.
        mean_values: K tensors (B, H, 1, d), V̄ of each subject.
        counts: K tensors broadcastable to (B, H, 1, 1), c of each subject (M when every token weighs 1).
        subject_masks: (K, B, T) bool, the token positions bound to each subject.
        lam: (K, B) lambda per subject and row, or None for 1 everywhere.
        attn_mask: optional additive mask broadcastable to (B, H, N, T).

    Returns:
        (B, H, N, d).
    """
    masks = subject_masks.to(value.dtype)[:, :, None, :, None]  # (K, B, 1, T, 1)
    share = [c / (1 + c) for c in counts]  # (B, H, 1, 1): the extras' share of the merged token's value
    kept = 1 - sum(masks[k] * share[k] for k in range(len(counts)))  # (B, H, T, 1)
    merged = value * kept + sum(masks[k] * share[k] * mean_values[k] for k in range(len(counts)))  # (B, H, T, d)
    logit_bias = sum(masks[k][..., 0] * torch.log1p(counts[k][..., 0]) for k in range(len(counts)))  # (B, H, T)
    bias = logit_bias[:, :, None, :]  # (B, H, 1, T)
    if attn_mask is not None:
        bias = bias + attn_mask
    if lam is None:
        return F.scaled_dot_product_attention(query, key, merged, attn_mask=bias.to(query.dtype))
    lam_columns = 1 + ((lam.to(value.dtype) - 1)[:, :, None] * subject_masks.to(value.dtype)).sum(0)  # (B, T)
    logits = lambda_logits((query @ key.transpose(-1, -2)) * query.shape[-1] ** -0.5, lam_columns) + bias
    return logits.float().softmax(dim=-1).to(value.dtype) @ merged
