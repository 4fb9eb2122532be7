"""`nested-attention toy ...`: the toy world's commands (`toy build`, `toy data`, `toy eval`, `toy experiment`,
`toy diagnose`, `toy ship`)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from nested_attention.errors import NestedAttentionError

from .options import int_in, positive_int, resolve_device

# rendering is per-job seeded, so the renders do not depend on how many processes make them: use every core
WORKERS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

BUILD_DESCRIPTION = """\
Rebuild the toy world's whole stack from scratch: the CLIP-format tokenizer, a
tiny CLIPModel, an AutoencoderKL and a UNet2DConditionModel (saved together as
a standard StableDiffusionPipeline folder), and the metric models (identity
networks, prompt-factor classifier); then measure them on held-out identities.

build.json records every stage's wall time (the shipped build's is in
docs/toyworld.md). --smoke runs the same path at a tiny size in seconds.

An interrupted build (a crash, Ctrl-C, a time limit) goes on with --resume:
finished stages are kept and the UNet stage continues from its last saved
training state (every 400 steps), ending with the weights an uninterrupted
build gives.
"""

BUILD_EPILOG = """\
examples:
  nested-attention toy build --out toy-build
  nested-attention toy build --out /tmp/toy-smoke --smoke
  nested-attention toy build --out toy-build --reuse shipped   # retrain the text side only
  nested-attention toy build --out toy-build --reuse shipped --reuse-parts metrics   # and the VAE
  nested-attention toy build --out toy-build --resume   # go on after an interruption
  nested-attention toy build --out gpu-build --device cuda unet_batch=128 unet_steps=20000   # another recipe
"""


def add_parser(commands) -> None:
    """Register `toy` (with its `build` sub-command) on the top-level sub-command parsers."""
    toy = commands.add_parser("toy", help="the toy world: rebuild its models (toy build), training triplets (toy data), measure adapters (toy eval), diagnostics (toy diagnose), install a build (toy ship)",
                              description="The toy world of cartoon persons and pets with ground-truth identity.")
    sub = toy.add_subparsers(title="commands", dest="toy_command", metavar="COMMAND", required=True)
    build = sub.add_parser("build", help="rebuild the toy model stack from scratch", description=BUILD_DESCRIPTION,
                           epilog=BUILD_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    build.add_argument("--out", type=Path, required=True, metavar="DIR", help="new (or empty) folder for the build")
    build.add_argument("--smoke", action="store_true", help="tiny sizes: the whole path in about a minute")
    build.add_argument("--seed", type=int, help="the build seed (default: 0, what ships)")
    build.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="where to train (default: cuda when available)")
    build.add_argument("--workers", type=positive_int, default=WORKERS,
                       help=f"rendering processes (default: this machine's {WORKERS} cores)")
    build.add_argument("--reuse", metavar="DIR",
                       help="copy the metric models and VAE of an earlier build instead of training them (they never see "
                            "a caption); 'shipped' for the package's own")
    build.add_argument("--reuse-parts", nargs="+", choices=("metrics", "vae"), metavar="PART",
                       help="which parts --reuse copies: metrics, vae (default: both)")
    build.add_argument("--resume", action="store_true",
                       help="go on with the interrupted build in --out (with its own size, seed and --reuse)")
    build.add_argument("sizes", nargs="*", metavar="field=value",
                       help="change the recipe (a field of BuildSize in nested_attention_toy/recipe.py; values are YAML), "
                            "e.g. unet_steps=20000 unet_batch=128 unet_widths=[64,128,256]; recorded in build.json")
    build.set_defaults(run=run_build)

    data = sub.add_parser("data", help="write training triplets (input view -> prompt -> target) of train identities",
                          description="Write toy-world training triplets for `nested-attention train`: a folder with "
                                      "metadata.jsonl, subjects/ and targets/ (train identities only).",
                          epilog="example:\n  nested-attention toy data --out data/toy-person --domain person --count 50000",
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    data.add_argument("--out", type=Path, required=True, metavar="DIR", help="new (or empty) folder")
    data.add_argument("--domain", choices=("person", "pet"), required=True, help="which subjects")
    data.add_argument("--count", type=positive_int, required=True, metavar="N", help="number of triplets")
    data.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    data.add_argument("--subject-images", type=positive_int, default=1, metavar="K",
                      help="input views per triplet (default: 1)")
    data.add_argument("--identities", type=positive_int, metavar="N",
                      help="use at most N distinct identities (default: one per triplet)")
    data.add_argument("--size", type=int, choices=(64, 128), default=64, help="image size (default: 64)")
    data.add_argument("--workers", type=positive_int, default=WORKERS,
                      help=f"rendering processes (default: this machine's {WORKERS} cores)")
    data.set_defaults(run=run_data)

    evaluation = sub.add_parser(
        "eval", help="measure the shipped adapters on fresh held-out identities (metrics.json)",
        description="Render fresh held-out identities (never trained on) from --seed, generate them in random contexts "
                    "with the adapters, the base model alone and as real renders, and score identity (retrieval among "
                    "the --identities subjects, similarity), prompt-factor accuracy and CLIP-T with the toy metric "
                    "models. Writes DIR/metrics.json and DIR/samples.png.",
        epilog="example:\n  nested-attention toy eval --seed 1 --identities 20 --out toy-eval",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluation.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder")
    evaluation.add_argument("--seed", type=int, default=0, help="which held-out identities and contexts (default: 0)")
    evaluation.add_argument("--identities", type=positive_int, default=20, metavar="N", help="subjects per domain (default: 20)")
    evaluation.add_argument("--contexts", type=int_in(0, sys.maxsize, "0 or a positive integer"), default=4, metavar="K",
                            help="prompts per subject (default: 4; 0 scores the person + pet scenes alone)")
    evaluation.add_argument("--scenes", type=int, default=20, metavar="M", help="person + pet images (default: 20)")
    evaluation.add_argument("--lam", type=float, nargs="+", default=[1.0], metavar="L",
                            help="lambda (default: 1, the trained model); several (e.g. 1 2 3 4) also plot the "
                                 "identity / prompt trade-off, tradeoff.png")
    evaluation.add_argument("--scale", type=float, nargs="+", metavar="S",
                            help="the adapters' strength from 0 to 1 (default: as trained); several (e.g. 0.5 0.75 1) "
                                 "plot the trade-off of a decoupled adapter, whose knob it is")
    evaluation.add_argument("--domains", nargs="+", choices=("person", "pet"), default=["person", "pet"],
                            metavar="DOMAIN", help="which subjects (default: person pet; one alone needs --scenes 0)")
    evaluation.add_argument("--views", type=positive_int, default=1, metavar="K",
                            help="input views per subject, all given to the adapters (default: 1)")
    evaluation.add_argument("--steps", type=positive_int, default=20, metavar="N", help="denoising steps (default: 20)")
    evaluation.add_argument("--guidance", type=float, default=5.0, metavar="SCALE", help="guidance scale (default: 5)")
    evaluation.add_argument("--adapter-person", default="toy-person", metavar="PATH", help="default: the shipped toy-person")
    evaluation.add_argument("--adapter-pet", default="toy-pet", metavar="PATH", help="default: the shipped toy-pet")
    evaluation.add_argument("--model", default="toy", metavar="PATH", help="base pipeline (default: the shipped toy model)")
    evaluation.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu", help="default: cpu")
    evaluation.set_defaults(run=run_eval)

    ship = sub.add_parser(
        "ship", help="make a finished toy build the one the package names (--model toy, --adapter toy-person, ...)",
        description="Replace the installed package's toy weights (pipeline, CLIP, metric models, adapters, build "
                    "record) with a finished build's. The adapters are exported naming the installed toy CLIP, with "
                    "model cards that give their training and each --eval folder's metrics at lambda 1 and at the "
                    "recipe's training lambda (where that folder scored it).",
        epilog="example:\n  nested-attention toy build --out toy-build\n"
               "  nested-attention toy eval --seed 1 --lam 1 2 --out toy-eval-1 --model toy-build/pipeline "
               "--adapter-person toy-build/adapters/person --adapter-pet toy-build/adapters/pet\n"
               "  nested-attention toy ship toy-build --eval toy-build/adapter-eval toy-eval-1",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ship.add_argument("build", type=Path, metavar="BUILD", help="the folder `toy build --out` wrote")
    ship.add_argument("--eval", type=Path, nargs="+", default=[], metavar="DIR",
                      help="`toy eval --out` folders of this build's adapters (the build's own is BUILD/adapter-eval)")
    ship.set_defaults(run=run_ship)

    sub.add_parser("experiment", add_help=False,  # dispatched to nested_attention_eval.toy_experiments before parsing
                   help="the paper's experiments on the toy world: train the arms, score them, tabulate and plot "
                        "(nested-attention toy experiment --help)")

    lines = "\n".join(f"  {name:10s} {summary}" for name, (_, summary) in DIAGNOSTICS.items())
    diagnose = sub.add_parser(
        "diagnose", help="measure what a toy build can do (fine-tuning bound, latents, named attributes, ...)",
        description=f"Diagnostics of a toy build (default: the shipped one; --model DIR for another). Each takes its "
                    f"own options: nested-attention toy diagnose NAME --help.\n\ndiagnostics:\n{lines}",
        epilog="examples:\n  nested-attention toy diagnose bound --domain pet --model toy-build\n"
               "  nested-attention toy diagnose latents --model toy-build",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    diagnose.add_argument("name", choices=DIAGNOSTICS, metavar="NAME", help="which diagnostic (listed above)")
    diagnose.add_argument("options", nargs=argparse.REMAINDER, help="the diagnostic's own options")
    diagnose.set_defaults(run=run_diagnose)


# name -> (module with main(argv) -> exit code, what it measures)
DIAGNOSTICS = {
    "bound": ("nested_attention_eval.toy_upper_bound",
              "identity of a UNet fine-tuned on one held-out subject (or a person + pet pair): the bound of every "
              "frozen-UNet method"),
    "named": ("nested_attention_eval.toy_named", "how often the base model draws an attribute its prompt names"),
    "encoder-oracle": ("nested_attention_eval.toy_oracle_encoder",
                       "the adapter's recipe with a perfect encoder (the subject's true attributes): the encoder's bound"),
    "latents": ("nested_attention_toy.latent_check", "what the VAE's latents keep: factors and identity after a round trip"),
    "text-gain": ("nested_attention_toy.text_gain", "which prompt words the text encoder passes on to the denoiser"),
    "grounding": ("nested_attention_toy.grounding", "the subject word's attention on the subject's pixels, at lambda 1 and 4"),
    "report": ("nested_attention_toy.report", "a build's measurements as markdown tables (build.json)"),
}


def run_diagnose(args: argparse.Namespace) -> int:
    import importlib

    return importlib.import_module(DIAGNOSTICS[args.name][0]).main(args.options) or 0


def run_eval(args: argparse.Namespace) -> int:
    import torch

    from nested_attention.adapter import NestedAdapter
    from nested_attention_eval.scorers import ClipTextScorer, prompt_scorer
    from nested_attention_eval.toy_eval import ToyEvalConfig, check_config, toy_eval
    from nested_attention_eval.toy_scorers import metrics_beside, metrics_folder
    from nested_attention_toy.metric_models import FactorClassifier

    from .generate import RANDOM_ADAPTER, adapter_source, load_pipeline, model_source, random_adapter

    if any(not lam > 0 for lam in args.lam) or len(set(args.lam)) < len(args.lam):
        shown = " ".join(f"{lam:g}" for lam in args.lam)
        raise NestedAttentionError(f"--lam is {shown}; expected distinct positive numbers (1 = the trained model).")
    if args.identities < 2:
        raise NestedAttentionError(f"--identities is {args.identities}; identity is scored by retrieval among the "
                                   f"subjects, which needs at least 2 (20, the default, gives chance 0.05).")
    from nested_attention_toy.world import DOMAINS, side_size

    most = min(side_size(domain, held_out=True) for domain in DOMAINS)
    if args.identities > most:
        raise NestedAttentionError(f"--identities is {args.identities}; the held-out side of the split has {most} "
                                   f"identities in its smaller domain, so at most {most}.")
    if args.scale is not None and (any(not 0 <= s <= 1 for s in args.scale) or len(set(args.scale)) < len(args.scale)):
        shown = " ".join(f"{s:g}" for s in args.scale)
        raise NestedAttentionError(f"--scale is {shown}; expected distinct strengths from 0 to 1 (1 = as trained).")
    if args.scenes < 0:
        raise NestedAttentionError(f"--scenes is {args.scenes}; expected 0 or more.")
    if args.out.exists() and not args.out.is_dir():
        raise NestedAttentionError(f"--out {args.out} is a file; give a folder.")
    config = ToyEvalConfig(seed=args.seed, identities=args.identities, contexts=args.contexts, scenes=args.scenes,
                           lams=tuple(args.lam), scales=None if args.scale is None else tuple(args.scale),
                           domains=tuple(dict.fromkeys(args.domains)), views=args.views, steps=args.steps,
                           guidance=args.guidance)
    check_config(config)  # before the models load
    given = {d: a for d, a in (("person", args.adapter_person), ("pet", args.adapter_pet)) if d in args.domains}
    adapters = {d: None if a == RANDOM_ADAPTER else NestedAdapter.from_pretrained(adapter_source(a)) for d, a in given.items()}
    device = resolve_device(args.device)
    model = model_source(args.model)
    pipe = load_pipeline(model, device, torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for seed, domain in enumerate(adapters):
        if adapters[domain] is None:
            print(f"note: --adapter-{domain} random is untrained: it checks the plumbing, it carries no identity.", file=sys.stderr)
            adapters[domain] = random_adapter(pipe.unet, seed=seed, word=domain)
    # a build's own metric models and CLIP score its pipeline; the shipped ones score the shipped model
    metric_models = metrics_beside(Path(model)) or metrics_folder()
    clip = Path(model).parent / "clip"
    classifier = FactorClassifier.from_pretrained(metric_models / "factor_classifier")
    scorer = ClipTextScorer(str(clip)) if (clip / "config.json").is_file() else prompt_scorer("toy-clip")
    pinned = {"model": model, "adapters": given}  # a resumed --out folder must hold images of these
    metrics = toy_eval(pipe, adapters, args.out, config, scorer, classifier, metrics=metric_models, pinned=pinned)
    keys = ("id_top1", "id_similarity", "prompt_accuracy", "clip_t") if args.contexts else ()
    if args.scenes:
        keys += ("scene_person_top1", "scene_pet_top1", "scene_both_top1", "scene_leakage")
    shown = lambda scores, prefix="": ", ".join(  # noqa: E731
        f"{k} {'n/a' if scores[prefix + k] is None else format(scores[prefix + k], '.3f')}" for k in keys)
    for prefix, label in (("", "adapters"), ("baseline_", "base model"), ("oracle_", "real renders")):
        print(f"{label:>12}: " + shown(metrics, prefix))
    for knob, name in (("by_lambda", "lambda"), ("by_scale", "scale")):
        for value, scored in metrics.get(knob, {}).items():
            print(f"{name} {value:>4}: " + shown(scored))
    plot = f", {args.out / 'tradeoff.png'}" if (args.out / "tradeoff.png").is_file() else ""
    print(f"wrote {args.out / 'metrics.json'}{plot} and {args.out / 'samples.png'}")
    return 0


def run_data(args: argparse.Namespace) -> int:
    from nested_attention_toy.triplets import write_triplets

    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise NestedAttentionError(f"--out {args.out} exists and is not an empty folder; give a new folder.")
    from nested_attention_toy.world import side_size

    available = side_size(args.domain, held_out=False)
    if args.identities is not None and not 1 <= args.identities <= available:
        raise NestedAttentionError(f"--identities must be between 1 and {available} (the {args.domain} training "
                                   f"identities); got {args.identities}.")
    path = write_triplets(args.out, args.domain, args.count, seed=args.seed, size=args.size,
                          subject_images=args.subject_images, identities=args.identities, workers=args.workers)
    print(f"wrote {args.count} {args.domain} triplets: {path}")
    return 0


def run_ship(args: argparse.Namespace) -> int:
    from nested_attention_toy.ship import ship

    print(f"shipped {args.build} to {ship(args.build, args.eval)}")
    return 0


def run_build(args: argparse.Namespace) -> int:
    import torch

    from nested_attention_eval.toy_build_stage import ADAPTER_EVAL_STAGE
    from nested_attention_toy.build import FULL, SMOKE, build

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise NestedAttentionError("--device cuda was asked for, but torch sees no CUDA GPU; use --device cpu.")
    command = "nested-attention " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["toy"] else None
    if args.resume:
        given = [flag for flag, value in (("--smoke", args.smoke), ("--seed", args.seed is not None),
                                           ("--reuse", args.reuse), ("--reuse-parts", args.reuse_parts),
                                           (" ".join(args.sizes), args.sizes)) if value]
        if given:
            raise NestedAttentionError(f"--resume goes on with the build's own settings; drop {', '.join(given)}.")
        record = build(args.out, device=device, workers=args.workers, command=command, resume=True,
                       extra_stages=(ADAPTER_EVAL_STAGE,))
        return _built(args.out, record)
    if args.reuse_parts and args.reuse is None:
        raise NestedAttentionError("--reuse-parts names what to copy from the --reuse folder; give --reuse DIR too.")
    reuse = None
    if args.reuse is not None:
        from nested_attention_toy.assets import shipped_path

        reuse = shipped_path() if args.reuse == "shipped" else Path(args.reuse)
    size = build_size(SMOKE if args.smoke else FULL, args.sizes)
    kwargs = {"reuse_parts": tuple(args.reuse_parts)} if args.reuse_parts else {}
    record = build(args.out, size, seed=args.seed or 0, device=device, workers=args.workers, command=command,
                   reuse=reuse, extra_stages=(ADAPTER_EVAL_STAGE,), **kwargs)
    return _built(args.out, record)


FRACTIONS = ("describe_rate", "grounding_target")  # BuildSize fields that are fractions


def build_size(base, items: list[str]):
    """``base`` (a BuildSize) with the command line's ``field=value`` changes, each checked."""
    import dataclasses

    from nested_attention_toy.recipe import BuildSize
    from nested_attention_train.config import parse_overrides

    values = parse_overrides(items, BuildSize, "toy build size")
    for name, value in values.items():
        if isinstance(value, tuple):
            if not value or any(width < 16 or width % 16 for width in value):
                raise NestedAttentionError(f"`{name}` must list widths that are multiples of 16 (the UNet's group "
                                           f"norm has 16 groups); got {list(value)}.")
        elif isinstance(value, int) and value < 1:
            raise NestedAttentionError(f"`{name}` must be at least 1; got {value}.")
        elif isinstance(value, float) and not (0 <= value <= 1 if name in FRACTIONS else value >= 0):
            bound = "between 0 and 1" if name in FRACTIONS else "at least 0"
            raise NestedAttentionError(f"`{name}` must be {bound}; got {value}.")
    return dataclasses.replace(base, **values)


def _built(out: Path, record: dict) -> int:
    print(f"wrote {out} ({record['bytes']['total'] / 2**20:.1f} MiB of weights) in {record['seconds'] / 60:.1f} min; "
          f"measurements in {out / 'build.json'}, samples in {out / 'samples.png'}")
    return 0
