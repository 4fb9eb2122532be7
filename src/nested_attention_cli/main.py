"""Entry point of the `nested-attention` command: quiets library noise, dispatches sub-commands, reports errors."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from PIL import Image

from nested_attention import __version__
from nested_attention.errors import NestedAttentionError

NOISY_MODULES = r"(diffusers|transformers|huggingface_hub|accelerate|torch)(\.|$)"

DESCRIPTION = """\
Nested Attention (arXiv 2501.01407): put a subject from a few photos into the
images of a Stable Diffusion 1.5 or SDXL model, bound to one word of the prompt.
"""

EPILOG = """\
examples:
  nested-attention demo
  nested-attention toy build --out toy-build
  nested-attention data prepare --domain person photos/ my-triplets/
  nested-attention train --config configs/tiny-cpu.yaml data=my-triplets/
  nested-attention generate --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --adapter adapters/person --image me.jpg --prompt "a watercolor painting of a person"
  nested-attention evaluate --model toy --adapter toy-person --baseline \\
      --subjects subjects/ --prompts prompts.txt --lam 1 2 3 --out eval/
  nested-attention explain --model toy --adapter toy-person --image me.png \\
      --prompt "a photo of a person at the beach" --out explain/
  nested-attention ui                      # the web app, on the toy model
  nested-attention generate --help

Errors in the input are reported as one line starting with "error:" (exit code 2).
"""


def quiet_libraries() -> None:
    """Silence deprecation chatter, info logs and weight-loading bars of diffusers and transformers; keep errors.

    Must run before diffusers' pipelines are imported: importing them makes transformers warn about
    optional backends (torchvision) that nested attention does not need.
    """
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=NOISY_MODULES)
    # Pillow warns from 89 MP on; load_image refuses such images anyway (above 67 MP), in one clear sentence
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    import diffusers.utils.logging
    import transformers.utils.logging

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # one "Loading weights" bar per model component
    diffusers.utils.logging.set_verbosity_error()


class WarningLine(logging.Handler):
    """Prints the library's warnings (a prompt cut at the tokenizer's limit) as `warning: <message>` on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"warning: {record.getMessage()}", file=sys.stderr)  # sys.stderr at each call: tests capture it


def show_library_warnings() -> None:
    library = logging.getLogger("nested_attention")
    if not any(isinstance(handler, WarningLine) for handler in library.handlers):
        library.addHandler(WarningLine(level=logging.WARNING))


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with its `generate` and `demo` sub-commands."""
    # after quiet_libraries(): these import diffusers' pipelines
    from . import data, demo, evaluate, explain, generate, toy, ui

    parser = argparse.ArgumentParser(
        prog="nested-attention",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND", required=True)
    generate.add_parser(commands)
    demo.add_parser(commands)
    evaluate.add_parser(commands)
    explain.add_parser(commands)
    ui.add_parser(commands)
    toy.add_parser(commands)
    data.add_parser(commands)
    commands.add_parser("train", help="train an adapter on your triplets (nested-attention train --help)",
                        add_help=False)  # dispatched to nested_attention_train.main before parsing
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default: sys.argv[1:]); return the process exit code.

    Mistakes in the input (NestedAttentionError) print `error: <message>` on stderr and return 2, like
    argparse's own usage errors; anything else is a bug and propagates with its traceback.
    """
    quiet_libraries()
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        from nested_attention_train.trainer import main as train_main

        return train_main(argv[1:])
    show_library_warnings()
    try:
        if argv[:2] == ["toy", "experiment"]:  # its own parser (the experiments' list), like train's
            from nested_attention_eval.toy_experiments import main as experiment_main

            return experiment_main(argv[2:])
        args = build_parser().parse_args(argv)
        return args.run(args)
    except NestedAttentionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
