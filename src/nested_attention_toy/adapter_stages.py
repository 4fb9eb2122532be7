"""The build's adapter stages: per domain, training triplets of train identities (``triplets.py``); then one stage
that trains both adapters with the project's trainer on the build's own pipeline and CLIP, each with its domain's
installed recipe (``recipes/toy-<domain>.yaml``, the one ``nested-attention train --config toy-<domain>`` uses), and
exports them self-contained to ``adapters/<domain>``.

On a CPU with at least two cores (``workers``) the two adapters train side by side, each in its own process with half
of the cores, which on a small CPU gets more steps per second out of it than one training on every core (measured in
docs/toyworld.md). Elsewhere they train one after the other in this process.

An interrupted adapter stage goes on from each trainer's last checkpoint (``adapter-runs/<domain>/checkpoints``; an
adapter already exported is kept); the trainer resumes bit for bit on a CPU. The triplets are the build's to train on
and are deleted once their adapter is exported."""

from __future__ import annotations

import dataclasses
import shutil
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import torch

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


def _config(parts: Parts, domain: str, threads: int, loader_workers: int):
    size, out = parts.size, parts.out
    overrides = [f"pretrained_model={out / 'pipeline'}", f"image_encoder={out / 'clip'}",
                 f"data={out / DATA / domain}", f"output_dir={out / RUNS / domain}", f"max_steps={size.adapter_steps}",
                 f"seed={parts.seed}", f"num_workers={loader_workers}", "resume=latest"]
    config = load_config(f"toy-{domain}", overrides)
    changes = {"lr_warmup_steps": min(config.lr_warmup_steps, size.adapter_steps // 2),
               "checkpoint_every": min(config.checkpoint_every, max(1, size.adapter_steps // 2))}
    if size.adapter_batch is not None:
        changes["train_batch_size"] = size.adapter_batch
    return dataclasses.replace(config, **changes)


def _export(out, domain: str, exported) -> None:
    """The trained adapter, self-contained (the build's CLIP travels with it), to ``adapters/<domain>``; the domain's
    triplets and training run go."""
    adapter = NestedAdapter.from_pretrained(exported)
    target = out / ADAPTERS / domain
    shutil.rmtree(target, ignore_errors=True)
    adapter.save_pretrained(target, save_image_encoder=True)
    for leftover in (out / DATA / domain, out / RUNS / domain):
        shutil.rmtree(leftover)
        if not any(leftover.parent.iterdir()):
            leftover.parent.rmdir()


def _adapters_stage(parts: Parts) -> dict:
    todo = [d for d in DOMAINS if (parts.out / DATA / d).is_dir()]  # an exported adapter's triplets are gone
    side_by_side = parts.device == "cpu" and parts.workers >= 2 and len(todo) > 1
    threads = max(1, parts.workers // len(todo)) if side_by_side else parts.workers
    # side by side, the trainers take every core: their batches load in process (a sample's random draws depend on
    # its seed, epoch and index only, so the batches are the same), sparing each a spawned loader worker's imports
    loaders = 0 if side_by_side else threads
    configs = {d: _config(parts, d, threads, loaders) for d in todo}
    for domain, config in configs.items():
        parts.log(f"adapter {domain}: {config.max_steps} steps of {config.train_batch_size} on {config.data}")
    if side_by_side:
        parts.log(f"training the {' and '.join(todo)} adapters side by side, {threads} thread(s) each")
        with ProcessPoolExecutor(len(todo), mp_context=get_context("spawn"), initializer=torch.set_num_threads,
                                 initargs=(threads,)) as pool:
            running = {d: pool.submit(train, c) for d, c in configs.items()}
            exported = {d: job.result() for d, job in running.items()}
        for domain, folder in exported.items():
            _export(parts.out, domain, folder)
    else:
        for domain, config in configs.items():
            _export(parts.out, domain, train(config))
    batch = next(iter(configs.values())).train_batch_size if configs else parts.size.adapter_batch
    return {"steps": parts.size.adapter_steps, "batch": batch, "side_by_side": side_by_side, "threads_each": threads,
            "loader_workers": loaders}


ADAPTER_STAGES = (*(Stage(f"{domain}_triplets", _data_stage(domain)) for domain in DOMAINS),
                  Stage("adapters", _adapters_stage))
