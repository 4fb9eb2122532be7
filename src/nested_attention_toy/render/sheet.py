"""The world's sample sheet: fixed identities, each as its input view beside its targets in varied contexts."""

from __future__ import annotations

from PIL import Image

from ..world import SCENE_POSITIONS, Context, Identity, example_context, identity_from_names
from .compose import render_input, render_scene, render_target

# Fixed, varied identities for the documentation sheet: 3 persons and one pet of each species.
EXAMPLE_IDENTITIES: tuple[tuple[str, dict[str, str]], ...] = (
    ("person", dict(hair_color="blonde", hair_style="long", skin_tone="pale", shirt_color="red", facial_hair="none")),
    ("person", dict(hair_color="blue", hair_style="spiky", skin_tone="dark", shirt_color="yellow", facial_hair="beard")),
    ("person", dict(hair_color="red", hair_style="curly", skin_tone="tan", shirt_color="green", facial_hair="none")),
    ("pet", dict(species="cat", fur_color="ginger", markings="stripes", neckwear="blue collar")),
    ("pet", dict(species="dog", fur_color="white", markings="spots", neckwear="red bandana")),
    ("pet", dict(species="rabbit", fur_color="grey", markings="belly patch", neckwear="pink collar")),
    ("pet", dict(species="bear", fur_color="brown", markings="plain", neckwear="yellow bandana")),
)


def example_identities() -> list[Identity]:
    return [identity_from_names(domain, **values) for domain, values in EXAMPLE_IDENTITIES]


def render_example_grid(identities: list[Identity] | None = None, contexts: list[Context] | None = None,
                        size: int = 64, seed: int = 0, pad: int = 2, pairs: bool = True, columns: int = 8) -> Image.Image:
    """One row per identity: its input view, then its targets (``contexts`` for every row, or by default
    ``example_context(row, column)``). With ``pairs``, a last row of person + pet scenes (the first person and pet),
    each two columns wide."""
    identities = example_identities() if identities is None else identities
    columns = len(contexts) if contexts is not None else columns

    def context(row: int, column: int) -> Context:
        return contexts[column] if contexts is not None else example_context(row, column)

    rows = [[render_input(identity, size, seed)] + [render_target(identity, context(r, c), size, seed).image
                                                    for c in range(columns)] for r, identity in enumerate(identities)]
    persons = [i for i in identities if i.domain == "person"]
    pets = [i for i in identities if i.domain == "pet"]
    if pairs and persons and pets:  # a scene is twice as wide: it takes two columns
        scene = [context(len(identities), c).replace(position=SCENE_POSITIONS[c % 2]) for c in range(columns // 2)]
        rows.append([render_input(pets[0], size, seed)] + [
            render_scene(persons[0], pets[0], c, size, seed).image for c in scene])
    gap = size // 8  # the input-view column stands apart from the targets
    sheet = Image.new("RGB", (pad + (size + pad) * (columns + 1) + gap, pad + (size + pad) * len(rows)), (255, 255, 255))
    for r, row in enumerate(rows):
        x = pad
        for c, tile in enumerate(row):
            sheet.paste(tile, (x, pad + r * (size + pad)))
            x += (tile.size[0] // size) * (size + pad) + (gap if c == 0 else 0)
    return sheet
