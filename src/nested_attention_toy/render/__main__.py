"""``python -m nested_attention_toy.render [PATH] [--scale N]``: write the world's sample sheet (docs/toyworld-samples.png)."""

import argparse

from PIL import Image

from . import render_example_grid

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("path", nargs="?", default="toyworld-samples.png")
parser.add_argument("--scale", type=int, default=1, help="nearest-neighbour enlargement")
args = parser.parse_args()
sheet = render_example_grid()
sheet.resize((sheet.width * args.scale, sheet.height * args.scale), Image.Resampling.NEAREST).save(args.path, optimize=True)
