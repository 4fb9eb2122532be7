"""The attention arithmetic of Nested Attention (paper section 3.2 and 5.1), as pure functions.

Shapes: B batch, H heads, N image queries, T text tokens, M encoder (nested) tokens, d head size,
K subjects bound in the prompt.

The outer attention is computed without ever forming the (B, H, N, T, d) tensor of per-query values.
With P the softmax over text tokens (after the lambda change), the paper's output is

    out_q = sum_{s not bound} P[q, s] V[s] + sum_k sum_{s in S_k} P[q, s] v*_{q, s}

and, with the norm regularization, v*_{q, s} = alpha |V[s]| u_q where u_q = v*_q / |v*_q| does not depend
on s. So one attention call over an augmented value matrix [V with bound rows zeroed | one column per
subject holding alpha |V[s]| on that subject's tokens] yields both the ordinary part and, per subject, the
scalar that multiplies u_q. The extra cost is K columns of the value matrix (rounded up to a multiple of 8
head columns, so that the call stays on a fused attention kernel).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

_NORM_EPS = 1e-6
_HEAD_ALIGN = 8  # head sizes the fused attention kernels accept


def nested_values(
    query: torch.Tensor,
    nested_key: torch.Tensor,
    nested_value: torch.Tensor,
    nested_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Query-dependent subject values v*_q = softmax(q K̆ᵀ / sqrt(d) + b) V̆ (paper eq. 3), per head.

    Args:
        query: (B, H, N, d) the cross-attention layer's own queries (no extra projection).
        nested_key: (B, H, M, d) per-layer projection K̆ of the encoder tokens.
        nested_value: (B, H, M, d) per-layer projection V̆ of the encoder tokens.
        nested_bias: optional additive logit bias broadcastable to (B, H, N, M): log per-image weights
            when several images are concatenated (identity mixing), -inf on padding tokens.

    Returns:
        (B, H, N, d) one value per query and head.
    """
    return F.scaled_dot_product_attention(query, nested_key, nested_value, attn_mask=nested_bias)


def inverse_subject_norm(subject_value: torch.Tensor) -> torch.Tensor:
    """1 / |v*_q| per query and head, (..., 1): times v*_q, the unit direction u_q (the caller sets the norm).

    The paper rescales v*_q to alpha |V[s*]| without saying over which axes. We normalize **per head**: a
    head's output is a convex combination of that head's values only, so bounding each head's subject value
    by its own vanilla value norm bounds the subject's share of every head. A norm taken over the
    concatenated heads would let a single head carry up to alpha * sqrt(H) times its vanilla norm and drown
    the other tokens in that head, the "attention overfitting" the regularization exists to prevent.
    """
    return subject_value.norm(dim=-1, keepdim=True).clamp_min(_NORM_EPS).reciprocal()


def lambda_logits(logits: torch.Tensor, lam_columns: torch.Tensor) -> torch.Tensor:
    """Identity-vs-prompt control (paper 5.1): subject logits l become max(l, lambda * l).

    The max keeps negative logits from being pushed further down when lambda > 1.

    Args:
        logits: (B, H, N, T) scaled text logits.
        lam_columns: (B, T) lambda on bound tokens, 1 elsewhere (max(l, l) = l leaves them unchanged).
    """
    return torch.maximum(logits, logits * lam_columns[:, None, None, :])


def personalized_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    subject_values: Sequence[torch.Tensor],
    subject_masks: torch.Tensor,
    lam: torch.Tensor | None = None,
    alpha: float | None | Sequence[float | None] = 2.0,
    attn_mask: torch.Tensor | None = None,
    scale: Sequence[float] | None = None,
) -> torch.Tensor:
    """Cross-attention in which each bound subject token takes a per-query value (paper eq. 4).

    Args:
        query: (B, H, N, d) image queries.
        key: (B, H, T, d) ordinary text keys (kept: where the subject appears is still decided by the
            subject word's own key).
        value: (B, H, T, d) ordinary text values.
        subject_values: K tensors (B, H, N, d), v*_q of each subject (from `nested_values`).
        subject_masks: (K, B, T) bool, the token positions bound to each subject. A row with no bound
            token of subject k gets nothing from v*_k (its coefficient is exactly zero).
        lam: (K, B) lambda per subject and row, or None for lambda = 1 everywhere (the trained model),
            which lets the outer attention run as one fused attention call.
        alpha: subject values are rescaled to alpha |V[s]| per head; None disables the regularization
            (the raw v*_q is used, as in the paper's "no regularization" ablation). One value for all
            subjects, or one per subject (adapters trained with different alpha).
        attn_mask: optional additive mask broadcastable to (B, H, N, T) (e.g. an encoder attention mask).
        scale: the strength s of each subject, or None for 1 everywhere. A subject token's value becomes
            (1 - s) V[s] + s v*_q and its lambda 1 + s (lambda - 1): 0 is the base model's attention, 1 the
            nested attention above. Both are linear in the token mask, so s simply weighs the mask.

    Returns:
        (B, H, N, d).
    """
    head_dim = value.shape[-1]
    alphas = list(alpha) if isinstance(alpha, Sequence) else [alpha] * len(subject_values)
    masks = subject_masks.to(value.dtype)  # (K, B, T)
    if scale is not None:  # the strength weighs each subject's tokens: their share of V[s], v*_q and lambda
        masks = torch.stack([s * masks[k] for k, s in enumerate(scale)]) if len(scale) else masks
    bound = masks.sum(0).clamp(max=1)  # (B, T)
    value_norm = value.norm(dim=-1) if any(a is not None for a in alphas) else None  # (B, H, T)
    columns = [  # per subject (B, H, T, 1): the coefficient of its unit value on its own tokens
        (masks[k, :, None, :] if a is None else a * value_norm * masks[k, :, None, :])
        .expand(value.shape[:-1])[..., None]
        for k, a in enumerate(alphas)
    ]
    augmented = torch.cat([value * (1 - bound)[:, None, :, None], *columns], dim=-1)  # (B, H, T, d + K)

    if lam is None:
        # fused SDPA kernels need one head size for q, k and v (CUDA's also a multiple of 8): with a (d + K)-wide
        # value SDPA falls back to its unfused math kernel. Zero columns on q and k leave the logits unchanged
        # (the scale stays d^-1/2), zero columns on the value are dropped below.
        width = -(-(head_dim + len(subject_values)) // _HEAD_ALIGN) * _HEAD_ALIGN
        mixed = F.scaled_dot_product_attention(
            F.pad(query, (0, width - head_dim)), F.pad(key, (0, width - head_dim)),
            F.pad(augmented, (0, width - augmented.shape[-1])), attn_mask=attn_mask, scale=head_dim**-0.5,
        )
    else:
        lam_columns = 1 + ((lam.to(masks.dtype) - 1)[:, :, None] * masks).sum(0)  # (B, T)
        logits = (query @ key.transpose(-1, -2)) * head_dim**-0.5  # (B, H, N, T)
        logits = lambda_logits(logits, lam_columns)
        if attn_mask is not None:
            logits = logits + attn_mask
        probs = logits.float().softmax(dim=-1).to(value.dtype)
        mixed = probs @ augmented  # (B, H, N, d + K)

    # out = mixed[..., :d] + sum_k c_k u_k with u_k = v*_k / |v*_k|: the 1/|v*_k| folds into the (B, H, N, 1)
    # coefficient, so the only (B, H, N, d) tensor made here is the output (no normalized copy, no product)
    out = None
    for k, subject_value in enumerate(subject_values):
        coefficient = mixed[..., head_dim + k, None]
        if alphas[k] is not None:
            coefficient = coefficient * inverse_subject_norm(subject_value)
        if out is None:
            out = torch.addcmul(mixed[..., :head_dim], coefficient, subject_value)
        else:
            out.addcmul_(coefficient, subject_value)  # our own buffer; addcmul's backward does not read it
    return mixed[..., :head_dim] if out is None else out
