"""Shared command-line value types (each rejects a bad value with one sentence saying what it expected) and the
--device / --dtype resolution."""

from __future__ import annotations

import argparse
import math
import sys

import torch

from nested_attention.errors import NestedAttentionError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MAX_STEPS = 1000  # the training timesteps of SD 1.5 and SDXL schedulers: more steps cannot be taken
SEEDS = 2**64  # torch.Generator seeds are 64-bit


def int_in(low: int, high: int, what: str):
    """An argparse type: an integer from `low` to `high`, described as `what` in its error."""

    def parse(text: str) -> int:
        value = int(text) if text.strip().lstrip("+-").isdigit() else None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    return parse


positive_int = int_in(1, sys.maxsize, "a positive integer")
step_count = int_in(1, MAX_STEPS, f"an integer from 1 to {MAX_STEPS}")
seed_value = int_in(0, SEEDS - 1, "an integer from 0 to 2**64 - 1")


def finite_float(low: float, what: str, above: bool = False):
    """An argparse type: a finite number of at least `low` (above `low` with `above`), described as `what`."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and (value > low if above else value >= low)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    return parse


guidance_scale = finite_float(0, "a finite number of at least 0 (e.g. 7.5)")


def subject_word(text: str) -> str:
    """argparse type: a non-empty word."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a word such as person, got an empty string")
    return text.strip()


def image_side(text: str) -> int:
    """argparse type: an image side in pixels, a multiple of 8 as diffusers' pipelines require."""
    value = int(text) if text.strip().lstrip("+-").isdigit() else 0
    if value < 8 or value % 8:
        raise argparse.ArgumentTypeError(f"expected a positive multiple of 8 pixels, got {text}")
    return value


def resolve_device(name: str) -> str:
    """`auto` -> cuda, else mps, else cpu; an explicit accelerator must be available."""
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name == "auto":
        return next(device for device in ("cuda", "mps", "cpu") if available[device])
    if not available[name]:
        raise NestedAttentionError(
            f"--device {name} was asked for but this PyTorch build sees no {name} device; "
            f"use --device cpu or --device auto."
        )
    return name


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """`auto` -> float32 on cpu, bfloat16 (or float16 without bf16 support) on cuda, float16 on mps."""
    if name != "auto":
        return DTYPES[name]
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if device == "mps" else torch.float32
