"""The attention processor that runs nested attention inside a diffusers `Attention` module."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .attention import nested_values, personalized_attention
from .state import RowLayout

if TYPE_CHECKING:
    from diffusers.models.attention_processor import Attention

    from .controller import NestedAttentionController


def _take_rows(value, rows: torch.Tensor, batch_size: int):
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch_size:
        return value.index_select(0, rows)
    return value


def _slice_rows(value, start: int, stop: int, batch_size: int):
    if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch_size:
        return value[start:stop]
    return value


class NestedAttnProcessor:
    """Cross-attention processor: vanilla rows go to the processor it replaced, bound rows get nested attention.

    Projections are the module's own (`to_q`, `to_k`, `to_v`, `to_out`), so LoRA layers on them keep
    working. The processor holds no per-call data: it reads the controller's current subjects.
    """

    def __init__(self, layer_path: str, controller: NestedAttentionController, original):
        self.layer_path = layer_path
        self.controller = controller
        self.original = original

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args,
        **kwargs,
    ) -> torch.Tensor:
        batch_size = hidden_states.shape[0]
        device = hidden_states.device
        layout = None if encoder_hidden_states is None else self.controller.layout(batch_size, device)
        if layout is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if layout.rows is None:
            return self._nested(attn, layout, hidden_states, encoder_hidden_states, attention_mask, temb)

        if layout.span is not None:
            return self._split_by_span(attn, layout, hidden_states, encoder_hidden_states, attention_mask, temb,
                                        *args, **kwargs)
        rows = layout.rows
        vanilla_rows = self.controller.vanilla_rows(batch_size, device)
        vanilla = None
        if vanilla_rows.numel():
            take = lambda v: _take_rows(v, vanilla_rows, batch_size)  # noqa: E731
            vanilla = self.original(
                attn, take(hidden_states), take(encoder_hidden_states), take(attention_mask), take(temb),
                *args, **kwargs,
            )
        take = lambda v: _take_rows(v, rows, batch_size)  # noqa: E731
        nested = self._nested(
            attn, layout, take(hidden_states), take(encoder_hidden_states), take(attention_mask), take(temb)
        )
        out = nested.new_empty((batch_size, *nested.shape[1:]))  # made last: not held while the rows compute
        if vanilla is not None:
            out.index_copy_(0, vanilla_rows, vanilla)
        return out.index_copy_(0, rows, nested)

    def _split_by_span(self, attn, layout: RowLayout, hidden_states, encoder_hidden_states, attention_mask, temb,
                       *args, **kwargs):
        """Bound rows start..stop-1, vanilla rows around them: slices (views) in, one concatenation out."""
        batch_size = hidden_states.shape[0]
        start, stop = layout.span

        def part(lo: int, hi: int, nested: bool):
            take = lambda v: _slice_rows(v, lo, hi, batch_size)  # noqa: E731
            if nested:
                return self._nested(attn, layout, take(hidden_states), take(encoder_hidden_states),
                                    take(attention_mask), take(temb))
            return self.original(attn, take(hidden_states), take(encoder_hidden_states), take(attention_mask),
                                 take(temb), *args, **kwargs)

        pieces = [part(lo, hi, nested) for lo, hi, nested in ((0, start, False), (start, stop, True),
                                                              (stop, batch_size, False)) if hi > lo]
        return torch.cat(pieces)

    def _nested(self, attn, layout: RowLayout, hidden_states, encoder_hidden_states, attention_mask, temb):
        # the steps of diffusers' AttnProcessor2_0, with the attention call replaced
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, text_length, _ = encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, text_length, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
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

        subject_values, alphas = [], []
        for subject, slots in zip(self.controller.subjects, layout.slots):
            nested_key, nested_value = subject.nested[self.layer_path]  # (S, H, M, d)
            # no-ops unless the UNet moved after binding (CPU offload) or the adapter keeps its own dtype (training)
            nested_key = nested_key.to(query.device, query.dtype)
            nested_value = nested_value.to(query.device, query.dtype)
            bias = subject.bias
            if nested_key.shape[0] == 1:
                nested_key = nested_key.expand(batch, -1, -1, -1)
                nested_value = nested_value.expand(batch, -1, -1, -1)
                bias = None if bias is None else bias.expand(batch, -1)
            else:
                nested_key, nested_value = nested_key[slots], nested_value[slots]
                bias = None if bias is None else bias[slots]
            bias = None if bias is None else bias[:, None, None, :].to(query.device, query.dtype)
            subject_values.append(nested_values(query, nested_key, nested_value, bias))
            alphas.append(subject.alpha)

        hidden_states = personalized_attention(
            query, key, value, subject_values, layout.masks, lam=layout.lam, alpha=alphas,
            attn_mask=attention_mask,
        )
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
