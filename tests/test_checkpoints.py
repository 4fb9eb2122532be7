"""Checkpoints that verify themselves: damage after writing is found, and a kill while removing leaves no half folder."""

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import nested_attention_train.checkpoints as checkpoints
from nested_attention.errors import NestedAttentionError
from nested_attention_train.manifest import damage
from nested_attention_train.trainer import main as train_main
from test_train import TINY, make_triplets

SRC = Path(__file__).parent.parent / "src"


def train(*overrides: str) -> int:
    return train_main(["--config", TINY, "train_batch_size=2", "lr_scheduler=constant", *overrides])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Checkpoints at steps 2 and 4 of a 4-step run, and the adapter of an uninterrupted 4-step run."""
    root = tmp_path_factory.mktemp("checkpoints")
    folder = make_triplets(root / "data", count=4)
    assert train(f"data={folder}", f"output_dir={root / 'run'}", "max_steps=4", "checkpoint_every=2") == 0
    return root, folder


@pytest.fixture
def run_copy(runs, tmp_path):
    root, folder = runs
    shutil.copytree(root / "run", tmp_path / "run")
    return tmp_path / "run", folder


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def zero_second_half(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2:] = bytes(len(data) - len(data) // 2)
    path.write_bytes(bytes(data))


DAMAGE = {
    "adapter/nested_adapter.safetensors": truncate,
    "optimizer.json": Path.unlink,
    "optimizer.safetensors": zero_second_half,
    "scheduler.json": lambda p: p.write_text(""),
    "trainer_state.json": lambda p: p.write_text(p.read_text() + '{"step": 99}'),
    "adapter/nested_adapter_config.json": lambda p: p.write_text(p.read_text().replace('"alpha"', '"alpha" ')),
    "adapter/added.safetensors": lambda p: p.write_bytes(b"not written with the checkpoint"),
}


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_damaged_latest_checkpoint_falls_back_to_the_previous_whole_one(run_copy, name, caplog):
    run, folder = run_copy
    directory = run / "checkpoints"
    assert damage(directory / "checkpoint-00000004") is None
    DAMAGE[name](directory / "checkpoint-00000004" / name)
    with caplog.at_level(logging.WARNING):
        assert checkpoints.resolve_resume(directory, "latest") == directory / "checkpoint-00000002"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and name in warnings[0] and "checkpoint-00000002" in warnings[0]
    with pytest.raises(NestedAttentionError, match=name.replace(".", r"\.")):
        checkpoints.resolve_resume(directory, str(directory / "checkpoint-00000004"))


def test_resumed_run_from_the_fallback_ends_where_the_uninterrupted_run_ends(runs, run_copy):
    root, _ = runs
    run, folder = run_copy
    zero_second_half(run / "checkpoints/checkpoint-00000004/adapter/nested_adapter.safetensors")
    assert train(f"data={folder}", f"output_dir={run}", "max_steps=4", "checkpoint_every=2", "resume=latest") == 0
    state = json.loads((run / "checkpoints/checkpoint-00000004/trainer_state.json").read_text())
    assert state["step"] == 4 and damage(run / "checkpoints/checkpoint-00000004") is None
    whole = load_file(str(root / "run/adapter/nested_adapter.safetensors"))
    resumed = load_file(str(run / "adapter/nested_adapter.safetensors"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_no_whole_checkpoint_stops_with_one_sentence(run_copy, capsys):
    run, folder = run_copy
    for step in (2, 4):
        (run / f"checkpoints/checkpoint-{step:08d}/scheduler.json").write_text("")
    assert train(f"data={folder}", f"output_dir={run}", "max_steps=6", "resume=latest") == 2
    error = capsys.readouterr().err
    assert error.startswith("error: No whole checkpoint") and error.count("\n") == 1
    assert "checkpoint-00000002: scheduler.json" in error and "Traceback" not in error


KILL_DURING_REMOVAL = """
import os, signal, sys, torch
from pathlib import Path
import nested_attention_train.checkpoints as checkpoints
from nested_attention import NestedAdapter

directory, action = Path(sys.argv[1]), sys.argv[2]
adapter = NestedAdapter.from_pretrained(directory / "checkpoint-00000004" / "adapter")
optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=1e-3)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1)
real_unlink = os.unlink

def unlink_then_die(*args, **kwargs):  # the first file of a removal goes, then the process is killed
    real_unlink(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)

os.unlink = unlink_then_die
if action == "prune":
    checkpoints.prune_checkpoints(directory, keep=1)
else:  # save a step that already has a checkpoint: the old folder is removed
    checkpoints.save_checkpoint(directory, adapter, optimizer, scheduler, checkpoints.TrainState(step=4), False)
"""


@pytest.mark.parametrize("action", ["prune", "save the same step again"])
def test_kill_during_removal_leaves_only_whole_checkpoints(run_copy, action):
    run, folder = run_copy
    directory = run / "checkpoints"
    killed = subprocess.run([sys.executable, "-c", KILL_DURING_REMOVAL, str(directory), action],
                            env={"PYTHONPATH": str(SRC), "PATH": "", "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert list(directory.glob(".removing-*"))  # the half-removed folder is out of the way
    assert all(damage(path) is None for path in directory.glob("checkpoint-*"))
    assert checkpoints.resolve_resume(directory, "latest") == directory / "checkpoint-00000004"
    assert train(f"data={folder}", f"output_dir={run}", "max_steps=6", "checkpoint_every=2", "resume=latest") == 0
    assert sorted(p.name for p in directory.iterdir()) == ["checkpoint-00000004", "checkpoint-00000006"]
