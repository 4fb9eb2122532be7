"""Markdown tables of a toy build's record: ``python -m nested_attention_toy.report [build.json]`` (default: the
shipped build). docs/toyworld.md pastes this output, so that its numbers are the build's, not transcriptions."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .assets import shipped_path

NAME = "report"  # nested-attention toy diagnose NAME

BARS = {"factor": 0.95, "retrieval": 0.90, "base_factor": 0.90, "vae_identity": 0.95, "adapter_id": 0.70,
        "adapter_domain_id": 0.60, "scene_both": 0.60}


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _bar(name: str) -> str:
    return f">= {100 * BARS[name]:.0f} %"


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def report(record: dict) -> str:
    lines = [f"Command: `{record['command']}` (seed {record['seed']}, device {record['device']}); "
             f"total {record['seconds'] / 60:.1f} min; weights {record['bytes']['total'] / 2**20:.1f} MiB."]
    v = record["versions"]
    lines.append(f"Versions: Python {v['python']}, torch {v['torch']}, diffusers {v['diffusers']}, "
                 f"transformers {v['transformers']}, numpy {v['numpy']}; {v['threads']} torch threads on {v['processor']}.")
    for run in record.get("resumed", []):  # a stage's time is that of the run that finished it
        lines.append(f"Resumed: `{run['command']}` on {run['versions']['processor']}, after "
                     f"{', '.join(run['stages_done']) or 'no stage'}; the stages after those ran then.")
    lines += ["", _row(["stage", "wall time", "details"]), _row(["---"] * 3)]
    for name, info in record["stages"].items():
        details = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items() if k != "seconds")
        lines.append(_row([name, f"{info['seconds']:.0f} s", details]))
    metrics = record["measurements"]["metric_models"]
    stack = record["measurements"]["stack"]
    lines += ["", _row(["measure (held-out identities)", "result", "bar"]), _row(["---"] * 3)]
    for factor, acc in metrics["factor_accuracy"].items():
        lines.append(_row([f"factor classifier accuracy: {factor}", _pct(acc), _bar("factor")]))
    for domain in ("person", "pet"):
        lines.append(_row([f"identity retrieval top-1 among {record['size']['eval_identities']}: {domain}",
                           _pct(metrics[f"identity_{domain}_top1"]), _bar("retrieval")]))
        if f"identity_{domain}_scene_top1" in metrics:
            lines.append(_row([f"&nbsp;&nbsp;the same in person + pet scenes: {domain}",
                               _pct(metrics[f"identity_{domain}_scene_top1"]), _bar("retrieval")]))
    lines.append(_row(["VAE reconstruction PSNR", f"{stack['vae_psnr_db']:.2f} dB", "—"]))
    for domain, top1 in stack.get("vae_identity_top1", {}).items():
        lines.append(_row([f"identity top-1 among 20 after a VAE round trip: {domain}", _pct(top1), _bar("vae_identity")]))
    for factor, acc in stack["clip_zero_shot_accuracy"].items():
        lines.append(_row([f"CLIP zero-shot accuracy: {factor}", _pct(acc), "—"]))
    g = stack["base_generation"]
    lines.append(_row([f"base model prompt-factor accuracy ({g['count']} generations in random contexts, "
                       f"{g['steps']} steps, guidance {g['guidance_scale']}; the classifier on real renders)", "", ""]))
    for factor, acc in stack["base_prompt_factor_accuracy"].items():
        oracle = stack.get("oracle_factor_accuracy", {}).get(factor)
        lines.append(_row([f"&nbsp;&nbsp;{factor}", _pct(acc) + (f" ({_pct(oracle)})" if oracle is not None else ""),
                           _bar("base_factor")]))
    lines.append(_row(["CLIP-T: base generations / real renders", f"{stack['base_clip_t']:.3f} / {stack['oracle_clip_t']:.3f}", "—"]))
    lines += _adapter_rows(record)
    for domain in ("person", "pet"):
        attrs = metrics.get(f"identity_{domain}_attribute_accuracy", {})
        if attrs:
            lines.append("")
            lines.append(f"{domain} attribute accuracy: " + ", ".join(f"{k} {_pct(v)}" for k, v in attrs.items()))
    return "\n".join(lines)


def _adapter_rows(record: dict) -> list[str]:
    """The adapters' evaluation (`toy eval`, seed 0), when the build trained them."""
    m = record["measurements"].get("adapters")
    if m is None:
        return []
    size = record["size"]
    rows = [_row([f"adapters, lambda 1 (`toy eval --seed 0`: {size['adapter_eval_identities']} held-out subjects per "
                  f"domain; base model alone in brackets)", "", ""]),
            _row(["&nbsp;&nbsp;`id_top1`", f"{m['id_top1']:.3f} ({m['baseline_id_top1']:.3f})", _bar("adapter_id")])]
    for domain in ("person", "pet"):
        rows.append(_row([f"&nbsp;&nbsp;`id_top1`: {domain}",
                          f"{m[domain]['id_top1']:.3f} ({m[domain]['baseline_id_top1']:.3f})", _bar("adapter_domain_id")]))
    rows.append(_row(["&nbsp;&nbsp;`prompt_accuracy`", f"{m['prompt_accuracy']:.3f} ({m['baseline_prompt_accuracy']:.3f})",
                      "within 5 points of the base model"]))
    if "scene_both_top1" in m:
        rows.append(_row(["&nbsp;&nbsp;person + pet images with both subjects identified", f"{m['scene_both_top1']:.3f}",
                          _bar("scene_both")]))
    return rows


def main(argv: list[str] | None = None) -> int:
    """``python -m nested_attention_toy.report [BUILD]``: a build's measurements (default: the shipped build's)."""
    parser = argparse.ArgumentParser(prog=f"nested-attention toy diagnose {NAME}",
                                     description="A toy build's measurements as markdown tables (from its build.json).")
    parser.add_argument("build", nargs="?", type=Path, default=None,
                        help="a build folder or its build.json (default: the shipped build)")
    args = parser.parse_args(argv)
    path = args.build or shipped_path("build.json")
    if path.is_dir():
        path = path / "build.json"
    if not path.is_file():
        print(f"error: expected a build folder or its build.json (what 'nested-attention toy build' writes); {path} "
              f"does not exist: pass the --out folder of a finished build", file=sys.stderr)
        return 2
    print(report(json.loads(path.read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
