"""Loading what training needs: the frozen base model parts, the frozen CLIP, and the adapter to train."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler, DiffusionPipeline

from nested_attention import NestedAdapter
from nested_attention.adapter import load_image_encoder
from nested_attention.errors import NestedAttentionError
from nested_attention.layers import cross_attention_layers
from nested_attention.sources import IMAGE_ENCODER, find, load_pipeline
from nested_attention.tiny import tiny_image_encoder

from .config import TrainConfig

TINY_IMAGE_ENCODER = "tiny"


def named_image_encoder(name: str) -> bool:
    """Whether ``image_encoder`` is a registered name (``tiny``, ``toy``) rather than a folder or hub id: an adapter
    trained on one carries it in image_encoder/ (no name to resolve later)."""
    return find(IMAGE_ENCODER, name) is not None


@dataclass
class BaseModel:
    """The frozen text-to-image model: its pipeline (for validation) and the parts the training step uses."""

    pipe: DiffusionPipeline
    noise_scheduler: DDPMScheduler

    @property
    def is_sdxl(self) -> bool:
        return getattr(self.pipe, "text_encoder_2", None) is not None

    @property
    def tokenizers(self) -> list:
        return [t for t in (self.pipe.tokenizer, getattr(self.pipe, "tokenizer_2", None)) if t is not None]

    @property
    def text_encoders(self) -> list:
        return [e for e in (self.pipe.text_encoder, getattr(self.pipe, "text_encoder_2", None)) if e is not None]


def load_base_model(config: TrainConfig) -> BaseModel:
    """The base pipeline, frozen (a tiny random one for `tiny-sd` / `tiny-sdxl`)."""
    name = config.pretrained_model
    pipe = load_pipeline(name, note_tiny=False)
    for part in ("unet", "vae", "text_encoder"):
        if getattr(pipe, part, None) is None:
            raise NestedAttentionError(f"The base model {name!r} has no {part}; training needs an SD 1.5 or SDXL pipeline.")
    for module in (pipe.unet, pipe.vae, *[e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e]):
        module.requires_grad_(False).eval()
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return BaseModel(pipe=pipe, noise_scheduler=noise_scheduler)


def load_adapter(config: TrainConfig, unet: torch.nn.Module) -> NestedAdapter:
    """The adapter to train: from `init_adapter` (phase 2), else fresh for this UNet; fp32, train mode.

    A fresh adapter's key projections are scaled by `key_init_gain`: the nested attention's logits over the subject
    tokens differ only through the keys' differences, so a gain above 1 starts every pixel's attention less uniform.

    An exported adapter of a `tiny` or `toy` run carries its image encoder in `image_encoder/`; otherwise the CLIP
    model comes from `config.image_encoder`.
    """
    tiny = config.image_encoder == TINY_IMAGE_ENCODER
    named = named_image_encoder(config.image_encoder)
    if config.init_adapter:
        adapter = NestedAdapter.from_pretrained(config.init_adapter, image_encoder=None if named else config.image_encoder)
        adapter.check_compatible(cross_attention_layers(unet))
    else:
        if tiny:
            image_encoder, processor = tiny_image_encoder(seed=config.seed)
        else:
            image_encoder, processor = load_image_encoder(config.image_encoder)
        torch.manual_seed(config.seed)
        adapter = NestedAdapter.for_unet(
            unet, image_encoder, config.image_encoder, image_processor=processor, **config.adapter_kwargs
        )
        if adapter.mechanism.has_key:
            with torch.no_grad():
                for layer in adapter.layers.values():
                    layer.to_k.weight.mul_(config.key_init_gain)
    return adapter.float().train()


def parameter_groups(adapter: NestedAdapter, config: TrainConfig) -> list[dict]:
    """The optimizer's parameter groups: one at `learning_rate`, or, with `encoder_learning_rate` set, the subject
    encoder (Q-Former and queries) at that rate and the per-layer nested projections at `learning_rate`."""
    if config.encoder_learning_rate is None:
        return [{"params": adapter.trainable_parameters()}]
    encoder = [p for name, p in adapter.encoder.named_parameters() if not name.startswith("image_encoder.")]
    return [{"params": list(adapter.layers.parameters())}, {"params": encoder, "lr": config.encoder_learning_rate}]
