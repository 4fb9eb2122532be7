"""Training end to end on tiny models: learning, exact resume, atomic checkpoints, DDP, export, bad data."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

import nested_attention_train.checkpoints as checkpoints
from conftest import subject_image
from nested_attention import NestedAdapter, install
from nested_attention_cli.main import main as cli_main
from nested_attention_train import data
from nested_attention_train.config import load_config
from nested_attention_train.models import load_adapter, load_base_model
from nested_attention_train.step import NestedTrainingModule
from nested_attention_train.trainer import main as train_main

CONFIGS = Path(__file__).parent.parent / "configs"
TINY = str(CONFIGS / "tiny-cpu.yaml")


def make_triplets(folder: Path, count: int = 4, prompt: str = "a photo of a person") -> Path:
    """Pets-style triplets (subject image = target image) of distinct colour-block subjects."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        subject_image(i, size=48).save(folder / f"s{i}.png")
        lines.append(json.dumps({"subject": f"s{i}.png", "target": f"s{i}.png", "prompt": prompt}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def triplets(tmp_path_factory):
    return make_triplets(tmp_path_factory.mktemp("triplets"))


def run(*args) -> int:
    return train_main(["--config", TINY, *args])


def adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "nested_adapter.safetensors"))


def training_parts(overrides: list[str], adapter_dir: Path | None = None):
    """(base, adapter in eval mode, installed controller, one batch of every record) of the TINY config."""
    config = load_config(TINY, overrides)
    base = load_base_model(config)
    adapter = load_adapter(config, base.pipe.unet) if adapter_dir is None else NestedAdapter.from_pretrained(adapter_dir)
    adapter.eval()
    controller = install(base.pipe.unet)
    records, _ = data.read_metadata(config.data, default_word=config.word)
    dataset = data.TripletDataset(records, base.tokenizers, adapter.image_processor, config.resolution, crop="center")
    return base, adapter, controller, data.collate([dataset[i] for i in range(len(dataset))])


@torch.no_grad()
def fixed_loss(overrides: list[str], adapter_dir: Path | None = None) -> float:
    """The training loss on every triplet at fixed noise and timesteps (8 draws): comparable across adapters."""
    base, adapter, controller, batch = training_parts(overrides, adapter_dir)
    module = NestedTrainingModule(adapter, base, controller)
    losses = []
    for seed in range(8):
        torch.manual_seed(1000 + seed)
        losses.append(module(batch).item())
        controller.clear()
    controller.uninstall()
    return sum(losses) / len(losses)


@pytest.mark.parametrize("model", ["tiny-sd", "tiny-sdxl"])
def test_loss_falls_when_overfitting(triplets, tmp_path, model):
    """150 steps on 4 triplets lower the loss at fixed noise and timesteps.

    alpha is off here: in a random UNet the subject word gets ~1/77 of every query's attention, so a value
    capped at 2 |V[s*]| has almost no leverage on the output (trained UNets attend to the subject word).
    """
    overrides = [f"data={triplets}", f"pretrained_model={model}", "alpha=null", "learning_rate=1e-2"]
    assert run(*overrides, f"output_dir={tmp_path}", "max_steps=150", "checkpoint_every=1000", "log_every=50") == 0
    before, after = fixed_loss(overrides), fixed_loss(overrides, tmp_path / "adapter")
    assert after < 0.97 * before, (before, after)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    folder = make_triplets(tmp_path / "data", count=5)  # batch 2, drop_last: 2 batches per epoch
    common = [f"data={folder}", "train_batch_size=2", "checkpoint_every=3", "lr_scheduler=constant"]
    assert run(*common, f"output_dir={tmp_path / 'whole'}", "max_steps=7") == 0
    # the interrupted run stops after step 3 (mid-epoch), then resumes from its latest checkpoint
    assert run(*common, f"output_dir={tmp_path / 'split'}", "max_steps=3") == 0
    state = json.loads((tmp_path / "split/checkpoints/checkpoint-00000003/trainer_state.json").read_text())
    assert state["epoch"] == 1 and state["batch_in_epoch"] == 1
    at_step_3 = adapter_weights(tmp_path / "split/checkpoints/checkpoint-00000003/adapter")
    assert run(*common, f"output_dir={tmp_path / 'split'}", "max_steps=7", "resume=latest") == 0
    whole, split = adapter_weights(tmp_path / "whole/adapter"), adapter_weights(tmp_path / "split/adapter")
    assert whole.keys() == split.keys() and all(torch.equal(whole[k], split[k]) for k in whole)
    assert not all(torch.equal(whole[k], at_step_3[k]) for k in whole)  # the resumed steps did train
    kept = sorted(p.name for p in (tmp_path / "split/checkpoints").iterdir())
    assert kept == ["checkpoint-00000006", "checkpoint-00000007"]  # keep_checkpoints: 2 in tiny-cpu.yaml


def test_second_phase_starts_from_the_first_phase_adapter(triplets, tmp_path):
    """The paper's two phases are two runs of one command: 512 then 1024 from the first run's adapter."""
    assert run(f"data={triplets}", f"output_dir={tmp_path / 'p1'}", "max_steps=2", "resolution=32") == 0
    # learning rate 0: phase 2 must end exactly where phase 1 ended, at twice the resolution
    assert run(f"data={triplets}", f"output_dir={tmp_path / 'p2'}", "max_steps=2", "resolution=64",
               f"init_adapter={tmp_path / 'p1' / 'adapter'}", "learning_rate=0", "weight_decay=0") == 0
    phase1, phase2 = adapter_weights(tmp_path / "p1/adapter"), adapter_weights(tmp_path / "p2/adapter")
    assert phase1.keys() == phase2.keys() and all(torch.equal(phase1[k], phase2[k]) for k in phase1)
    assert run(f"data={triplets}", f"output_dir={tmp_path / 'p3'}", "max_steps=1", "pretrained_model=tiny-sdxl",
               f"init_adapter={tmp_path / 'p1' / 'adapter'}") == 2  # an SD 1.5 adapter on SDXL: refused


def test_streaming_resume_gives_the_same_weights(triplets, tmp_path):
    records, _ = data.read_metadata(triplets, default_word="person")
    data.write_shards(records, str(tmp_path / "shards" / "%03d.tar"), max_count=2)
    common = [f"data={tmp_path / 'shards' / '{000..001}.tar'}", "train_batch_size=1", "shuffle_buffer=4",
              "lr_scheduler=constant", "checkpoint_every=1"]
    assert run(*common, f"output_dir={tmp_path / 'whole'}", "max_steps=6") == 0
    assert run(*common, f"output_dir={tmp_path / 'split'}", "max_steps=3") == 0  # mid-epoch: 4 samples per epoch
    assert run(*common, f"output_dir={tmp_path / 'split'}", "max_steps=6", "resume=latest") == 0
    whole, split = adapter_weights(tmp_path / "whole/adapter"), adapter_weights(tmp_path / "split/adapter")
    assert all(torch.equal(whole[k], split[k]) for k in whole)


def test_half_written_checkpoint_is_never_picked_up(triplets, tmp_path, monkeypatch):
    assert run(f"data={triplets}", f"output_dir={tmp_path}", "max_steps=4", "checkpoint_every=2") == 0
    directory = tmp_path / "checkpoints"
    latest = checkpoints.resolve_resume(directory, "latest")
    assert latest.name == "checkpoint-00000004"
    # a save that crashes half way leaves only a temporary folder
    monkeypatch.setattr(checkpoints, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    adapter = NestedAdapter.from_pretrained(latest / "adapter")
    with pytest.raises(OSError, match="disk full"):
        checkpoints.save_checkpoint(directory, adapter, torch.optim.SGD(adapter.trainable_parameters(), lr=1),
                                    torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1)], lr=1), lambda s: 1),
                                    checkpoints.TrainState(step=6), save_image_encoder=True)
    assert list(directory.glob(".tmp-checkpoint-00000006-*"))
    (directory / "checkpoint-00000008").mkdir()  # a folder without its manifest
    (directory / "checkpoint-00000008" / "trainer_state.json").write_text("{}")
    assert checkpoints.resolve_resume(directory, "latest") == latest
    checkpoints.prune_checkpoints(directory, keep=5)
    assert not list(directory.glob(".tmp-*"))
    monkeypatch.undo()
    assert run(f"data={triplets}", f"output_dir={tmp_path}", "max_steps=6", "checkpoint_every=2", "resume=latest") == 0
    assert json.loads((directory / "checkpoint-00000006" / "trainer_state.json").read_text())["step"] == 6


@pytest.mark.parametrize("source", ["jsonl", "webdataset"])
def test_two_processes_agree_and_export_one_adapter(triplets, tmp_path, source):
    """gloo DDP on the CPU. `accelerate launch --cpu` starts several processes only through MPI; the
    torchrun-based launcher (--multi_gpu) starts them anywhere and the trainer meets them on the CPU."""
    if source == "webdataset":  # one shard per process: streaming data is split by shard
        records, _ = data.read_metadata(triplets, default_word="person")
        data.write_shards(records, str(tmp_path / "shards" / "%03d.tar"), max_count=2)
        location = str(tmp_path / "shards" / "{000..001}.tar")
    else:
        location = str(triplets)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as probe:  # a free port: never collide with another run's rendezvous on 29500
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
        "-m", "nested_attention_train", "--config", TINY, f"data={location}", f"output_dir={tmp_path}",
        "max_steps=3", "train_batch_size=1", "checkpoint_every=3",
    ]
    # a session of its own, so that a hang can be ended with every process the launcher started
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        for worker in psutil.process_iter(["cmdline"]):  # torchrun's workers can sit outside the launcher's session
            if f"output_dir={tmp_path}" in (worker.info["cmdline"] or []):
                worker.kill()
        _, stderr = process.communicate(timeout=60)
        pytest.fail(f"2-process training hung; its last output:\n{stderr[-4000:]}")
    assert process.returncode == 0, stderr[-3000:]
    assert "adapter weights agree across 2 process(es)" in stderr
    assert (tmp_path / "adapter" / "nested_adapter.safetensors").is_file()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["checkpoint-00000003"]


def test_exported_adapter_generates_through_the_cli(triplets, tmp_path, capsys):
    assert run(f"data={triplets}", f"output_dir={tmp_path}", "max_steps=2") == 0
    out = tmp_path / "image.png"
    code = cli_main(["generate", "--model", "tiny-sd", "--adapter", str(tmp_path / "adapter"),
                     "--image", str(triplets / "s0.png"), "--prompt", "a photo of a person", "--steps", "2",
                     "--out", str(out)])
    assert code == 0 and out.is_file()


def test_encoder_learning_rate_is_its_own_group(triplets, tmp_path):
    """`encoder_learning_rate` gives the Q-Former and its queries their own rate: at 0 they leave two steps exactly
    as they started (AdamW's decoupled weight decay is scaled by the rate too) while every projection moves."""
    overrides = [f"data={triplets}", "encoder_learning_rate=0"]
    assert run(*overrides, f"output_dir={tmp_path}", "max_steps=2") == 0
    config = load_config(TINY, overrides)
    fresh = load_adapter(config, load_base_model(config).pipe.unet).adapter_state_dict()  # the run's start (same seed)
    trained = NestedAdapter.from_pretrained(tmp_path / "adapter").adapter_state_dict()
    encoder = [k for k in fresh if k.startswith("encoder.")]
    projections = [k for k in fresh if k.startswith("layers.")]
    assert encoder and projections and len(encoder) + len(projections) == len(fresh)
    assert all(torch.equal(fresh[k], trained[k]) for k in encoder)
    assert not any(torch.equal(fresh[k], trained[k]) for k in projections)


def test_key_init_gain_scales_only_the_fresh_keys(triplets):
    """`key_init_gain` multiplies a fresh adapter's nested key projections and nothing else (4 is a power of two, so
    the product is exact)."""
    def fresh(*overrides):
        config = load_config(TINY, [f"data={triplets}", *overrides])
        return load_adapter(config, load_base_model(config).pipe.unet).adapter_state_dict()

    plain, scaled = fresh(), fresh("key_init_gain=4")
    keys = [k for k in plain if k.endswith("to_k.weight")]
    assert keys and plain.keys() == scaled.keys()
    assert all(torch.equal(scaled[k], 4 * plain[k]) for k in keys)
    assert all(torch.equal(scaled[k], plain[k]) for k in plain if k not in keys)


def test_bad_learning_rate_or_key_gain_is_one_error_line(capsys):
    assert run("data=x", "encoder_learning_rate=-1") == 2
    assert "`encoder_learning_rate` is -1.0; expected a finite number of at least 0 or null" in capsys.readouterr().err
    assert run("data=x", "key_init_gain=0") == 2
    assert "`key_init_gain` is 0.0; expected a positive finite number, e.g. 1" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["decoupled", "simple", "global_v", "multi_token"])
def test_rival_mechanism_trains_by_one_config_field(triplets, tmp_path, kind):
    """`mechanism=X` on the command line trains that mechanism: every projection gets a gradient, two steps move
    every weight, and the exported adapter carries its mechanism and generates through the wrapper."""
    overrides = [f"data={triplets}", f"mechanism={kind}"]
    assert cli_main(["train", "--config", TINY, *overrides, f"output_dir={tmp_path}", "max_steps=2"]) == 0
    exported = NestedAdapter.from_pretrained(tmp_path / "adapter")
    assert exported.config.mechanism == kind
    config = load_config(TINY, overrides)
    base = load_base_model(config)
    adapter = load_adapter(config, base.pipe.unet)  # the run's starting point (same seed)
    fresh, trained = adapter.adapter_state_dict(), exported.adapter_state_dict()
    assert fresh.keys() == trained.keys() and not any(torch.equal(fresh[k], trained[k]) for k in fresh)
    controller = install(base.pipe.unet)
    records, _ = data.read_metadata(config.data, default_word=config.word)
    dataset = data.TripletDataset(records, base.tokenizers, adapter.image_processor, config.resolution, crop="center")
    torch.manual_seed(0)
    NestedTrainingModule(adapter, base, controller)(data.collate([dataset[i] for i in range(2)])).backward()
    controller.uninstall()
    projections = {n: p for n, p in adapter.named_parameters() if n.startswith("layers.")}
    assert projections and all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in projections.values())

    from nested_attention import NestedAttention, Subject

    na = NestedAttention(base.pipe)
    na.load_adapter(exported)
    kwargs = dict(num_inference_steps=2, height=32, width=32, output_type="latent")
    ours = na("a photo of a person", {"person": Subject(str(triplets / "s0.png"))}, **kwargs,
              generator=torch.Generator().manual_seed(0)).images
    na.uninstall()
    base_image = base.pipe("a photo of a person", **kwargs, generator=torch.Generator().manual_seed(0)).images
    assert (ours - base_image).abs().max() > 2e-3


def test_bad_data_stops_with_file_and_line_or_is_skipped_and_counted(tmp_path, capsys, caplog):
    folder = make_triplets(tmp_path / "data", count=3)
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    lines.insert(1, '{"subject": "s0.png", "target": "missing.png", "prompt": "a photo of a person"}')
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    assert run(f"data={folder}", f"output_dir={tmp_path / 'a'}", "max_steps=1") == 2
    error = capsys.readouterr().err
    assert "metadata.jsonl:2" in error and "missing.png" in error and "Traceback" not in error
    with caplog.at_level("WARNING"):
        assert run(f"data={folder}", f"output_dir={tmp_path / 'b'}", "max_steps=1", "skip_bad_data=true") == 0
    assert "skipped 1 bad records of 4" in caplog.text
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metadata.jsonl").write_text("\n")
    assert run(f"data={tmp_path / 'empty'}", f"output_dir={tmp_path / 'c'}", "max_steps=1") == 2
    assert "error:" in capsys.readouterr().err


def test_webdataset_shards_mixed_precision_checkpointing_and_accumulation(triplets, tmp_path):
    records, _ = data.read_metadata(triplets, default_word="person")
    shards = data.write_shards(records, str(tmp_path / "shards" / "%03d.tar"), max_count=2)
    assert len(shards) == 2
    pattern = str(tmp_path / "shards" / "{000..001}.tar")
    assert run(f"data={pattern}", f"output_dir={tmp_path / 'out'}", "max_steps=2", "train_batch_size=2",
               "mixed_precision=bf16", "gradient_checkpointing=true", "gradient_accumulation_steps=2",
               "shuffle_buffer=4", "pretrained_model=tiny-sdxl") == 0
    weights = adapter_weights(tmp_path / "out" / "adapter")
    assert all(t.dtype == torch.float32 for t in weights.values())  # trainable weights stay fp32
    state = json.loads((tmp_path / "out/checkpoints/checkpoint-00000002/trainer_state.json").read_text())
    assert state["step"] == 2 and state["micro_step"] == 4


def test_validation_grid_and_tensorboard_scalars(triplets, tmp_path):
    assert run(f"data={triplets}", f"output_dir={tmp_path}", "max_steps=2", "validation_every=2", "log_every=1",
               f"validation_images=[{triplets / 's0.png'}, {triplets / 's1.png'}]",
               "validation_prompts=['a photo of a person', 'a person at the beach']", "validation_seeds=[0, 1]",
               "validation_steps=2") == 0
    from PIL import Image

    grid = Image.open(tmp_path / "validation" / "step-00000002.png")
    assert grid.size == (3 * 32, 4 * 32)  # input + 2 prompts; 2 subjects x 2 seeds
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert {"loss", "lr", "grad_norm", "samples_per_second"} <= set(events.Tags()["scalars"])
    assert "validation" in events.Tags()["images"]


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_are_valid(name):
    config = load_config(CONFIGS / name, ["data=somewhere"])
    if name.startswith("sdxl-faces"):
        assert config.num_queries == 1024 and config.word == "person"
    if name.startswith("sdxl-pets"):
        assert config.num_queries == 256 and config.word == "pet"
    if name.endswith("phase2.yaml"):
        assert config.resolution == 1024 and config.gradient_checkpointing


def test_bad_config_is_one_error_line(capsys):
    assert run("data=x", "lerning_rate=1") == 2
    assert "Did you mean learning_rate" in capsys.readouterr().err
    assert train_main(["--config", "toy-persn", "data=x"]) == 2
    error = capsys.readouterr().err
    assert "is no such file; give a YAML file" in error and "toy-person, toy-pet" in error and "Traceback" not in error


@pytest.mark.parametrize("name", ["toy-person", "toy-pet"])
def test_an_installed_config_loads_by_name(name):
    config = load_config(name, ["data=somewhere"])
    assert config.word == name.removeprefix("toy-") and config.pretrained_model == "toy" and config.data == "somewhere"


def test_unknown_mechanism_is_one_error_line(capsys):
    assert run("data=x", "mechanism=ip_adapter") == 2
    error = capsys.readouterr().err
    assert "`mechanism` is 'ip_adapter'; expected one of nested, decoupled, simple, global_v, multi_token" in error
    assert "Traceback" not in error


def test_make_shards_command(triplets, tmp_path, capsys):
    from nested_attention_train.make_shards import main as make_shards

    assert make_shards([str(triplets), str(tmp_path / "train-%03d.tar"), "--per-shard", "3", "--word", "person"]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["train-000.tar", "train-001.tar"]
    assert make_shards([str(tmp_path / "nowhere"), str(tmp_path / "x-%03d.tar")]) == 2
    assert "No training metadata" in capsys.readouterr().err


def test_corrupt_image_found_during_training(tmp_path, capsys):
    folder = make_triplets(tmp_path / "data", count=4)
    subject_image(2, size=48).save(folder / "s2.png", format="JPEG")  # JPEG data under a .png name: decoded by content
    jpeg = (folder / "s2.png").read_bytes()
    (folder / "s2.png").write_bytes(jpeg[:-40])  # cut short in its image data: the header passes the pre-flight check
    common = [f"data={folder}", "train_batch_size=1", "lr_scheduler=constant"]
    assert run(*common, f"output_dir={tmp_path / 'stop'}", "max_steps=4") == 2
    error = capsys.readouterr().err
    assert "metadata.jsonl:3" in error and "Traceback" not in error
    assert run(*common, f"output_dir={tmp_path / 'skip'}", "max_steps=4", "skip_bad_data=true") == 0
    state = json.loads((tmp_path / "skip/checkpoints/checkpoint-00000004/trainer_state.json").read_text())
    assert state["skipped"] >= 1 and state["step"] == 4 and state["micro_step"] == 4 + state["skipped"]
