"""The build's adapter stages: per domain, training triplets of train identities (``triplets.py``), then the
project's trainer on the build's own pipeline and CLIP with the domain's installed recipe (``recipes/toy-<domain>.yaml``,
the one ``nested-attention train --config toy-<domain>`` uses), exported self-contained to ``adapters/<domain>``.

An interrupted adapter stage goes on from the trainer's last checkpoint (``adapter-runs/<domain>/checkpoints``); the
trainer resumes bit for bit on a CPU. The triplets are the build's to train on and are deleted once the adapter is
exported."""

from __future__ import annotations

import dataclasses
import shutil

from nested_attention import NestedAdapter
from nested_attention_train.config import load_config
from nested_attention_train.trainer import train

from .stages import Parts, Stage
from .triplets import write_triplets
from .world import DOMAINS

DATA, RUNS, ADAPTERS = "adapter-data", "adapter-runs", "adapters"


def _data_stage(domain: str):
    def run(parts: Parts) -> dict:
        folder = parts.out / DATA / domain
        shutil.rmtree(folder, ignore_errors=True)  # what an interrupted run left
        write_triplets(folder, domain, parts.size.adapter_triplets, seed=parts.seed + 600 + DOMAINS.index(domain),
                       workers=parts.workers)
        return {"triplets": parts.size.adapter_triplets}

    return run


def _adapter_stage(domain: str):
    def run(parts: Parts) -> dict:
        size, out = parts.size, parts.out
        run_dir = out / RUNS / domain
        overrides = [f"pretrained_model={out / 'pipeline'}", f"image_encoder={out / 'clip'}",
                     f"data={out / DATA / domain}", f"output_dir={run_dir}", f"max_steps={size.adapter_steps}",
                     f"seed={parts.seed}", f"num_workers={parts.workers}", "resume=latest"]
        config = load_config(f"toy-{domain}", overrides)
        changes = {"lr_warmup_steps": min(config.lr_warmup_steps, size.adapter_steps // 2),
                   "checkpoint_every": min(config.checkpoint_every, max(1, size.adapter_steps // 2))}
        if size.adapter_batch is not None:
            changes["train_batch_size"] = size.adapter_batch
        config = dataclasses.replace(config, **changes)
        parts.log(f"adapter {domain}: {size.adapter_steps} steps of {config.train_batch_size} on {config.data}")
        exported = train(config)
        adapter = NestedAdapter.from_pretrained(exported)
        target = out / ADAPTERS / domain
        shutil.rmtree(target, ignore_errors=True)
        adapter.save_pretrained(target, save_image_encoder=True)  # loads anywhere: the build's CLIP travels with it
        for leftover in (out / DATA / domain, run_dir):
            shutil.rmtree(leftover)
            if not any(leftover.parent.iterdir()):
                leftover.parent.rmdir()
        return {"steps": size.adapter_steps, "batch": config.train_batch_size}

    return run


ADAPTER_STAGES = tuple(
    stage for domain in DOMAINS
    for stage in (Stage(f"{domain}_triplets", _data_stage(domain)), Stage(f"{domain}_adapter", _adapter_stage(domain)))
)
