"""Full training state on disk, without pickle: safetensors for tensors, JSON for the rest.

A checkpoint is written to a temporary folder, its manifest (every file's size and SHA-256) is written last and
everything is synced to disk before the folder is renamed into place. A crash while writing leaves only a
`.tmp-*` folder, which `latest` never picks and the next save removes; a checkpoint damaged afterwards fails its
manifest check and `latest` falls back to the previous whole one. Removal renames a folder aside before deleting
it. Each checkpoint holds the adapter exported exactly as `nested-attention generate` loads it (`adapter/`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nested_attention import NestedAdapter
from nested_attention.errors import NestedAttentionError

from .manifest import MANIFEST, TRASH_PREFIX, damage, move_into_place, remove_folder, write_manifest

logger = logging.getLogger(__name__)

PREFIX = "checkpoint-"
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
    write_manifest(tmp)
    move_into_place(tmp, final)
    return final


def checkpoint_folders(directory: Path) -> list[Path]:
    """Every `checkpoint-*` folder, whole or not, oldest first (temporary and set-aside folders excluded)."""
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.glob(f"{PREFIX}*") if p.is_dir()), key=lambda p: p.name)


def complete_checkpoints(directory: Path) -> list[Path]:
    """Finished checkpoints (those with a manifest), oldest first; their files are not verified here."""
    return [p for p in checkpoint_folders(directory) if (p / MANIFEST).is_file()]


def resolve_resume(directory: Path, resume: str) -> Path | None:
    """`latest` -> the newest whole checkpoint (None if there is none yet); a path -> that checkpoint, verified.

    `latest` skips damaged checkpoints (a file missing, cut short or changed since it was written) with one
    warning naming the file, and stops with one sentence if checkpoints exist but none is whole.
    """
    if resume != "latest":
        path = Path(resume)
        problem = damage(path) if path.is_dir() else "it is not a folder"
        if problem is not None:
            raise NestedAttentionError(
                f"resume={resume} is not a whole checkpoint: {problem}. Give a whole checkpoint-* folder under "
                f"{directory}, or resume=latest."
            )
        return path
    found = checkpoint_folders(directory)
    damaged = []
    for path in reversed(found):
        problem = damage(path)
        if problem is None:
            if damaged:
                logger.warning("skipping damaged checkpoint(s): %s; resuming from %s, the newest whole one.",
                               "; ".join(damaged), path.name)
            return path
        damaged.append(f"{path.name}: {problem}")
    if damaged:
        raise NestedAttentionError(
            f"No whole checkpoint to resume from in {directory} ({'; '.join(damaged)}); restore the damaged "
            f"files, or drop resume=latest (or choose another output_dir) to start over."
        )
    return None


def load_checkpoint(path: Path, adapter: NestedAdapter, optimizer, lr_scheduler) -> TrainState:
    """Restore adapter weights, optimizer, learning-rate schedule and position from a (verified) checkpoint."""
    adapter.load_adapter_state_dict(load_file(str(path / "adapter" / "nested_adapter.safetensors")), source=str(path))
    if optimizer is not None:
        if (path / "optimizer.json").is_file():
            load_optimizer(optimizer, path)
        else:
            logger.warning("%s holds no optimizer state (saved under DeepSpeed); Adam's moments restart.", path.name)
    lr_scheduler.load_state_dict(json.loads((path / "scheduler.json").read_text()))
    return TrainState(**json.loads((path / STATE).read_text()))


def prune_checkpoints(directory: Path, keep: int) -> None:
    """Keep the newest `keep` finished checkpoints and remove leftovers of interrupted saves and removals."""
    for old in complete_checkpoints(directory)[:-keep]:
        remove_folder(old)
    for leftover in [*directory.glob(".tmp-*"), *directory.glob(f"{TRASH_PREFIX}*")]:
        shutil.rmtree(leftover, ignore_errors=True)
