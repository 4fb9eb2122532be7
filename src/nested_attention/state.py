"""Per-call state: what every nested layer reads during one generation (or one training step).

Computed once per call by its one owner (the `NestedAttentionController`), read by the processors at
every layer and denoising step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import NestedAttentionError


@dataclass
class BoundSubject:
    """One subject (one adapter) bound to a word for the current call.

    R is the number of conditional rows (prompts x images per prompt), S the number of distinct encoded
    subjects, M the nested tokens per subject, T the text length.

    Attributes:
        token_mask: (R, T) bool, the positions of the subject word in each row (all False: not bound).
        slots: (R,) long, which of the S encoded subjects each row uses.
        nested: layer path -> the mechanism's layer state (`NestedAdapter.layer_states`), each (S, H, ...);
            for nested attention (K̆, V̆), each (S, H, M, head_dim).
        bias: (S, M) additive nested logit bias (log image weights, -inf padding), or None.
        lam: (R,) lambda per row, or None when every row uses 1.
        alpha: the adapter's norm regularization factor (None: off).
        scale: layer path -> strength from 0 (the base model) to 1 (full nested attention), or None for 1 at
            every layer (see `personalized_attention`).
        mechanism: how the adapter injects the subject (`mechanisms.py`); all subjects of one call share one.
    """

    token_mask: torch.Tensor
    slots: torch.Tensor
    nested: dict[str, tuple[torch.Tensor, torch.Tensor]]
    bias: torch.Tensor | None = None
    lam: torch.Tensor | None = None
    alpha: float | None = 2.0
    scale: dict[str, float] | None = None
    mechanism: str = "nested"


@dataclass
class RowLayout:
    """The bound subjects spread over the batch the UNet actually sees (rows with no word are left out).

    Attributes:
        rows: (Bs,) batch rows that carry at least one subject, or None when every row does.
        masks: (K, Bs, T) bool.
        lam: (K, Bs) or None.
        slots: K tensors (Bs,).
        span: (start, stop) when `rows` is the contiguous range start..stop-1 (the usual guided batch), so
            that the processor slices the batch (views) instead of gathering rows (copies); None otherwise.
    """

    rows: torch.Tensor | None
    masks: torch.Tensor
    lam: torch.Tensor | None
    slots: list[torch.Tensor]
    span: tuple[int, int] | None = None


def row_layout(subjects: list[BoundSubject], batch_size: int, device: torch.device) -> RowLayout | None:
    """Place the R conditional rows in a UNet batch of `batch_size`; None if no row carries a subject.

    The batch is either the R conditional rows (training, no guidance) or, with classifier-free guidance,
    diffusers' `cat([negative, conditional])`: the first R rows come from the negative prompt and are never
    bound, so they get exactly the vanilla attention.
    """
    cond_rows = subjects[0].token_mask.shape[0]
    if batch_size == cond_rows:
        offset = 0
    elif batch_size == 2 * cond_rows:
        offset = cond_rows
    else:
        raise NestedAttentionError(
            f"The UNet was called with batch {batch_size}, but subjects were bound for {cond_rows} rows "
            f"(expected {cond_rows}, or {2 * cond_rows} with classifier-free guidance). Bind subjects for the "
            f"prompts of this very call."
        )
    masks = torch.stack([s.token_mask.cpu() for s in subjects])  # (K, R, T)
    carrying = masks.any(dim=(0, 2))  # (R,)
    if not bool(carrying.any()):
        return None
    local = torch.nonzero(carrying).flatten()  # (Bs,)
    everyone = offset == 0 and bool(carrying.all())
    lam = None
    if any(s.lam is not None for s in subjects):
        lam = torch.stack([s.lam.cpu() if s.lam is not None else torch.ones(cond_rows) for s in subjects])
        lam = lam[:, local].to(device)
    first, count = int(local[0]), local.numel()
    contiguous = int(local[-1]) - first + 1 == count
    return RowLayout(
        rows=None if everyone else (local + offset).to(device),
        masks=masks[:, local].to(device),
        lam=lam,
        slots=[s.slots.cpu()[local].to(device) for s in subjects],
        span=(first + offset, first + offset + count) if contiguous and not everyone else None,
    )
