"""`nested-attention explain`: what nested attention does inside one layer of one generation (paper Figs. 4-6)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from nested_attention.errors import NestedAttentionError
from nested_attention.images import load_image
from nested_attention.paths import check_writable
from nested_attention.pipeline import NestedAttention
from nested_attention.subject import Subject

from .generate import RANDOM_ADAPTER, adapter_source, load_pipeline, model_source, random_adapter
from .options import (
    SEEDS,
    finite_float,
    guidance_scale,
    image_side,
    int_in,
    resolve_device,
    resolve_dtype,
    seed_value,
    step_count,
)

DESCRIPTION = """\
Generate one image with a subject and show what nested attention does inside one
cross-attention layer at one denoising step (paper Figs. 4-6):
  - how much each pixel attends to the subject word;
  - the subject word's per-pixel value v*_q (its first three principal components
    as RGB) beside the one ordinary value V[s*] every pixel would get without nesting;
  - the nested attention of one probed pixel over the subject tokens, and where
    in the subject image those tokens look;
  - every subject token's map over the subject image (a Q-Former query's
    attention, or the patches a linear readout weighs).
Writes DIR/explain.png and DIR/explain.json (the numbers behind the sheet)."""

EPILOG = """\
examples:
  nested-attention explain --model toy --adapter toy-person --image me.png \\
      --prompt "a photo of a person at the beach" --out explain/
  nested-attention explain --model toy --adapter toy-person --image me.png \\
      --prompt "a person in the snow" --layer mid_block.attentions.0.transformer_blocks.0.attn2 \\
      --step 5 --pixel 30 20 --out explain-mid/
"""


def add_parser(commands) -> None:
    parser = commands.add_parser("explain", help="show nested attention inside one layer (paper Figs. 4-6)",
                                 description=DESCRIPTION, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, metavar="PATH_OR_ID", help="the base pipeline (toy, a folder, a hub id)")
    parser.add_argument("--adapter", required=True, metavar="PATH",
                        help=f"a nested adapter folder, hub id or shipped name; '{RANDOM_ADAPTER}': untrained")
    parser.add_argument("--image", required=True, action="append", metavar="PATH", help="subject image (repeatable)")
    parser.add_argument("--prompt", required=True, metavar="TEXT", help="a prompt with the adapter's word")
    parser.add_argument("--lam", type=finite_float(0, "a positive number", above=True), default=1.0,
                        help="lambda (default: 1)")
    parser.add_argument("--layer", metavar="PATH", help="cross-attention layer (default: the middle one of the up path)")
    parser.add_argument("--step", type=int_in(0, 999, "a step index from 0"), metavar="K",
                        help="denoising step to record, from 0 (default: the middle one)")
    parser.add_argument("--pixel", type=int_in(0, 1 << 16, "a pixel coordinate"), nargs=2, metavar=("X", "Y"),
                        help="the probed pixel in the generated image (default: the one attending most to the word)")
    parser.add_argument("--steps", type=step_count, default=20, metavar="N", help="denoising steps (default: 20)")
    parser.add_argument("--guidance", type=guidance_scale, default=5.0, metavar="SCALE", help="(default: 5)")
    parser.add_argument("--seed", type=seed_value, default=0, help="(default: 0)")
    parser.add_argument("--height", type=image_side, metavar="PIXELS")
    parser.add_argument("--width", type=image_side, metavar="PIXELS")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto")
    parser.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from nested_attention.explain import explain_layer, query_attention_maps
    from nested_attention_eval.explain_sheet import draw_sheet, summary

    check_writable(args.out, "--out")
    source = model_source(args.model)
    subject = Subject([load_image(path) for path in args.image], lam=args.lam)
    device = resolve_device(args.device)
    na = NestedAttention(load_pipeline(source, device, resolve_dtype(args.dtype, device)))
    na.pipe.set_progress_bar_config(disable=True)
    adapter = random_adapter(na.pipe.unet) if args.adapter == RANDOM_ADAPTER else adapter_source(args.adapter)
    name = na.load_adapter(adapter)
    default_side = na.pipe.unet.config.sample_size * na.pipe.vae_scale_factor
    width, height = args.width or default_side, args.height or default_side
    if args.pixel is not None and not (args.pixel[0] < width and args.pixel[1] < height):
        raise NestedAttentionError(
            f"--pixel {args.pixel[0]} {args.pixel[1]} is outside the {width}x{height} generated image; give X below "
            f"{width} and Y below {height}."
        )
    image, explanation = explain_layer(
        na, name, subject, args.prompt, layer=args.layer, step=args.step, num_inference_steps=args.steps,
        guidance_scale=args.guidance, generator=torch.Generator(device=device).manual_seed(args.seed % SEEDS),
        height=height, width=width,
    )
    pixel = probed_cell(explanation, image.size, args.pixel)
    query_maps = [query_attention_maps(na.adapters[name].adapter, view) for view in subject.images]
    args.out.mkdir(parents=True, exist_ok=True)
    sheet = draw_sheet(subject.images, image, explanation, query_maps, pixel, args.prompt)
    sheet.save(args.out / "explain.png")
    numbers = summary(explanation, query_maps, pixel)
    (args.out / "explain.json").write_text(json.dumps({"prompt": args.prompt, "lam": args.lam, **numbers}, indent=2))
    print(args.out / "explain.png")
    print(args.out / "explain.json")
    return 0


def probed_cell(explanation, image_size: tuple[int, int], pixel: list[int] | None) -> tuple[int, int]:
    """The (row, column) of the layer's grid under the probed image pixel (default: the cell attending most)."""
    height, width = explanation.grid
    if pixel is None:
        return divmod(int(np.argmax(explanation.share.numpy())), width)
    x, y = pixel
    return y * height // image_size[1], x * width // image_size[0]
