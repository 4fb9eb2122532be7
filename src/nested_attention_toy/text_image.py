"""The toy world's CLIP: a tiny transformers `CLIPModel` trained contrastively from scratch on (render, caption)
pairs. Its text tower conditions the UNet, its vision tower is the adapter's frozen image backbone, and the whole
model scores text-image similarity (CLIP-T) and classifies context factors zero-shot."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from nested_attention.encoder import CLIPImageProcessor

from .loop import LossLog, warmup_cosine
from .metric_models import bf16_autocast_supported
from .world import CONTEXT_FACTORS, DOMAINS, FACTOR_NAMES, Context, generic_caption

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_config(tokenizer: CLIPTokenizer, image_size: int = 64, width: int = 128, layers: int = 4) -> CLIPConfig:
    """A CLIP with ``layers`` transformer layers of ``width`` in each tower; 8-pixel patches."""
    text = dict(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
        num_attention_heads=width // 32, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        projection_dim=width,
    )
    vision = dict(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
                  num_attention_heads=width // 32, image_size=image_size, patch_size=8, projection_dim=width)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=width)


def clip_processor(image_size: int = 64) -> CLIPImageProcessor:
    """The image processor that goes with the toy CLIP (resize + centre crop to ``image_size``, CLIP's statistics)."""
    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                              image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))


def pixel_values(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) uint8 at the model's size -> normalized float pixels, exactly what ``clip_processor`` gives."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean.to(images.device)) / std.to(images.device)


def tokenize(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def train_clip(model: CLIPModel, tokenizer: CLIPTokenizer, images: torch.Tensor, captions: list[str], steps: int,
               batch_size: int = 256, lr: float = 1e-3, seed: int = 0, device: str = "cpu", progress=None) -> list[float]:
    """Symmetric InfoNCE (CLIPModel's own loss) with AdamW, warmup and cosine decay. Returns the loss every 50 steps."""
    device = torch.device(device)
    model.to(device).train()
    amp = bf16_autocast_supported(device)
    ids = tokenize(tokenizer, captions)
    generator = torch.Generator().manual_seed(seed)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                  lr=lr, betas=(0.9, 0.98), eps=1e-6)
    warmup = max(1, steps // 20)
    schedule = warmup_cosine(optimizer, steps, warmup)
    log = LossLog(steps)
    order, cursor = torch.randperm(len(images), generator=generator), 0
    for step in range(steps):
        if cursor + batch_size > len(images):
            order, cursor = torch.randperm(len(images), generator=generator), 0
        index = order[cursor : cursor + batch_size]
        cursor += batch_size
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(input_ids=ids[index].to(device), pixel_values=pixel_values(images[index].to(device)), return_loss=True)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        log.add(step, out.loss)
        if progress is not None:
            progress.update(1)
    model.to("cpu").eval()
    return log.means


@torch.no_grad()
def image_embeddings(model: CLIPModel, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, 3, S, S) uint8 -> (N, D) unit-norm image embeddings."""
    out = [model.get_image_features(pixel_values=pixel_values(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    return F.normalize(torch.cat([_features(o) for o in out]).float(), dim=-1)


@torch.no_grad()
def text_embeddings(model: CLIPModel, tokenizer: CLIPTokenizer, captions: list[str], batch_size: int = 256) -> torch.Tensor:
    """Captions -> (N, D) unit-norm text embeddings."""
    out = [model.get_text_features(input_ids=tokenize(tokenizer, captions[i : i + batch_size])) for i in range(0, len(captions), batch_size)]
    return F.normalize(torch.cat([_features(o) for o in out]).float(), dim=-1)


def _features(output) -> torch.Tensor:
    # transformers 5 returns a model output from get_*_features; 4.x returned the tensor
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@torch.no_grad()
def clip_similarity(model: CLIPModel, tokenizer: CLIPTokenizer, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """CLIP-T: the cosine similarity of each image with its caption, (N,)."""
    return (image_embeddings(model, images) * text_embeddings(model, tokenizer, captions)).sum(-1)


@torch.no_grad()
def zero_shot_accuracy(model: CLIPModel, tokenizer: CLIPTokenizer, images: torch.Tensor, factors: torch.Tensor,
                       domains: torch.Tensor, prompts_per_class: int = 32, seed: int = 0) -> dict[str, float]:
    """Per context factor: classify each image by its nearest class embedding, the mean text embedding of
    ``prompts_per_class`` random captions having that factor value (CLIP's prompt ensembling; the other factors
    random). ``factors`` (N, 5) value indices; ``domains`` (N,) 0 person / 1 pet picks the caption's subject word."""
    rng = np.random.default_rng(seed)
    image = image_embeddings(model, images)
    result = {}
    for f, factor in enumerate(FACTOR_NAMES):
        predictions = torch.empty(len(images), dtype=torch.long)
        for d, domain in enumerate(DOMAINS):
            rows = (domains == d).nonzero().flatten()
            if len(rows) == 0:
                continue
            classes = []
            for value in range(len(CONTEXT_FACTORS[factor])):
                captions = []
                for _ in range(prompts_per_class):
                    values = [int(rng.integers(len(v))) for v in CONTEXT_FACTORS.values()]
                    values[f] = value
                    captions.append(generic_caption(domain, Context(tuple(values)), rng))
                classes.append(F.normalize(text_embeddings(model, tokenizer, captions).mean(0), dim=-1))
            predictions[rows] = (image[rows] @ torch.stack(classes).T).argmax(-1)
        result[factor] = float((predictions == factors[:, f]).float().mean())
    return result
