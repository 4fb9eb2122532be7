"""What every suite shares: presets, timing, peak memory, FLOP counting, the measured matrix rate, output.

Timing: `warmup` untimed calls, then `iters` calls, each timed with `time.perf_counter` with a device
synchronization (`torch.cuda.synchronize`) before and after, so all queued GPU work falls inside the interval.

Peak memory: the most bytes held by tensors during a call, above what was held when it started (inputs and
weights are not counted unless the suite adds them). On CUDA: `torch.cuda.max_memory_allocated()` after
`reset_peak_memory_stats()`, minus `memory_allocated()` at the start; the caching allocator's count of bytes in
live tensors, not reserved memory. On CPU there is no such counter, so the PyTorch profiler records every
allocation and free of the CPU allocator (`profile_memory=True`); sorted by time, their running sum is the
bytes in live tensors and its maximum is the peak. Like the CUDA number it counts tensors (also those autograd
saves for backward), not the process's RSS, so malloc caching and Python objects do not blur it. The profiler
slows the call down: memory is always measured in a run of its own, never in a timed one.

FLOPs: `torch.utils.flop_counter.FlopCounterMode` (matrix products, convolutions, attention; forward and
backward). The suites count on a copy of the model on the meta device: shapes only, no compute, no memory.

Presets: `--device cuda` runs the published sizes in bf16, `--device cpu` scaled-down sizes in fp32 (same code,
smaller shapes; each suite lists them), `--smoke` tiny sizes in fp32 that only show the suite works.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from nested_attention_toy.build import cpu_name

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MiB = 2**20

# ---- the SDXL UNet -------------------------------------------------------------------------------------------

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json, written out (no download). diffusers reads
# `attention_head_dim` as the number of heads here (its legacy naming): 10 heads of 64 at width 640, 20 at 1280.
SDXL_UNET = dict(
    act_fn="silu", addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280], center_input_sample=False,
    cross_attention_dim=2048, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    downsample_padding=1, dual_cross_attention=False, flip_sin_to_cos=True, freq_shift=0, in_channels=4,
    layers_per_block=2, mid_block_scale_factor=1, mid_block_type="UNetMidBlock2DCrossAttn", norm_eps=1e-5,
    norm_num_groups=32, only_cross_attention=False, out_channels=4, projection_class_embeddings_input_dim=2816,
    resnet_time_scale_shift="default", sample_size=128, time_embedding_type="positional",
    transformer_layers_per_block=[1, 2, 10], up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    upcast_attention=None, use_linear_projection=True,
)

UNET_CONFIGS = {
    "cuda": SDXL_UNET,
    # SDXL's blocks, depths, 70 cross-attention layers, head size 64 and 77 x 2048 text, at 2/5 of the width
    "cpu": {**SDXL_UNET, "block_out_channels": [128, 256, 512], "attention_head_dim": [2, 4, 8], "sample_size": 64},
    "smoke": {
        **SDXL_UNET, "block_out_channels": [32, 64, 64], "attention_head_dim": [1, 2, 2], "layers_per_block": 1,
        "transformer_layers_per_block": [1, 1, 1], "cross_attention_dim": 64, "norm_num_groups": 8,
        "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 6 * 8 + 32, "sample_size": 8,
    },
}


def unet_inputs(config: dict, batch: int, resolution: int, device, dtype, seed: int = 0):
    """Random latents, text context (77 tokens) and SDXL's added conditions for a UNet of `config`.

    Returns (latents (B, 4, r/8, r/8), context (B, 77, cross_attention_dim), added_cond_kwargs).
    """
    generator = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=generator).to(device, dtype)  # noqa: E731
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    size = resolution // 8
    time_ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=dtype, device=device)
    added = {"text_embeds": rand(batch, pooled), "time_ids": time_ids.expand(batch, 6)}
    return rand(batch, config["in_channels"], size, size), rand(batch, 77, config["cross_attention_dim"]), added


# ---- command line --------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What one invocation measures on: device, dtype, preset name ("cuda", "cpu" or "smoke"), output path."""

    device: torch.device
    dtype: torch.dtype
    preset: str
    out: Path


def parser(suite: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{suite}", description=description)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, seconds on a CPU: checks the code, numbers mean nothing")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on cuda, fp32 on cpu and with --smoke")
    p.add_argument("--out", help="the JSON file, a markdown table beside it (default results/<suite>-<preset>.json)")
    return p


def run_settings(suite: str, args: argparse.Namespace) -> Run:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device; use --device cpu.")
    preset = "smoke" if args.smoke else args.device
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if preset == "cuda" else torch.float32)
    out = Path(args.out or f"results/{suite}-{preset}.json")
    diffusers.utils.logging.set_verbosity_error()  # its warning on .to(dtype) casts is noise for random weights
    return Run(torch.device(args.device), dtype, preset, out)


def environment(run: Run) -> dict:
    info = {
        "torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
        "device": str(run.device), "dtype": str(run.dtype).removeprefix("torch."), "preset": run.preset,
        "cpu": cpu_name(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if run.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(run.device)
    return info


# ---- measuring -----------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, warmup: int, iters: int) -> dict:
    """Milliseconds per call of `fn` (mean, median, min over `iters` timed calls after `warmup` untimed ones)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    ordered = sorted(times)
    return {"mean_ms": sum(times) / len(times), "median_ms": ordered[len(ordered) // 2], "min_ms": ordered[0],
            "iters": iters}


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes in live tensors during one call of `fn`, above those live when it starts (see module doc)."""
    if device.type == "cuda":
        sync(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - start
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = [e for e in prof.profiler.kineto_results.events()
               if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    live = peak = 0
    for record in sorted(records, key=lambda e: e.start_ns()):
        live += record.nbytes()
        peak = max(peak, live)
    return peak


# scaled_dot_product_attention on CPU runs kernels that FlopCounterMode does not know; same formulas as on GPU
_CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
        lambda grad, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad, q, k, v),
}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of `fn` (2 per multiply-add), counted by FlopCounterMode."""
    with FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


MATMUL_SIZES = {"cuda": 8192, "cpu": 1024, "smoke": 128}


def matmul_rate(run: Run) -> dict:
    """The device's measured dense matrix-product rate in `run.dtype` (square matrices, median of 10)."""
    size = MATMUL_SIZES[run.preset]
    a = torch.randn(size, size, device=run.device, dtype=run.dtype)
    b = torch.randn(size, size, device=run.device, dtype=run.dtype)
    ms = time_call(lambda: a @ b, run.device, warmup=2, iters=10)["median_ms"]
    return {"size": size, "dtype": str(run.dtype).removeprefix("torch."), "flops_per_s": 2 * size**3 / (ms / 1e3)}


# ---- output --------------------------------------------------------------------------------------------------


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Columns are (header, key, format spec); a missing or None value prints as an empty cell."""
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [format(row[key], spec) if row.get(key) is not None else "" for _, key, spec in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(run: Run, payload: dict, table: str) -> None:
    """Write the JSON and the markdown table beside it (same name, .md), and print the table."""
    run.out.parent.mkdir(parents=True, exist_ok=True)
    run.out.write_text(json.dumps(payload, indent=2) + "\n")
    header = f"{payload['suite']} on {payload['environment'].get('gpu', payload['environment']['cpu'])} " \
             f"({run.preset} preset, {payload['environment']['dtype']})"
    run.out.with_suffix(".md").write_text(f"{header}\n\n{table}\n")
    print(f"{header}\n\n{table}\n\nwrote {run.out} and {run.out.with_suffix('.md')}")
