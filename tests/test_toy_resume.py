"""`toy build --resume`: an interrupted build goes on where it stopped and ends with exactly the files of an
uninterrupted one (CPU, smoke size)."""

import json

import pytest
import torch
from safetensors.torch import load_file

import nested_attention_toy.stages as stages_module
import nested_attention_train.trainer as trainer_module
from nested_attention_toy.build import CHECKPOINT, PARTIAL, SMOKE, build
from nested_attention_toy.diffusion import TextTraining, make_unet, train_unet
from nested_attention_toy.resume import saved_progress
from test_cli import run_cli


class Interrupted(Exception):
    pass


class _StopAt:
    """A progress bar that stops the build (as a crash or Ctrl-C would) after ``steps`` updates."""

    def __init__(self, steps: int):
        self.steps, self.n = steps, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, count: int = 1) -> None:
        self.n += count
        if self.n >= self.steps:
            raise Interrupted

    def set_postfix(self, **values) -> None:
        pass

    def close(self) -> None:
        pass


_REAL_BAR = stages_module._bar


def _interrupt(monkeypatch, stage: str, steps: int) -> None:
    real = _REAL_BAR
    monkeypatch.setattr(stages_module, "_bar", lambda total, desc: _StopAt(steps) if desc == stage else real(total, desc))


def _interrupt_training(monkeypatch, steps: int) -> None:
    """Stop the adapter trainer (its progress bar) after ``steps`` optimizer steps."""
    real = trainer_module.tqdm
    monkeypatch.setattr(trainer_module, "tqdm", lambda *a, **k: _StopAt(steps) if k.get("desc") == "train" else real(*a, **k))


MODEL_FILES = ("pipeline/unet/diffusion_pytorch_model.safetensors", "pipeline/text_encoder/model.safetensors",
               "pipeline/vae/diffusion_pytorch_model.safetensors", "pipeline/image_encoder/model.safetensors",
               "clip/model.safetensors", "metrics/factor_classifier/model.safetensors",
               "metrics/identity_person/model.safetensors", "pipeline/unet/config.json", "pipeline/vae/config.json",
               "adapters/person/nested_adapter.safetensors", "adapters/pet/nested_adapter.safetensors")


def test_an_interrupted_build_resumes_to_the_files_of_an_uninterrupted_one(smoke_build, tmp_path, monkeypatch, capsys):
    reference = json.loads((smoke_build / "build.json").read_text())  # uninterrupted, from the command line

    out = tmp_path / "interrupted"
    _interrupt(monkeypatch, "clip", 3)  # mid-stage: the CLIP stage runs again
    with pytest.raises(Interrupted):
        build(out, SMOKE, workers=1)
    partial = json.loads((out / PARTIAL).read_text())
    assert list(partial["stages"]) == ["tokenizer", "corpus", "metrics"] and not (out / "build.json").exists()

    _interrupt(monkeypatch, "unet", 7)  # the UNet saved its state at step 4 (unet_checkpoint_every) and stops at 7
    with pytest.raises(Interrupted):
        build(out, resume=True, workers=1)
    assert saved_progress(out / CHECKPOINT)[0] == 4
    assert "vae" in json.loads((out / PARTIAL).read_text())["stages"]
    monkeypatch.undo()

    _interrupt_training(monkeypatch, 3)  # the person adapter's trainer saved its state at step 2 and stops at 3
    with pytest.raises(Interrupted):
        build(out, resume=True, workers=1)
    assert (out / "adapter-runs/person/checkpoints/checkpoint-00000002").is_dir()
    assert list(json.loads((out / PARTIAL).read_text())["stages"])[-1] == "pet_triplets"
    monkeypatch.undo()

    assert run_cli("toy", "build", "--out", str(out), "--resume", "--workers", "1") == 0
    for name in MODEL_FILES:
        assert (out / name).read_bytes() == (smoke_build / name).read_bytes(), name
    record = json.loads((out / "build.json").read_text())
    for measured in (record, reference):
        del measured["measurements"]["metric_models"]["seconds"]  # a wall time, the only thing that may differ
    assert record["measurements"] == reference["measurements"]
    for key in ("loss_first", "loss_last"):
        assert record["stages"]["unet"][key] == reference["stages"]["unet"][key]
    assert record["stages"]["unet"]["resumed_at_step"] == 4
    assert [r["stages_done"] for r in record["resumed"]] == [
        ["tokenizer", "corpus", "metrics"], ["tokenizer", "corpus", "metrics", "clip", "vae"],
        ["tokenizer", "corpus", "metrics", "clip", "vae", "unet", "pipeline", "evaluate", "person_triplets",
         "pet_triplets"]]
    assert record["size"] == reference["size"] and record["seed"] == reference["seed"]
    assert not (out / PARTIAL).exists() and not (out / CHECKPOINT).exists()
    assert "going on from the training state saved at step 4" in (out / "build.log").read_text()

    # a finished build, an empty folder and flags that would change the build are refused, with one sentence
    capsys.readouterr()
    assert run_cli("toy", "build", "--out", str(out), "--resume") == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert run_cli("toy", "build", "--out", str(tmp_path / "none"), "--resume") == 2
    assert "no interrupted build" in capsys.readouterr().err
    assert run_cli("toy", "build", "--out", str(out), "--resume", "--smoke", "--seed", "1") == 2
    assert "drop --smoke, --seed" in capsys.readouterr().err


def test_unet_training_resumes_from_its_saved_state_bit_for_bit(tmp_path):
    """The loop alone, with the text encoder trained along: stopped after 5 of 8 steps (state saved at 3), resumed."""
    from transformers import CLIPTextConfig, CLIPTextModel

    def run(checkpoint, stop_at=None):
        torch.manual_seed(0)
        encoder = CLIPTextModel(CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, max_position_embeddings=8,
                                               bos_token_id=0, eos_token_id=1, pad_token_id=1))
        unet = make_unet(16, widths=(16, 32), sample_size=8)
        generator = torch.Generator().manual_seed(1)
        means, stds = torch.randn(12, 4, 8, 8, generator=generator), torch.rand(12, 4, 8, 8, generator=generator) * 0.1
        text = TextTraining(encoder, torch.randint(0, 50, (12, 8), generator=generator), torch.zeros(8, dtype=torch.long), 1e-3)
        progress = _StopAt(stop_at) if stop_at else None
        model, losses = train_unet(unet, means, stds, 0.5, None, None, 8, batch_size=4, lr=1e-3, progress=progress,
                                   text=text, checkpoint=checkpoint, checkpoint_every=3)
        return model.state_dict(), encoder.state_dict(), losses

    unet, encoder, losses = run(None)
    with pytest.raises(Interrupted):
        run(tmp_path / "state", stop_at=5)
    assert saved_progress(tmp_path / "state")[0] == 3
    assert set(load_file(str(tmp_path / "state" / "models.safetensors"))) >= {"ema.conv_in.weight", "text_ema.final_layer_norm.weight"}
    resumed_unet, resumed_encoder, resumed_losses = run(tmp_path / "state")
    assert resumed_losses == losses
    for mine, theirs in ((resumed_unet, unet), (resumed_encoder, encoder)):
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert saved_progress(tmp_path / "state")[0] == 8  # the last state is the end


def test_build_size_changes_are_parsed_and_checked():
    from nested_attention.errors import NestedAttentionError
    from nested_attention_cli.toy import build_size
    from nested_attention_toy.build import FULL

    size = build_size(FULL, ["unet_batch=128", "unet_lr=2e-4", "unet_widths=[64, 128, 256]", "grounding_weight=0"])
    assert (size.unet_batch, size.unet_lr, size.unet_widths, size.grounding_weight) == (128, 2e-4, (64, 128, 256), 0.0)
    assert size.unet_steps == FULL.unet_steps and build_size(FULL, []) == FULL
    for bad, message in (("unet_batch=0", "at least 1"), ("describe_rate=1.5", "between 0 and 1"),
                         ("grounding_target=2.0", "between 0 and 1"),
                         ("unet_widths=[24]", "multiples of 16"), ("unet_bach=8", "Did you mean unet_batch"),
                         ("unet_batch=big", "must be int"), ("unet_batch", "field=value")):
        with pytest.raises(NestedAttentionError, match=message):
            build_size(FULL, [bad])
