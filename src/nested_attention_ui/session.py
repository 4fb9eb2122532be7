"""What the web UI does, without the UI: load a model and its adapters once, check prompts, generate, compare,
explain. Every call takes plain values (paths, strings, numbers) and raises NestedAttentionError with one sentence."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image

from nested_attention.binding import word_positions
from nested_attention.errors import NestedAttentionError
from nested_attention.explain import explain_layer, query_attention_maps
from nested_attention.images import load_image
from nested_attention.pipeline import NestedAttention
from nested_attention.sources import ADAPTER, find, load_pipeline, resolve
from nested_attention.subject import Subject
from nested_attention.tiny import random_adapter
from nested_attention_eval.explain_sheet import draw_sheet, summary

MAX_IMAGES = 8  # per subject
MAX_UPLOAD_BYTES = 20 * 2**20
MAX_STEPS = 100
MAX_COUNT = 8
COMPARE_LAMBDAS = (1.0, 2.0, 3.0, 4.0)
RANDOM = "random"
RANDOM_WORDS = ("person", "pet", "dog", "cat")


@dataclass
class SubjectInput:
    """One subject as the UI holds it: image files, optional weights ("2, 1"), the word, lambda, on or off."""

    images: Sequence[str] = ()
    weights: str = ""
    word: str = ""
    lam: float = 1.0
    enabled: bool = True


@dataclass
class Settings:
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 20
    guidance: float = 5.0
    count: int = 1
    size: dict = field(default_factory=dict)  # height / width, when the model's default is not wanted
    wide: bool = False  # twice as wide as the model's square (a person and a pet side by side, in the toy world)


def parse_weights(text: str, count: int) -> list[float] | None:
    """"2, 1" -> [2.0, 1.0] (one per image), "" -> None; anything else is refused."""
    if not text.strip():
        return None
    try:
        weights = [float(part) for part in text.replace(";", ",").split(",") if part.strip()]
    except ValueError:
        raise NestedAttentionError(f"Image weights {text!r} must be numbers separated by commas, e.g. '2, 1'.") from None
    if len(weights) != count:
        raise NestedAttentionError(f"{len(weights)} image weights were given for {count} images; give one per image.")
    return weights


def check_upload(path: str) -> str:
    """An uploaded file within the size bound (the image itself is checked by load_image)."""
    size = Path(path).stat().st_size if Path(path).is_file() else None
    if size is None:
        raise NestedAttentionError(f"The upload {Path(path).name} is missing; upload it again.")
    if size > MAX_UPLOAD_BYTES:
        raise NestedAttentionError(
            f"The upload {Path(path).name} is {size / 2**20:.1f} MB; images up to {MAX_UPLOAD_BYTES // 2**20} MB are "
            f"accepted."
        )
    return path


class UISession:
    """One base pipeline with nested attention and its adapters, shared by every request (one at a time)."""

    def __init__(self, model: str, adapters: Sequence[str], device: str = "cpu", dtype: torch.dtype = torch.float32):
        """`model`: a pipeline folder, hub id or registered name; `adapters`: adapter folders, hub ids, registered
        names (toy-person), or RANDOM (an untrained adapter, bound to "person", then "pet", ...: for trying the plumbing)."""
        self.pipe = load_pipeline(model, dtype=dtype, device=device)
        self.pipe.set_progress_bar_config(disable=True)
        self.device = device
        self.na = NestedAttention(self.pipe)
        self.names = []
        for i, source in enumerate(adapters):
            if source == RANDOM:
                adapter = random_adapter(self.pipe.unet, seed=i, word=RANDOM_WORDS[i % len(RANDOM_WORDS)])
            else:
                adapter = resolve(ADAPTER, source) if find(ADAPTER, source) is not None else source
            self.names.append(self.na.load_adapter(adapter, name=None if source != RANDOM else f"random-{i}"))
        self.trained_words = {name: self.na.adapters[name].word for name in self.names}

    # ---- checks ----------------------------------------------------------------------------------------------

    def check_prompt(self, prompt: str, inputs: Sequence[SubjectInput]) -> str:
        """"" when `prompt` binds every enabled subject, else the sentence saying why not (as the CLI says it)."""
        if not prompt or not prompt.strip():
            return "Type a prompt with the subject word, e.g. 'a photo of a person at the beach'."
        try:
            for name, given in self._enabled(inputs):
                word_positions(self.na.tokenizers, prompt, self._word(name, given))
        except NestedAttentionError as error:
            return str(error)
        return ""

    def _enabled(self, inputs: Sequence[SubjectInput]) -> list[tuple[str, SubjectInput]]:
        if len(inputs) != len(self.names):
            raise NestedAttentionError(f"Expected {len(self.names)} subjects (one per adapter), got {len(inputs)}.")
        return [(name, given) for name, given in zip(self.names, inputs) if given.enabled]

    def _word(self, name: str, given: SubjectInput) -> str:
        return given.word.strip() or self.trained_words[name]

    # ---- subjects --------------------------------------------------------------------------------------------

    def subjects(self, inputs: Sequence[SubjectInput]) -> dict[str, Subject]:
        """The enabled subjects, each adapter bound to its word (semantic variation when it differs)."""
        chosen = self._enabled(inputs)
        for name, given in chosen:
            if not given.images:
                raise NestedAttentionError(f"Subject '{self._word(name, given)}' has no image; upload one or pick an example.")
            if len(given.images) > MAX_IMAGES:
                raise NestedAttentionError(f"Subject '{self._word(name, given)}' has {len(given.images)} images; use at "
                                           f"most {MAX_IMAGES}.")
            if not (isinstance(given.lam, (int, float)) and math.isfinite(given.lam) and 1 <= given.lam <= 10):
                raise NestedAttentionError(f"lambda is {given.lam}; choose a value from 1 to 10.")
        self.na.set_words({name: self._word(name, given) if given.enabled else self.trained_words[name]
                           for name, given in zip(self.names, inputs)})
        return {
            name: Subject([load_image(check_upload(path)) for path in given.images],
                          weights=parse_weights(given.weights, len(given.images)), lam=float(given.lam))
            for name, given in chosen
        }

    # ---- generation ------------------------------------------------------------------------------------------

    def _call(self, prompt: str, subjects: dict, settings: Settings, count: int, seed: int,
              progress: Callable[[float], None] | None):
        if not 1 <= settings.steps <= MAX_STEPS:
            raise NestedAttentionError(f"steps is {settings.steps}; choose 1 to {MAX_STEPS}.")

        def step_end(pipe, step, timestep, kwargs):
            if progress is not None:
                progress((step + 1) / settings.steps)
            return kwargs

        return self.na(
            prompt, subjects, num_images_per_prompt=count, negative_prompt=settings.negative_prompt or None,
            num_inference_steps=settings.steps, guidance_scale=settings.guidance,
            generator=[torch.Generator(self.device).manual_seed(seed + i) for i in range(count)],
            callback_on_step_end=step_end, **self._size(settings),
        ).images

    def _size(self, settings: Settings) -> dict:
        if not settings.wide:
            return settings.size
        side = settings.size.get("height") or self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        return {"width": 2 * side, "height": side}

    def generate(self, prompt: str, inputs: Sequence[SubjectInput], settings: Settings,
                 progress: Callable[[float], None] | None = None) -> list[Image.Image]:
        """`settings.count` images, image i with seed `settings.seed` + i (as the CLI's generate)."""
        self._check(prompt, inputs)
        if not 1 <= settings.count <= MAX_COUNT:
            raise NestedAttentionError(f"Number of images is {settings.count}; choose 1 to {MAX_COUNT}.")
        return self._call(prompt, self.subjects(inputs), settings, settings.count, settings.seed, progress)

    def compare(self, prompt: str, inputs: Sequence[SubjectInput], settings: Settings,
                progress: Callable[[float], None] | None = None) -> list[tuple[Image.Image, str]]:
        """The base model without adapters, then every subject at each lambda of COMPARE_LAMBDAS, one seed."""
        self._check(prompt, inputs)
        encoded = {name: self.na.encode_subject(name, s) for name, s in self.subjects(inputs).items()}  # once
        runs = [("base model (no adapter)", {})] + [
            (f"lambda {lam:g}", {name: replace(e, lam=lam) for name, e in encoded.items()}) for lam in COMPARE_LAMBDAS
        ]
        results = []
        for i, (caption, chosen) in enumerate(runs):
            part = None if progress is None else (lambda f, i=i: progress((i + f) / len(runs)))
            results.append((self._call(prompt, chosen, settings, 1, settings.seed, part)[0], caption))
        return results

    def explain(self, prompt: str, inputs: Sequence[SubjectInput], settings: Settings) -> tuple[Image.Image, dict]:
        """The explain sheet (paper Figs. 4-6) for the first enabled subject, and its numbers."""
        self._check(prompt, inputs)
        subjects = self.subjects(inputs)
        if not subjects:
            raise NestedAttentionError("Enable a subject to explain.")
        name, subject = next(iter(subjects.items()))
        image, explanation = explain_layer(
            self.na, name, subject, prompt, num_inference_steps=settings.steps, guidance_scale=settings.guidance,
            generator=torch.Generator(self.device).manual_seed(settings.seed), **self._size(settings),
        )
        maps = [query_attention_maps(self.na.adapters[name].adapter, view) for view in subject.images]
        cell = divmod(int(explanation.share.argmax()), explanation.grid[1])
        return draw_sheet(subject.images, image, explanation, maps, cell, prompt), summary(explanation, maps, cell)

    def _check(self, prompt: str, inputs: Sequence[SubjectInput]) -> None:
        message = self.check_prompt(prompt, inputs)
        if message:
            raise NestedAttentionError(message)
