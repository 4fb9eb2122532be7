"""The example subjects bundled with the package (``examples/*.png``): input views of held-out identities, which no
toy model or adapter ever saw. ``nested-attention demo`` uses them; users can pass them to ``generate`` as files.

Each file is a plain render (``render_input``) of a fixed identity and seed; ``python -m nested_attention_toy.examples``
rewrites them, and a test checks that the files still equal the renders and that every identity is held out.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from .render import render_input
from .world import Identity, identity_from_names

FOLDER = Path(__file__).parent / "examples"


@dataclass(frozen=True)
class Example:
    name: str  # file stem
    identity: Identity
    seed: int  # render_input seed: two seeds of one identity are two "photos" of it


_PERSON_A = identity_from_names("person", hair_color="red", hair_style="long", skin_tone="tan", shirt_color="blue",
                                facial_hair="none")
_PERSON_B = identity_from_names("person", hair_color="blue", hair_style="spiky", skin_tone="tan", shirt_color="yellow",
                                facial_hair="beard")
_PET_C = identity_from_names("pet", species="cat", fur_color="ginger", markings="stripes", neckwear="green collar")
_PET_D = identity_from_names("pet", species="dog", fur_color="white", markings="spots", neckwear="red bandana")

EXAMPLES = (
    Example("person-a", _PERSON_A, 1),
    Example("person-a-2", _PERSON_A, 2),
    Example("person-b", _PERSON_B, 1),
    Example("pet-c", _PET_C, 1),
    Example("pet-d", _PET_D, 1),
)


def example_path(name: str) -> Path:
    return FOLDER / f"{name}.png"


def load_example(name: str) -> Image.Image:
    """A bundled example image by name (``"person-a"``)."""
    with Image.open(example_path(name)) as image:
        return image.convert("RGB")


def render_example(example: Example) -> Image.Image:
    return render_input(example.identity, 64, example.seed)


def write_examples() -> None:
    FOLDER.mkdir(exist_ok=True)
    for example in EXAMPLES:
        if not example.identity.held_out:
            raise ValueError(f"example {example.name} is a training identity; examples must be held out")
        render_example(example).save(example_path(example.name))


if __name__ == "__main__":
    write_examples()
    print(f"wrote {len(EXAMPLES)} examples to {FOLDER}")
