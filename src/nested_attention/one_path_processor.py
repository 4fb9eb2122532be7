"""The default nested processor in place of diffusers' SDPA processor: the whole batch in one pass (`one_path.py`)."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from .one_path import TextTerms, one_path_attention, text_terms
from .processor import NestedAttnProcessor, epilogue, prologue

if TYPE_CHECKING:
    from diffusers.models.attention_processor import Attention


class OnePathAttnProcessor(NestedAttnProcessor):
    """Nested attention in place of `AttnProcessor2_0`: one set of projections and one outer attention for every
    row of the batch, the subject values on the bound rows only, everything else read from the controller's plan
    (built when the subjects were bound).

    With no subject, or a mechanism other than nested attention, it is the wrapping processor it derives from:
    the replaced `AttnProcessor2_0` serves the vanilla rows.
    """

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | tuple | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        plan = self.controller.plan
        rows = None if plan is None or encoder_hidden_states is None else plan.rows.get(hidden_states.shape[0])
        if rows is None or isinstance(encoder_hidden_states, tuple):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        strength_key = plan.strength_key[self.layer_path]
        if strength_key[0] is not None and not any(strength_key[0]):  # every subject at strength 0 here: base model
            return self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                 attention_mask=attention_mask, temb=temb, **kwargs)
        outer = plan.outer[(hidden_states.shape[0], strength_key)]
        subjects = plan.states[self.layer_path]

        # the steps of diffusers' AttnProcessor2_0, with the attention call replaced
        batch, text_length, _ = encoder_hidden_states.shape
        if text_length != plan.text_length:
            raise RuntimeError(
                f"Subjects were bound on {plan.text_length} text tokens but layer {self.layer_path} received "
                f"{text_length}."
            )
        residual, spatial = hidden_states, hidden_states.shape if hidden_states.ndim == 4 else None
        hidden_states, attention_mask = prologue(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        query = attn.to_q(hidden_states)
        head_dim = query.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, N, d)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if outer.keep.dtype != query.dtype or outer.keep.device != query.device:
            # the adapter keeps its own dtype (training), or the UNet moved after binding (CPU offload)
            outer, subjects = _cast(outer, subjects, query)
        text = self._text(attn, plan, encoder_hidden_states, outer, batch, head_dim)

        hidden_states = one_path_attention(query, text, subjects, outer, rows, attention_mask)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)  # (B, N, H d)
        return epilogue(attn, hidden_states, residual, spatial)

    def _text(self, attn, plan, encoder_hidden_states, outer, batch: int, head_dim: int) -> TextTerms:
        """The text's terms of the outer attention, computed once per generation where that is safe: without
        autograd, outside torch.compile and static buffers (which capture one computation for every call), and
        with plain linear projections whose weights have not changed since (LoRA layers can be switched)."""
        stamp = None
        to_k, to_v = attn.to_k, attn.to_v
        if (not torch.is_grad_enabled() and self.controller.store is None and type(to_k) is nn.Linear
                and type(to_v) is nn.Linear and not attn.norm_cross and attn.norm_k is None and not _is_compiling()):
            stamp = (to_k.weight._version, to_k.weight.data_ptr(), to_v.weight._version, to_v.weight.data_ptr(),
                     None if to_k.bias is None else (to_k.bias._version, to_k.bias.data_ptr()),
                     None if to_v.bias is None else (to_v.bias._version, to_v.bias.data_ptr()),
                     encoder_hidden_states._version)
            cached = plan.text_cache.get(self.layer_path)
            if cached is not None and cached[0] is encoder_hidden_states and cached[1] is outer and cached[2] == stamp:
                return cached[3]
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, T, d)
        value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        text = text_terms(key, value, outer)
        if stamp is not None:
            plan.text_cache[self.layer_path] = (encoder_hidden_states, outer, stamp, text)
        return text


def _is_compiling() -> bool:
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return bool(is_compiling and is_compiling())


def _cast(outer, subjects, like: torch.Tensor):
    """The plan's tensors on `like`'s device and dtype (only when they differ from it)."""
    to = lambda t: None if t is None else t.to(like.device, like.dtype)  # noqa: E731
    outer = replace(outer, keep=to(outer.keep), norm_columns=to(outer.norm_columns),
                    plain_columns=to(outer.plain_columns), lam_columns=to(outer.lam_columns))
    subjects = [replace(s, nested_key=to(s.nested_key), nested_value=to(s.nested_value), bias=to(s.bias))
                for s in subjects]
    return outer, subjects
