"""Full training state on disk, without pickle: safetensors for tensors, JSON for the rest.

A checkpoint is written to a temporary folder and renamed into place when complete; a crash while writing
leaves only a `.tmp-*` folder, which `latest` never picks and the next save removes. Each checkpoint holds
the adapter exported exactly as `nested-attention generate` loads it (`adapter/`).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nested_attention import NestedAdapter
from nested_attention.errors import NestedAttentionError

PREFIX = "checkpoint-"
COMPLETE = "COMPLETE"
STATE = "trainer_state.json"


@dataclass
class TrainState:
    """Where training is: optimizer steps, micro-batches, and the data position."""

    step: int = 0  # optimizer steps done
    micro_step: int = 0  # micro-batches done (seeds every step's randomness)
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed (per process)
    samples: int = 0  # samples seen, all processes
    skipped: int = 0  # bad samples skipped (skip_bad_data)


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, rest = {}, {"param_groups": state["param_groups"], "scalars": {}}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().contiguous().cpu()
            else:
                rest["scalars"][f"{index}.{name}"] = value
    return tensors, rest


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *rest["scalars"].items()]:
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def save_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """The optimizer's state as ``folder/optimizer.safetensors`` (its tensors) and ``optimizer.json`` (the rest)."""
    tensors, rest = _flatten_optimizer(optimizer.state_dict())
    save_file(tensors, str(folder / "optimizer.safetensors"))
    (folder / "optimizer.json").write_text(json.dumps(rest))


def load_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Restore what `save_optimizer` wrote into ``folder``."""
    rest = json.loads((folder / "optimizer.json").read_text())
    optimizer.load_state_dict(_unflatten_optimizer(load_file(str(folder / "optimizer.safetensors")), rest))


def save_checkpoint(
    directory: Path, adapter: NestedAdapter, optimizer, lr_scheduler, state: TrainState, save_image_encoder: bool
) -> Path:
    """Write `directory/checkpoint-<step>` atomically and return its path (`optimizer` None: not saved)."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{PREFIX}{state.step:08d}"
    tmp = directory / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    adapter.save_pretrained(tmp / "adapter", save_image_encoder=save_image_encoder)
    if optimizer is not None:  # None under DeepSpeed, whose sharded optimizer state is its own
        save_optimizer(optimizer, tmp)
    (tmp / "scheduler.json").write_text(json.dumps(lr_scheduler.state_dict()))
    (tmp / STATE).write_text(json.dumps(asdict(state), indent=2))
    (tmp / COMPLETE).write_text("")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def complete_checkpoints(directory: Path) -> list[Path]:
    """Finished checkpoints, oldest first (temporary folders of interrupted saves are ignored)."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.glob(f"{PREFIX}*") if (p / COMPLETE).is_file() and (p / STATE).is_file()]
    return sorted(found, key=lambda p: p.name)


def resolve_resume(directory: Path, resume: str) -> Path | None:
    """`latest` -> the newest complete checkpoint (None if there is none yet); a path -> that checkpoint."""
    if resume == "latest":
        found = complete_checkpoints(directory)
        return found[-1] if found else None
    path = Path(resume)
    if not ((path / COMPLETE).is_file() and (path / STATE).is_file()):
        raise NestedAttentionError(
            f"--resume {resume} is not a complete checkpoint (no {COMPLETE} marker); give a checkpoint-* folder "
            f"under {directory} or 'latest'."
        )
    return path


def load_checkpoint(path: Path, adapter: NestedAdapter, optimizer, lr_scheduler) -> TrainState:
    """Restore adapter weights, optimizer, learning-rate schedule and position from a checkpoint folder."""
    adapter.load_adapter_state_dict(load_file(str(path / "adapter" / "nested_adapter.safetensors")), source=str(path))
    if optimizer is not None and (path / "optimizer.json").is_file():
        load_optimizer(optimizer, path)
    lr_scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    return TrainState(**json.loads((path / STATE).read_text()))


def prune_checkpoints(directory: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints and remove leftovers of interrupted saves."""
    for old in complete_checkpoints(directory)[:-keep]:
        shutil.rmtree(old)
    for leftover in directory.glob(".tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
