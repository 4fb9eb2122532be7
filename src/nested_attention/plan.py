"""What the one-path processor reads of a binding, built once when subjects are bound (`build_plan`).

Per batch size (with and without guidance): the bound rows and, per distinct set of layer strengths and head
size, the outer attention's constants; per layer: each subject's K̆, V̆ and logit bias on the bound rows. With
static buffers (`StaticStore`) every tensor lives in storage that the next binding of the same shapes refills
in place, so that a captured CUDA graph, which replays fixed addresses, serves every subject.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .layers import CrossAttentionLayer
from .one_path import BoundRows, NestedLayerState, OuterConstants
from .state import BoundSubject, RowLayout

_HEAD_ALIGN = 8  # head sizes the fused attention kernels accept


class StaticStore:
    """Tensors, by name, whose storage survives rebinding: a new binding of the same shapes is copied in place."""

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}
        self.allocations = 0  # grows when a binding brings new shapes (a captured graph must then be recaptured)

    def own(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        buffer = self.buffers.get(name)
        if buffer is not None and (buffer.shape, buffer.dtype, buffer.device) == (tensor.shape, tensor.dtype,
                                                                                   tensor.device):
            return buffer.copy_(tensor)
        buffer = tensor.clone(memory_format=torch.contiguous_format)
        torch._dynamo.mark_static_address(buffer)  # torch.compile's CUDA graphs read it in place, never copy it
        self.buffers[name] = buffer
        self.allocations += 1
        return buffer


@dataclass
class OnePathPlan:
    """The binding as the one-path processor reads it (see the module docstring)."""

    rows: dict[int, BoundRows]  # batch size -> bound rows
    outer: dict[tuple, OuterConstants]  # (batch size, layer's strength key) -> constants
    strength_key: dict[str, tuple]  # layer path -> (strengths or None, head size)
    states: dict[str, list[NestedLayerState]]  # layer path -> one per subject
    text_length: int
    text_cache: dict[str, tuple] = field(default_factory=dict)  # layer path -> the text's terms (see the processor)


def _value_widths(device: torch.device, head_dim: int, subjects: int, lam: bool) -> tuple[int, int]:
    """(value columns beyond d, zero columns for q and k) of the outer attention on `device`."""
    if lam:  # computed with explicit matrix products: no kernel rules
        return subjects, 0
    width = -(-(head_dim + subjects) // _HEAD_ALIGN) * _HEAD_ALIGN
    # CUDA's memory-efficient kernel takes a value head size other than the query's; the CPU's fused kernel
    # does not (it would fall back to the unfused math kernel), so q and k get zero columns there
    return width - head_dim, 0 if device.type == "cuda" else width - head_dim


def _outer(subjects: list[BoundSubject], batch_size: int, scales: list[float] | None, head_dim: int,
           device: torch.device, dtype: torch.dtype, own, name: str) -> OuterConstants:
    cond_rows, text_length = subjects[0].token_mask.shape
    masks = torch.stack([s.token_mask for s in subjects]).to(device, dtype)  # (K, R, T)
    if scales is not None:  # the strength weighs each subject's tokens (see `personalized_attention`)
        masks = masks * torch.tensor(scales, device=device, dtype=dtype)[:, None, None]
    unbound = batch_size - cond_rows  # the negative-prompt rows of a guided batch come first and carry nothing
    masks = torch.cat([masks.new_zeros(len(subjects), unbound, text_length), masks], dim=1)  # (K, B, T)
    lam = None
    if any(s.lam is not None for s in subjects):
        lam = torch.stack([s.lam if s.lam is not None else torch.ones(cond_rows) for s in subjects]).to(device, dtype)
        lam = torch.cat([lam.new_ones(len(subjects), unbound), lam], dim=1)  # (K, B)
    extra, qk_pad = _value_widths(device, head_dim, len(subjects), lam is not None)
    norm_columns, plain_columns = (masks.new_zeros(batch_size, 1, text_length, extra) for _ in range(2))
    for k, s in enumerate(subjects):  # column k: subject k's tokens, weighted by alpha (times |V[s]|) or by 1
        if s.alpha is None:
            plain_columns[:, 0, :, k] = masks[k]
        else:
            norm_columns[:, 0, :, k] = masks[k] * s.alpha
    alphas = [s.alpha is not None for s in subjects]
    return OuterConstants(
        keep=own(f"{name}/keep", (1 - masks.sum(0).clamp(max=1))[:, None, :, None]),
        norm_columns=own(f"{name}/norm", norm_columns) if any(alphas) else None,
        plain_columns=own(f"{name}/plain", plain_columns) if not all(alphas) else None,
        lam_columns=None if lam is None else own(f"{name}/lam", 1 + ((lam - 1)[:, :, None] * masks).sum(0)),
        qk_pad=qk_pad,
    )


def _states(subject: BoundSubject, slots: torch.Tensor, layer: CrossAttentionLayer, own, name: str
            ) -> NestedLayerState:
    nested_key, nested_value = subject.nested[layer.path]  # (S, H, M, d)
    bias = None if subject.bias is None else subject.bias.to(nested_key.dtype)  # (S, M)
    rows, count = slots.numel(), nested_key.shape[0]
    if count == 1:  # one subject image for every bound row: views
        nested_key, nested_value = own(f"{name}/key", nested_key), own(f"{name}/value", nested_value)
        bias = None if bias is None else own(f"{name}/bias", bias)
        expand = lambda t: t.expand(rows, *t.shape[1:])  # noqa: E731
    else:
        same = rows == count and bool((slots.cpu() == torch.arange(count)).all())
        pick = (lambda t: t) if same else (lambda t: t[slots.to(t.device)])  # noqa: E731
        nested_key, nested_value = own(f"{name}/key", pick(nested_key)), own(f"{name}/value", pick(nested_value))
        bias = None if bias is None else own(f"{name}/bias", pick(bias))
        expand = lambda t: t  # noqa: E731
    if bias is not None:
        bias = expand(bias[:, None, None, :])
    return NestedLayerState(expand(nested_key), expand(nested_value), bias, subject.alpha)


def build_plan(subjects: list[BoundSubject], layouts: dict[int, RowLayout], layers: dict[str, CrossAttentionLayer],
               layer_scales, store: StaticStore | None) -> OnePathPlan:
    """The plan of `subjects` for the batch sizes of `layouts` (each with at least one bound row).

    `layer_scales(path)` gives the strengths at a layer (None for 1 everywhere); `store`, if given, owns every
    tensor (static buffers).
    """
    own = (lambda name, t: t) if store is None else store.own  # noqa: E731
    first = next(iter(subjects[0].nested.values()))[0]
    device, dtype = first.device, first.dtype
    layout = next(iter(layouts.values()))  # the bound rows are the same rows of the prompts in every layout
    strength_key, outer = {}, {}
    for path, layer in layers.items():
        scales = layer_scales(path)
        strength_key[path] = (None if scales is None else tuple(scales), layer.head_dim)
        for batch_size in layouts:
            key = (batch_size, strength_key[path])
            if key not in outer:
                outer[key] = _outer(subjects, batch_size, scales, layer.head_dim, device, dtype, own,
                                    f"outer/{len(outer)}")
    states = {path: [_states(s, layout.slots[k], layer, own, f"{path}/{k}") for k, s in enumerate(subjects)]
              for path, layer in layers.items()}
    rows = {}
    for batch_size, lay in layouts.items():
        if lay.rows is None:
            rows[batch_size] = BoundRows()
        elif lay.span is not None:
            rows[batch_size] = BoundRows(span=lay.span)
        else:
            vanilla = torch.ones(batch_size, dtype=torch.bool)
            vanilla[lay.rows.cpu()] = False
            rows[batch_size] = BoundRows(index=own(f"rows/{batch_size}", lay.rows),
                                         vanilla_index=own(f"vanilla/{batch_size}", vanilla.nonzero().flatten().to(device)))
    return OnePathPlan(rows, outer, strength_key, states, subjects[0].token_mask.shape[1])


def structure(plan: OnePathPlan) -> tuple:
    """Everything of `plan` that is not tensor data: two plans of one structure over the same static buffers are
    interchangeable, and a CUDA graph captured with one replays the other."""
    return (
        tuple((size, rows.span, rows.index is None) for size, rows in plan.rows.items()),
        tuple(plan.strength_key.items()), plan.text_length,
        tuple((key, outer.qk_pad, outer.norm_columns is None, outer.plain_columns is None, outer.lam_columns is None)
              for key, outer in plan.outer.items()),
        tuple((path, tuple((s.alpha, s.bias is None) for s in states)) for path, states in plan.states.items()),
    )
