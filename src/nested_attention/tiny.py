"""Tiny, seeded, randomly initialized SD 1.5 / SDXL pipelines and image encoders, built from configs.

For tests and smoke runs: no download, a few seconds on a CPU. Their images are noise-like; they exercise
every code path of the real models (same classes, same pipeline code), not their quality.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers.pre_tokenizers import ByteLevel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
)

from .adapter import NestedAdapter
from .encoder import CLIPImageProcessor

TINY_WORDS = (
    "a an the of in on at with and photo portrait picture drawing painting watercolor pencil pixel art style "
    "person pet dog cat woman man child girl boy beach forest city snow street room garden park mountain "
    "smiling wearing hat glasses red blue green yellow black white sitting standing holding cup"
).split()


def learn_bpe_merges(words) -> list[tuple[str, str]]:
    """Byte-pair merges, learned deterministically, until every word of `words` is a single symbol.

    Each step merges the most frequent adjacent pair (ties broken by the pair itself), the classic BPE
    procedure; applied by rank, the merges rebuild every training word whole. Words are spelled as CLIP
    spells them: characters, the last one carrying the end-of-word suffix.
    """
    spellings = {tuple(w[:-1]) + (w[-1] + "</w>",) for w in set(words) if w}
    merges = []
    while any(len(s) > 1 for s in spellings):
        counts = Counter(pair for s in spellings for pair in zip(s, s[1:]))
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        merged = set()
        for spelling in spellings:
            out, i = [], 0
            while i < len(spelling):
                if i + 1 < len(spelling) and (spelling[i], spelling[i + 1]) == best:
                    out.append(spelling[i] + spelling[i + 1])
                    i += 2
                else:
                    out.append(spelling[i])
                    i += 1
            merged.add(tuple(out))
        spellings = merged
    return merges


def write_clip_tokenizer(directory: str | Path, words=TINY_WORDS, max_length: int = 77) -> CLIPTokenizer:
    """A byte-pair tokenizer in CLIP's file format (vocab.json + merges.txt) in which each of `words` is one token.

    The base vocabulary is CLIP's: every byte as a character, with and without the end-of-word suffix, so any
    text tokenizes; other words split into pieces, as with a real CLIP tokenizer. Deterministic. ``max_length`` is
    the padded prompt length (``model_max_length``; 77 for real CLIP).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    merges = learn_bpe_merges([w.lower() for w in words])
    base = sorted(ByteLevel.alphabet())  # the 256 byte characters of byte-level BPE
    tokens = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=max_length)
    tokenizer.save_pretrained(directory)
    return tokenizer


def _tokenizer(directory: str | Path | None) -> CLIPTokenizer:
    """``write_clip_tokenizer`` into ``directory``, or, without one, through a temporary folder that is removed (the
    tokenizer keeps its vocabulary in memory)."""
    if directory is not None:
        return write_clip_tokenizer(directory)
    with tempfile.TemporaryDirectory(prefix="na-tok-") as scratch:
        return write_clip_tokenizer(scratch)


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
    tokenizer = _tokenizer(tokenizer_dir)
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
    tokenizer = _tokenizer(tokenizer_dir and Path(tokenizer_dir) / "tokenizer")
    tokenizer_2 = _tokenizer(tokenizer_dir and Path(tokenizer_dir) / "tokenizer_2")
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


def random_adapter(unet: torch.nn.Module, seed: int = 0, word: str = "person") -> NestedAdapter:
    """A fresh, UNTRAINED adapter for `unet` with the tiny image encoder: for plumbing checks only."""
    encoder, processor = tiny_image_encoder(seed=seed)
    return NestedAdapter.for_unet(unet, encoder, image_processor=processor, word=word, **TINY_ADAPTER_CONFIG)
