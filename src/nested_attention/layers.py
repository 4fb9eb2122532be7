"""Finding the UNet's cross-attention layers and their sizes, from the modules themselves."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import Attention


@dataclass(frozen=True)
class CrossAttentionLayer:
    """One cross-attention module: its path in the UNet and the sizes nested attention needs."""

    path: str
    heads: int
    inner_dim: int  # heads x head size: the width of queries, keys and values

    @property
    def head_dim(self) -> int:
        return self.inner_dim // self.heads


def cross_attention_layers(unet: torch.nn.Module) -> dict[str, CrossAttentionLayer]:
    """All `Attention` modules of `unet` that attend to the text, keyed by module path.

    Sizes come from the modules (`heads`, `to_q.out_features`), never from names like "up_blocks.1".
    """
    layers = {}
    for path, module in unet.named_modules():
        if isinstance(module, Attention) and module.is_cross_attention:
            inner_dim = module.to_q.out_features
            layers[path] = CrossAttentionLayer(path=path, heads=module.heads, inner_dim=inner_dim)
    return layers
