"""Validation grids: fixed subjects x fixed prompts x fixed seeds, generated with the adapter being trained."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nested_attention import NestedAdapter, NestedAttention, NestedAttentionController, Subject
from nested_attention.images import load_image

from .config import TrainConfig
from .models import BaseModel

VALIDATION_NAME = "validation"


@torch.no_grad()
def validation_grid(
    config: TrainConfig, base: BaseModel, adapter: NestedAdapter, controller: NestedAttentionController
) -> Image.Image:
    """One row per (subject, seed): the input image, then one column per prompt. The adapter is left in train mode."""
    na = NestedAttention(base.pipe, controller=controller)
    na.load_adapter(adapter, word=config.word, name=VALIDATION_NAME, follow_pipeline=False)
    base.pipe.set_progress_bar_config(disable=True)
    adapter.eval()
    try:
        rows = []
        for image_path in config.validation_images:
            subject_image = load_image(image_path)
            subject = Subject(subject_image)
            thumbnail = np.asarray(subject_image.resize((config.resolution, config.resolution)))
            for seed in config.validation_seeds:
                row = [thumbnail]  # the input first, then one column per prompt
                for prompt in config.validation_prompts:
                    generator = torch.Generator(device=base.pipe.unet.device).manual_seed(seed)
                    image = na(
                        prompt, {VALIDATION_NAME: subject}, num_inference_steps=config.validation_steps,
                        guidance_scale=config.validation_guidance, generator=generator,
                        height=config.resolution, width=config.resolution,
                    ).images[0]
                    row.append(np.asarray(image))
                rows.append(np.concatenate(row, axis=1))
        return Image.fromarray(np.concatenate(rows, axis=0))
    finally:
        adapter.train()
        na.unload_adapter(VALIDATION_NAME)
        na.detach()  # the trainer's controller stays installed; the pipeline's own methods come back


def save_grid(grid: Image.Image, output_dir: Path, step: int) -> Path:
    path = output_dir / "validation" / f"step-{step:08d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
