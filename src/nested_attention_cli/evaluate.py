"""`nested-attention evaluate`: generate and score a grid of subjects x prompts x lambdas x seeds for one or more
adapters (and the base model), then write records.jsonl, summary.csv, tradeoff.png and index.html."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nested_attention.errors import NestedAttentionError
from nested_attention.paths import check_writable

from .generate import RANDOM_ADAPTER, RANDOM_ADAPTER_WORD, adapter_source, load_pipeline, model_source, random_adapter
from .options import (
    MAX_STEPS,
    finite_float,
    guidance_scale,
    positive_int,
    resolve_device,
    resolve_dtype,
    seed_value,
    step_count,
    subject_word,
)

DESCRIPTION = """\
Measure identity and prompt alignment of Nested Attention adapters.

For every adapter (and, with --baseline, the base model alone), every subject
of --subjects, every prompt, lambda and seed: generate one image, score it, and
append its record to DIR/records.jsonl. Run the same command again to resume:
images and records already there are kept.

Subjects: a folder with one sub-folder per subject (its name is the identity
label; its images are the adapter's input and the identity reference), or a
folder of images, one subject each. Prompts: a text file, one per line; write
{word} where the subject goes (filled with each adapter's word), or the word.

Scores (pluggable):
  --identity    onnx:FILE (face recognition, onnxruntime), clip:DIR, dino:DIR,
                hf:DIR (any transformers vision model), toy, toy-person, toy-pet
  --prompt-score clip:DIR (CLIP-T with any transformers CLIP), toy (prompt-
                factor accuracy), toy-clip (CLIP-T with the toy CLIP)
With --model toy both default to the toy world's metric models.
"""

EPILOG = """\
examples:
  nested-attention evaluate --model toy --adapter toy-person --baseline \\
      --subjects my-subjects/ --prompts prompts.txt --lam 1 2 3 --seeds 0 1 --out eval/

  nested-attention evaluate --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --adapter phase1=runs/p1/adapter --adapter phase2=runs/p2/adapter \\
      --subjects faces/ --prompts prompts.txt --identity onnx:arcface.onnx \\
      --prompt-score clip:openai/clip-vit-large-patch14 --out eval-faces/
"""


def add_parser(commands) -> None:
    parser = commands.add_parser("evaluate", help="score identity and prompt alignment of adapters",
                                 description=DESCRIPTION, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, metavar="NAME_OR_PATH",
                        help="the base pipeline: toy, a diffusers folder, or a hub id")
    parser.add_argument("--adapter", action="append", default=[], metavar="[NAME=]PATH",
                        help="an adapter folder or shipped name (toy-person, toy-pet); repeat to compare several")
    parser.add_argument("--word", type=subject_word,
                        help="the subject word for every setting (default: each adapter's own)")
    parser.add_argument("--baseline", action="store_true", help="also the base model without adapter")
    parser.add_argument("--subjects", type=Path, required=True, metavar="DIR", help="subject images (see above)")
    parser.add_argument("--prompts", type=Path, required=True, metavar="FILE", help="one prompt per line")
    parser.add_argument("--lam", type=finite_float(0, "a positive number", above=True), nargs="+", default=[1.0],
                        metavar="L", help="lambda values (default: 1)")
    parser.add_argument("--scale", type=finite_float(0, "a strength from 0 to 1"), nargs="+", metavar="S",
                        help="the adapters' strengths, 0 (the base model) to 1 (as trained, the default): a decoupled "
                             "adapter's knob, like IP-Adapter's scale")
    parser.add_argument("--seeds", type=seed_value, nargs="+", default=[0], metavar="S", help="seeds (default: 0)")
    parser.add_argument("--identity", metavar="KIND[:PATH]", help="identity scorer (see above)")
    parser.add_argument("--prompt-score", action="append", default=[], metavar="KIND[:PATH]",
                        help="prompt-alignment scorer; repeat for several (see above)")
    parser.add_argument("--steps", type=step_count, default=30, metavar="N",
                        help=f"denoising steps, at most {MAX_STEPS} (default: 30)")
    parser.add_argument("--guidance", type=guidance_scale, default=5.0, metavar="SCALE",
                        help="guidance scale (default: 5)")
    parser.add_argument("--batch-size", type=positive_int, default=8, metavar="N", help="images per batch (default: 8)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto")
    parser.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (resumed if it exists)")
    parser.add_argument("--card", action="store_true",
                        help="add the measured summary to each --adapter folder's model card (README.md)")
    parser.set_defaults(run=run)


def parse_adapter(text: str) -> tuple[str, str]:
    """``NAME=PATH`` or ``PATH`` (named by itself) -> (name, path)."""
    name, sep, path = text.partition("=")
    if not sep:
        return text, text
    if not name or not path:
        raise NestedAttentionError(f"--adapter {text!r}: expected PATH or NAME=PATH.")
    return name, path


def run(args: argparse.Namespace) -> int:
    from nested_attention.adapter import NestedAdapter
    from nested_attention.card import add_metrics
    from nested_attention.images import load_image
    from nested_attention_eval.harness import Evaluator, Plan, Setting, fill_word, load_subjects, read_prompts
    from nested_attention_eval.report import card_metrics, write_reports
    from nested_attention_eval.scorers import identity_embedder, prompt_scorer

    if not args.adapter and not args.baseline:
        raise NestedAttentionError("Nothing to evaluate: give at least one --adapter, or --baseline for the base model.")
    if args.out.exists() and not args.out.is_dir():
        raise NestedAttentionError(f"--out {args.out} is a file; give a folder.")
    check_writable(args.out, "--out")
    subject_files = load_subjects(args.subjects)
    prompts = read_prompts(args.prompts)
    named = [parse_adapter(a) for a in args.adapter]
    if args.card:
        not_folders = [path for _, path in named if not Path(path).is_dir()]
        if not_folders:
            raise NestedAttentionError(
                f"--card writes into adapter folders, and --adapter {not_folders[0]} is not one (a shipped or random "
                f"adapter); copy the adapter to a folder first, or leave out --card."
            )
    source = model_source(args.model)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    adapters = []
    for name, path in named:
        if path == RANDOM_ADAPTER:
            print(f"note: --adapter {RANDOM_ADAPTER} is untrained: it checks the plumbing, it carries no identity.",
                  file=sys.stderr)
            adapters.append((name, None))
        else:
            adapters.append((name, NestedAdapter.from_pretrained(adapter_source(path))))
    words = [args.word or (a.config.word if a is not None else RANDOM_ADAPTER_WORD) for _, a in adapters]
    base_word = args.word or (words[0] if words else RANDOM_ADAPTER_WORD)
    bound = [(name, word) for (name, _), word in zip(adapters, words)] + ([("base model", base_word)] if args.baseline else [])
    for name, word in bound:  # before any model is loaded
        for prompt in prompts:
            fill_word(prompt, word, name)
    identity_spec = args.identity or ("toy" if args.model == "toy" else None)
    prompt_specs = args.prompt_score or (["toy", "toy-clip"] if args.model == "toy" else [])
    identity = identity_embedder(identity_spec, word=words[0] if words else base_word) if identity_spec else None
    scorers = [prompt_scorer(spec) for spec in prompt_specs]
    if identity is None:
        print("note: no --identity scorer: identity is not measured.", file=sys.stderr)
    if not scorers:
        print("note: no --prompt-score: prompt alignment is not measured.", file=sys.stderr)
    subjects = {label: [load_image(f) for f in files] for label, files in subject_files.items()}

    pipe = load_pipeline(source, device, dtype)
    pipe.set_progress_bar_config(disable=True)
    settings = []
    for (name, adapter), word, seed in zip(adapters, words, range(len(adapters))):
        settings.append(Setting(name, word, adapter if adapter is not None else random_adapter(pipe.unet, seed=seed, word=word)))
    if args.baseline:
        settings.append(Setting("base model", base_word))
    plan = Plan(settings, subjects, prompts, lams=args.lam, seeds=args.seeds, scales=args.scale)
    evaluator = Evaluator(pipe, args.out, identity=identity, prompt_scorers=scorers, steps=args.steps,
                          guidance=args.guidance, batch_size=args.batch_size,
                          pinned={"model": source, "adapters": dict(named)})  # what a resumed --out must hold
    records = evaluator.run(plan)
    written = write_reports(records, args.out)
    for kind, path in written.items():
        print(f"{kind}: {path}")
    if args.card:
        for name, path in named:
            print(f"card: {add_metrics(path, card_metrics(records, name, args.subjects.name))}")
    return 0
