"""`nested-attention data ...`: real training data (`data prepare`: a folder of photos -> training triplets)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .options import int_in, positive_int

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

PREPARE_DESCRIPTION = """\
Turn a folder of photos into the training folder `nested-attention train` reads:
metadata.jsonl, subjects/ and targets/ (docs/data.md).

person: each photo's face is found, aligned (eyes level) and cropped FFHQ-style
as the subject image; the photo squared around the face, at --resolution, is
the target. Photos with no face, several faces, a face under --min-face
pixels or a face whose eyes are not found are skipped and counted.
pet: the pet on white around its mask (--masks, or the photo's transparency),
else the whole photo squared, is both subject and target.

Captions come from NAME.txt beside each photo, from IN_DIR/captions.jsonl or
from a local captioning model (--caption-model); their subject word (woman,
man, dog, cat, ...) becomes the domain word, and captions without one are
refused and counted. Identical files are prepared once. Running the same command again goes on where it stopped; report.json
and contact-sheet.png in OUT_DIR tell what was kept and why the rest was not.
"""

PREPARE_EPILOG = """\
examples:
  nested-attention data prepare --domain person photos/ data/faces --workers 8
  nested-attention data prepare --domain pet pets/ data/pets --masks pet-masks/ --shards
  nested-attention data prepare --domain person photos/ data/faces --caption-model blip-base/
  nested-attention train --config configs/sdxl-faces-phase1.yaml data=data/faces
"""


def add_parser(commands) -> None:
    """Register `data` (with its `prepare` sub-command) on the top-level sub-command parsers."""
    data = commands.add_parser("data", help="real training data: data prepare turns a folder of photos into triplets",
                               description="Real training data for `nested-attention train`.")
    sub = data.add_subparsers(title="commands", dest="data_command", metavar="COMMAND", required=True)
    prepare = sub.add_parser("prepare", help="a folder of photos (+ captions) -> metadata.jsonl and images",
                             description=PREPARE_DESCRIPTION, epilog=PREPARE_EPILOG,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    prepare.add_argument("in_dir", type=Path, metavar="IN_DIR", help="the photos (any sub-folders) and their captions")
    prepare.add_argument("out_dir", type=Path, metavar="OUT_DIR",
                         help="new or empty folder, or one this command prepared before (it goes on)")
    prepare.add_argument("--domain", choices=("person", "pet"), required=True, help="what the photos show")
    prepare.add_argument("--word", help="the domain word in the captions (default: the domain, person or pet)")
    prepare.add_argument("--resolution", type=int_in(16, 8192, "an integer from 16 to 8192"), default=1024,
                         help="side of the square targets in pixels (default: 1024)")
    prepare.add_argument("--subject-size", type=int_in(16, 8192, "an integer from 16 to 8192"), default=512,
                         help="side of the aligned face crops (default: 512)")
    prepare.add_argument("--min-face", type=positive_int, default=64, metavar="PIXELS",
                         help="drop faces narrower than this in the photo (default: 64)")
    prepare.add_argument("--min-side", type=int_in(16, 1 << 30, "an integer of at least 16"), default=256,
                         metavar="PIXELS", help="skip photos whose short side is smaller (default: 256)")
    prepare.add_argument("--keep-largest-face", action="store_true",
                         help="with several faces, keep the largest (default: skip the photo)")
    prepare.add_argument("--keep-faces-without-eyes", action="store_true",
                         help="keep a face whose eyes are not found, cropped upright (default: skip the photo)")
    prepare.add_argument("--masks", metavar="DIR",
                         help="pets: masks named like the photos (white is the pet); the pet is put on white")
    prepare.add_argument("--caption-template", metavar="TEXT",
                         help="caption of photos without one, e.g. 'a photo of a {word}' (default: skip them)")
    prepare.add_argument("--caption-model", metavar="DIR",
                         help="a local transformers captioning model (e.g. BLIP, safetensors) for photos without a "
                              "caption; its captions are kept in OUT_DIR/generated-captions.jsonl")
    prepare.add_argument("--caption-prompt", metavar="TEXT",
                         help="text the model's captions continue, for conditional models (BLIP: 'a photography of')")
    prepare.add_argument("--caption-batch", type=positive_int, default=8, metavar="N",
                         help="photos per captioning batch (default: 8)")
    prepare.add_argument("--words", type=Path, metavar="FILE",
                         help="the words replaced by the domain word, one a line (default: the list in docs/data.md)")
    prepare.add_argument("--workers", type=positive_int, default=CORES,
                         help=f"processes (default: this machine's {CORES} cores)")
    prepare.add_argument("--strict", action="store_true",
                         help="stop at the first unreadable photo or unusable caption (default: skip and count it)")
    prepare.add_argument("--shards", action="store_true", help="also write OUT_DIR/shards/*.tar (WebDataset)")
    prepare.add_argument("--shard-size", type=positive_int, default=1000, metavar="N",
                         help="samples per shard (default: 1000)")
    prepare.add_argument("--no-progress", action="store_true", help="no progress bars")
    prepare.set_defaults(run=run_prepare)


def run_prepare(args: argparse.Namespace) -> int:
    from nested_attention_train.prepare import PrepareSettings, prepare, read_word_list
    from nested_attention_train.prepare.process import ERRORS
    from nested_attention_train.prepare.report import summary_lines

    settings = PrepareSettings(
        domain=args.domain, word=args.word, resolution=args.resolution, subject_size=args.subject_size,
        min_face=args.min_face, min_side=args.min_side, keep_largest_face=args.keep_largest_face,
        keep_faces_without_eyes=args.keep_faces_without_eyes,
        caption_template=args.caption_template,
        subject_words=read_word_list(args.words) if args.words else None, masks=args.masks,
        caption_model=args.caption_model, caption_prompt=args.caption_prompt,
    )
    report = prepare(args.in_dir, args.out_dir, settings, workers=args.workers, strict=args.strict,
                     shards=args.shards, shard_size=args.shard_size, progress=not args.no_progress,
                     caption_batch=args.caption_batch)
    for line in summary_lines(report):
        print(line)
    unusable = {reason: count for reason, count in report["skipped"].items() if reason in ERRORS}
    if unusable:
        counts = ", ".join(f"{reason}: {count}" for reason, count in unusable.items())
        total = sum(unusable.values())
        print(f"warning: {total} {'photo was an unusable input' if total == 1 else 'photos were unusable inputs'} "
              f"({counts}); report.json gives each one's reason (--strict stops at the first instead)", file=sys.stderr)
    print(f"wrote {args.out_dir / 'metadata.jsonl'} (report: {args.out_dir / 'report.json'})")
    return 0
