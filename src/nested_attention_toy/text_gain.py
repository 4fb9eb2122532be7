"""Which prompt words a toy build's text encoder passes on: swap one factor's words in a prompt and measure how far
that moves the encoder's input embeddings and how far it moves its output states, the UNet's conditioning.

Nested attention writes into the subject word's value, so it can only show an identity that the denoiser can draw
from the text states. A frozen CLIP text tower trained contrastively keeps apart the words its vision tower could
tell apart and may squash the rest, whatever the captions say. Per context factor, and for the identity attributes
that described captions name:

- ``embedding``: the relative change ``|e(a) - e(b)| / |e(a)|`` of the input embeddings (token + position) when
  prompt ``a`` becomes prompt ``b``: how different the two prompts are as token sequences;
- ``text``: the same for the output states;
- ``gain``: ``text / embedding``; above 1 the encoder amplifies the difference, below 1 it squashes it.

``python -m nested_attention_toy.text_gain [--model DIR] [--pairs N] [--untrained]`` prints the table (about a
second). ``--model`` is a pipeline folder (its text encoder, the UNet's conditioning; default the shipped toy) or a
CLIP folder (its text tower: ``--model clip`` for the shipped toy CLIP, which the pipeline's text encoder starts from);
``--untrained`` measures the same architecture with random weights, the reference before any training.
"""

from __future__ import annotations

import numpy as np
import torch

from .text_image import tokenize
from .world import (
    CONTEXT_FACTORS,
    DOMAINS,
    FACTOR_NAMES,
    attribute_names,
    attribute_phrase,
    attribute_values,
    prompt,
    sample_context,
)

NAME = "text-gain"  # nested-attention toy diagnose NAME

ROWS = (*FACTOR_NAMES, *(f"{domain} attributes" for domain in DOMAINS))


def _other(rng: np.random.Generator, count: int, current: int, allowed=None) -> int:
    choices = [i for i in (range(count) if allowed is None else allowed) if i != current]
    return int(choices[int(rng.integers(len(choices)))])


def make_swaps(row: str, n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``n`` prompt pairs (a, b) for ``row`` (a context factor, or ``"<domain> attributes"``)."""
    if row not in ROWS:
        raise ValueError(f"row must be one of {', '.join(ROWS)}; got {row!r}")
    rng = np.random.default_rng([seed, ROWS.index(row)])
    prompts_a, prompts_b = [], []
    for i in range(n):
        domain = row.split()[0] if row.endswith("attributes") else DOMAINS[i % len(DOMAINS)]
        context = sample_context(rng, domain)
        other, descriptions = context, (None, None)
        if row in CONTEXT_FACTORS:
            values = CONTEXT_FACTORS[row]
            other = context.replace(**{row: values[_other(rng, len(values), context[row])]})
        else:
            names = [a for a in attribute_names(domain)
                     if sum(attribute_phrase(domain, a, v) is not None for v in attribute_values(domain, a)) >= 2]
            name = names[int(rng.integers(len(names)))]
            values = attribute_values(domain, name)
            named = [j for j, v in enumerate(values) if attribute_phrase(domain, name, v) is not None]
            current = named[int(rng.integers(len(named)))]  # values with words only (not "no glasses")
            descriptions = tuple(attribute_phrase(domain, name, values[v]) for v in (current, _other(rng, len(values), current, named)))
        # the same template for a and b: each draws it from a fresh generator of the same seed
        prompt_a, prompt_b = (prompt(domain, c, np.random.default_rng([seed, i]), description=d)
                              for c, d in zip((context, other), descriptions))
        prompts_a.append(prompt_a)
        prompts_b.append(prompt_b)
    return prompts_a, prompts_b


@torch.no_grad()
def text_change(tokenizer, text_encoder, prompts_a: list[str], prompts_b: list[str]) -> tuple[float, float]:
    """(output, embedding): mean relative change of the text encoder's output states and of its input embeddings
    (token + position) from ``prompts_a`` to ``prompts_b``."""
    out = [text_encoder(tokenize(tokenizer, p).to(text_encoder.device), output_hidden_states=True)
           for p in (prompts_a, prompts_b)]

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(((a - b).flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1)).mean())

    return rel(out[0].last_hidden_state, out[1].last_hidden_state), rel(out[0].hidden_states[0], out[1].hidden_states[0])


def text_gain(tokenizer, text_encoder, rows=ROWS, pairs: int = 64, seed: int = 0) -> dict[str, dict[str, float]]:
    """Per row: ``embedding``, ``text`` and ``gain`` (see the module docstring)."""
    results = {}
    for row in rows:
        text, embedding = text_change(tokenizer, text_encoder, *make_swaps(row, pairs, seed))
        results[row] = {"embedding": embedding, "text": text, "gain": text / embedding}
    return results


def main(argv: list[str] | None = None) -> int:
    """``python -m nested_attention_toy.text_gain [--model DIR] [--pairs N] [--untrained]``: which words the text
    encoder passes on to the denoiser."""
    import argparse
    import sys
    from pathlib import Path

    from transformers import CLIPTextModel, CLIPTokenizer

    from .assets import shipped_path

    parser = argparse.ArgumentParser(prog=f"nested-attention toy diagnose {NAME}", description=main.__doc__)
    parser.add_argument("--model", default=str(shipped_path("pipeline")),
                        help="a pipeline folder or a CLIP folder; 'clip' is the shipped toy CLIP (default: the shipped toy pipeline)")
    parser.add_argument("--pairs", type=int, default=64, help="prompt pairs per row (default: 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--untrained", action="store_true",
                        help="the same text encoder with fresh random weights (seed --seed): the reference before training")
    args = parser.parse_args(argv)
    folder = shipped_path("clip") if args.model == "clip" else Path(args.model)
    if not (folder / "text_encoder").is_dir() and not (folder / "config.json").is_file():
        print(f"error: --model expects a pipeline folder (with text_encoder/) or a CLIP folder (with config.json); "
              f"{folder} is neither. Give a toy build's pipeline/ or clip/ folder.", file=sys.stderr)
        return 2
    if args.pairs < 1:
        print(f"error: --pairs is {args.pairs}; expected at least 1.", file=sys.stderr)
        return 2
    pipeline = (folder / "text_encoder").is_dir()
    tokenizer = CLIPTokenizer.from_pretrained(folder, **({"subfolder": "tokenizer"} if pipeline else {}))
    text_encoder = CLIPTextModel.from_pretrained(folder, **({"subfolder": "text_encoder"} if pipeline else {}))
    text_encoder = text_encoder.float().eval()
    if args.untrained:
        torch.manual_seed(args.seed)
        text_encoder = CLIPTextModel(text_encoder.config).eval()
    print(f"{'swapped words':18s} {'embedding':>9s} {'text':>6s} {'gain':>6s}")
    for row, r in text_gain(tokenizer, text_encoder, pairs=args.pairs, seed=args.seed).items():
        print(f"{row:18s} {r['embedding']:9.2f} {r['text']:6.2f} {r['gain']:6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
