"""The toy build's last stage: the adapters it trained, scored by `toy eval` on held-out identities (seed 0) with the
build's own metric models and CLIP. It lives here, not in the toy package, because evaluation sits above the toy
world; `nested-attention toy build` adds it to the build's stages."""

from __future__ import annotations

import torch

from nested_attention import NestedAdapter
from nested_attention.sources import load_pipeline
from nested_attention_toy.adapter_stages import ADAPTERS
from nested_attention_toy.metric_models import FactorClassifier
from nested_attention_toy.stages import Parts, Stage
from nested_attention_toy.world import DOMAINS

from .scorers import ClipTextScorer
from .toy_eval import ToyEvalConfig, toy_eval

EVAL_FOLDER = "adapter-eval"


def evaluate_adapters(parts: Parts) -> dict:
    out, size = parts.out, parts.size
    pipe = load_pipeline(str(out / "pipeline"), torch.float32, parts.device)
    pipe.set_progress_bar_config(disable=True)
    adapters = {domain: NestedAdapter.from_pretrained(out / ADAPTERS / domain) for domain in DOMAINS}
    config = ToyEvalConfig(seed=0, identities=size.adapter_eval_identities, scenes=size.adapter_eval_scenes,
                           steps=size.sample_steps, guidance=size.guidance_scale)
    classifier = FactorClassifier.from_pretrained(out / "metrics" / "factor_classifier")
    metrics = toy_eval(pipe, adapters, out / EVAL_FOLDER, config, ClipTextScorer(str(out / "clip")), classifier,
                       progress=False, metrics=out / "metrics")
    parts.log(f"adapters: id_top1 {metrics['id_top1']:.3f} (base model {metrics['baseline_id_top1']:.3f}); "
              + ", ".join(f"{d} {metrics[d]['id_top1']:.3f}" for d in DOMAINS))
    return {"measured": metrics}


ADAPTER_EVAL_STAGE = Stage("adapter_evaluate", evaluate_adapters, "adapters")
