"""The toy world's scores, against ground truth: identity with the shipped identity networks, prompt following
with the prompt-factor classifier (each factor the prompt names, read back from its words)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nested_attention.errors import NestedAttentionError
from nested_attention_toy.assets import build_part, shipped_path
from nested_attention_toy.metric_models import FactorClassifier, IdentityNet
from nested_attention_toy.world import (
    COLOUR_COUNTERPARTS,
    CONTEXT_FACTORS,
    DOMAINS,
    SUBJECT_WORDS,
    Identity,
    attribute_names,
    attribute_values,
    colour_of,
    prompt_factors,
)

from .scorers import ClipTextScorer, IdentityEmbedder, PromptScorer, prompt_scorer


def domain_of(word: str | None) -> str:
    """The toy domain of a subject word ("woman" -> "person", "puppy" -> "pet")."""
    for domain, words in SUBJECT_WORDS.items():
        if word in words:
            return domain
    raise NestedAttentionError(
        f"--identity toy needs a toy subject word to pick the person or pet network, got {word!r}; "
        f"use --identity toy-person or toy-pet."
    )


def to_uint8(images: list[Image.Image], size: int) -> torch.Tensor:
    """PIL images -> (N, 3, size, size) uint8, resized if they are not ``size`` pixels already."""
    arrays = [np.asarray(i.convert("RGB").resize((size, size), Image.BICUBIC) if i.size != (size, size) else i.convert("RGB"))
              for i in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def metrics_folder(metrics: str | Path | None = None) -> Path:
    """A toy build's metric-model folder: ``metrics`` itself, or by default the shipped build's."""
    return shipped_path("metrics") if metrics is None else Path(metrics)


def metrics_beside(pipeline: Path) -> Path | None:
    """The metric models of the build that ``pipeline`` (a build's ``pipeline/`` folder) belongs to, if it has them."""
    folder = Path(pipeline).parent / "metrics"
    return folder if (folder / "metric_models.json").is_file() else None


def load_build_pipeline(model: str | Path):
    """A toy pipeline given as a build's root or its pipeline/ folder (one sentence otherwise), in fp32 with its
    progress bar off, and the build's own metric models (None: use the shipped ones)."""
    from diffusers import StableDiffusionPipeline

    folder = build_part(model, "pipeline", "model_index.json")
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe, metrics_beside(folder)


def load_toy_scoring(model: str | Path | None = None):
    """What scores a toy build's generations: (its pipeline, its metric-model folder, the prompt-factor classifier,
    the CLIP score `clip_t` with its own CLIP). ``model``: a build's root or pipeline/ folder (default: the shipped
    build)."""
    pipe, metrics = load_build_pipeline(model or shipped_path())
    metrics = metrics or metrics_folder()
    clip = build_part(model or shipped_path(), "pipeline", "model_index.json").parent / "clip"
    scorer = ClipTextScorer(str(clip)) if (clip / "config.json").is_file() else prompt_scorer("toy-clip")
    return pipe, metrics, FactorClassifier.from_pretrained(metrics / "factor_classifier"), scorer


def colour_leaks(subjects: dict[str, Identity], read: dict[str, dict[str, int]]) -> tuple[int, int]:
    """(chances, leaks) of one person + pet image. For each pair of `COLOUR_COUNTERPARTS` (hair and fur, shirt and
    neckwear), in each direction, the source subject's colour is a *chance* to leak when the other subject's attribute
    can take that colour but truly has another; a *leak* is that attribute read in the image (``read``: domain ->
    attribute -> the value index its identity network reads) as the source's colour."""
    chances = leaks = 0
    for pair in COLOUR_COUNTERPARTS:
        for source, target in ((0, 1), (1, 0)):
            (domain, name), (other, mine) = (DOMAINS[source], pair[source]), (DOMAINS[target], pair[target])
            colour = colour_of(domain, name, subjects[domain].attributes[attribute_names(domain).index(name)])
            truth = colour_of(other, mine, subjects[other].attributes[attribute_names(other).index(mine)])
            palette = {colour_of(other, mine, i) for i in range(len(attribute_values(other, mine)))}
            if colour in palette and colour != truth:
                chances += 1
                leaks += colour_of(other, mine, read[other][mine]) == colour
    return chances, leaks


class ToyIdentityEmbedder(IdentityEmbedder):
    """The identity network of ``domain`` (trained on train identities only) from a build's ``metrics`` folder
    (default: the shipped build's)."""

    def __init__(self, domain: str, metrics: str | Path | None = None):
        if domain not in DOMAINS:
            raise NestedAttentionError(f"The toy world has domains {DOMAINS}; got {domain!r}.")
        self.name = "id"
        self.domain = domain
        self.net = IdentityNet.from_pretrained(metrics_folder(metrics) / f"identity_{domain}")
        self.size = self.net.config.image_size

    def embed(self, images: list[Image.Image]) -> torch.Tensor:
        return self.net.embed(to_uint8(images, self.size))

    def attributes(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """The network's reading of each identity attribute: name -> (N,) value indices."""
        return self.net.predict(to_uint8(images, self.size))


class ToyFactorScorer(PromptScorer):
    """``prompt_accuracy``: the fraction of the factors a prompt names that the classifier sees in the image; plus a
    0/1 column ``factor_<name>`` per named factor. None where a prompt names no factor."""

    name = "prompt_accuracy"

    def __init__(self, metrics: str | Path | None = None):
        self.classifier = FactorClassifier.from_pretrained(metrics_folder(metrics) / "factor_classifier")
        self.size = self.classifier.config.image_size

    def score(self, images: list[Image.Image], prompts: list[str]) -> dict[str, list[float | None]]:
        predicted = self.classifier.predict(to_uint8(images, self.size))
        columns: dict[str, list[float | None]] = {self.name: []} | {f"factor_{f}": [] for f in CONTEXT_FACTORS}
        for row, prompt in enumerate(prompts):
            named = prompt_factors(prompt)
            hits = []
            for factor, values in CONTEXT_FACTORS.items():
                hit = None if factor not in named else float(int(predicted[factor][row]) == values.index(named[factor]))
                columns[f"factor_{factor}"].append(hit)
                if hit is not None:
                    hits.append(hit)
            columns[self.name].append(float(np.mean(hits)) if hits else None)
        return columns
