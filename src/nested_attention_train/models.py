"""Loading what training needs: the frozen base model parts, the frozen CLIP, and the adapter to train."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler, DiffusionPipeline

from nested_attention import NestedAdapter
from nested_attention.adapter import load_image_encoder
from nested_attention.errors import NestedAttentionError
from nested_attention.layers import cross_attention_layers
from nested_attention.tiny import tiny_image_encoder, tiny_sd_pipeline, tiny_sdxl_pipeline

from .config import TrainConfig

TINY_PIPELINES = {"tiny-sd": tiny_sd_pipeline, "tiny-sdxl": tiny_sdxl_pipeline}
TINY_IMAGE_ENCODER = "tiny"
TOY = "toy"  # the shipped toy world stack: its pipeline, and its CLIP's vision tower as image encoder
# image encoders that are names, not paths: an adapter trained on one carries it in image_encoder/
NAMED_IMAGE_ENCODERS = (TINY_IMAGE_ENCODER, TOY)


def resolve_model(name: str) -> str:
    """``toy`` -> the shipped toy pipeline folder; anything else unchanged."""
    if name != TOY:
        return name
    from nested_attention_toy.assets import is_shipped, model_path

    if not is_shipped():
        raise NestedAttentionError("pretrained_model: toy is missing from this installation; reinstall the package, "
                                   "or rebuild it with nested-attention toy build --out DIR and give DIR/pipeline.")
    return str(model_path(TOY))


def resolve_image_encoder(name: str) -> str:
    """``toy`` -> the shipped toy CLIP folder (its vision tower and image processor); anything else unchanged."""
    if name != TOY:
        return name
    from nested_attention_toy.assets import shipped_path

    return str(shipped_path("clip"))


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
    name = resolve_model(config.pretrained_model)
    if name in TINY_PIPELINES:
        pipe = TINY_PIPELINES[name](seed=0, tokenizer_dir=tempfile.mkdtemp(prefix="na-train-tok-"))
    else:
        try:
            index = DiffusionPipeline.load_config(name)
            extra = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
            pipe = DiffusionPipeline.from_pretrained(name, **extra)
        except (OSError, ValueError) as error:
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise NestedAttentionError(
                f"Could not load the base model {name!r} ({first}). Give a diffusers pipeline folder or hub id."
            ) from None
    for part in ("unet", "vae", "text_encoder"):
        if getattr(pipe, part, None) is None:
            raise NestedAttentionError(f"The base model {name!r} has no {part}; training needs an SD 1.5 or SDXL pipeline.")
    for module in (pipe.unet, pipe.vae, *[e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e]):
        module.requires_grad_(False).eval()
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    return BaseModel(pipe=pipe, noise_scheduler=noise_scheduler)


def load_adapter(config: TrainConfig, unet: torch.nn.Module) -> NestedAdapter:
    """The adapter to train: from `init_adapter` (phase 2), else fresh for this UNet; fp32, train mode.

    An exported adapter of a `tiny` or `toy` run carries its image encoder in `image_encoder/`; otherwise the CLIP
    model comes from `config.image_encoder`.
    """
    tiny = config.image_encoder == TINY_IMAGE_ENCODER
    named = config.image_encoder in NAMED_IMAGE_ENCODERS
    if config.init_adapter:
        adapter = NestedAdapter.from_pretrained(config.init_adapter, image_encoder=None if named else config.image_encoder)
        adapter.check_compatible(cross_attention_layers(unet))
    else:
        if tiny:
            image_encoder, processor = tiny_image_encoder(seed=config.seed)
        else:
            image_encoder, processor = load_image_encoder(resolve_image_encoder(config.image_encoder))
        torch.manual_seed(config.seed)
        adapter = NestedAdapter.for_unet(
            unet, image_encoder, config.image_encoder, image_processor=processor, **config.adapter_kwargs
        )
    return adapter.float().train()
