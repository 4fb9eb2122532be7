"""The toy stack shipped inside the package, addressable by name (``--model toy``, ``--adapter toy-person``,
``train --config toy-person``): what ``nested-attention toy build`` wrote (docs/toyworld.md gives the commands). The names
plug into the library's registry of named sources (``SOURCES``, through the ``nested_attention.sources`` entry point).
"""

from __future__ import annotations

import functools
from pathlib import Path

from nested_attention.config import CONFIG_NAME
from nested_attention.errors import NestedAttentionError
from nested_attention.sources import ADAPTER, IMAGE_ENCODER, MODEL, TRAIN_CONFIG, Source

SHIPPED = Path(__file__).parent / "weights"
RECIPES = Path(__file__).parent / "recipes"  # the adapters' training configs (``--config toy-person``)
MODEL_NAMES = {"toy": "pipeline"}  # name -> folder under SHIPPED
ADAPTER_NAMES = {"toy-person": "adapters/person", "toy-pet": "adapters/pet"}  # trained by `nested-attention train`


def recipe_path(name: str) -> Path:
    """The training config of a shipped adapter name (``"toy-person"``)."""
    return RECIPES / f"{name}.yaml"


def shipped_path(part: str = "") -> Path:
    """A path inside the shipped build: ``""`` (the root), ``"pipeline"``, ``"clip"``, ``"metrics/factor_classifier"``..."""
    return SHIPPED / part if part else SHIPPED


def is_shipped() -> bool:
    return (SHIPPED / "pipeline" / "model_index.json").is_file()


def model_path(name: str) -> Path | None:
    """The folder of a shipped model name (``"toy"``), or None if ``name`` is not one."""
    part = MODEL_NAMES.get(name)
    return None if part is None else SHIPPED / part


def adapter_path(name: str) -> Path | None:
    """The folder of a shipped adapter name (``"toy-person"``), or None if ``name`` is not one."""
    part = ADAPTER_NAMES.get(name)
    return None if part is None else SHIPPED / part


def build_part(folder: str | Path, part: str, marker: str) -> Path:
    """``folder`` if it holds ``marker`` (a file inside it), or its ``part`` subfolder if that does: the diagnostics
    take a toy build's root or the part itself. Otherwise one sentence saying what was expected."""
    folder = Path(folder)
    for candidate in (folder, folder / part):
        if (candidate / marker).is_file():
            return candidate
    raise NestedAttentionError(f"{folder} is not a toy build's {part} folder (no {marker} in it or in {part}/); "
                               f"give the build folder `toy build --out` wrote, or its {part}/ folder.")


_REBUILD = "reinstall the package, or rebuild it with nested-attention toy build --out DIR and give DIR/pipeline"
SOURCES = (
    Source("toy", MODEL, functools.partial(shipped_path, "pipeline"), marker="model_index.json", missing=_REBUILD),
    Source("toy", IMAGE_ENCODER, functools.partial(shipped_path, "clip"), marker="config.json", missing=_REBUILD),
    *(Source(name, ADAPTER, functools.partial(shipped_path, part), marker=CONFIG_NAME,
             missing=f"reinstall the package, or train one with nested-attention train --config {name} and give its "
                     f"folder")
      for name, part in ADAPTER_NAMES.items()),
    *(Source(name, TRAIN_CONFIG, functools.partial(recipe_path, name)) for name in ADAPTER_NAMES),
)
