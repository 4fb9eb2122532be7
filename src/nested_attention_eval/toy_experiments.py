"""`nested-attention toy experiment NAME`: the paper's experiments on the toy world, each one command.

An experiment is a set of *arms*: adapters trained by one recipe (`toy-<domain>` at lambda 1, train identities only)
that differ in one thing, a few config fields (the mechanism, the alpha of the regularization, ...) or the number of
input views they are given. Each arm is trained with the same data, steps and seed, then scored by `toy eval` on held-out
identities of its domain at every point of its knob (lambda where its mechanism has one, the strength for a
decoupled adapter) and for each evaluation seed (other held-out identities and contexts). The runner writes, in
``--out``:

- ``<run>/``: a training run (``adapter/``, checkpoints, ``timing.json``) and its evaluations' images and records,
  ``eval-<seed>/`` (and ``eval-<seed>-<k>-views/``, ``scenes-eval-<seed>/``). Arms of one training config share one
  run, across experiments too: the mechanisms experiment's ``nested`` arm is the alpha experiment's ``alpha-2``, the
  queries experiment's ``4-tokens``, the views experiment's ``1-view`` and the scenes experiment's person adapter;
- ``scores/<experiment>/``: each arm's metrics per seed, as that experiment scored them;
- ``<experiment>.json``: per arm and knob point, the mean, spread and values over the seeds of ``id_top1``,
  ``id_similarity``, ``prompt_accuracy`` and ``clip_t``; the base model's; each arm's training budget;
- ``<experiment>.md``: the same as tables; ``<experiment>.png``: identity against prompt following, a curve per arm.

The scenes experiment (Fig. 12) trains each arm once per domain (``<run>/`` for persons, ``<run>-pet/`` for pets,
each on its own domain alone) and scores both adapters together, each bound to its word, on person + pet images
only: each subject's identity, both, the colour leakage between them and CLIP-T (`toy_eval.summarize_toy`).

Everything is resumable: a finished training run or evaluation is reused (only with the same config), an interrupted
one goes on. Arms can be split between processes (``--arms``), e.g. two trainings side by side at one thread each on
a 2-core machine; the last process to finish writes the report over every arm that is done.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml

from nested_attention import NestedAdapter
from nested_attention.adapter import WEIGHTS_NAME
from nested_attention.config import MECHANISMS
from nested_attention.errors import NestedAttentionError
from nested_attention.mechanisms import mechanism
from nested_attention_toy.assets import shipped_path
from nested_attention_toy.world import DOMAINS
from nested_attention_train.config import load_config
from nested_attention_train.trainer import train

from .experiment_report import METRICS, SCENE_METRICS, write_results
from .toy_eval import ToyEvalConfig, toy_eval
from .toy_scorers import load_toy_scoring

LAMS = (1.0, 1.5, 2.0, 2.5, 3.0, 4.0)  # paper Fig. 10's lambda values
SCALES = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # a decoupled adapter's strengths (IP-Adapter's scale)


@dataclass(frozen=True)
class Arm:
    name: str  # its curve's label
    overrides: tuple[str, ...] = ()  # training config fields, "field=value", on top of the recipe
    run: str | None = None  # the training run's folder (default: the name); arms of one config share one
    views: int = 1  # input views of each held-out subject given to the adapter

    @property
    def folder(self) -> str:
        return self.run or self.name

    def folder_of(self, experiment: Experiment, domain: str) -> str:
        """The training run of the arm's adapter for ``domain``: its folder for the experiment's first domain, with
        the domain appended for the others (a scenes arm's pet adapter)."""
        return self.folder if domain == experiment.domains[0] else f"{self.folder}-{domain}"

    def evaluation(self, seed: int) -> str:
        return f"eval-{seed}" if self.views == 1 else f"eval-{seed}-{self.views}-views"


@dataclass(frozen=True)
class Experiment:
    name: str
    figure: str  # the paper's figure it reproduces
    claim: str  # what the paper claims, which the experiment tests
    arms: tuple[Arm, ...]
    domains: tuple[str, ...] = ("person",)  # one: its subjects alone; person and pet: person + pet scenes alone
    lams: tuple[float, ...] = LAMS  # an arm's lambdas, where its mechanism has lambda

    @property
    def scenes(self) -> bool:
        return len(self.domains) > 1

    @property
    def metrics(self) -> tuple[str, ...]:
        return SCENE_METRICS if self.scenes else METRICS


EXPERIMENTS = {e.name: e for e in (
    Experiment(
        "mechanisms", "Fig. 10",
        "With the same encoder, data and compute, nested attention gives a better identity-prompt trade-off than "
        "decoupled cross-attention (IP-Adapter), a simple adapter, Global V and multiple tokens.",
        tuple(Arm(name, (f"mechanism={name}",)) for name in MECHANISMS)),
    Experiment(
        "alpha", "Fig. 17",
        "The regularization of the subject value's norm (alpha) keeps prompt following; without it the subject "
        "token dominates.",
        (Arm("alpha-none", ("alpha=null",)), Arm("alpha-1", ("alpha=1",)), Arm("alpha-2", ("alpha=2",), run="nested"),
         Arm("alpha-3", ("alpha=3",)))),
    Experiment(
        "queries", "Fig. 18",
        "More encoder tokens (learned queries) carry identity better. The paper uses 16 to 1024 Q-Former queries on "
        "257 CLIP tokens; the toy recipe reads 4 tokens from 65, so its arms are 4, 16 and 64.",
        (Arm("4-tokens", ("num_queries=4",), run="nested"), Arm("16-tokens", ("num_queries=16",)),
         Arm("64-tokens", ("num_queries=64",)))),
    Experiment(
        "views", "Fig. 13",
        "Several input images of a subject, combined at inference with no retraining, carry its identity better "
        "than one.",
        tuple(Arm(f"{k}-view{'s' if k > 1 else ''}", ("mechanism=nested",), run="nested", views=k) for k in (1, 2, 4)),
        lams=(1.0,)),
    Experiment(
        "scenes", "Fig. 12",
        "With a person and a pet in one image, each adapter bound to its word and trained on its domain alone, "
        "nested attention keeps both identities better than decoupled cross-attention (IP-Adapter), whose injected "
        "features reach the whole image rather than its subject's region: so the subjects' looks mix.",
        (Arm("nested", ("mechanism=nested",)), Arm("decoupled", ("mechanism=decoupled",))),
        domains=DOMAINS),
)}


@dataclass
class RunConfig:
    out: Path
    seeds: tuple[int, ...] = (0, 1, 2)  # evaluation seeds: other held-out identities and contexts each
    identities: int = 20
    contexts: int = 4
    scenes: int = 40  # person + pet images per seed, in an experiment of scenes
    steps: int | None = None  # training steps (None: the recipe's)
    data: str | None = None  # training triplets (None: the recipe's)
    model: str | None = None  # a toy build (None: the shipped one, which the recipe names)


def arm_config(experiment: Experiment, arm: Arm, run: RunConfig, domain: str | None = None):
    """The arm's training config for ``domain`` (default: the experiment's first): the domain's recipe trained at
    lambda 1 (as the paper trains, and the only lambda the mechanisms without one allow), the arm's fields, and the
    run's shared ones."""
    domain = domain or experiment.domains[0]
    overrides = ["train_lambda=1", *arm.overrides, f"output_dir={run.out / arm.folder_of(experiment, domain)}"]
    if run.steps is not None:
        overrides.append(f"max_steps={run.steps}")
    if run.data is not None:
        overrides.append(f"data={run.data}")
    if run.model is not None:
        build = Path(run.model)
        overrides += [f"pretrained_model={build / 'pipeline'}", f"image_encoder={build / 'clip'}"]
    return load_config(f"toy-{domain}", overrides)


def knob(config, lams: tuple[float, ...] = LAMS) -> tuple[tuple[float, ...], tuple[float, ...] | None]:
    """(lambdas, strengths) at which an arm is scored: ``lams`` where its mechanism has lambda, else the strengths
    where it has one, else the adapter as trained."""
    kind = mechanism(config.mechanism)
    if kind.uses_lam:
        return lams, None
    return ((1.0,), SCALES) if kind.uses_scale else ((1.0,), None)


def knob_name(config) -> str | None:
    """"lam", "scale" or None: what an arm's points vary (`knob`)."""
    kind = mechanism(config.mechanism)
    return "lam" if kind.uses_lam else "scale" if kind.uses_scale else None


def trained(config) -> Path:
    """Train the arm, or reuse the finished run its folder holds (it must be of the same config)."""
    folder = Path(config.output_dir)
    final = folder / "adapter"
    if (final / WEIGHTS_NAME).is_file():
        before = yaml.safe_load((folder / "config.yaml").read_text())
        now = asdict(config)
        changed = sorted(k for k in before.keys() | now.keys() if k != "resume" and before.get(k) != now.get(k))
        if changed:
            raise NestedAttentionError(
                f"{folder} holds a finished training run of another config ({', '.join(changed)} differ); give a "
                f"new --out folder, or the same options to reuse it.")
        return final
    with _training_lock(folder):
        timing = folder / "timing.json"
        spent = json.loads(timing.read_text())["train_seconds"] if timing.is_file() else 0.0
        start = time.perf_counter()
        exported = train(config)
        timing.write_text(json.dumps({"train_seconds": round(spent + time.perf_counter() - start, 1),
                                      "threads": torch.get_num_threads(),
                                      "device": "cuda" if torch.cuda.is_available() else "cpu"}) + "\n")
    return exported


@contextlib.contextmanager
def _training_lock(folder: Path):
    """One process trains a run: a second one (the same arm given to two ``--arms`` lists, or arms that share a
    run) would write the same checkpoints. A lock left by a process that no longer runs is taken over."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / "training.lock"
    for _ in range(2):
        try:
            with open(lock, "x") as file:
                file.write(str(os.getpid()))
            break
        except FileExistsError:
            owner = lock.read_text().strip()
            if owner.isdigit() and _running(int(owner)):
                raise NestedAttentionError(
                    f"{folder} is being trained by another process (pid {owner}); give each arm, and each arm that "
                    f"shares its run, to one process only.") from None
            lock.unlink(missing_ok=True)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def eval_config(experiment: Experiment, arm: Arm, run: RunConfig, seed: int) -> ToyEvalConfig:
    lams, scales = knob(arm_config(experiment, arm, run), experiment.lams)
    contexts, scenes = (0, run.scenes) if experiment.scenes else (run.contexts, 0)
    return ToyEvalConfig(seed=seed, identities=run.identities, contexts=contexts, scenes=scenes, lams=lams,
                         scales=scales, domains=experiment.domains, views=arm.views)


def evaluation_folder(experiment: Experiment, arm: Arm, run: RunConfig, seed: int) -> Path:
    """Where an arm is evaluated at ``seed``: in its (first) training run's folder; scenes in folders of their own,
    since the run's other evaluations hold its subjects alone."""
    name = arm.evaluation(seed)
    return run.out / arm.folder / (f"scenes-{name}" if experiment.scenes else name)


def section(experiment: Experiment, metrics: dict) -> dict:
    """Where toy eval's ``metrics`` (or one of their ``by_lambda`` entries) hold the experiment's scores: under its
    domain for subjects alone, at the top for scenes."""
    return metrics if experiment.scenes else metrics[experiment.domains[0]]


def _shown(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def scores_path(experiment: Experiment, arm: Arm, run: RunConfig, seed: int) -> Path:
    """An arm's metrics at one seed, as this experiment scored them. An evaluation folder's own metrics.json is
    that of its last run, which another experiment sharing the run may have made with other lambdas or views."""
    return run.out / "scores" / experiment.name / f"{arm.name}-seed-{seed}.json"


def run_arm(experiment: Experiment, arm: Arm, run: RunConfig, scoring) -> dict:
    """Train and score one arm; returns its per-seed metrics (seed -> toy eval's metrics)."""
    configs = {domain: arm_config(experiment, arm, run, domain) for domain in experiment.domains}
    adapters = {domain: NestedAdapter.from_pretrained(trained(config)) for domain, config in configs.items()}
    pipe, metrics, classifier, clip_scorer = scoring
    scored = {}
    adapter_folders = [str(config.output_dir) for config in configs.values()]
    for seed in run.seeds:
        pinned = {"model": str(run.model or shipped_path()),
                  "adapter": adapter_folders[0] if len(adapter_folders) == 1 else adapter_folders}
        scored[seed] = toy_eval(pipe, adapters, evaluation_folder(experiment, arm, run, seed),
                                eval_config(experiment, arm, run, seed), clip_scorer, classifier, progress=False,
                                metrics=metrics, pinned=pinned)
        path = scores_path(experiment, arm, run, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(scored[seed], indent=2) + "\n")
        mine = section(experiment, scored[seed])
        print(f"{arm.name}, seed {seed}: " + ", ".join(f"{m} {_shown(mine[m])}" for m in experiment.metrics))
    return scored


def finished(experiment: Experiment, run: RunConfig) -> dict[str, dict]:
    """The arms scored at every evaluation seed with this run's evaluation settings: arm -> seed -> metrics."""
    done = {}
    for arm in experiment.arms:
        scored = {}
        for seed in run.seeds:
            path = scores_path(experiment, arm, run, seed)
            expected = json.loads(json.dumps(asdict(eval_config(experiment, arm, run, seed))))
            if path.is_file() and (metrics := json.loads(path.read_text()))["config"] == expected:
                scored[seed] = metrics
        if len(scored) == len(run.seeds):
            done[arm.name] = scored
    return done


def budgets(experiment: Experiment, run: RunConfig) -> dict[str, dict]:
    """Each training run's budget (run folder -> steps, batch, wall time where this runner timed it, threads)."""
    table = {}
    for arm in experiment.arms:
        for domain in experiment.domains:
            config = arm_config(experiment, arm, run, domain)
            timing = Path(config.output_dir) / "timing.json"
            table[arm.folder_of(experiment, domain)] = {
                "steps": config.max_steps, "batch_size": config.train_batch_size, "seed": config.seed,
                "data": config.data} | (json.loads(timing.read_text()) if timing.is_file() else {})
    return table


def run_experiment(experiment: Experiment, run: RunConfig, arms: list[str] | None = None) -> dict:
    """Train and score ``arms`` (default: all), then write the report over every arm that is done."""
    chosen = [a for a in experiment.arms if arms is None or a.name in arms]
    scoring = load_toy_scoring(run.model)
    for arm in chosen:
        run_arm(experiment, arm, run, scoring)
    done = finished(experiment, run)
    knobs = {arm.name: knob_name(arm_config(experiment, arm, run)) for arm in experiment.arms}
    return write_results(experiment, run, done, budgets(experiment, run), knobs)


def main(argv: list[str] | None = None) -> int:
    lines = "\n".join(textwrap.fill(f"{e.figure}: {e.claim}", 100, initial_indent=f"  {e.name:12s}",
                                     subsequent_indent=" " * 14) for e in EXPERIMENTS.values())
    parser = argparse.ArgumentParser(
        prog="nested-attention toy experiment", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"The paper's experiments on the toy world: train every arm the same way, score it on held-out "
                    f"identities over its knob, tabulate and plot.\n\nexperiments:\n{lines}",
        epilog="examples:\n  nested-attention toy experiment mechanisms --out outputs/experiments/mechanisms\n"
               "  OMP_NUM_THREADS=1 nested-attention toy experiment mechanisms --out DIR --arms nested decoupled &\n"
               "  OMP_NUM_THREADS=1 nested-attention toy experiment mechanisms --out DIR --arms simple global_v\n"
               "  nested-attention toy experiment mechanisms --out DIR --steps 200 --seeds 0   # a quick look")
    parser.add_argument("name", choices=EXPERIMENTS, metavar="NAME", help="which experiment (listed above)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="output folder (resumable)")
    parser.add_argument("--arms", nargs="+", metavar="ARM", help="train and score only these arms (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], metavar="S",
                        help="evaluation seeds, each other held-out identities and contexts (default: 0 1 2)")
    parser.add_argument("--identities", type=int, default=20, metavar="N",
                        help="held-out subjects per seed (default: 20)")
    parser.add_argument("--contexts", type=int, default=4, metavar="K", help="prompts per subject (default: 4)")
    parser.add_argument("--scenes", type=int, default=40, metavar="M",
                        help="person + pet images per seed, in the scenes experiment (default: 40)")
    parser.add_argument("--steps", type=int, metavar="N", help="training steps of every arm (default: the recipe's)")
    parser.add_argument("--data", metavar="DIR", help="training triplets of a one-domain experiment (default: the "
                        "recipe's, written by nested-attention toy data --out data/toy-person --domain person "
                        "--count 40000; the scenes experiment reads each domain's recipe's)")
    parser.add_argument("--model", metavar="DIR", help="a toy build folder (default: the shipped one)")
    args = parser.parse_args(argv)
    experiment = EXPERIMENTS[args.name]
    names = [a.name for a in experiment.arms]
    if args.arms and any(a not in names for a in args.arms):
        unknown = ", ".join(a for a in args.arms if a not in names)
        raise NestedAttentionError(f"--arms {unknown}: the {args.name} experiment has the arms {', '.join(names)}.")
    for option, value, least in (("--steps", args.steps, 1), ("--identities", args.identities, 2),
                                 ("--contexts", args.contexts, 1), ("--scenes", args.scenes, 1)):
        if value is not None and value < least:
            raise NestedAttentionError(f"{option} is {value}; expected at least {least}.")
    if len(set(args.seeds)) < len(args.seeds):
        raise NestedAttentionError(f"--seeds {' '.join(map(str, args.seeds))} repeats a seed; give distinct seeds.")
    if args.data and experiment.scenes:
        raise NestedAttentionError(f"--data gives one domain's triplets, and the {args.name} experiment trains "
                                   f"adapters of {' and '.join(experiment.domains)}; leave it out to read each "
                                   f"domain's recipe's data.")
    run = RunConfig(args.out, tuple(args.seeds), args.identities, args.contexts, args.scenes, args.steps, args.data,
                    args.model)
    for domain in experiment.domains:
        data = Path(arm_config(experiment, experiment.arms[0], run, domain).data)
        if not (data / "metadata.jsonl").is_file():
            raise NestedAttentionError(
                f"The training data {data} holds no metadata.jsonl; write it with nested-attention toy data --out "
                f"{data} --domain {domain} --count 40000" + (" (or give --data)." if not experiment.scenes else "."))
    results = run_experiment(experiment, run, args.arms)
    written = ", ".join(str(args.out / f"{args.name}.{suffix}") for suffix in ("md", "json", "png"))
    print(f"wrote {written} ({len(results['arms'])} of {len(names)} arms done)")
    return 0

