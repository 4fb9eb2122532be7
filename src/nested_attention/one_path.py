"""Nested attention for a whole (guided) batch in one pass, as a pure function of tensors built once per binding.

The processor projects every row of the batch once and calls `one_path_attention`. Rows that carry no subject
(the negative prompt of classifier-free guidance) have no bound token: their `keep` is 1 and their subject
columns are 0, so the outer attention gives them exactly the vanilla value mix. Only the bound rows then compute
the subject values v*_q (paper eq. 3) and add them, the same arithmetic as `personalized_attention`.

Shapes as in attention.py: B batch, Bs bound rows, H heads, N queries, T text tokens, M nested tokens, d head
size, K subjects, C = the value columns beyond d (K subject columns, then zero columns up to the kernel's width).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import _NORM_EPS, lambda_logits


@dataclass
class BoundRows:
    """Which rows of the batch carry a subject: all (`index` and `span` None), the range `span`, or `index`.

    `vanilla_index` lists the other rows when `index` is given.
    """

    index: torch.Tensor | None = None  # (Bs,) long
    span: tuple[int, int] | None = None
    vanilla_index: torch.Tensor | None = None  # (B - Bs,) long

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """The bound rows of `x` (B, ...): `x` itself, a view, or a gathered copy."""
        if self.span is not None:
            return x[self.span[0]:self.span[1]]
        return x if self.index is None else x.index_select(0, self.index)

    def take_vanilla(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The other rows of `x` (B, ...), as pieces in batch order (views of a span's neighbours)."""
        if self.span is not None:
            start, stop = self.span
            return ([x[:start]] if start else []) + ([x[stop:]] if stop < x.shape[0] else [])
        return [] if self.index is None else [x.index_select(0, self.vanilla_index)]

    def merge(self, every: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
        """`every` (B, ...) with its bound rows replaced by `bound` (Bs, ...), as a new tensor."""
        if self.span is not None:
            start, stop = self.span
            pieces = ([every[:start]] if start else []) + [bound] + ([every[stop:]] if stop < every.shape[0] else [])
            return torch.cat(pieces)
        return bound if self.index is None else every.index_copy(0, self.index, bound)

    def join(self, vanilla: list[torch.Tensor], bound: torch.Tensor) -> torch.Tensor:
        """The batch (B, ...) from the pieces of `take_vanilla` and the bound rows (Bs, ...)."""
        if self.span is not None:
            before = [vanilla[0]] if self.span[0] > 0 else []
            return torch.cat([*before, bound, *vanilla[len(before):]]) if vanilla else bound
        if self.index is None:
            return bound
        out = bound.new_empty((self.index.numel() + self.vanilla_index.numel(), *bound.shape[1:]))
        return out.index_copy_(0, self.vanilla_index, vanilla[0]).index_copy_(0, self.index, bound)


@dataclass
class OuterConstants:
    """What the outer attention of one layer needs of the binding (per batch size, strengths and head size).

    Attributes:
        keep: (B, 1, T, 1) 1 - the subjects' share of each token's own value V[s] (1 on unbound tokens).
        norm_columns: (B, 1, T, C) alpha_k s_k on the tokens of subject k in column k, for subjects with the norm
            regularization (times |V[s]| per head), 0 elsewhere; None when no subject has it.
        plain_columns: (B, 1, T, C) the same, s_k, for subjects without it; None when every subject has it.
        lam_columns: (B, T) lambda on bound tokens (1 elsewhere), or None for 1 everywhere.
        qk_pad: zero columns appended to q and k so that the fused kernel sees one head size (0: it takes a
            wider value as it is).
    """

    keep: torch.Tensor
    norm_columns: torch.Tensor | None
    plain_columns: torch.Tensor | None
    lam_columns: torch.Tensor | None
    qk_pad: int


@dataclass
class NestedLayerState:
    """One subject at one layer, on the bound rows: K̆ and V̆ (Bs, H, M, d), logit bias (Bs, 1, 1, M) or None."""

    nested_key: torch.Tensor
    nested_value: torch.Tensor
    bias: torch.Tensor | None
    alpha: float | None


@dataclass
class TextTerms:
    """What the outer attention needs of the text: the same at every step of a generation (it has no query).

    Attributes:
        key: (B, H, T, d) the text keys, and `qk_pad` zero columns (the outer attention's keys).
        augmented: (B, H, T, d + C) [V keep | subject columns].
        vanilla_key, vanilla_value: (B, H, T, d) the text's own, for the unbound rows when lambda is set, else None.
    """

    key: torch.Tensor
    augmented: torch.Tensor
    vanilla_key: torch.Tensor | None
    vanilla_value: torch.Tensor | None


def text_terms(key: torch.Tensor, value: torch.Tensor, outer: OuterConstants) -> TextTerms:
    """The text's share of `one_path_attention` from its keys and values (B, H, T, d)."""
    columns = None
    if outer.norm_columns is not None:
        columns = torch.linalg.vector_norm(value, dim=-1, keepdim=True) * outer.norm_columns  # (B, H, T, C)
    if outer.plain_columns is not None:
        plain = outer.plain_columns.expand(*value.shape[:-1], -1)
        columns = plain if columns is None else columns + plain
    augmented = torch.cat([value * outer.keep, columns], dim=-1)  # (B, H, T, d + C)
    if outer.lam_columns is not None:
        return TextTerms(key, augmented, key, value)
    return TextTerms(F.pad(key, (0, outer.qk_pad)) if outer.qk_pad else key, augmented, None, None)


def one_path_attention(
    query: torch.Tensor,
    text: TextTerms,
    subjects: list[NestedLayerState],
    outer: OuterConstants,
    rows: BoundRows,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Personalized attention (paper eq. 4) of every row: (B, H, N, d) from query (B, H, N, d), the text's terms
    (`text_terms`), the subjects' states on the bound rows, and the constants of the binding.

    One outer attention over the augmented values [V keep | columns] serves every row (see attention.py); then
    each bound row adds c_k v*_q / |v*_q| per subject, c_k its column of the outer attention. With lambda set,
    the unbound rows take the vanilla attention call and the bound rows the lambda logits.
    """
    head_dim = query.shape[-1]
    if outer.lam_columns is None:
        query_ = F.pad(query, (0, outer.qk_pad)) if outer.qk_pad else query
        mixed = F.scaled_dot_product_attention(query_, text.key, text.augmented, attn_mask=attn_mask,
                                               scale=head_dim**-0.5)
        bound_query, bound_mixed = rows.take(query), rows.take(mixed)  # (Bs, H, N, ...)
    else:
        per_row = attn_mask is not None and attn_mask.shape[0] > 1
        pieces = [rows.take_vanilla(t) for t in (query, text.vanilla_key, text.vanilla_value)]
        masks = rows.take_vanilla(attn_mask) if per_row else [attn_mask] * len(pieces[0])
        vanilla = [F.scaled_dot_product_attention(q, k, v, attn_mask=m) for q, k, v, m in zip(*pieces, masks)]
        bound_query = rows.take(query)
        logits = lambda_logits((bound_query @ rows.take(text.vanilla_key).transpose(-1, -2)) * head_dim**-0.5,
                               rows.take(outer.lam_columns))  # (Bs, H, N, T)
        if attn_mask is not None:
            logits = logits + (rows.take(attn_mask) if per_row else attn_mask)
        bound_mixed = logits.float().softmax(dim=-1).to(query.dtype) @ rows.take(text.augmented)  # (Bs, H, N, d + C)

    out = bound_mixed[..., :head_dim]
    for k, subject in enumerate(subjects):
        subject_value = F.scaled_dot_product_attention(bound_query, subject.nested_key, subject.nested_value,
                                                       attn_mask=subject.bias)  # v*_q, (Bs, H, N, d)
        coefficient = bound_mixed[..., head_dim + k:head_dim + k + 1]  # (Bs, H, N, 1)
        if subject.alpha is not None:
            coefficient = coefficient / torch.linalg.vector_norm(subject_value, dim=-1, keepdim=True).clamp_min(_NORM_EPS)
        # a new tensor for the first subject (`out` is a view of `mixed`), then our own buffer
        out = torch.addcmul(out, coefficient, subject_value) if k == 0 else out.addcmul_(coefficient, subject_value)
    if outer.lam_columns is None:
        return rows.merge(mixed[..., :head_dim], out)
    return rows.join(vanilla, out)
