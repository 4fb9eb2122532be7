"""The attention processor that runs nested attention inside a diffusers `Attention` module."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0, SlicedAttnProcessor
from torch import nn

from .ip_adapter import IP_ADAPTER_PROCESSORS, image_attention, split_encoder_states
from .mechanisms import SubjectRows
from .state import RowLayout

if TYPE_CHECKING:
    from diffusers.models.attention_processor import Attention

    from .controller import NestedAttentionController


def prologue(attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
             attention_mask: torch.Tensor | None, temb: torch.Tensor | None):
    """The first steps of diffusers' AttnProcessor2_0: spatial norm, (B, C, H, W) -> (B, HW, C), the attention mask
    as (B, heads, 1 or N, T), group norm. Returns (hidden_states, attention_mask)."""
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    if hidden_states.ndim == 4:
        batch, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
    batch, text_length, _ = encoder_hidden_states.shape
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, text_length, batch)
        attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    return hidden_states, attention_mask


def epilogue(attn: Attention, hidden_states: torch.Tensor, residual: torch.Tensor,
             spatial: torch.Size | None) -> torch.Tensor:
    """The last steps of diffusers' AttnProcessor2_0 on (B, N, H d): output projection and dropout, back to
    `spatial` (the input's (B, C, H, W), if it had that shape), residual, rescale."""
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
    if spatial is not None:
        hidden_states = hidden_states.transpose(-1, -2).reshape(spatial)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


def _rows(value, select, batch_size: int):
    """`select` applied to each tensor in `value` whose first axis is the batch (also inside IP-Adapter's tuple)."""
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(v, select, batch_size) for v in value)
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch_size:
        return select(value)
    return value


class NestedAttnProcessor:
    """Cross-attention processor: vanilla rows go to the processor it replaced, bound rows get nested attention
    (or the rival mechanism of the bound adapters, `mechanisms.py`).

    Projections are the module's own (`to_q`, `to_k`, `to_v`, `to_out`), so LoRA layers on them keep
    working. The processor holds no per-call data: it reads the controller's current subjects. Wrapping
    diffusers' IP-Adapter processor, bound rows also get IP-Adapter's image attention (`ip_adapter.py`);
    wrapping its `SlicedAttnProcessor`, bound rows are computed in slices of the same number of (row, head)
    pairs.
    """

    def __init__(self, layer_path: str, controller: NestedAttentionController, original):
        self.layer_path = layer_path
        self.controller = controller
        self.original = original
        self.slice_size = original.slice_size if isinstance(original, SlicedAttnProcessor) else None

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | tuple | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        ip_adapter_masks: list[torch.Tensor] | torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        # diffusers hands a processor only the keyword arguments its signature names, hence the explicit
        # `ip_adapter_masks`; the original gets exactly what came (SlicedAttnProcessor takes no `temb`)
        extra = dict(kwargs)
        if temb is not None:
            extra["temb"] = temb
        if ip_adapter_masks is not None:
            extra["ip_adapter_masks"] = ip_adapter_masks
        batch_size = hidden_states.shape[0]
        device = hidden_states.device
        layout = None if encoder_hidden_states is None else self.controller.layout(batch_size, device)
        scales = None if layout is None else self.controller.layer_scales(self.layer_path)
        if layout is None or (scales is not None and not any(scales)):  # no subject, or all at strength 0 here
            return self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                 attention_mask=attention_mask, **extra)

        def run(select, nested: bool):
            take = lambda v: _rows(v, select, batch_size)  # noqa: E731
            if nested:
                return self._nested(attn, layout, scales, take(hidden_states), take(encoder_hidden_states),
                                    take(attention_mask), take(temb), ip_adapter_masks)
            rows_extra = extra if temb is None else {**extra, "temb": take(temb)}
            return self.original(attn, take(hidden_states), encoder_hidden_states=take(encoder_hidden_states),
                                 attention_mask=take(attention_mask), **rows_extra)

        if layout.rows is None:
            return run(lambda v: v, nested=True)
        if layout.span is not None:  # bound rows start..stop-1, vanilla rows around: slices (views) in, one cat out
            start, stop = layout.span
            pieces = [run(lambda v, lo=lo, hi=hi: v[lo:hi], nested) for lo, hi, nested in (
                (0, start, False), (start, stop, True), (stop, batch_size, False)) if hi > lo]
            return torch.cat(pieces)
        rows = layout.rows
        vanilla_rows = self.controller.vanilla_rows(batch_size, device)
        vanilla = run(lambda v: v.index_select(0, vanilla_rows), nested=False) if vanilla_rows.numel() else None
        nested = run(lambda v: v.index_select(0, rows), nested=True)
        out = nested.new_empty((batch_size, *nested.shape[1:]))  # made last: not held while the rows compute
        if vanilla is not None:
            out.index_copy_(0, vanilla_rows, vanilla)
        return out.index_copy_(0, rows, nested)

    def _nested(self, attn, layout: RowLayout, scales, hidden_states, encoder_hidden_states, attention_mask, temb,
                ip_adapter_masks):
        # the steps of diffusers' AttnProcessor2_0, with the attention call replaced
        encoder_hidden_states, image_states = split_encoder_states(encoder_hidden_states, self.original,
                                                                   self.layer_path)
        residual, spatial = hidden_states, hidden_states.shape if hidden_states.ndim == 4 else None
        hidden_states, attention_mask = prologue(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        batch, text_length, _ = encoder_hidden_states.shape
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)

        query = attn.to_q(hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, N, d)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, T, d)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if layout.masks.shape[-1] != text_length:
            raise RuntimeError(
                f"Subjects were bound on {layout.masks.shape[-1]} text tokens but layer {self.layer_path} "
                f"received {text_length}."
            )

        if self.slice_size is None:
            hidden_states = self._attend(query, key, value, layout.masks, layout.lam, layout.slots, attention_mask,
                                         scales)
        else:
            hidden_states = self._attend_sliced(query, key, value, layout, attention_mask, scales)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        if image_states is not None:
            image = image_attention(self.original, query, image_states, ip_adapter_masks)
            if image is not None:
                hidden_states = hidden_states + image
        return epilogue(attn, hidden_states, residual, spatial)

    def _attend_sliced(self, query, key, value, layout: RowLayout, attention_mask, scales) -> torch.Tensor:
        """`_attend` over at most `slice_size` (row, head) pairs at a time, as diffusers' SlicedAttnProcessor."""
        batch, heads = query.shape[:2]
        rows_per_step, heads_per_step = max(1, self.slice_size // heads), min(heads, self.slice_size)
        out = torch.empty_like(query)
        for r in range(0, batch, rows_per_step):
            rows = slice(r, r + rows_per_step)
            for h in range(0, heads, heads_per_step):
                head_slice = slice(h, h + heads_per_step)
                out[rows, head_slice] = self._attend(
                    query[rows, head_slice], key[rows, head_slice], value[rows, head_slice], layout.masks[:, rows],
                    None if layout.lam is None else layout.lam[:, rows], [s[rows] for s in layout.slots],
                    None if attention_mask is None else attention_mask[rows, head_slice], scales, head_slice,
                )
        return out

    def _attend(self, query, key, value, masks, lam, slots, attention_mask, scales, heads=slice(None)):
        """Personalized attention of B rows and the heads `heads` of the bound subjects: (B, h, N, d)."""
        batch = query.shape[0]
        subjects = []
        for subject, subject_slots in zip(self.controller.subjects, slots):
            state = subject.nested[self.layer_path]  # each (S, H, ...)
            bias = subject.bias
            # no-ops unless the UNet moved after binding (CPU offload) or the adapter keeps its own dtype (training)
            state = [t[:, heads].to(query.device, query.dtype) for t in state]
            if state[0].shape[0] == 1:
                state = [t.expand(batch, *t.shape[1:]) for t in state]
                bias = None if bias is None else bias.expand(batch, -1)
            else:
                state = [t[subject_slots] for t in state]
                bias = None if bias is None else bias[subject_slots]
            bias = None if bias is None else bias[:, None, None, :].to(query.device, query.dtype)
            subjects.append(SubjectRows(tuple(state), bias, subject.alpha))
        return self.controller.mechanism.attend(query, key, value, subjects, masks, lam, attention_mask, scales)


class NestedIPAdapterAttnProcessor(NestedAttnProcessor, IPAdapterAttnProcessor2_0):
    """The nested processor around one of diffusers' IP-Adapter processors, itself an IP-Adapter processor to diffusers.

    It shares the wrapped processor's weights and scale list, so `set_ip_adapter_scale` finds it and edits the scales
    both use, `unload_ip_adapter` replaces it, and the IP-Adapter weights stay registered in the UNet once, under
    their usual names (`...attn2.processor.to_k_ip.0.weight`), where `pipe.to(...)` and CPU offload move them.
    """

    def __init__(self, layer_path: str, controller: NestedAttentionController, original):
        nn.Module.__init__(self)
        self.to_k_ip, self.to_v_ip = original.to_k_ip, original.to_v_ip  # the same modules, not copies
        self.scale = original.scale  # the same list: set_ip_adapter_scale edits it in place
        self.num_tokens = original.num_tokens
        self.hidden_size, self.cross_attention_dim = original.hidden_size, original.cross_attention_dim
        self.layer_path = layer_path
        self.slice_size = None
        object.__setattr__(self, "controller", controller)
        object.__setattr__(self, "original", original)  # not a submodule: its weights are registered above


def nested_processor(layer_path: str, controller: NestedAttentionController, original) -> NestedAttnProcessor:
    """The nested processor that wraps `original` at `layer_path`."""
    if isinstance(original, IP_ADAPTER_PROCESSORS):
        return NestedIPAdapterAttnProcessor(layer_path, controller, original)
    return NestedAttnProcessor(layer_path, controller, original)
