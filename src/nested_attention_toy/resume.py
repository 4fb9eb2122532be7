"""A training loop's whole state on disk, so that an interrupted toy build continues where it stopped and ends with
exactly the weights of an uninterrupted one: models, optimizer, learning-rate schedule, random generators, the loss
log and the step. No pickle: safetensors for tensors, JSON for the rest. A state is written to a temporary folder
and renamed into place, so a kill while writing leaves the previous state whole."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nested_attention_train.checkpoints import load_optimizer, save_optimizer

from .loop import LossLog

STATE = "state.json"


def has_state(folder: Path) -> bool:
    return (Path(folder) / STATE).is_file()


def saved_progress(folder: Path) -> tuple[int, float]:
    """The step a saved state resumes at and the seconds of training behind it ((0, 0.0) when there is none)."""
    if not has_state(folder):
        return 0, 0.0
    state = json.loads((Path(folder) / STATE).read_text())
    return state["step"], state["seconds"]


def save_state(folder: Path, models: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer, schedule,
               generator: torch.Generator, log: LossLog, step: int, seconds: float) -> None:
    """Write everything a loop needs to go on after ``step`` steps (``seconds`` of training so far) to ``folder``."""
    folder = Path(folder)
    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({f"{name}.{key}": value.detach().contiguous().cpu() for name, model in models.items()
               for key, value in model.state_dict().items()}, str(tmp / "models.safetensors"))
    save_optimizer(optimizer, tmp)
    rng = {"generator": generator.get_state(), "cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(tmp / "rng.safetensors"))
    (tmp / STATE).write_text(json.dumps({
        "step": step, "seconds": seconds, "schedule": schedule.state_dict(),
        "log": log.state()}, indent=1))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def load_state(folder: Path, models: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer, schedule,
               generator: torch.Generator, log: LossLog) -> tuple[int, float]:
    """Restore what `save_state` wrote into the given objects; returns (step, seconds)."""
    folder = Path(folder)
    tensors = load_file(str(folder / "models.safetensors"))
    for name, model in models.items():
        prefix = f"{name}."
        model.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    load_optimizer(optimizer, folder)
    rng = load_file(str(folder / "rng.safetensors"))
    generator.set_state(rng["generator"])
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    state = json.loads((folder / STATE).read_text())
    schedule.load_state_dict(state["schedule"])
    log.restore(state["log"])
    return state["step"], state["seconds"]
