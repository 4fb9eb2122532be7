"""`nested-attention toy diagnose encoder-oracle`: the adapter's recipe with a perfect subject encoder.

The CLIP image encoder and Q-Former are replaced by an oracle of the subject's identity: one token per identity
attribute, a learned embedding of the value that the build's identity network reads from the input view (it reads
held-out identities' input views without error), plus a learned position per token. Everything else is the shipped
adapter's: the per-layer nested projections, the installed recipe (`--config toy-<domain>`), the data and the steps;
then `toy eval --seed 0` scores it. Held-out identities are new combinations of attribute values the oracle has
embeddings for, so this is what the nested layers and the frozen base model make of an encoder that delivers the
identity perfectly: the bound of any image encoder trained with this recipe. Measured against the adapter itself, it
says whether the encoder or the rest is what holds the adapter back.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from nested_attention import NestedAdapter
from nested_attention.adapter import WEIGHTS_NAME
from nested_attention.errors import NestedAttentionError
from nested_attention_toy.assets import build_part, shipped_path
from nested_attention_toy.metric_models import IdentityNet
from nested_attention_toy.world import DOMAINS, attribute_names, attribute_values
from nested_attention_train.config import load_config
from nested_attention_train.models import load_adapter, load_base_model
from nested_attention_train.trainer import train

from .toy_eval import ToyEvalConfig, toy_eval
from .toy_scorers import load_toy_scoring, metrics_folder

NAME = "encoder-oracle"  # nested-attention toy diagnose NAME


class OracleEncoder(nn.Module):
    """Input view -> one token per identity attribute: the embedding of the value `identity` reads, plus a learned
    position, layer-normalized (the Q-Former's output is too)."""

    def __init__(self, image_encoder: nn.Module, processor, identity: IdentityNet, domain: str, width: int):
        super().__init__()
        self.image_encoder = image_encoder  # unused; the training step and the pipelines read its device and dtype
        self.names = attribute_names(domain)
        self.tables = nn.ModuleList(nn.Embedding(len(attribute_values(domain, n)), width) for n in self.names)
        self.query_tokens = nn.Parameter(torch.randn(1, len(self.names), width) * 0.02)
        self.norm = nn.LayerNorm(width)
        self.identity = identity.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(processor.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(processor.image_std).view(1, 3, 1, 1), persistent=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        images = ((pixel_values.float() * self.std + self.mean) * 255).round().clamp(0, 255).to(torch.uint8)
        with torch.no_grad():
            values = self.identity.predict(images)  # on the device the adapter (and so the network) is on
        tokens = torch.stack([table(values[n].to(pixel_values.device)) for table, n in zip(self.tables, self.names)], 1)
        return self.norm(tokens + self.query_tokens)


def _oracle_adapter(config, unet, metrics: Path, domain: str) -> NestedAdapter:
    adapter = load_adapter(config, unet)
    identity = IdentityNet.from_pretrained(metrics / f"identity_{domain}")
    adapter.encoder = OracleEncoder(adapter.encoder.image_encoder, adapter.image_processor, identity, domain,
                                    config.qformer_hidden_size)
    return adapter


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"nested-attention toy diagnose {NAME}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domain", choices=DOMAINS, default="person")
    parser.add_argument("--data", type=Path, default=None, help="training triplets (default: the recipe's, "
                        "data/toy-<domain>, written by nested-attention toy data --domain D --count 40000)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder of the training run and the evaluation (default: outputs/encoder-oracle-<domain>)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the recipe's)")
    parser.add_argument("--identities", type=int, default=20, help="held-out subjects scored (default: 20)")
    parser.add_argument("--model", default=str(shipped_path()), help="toy build folder (default: the shipped one)")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        raise NestedAttentionError(f"--steps is {args.steps}; expected at least 1 training step.")
    pipeline = build_part(args.model, "pipeline", "model_index.json")
    metrics = metrics_folder(build_part(pipeline.parent, "metrics", "metric_models.json"))
    clip = pipeline.parent / "clip"
    data = args.data or Path(load_config(f"toy-{args.domain}").data)
    out = args.out or Path(f"outputs/encoder-oracle-{args.domain}")
    if not (data / "metadata.jsonl").is_file():
        raise NestedAttentionError(f"--data {data} holds no metadata.jsonl; write triplets with nested-attention "
                                   f"toy data --out {data} --domain {args.domain} --count 40000.")
    overrides = [f"pretrained_model={pipeline}", f"image_encoder={clip}", f"data={data}",
                 f"output_dir={out / 'run'}", "resume=latest"]
    if args.steps is not None:
        overrides.append(f"max_steps={args.steps}")
    config = load_config(f"toy-{args.domain}", overrides)
    base = load_base_model(config)
    exported = train(config, encoder=_oracle_adapter(config, base.pipe.unet, metrics, args.domain).encoder)
    adapter = _oracle_adapter(config, base.pipe.unet, metrics, args.domain)
    adapter.load_adapter_state_dict(load_file(str(exported / WEIGHTS_NAME)), source=str(exported))
    adapter.eval()

    pipe, metrics, classifier, scorer = load_toy_scoring(pipeline)
    config = ToyEvalConfig(seed=0, identities=args.identities, scenes=0, domains=(args.domain,))
    results = toy_eval(pipe, {args.domain: adapter}, out / "eval", config, scorer, classifier, metrics=metrics)
    scored = results[args.domain]
    print(f"{args.domain} id_top1 with the oracle encoder: {scored['id_top1']:.3f} (base model "
          f"{scored['baseline_id_top1']:.3f}); attributes read: "
          + ", ".join(f"{n} {scored[f'attribute_{n}']:.2f}" for n in attribute_names(args.domain)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
