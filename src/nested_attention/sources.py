"""Named sources: the base models, adapters and image encoders that a short name stands for (``--model tiny-sd``,
``--model toy``, ``--adapter toy-person``), resolved in one place, and the one way to load a base pipeline.

The library registers its tiny random models (``tiny-sd``, ``tiny-sdxl``: for checking commands, not for results)
and the tiny image encoder (``tiny``). Other installed packages plug theirs in through the ``nested_attention.sources``
entry-point group: each entry point names a tuple of ``Source`` (the toy world registers ``toy``, the adapters
``toy-person`` and ``toy-pet``, and the training configs of the same names), so the library never imports them.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

import torch

from .errors import NestedAttentionError

MODEL, ADAPTER, IMAGE_ENCODER, TRAIN_CONFIG = "model", "adapter", "image encoder", "training config"
ENTRY_POINTS = "nested_attention.sources"


@dataclass(frozen=True)
class Source:
    """A name of ``kind`` (MODEL, ADAPTER, IMAGE_ENCODER or TRAIN_CONFIG) for an installed ``folder`` (a function:
    packages find their data when asked; for a training config, its YAML file) or for something ``make`` builds on the fly (``make(seed=..., tokenizer_dir=...)`` for a
    model, ``make(seed=...)`` for an image encoder). ``marker`` is the file an installed folder must hold;
    ``missing`` says what to do when it does not."""

    name: str
    kind: str
    folder: Callable[[], Path] | None = None
    make: Callable[..., object] | None = None
    marker: str = ""
    missing: str = "reinstall the package"

    def path(self) -> Path:
        """The installed folder; one sentence (NestedAttentionError) when it is not there."""
        folder = self.folder()
        if self.marker and not (folder / self.marker).is_file():
            raise NestedAttentionError(f"the {self.kind} {self.name!r} is missing from this installation ({folder}); "
                                       f"{self.missing}.")
        return folder


def _tiny() -> tuple[Source, ...]:
    from .tiny import tiny_image_encoder, tiny_sd_pipeline, tiny_sdxl_pipeline

    return (Source("tiny-sd", MODEL, make=tiny_sd_pipeline), Source("tiny-sdxl", MODEL, make=tiny_sdxl_pipeline),
            Source("tiny", IMAGE_ENCODER, make=tiny_image_encoder))


_registry: dict[tuple[str, str], Source] = {}
_discovered = False


def register(*sources: Source) -> None:
    for source in sources:
        _registry[source.kind, source.name] = source


def _load() -> dict[tuple[str, str], Source]:
    """The registry, with the built-in and installed sources found once (a name registered by hand stays)."""
    global _discovered
    if not _discovered:
        _discovered = True
        found = [*_tiny(), *(s for point in entry_points(group=ENTRY_POINTS) for s in point.load())]
        for source in found:
            _registry.setdefault((source.kind, source.name), source)
    return _registry


def find(kind: str, name: str) -> Source | None:
    """The registered source of ``kind`` called ``name``, or None (then ``name`` is a folder or a hub id)."""
    return _load().get((kind, name))


def names(kind: str) -> list[str]:
    return sorted(name for k, name in _load() if k == kind)


def resolve(kind: str, name: str) -> str:
    """A registered installed source's folder; a made-on-the-fly source's name; anything else unchanged."""
    source = find(kind, name)
    if source is None or source.folder is None:
        return name
    return str(source.path())


def load_pipeline(name: str, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0,
                  tokenizer_dir: str | Path | None = None, note_tiny: bool = True):
    """The base pipeline ``name`` (a registered name, a local diffusers folder or a hub id) in ``dtype`` on
    ``device``, without a safety checker; a tiny random model is built from ``seed`` (with a note on stderr that its
    images are noise, unless ``note_tiny`` is False). One sentence (NestedAttentionError) when it cannot be loaded."""
    from diffusers import DiffusionPipeline

    source = find(MODEL, name)
    if source is not None and source.make is not None:
        if note_tiny:
            print(f"note: {name} is a tiny, randomly initialized model: its images are noise-like "
                  f"(for checking the command, not for results).", file=sys.stderr)
        return source.make(seed=seed, tokenizer_dir=tokenizer_dir).to(device=device, dtype=dtype)
    path = resolve(MODEL, name)
    try:
        index = DiffusionPipeline.load_config(path)
        extra = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in index else {}
        pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=dtype, **extra)
    except (OSError, ValueError) as error:
        advice = (
            "Check that the folder holds a complete diffusers pipeline (model_index.json and one folder per component)."
            if Path(path).is_dir() else
            "Check the hub id and the network connection (the model is downloaded once, then cached), or give a "
            "local diffusers pipeline folder."
        )
        raise NestedAttentionError(f"Could not load the base model {name!r} ({short_reason(error)}). {advice}") from None
    return pipe.to(device)


def short_reason(error: Exception, limit: int = 240) -> str:
    """The gist of a library error: its first line, without pointers to a stack trace the user does not see."""
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    sentences = [s for s in first_line.split(". ") if "stacktrace" not in s and "traceback" not in s.lower()]
    reason = ". ".join(sentences).rstrip(". ")
    return reason if len(reason) <= limit else reason[: limit - 1].rstrip() + "…"
