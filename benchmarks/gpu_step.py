"""Suite 6: the guided SDXL step on a GPU, eager and replayed as a CUDA graph, and where each layer call's time goes.

One script for a short GPU lease (estimated at a few minutes on an H100). SDXL's UNet from its
published config with random weights (`common.SDXL_UNET`), 1024 x 1024, bf16, guidance batch 2 (negative prompt,
prompt with the subject word); nested keys/values random, one subject, n_q 256 and 1024.

- layers: one SDXL 64x64 and one 32x32 cross-attention layer of the UNet, called alone: host enqueue time (the
  call returns, nothing waits), CUDA-event time (the GPU's), and the SDPA kernels the call launches (profiler);
  vanilla, nested (one path) and nested-wrapping (`install(..., one_path=False)`).
- step: ms per guided UNet call, eager and replayed as one CUDA graph (`torch.cuda.CUDAGraph` around the UNet
  call, the subject in the controller's static buffers). The graphed nested step is captured with one subject and
  replayed for a second one bound afterwards, whose output is checked against the eager step.
- trace: one eager step per method under the profiler: GPU busy time (the union of kernel intervals) against wall.

Goals (issue 28): graphed nested / graphed vanilla <= 1.05 at n_q 256 and <= 1.10 at 1024; graphed nested against
eager vanilla reported beside it. `--smoke` runs a tiny UNet on the CPU (no graphs, no events): it checks the code.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch
from diffusers import UNet2DConditionModel
from torch.profiler import ProfilerActivity, profile

from nested_attention import BoundSubject, install

from .common import UNET_CONFIGS, environment, markdown_table, parser, run_settings, unet_inputs, write_outputs
from .host_ops import SUBJECT_POSITIONS

SUITE = "gpu_step"
PRESETS = {
    "cuda": dict(config="cuda", resolution=1024, num_queries=(256, 1024), warmup=3, iters=20, layer_calls=50),
    "smoke": dict(config="smoke", resolution=64, num_queries=(8,), warmup=1, iters=2, layer_calls=3),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def subject(layers, n_q: int, device, dtype, seed: int) -> BoundSubject:
    generator = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, 77, dtype=torch.bool)
    mask[0, SUBJECT_POSITIONS[0]] = True
    nested = {path: tuple(torch.randn(1, layer.heads, n_q, layer.head_dim, generator=generator).to(device, dtype)
                          for _ in range(2)) for path, layer in layers.items()}
    return BoundSubject(token_mask=mask, slots=torch.zeros(1, dtype=torch.long), nested=nested)


def step_ms(fn, device, warmup: int, iters: int) -> float:
    """Median ms per call, each between two synchronizations."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        begin = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - begin) * 1e3)
    return sorted(times)[len(times) // 2]


def graphed(fn, device):
    """`fn` captured as one CUDA graph (after warm-up calls on a side stream); returns (replay, its output)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, out


def busy_ms(fn, device) -> dict:
    """Wall ms of one call and the GPU's busy ms in it (union of kernel intervals), from a profiler trace."""
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        begin = time.perf_counter()
        fn()
        sync(device)
        wall = (time.perf_counter() - begin) * 1e3
    intervals = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                       if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, end = 0.0, float("-inf")
    for start, stop in intervals:
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    return {"wall_ms": wall, "gpu_busy_ms": busy / 1e3, "kernels": len(intervals)}


def layer_rows(unet, device, dtype, preset, latents_side: int) -> list[dict]:
    """Per method and layer: host enqueue us, CUDA-event us, SDPA kernels launched."""
    rows = []
    probes = {}
    for path, module in unet.named_modules():
        if path.endswith("attn2"):
            probes.setdefault(module.to_q.in_features, path)  # the first layer of each width
    generator = torch.Generator().manual_seed(2)
    for width, path in sorted(probes.items()):
        attn = unet.get_submodule(path)
        side = latents_side // (2 if width == min(probes) else 4)
        hidden = torch.randn(2, side * side, width, generator=generator).to(device, dtype)
        text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator).to(device, dtype)
        call = lambda a=attn, h=hidden, t=text: a(h, encoder_hidden_states=t)  # noqa: E731
        for name, n_q, one_path in [("vanilla", None, None)] + [
                (f"nested{'' if one else '-wrapping'}-{n}", n, one) for n in preset["num_queries"] for one in (True, False)]:
            controller = None if one_path is None else install(unet, one_path=one_path)
            bound = controller.bound([subject(controller.layers, n_q, device, dtype, 0)]) if controller else nullcontext()
            with torch.no_grad(), bound:
                for _ in range(3):
                    call()
                sync(device)
                begin = time.perf_counter()
                for _ in range(preset["layer_calls"]):
                    call()
                host_us = (time.perf_counter() - begin) / preset["layer_calls"] * 1e6
                sync(device)
                gpu_us = None
                if device.type == "cuda":
                    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    for _ in range(preset["layer_calls"]):
                        call()
                    stop.record()
                    sync(device)
                    gpu_us = start.elapsed_time(stop) / preset["layer_calls"] * 1e3
                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
                with profile(activities=activities) as prof:
                    call()
                    sync(device)
                kernels = sorted({e.key for e in prof.key_averages()
                                  if any(word in e.key.lower() for word in ("attention", "fmha", "flash", "sdpa"))})
            if controller:
                controller.uninstall()
            rows.append({"layer": f"{side}x{side} width {width}", "method": name, "n_q": n_q, "host_us": host_us,
                         "gpu_us": gpu_us, "sdpa_kernels": kernels})
    return rows


def main(argv=None) -> dict:
    args = parser(SUITE, __doc__.splitlines()[0]).parse_args(argv)
    run = run_settings(SUITE, args)
    preset = PRESETS[run.preset if run.preset == "smoke" else "cuda"]
    device, dtype = run.device, run.dtype
    config = UNET_CONFIGS[preset["config"]]
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**config)
    unet = unet.to(dtype).eval().requires_grad_(False)
    latents, text, added = unet_inputs(config, 1, preset["resolution"], device, dtype)
    inputs = (torch.cat([latents] * 2), torch.tensor(500.0, device=device), torch.cat([torch.zeros_like(text), text]),
              {k: torch.cat([v, v]) for k, v in added.items()})
    forward = lambda: unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2], added_cond_kwargs=inputs[3]).sample  # noqa: E731
    cuda = device.type == "cuda"
    steps = []
    with torch.no_grad():
        eager = step_ms(forward, device, preset["warmup"], preset["iters"])
        row = {"method": "vanilla", "n_q": None, "eager_ms": eager, **busy_ms(forward, device)}
        if cuda:
            try:
                replay, _ = graphed(forward, device)
                row["graphed_ms"] = step_ms(replay, device, preset["warmup"], preset["iters"])
            except RuntimeError as error:  # reported, so that the rest of a short lease is not lost
                row["graph_error"] = str(error).splitlines()[0]
        steps.append(row)
        for n_q in preset["num_queries"]:
            controller = install(unet, static_buffers=cuda)
            first, second = (subject(controller.layers, n_q, device, dtype, seed) for seed in (1, 2))
            with controller.bound([second]):
                reference = forward().clone()  # the second subject, eager
            with controller.bound([first]):
                row = {"method": f"nested-{n_q}", "n_q": n_q, "eager_ms": step_ms(forward, device, preset["warmup"],
                                                                                  preset["iters"]),
                       **busy_ms(forward, device)}
                try:
                    replay, out = graphed(forward, device) if cuda else (None, None)
                except RuntimeError as error:
                    row["graph_error"], replay = str(error).splitlines()[0], None
            if replay is not None:
                with controller.bound([second]):  # copied into the captured buffers: no recapture
                    replay()
                    sync(device)
                    row["graph_vs_eager_max_diff"] = float((out - reference).abs().max() / reference.abs().max())
                    row["graphed_ms"] = step_ms(replay, device, preset["warmup"], preset["iters"])
            controller.uninstall()
            steps.append(row)
    vanilla = steps[0]
    for row in steps:
        row["eager_vs_vanilla"] = row["eager_ms"] / vanilla["eager_ms"]
        if "graphed_ms" in row and "graphed_ms" in vanilla:
            row["graphed_vs_graphed_vanilla"] = row["graphed_ms"] / vanilla["graphed_ms"]
            row["graphed_vs_eager_vanilla"] = row["graphed_ms"] / vanilla["eager_ms"]
    layers = layer_rows(unet, device, dtype, preset, preset["resolution"] // 8)
    payload = {"suite": SUITE, "environment": environment(run), "resolution": preset["resolution"], "batch": 2,
               "steps": steps, "layers": layers}
    table = markdown_table(steps, [
        ("method", "method", "s"), ("eager ms", "eager_ms", ".2f"), ("x vanilla", "eager_vs_vanilla", ".3f"),
        ("graphed ms", "graphed_ms", ".2f"), ("x graphed vanilla (goal 1.05 / 1.10)", "graphed_vs_graphed_vanilla",
                                              ".3f"),
        ("x eager vanilla", "graphed_vs_eager_vanilla", ".3f"), ("trace wall ms", "wall_ms", ".2f"),
        ("GPU busy ms", "gpu_busy_ms", ".2f"), ("graph vs eager (2nd subject)", "graph_vs_eager_max_diff", ".1e"),
    ]) + "\n\n" + markdown_table([{**r, "sdpa": ", ".join(r["sdpa_kernels"])[:120]} for r in layers], [
        ("layer", "layer", "s"), ("method", "method", "s"), ("host enqueue us", "host_us", ".1f"),
        ("CUDA-event us", "gpu_us", ".1f"), ("SDPA kernels", "sdpa", "s"),
    ])
    write_outputs(run, payload, table)
    return payload


if __name__ == "__main__":
    main()
