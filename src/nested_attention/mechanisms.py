"""The five ways of injecting the subject encoder's tokens into the UNet's cross-attention (paper Fig. 10).

All share the encoder (CLIP + Q-Former), the per-layer projections of the encoder tokens (`to_k`, `to_v`, keyed
by the layer's module path), installation and binding. A mechanism says which projections it needs, what it
computes once per generation from the encoder tokens (`layer_state`), and how a cross-attention layer uses that
at every step (`attend`). Knobs: lambda (`Subject.lam`, paper 5.1) where the paper applies it (nested, global_v,
multi_token); the strength (`NestedAttention.set_scale`) for nested (blend towards the base value) and decoupled
(IP-Adapter's scale on the image term).
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch
from torch import nn

from .attention import nested_values, personalized_attention
from .config import MECHANISMS as NAMES
from .errors import NestedAttentionError
from .rival_attention import decoupled_attention, multi_token_attention, simple_adapter_attention


class SubjectRows(NamedTuple):
    """One bound subject at one layer, gathered for the rows (and heads) being computed."""

    tensors: tuple[torch.Tensor, ...]  # its `layer_state`, each (B, h, ...)
    bias: torch.Tensor | None  # (B, 1, 1, M) additive logit bias over its encoder tokens, or None
    alpha: float | None


def split_heads(projected: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """(S, M, H * d) -> (S, H, M, d), contiguous."""
    S, M, _ = projected.shape
    return projected.view(S, M, heads, head_dim).transpose(1, 2).contiguous()


def token_weights(tokens: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(S, M) weights of the encoder tokens: softmax of the bias (log image weights, -inf padding), else uniform."""
    if bias is None:
        return tokens.new_full(tokens.shape[:2], 1.0 / tokens.shape[1])
    return bias.float().softmax(dim=-1).to(tokens.dtype)


def _presence(masks: torch.Tensor) -> torch.Tensor | None:
    """(K, B) bool: which rows carry each subject; None when there is one subject (every computed row has it)."""
    return masks.any(dim=-1) if masks.shape[0] > 1 else None


class Mechanism:
    """How one adapter's encoder tokens enter a cross-attention layer (stateless; one instance per kind)."""

    name: ClassVar[str]
    has_key: ClassVar[bool] = True  # a per-layer key projection of the encoder tokens
    uses_lam: ClassVar[bool] = True
    uses_scale: ClassVar[bool] = False
    per_step_bias: ClassVar[bool] = True  # the token bias is applied at each step (else folded into layer_state)

    def layer_state(self, projection: nn.Module, tokens: torch.Tensor, bias: torch.Tensor | None, heads: int,
                    head_dim: int) -> tuple[torch.Tensor, ...]:
        """What a layer needs of S subjects' tokens (S, M, width), each tensor (S, H, ...). Once per generation."""
        return (split_heads(projection.to_k(tokens), heads, head_dim),
                split_heads(projection.to_v(tokens), heads, head_dim))

    def attend(self, query, key, value, subjects: list[SubjectRows], masks, lam, attn_mask, scales) -> torch.Tensor:
        """(B, h, N, d) from the layer's query (B, h, N, d), text key and value (B, h, T, d), the bound subjects,
        their token masks (K, B, T), lambda (K, B) or None, the text mask and the strengths (K floats or None)."""
        raise NotImplementedError

    def check_knobs(self, lam: torch.Tensor | None, scale: dict[str, float] | None, word: str = "") -> None:
        """Refuse, in one sentence, a lambda or a strength this mechanism has no use for."""
        who = f"The subject bound to {word!r} uses" if word else "This adapter uses"
        if not self.uses_lam and lam is not None and bool((lam != 1).any()):
            raise NestedAttentionError(
                f"{who} the {self.name} mechanism, which has no lambda (lambda applies to nested, global_v and "
                f"multi_token), but lambda {float(lam[lam != 1][0]):g} was given; leave lam at 1"
                + (" and use set_scale to trade identity against the prompt." if self.uses_scale else ".")
            )
        if not self.uses_scale and scale is not None and any(s != 1 for s in scale.values()):
            raise NestedAttentionError(
                f"{who} the {self.name} mechanism, which has no strength (set_scale applies to nested and "
                f"decoupled), but a strength other than 1 was set; keep it at 1"
                + (" and use the subject's lam to trade identity against the prompt." if self.uses_lam else ".")
            )


class Nested(Mechanism):
    """The paper's nested attention (3.2): the subject word's value becomes softmax(q K̆ᵀ/√d) V̆, per query."""

    name = "nested"
    uses_scale = True

    def attend(self, query, key, value, subjects, masks, lam, attn_mask, scales):
        subject_values = [nested_values(query, s.tensors[0], s.tensors[1], s.bias) for s in subjects]
        return personalized_attention(query, key, value, subject_values, masks, lam=lam,
                                      alpha=[s.alpha for s in subjects], attn_mask=attn_mask, scale=scales)


class Decoupled(Mechanism):
    """IP-Adapter's decoupled cross-attention: a parallel attention over the encoder tokens (new per-layer K/V,
    the layer's own queries), added with the strength as IP-Adapter's scale. It acts on every pixel of the image,
    not through a word; the word only marks the prompts that carry the subject. Several subjects add one term each.
    """

    name = "decoupled"
    uses_lam = False
    uses_scale = True

    def attend(self, query, key, value, subjects, masks, lam, attn_mask, scales):
        present = _presence(masks)
        weights = []
        for k in range(len(subjects)):
            weight = 1.0 if scales is None else scales[k]
            if present is not None:
                weight = present[k].to(query.dtype)[:, None, None, None] * weight  # (B, 1, 1, 1)
            weights.append(weight)
        return decoupled_attention(query, key, value, [s.tensors[0] for s in subjects],
                                   [s.tensors[1] for s in subjects], weights, [s.bias for s in subjects], attn_mask)


class Simple(Mechanism):
    """The 'simple adapter': the encoder tokens (new per-layer K/V) appended to the text tokens of the existing
    cross-attention, one softmax over both. No word is involved in the attention; the word marks the prompts
    that carry the subject. Several subjects append their tokens side by side."""

    name = "simple"
    uses_lam = False

    def attend(self, query, key, value, subjects, masks, lam, attn_mask, scales):
        present = _presence(masks)
        biases = []
        for k, s in enumerate(subjects):
            bias = s.bias
            if present is not None:  # rows without subject k must not see its tokens
                absent = torch.zeros(query.shape[0], 1, 1, s.tensors[0].shape[2], dtype=query.dtype,
                                     device=query.device).masked_fill(~present[k][:, None, None, None], -torch.inf)
                bias = absent if bias is None else bias + absent
            biases.append(bias)
        return simple_adapter_attention(query, key, value, [s.tensors[0] for s in subjects],
                                        [s.tensors[1] for s in subjects], biases, attn_mask)


class GlobalV(Mechanism):
    """'Global V': the subject word's value becomes a per-layer projection of the mean encoder token, the same for
    every query, with nested attention's norm regularization (alpha |V[s*]|) and lambda."""

    name = "global_v"
    has_key = False
    per_step_bias = False

    def layer_state(self, projection, tokens, bias, heads, head_dim):
        mean_token = (token_weights(tokens, bias)[:, None, :] @ tokens)  # (S, 1, width), weighted by the bias
        return (split_heads(projection.to_v(mean_token), heads, head_dim),)  # (S, H, 1, d)

    def attend(self, query, key, value, subjects, masks, lam, attn_mask, scales):
        # a (B, H, 1, d) subject value broadcasts over the queries: personalized_attention with v*_q = v̄
        return personalized_attention(query, key, value, [s.tensors[0] for s in subjects], masks, lam=lam,
                                      alpha=[s.alpha for s in subjects], attn_mask=attn_mask, scale=scales)


class MultiToken(Mechanism):
    """'Multiple tokens': one extra text token per encoder token, each with the subject word's key and its own
    value (a per-layer projection of that encoder token), in one softmax with the text (`multi_token_attention`).
    The layer state folds the M values into their weighted mean V̄ and their total weight c, once."""

    name = "multi_token"
    has_key = False
    per_step_bias = False

    def layer_state(self, projection, tokens, bias, heads, head_dim):
        values = split_heads(projection.to_v(tokens), heads, head_dim)  # (S, H, M, d)
        mean_value = token_weights(tokens, bias)[:, None, None, :].to(values.dtype) @ values  # (S, H, 1, d)
        S, M = tokens.shape[:2]
        count = torch.full((S,), float(M), device=tokens.device) if bias is None else bias.float().logsumexp(-1).exp()
        return mean_value, count.to(values.dtype)[:, None, None, None].expand(S, heads, 1, 1).contiguous()

    def attend(self, query, key, value, subjects, masks, lam, attn_mask, scales):
        return multi_token_attention(query, key, value, [s.tensors[0] for s in subjects],
                                     [s.tensors[1] for s in subjects], masks, lam=lam, attn_mask=attn_mask)


MECHANISMS: dict[str, Mechanism] = {m.name: m() for m in (Nested, Decoupled, Simple, GlobalV, MultiToken)}
assert tuple(MECHANISMS) == NAMES


def mechanism(name: str) -> Mechanism:
    """The mechanism called `name`; one clear sentence for an unknown one."""
    if name not in MECHANISMS:
        raise NestedAttentionError(f"Unknown mechanism {name!r}; expected one of {', '.join(MECHANISMS)}.")
    return MECHANISMS[name]
