"""`nested-attention toy ship BUILD`: make a finished toy build the one the package names (``--model toy``,
``--adapter toy-person``, ``--adapter toy-pet``, the metric models every toy command scores with).

The build's pipeline, CLIP, metric models, record, log and sample sheet are copied into the package's ``weights/``
folder. The adapters are exported again without their copy of the CLIP vision tower, naming the installed toy CLIP
(``image_encoder: toy``) so that they load on any machine, with a model card that says how they were trained (the
installed recipe at the build's size) and what ``toy eval`` measured (each ``--eval`` folder's metrics at lambda 1 and
at the recipe's training lambda).
The new files are assembled next to ``weights/`` and swapped in at the end, so a failure leaves the old ones."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from nested_attention import NestedAdapter
from nested_attention.card import AdapterCard
from nested_attention.errors import NestedAttentionError
from nested_attention.paths import check_writable
from nested_attention_train.checkpoints import TrainState
from nested_attention_train.config import load_config
from nested_attention_train.trainer import card_training

from .adapter_stages import ADAPTERS
from .assets import MODEL_NAMES, SHIPPED
from .world import DOMAINS

COPIED = ("pipeline", "clip", "metrics", "build.json", "build.log", "samples.png")
SHIPPED_CLIP = "toy"  # the installed CLIP's registry name (assets.SOURCES), what the shipped adapters name


def _check(build: Path, evaluations: Sequence[Path]) -> tuple[dict, list[dict]]:
    """The build's record and each evaluation's metrics, once everything a ship needs is known to be there."""
    if not (build / "build.json").is_file():
        raise NestedAttentionError(f"{build} is not a finished toy build (no build.json; an unfinished one has "
                                   f"build.partial.json): finish it with nested-attention toy build --out {build} --resume.")
    missing = [part for part in (*COPIED, *(f"{ADAPTERS}/{d}" for d in DOMAINS)) if not (build / part).exists()]
    if missing:
        raise NestedAttentionError(f"{build} lacks {', '.join(missing)}: ship a build that ran every stage.")
    measured = []
    for folder in evaluations:
        if not (folder / "metrics.json").is_file():
            raise NestedAttentionError(f"--eval {folder} holds no metrics.json: give a folder `nested-attention toy "
                                       f"eval --out` wrote for this build.")
        scored = json.loads((folder / "metrics.json").read_text())
        if any("id_top1" not in scored.get(domain, {}) for domain in DOMAINS):
            raise NestedAttentionError(f"--eval {folder} did not score both adapters on single subjects; give a `toy "
                                       f"eval` run with both --domains and --contexts above 0.")
        measured.append(scored)
    return json.loads((build / "build.json").read_text()), measured


def training_rows(record: dict, domain: str) -> dict:
    """The model card's training table of a build's ``domain`` adapter: the installed recipe at the build's size."""
    size, adapters = record["size"], record["stages"]["adapters"]
    config = dataclasses.replace(load_config(f"toy-{domain}"), seed=record["seed"])
    state = TrainState(step=size["adapter_steps"])
    rows = card_training(config, size["adapter_triplets"], state, adapters["batch"], [])
    rows.pop("skipped samples")
    return rows | {"data": f"nested-attention toy build (its {domain} triplets, train identities only)"}


def metric_rows(metrics: dict, domain: str, trained_lambda: float = 1.0) -> dict:
    """Model-card rows of one ``toy eval`` metrics.json for ``domain``'s adapter: its lambda-1 results and, for an
    adapter trained at another lambda, its results at that lambda where the evaluation scored it."""
    seed, among = metrics["config"]["seed"], metrics["config"]["identities"]
    base = metrics[domain]["baseline_prompt_accuracy"]
    points = [(1.0, metrics[domain])]
    if trained_lambda != 1 and f"{trained_lambda:g}" in metrics.get("by_lambda", {}):
        points.append((trained_lambda, metrics["by_lambda"][f"{trained_lambda:g}"][domain]))
    rows = {}
    for lam, mine in points:
        rows[f"held-out id_top1 among {among} ({domain}) at lambda {lam:g}, toy eval --seed {seed}"] = round(mine["id_top1"], 4)
        if lam == 1:
            rows[f"the base model alone, --seed {seed}"] = round(metrics[domain]["baseline_id_top1"], 4)
        rows[f"prompt_accuracy at lambda {lam:g} (base model {base:.3f}), --seed {seed}"] = round(mine["prompt_accuracy"], 4)
    return rows


def ship(build: str | Path, evaluations: Sequence[str | Path] = (), target: str | Path = SHIPPED) -> Path:
    """Replace ``target`` (default: the installed package's ``weights/``) with the finished toy build in ``build``;
    ``evaluations``: ``toy eval`` output folders of that build's adapters, whose metrics go into the model cards.
    Returns ``target``."""
    build, target = Path(build), Path(target)
    evaluations = [Path(folder) for folder in evaluations]
    record, measured = _check(build, evaluations)
    check_writable(target.parent, "the installed toy package's folder")  # the new weights are staged beside the old
    staging, old = target.with_name(target.name + ".new"), target.with_name(target.name + ".old")
    for leftover in (staging, old):
        shutil.rmtree(leftover, ignore_errors=True)
    staging.mkdir(parents=True)
    for part in COPIED:
        (shutil.copytree if (build / part).is_dir() else shutil.copy2)(build / part, staging / part)
    for domain in DOMAINS:
        adapter = NestedAdapter.from_pretrained(build / ADAPTERS / domain)
        adapter.config = dataclasses.replace(adapter.config, image_encoder=SHIPPED_CLIP)
        trained_lambda = load_config(f"toy-{domain}").train_lambda
        metrics = {k: v for one in measured for k, v in metric_rows(one, domain, trained_lambda).items()}
        card = AdapterCard(base_model=next(iter(MODEL_NAMES)), training=training_rows(record, domain), metrics=metrics)
        adapter.save_pretrained(staging / ADAPTERS / domain, card=card)
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)
    return target
