"""`nested-attention generate`: personalized images from a base model, adapters and subject photos."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from nested_attention.adapter import NestedAdapter
from nested_attention.errors import NestedAttentionError
from nested_attention.images import load_image
from nested_attention.paths import check_writable, looks_like_local_path
from nested_attention.pipeline import NestedAttention
from nested_attention.sources import ADAPTER, MODEL, find, resolve
from nested_attention.sources import load_pipeline as load_base_pipeline
from nested_attention.subject import Subject
from nested_attention.tiny import random_adapter

from .options import (
    DTYPES,
    MAX_STEPS,
    SEEDS,
    guidance_scale,
    image_side,
    positive_int,
    resolve_device,
    resolve_dtype,
    seed_value,
    step_count,
    subject_word,
)

RANDOM_ADAPTER = "random"
RANDOM_ADAPTER_WORD = "person"

DESCRIPTION = """\
Generate images of your subjects with a diffusers SD 1.5 / SDXL pipeline and
Nested Attention adapters.

Subjects: each --adapter starts a subject; the --word, --image, --image-weight,
--lam and --image-encoder options that follow belong to that subject, until the
next --adapter. The subject's word (default: the word its adapter was trained
with, e.g. "person") must appear in --prompt: that is where the subject goes.
Without any --adapter the base model generates alone (for comparison).
"""

EPILOG = """\
examples:
  # one subject, bound to its adapter's trained word ("person")
  nested-attention generate --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --adapter adapters/person --image me.jpg \\
      --prompt "a watercolor painting of a person reading in a garden"

  # two photos of the subject, more identity (lambda 2), four images
  nested-attention generate --model ... --adapter adapters/person \\
      --image me1.jpg --image me2.jpg --lam 2 --num-images 4 --prompt "a person as a pirate"

  # identity mixing: two people, weighted 2:1
  nested-attention generate --model ... --adapter adapters/person \\
      --image alice.jpg --image-weight 2 --image bob.jpg --image-weight 1 --prompt "a photo of a person"

  # semantic variation: a person adapter bound to another word
  nested-attention generate --model ... --adapter adapters/person --word child \\
      --image me.jpg --prompt "a photo of a child at the beach"

  # two subjects in one image
  nested-attention generate --model ... --adapter adapters/person --image me.jpg \\
      --adapter adapters/pet --image rex.jpg --prompt "a person and a pet in the park"

  # check the command offline: tiny random model, untrained adapter (noise-like images)
  nested-attention generate --model tiny-sd --adapter random --image me.jpg \\
      --prompt "a photo of a person" --steps 4
"""


@dataclass
class SubjectSpec:
    """One subject as given on the command line: an --adapter and the options after it."""

    adapter: str
    word: str | None = None
    images: list[str] = field(default_factory=list)
    image_weights: list[float] = field(default_factory=list)
    lam: float | None = None
    image_encoder: str | None = None


class StartSubject(argparse.Action):
    """--adapter: start a new subject; the subject options after it belong to it."""

    def __call__(self, parser, namespace, value, option_string=None):
        specs = list(getattr(namespace, self.dest, None) or [])  # a new list: never mutate the default
        specs.append(SubjectSpec(adapter=value))
        setattr(namespace, self.dest, specs)


class SubjectOption(argparse.Action):
    """--word, --image, ...: set (repeatable options: append to) a field of the latest subject."""

    def __call__(self, parser, namespace, value, option_string=None):
        specs = getattr(namespace, "subjects", None)
        if not specs:
            parser.error(
                f"{option_string} {value} comes before any --adapter; subject options belong to the --adapter "
                f"before them, e.g. --adapter PATH --image me.jpg."
            )
        spec = specs[-1]
        current = getattr(spec, self.dest)
        if isinstance(current, list):
            current.append(value)
        elif current is not None:
            parser.error(f"{option_string} is given twice for --adapter {spec.adapter}; give it once per subject.")
        else:
            setattr(spec, self.dest, value)


def add_parser(commands) -> None:
    """Register `generate` on the top-level sub-command parsers."""
    parser = commands.add_parser(
        "generate",
        help="generate images of your subjects",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model = parser.add_argument_group("base model")
    model.add_argument(
        "--model", required=True, metavar="PATH_OR_ID",
        help="diffusers pipeline folder or hub id (SD 1.5 or SDXL); toy: the shipped toy-world model; "
             "tiny-sd / tiny-sdxl: tiny random models",
    )
    model.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto",
                       help="where to run (default: cuda, else mps, else cpu)")
    model.add_argument("--dtype", choices=("auto", *DTYPES), default="auto",
                       help="weights dtype (default: float32 on cpu, bfloat16 or float16 on cuda, float16 on mps)")
    model.add_argument("--cuda-graphs", action="store_true",
                       help="replay each UNet step as CUDA graphs (torch.compile, mode reduce-overhead): much less "
                            "host time per step; the first image compiles for minutes (cuda only)")

    subjects = parser.add_argument_group("subjects (repeat --adapter and its options for each subject)")
    subjects.add_argument(
        "--adapter", action=StartSubject, dest="subjects", metavar="PATH",
        help=f"adapter folder or hub id (owner/name); starts a subject. '{RANDOM_ADAPTER}': a fresh, UNTRAINED "
             f"adapter for plumbing checks with tiny models",
    )
    subjects.add_argument("--word", action=SubjectOption, type=subject_word, default=argparse.SUPPRESS,
                          help="the prompt word the subject replaces (default: the adapter's trained word)")
    subjects.add_argument("--image", action=SubjectOption, dest="images", metavar="PATH", default=argparse.SUPPRESS,
                          help="a photo of the subject (repeatable: several photos of one subject)")
    subjects.add_argument("--image-weight", action=SubjectOption, dest="image_weights", metavar="W", type=float,
                          default=argparse.SUPPRESS,
                          help="weight of each --image, one per image (identity mixing; default: all equal)")
    subjects.add_argument("--lam", action=SubjectOption, type=float, metavar="LAMBDA", default=argparse.SUPPRESS,
                          help="identity vs. prompt: 1 = as trained (default), larger = more identity (up to ~4)")
    subjects.add_argument("--image-encoder", action=SubjectOption, dest="image_encoder", metavar="PATH_OR_ID",
                          default=argparse.SUPPRESS,
                          help="CLIP image encoder folder or hub id, overriding the one the adapter names")

    generation = parser.add_argument_group("generation")
    generation.add_argument("--prompt", required=True, metavar="TEXT",
                            help="the prompt; must contain each subject's word")
    generation.add_argument("--negative-prompt", metavar="TEXT", help="what to avoid")
    generation.add_argument("--steps", type=step_count, default=30,
                            metavar="N", help=f"denoising steps, at most {MAX_STEPS} (default: 30)")
    generation.add_argument("--guidance", type=guidance_scale, default=7.5, metavar="SCALE",
                            help="classifier-free guidance scale, at least 0; 1 or less turns it off (default: 7.5)")
    generation.add_argument("--seed", type=seed_value, default=0,
                            metavar="N", help="random seed; image i uses seed + i (default: 0)")
    generation.add_argument("--height", type=image_side, metavar="PX",
                            help="image height, a multiple of 8 (default: the model's)")
    generation.add_argument("--width", type=image_side, metavar="PX",
                            help="image width, a multiple of 8 (default: the model's)")
    generation.add_argument("--num-images", type=positive_int, default=1, metavar="N",
                            help="images to generate (default: 1)")
    generation.add_argument("--batch-size", type=positive_int, default=4, metavar="N",
                            help="images generated at once; each batch is written before the next (default: 4)")

    output = parser.add_argument_group("output")
    output.add_argument("--out", type=Path, default=Path("outputs/nested.png"), metavar="PATH",
                        help="output image; several images are written as STEM-0.png, STEM-1.png, ... "
                             "(default: outputs/nested.png)")
    parser.set_defaults(run=run, subjects=None)


# ---- running ---------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Check every input, load the models, generate and save; return the exit code."""
    specs: list[SubjectSpec] = args.subjects or []
    paths = output_paths(args.out, args.num_images)  # cheap checks first, then images, then models
    check_writable(args.out, "--out")
    source = model_source(args.model)
    device = resolve_device(args.device)
    if args.cuda_graphs and device != "cuda":
        raise NestedAttentionError(
            f"--cuda-graphs needs a CUDA device, but this run uses {device}; add --device cuda or drop --cuda-graphs."
        )
    dtype = resolve_dtype(args.dtype, device)
    subjects = [build_subject(spec) for spec in specs]
    adapters = [load_adapter_folder(spec) for spec in specs]
    check_distinct_words(specs, adapters)
    na = NestedAttention(load_pipeline(source, device, dtype), cuda_graphs=args.cuda_graphs)
    names = [adapter_name(spec, i, specs) for i, spec in enumerate(specs)]
    for seed, (spec, adapter, name) in enumerate(zip(specs, adapters, names)):
        na.load_adapter(adapter or random_adapter(na.pipe.unet, seed=seed), word=spec.word, name=name)
    size = {key: value for key, value in (("height", args.height), ("width", args.width)) if value is not None}
    for start in range(0, len(paths), args.batch_size):
        batch = paths[start : start + args.batch_size]
        images = na(
            args.prompt,
            subjects=dict(zip(names, subjects)),
            num_images_per_prompt=len(batch),
            negative_prompt=args.negative_prompt,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            # one generator per image: image i is the same whatever the batch size
            generator=[torch.Generator(device=device).manual_seed((args.seed + i) % SEEDS)
                       for i in range(start, start + len(batch))],
            **size,
        ).images
        for image, path in zip(images, batch):
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
            print(path)
    return 0


def output_paths(out: Path, count: int) -> list[Path]:
    """`out` itself for one image, `stem-0.ext`, `stem-1.ext`, ... for several; refuses unknown extensions."""
    if out.suffix.lower() not in Image.registered_extensions():
        raise NestedAttentionError(
            f"--out {out} does not end in an image extension; give a file name such as outputs/nested.png."
        )
    if out.is_dir():
        raise NestedAttentionError(f"--out {out} is a directory; give a file name such as {out / 'nested.png'}.")
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


def build_subject(spec: SubjectSpec) -> Subject:
    """Read a subject's images (noting conversions on stderr) and check its weights and lambda."""
    if not spec.images:
        raise NestedAttentionError(
            f"--adapter {spec.adapter} has no --image; give at least one photo of the subject after it, "
            f"e.g. --adapter {spec.adapter} --image me.jpg."
        )
    if spec.image_weights and len(spec.image_weights) != len(spec.images):
        raise NestedAttentionError(
            f"--adapter {spec.adapter} has {len(spec.images)} --image but {len(spec.image_weights)} --image-weight; "
            f"give one weight per image, or none."
        )
    images = [load_image(path) for path in spec.images]
    for path in spec.images:
        note_conversion(path)
    lam = 1.0 if spec.lam is None else spec.lam
    return Subject(images, weights=spec.image_weights or None, lam=lam)


def note_conversion(path: str) -> None:
    """Say on stderr when a (readable) image was not RGB and has been converted."""
    with Image.open(path) as image:
        mode, transparent = image.mode, "transparency" in image.info
    if mode == "RGB":
        return
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and transparent):  # as images.to_rgb decides
        print(f"note: {path} is {mode} with transparency; composited onto white.", file=sys.stderr)
    else:
        print(f"note: {path} is {mode}, not RGB; converted to RGB.", file=sys.stderr)


def load_adapter_folder(spec: SubjectSpec) -> NestedAdapter | None:
    """The adapter of a subject from its folder; None for `random` (built once the UNet is loaded)."""
    if spec.adapter != RANDOM_ADAPTER:
        return NestedAdapter.from_pretrained(adapter_source(spec.adapter), image_encoder=spec.image_encoder)
    if spec.image_encoder is not None:
        raise NestedAttentionError(
            f"--image-encoder does not apply to --adapter {RANDOM_ADAPTER}, which uses a tiny random image "
            f"encoder; remove it, or give an adapter folder."
        )
    print(f"note: --adapter {RANDOM_ADAPTER} is untrained: it checks the plumbing, it carries no identity.",
          file=sys.stderr)
    return None


def adapter_source(adapter: str) -> str:
    """--adapter: a registered adapter's name (``toy-person``, ``toy-pet``) -> its folder; anything else unchanged."""
    try:
        return resolve(ADAPTER, adapter)
    except NestedAttentionError as error:
        raise NestedAttentionError(f"--adapter {adapter}: {error}") from None


def check_distinct_words(specs: list[SubjectSpec], adapters: list[NestedAdapter | None]) -> None:
    """Refuse two subjects bound to one word before the base model is loaded."""
    seen: dict[str, SubjectSpec] = {}
    for spec, adapter in zip(specs, adapters):
        word = spec.word or (adapter.config.word if adapter is not None else RANDOM_ADAPTER_WORD)
        first = seen.setdefault(word.strip().lower(), spec)
        if first is not spec:
            raise NestedAttentionError(
                f"--adapter {first.adapter} and --adapter {spec.adapter} are both bound to the word {word!r}; "
                f"give one of them another --word, and use that word in the prompt."
            )


def adapter_name(spec: SubjectSpec, index: int, specs: list[SubjectSpec]) -> str:
    """The name a subject's adapter is loaded under: the --adapter argument, numbered when repeated."""
    repeated = sum(other.adapter == spec.adapter for other in specs) > 1
    return f"{spec.adapter} #{index + 1}" if repeated else spec.adapter


def model_source(model: str) -> str:
    """Check --model without loading it: a registered name (-> its folder, or the name of a tiny model built on the
    fly), an existing pipeline folder, or a hub id."""
    if find(MODEL, model) is not None:
        try:
            return resolve(MODEL, model)
        except NestedAttentionError as error:
            raise NestedAttentionError(f"--model {model}: {error}") from None
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise NestedAttentionError(
                f"--model {model} is not a diffusers pipeline folder: it has no model_index.json. Give the folder "
                f"written by save_pretrained (or a hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5)."
            )
        return str(path)
    if looks_like_local_path(model):
        raise NestedAttentionError(
            f"--model {model} does not exist; give a diffusers pipeline folder or a hub id such as "
            f"stable-diffusion-v1-5/stable-diffusion-v1-5."
        )
    return model


def load_pipeline(source: str, device: str, dtype: torch.dtype) -> DiffusionPipeline:
    """The base pipeline on `device`: a tiny random one, a local folder, or a hub id (downloaded once)."""
    return load_base_pipeline(source, dtype=dtype, device=device)
