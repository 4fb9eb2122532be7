"""The training loop: `main(argv)` for `nested-attention train` and `accelerate launch -m nested_attention_train`."""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration, DistributedType, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from nested_attention import AdapterCard, install
from nested_attention.errors import NestedAttentionError
from nested_attention.paths import check_writable

from . import data
from .checkpoints import TrainState, load_checkpoint, prune_checkpoints, resolve_resume, save_checkpoint
from .config import TrainConfig, load_config, save_config
from .models import BaseModel, load_adapter, load_base_model, named_image_encoder, parameter_groups
from .preflight import check_records
from .step import NestedTrainingModule
from .timesteps import timestep_weights
from .validation import save_grid, validation_grid

logger = logging.getLogger("nested_attention_train")

DESCRIPTION = """\
Train a Nested Attention adapter (Q-Former + nested projections) on (subject image, prompt, target image)
triplets; the base model and CLIP stay frozen. Runs on one CPU or, through `accelerate launch`, on many GPUs.
"""

EPILOG = """\
examples:
  nested-attention train --config configs/tiny-cpu.yaml data=path/to/folder
  nested-attention train --config configs/sdxl-faces-phase1.yaml data=ffhq-wild/{000..199}.tar resume=latest
  accelerate launch --num_processes 8 -m nested_attention_train --config configs/sdxl-faces-phase2.yaml \\
      init_adapter=outputs/faces-512/adapter

Any field of the config can be overridden as field=value (values are YAML: 1e-4, true, [0, 1], null).
"""


def parse_args(argv: list[str] | None) -> tuple[str | None, list[str]]:
    parser = argparse.ArgumentParser(
        prog="nested-attention train", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE",
                        help="YAML training config (see configs/), or an installed one's name (toy-person, toy-pet)")
    parser.add_argument("overrides", nargs="*", metavar="field=value", help="config fields to override")
    args = parser.parse_args(argv)
    return args.config, args.overrides


def step_seed(seed: int, micro_step: int, process: int) -> int:
    """A seed for one micro-batch: the same step draws the same noise, timesteps and dropout after a resume."""
    digest = hashlib.sha256(f"{seed}/{micro_step}/{process}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63


def several_processes_without_gpu() -> bool:
    """Several launched processes and no CUDA: DDP over gloo on the CPU.

    `accelerate launch --cpu` starts several processes only through MPI; `accelerate launch --multi_gpu
    --num_processes N` (torchrun) starts them anywhere, and this makes them meet on the CPU.
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def build_dataloader(
    config: TrainConfig, base: BaseModel, processor, num_processes: int
) -> tuple[torch.utils.data.DataLoader, object]:
    """Map-style (metadata.jsonl) or streaming (WebDataset shards) data, as the `data` field says.

    Streaming data is split among processes by shard (each process reads its own shards), so it needs at
    least as many shards as processes x workers.
    """
    common = dict(
        tokenizers=base.tokenizers, image_processor=processor, resolution=config.resolution, crop=config.crop,
        drop_text_rate=config.drop_text_rate, drop_image_rate=config.drop_image_rate,
        drop_both_rate=config.drop_both_rate, seed=config.seed, skip_bad=config.skip_bad_data,
        max_subject_images=config.max_subject_images,
    )
    if data.is_webdataset(config.data):
        if config.max_steps is None:
            raise NestedAttentionError("WebDataset shards have no length: set max_steps for a streaming run.")
        dataset = data.webdataset_pipeline(
            config.data, default_word=config.word, shuffle_buffer=config.shuffle_buffer,
            split_by_node=num_processes > 1, **common,
        )
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=config.train_batch_size, collate_fn=data.collate, num_workers=config.num_workers
        )
        return loader, dataset
    records, problems = data.read_metadata(config.data, default_word=config.word, skip_bad=config.skip_bad_data)
    dataset = data.TripletDataset(records, **common)
    dataset.records, bad = check_records(records, dataset.builder, config.skip_bad_data)  # before step 0
    problems += bad
    if problems:
        logger.warning("skipped %d bad records of %d (skip_bad_data): first: %s",
                       len(problems), len(problems) + len(dataset.records), problems[0])
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=config.train_batch_size, shuffle=True, collate_fn=data.collate,
        num_workers=config.num_workers, drop_last=len(dataset) >= config.train_batch_size,
        generator=torch.Generator().manual_seed(config.seed),
    )
    return loader, dataset


def train(config: TrainConfig, encoder: torch.nn.Module | None = None) -> Path:
    """Run (or resume) a training run; returns the folder of the exported adapter.

    ``encoder`` replaces the adapter's subject encoder (diagnostics that feed the nested layers other tokens, such
    as an oracle of the subject's true attributes): a module with ``image_encoder`` (the frozen CLIP), a
    ``query_tokens`` parameter (its device and dtype) and ``forward(pixel_values) -> (B, M, width)`` tokens. Its
    weights are exported with the adapter's; only that diagnostic can load them back."""
    output_dir = Path(config.output_dir)
    check_writable(output_dir, "output_dir")  # before hours of work, not at the first checkpoint
    accelerator = Accelerator(
        cpu=several_processes_without_gpu(),
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # the data order depends on (seed, epoch) only, so a resumed run sees the batches it would have seen
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
    )
    set_seed(config.seed)
    try:
        return run_training(config, accelerator, encoder)
    finally:
        if accelerator.num_processes == 1:
            # accelerate keeps process-wide state; reset it so that main(argv) can run again in this process
            # (tests, notebooks) with other settings. Several processes exit after one run.
            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()


def run_training(config: TrainConfig, accelerator: Accelerator, encoder: torch.nn.Module | None = None) -> Path:
    """Load the models and data, train, checkpoint, validate, export; returns the exported adapter's folder."""
    output_dir = Path(config.output_dir)
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        logger.warning("DeepSpeed: checkpoints keep the adapter and schedule; optimizer state is DeepSpeed's own "
                       "and is not saved, so a resumed run restarts Adam's moments.")
    base = load_base_model(config)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    base.pipe.to(accelerator.device, dtype=weight_dtype)
    if base.pipe.vae.config.get("force_upcast", False) and weight_dtype == torch.float16:
        base.pipe.vae.to(dtype=torch.float32)  # the SDXL VAE overflows in fp16
    adapter = load_adapter(config, base.pipe.unet)
    if encoder is not None:
        adapter.encoder = encoder.float().train()
    adapter.to(accelerator.device)
    adapter.encoder.image_encoder.to(dtype=weight_dtype)  # frozen; the trainable part stays fp32
    if config.gradient_checkpointing:
        base.pipe.unet.enable_gradient_checkpointing()
    controller = install(base.pipe.unet)
    weights = timestep_weights(
        config.timestep_bias_strategy, base.noise_scheduler.config.num_train_timesteps, config.timestep_bias_multiplier,
        config.timestep_bias_portion, config.timestep_bias_begin, config.timestep_bias_end,
    )
    module = NestedTrainingModule(adapter, base, controller, weights, config.snr_gamma, config.subject_loss_weight,
                                  config.train_lambda)
    optimizer = torch.optim.AdamW(
        parameter_groups(adapter, config), lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.weight_decay, eps=config.adam_epsilon,
    )
    loader, dataset = build_dataloader(config, base, adapter.image_processor, accelerator.num_processes)
    streaming = data.is_webdataset(config.data)
    if config.subject_loss_weight is not None and not streaming and not any(r.target_mask for r in dataset.records):
        raise NestedAttentionError(
            f"subject_loss_weight is {config.subject_loss_weight} but no record of {config.data} has a \"target_mask\" "
            f"(an image of the subject's pixels in white); add masks to the data or leave subject_loss_weight null."
        )
    if config.max_steps is not None:
        max_steps = config.max_steps
    else:
        max_steps = config.num_epochs * math.ceil(len(loader) / accelerator.num_processes / config.gradient_accumulation_steps)
    lr_scheduler = get_scheduler(
        config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
    )
    if streaming:  # already split by shard per process: accelerate must not dispatch or re-shard it
        module, optimizer, lr_scheduler = accelerator.prepare(module, optimizer, lr_scheduler)
    else:
        module, optimizer, loader, lr_scheduler = accelerator.prepare(module, optimizer, loader, lr_scheduler)

    checkpoints_dir = output_dir / "checkpoints"
    state = TrainState()
    resume_from = resolve_resume(checkpoints_dir, config.resume) if config.resume else None
    if resume_from is not None:
        deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        state = load_checkpoint(resume_from, adapter, None if deepspeed else optimizer, lr_scheduler)
        logger.info("resumed from %s at step %d", resume_from, state.step)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / "config.yaml")
        accelerator.init_trackers("nested_attention")
    save_image_encoder = named_image_encoder(config.image_encoder)  # self-contained: no name to resolve later

    progress = tqdm(total=max_steps, initial=state.step, disable=not accelerator.is_main_process, desc="train")
    window_start, window_samples = time.perf_counter(), 0
    recent_losses: deque[float] = deque(maxlen=config.log_every)  # for the model card
    while state.step < max_steps:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(state.epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(state.epoch)
        batches = loader
        if state.batch_in_epoch:  # resuming mid-epoch: the same order, minus the batches already seen
            batches = accelerator.skip_first_batches(loader, state.batch_in_epoch)
            if hasattr(batches, "set_epoch"):
                batches.set_epoch(state.epoch)  # the skipping loader counts epochs from 0 otherwise
        for batch in batches:
            state.batch_in_epoch += 1
            state.micro_step += 1
            size = 0 if batch is None else len(batch["sources"])
            sizes = accelerator.gather(torch.tensor([size], device=accelerator.device))
            state.skipped += config.train_batch_size - size if batch is None else batch["num_skipped"]
            if int(sizes.min()) == 0:  # a process got only bad samples (skip_bad_data): all skip together
                continue
            torch.manual_seed(step_seed(config.seed, state.micro_step, accelerator.process_index))
            with accelerator.accumulate(module):
                loss = module(batch)
                accelerator.backward(loss)
                controller.clear()  # the step's subjects were bound through backward (checkpoint recomputation)
                grad_norm = None
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(adapter.trainable_parameters(), config.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            batch_samples = int(sizes.sum())
            state.samples += batch_samples
            window_samples += batch_samples
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            progress.update(1)
            mean_loss = accelerator.gather(loss.detach()[None]).mean().item()
            recent_losses.append(mean_loss)
            if state.step % config.log_every == 0 or state.step == max_steps:
                elapsed = time.perf_counter() - window_start
                logs = {"loss": mean_loss, "lr": lr_scheduler.get_last_lr()[0],
                        "samples_per_second": window_samples / max(elapsed, 1e-9), "skipped": state.skipped}
                if grad_norm is not None:
                    logs["grad_norm"] = float(grad_norm)
                accelerator.log(logs, step=state.step)
                progress.set_postfix(loss=f"{mean_loss:.4f}", sps=f"{logs['samples_per_second']:.1f}")
                window_start, window_samples = time.perf_counter(), 0
            if state.step % config.checkpoint_every == 0 or state.step == max_steps:
                checkpoint(accelerator, checkpoints_dir, adapter, optimizer, lr_scheduler, state, config,
                           save_image_encoder)
            if config.validation_every and state.step % config.validation_every == 0:
                validate(accelerator, config, base, adapter, controller, state.step)
            if state.step >= max_steps:
                break
        else:
            state.epoch += 1
            state.batch_in_epoch = 0
    progress.close()
    check_replicas_agree(accelerator, adapter)

    final = output_dir / "adapter"
    if accelerator.is_main_process:
        card = AdapterCard(base_model=config.pretrained_model, training=card_training(
            config, "streamed (WebDataset)" if streaming else len(dataset), state,
            config.train_batch_size * accelerator.num_processes * config.gradient_accumulation_steps, recent_losses))
        adapter.save_pretrained(final, save_image_encoder=save_image_encoder, card=card)
        logger.info("exported the adapter to %s (skipped samples: %d)", final, state.skipped)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    controller.uninstall()
    return final


def card_training(config: TrainConfig, records, state: TrainState, batch_size: int, recent_losses) -> dict:
    """The model card's training table: the data, the run, the loss recipe where it is not plain, the final loss."""
    table = {
        "data": config.data, "records": records, "skipped samples": state.skipped, "optimizer steps": state.step,
        "batch size": batch_size, "learning rate": config.learning_rate, "resolution": config.resolution,
        "seed": config.seed,
    }
    if config.subject_loss_weight is not None:
        table["subject loss weight"] = config.subject_loss_weight
    if config.snr_gamma is not None:
        table["min-SNR gamma"] = config.snr_gamma
    if config.train_lambda != 1:
        table["trained at lambda"] = config.train_lambda  # the lambdas below it give identity back to the prompt
    if config.timestep_bias_strategy != "none":
        table["timestep bias"] = f"{config.timestep_bias_strategy}, x{config.timestep_bias_multiplier}"
    if recent_losses:
        table[f"final loss (mean of the last {len(recent_losses)} steps)"] = round(float(np.mean(recent_losses)), 5)
    return table


def check_replicas_agree(accelerator: Accelerator, adapter) -> None:
    """Every process must hold the same adapter weights (DDP keeps them in sync); a divergence is a bug."""
    flat = torch.cat([p.detach().double().flatten() for p in adapter.trainable_parameters()])
    positions = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
    signature = torch.stack([flat.sum(), (flat * positions).sum(), flat.abs().max()])[None]
    gathered = accelerator.gather(signature.to(accelerator.device))  # (processes, 3)
    if not bool((gathered == gathered[:1]).all()):
        raise RuntimeError(f"Adapter weights differ across processes: {gathered.tolist()}")
    logger.info("adapter weights agree across %d process(es)", accelerator.num_processes)


def checkpoint(accelerator, directory, adapter, optimizer, lr_scheduler, state, config, save_image_encoder):
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        path = save_checkpoint(directory, adapter, None if deepspeed else optimizer, lr_scheduler, state,
                               save_image_encoder)
        prune_checkpoints(directory, config.keep_checkpoints)
        logger.info("checkpoint %s", path)
    accelerator.wait_for_everyone()


def validate(accelerator, config, base, adapter, controller, step):
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        grid = validation_grid(config, base, adapter, controller)
        path = save_grid(grid, Path(config.output_dir), step)
        tracker = accelerator.get_tracker("tensorboard", unwrap=True)
        tracker.add_image("validation", torch.from_numpy(np.array(grid)).permute(2, 0, 1), step)
        logger.info("validation grid %s", path)
    accelerator.wait_for_everyone()


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 with one `error:` line for bad configs and bad data)."""
    try:
        config_path, overrides = parse_args(argv)
        train(load_config(config_path, overrides))
    except NestedAttentionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
