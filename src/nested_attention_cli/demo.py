"""`nested-attention demo`: one contact sheet of every feature, on a tiny random model, in seconds."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from nested_attention.pipeline import NestedAttention
from nested_attention.subject import Subject
from nested_attention.tiny import tiny_sd_pipeline

from .generate import positive_int, random_adapter

SIZE = 64  # generated and synthetic images
CELL = 128  # each shown upscaled to this
LABEL = 16  # pixels of text under each cell
COLUMNS = 4
SEED = 0

DESCRIPTION = """\
Write one image, DIR/demo.png, showing every feature of nested attention:
vanilla, a subject in several prompts, the lambda sweep, several images of one
subject, identity mixing, semantic variation and two subjects in one image.

It runs offline in seconds on a CPU because the model is a tiny, randomly
initialized SD 1.5-shaped pipeline and the adapters are untrained: it checks
the plumbing end to end, and its images are noise-like, not likenesses.
"""

EPILOG = """\
examples:
  nested-attention demo
  nested-attention demo --out /tmp/demo --steps 8
"""

BANNER = """\
nested-attention demo: a TINY, RANDOMLY INITIALIZED model with UNTRAINED adapters.
This is a plumbing check (every feature runs end to end); the images are noise-like,
not likenesses. For real images use `nested-attention generate` with a trained adapter."""


@dataclass
class Cell:
    """One tile of the sheet: an input image, or a generation with its prompt and subjects."""

    label: str
    prompt: str = ""
    subjects: dict[str, Subject] = field(default_factory=dict)
    word: str | None = None  # bind the person adapter to this word for this cell (semantic variation)
    image: Image.Image | None = None


def add_parser(commands) -> None:
    """Register `demo` on the top-level sub-command parsers."""
    parser = commands.add_parser(
        "demo",
        help="a contact sheet of every feature on a tiny random model (offline, seconds)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"), metavar="DIR",
                        help="folder for demo.png (default: outputs/demo)")
    parser.add_argument("--steps", type=positive_int, default=4, help="denoising steps per image (default: 4)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Build the tiny model and two random adapters, render every cell, save the sheet."""
    print(BANNER, flush=True)
    start = time.perf_counter()
    pipe = tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    na = NestedAttention(pipe)
    na.load_adapter(random_adapter(pipe.unet, seed=0, word="person"), name="person")
    na.load_adapter(random_adapter(pipe.unet, seed=1, word="pet"), name="pet")
    rows = demo_rows()
    generated = [cell for row in rows for cell in row if cell.image is None]
    for index, cell in enumerate(generated, 1):
        print(f"  [{index}/{len(generated)}] {cell.label}: {cell.prompt!r}", flush=True)
        cell.image = render(na, cell, args.steps)
    path = args.out / "demo.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(rows).save(path)
    print(f"wrote {path} ({len(generated)} generations in {time.perf_counter() - start:.1f} s)")
    return 0


def demo_rows() -> list[list[Cell]]:
    """The sheet, row by row: inputs, prompts, lambda sweep and multi-image, then binding tricks."""
    alice, alice_2, bob, rex = person_image(1), person_image(1, shift=(5, 3)), person_image(2), pet_image(3)
    person = Subject(alice)
    beach = "a photo of a person at the beach"
    return [
        [Cell("input: person A", image=alice), Cell("input: A, 2nd photo", image=alice_2),
         Cell("input: person B", image=bob), Cell("input: pet", image=rex)],
        [Cell("vanilla", beach), Cell("A at the beach", beach, {"person": person}),
         Cell("A, watercolor", "a watercolor painting of a person", {"person": person}),
         Cell("A, hat in snow", "a person wearing a hat in the snow", {"person": person})],
        [*(Cell(f"A, lambda {lam}", "a pencil drawing of a person", {"person": Subject(alice, lam=lam)})
           for lam in (1.0, 2.0, 4.0)),
         Cell("A, two photos", beach, {"person": Subject([alice, alice_2])})],
        [Cell("mix A:B = 2:1", beach, {"person": Subject([alice, bob], weights=[2.0, 1.0])}),
         Cell("A bound to 'woman'", "a photo of a woman at the beach", {"person": person}, word="woman"),
         Cell("A + pet", "a person and a pet in the park", {"person": person, "pet": Subject(rex)})],
    ]


def render(na: NestedAttention, cell: Cell, steps: int) -> Image.Image:
    """Generate one cell with a fixed seed, so that cells differ only by what their labels say."""
    if cell.word:
        na.set_word("person", cell.word)
    try:
        return na(
            cell.prompt, subjects=cell.subjects, num_inference_steps=steps, height=SIZE, width=SIZE,
            generator=torch.Generator().manual_seed(SEED),
        ).images[0]
    finally:
        if cell.word:
            na.set_word("person", "person")


# ---- synthetic subjects ------------------------------------------------------------------------------------


def _grid() -> tuple[np.ndarray, np.ndarray]:
    return np.mgrid[:SIZE, :SIZE]


def _disc(cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = _grid()
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


def person_image(seed: int, shift: tuple[int, int] = (0, 0)) -> Image.Image:
    """A cartoon head and shoulders in seeded colours; `shift` moves it (another photo of the same person)."""
    background, skin, hair, shirt = np.random.default_rng(seed).integers(0, 256, (4, 3), dtype=np.uint8)
    yy, xx = _grid()
    cx, cy = 32 + shift[0], 26 + shift[1]
    canvas = np.empty((SIZE, SIZE, 3), np.uint8)
    canvas[:] = background
    canvas[(yy > cy + 13) & (np.abs(xx - cx) < 22)] = shirt
    head = _disc(cx, cy, 15)
    canvas[head] = skin
    canvas[head & (yy < cy - 6)] = hair
    canvas[_disc(cx - 6, cy, 2) | _disc(cx + 6, cy, 2)] = 0
    canvas[(np.abs(yy - (cy + 8)) <= 1) & (np.abs(xx - cx) <= 5)] = (150, 40, 40)
    return Image.fromarray(canvas)


def pet_image(seed: int) -> Image.Image:
    """A cartoon four-legged pet in profile, in seeded colours."""
    background, fur = np.random.default_rng(seed).integers(0, 256, (2, 3), dtype=np.uint8)
    yy, xx = _grid()
    canvas = np.empty((SIZE, SIZE, 3), np.uint8)
    canvas[:] = background
    body = ((xx - 36) / 19) ** 2 + ((yy - 38) / 10) ** 2 <= 1
    legs = (yy >= 40) & (yy <= 56) & ((np.abs(xx - 24) <= 2) | (np.abs(xx - 46) <= 2))
    ears = (yy >= 12) & (yy <= 20) & ((np.abs(xx - 12) <= (yy - 12) / 2) | (np.abs(xx - 22) <= (yy - 12) / 2))
    tail = (np.abs(yy - (xx - 54) * -1.2 - 32) <= 1.5) & (xx >= 54) & (xx <= 62)
    canvas[body | legs | ears | tail | _disc(17, 26, 9)] = fur
    canvas[_disc(14, 24, 1.5) | _disc(9, 28, 2)] = 0
    return Image.fromarray(canvas)


# ---- the sheet -----------------------------------------------------------------------------------------------


def contact_sheet(rows: list[list[Cell]]) -> Image.Image:
    """Cells upscaled to CELL pixels with their labels under them, COLUMNS to a row, under a title."""
    font = ImageFont.load_default()
    title = ["nested-attention demo: tiny random model, untrained adapters",
             "(plumbing check: images are noise-like, not likenesses)"]
    top = LABEL * len(title) + 4
    sheet = Image.new("RGB", (COLUMNS * CELL, top + len(rows) * (CELL + LABEL)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, line in enumerate(title):
        draw.text((4, 2 + i * LABEL), line, fill="black", font=font)
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            x, y = c * CELL, top + r * (CELL + LABEL)
            sheet.paste(cell.image.resize((CELL, CELL), Image.Resampling.NEAREST), (x, y))
            width = draw.textlength(cell.label, font=font)
            draw.text((x + (CELL - width) / 2, y + CELL + 2), cell.label, fill="black", font=font)
    return sheet
