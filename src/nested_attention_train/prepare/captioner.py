"""Captions from a local captioning model (``--caption-model DIR``) for the photos that have none.

Any image-to-text model that transformers' ``AutoModelForImageTextToText`` and ``AutoProcessor`` load from a local
folder with safetensors weights, such as a BLIP captioning model saved with ``save_pretrained``. Nothing is
downloaded and pickled weights (``.bin``) are refused. The model runs in the main process, a batch at a time,
greedily (the same photo always gets the same caption); each caption is appended to ``generated-captions.jsonl``
in the output folder as soon as it is made, so a resumed run reuses it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from nested_attention.errors import NestedAttentionError
from nested_attention.images import decode_image

GENERATED_NAME = "generated-captions.jsonl"
MAX_NEW_TOKENS = 40


class Captioner:
    """Captions PIL images with the model in `folder`; `prompt` is a text the captions continue (BLIP: "a photo of")."""

    def __init__(self, folder: str | Path, prompt: str | None = None, device: str | None = None):
        folder = Path(folder)  # checked to hold safetensors weights by PrepareSettings
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
            self.model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True,
                                                                     use_safetensors=True)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise NestedAttentionError(
                f"transformers could not load {folder} as an image-to-text model ({error.__class__.__name__}: "
                f"{str(error).splitlines()[0][:200]}); give a captioning model such as a BLIP one."
            ) from None
        self.folder = folder
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self.prompt = prompt

    @torch.no_grad()
    def __call__(self, images: list) -> list[str]:
        """One caption per image, generated greedily."""
        text = [self.prompt] * len(images) if self.prompt else None
        try:
            inputs = self.processor(images=images, text=text, return_tensors="pt").to(self.device)
            ids = self.model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        except (ValueError, TypeError) as error:  # a model that needs another kind of input (a chat template, ...)
            raise NestedAttentionError(
                f"The caption model {self.folder} could not caption a photo ({error.__class__.__name__}: "
                f"{str(error).splitlines()[0][:200]}); give a plain image-to-text model such as BLIP, or a "
                f"--caption-prompt if it needs one."
            ) from None
        return [caption.strip() for caption in self.processor.batch_decode(ids, skip_special_tokens=True)]


def generate_captions(captioner: Captioner, source: Path, photos: list[str], cache: Path,
                      batch_size: int = 8) -> Iterator[tuple[str, str | None, str | None]]:
    """(photo, caption, None) for each photo, each caption appended to `cache` as it comes; (photo, None, the
    sentence saying why) for a photo that cannot be read."""
    with cache.open("a", encoding="utf-8") as sink:
        for start in range(0, len(photos), batch_size):
            batch, images = [], []
            for relative in photos[start:start + batch_size]:
                try:
                    images.append(decode_image(source / relative, f"the photo {relative}"))
                    batch.append(relative)
                except NestedAttentionError as error:
                    yield relative, None, str(error)
            for relative, caption in zip(batch, captioner(images) if images else []):
                sink.write(json.dumps({"file_name": relative, "caption": caption}) + "\n")
                sink.flush()
                yield relative, caption, None


def read_generated(cache: Path) -> dict[str, str]:
    """The captions a captioning model made in earlier runs (a line cut by an interruption is ignored)."""
    generated: dict[str, str] = {}
    if cache.is_file():
        for line in cache.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
                generated[entry["file_name"]] = entry["caption"]
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return generated
