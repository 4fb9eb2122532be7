"""Tiny, seeded, randomly initialized SD 1.5 / SDXL pipelines and image encoders, built from configs.

For tests and smoke runs: no download, a few seconds on a CPU. Their images are noise-like; they exercise
every code path of the real models (same classes, same pipeline code), not their quality.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
)

from .encoder import CLIPImageProcessor

TINY_WORDS = (
    "a an the of in on at with and photo portrait picture drawing painting watercolor pencil pixel art style "
    "person pet dog cat woman man child girl boy beach forest city snow street room garden park mountain "
    "smiling wearing hat glasses red blue green yellow black white sitting standing holding cup"
).split()


def write_clip_tokenizer(directory: str | Path, words=TINY_WORDS, vocab_size: int = 600) -> CLIPTokenizer:
    """Train a byte-pair tokenizer on `words` and save it in CLIP's file format (vocab.json + merges.txt).

    Every word of `words` becomes a single token; other words are split into pieces, as with a real CLIP
    tokenizer.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    specials = ["<|startoftext|>", "<|endoftext|>"]
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    alphabet = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,!'")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, end_of_word_suffix="</w>", initial_alphabet=alphabet,
        show_progress=False,
    )
    bpe.train_from_iterator([" ".join(words)] * 50, trainer=trainer)
    vocab = bpe.get_vocab()
    for char in alphabet:  # CLIP looks up a lone final character with its end-of-word suffix
        vocab.setdefault(char + "</w>", len(vocab))
    merges = json.loads(bpe.to_str())["model"]["merges"]
    (directory / "vocab.json").write_text(json.dumps(dict(sorted(vocab.items(), key=lambda kv: kv[1]))))
    lines = ["#version: 0.2"] + [" ".join(m) if isinstance(m, list) else m for m in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n")
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(directory)
    return tokenizer


def _text_config(tokenizer: CLIPTokenizer, hidden_size: int, projection_dim: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=77, projection_dim=projection_dim,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    )


def _scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


def tiny_sd_pipeline(seed: int = 0, tokenizer_dir: str | Path | None = None) -> StableDiffusionPipeline:
    """A tiny SD 1.5-architecture pipeline (two cross-attention resolutions, 32-wide text context)."""
    tokenizer = write_clip_tokenizer(tokenizer_dir or tempfile.mkdtemp(prefix="na-tok-"))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    )
    vae = _vae()
    text_encoder = CLIPTextModel(_text_config(tokenizer, 32))
    return StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(seed: int = 0, tokenizer_dir: str | Path | None = None) -> StableDiffusionXLPipeline:
    """A tiny SDXL-architecture pipeline (two text encoders, text_time conditioning, linear projections)."""
    root = Path(tokenizer_dir or tempfile.mkdtemp(prefix="na-tok-"))
    tokenizer = write_clip_tokenizer(root / "tokenizer")
    tokenizer_2 = write_clip_tokenizer(root / "tokenizer_2")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 * 8 time ids + 32 pooled text
        cross_attention_dim=64, norm_num_groups=8,
    )
    vae = _vae()
    text_encoder = CLIPTextModel(_text_config(tokenizer, 32))
    text_encoder_2 = CLIPTextModelWithProjection(_text_config(tokenizer_2, 32, projection_dim=32))
    return StableDiffusionXLPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, scheduler=_scheduler(), force_zeros_for_empty_prompt=True,
    )


def tiny_image_encoder(seed: int = 0, image_size: int = 32) -> tuple[CLIPVisionModel, CLIPImageProcessor]:
    """A tiny CLIP vision model (4x4 patches of 8 pixels) and its processor."""
    torch.manual_seed(seed)
    config = CLIPVisionConfig(
        hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=image_size,
        patch_size=8, projection_dim=16,
    )
    processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return CLIPVisionModel(config).eval(), processor


TINY_ADAPTER_CONFIG = dict(
    num_queries=8, qformer_hidden_size=32, qformer_layers=2, qformer_heads=4, qformer_intermediate_size=64
)
