"""The subject encoder (paper 3.3): a frozen CLIP image encoder and a Q-Former trained from scratch, or a linear
readout of the CLIP tokens in its place."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import nn
from transformers import Blip2QFormerConfig, Blip2QFormerModel, CLIPVisionModel

try:  # transformers >= 5: the Pillow backend, which needs no torchvision
    from transformers import CLIPImageProcessorPil as CLIPImageProcessor
except ImportError:  # transformers 4
    from transformers import CLIPImageProcessor

from .config import NestedAdapterConfig
from .images import to_rgb


def default_image_processor(image_encoder: CLIPVisionModel) -> CLIPImageProcessor:
    """CLIP's own preprocessing (resize the short side, centre crop, CLIP mean/std) at the encoder's size.

    Used when the image encoder's directory has no preprocessor_config.json.
    """
    size = image_encoder.config.image_size
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


class FrozenClipReader(nn.Module):
    """What both subject encoders share: the frozen CLIP vision model and its last-layer tokens."""

    image_encoder: CLIPVisionModel

    def train(self, mode: bool = True):
        super().train(mode)
        self.image_encoder.eval()  # frozen: never dropout or batch statistics in the backbone
        return self

    def clip_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 1 + patches, clip width), frozen."""
        with torch.no_grad():
            return self.image_encoder(pixel_values=pixel_values).last_hidden_state


class SubjectEncoder(FrozenClipReader):
    """Image -> `num_queries` subject tokens of width `qformer_hidden_size` (`subject_encoder="qformer"`).

    The CLIP tokens are those of the last layer before pooling (`last_hidden_state`, every patch and the
    class token); the Q-Former's learned queries attend to them (BLIP-2 layout). CLIP stays frozen and
    runs without autograd.
    """

    def __init__(self, config: NestedAdapterConfig, image_encoder: CLIPVisionModel):
        super().__init__()
        self.image_encoder = image_encoder.requires_grad_(False).eval()
        qformer_config = Blip2QFormerConfig(
            hidden_size=config.qformer_hidden_size,
            num_hidden_layers=config.qformer_layers,
            num_attention_heads=config.qformer_heads,
            intermediate_size=config.qformer_intermediate_size,
            encoder_hidden_size=config.image_encoder_hidden_size,
            cross_attention_frequency=1,
        )
        self.query_tokens = nn.Parameter(torch.randn(1, config.num_queries, config.qformer_hidden_size) * 0.02)
        self.qformer = Blip2QFormerModel(qformer_config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) preprocessed images -> (B, num_queries, qformer_hidden_size) subject tokens."""
        clip_tokens = self.clip_tokens(pixel_values).to(self.query_tokens.dtype)
        queries = self.query_tokens.expand(pixel_values.shape[0], -1, -1)
        return self.qformer(query_embeds=queries, encoder_hidden_states=clip_tokens).last_hidden_state


class LinearSubjectEncoder(FrozenClipReader):
    """Image -> `num_queries` subject tokens by a linear readout of every CLIP token (`subject_encoder="linear"`).

    Token m = LayerNorm(query_m + sum_p W[m, p] (D x_p)): each CLIP token x_p (class token and patches) is
    projected by D to `linear_rank` features, and each output token weighs every position with its own matrix
    W[m, p], so a token can read a fixed region of the image (an aligned face, a centred subject) where the
    Q-Former's content-based attention pools regions together. CLIP stays frozen, as in `SubjectEncoder`.
    """

    def __init__(self, config: NestedAdapterConfig, image_encoder: CLIPVisionModel):
        super().__init__()
        self.image_encoder = image_encoder.requires_grad_(False).eval()
        vision = image_encoder.config
        self.positions = (vision.image_size // vision.patch_size) ** 2 + 1
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_queries, config.qformer_hidden_size))
        self.down = nn.Linear(config.image_encoder_hidden_size, config.linear_rank, bias=False)
        self.readout = nn.Linear(self.positions * config.linear_rank,
                                 config.num_queries * config.qformer_hidden_size, bias=False)
        self.norm = nn.LayerNorm(config.qformer_hidden_size)

    def contributions(self, clip_tokens: torch.Tensor) -> torch.Tensor:
        """(B, P, clip width) -> (B, M, P, width): W[m, p] (D x_p), what each position adds to each token."""
        queries, width = self.query_tokens.shape[1:]
        weight = self.readout.weight.view(queries, width, self.positions, self.down.out_features)
        return torch.einsum("mwpr,bpr->bmpw", weight, self.down(clip_tokens))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) preprocessed images -> (B, num_queries, qformer_hidden_size) subject tokens."""
        clip_tokens = self.clip_tokens(pixel_values).to(self.query_tokens.dtype)
        read = self.readout(self.down(clip_tokens).flatten(1)).view(len(clip_tokens), *self.query_tokens.shape[1:])
        return self.norm(self.query_tokens + read)


def subject_encoder(config: NestedAdapterConfig, image_encoder: CLIPVisionModel) -> nn.Module:
    """The subject encoder that `config.subject_encoder` names, over the frozen `image_encoder`."""
    kind = {"qformer": SubjectEncoder, "linear": LinearSubjectEncoder}[config.subject_encoder]
    return kind(config, image_encoder)


def preprocess(
    processor: CLIPImageProcessor, images: Sequence[Image.Image], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """PIL images -> (B, 3, S, S) pixel values with the CLIP model's own processor settings."""
    rgb = [to_rgb(image, name=f"subject image {i}") for i, image in enumerate(images)]
    pixel_values = processor(images=rgb, return_tensors="pt").pixel_values
    return pixel_values.to(device=device, dtype=dtype)
