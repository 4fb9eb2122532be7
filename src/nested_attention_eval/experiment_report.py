"""What `nested-attention toy experiment NAME` writes: ``NAME.json``, ``NAME.md`` and ``NAME.png``.

Each arm's curve runs through its knob's points (lambda, or the strength of a decoupled adapter); a point is the
mean over the evaluation seeds, with their spread (the standard deviation, and the values themselves in
``results.json``). The base model (no adapter) is one more point: where an adapter would be if it carried nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

METRICS = ("id_top1", "id_similarity", "prompt_accuracy", "clip_t")
# person + pet images: each subject retrieved, both, the colour leakage between them (lower is better), CLIP-T
SCENE_METRICS = ("scene_person_top1", "scene_pet_top1", "scene_both_top1", "scene_leakage", "scene_clip_t")


def _section(metrics: dict, domain: str | None) -> dict:
    """Toy eval's scores of one domain's subjects alone (``domain``), or of the scenes (None: the top level)."""
    return metrics if domain is None else metrics[domain]


def _spread(seen: list) -> dict:
    """Mean, standard deviation and values over seeds; a seed with no value (a leakage without chances) is left
    out of the mean."""
    known = [v for v in seen if v is not None]
    mean, std = (float(np.mean(known)), float(np.std(known))) if known else (None, None)
    return {"mean": mean, "std": std, "values": seen}


def arm_points(domain: str | None, per_seed: dict, knob: str | None, metrics: tuple[str, ...] = METRICS) -> list[dict]:
    """One arm's points: per value of its ``knob`` ("lam", "scale", or None for an adapter with neither), each
    metric's mean, standard deviation and per-seed values (``domain``: see `_section`)."""
    first = next(iter(per_seed.values()))
    keyed = first.get("by_scale") or first.get("by_lambda")
    config = first["config"]
    values = list(keyed) if keyed else [f"{config['scales'][0] if knob == 'scale' else config['lams'][0]:g}"]
    points = []
    for value in values:
        scored = [_section((m.get("by_scale") or m.get("by_lambda") or {value: m})[value], domain)
                  for m in per_seed.values()]
        point = {"knob": knob, "value": float(value)}
        for metric in metrics:
            point[metric] = _spread([s[metric] for s in scored])
        points.append(point)
    return points


def base_point(domain: str | None, done: dict, metrics: tuple[str, ...] = METRICS) -> dict:
    """The base model's scores, over every finished arm's evaluations (its images do not depend on the arm)."""
    per_seed: dict[int, dict] = {}
    for arm in done.values():
        for seed, scored in arm.items():
            per_seed.setdefault(seed, _section(scored, domain))
    return {metric: _spread([m[f"baseline_{metric}"] for m in per_seed.values()]) for metric in metrics}


def write_results(experiment, run, done: dict, budgets: dict, knobs: dict) -> dict:
    """The report of ``done`` (arm -> seed -> toy eval's metrics), with the training ``budgets`` (run folder ->
    steps, batch, wall time...) and ``knobs`` (arm -> "lam", "scale" or None)."""
    out = Path(run.out)
    out.mkdir(parents=True, exist_ok=True)
    domain = None if experiment.scenes else experiment.domains[0]
    metrics = experiment.metrics
    per_point = run.scenes if experiment.scenes else run.identities * run.contexts
    results = {
        "experiment": experiment.name, "figure": experiment.figure, "claim": experiment.claim,
        "domains": list(experiment.domains), "metrics": list(metrics),
        "evaluation": {"seeds": list(run.seeds), "identities": run.identities,
                       **({"scenes": run.scenes} if experiment.scenes else {"contexts": run.contexts}),
                       "images_per_point_and_seed": per_point},
        "arms": {arm.name: {"overrides": list(arm.overrides), "views": arm.views,
                            "runs": [arm.folder_of(experiment, d) for d in experiment.domains],
                            "points": arm_points(domain, done[arm.name], knobs[arm.name], metrics)}
                 for arm in experiment.arms if arm.name in done},
        "budgets": {folder: budgets[folder] for arm in experiment.arms if arm.name in done
                    for folder in (arm.folder_of(experiment, d) for d in experiment.domains)},
        "missing": [a.name for a in experiment.arms if a.name not in done],
    }
    if done:
        results["base_model"] = base_point(domain, done, metrics)
    (out / f"{experiment.name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{experiment.name}.md").write_text(table(results))
    if done:
        plot(results, out / f"{experiment.name}.png")
    return results


def _cell(score: dict) -> str:
    return "n/a" if score["mean"] is None else f"{score['mean']:.3f} ± {score['std']:.3f}"


def _knob(point: dict) -> str:
    return "as trained" if point["knob"] is None else f"{'λ' if point['knob'] == 'lam' else 'scale'} {point['value']:g}"


def _difference(a: float | None, b: float | None) -> str:
    if a is None or b is None:
        return "n/a"
    return "0.000" if abs(a - b) < 5e-4 else f"{a - b:+.3f}"


def paired(results: dict) -> list[str]:
    """Markdown lines: seed by seed, the first arm's first point (its headline: lambda 1) minus every point of every
    other arm. At one seed all arms saw the same subjects and prompts, so these differences are paired, and tell a
    lead the seeds' spread hides from one that changes sign."""
    arms = list(results["arms"].items())
    if len(arms) < 2:
        return []
    (first, mine), seeds, metrics = arms[0], results["evaluation"]["seeds"], results["metrics"]
    reference = mine["points"][0]
    lines = ["", f"Seed by seed ({' / '.join(map(str, seeds))}), {first} at {_knob(reference)} minus each other "
                 f"arm's point:", "", "| minus | knob | " + " | ".join(metrics) + " |",
             "| --- | --- |" + " --- |" * len(metrics)]
    for name, arm in arms[1:]:
        for point in arm["points"]:
            cells = [" / ".join(_difference(a, b) for a, b in zip(reference[m]["values"], point[m]["values"]))
                     for m in metrics]
            lines.append(f"| {name} | {_knob(point)} | " + " | ".join(cells) + " |")
    return lines


def table(results: dict) -> str:
    """Markdown: a row per arm and knob point (mean ± standard deviation over the evaluation seeds), then budgets."""
    seeds, metrics = results["evaluation"]["seeds"], results["metrics"]
    what = " + ".join(results["domains"]) + (" images" if len(results["domains"]) > 1 else "s")
    lines = [f"{results['figure']} on the toy world ({what}): {results['claim']}", "",
             f"Mean ± standard deviation over evaluation seeds {', '.join(map(str, seeds))} "
             f"({results['evaluation']['images_per_point_and_seed']} images of held-out identities per point and "
             f"seed).",
             "", "| arm | knob | " + " | ".join(metrics) + " |", "| --- | --- |" + " --- |" * len(metrics)]
    for name, arm in results["arms"].items():
        for point in arm["points"]:
            lines.append(f"| {name} | {_knob(point)} | " + " | ".join(_cell(point[m]) for m in metrics) + " |")
    if "base_model" in results:
        base = results["base_model"]
        lines.append("| base model | no adapter | " + " | ".join(_cell(base[m]) for m in metrics) + " |")
    lines += paired(results)
    lines += ["", "| training run | arms | steps | batch | wall time | threads |",
              "| --- | --- | --- | --- | --- | --- |"]
    runs: dict[str, list[str]] = {}
    for name, arm in results["arms"].items():
        for run in arm["runs"]:
            runs.setdefault(run, []).append(name)
    for run, names in runs.items():
        budget = results["budgets"][run]
        wall = f"{budget['train_seconds'] / 60:.1f} min" if "train_seconds" in budget else "not timed by the runner"
        lines.append(f"| {run} | {', '.join(names)} | {budget['steps']} | {budget['batch_size']} | {wall} | "
                     f"{budget.get('threads', '')} |")
    if results["missing"]:
        lines += ["", f"Not finished yet: {', '.join(results['missing'])}."]
    return "\n".join(lines) + "\n"


PANELS = {  # per experiment kind, the (x, y) metrics of its plot's panels
    METRICS: (("prompt_accuracy", "id_top1"), ("clip_t", "id_top1")),
    SCENE_METRICS: (("scene_clip_t", "scene_person_top1"), ("scene_clip_t", "scene_pet_top1"),
                    ("scene_clip_t", "scene_leakage")),
}
LABELS = {"id_top1": "identity (id_top1 among {n} held-out subjects)", "prompt_accuracy": "prompt following "
          "(prompt_accuracy)", "clip_t": "prompt following (clip_t)", "scene_clip_t": "prompt following (clip_t of "
          "the scenes)", "scene_person_top1": "person identified (top-1 among {n})", "scene_pet_top1": "pet "
          "identified (top-1 among {n})", "scene_leakage": "colour leakage between the subjects (lower is better)"}


def plot(results: dict, path: Path) -> None:
    """Identity against prompt following (for scenes: each subject's identity, and the leakage), a curve per arm
    with the seeds' spread as error bars; the base model as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = PANELS[tuple(results["metrics"])]
    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.4))
    n = results["evaluation"]["identities"]
    for ax, (x_metric, y_metric) in zip(axes, panels):
        for name, arm in results["arms"].items():
            points = [p for p in arm["points"] if p[x_metric]["mean"] is not None and p[y_metric]["mean"] is not None]
            xs = [p[x_metric]["mean"] for p in points]
            ys = [p[y_metric]["mean"] for p in points]
            ax.errorbar(xs, ys, xerr=[p[x_metric]["std"] for p in points], yerr=[p[y_metric]["std"] for p in points],
                        marker="o", capsize=2, label=name)
            for i, (p, x, y) in enumerate(zip(points, xs, ys)):
                if p["knob"] is not None and i in (0, len(points) - 1):  # a curve's two ends
                    label = f"{'λ' if p['knob'] == 'lam' else 's'}={p['value']:g}"
                    ax.annotate(label, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        base = results["base_model"]
        if base[x_metric]["mean"] is not None and base[y_metric]["mean"] is not None:
            ax.plot([base[x_metric]["mean"]], [base[y_metric]["mean"]], marker="*", markersize=12, color="black",
                    linestyle="none", label="base model")
        ax.set_xlabel(LABELS[x_metric].format(n=n))
        ax.set_ylabel(LABELS[y_metric].format(n=n))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.suptitle(f"{results['figure']}: {results['experiment']} on the toy world")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
