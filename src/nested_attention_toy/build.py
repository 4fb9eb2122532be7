"""`nested-attention toy build`: rebuild the toy world's whole model stack from scratch, stage by stage.

Stages (``stages.STAGES``; each logs one line and its wall time, a progress bar while it runs):

1. tokenizer: CLIP-format BPE for the world's vocabulary;
2. corpus: renders of train identities with their captions (targets, input views, person + pet scenes);
3. metrics: factor classifier and identity networks (own renders, train identities), measured on held-out ones;
4. clip: a tiny `CLIPModel`, trained contrastively on the corpus;
5. vae: a small `AutoencoderKL`;
6. unet: a `UNet2DConditionModel` trained text-to-image on the corpus latents, with the pipeline's text encoder
   (it starts as CLIP's text tower) trained along;
7. pipeline: the standard `StableDiffusionPipeline` folder (plus `image_encoder` / `feature_extractor`);
8. evaluate: VAE PSNR, CLIP zero-shot factor accuracy and base-model prompt-factor accuracy on held-out
   identities, and a sample sheet;
9. per domain, the adapter's training triplets and the adapter itself (``adapter_stages.ADAPTER_STAGES``);
10. whatever ``extra_stages`` the caller adds (the command line adds the adapters' evaluation, which lives with the
    evaluation code).

Output folder: ``pipeline/`` (loads with ``StableDiffusionPipeline.from_pretrained``), ``clip/`` (the whole CLIP),
``metrics/`` (metric models), ``adapters/person`` and ``adapters/pet`` (self-contained adapter folders), ``build.json`` (command, seed, versions, sizes, timings, measurements) and
``samples.png``. Weights are fp16 safetensors.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import diffusers
import numpy as np
import torch
import transformers
from tqdm.auto import tqdm

from nested_attention.errors import NestedAttentionError

from .adapter_stages import ADAPTER_STAGES
from .recipe import FULL, SMOKE, BuildSize
from .stages import CHECKPOINT, REUSABLE, STAGES, Parts, Stage

__all__ = ["BUILD_SEED", "CHECKPOINT", "FULL", "PARTIAL", "REUSABLE", "SMOKE", "BuildSize", "Stage", "build"]

BUILD_SEED = 0
PARTIAL = "build.partial.json"  # the record of a build that has not finished: what --resume continues


class _Log:
    def __init__(self, path: Path):
        self.file = path.open("a")

    def __call__(self, message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        tqdm.write(line)
        self.file.write(line + "\n")
        self.file.flush()


def cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what ``platform`` knows: the wall times depend on it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__, "machine": platform.machine(),
            "processor": cpu_name(), "threads": torch.get_num_threads()}


def _check(out: Path, resume: bool, reuse: Path | None, reuse_parts: tuple[str, ...]) -> None:
    """Every reason a build cannot start, as one sentence (NestedAttentionError)."""
    if resume:
        if (out / "build.json").is_file():
            raise NestedAttentionError(f"{out} holds a finished build (build.json); there is nothing to resume.")
        if not (out / PARTIAL).is_file():
            raise NestedAttentionError(f"{out} holds no interrupted build ({PARTIAL}); start one with --out {out} "
                                       f"(no --resume).")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise NestedAttentionError(f"{out} exists and is not an empty folder; give a new folder to --out (or --resume "
                                   f"to go on with an interrupted build there).")
    unknown = set(reuse_parts) - set(REUSABLE)
    if unknown:
        raise NestedAttentionError(f"the reused parts can be {', '.join(REUSABLE)}; got {', '.join(sorted(unknown))}.")
    if reuse is not None and reuse_parts:
        needed = ["build.json"] + [{"metrics": "metrics", "vae": "pipeline/vae"}[part] for part in reuse_parts]
        missing = [part for part in needed if not (reuse / part).exists()]
        if missing:
            raise NestedAttentionError(f"--reuse expects an earlier build folder; {reuse} has no {', '.join(missing)}.")


def build(out: str | Path, size: BuildSize = FULL, seed: int = BUILD_SEED, device: str = "cpu", workers: int = 2,
          command: str | None = None, reuse: str | Path | None = None, reuse_parts: tuple[str, ...] = REUSABLE,
          resume: bool = False, extra_stages: tuple[Stage, ...] = ()) -> dict:
    """Run every stage into ``out`` (created; must be empty or absent). Returns the build record (build.json).

    ``reuse``: an earlier build's folder whose metric models and VAE are copied instead of trained (they never see a
    caption, so a build that changes only the text side need not retrain them); ``reuse_parts`` names which of the
    two (``REUSABLE``) it copies.

    ``resume``: go on with the interrupted build in ``out`` (its own size, seed and reuse; ``size``, ``seed``,
    ``reuse`` and ``reuse_parts`` are ignored). Finished stages are kept, an unfinished one runs again, and the UNet
    stage, which saves its whole training state every ``size.unet_checkpoint_every`` steps, goes on from the last
    save (an adapter stage from its trainer's last checkpoint): the result is what the uninterrupted build gives (bit
    for bit on a CPU). ``extra_stages`` run after the toy package's own (give the same ones to ``resume``). Raises
    NestedAttentionError, before any work, when the build cannot run."""
    out = Path(out)
    record = None
    if resume and (out / PARTIAL).is_file() and not (out / "build.json").is_file():
        record = json.loads((out / PARTIAL).read_text())
        size = BuildSize(**{k: tuple(v) if isinstance(v, list) else v for k, v in record["size"].items()})
        seed = record["seed"]
        reuse = Path(record["reused"]["from"]) if "reused" in record else None
        reuse_parts = tuple(record["reused"]["parts"]) if reuse is not None else ()
        reuse_parts = tuple(part for part in reuse_parts if part not in record["stages"])  # only what is still to copy
    reuse = None if reuse is None else Path(reuse)
    reuse_parts = tuple(reuse_parts) if reuse is not None else ()
    _check(out, resume, reuse, reuse_parts)
    out.mkdir(parents=True, exist_ok=True)
    log = _Log(out / "build.log")
    if record is not None:
        record.setdefault("resumed", []).append({"command": command or " ".join(sys.argv), "device": device,
                                                 "versions": _versions(), "stages_done": list(record["stages"])})
        log(f"resuming the build in {out}; stages done: {', '.join(record['stages']) or 'none'}")
    else:
        record = {"command": command or " ".join(sys.argv), "seed": seed, "device": device, "size": asdict(size),
                  "versions": _versions(), "stages": {}, "measurements": {}}
        if reuse is not None:
            earlier = json.loads((reuse / "build.json").read_text())
            record["reused"] = {"from": str(reuse), "parts": list(reuse_parts),
                                "build": {k: earlier.get(k) for k in ("command", "seed", "versions", "size")}}
    started = time.perf_counter()
    # the seconds of finished work that earlier runs of an interrupted build did (stages, and UNet training saved)
    carried = sum(s["seconds"] for s in record["stages"].values())
    parts = Parts(out, size, seed, device, workers, log, reuse, reuse_parts)
    for stage in (*STAGES, *ADAPTER_STAGES, *extra_stages):
        if stage.name in record["stages"]:
            continue
        t = time.perf_counter()
        info = stage.run(parts)
        before = info.pop("seconds_before", 0.0)  # training time an interrupted run of this stage saved
        carried += before
        if stage.measurement is not None:
            record["measurements"][stage.measurement] = info.pop("measured")
        seconds = before + time.perf_counter() - t
        record["stages"][stage.name] = {"seconds": round(seconds, 1), **info}
        log(f"{stage.name}: {seconds:.1f} s {json.dumps(info) if info else ''}")
        (out / PARTIAL).write_text(json.dumps(record, indent=2) + "\n")

    record["seconds"] = round(carried + time.perf_counter() - started, 1)
    record["bytes"] = {part: _bytes(out / part) for part in ("pipeline", "clip", "metrics", "adapters") if (out / part).is_dir()}
    record["bytes"]["total"] = sum(record["bytes"].values())
    (out / "build.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / PARTIAL).unlink()
    log(f"done in {record['seconds'] / 60:.1f} min; {record['bytes']['total'] / 2**20:.1f} MiB of weights in {out}")
    return record


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
