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


def arm_points(domain: str, per_seed: dict, knob: str | None) -> list[dict]:
    """One arm's points: per value of its ``knob`` ("lam", "scale", or None for an adapter with neither), each
    metric's mean, standard deviation and per-seed values."""
    first = next(iter(per_seed.values()))
    keyed = first.get("by_scale") or first.get("by_lambda")
    config = first["config"]
    values = list(keyed) if keyed else [f"{config['scales'][0] if knob == 'scale' else config['lams'][0]:g}"]
    points = []
    for value in values:
        scored = [(m.get("by_scale") or m.get("by_lambda") or {value: m})[value][domain] for m in per_seed.values()]
        point = {"knob": knob, "value": float(value)}
        for metric in METRICS:
            seen = [s[metric] for s in scored]
            point[metric] = {"mean": float(np.mean(seen)), "std": float(np.std(seen)), "values": seen}
        points.append(point)
    return points


def base_point(domain: str, done: dict) -> dict:
    """The base model's scores, over every finished arm's evaluations (its images do not depend on the arm)."""
    per_seed: dict[int, dict] = {}
    for arm in done.values():
        for seed, metrics in arm.items():
            per_seed.setdefault(seed, metrics[domain])
    point = {}
    for metric in METRICS:
        seen = [m[f"baseline_{metric}"] for m in per_seed.values()]
        point[metric] = {"mean": float(np.mean(seen)), "std": float(np.std(seen)), "values": seen}
    return point


def write_results(experiment, run, done: dict, budgets: dict, knobs: dict) -> dict:
    """The report of ``done`` (arm -> seed -> toy eval's metrics), with each arm's training ``budgets`` and
    ``knobs`` (arm -> "lam", "scale" or None)."""
    out = Path(run.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {
        "experiment": experiment.name, "figure": experiment.figure, "claim": experiment.claim,
        "domain": experiment.domain,
        "evaluation": {"seeds": list(run.seeds), "identities": run.identities, "contexts": run.contexts,
                       "images_per_point_and_seed": run.identities * run.contexts},
        "arms": {arm.name: {"overrides": list(arm.overrides), "run": arm.folder, "views": arm.views,
                            "budget": budgets[arm.name],
                            "points": arm_points(experiment.domain, done[arm.name], knobs[arm.name])}
                 for arm in experiment.arms if arm.name in done},
        "missing": [a.name for a in experiment.arms if a.name not in done],
    }
    if done:
        results["base_model"] = base_point(experiment.domain, done)
    (out / f"{experiment.name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{experiment.name}.md").write_text(table(results))
    if done:
        plot(results, out / f"{experiment.name}.png")
    return results


def _cell(score: dict) -> str:
    return f"{score['mean']:.3f} ± {score['std']:.3f}"


def table(results: dict) -> str:
    """Markdown: a row per arm and knob point (mean ± standard deviation over the evaluation seeds), then budgets."""
    seeds = results["evaluation"]["seeds"]
    lines = [f"{results['figure']} on the toy world ({results['domain']}s): {results['claim']}", "",
             f"Mean ± standard deviation over evaluation seeds {', '.join(map(str, seeds))} "
             f"({results['evaluation']['images_per_point_and_seed']} images of held-out identities per point and "
             f"seed).",
             "", "| arm | knob | " + " | ".join(METRICS) + " |", "| --- | --- |" + " --- |" * len(METRICS)]
    for name, arm in results["arms"].items():
        for point in arm["points"]:
            symbol = "λ" if point["knob"] == "lam" else "scale"
            knob = "as trained" if point["knob"] is None else f"{symbol} {point['value']:g}"
            lines.append(f"| {name} | {knob} | " + " | ".join(_cell(point[m]) for m in METRICS) + " |")
    if "base_model" in results:
        base = results["base_model"]
        lines.append("| base model | no adapter | " + " | ".join(_cell(base[m]) for m in METRICS) + " |")
    lines += ["", "| training run | arms | steps | batch | wall time | threads |",
              "| --- | --- | --- | --- | --- | --- |"]
    runs: dict[str, list[str]] = {}
    for name, arm in results["arms"].items():
        runs.setdefault(arm["run"], []).append(name)
    for run, names in runs.items():
        budget = results["arms"][names[0]]["budget"]
        wall = f"{budget['train_seconds'] / 60:.1f} min" if "train_seconds" in budget else "not timed by the runner"
        lines.append(f"| {run} | {', '.join(names)} | {budget['steps']} | {budget['batch_size']} | {wall} | "
                     f"{budget.get('threads', '')} |")
    if results["missing"]:
        lines += ["", f"Not finished yet: {', '.join(results['missing'])}."]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Identity (id_top1) against prompt following, one panel per prompt score, a curve per arm with the seeds'
    spread as error bars; the base model as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, x_metric in zip(axes, ("prompt_accuracy", "clip_t")):
        for name, arm in results["arms"].items():
            points = arm["points"]
            xs = [p[x_metric]["mean"] for p in points]
            ys = [p["id_top1"]["mean"] for p in points]
            ax.errorbar(xs, ys, xerr=[p[x_metric]["std"] for p in points], yerr=[p["id_top1"]["std"] for p in points],
                        marker="o", capsize=2, label=name)
            for i, (p, x, y) in enumerate(zip(points, xs, ys)):
                if p["knob"] is not None and i in (0, len(points) - 1):  # a curve's two ends
                    label = f"{'λ' if p['knob'] == 'lam' else 's'}={p['value']:g}"
                    ax.annotate(label, (x, y), textcoords="offset points",
                                xytext=(3, 3), fontsize=7)
        base = results["base_model"]
        ax.plot([base[x_metric]["mean"]], [base["id_top1"]["mean"]], marker="*", markersize=12, color="black",
                linestyle="none", label="base model")
        ax.set_xlabel(f"prompt following ({x_metric})")
        ax.set_ylabel(f"identity (id_top1 among {results['evaluation']['identities']} held-out subjects)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.suptitle(f"{results['figure']}: {results['experiment']} on the toy world")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
