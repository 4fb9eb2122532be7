"""`nested-attention ui`: the web app (Gradio), on the toy model and its adapters by default."""

from __future__ import annotations

import argparse
import os

from nested_attention.errors import NestedAttentionError

from .generate import RANDOM_ADAPTER, adapter_source, model_source
from .options import int_in, resolve_device, resolve_dtype

DESCRIPTION = """\
Start a local web app to personalize images in the browser: one panel per adapter
(upload images of the subject or pick a bundled example, the word, lambda), the
prompt checked as you type, and tabs to generate, compare with the base model and
a lambda sweep, and explain what nested attention does inside a layer."""

EPILOG = """\
examples:
  nested-attention ui                                   # the toy model, toy-person and toy-pet
  nested-attention ui --model stabilityai/stable-diffusion-xl-base-1.0 --adapter adapters/person
  nested-attention ui --host 0.0.0.0 --port 8080        # reachable from other machines
"""


def add_parser(commands) -> None:
    parser = commands.add_parser("ui", help="personalize in the browser (a local web app)", description=DESCRIPTION,
                                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="toy", metavar="PATH_OR_ID", help="the base pipeline (default: toy)")
    parser.add_argument("--adapter", action="append", default=[], metavar="PATH",
                        help="an adapter folder, hub id or shipped name; repeat for several subjects "
                             f"(default with --model toy: toy-person and toy-pet; '{RANDOM_ADAPTER}': untrained)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int_in(1, 65535, "a port from 1 to 65535"), default=7860, help="(default: 7860)")
    parser.add_argument("--prompt", default="", help="the prompt the app starts with")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto")
    parser.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local app
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise NestedAttentionError("The web UI needs Gradio: pip install 'nested-attention[ui]'.") from None
    from nested_attention_toy.examples import FOLDER
    from nested_attention_ui.app import build_app, bundled_examples, launch
    from nested_attention_ui.session import UISession

    source = model_source(args.model)
    toy = args.model == "toy"
    adapters = args.adapter or (["toy-person", "toy-pet"] if toy else [])
    if not adapters:
        raise NestedAttentionError(f"--model {args.model} needs at least one --adapter (a folder or hub id).")
    device = resolve_device(args.device)
    for adapter in adapters:  # a missing folder or unknown name in one sentence, before any model loads
        if adapter != RANDOM_ADAPTER:
            adapter_source(adapter)
    session = UISession(source, adapters, device, resolve_dtype(args.dtype, device))
    prompt = args.prompt or (f"a photo of a {session.trained_words[session.names[0]]} at the beach" if toy else "")
    app = build_app(session, bundled_examples(FOLDER) if toy else {}, toy=toy, prompt=prompt)
    print(f"nested-attention ui: http://{args.host}:{args.port} (Ctrl+C stops it)")
    launch(app, args.host, args.port)
    return 0
