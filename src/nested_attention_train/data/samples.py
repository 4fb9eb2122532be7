"""Records -> training sample dicts (:class:`SampleBuilder`, :class:`TripletDataset`, :func:`collate`). Each sample
depends on (seed, epoch, index or key) and nothing else, so a resumed run sees the same data."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from nested_attention.binding import prompt_ids, word_positions
from nested_attention.errors import NestedAttentionError
from nested_attention.images import decode_image

from .records import DataError, Record

logger = logging.getLogger(__name__)


def sample_rng(seed: int, epoch: int, ident: int | str) -> random.Random:
    """The generator of one sample's random choices: the same (seed, epoch, index or key) always draws the same."""
    return random.Random(f"{seed}/{epoch}/{ident}")


class SampleBuilder:
    """Turns a Record into a training sample dict (see TripletDataset); shared by both data sources."""

    def __init__(
        self,
        tokenizers: Sequence,
        image_processor,
        resolution: int,
        crop: str = "center",
        drop_text_rate: float = 0.0,
        drop_image_rate: float = 0.0,
        drop_both_rate: float = 0.0,
        max_subject_images: int = 4,
    ):
        if crop not in ("center", "random"):
            raise NestedAttentionError(f'crop must be "center" or "random", got {crop!r}.')
        rates = (drop_text_rate, drop_image_rate, drop_both_rate)
        if any(not 0.0 <= rate <= 1.0 for rate in rates) or sum(rates) > 1.0:
            raise NestedAttentionError(
                f"The dropout rates (text {drop_text_rate}, image {drop_image_rate}, both {drop_both_rate}) must each "
                f"lie in [0, 1] and sum to at most 1 (e.g. 0.1 each)."
            )
        if not tokenizers:
            raise NestedAttentionError("SampleBuilder needs the pipeline's tokenizer(s): one for SD 1.5, two for SDXL.")
        self.tokenizers = list(tokenizers)
        self.image_processor = image_processor
        self.resolution = resolution
        self.crop = crop
        self.drop_rates = rates
        self.max_subject_images = max_subject_images

    def check(self, record: Record) -> None:
        """What can be checked without the images: their count, and the word as the tokenizers see the prompt."""
        if len(record.subject_images) > self.max_subject_images:
            raise DataError(
                f"the record has {len(record.subject_images)} subject images; at most {self.max_subject_images} "
                f"are used (max_subject_images). Remove some or raise the limit."
            )
        word_positions(self.tokenizers, record.prompt, record.word)  # the exact check, before any dropout

    def build(self, record: Record, rng: random.Random, load: Callable[[str, str], Image.Image]) -> dict:
        """The sample of `record`; `load(reference, name)` opens its images. Raises NestedAttentionError if bad."""
        self.check(record)
        dropped = self._draw_dropout(rng)
        prompt = {"text": record.word, "both": ""}.get(dropped, record.prompt)
        target = load(record.target_image, "Target image")
        target_pixels, original_size, crop_top_left = self._target(target, rng)
        subjects = [load(reference, "Subject image") for reference in record.subject_images]
        extra = {}
        if record.target_mask is not None:
            extra["target_mask"] = self._mask(load(record.target_mask, "Target mask"), target.size, crop_top_left)
        return extra | {
            "target_pixels": target_pixels,
            "subject_pixels": self.image_processor(images=subjects, return_tensors="pt").pixel_values,
            "input_ids": [torch.tensor(prompt_ids(t, prompt), dtype=torch.long) for t in self.tokenizers],
            "token_mask": self._token_mask(prompt, record.word, bind=dropped in ("none", "text")),
            "original_size": torch.tensor(original_size, dtype=torch.long),
            "crop_top_left": torch.tensor(crop_top_left, dtype=torch.long),
            "target_size": torch.tensor((self.resolution, self.resolution), dtype=torch.long),
            "dropped": dropped,
            "source": record.source,
        }

    def _draw_dropout(self, rng: random.Random) -> str:
        """One of "none", "text", "image", "both", with the configured rates."""
        draw = rng.random()
        text_rate, image_rate, both_rate = self.drop_rates
        if draw < both_rate:
            return "both"
        if draw < both_rate + image_rate:
            return "image"
        if draw < both_rate + image_rate + text_rate:
            return "text"
        return "none"

    def _token_mask(self, prompt: str, word: str, bind: bool) -> torch.Tensor:
        """(T,) bool: the word's token positions in the prompt, or all False when the image is dropped."""
        mask = torch.zeros(self.tokenizers[0].model_max_length, dtype=torch.bool)
        if bind:
            mask[word_positions(self.tokenizers, prompt, word)] = True
        return mask

    def _target(self, image: Image.Image, rng: random.Random) -> tuple[torch.Tensor, tuple, tuple]:
        """Resize the short side to the resolution and crop a square (coordinates as diffusers' SDXL script has them).

        Returns the (3, R, R) pixels in [-1, 1], the (h, w) as loaded, and the crop's (top, left) in the resized
        image. The crop is resampled straight from the original (one resize of the cropped box), so a very
        elongated image never becomes a huge intermediate.
        """
        size = self.resolution
        width, height = image.size
        resized_w, resized_h = self._resized(image.size)
        if self.crop == "random":
            top, left = rng.randint(0, resized_h - size), rng.randint(0, resized_w - size)
        else:
            top, left = (resized_h - size) // 2, (resized_w - size) // 2
        cropped = image.resize((size, size), Image.Resampling.LANCZOS, box=self._box(image.size, (top, left)))
        pixels = torch.from_numpy(np.asarray(cropped, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        return pixels.contiguous(), (height, width), (top, left)

    def _resized(self, size: tuple[int, int]) -> tuple[int, int]:
        """(w, h) of an image of `size` with its short side resized to the resolution."""
        width, height = size
        if width <= height:
            return self.resolution, int(self.resolution * height / width)
        return int(self.resolution * width / height), self.resolution

    def _box(self, size: tuple[int, int], crop_top_left: tuple[int, int]) -> tuple[float, float, float, float]:
        """The crop at `crop_top_left` of the resized image, in the original image's coordinates."""
        (width, height), (resized_w, resized_h) = size, self._resized(size)
        (top, left), side = crop_top_left, self.resolution
        scale_x, scale_y = width / resized_w, height / resized_h
        return left * scale_x, top * scale_y, (left + side) * scale_x, (top + side) * scale_y

    def _mask(self, mask: Image.Image, target_size: tuple[int, int], crop_top_left: tuple[int, int]) -> torch.Tensor:
        """The target's subject mask, cropped and resized as the target was: (1, R, R) in [0, 1] (white = subject)."""
        if mask.size != target_size:
            raise NestedAttentionError(
                f"the target mask is {mask.size[0]}x{mask.size[1]} but its target image is "
                f"{target_size[0]}x{target_size[1]}; give a mask of the target's size."
            )
        size = self.resolution
        cropped = mask.convert("L").resize((size, size), Image.Resampling.BILINEAR, box=self._box(target_size, crop_top_left))
        return torch.from_numpy(np.asarray(cropped, dtype=np.float32) / 255.0)[None].contiguous()

    def build_orskip_sample(
        self, record: Record, rng: random.Random, load: Callable[[str, str], Image.Image], skip_bad: bool
    ) -> dict | None:
        """build(), with any problem raised as a DataError naming the record's source, or (skip_bad) logged -> None."""
        try:
            return self.build(record, rng, load)
        except NestedAttentionError as error:
            return skip_sample(f"{record.source}: {error}", skip_bad)


def skip_sample(message: str, skip_bad: bool) -> None:
    """Raise a bad sample's message as a DataError, or (skip_bad) log it; returns None, the skipped sample."""
    if not skip_bad:
        raise DataError(message) from None
    logger.warning("Skipping bad training data: %s", message)


class TripletDataset(torch.utils.data.Dataset):
    """Map-style dataset of Records (from read_metadata) -> sample dicts, or None for a skipped bad sample.

    A sample has ``target_pixels`` (3, R, R) in [-1, 1]; ``subject_pixels`` (n, 3, S, S) from the image
    processor; ``input_ids`` (one (T,) LongTensor per tokenizer, padded as diffusers pipelines do);
    ``token_mask`` (T,) bool at the subject word (all False when the image is dropped); SDXL's
    ``original_size``, ``crop_top_left`` and ``target_size`` as (2,) LongTensors; ``dropped`` in
    {"none", "text", "image", "both"}; ``source`` ("metadata.jsonl:LINE"); ``target_mask`` (1, R, R) in [0, 1]
    when the record has one.

    Condition dropout: "text" replaces the prompt by the word alone (the image-only condition), "image" keeps the
    prompt but leaves the word unbound (vanilla attention), "both" gives an empty prompt and no binding. The
    draw and the random crop come from sample_rng(seed, epoch, index). Call set_epoch before each epoch (the
    DataLoader's workers see it when they start, so use persistent_workers=False).
    """

    def __init__(
        self,
        records: Sequence[Record],
        tokenizers: Sequence,
        image_processor,
        resolution: int,
        crop: str = "center",
        drop_text_rate: float = 0.0,
        drop_image_rate: float = 0.0,
        drop_both_rate: float = 0.0,
        seed: int = 0,
        skip_bad: bool = False,
        max_subject_images: int = 4,
    ):
        self.records = list(records)
        self.builder = SampleBuilder(
            tokenizers, image_processor, resolution, crop, drop_text_rate, drop_image_rate, drop_both_rate,
            max_subject_images,
        )
        self.seed = seed
        self.skip_bad = skip_bad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose dropout and crops __getitem__ draws."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict | None:
        record = self.records[index]
        rng = sample_rng(self.seed, self.epoch, index)
        return self.builder.build_orskip_sample(record, rng, _load_file, self.skip_bad)


def _load_file(path: str, role: str) -> Image.Image:
    """Open a record's image file; `role` is "Target image", "Target mask" or "Subject image"."""
    return decode_image(path, f"{role} {path}")


def collate(samples: list[dict | None]) -> dict | None:
    """Batch sample dicts; None (skipped) samples are dropped and counted. Returns None if none remain.

    Subject images are padded with zeros to the batch's largest count: ``subject_pixels`` (B, n_max, 3, S, S)
    and ``subject_image_mask`` (B, n_max), True for real images. ``input_ids`` is a list with one (B, T) tensor
    per tokenizer; ``num_skipped`` the number of None samples; ``sources`` and ``dropped`` lists of strings.
    """
    kept = [sample for sample in samples if sample is not None]
    if not kept:
        return None
    n_max = max(sample["subject_pixels"].shape[0] for sample in kept)
    subject_pixels, subject_mask = [], torch.zeros(len(kept), n_max, dtype=torch.bool)
    for row, sample in enumerate(kept):
        pixels = sample["subject_pixels"]
        padding = pixels.new_zeros((n_max - pixels.shape[0], *pixels.shape[1:]))
        subject_pixels.append(torch.cat([pixels, padding]))
        subject_mask[row, : pixels.shape[0]] = True
    return {
        "target_pixels": torch.stack([sample["target_pixels"] for sample in kept]),
        "subject_pixels": torch.stack(subject_pixels),
        "subject_image_mask": subject_mask,
        "input_ids": [torch.stack(ids) for ids in zip(*(sample["input_ids"] for sample in kept))],
        "token_mask": torch.stack([sample["token_mask"] for sample in kept]),
        "original_size": torch.stack([sample["original_size"] for sample in kept]),
        "crop_top_left": torch.stack([sample["crop_top_left"] for sample in kept]),
        "target_size": torch.stack([sample["target_size"] for sample in kept]),
        "dropped": [sample["dropped"] for sample in kept],
        "sources": [sample["source"] for sample in kept],
        "num_skipped": len(samples) - len(kept),
    } | _target_masks(kept)


def _target_masks(kept: list[dict]) -> dict:
    """``target_mask`` (B, 1, R, R) when any sample has one; zero (no subject region) for those without."""
    masks = [sample.get("target_mask") for sample in kept]
    present = [m for m in masks if m is not None]
    if not present:
        return {}
    return {"target_mask": torch.stack([present[0].new_zeros(present[0].shape) if m is None else m for m in masks])}


