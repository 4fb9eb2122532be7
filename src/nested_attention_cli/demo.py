"""`nested-attention demo`: the paper's capabilities on the shipped toy model, on subjects it never saw, in seconds."""

from __future__ import annotations

import argparse
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from nested_attention.adapter import CONFIG_NAME
from nested_attention.errors import NestedAttentionError
from nested_attention.pipeline import NestedAttention
from nested_attention.subject import Subject
from nested_attention_toy.assets import ADAPTER_NAMES, adapter_path, is_shipped, model_path
from nested_attention_toy.render import SCENE_SIZE

from .options import positive_int

CELL = 128  # each 64-pixel image is shown upscaled to this
LABEL = 14  # pixels of text under each cell
COLUMNS = 6
SEED = 0

DESCRIPTION = """\
Write one image, DIR/demo.png, showing what nested attention does, on the
toy world's shipped model and its trained toy-person and toy-pet adapters:
bundled example subjects (held-out identities: no model ever saw them) in
prompts that change scene, style and expression; the base model without an
adapter; a lambda sweep; one input image vs two; identity mixing; semantic
variation (an adapter bound to another word); person + pet in one image.

It runs offline on a CPU in well under a minute (docs/toyworld.md says what
the toy world is and how the adapters were trained and measured).
"""

EPILOG = """\
examples:
  nested-attention demo
  nested-attention demo --out /tmp/demo --steps 30
"""

PERSON_PROMPTS = (
    "a photo of a smiling person on the beach, in the center",
    "a watercolor painting of a sad person in the forest, on the left",
    "a cartoon of a surprised person in a snow field, on the right",
    "a pixel art picture of an angry person on a city street, in the center",
)
PET_PROMPTS = (
    "a cartoon of a smiling pet in the desert, in the center",
    "a photo of a surprised pet under the night sky, on the left",
    "a watercolor painting of an angry pet on the beach, on the right",
    "a pixel art picture of a sad pet in a snow field, in the center",
)
# the lambda row: the prompt and seed (of 96 prompts and two seeds) where lambda moved A's identity most (docs/toyworld.md)
SWEEP_PROMPT = "a cartoon of a sad person on a city street, in the center"
SWEEP_SEED = 1
SCENE_PROMPTS = (
    "a photo of a smiling person and a sad pet on the beach, on the left",
    "a cartoon of a surprised person and a smiling pet in the forest, on the right",
    "a watercolor painting of a sad person and an angry pet in a snow field, on the left",
)
LAMBDAS = (1.0, 1.5, 2.0, 3.0, 4.0)


@dataclass
class Cell:
    """One tile of the sheet: an input image, or a generation (its prompt, subjects and word binding)."""

    label: str
    prompt: str = ""
    subjects: dict[str, Subject] = field(default_factory=dict)  # adapter name -> subject; empty: no adapter
    words: tuple[tuple[str, str], ...] = ()  # (adapter, word) rebindings for this cell (semantic variation)
    seed: int = SEED
    image: Image.Image | None = None
    size: tuple[int, int] | None = None  # (width, height) of a generation; None: the model's square


def add_parser(commands) -> None:
    """Register `demo` on the top-level sub-command parsers."""
    parser = commands.add_parser(
        "demo",
        help="one picture of every capability, on the shipped toy model and adapters (offline, CPU, seconds)",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/demo"), metavar="DIR",
                        help="folder for demo.png (default: outputs/demo)")
    parser.add_argument("--steps", type=positive_int, default=20, help="denoising steps per image (default: 20)")
    parser.add_argument("--smoke", action="store_true", help="2 denoising steps: checks that everything runs (for CI)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Load the shipped model and adapters, generate every cell (batched by word binding), save the sheet."""
    from diffusers import StableDiffusionPipeline

    from nested_attention_toy.examples import EXAMPLES, load_example

    start = time.perf_counter()
    missing = [name for name in ADAPTER_NAMES if not (adapter_path(name) / CONFIG_NAME).is_file()]
    if not is_shipped() or missing:
        raise NestedAttentionError(
            f"The demo needs the shipped toy model and adapters, and this installation lacks "
            f"{'the toy model' if not is_shipped() else ', '.join(missing)}; reinstall the package."
        )
    steps = 2 if args.smoke else args.steps
    pipe = StableDiffusionPipeline.from_pretrained(model_path("toy"), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    na = NestedAttention(pipe)
    for name in ADAPTER_NAMES:
        na.load_adapter(adapter_path(name), name=name)
    images = {example.name: load_example(example.name) for example in EXAMPLES}
    rows = demo_rows(images)
    generated = [cell for row in rows for cell in row if cell.image is None]
    print(f"nested-attention demo: {len(generated)} images of held-out subjects on the toy model ({steps} steps each)",
          flush=True)
    try:
        for words, size in dict.fromkeys((c.words, c.size) for c in generated):  # a batched call per binding and size
            batch = [cell for cell in generated if (cell.words, cell.size) == (words, size)]
            with rebound(na, words):
                outputs = generate(na, batch, steps)
            for cell, image in zip(batch, outputs):
                cell.image = image
    finally:
        na.uninstall()
    path = args.out / "demo.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(rows).save(path)
    print(f"wrote {path} ({len(generated)} generations in {time.perf_counter() - start:.1f} s)")
    return 0


def demo_rows(images: dict[str, Image.Image]) -> list[list[Cell]]:
    """The sheet, row by row (COLUMNS cells wide, a person + pet scene two of them): every subject's input view first,
    the base model beside it."""
    a, a2, b, c, d = (images[n] for n in ("person-a", "person-a-2", "person-b", "pet-c", "pet-d"))
    person, pet = "toy-person", "toy-pet"

    def prompts_row(label: str, image: Image.Image, adapter: str, prompts, base: int) -> list[Cell]:
        return ([Cell(f"input: {label}", image=image)]
                + [Cell(f"{label}: {_short(p)}", p, {adapter: Subject(image)}, seed=i) for i, p in enumerate(prompts)]
                + [Cell(f"no adapter: {_short(prompts[base])}", prompts[base], seed=base)])

    return [
        prompts_row("A", a, person, PERSON_PROMPTS, 0),
        prompts_row("B", b, person, PERSON_PROMPTS, 1),
        prompts_row("C", c, pet, PET_PROMPTS, 0),
        prompts_row("D", d, pet, PET_PROMPTS, 1),
        [Cell("input: A", image=a)] + [Cell(f"A, lambda {lam:g}", SWEEP_PROMPT, {person: Subject(a, lam=lam)},
                                            seed=SWEEP_SEED) for lam in LAMBDAS],
        [Cell("input: A, 2nd photo", image=a2),
         Cell("A, one photo", PERSON_PROMPTS[2], {person: Subject(a)}, seed=2),
         Cell("A, two photos", PERSON_PROMPTS[2], {person: Subject([a, a2])}, seed=2),
         Cell("mix A:B = 1:1", PERSON_PROMPTS[2], {person: Subject([a, b])}, seed=2),
         Cell("mix A:B = 1:3", PERSON_PROMPTS[2], {person: Subject([a, b], weights=[1.0, 3.0])}, seed=2),
         Cell("A as a 'pet'", PET_PROMPTS[0], {person: Subject(a)}, words=((pet, "animal"), (person, "pet")))],
        [*(Cell(f"{p} + {q}", prompt, {person: Subject(x), pet: Subject(y)}, seed=i, size=SCENE_SIZE)
           for i, (p, q, x, y, prompt) in enumerate(zip("AB", "CD", (a, b), (c, d), SCENE_PROMPTS))),
         Cell("no adapter: person + pet", SCENE_PROMPTS[0], seed=0, size=SCENE_SIZE)],
        [Cell("input: C", image=c),
         Cell("C as a 'person'", PERSON_PROMPTS[0], {pet: Subject(c)}, words=((person, "human"), (pet, "person"))),
         Cell("A + D", SCENE_PROMPTS[2], {person: Subject(a), pet: Subject(d)}, seed=2, size=SCENE_SIZE)],
    ]


def _short(prompt: str) -> str:
    """A label-sized summary: the style and scene words ("watercolor, forest")."""
    from nested_attention_toy.world import prompt_factors

    factors = prompt_factors(prompt)
    return ", ".join(factors[f] for f in ("style", "expression", "scene") if f in factors)


@contextmanager
def rebound(na: NestedAttention, words: tuple[tuple[str, str], ...]):
    """Bind adapters to other words (in the given order) for the duration; restore the trained words after."""
    original = {name: na.adapters[name].word for name, _ in words}
    try:
        for name, word in words:
            na.set_word(name, word)
        yield
    finally:
        for name in reversed(list(original)):
            na.adapters[name].word = original[name]


def generate(na: NestedAttention, cells: list[Cell], steps: int) -> list[Image.Image]:
    """One batched call: each row gets its own subjects (None where a cell uses no adapter) and its own seed."""
    names = sorted({name for cell in cells for name in cell.subjects})
    subjects = {name: [cell.subjects.get(name) for cell in cells] for name in names}
    width, height = cells[0].size or (None, None)
    return na(
        [cell.prompt for cell in cells], subjects=subjects, num_inference_steps=steps, guidance_scale=5.0,
        generator=[torch.Generator().manual_seed(cell.seed) for cell in cells], width=width, height=height,
    ).images


def contact_sheet(rows: list[list[Cell]]) -> Image.Image:
    """Cells upscaled to CELL pixels tall (a person + pet scene twice as wide) with their labels under them, under a
    title."""
    font = ImageFont.load_default()
    title = ["nested-attention demo: the toy world's model and adapters, on held-out subjects A, B (persons) and C, D (pets)"]
    top = LABEL * len(title) + 4
    sheet = Image.new("RGB", (COLUMNS * CELL, top + len(rows) * (CELL + LABEL)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, line in enumerate(title):
        draw.text((4, 2 + i * LABEL), line, fill="black", font=font)
    for r, row in enumerate(rows):
        x, y = 0, top + r * (CELL + LABEL)
        for cell in row:
            wide = CELL * cell.image.width // cell.image.height
            sheet.paste(cell.image.resize((wide, CELL), Image.Resampling.NEAREST), (x, y))
            label = cell.label
            while draw.textlength(label, font=font) > wide - 2 and len(label) > 4:
                label = label[:-3] + ".."
            width = draw.textlength(label, font=font)
            draw.text((x + (wide - width) / 2, y + CELL + 1), label, fill="black", font=font)
            x += wide
    return sheet
