"""Suite 5: the host's share of a guided step, counted on any CPU: aten operations per UNet forward and per layer
call, host time per layer call at shapes too small to compute anything, synchronizing operations.

A guided SDXL step is host-bound on a fast GPU when every layer call dispatches many small operations (issue 28).
What the host does per operation does not depend on the widths, so the UNet here has SDXL's structure (3 blocks,
transformer depths 1, 2, 10: all 70 cross-attention layers) at tiny widths, and every count is exact.

- ops / forward: aten operations seen by a `TorchDispatchMode` during one guided UNet forward (batch 2: negative
  prompt, prompt with the subject words), all of them and those that are not views (the ones that launch a
  kernel on a GPU); nested / vanilla.
- syncs / forward: operations that make the host wait for the device (`.item()`, `nonzero`, ...); 0 is the goal.
- host us / layer call: one cross-attention layer (16 queries, width 128, 2 heads of 64, 77 text tokens, n_q 8,
  batch 2), timed call by call on one thread, vanilla and nested in interleaved rounds; the ratio is the median of the
  rounds' ratios (a busy machine slows both alike).

Methods: vanilla (`AttnProcessor2_0`), nested (the default, one-path processor), nested-wrapping (`install(...,
one_path=False)`, the processor that wraps `AttnProcessor2_0` and runs the negative row apart); n_q 256 and 1024,
one and two subjects.
"""

from __future__ import annotations

import statistics
import time

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from nested_attention import BoundSubject, install

from .common import SDXL_UNET, environment, markdown_table, parser, run_settings, unet_inputs, write_outputs

SUITE = "host_ops"
# SDXL's blocks and transformer depths (70 cross-attention layers), head size 64, at tiny widths
TINY_SDXL = {**SDXL_UNET, "block_out_channels": [64, 128, 128], "attention_head_dim": [1, 2, 2],
             "cross_attention_dim": 64, "norm_num_groups": 8, "addition_time_embed_dim": 8,
             "projection_class_embeddings_input_dim": 6 * 8 + 32, "sample_size": 8}
SUBJECT_POSITIONS = (5, 8)  # the token of each subject word
LAYER_QUERIES = 8  # n_q of the timed layer calls: the nested attention's own arithmetic stays negligible
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "equal", "_unique2", "unique_dim",
            "unique_consecutive", "repeat_interleave"}
PRESETS = {"cpu": dict(num_queries=(256, 1024), rounds=15, calls=40),
           "smoke": dict(num_queries=(8,), rounds=2, calls=3)}
PRESETS["cuda"] = PRESETS["cpu"]


class OpCounter(TorchDispatchMode):
    """Counts the aten operations dispatched inside the block: all, those that are views, those that sync."""

    def __init__(self):
        super().__init__()
        self.ops = self.views = 0
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.views += bool(func.is_view)
        if func.overloadpacket.__name__ in SYNC_OPS:
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


def count_ops(fn) -> dict:
    with torch.no_grad(), OpCounter() as counter:
        fn()
    return {"ops": counter.ops, "kernel_ops": counter.ops - counter.views, "syncs": len(counter.syncs),
            "sync_ops": sorted(set(counter.syncs))}


def subjects_for(layers, n_q: int, count: int, device, dtype, seed: int = 0) -> list[BoundSubject]:
    """`count` subjects with random nested keys and values (1 image each) on the one conditional row."""
    generator = torch.Generator().manual_seed(seed)
    subjects = []
    for k in range(count):
        mask = torch.zeros(1, 77, dtype=torch.bool)
        mask[0, SUBJECT_POSITIONS[k]] = True
        nested = {path: tuple(torch.randn(1, layer.heads, n_q, layer.head_dim, generator=generator).to(device, dtype)
                              for _ in range(2)) for path, layer in layers.items()}
        subjects.append(BoundSubject(token_mask=mask, slots=torch.zeros(1, dtype=torch.long), nested=nested))
    return subjects


def methods(num_queries):
    """(name, n_q, subjects, one_path) per nested method."""
    return [(f"nested{'' if one else '-wrapping'}-{n_q}-x{count}", n_q, count, one)
            for one in (True, False) for count in (1, 2) for n_q in num_queries]


def forward_counts(run, preset: dict) -> list[dict]:
    torch.manual_seed(0)
    with torch.device(run.device):
        unet = UNet2DConditionModel(**TINY_SDXL)
    unet = unet.to(run.dtype).eval().requires_grad_(False)
    latents, text, added = unet_inputs(TINY_SDXL, 1, 64, run.device, run.dtype)
    batch = (torch.cat([latents] * 2), torch.tensor(500.0, device=run.device), torch.cat([torch.zeros_like(text), text]),
             {k: torch.cat([v, v]) for k, v in added.items()})
    forward = lambda: unet(batch[0], batch[1], encoder_hidden_states=batch[2], added_cond_kwargs=batch[3])  # noqa: E731
    rows = [{"method": "vanilla", "n_q": None, "subjects": 0, **count_ops(forward)}]
    for name, n_q, count, one_path in methods(preset["num_queries"]):
        controller = install(unet, one_path=one_path)
        subjects = subjects_for(controller.layers, n_q, count, run.device, run.dtype)
        with controller.bound(subjects):
            first = count_ops(forward)  # a generation's first step: the text's terms are computed, then kept
            rows.append({"method": name, "n_q": n_q, "subjects": count, **count_ops(forward),
                         "first_ops": first["ops"], "first_syncs": first["syncs"]})
        controller.uninstall()
    rows[0]["layers"] = len(install(unet).layers)  # installed only to list the layers
    return rows


def layer_times(run, preset: dict) -> list[dict]:
    """Host microseconds per call of one tiny cross-attention layer, vanilla and nested interleaved."""
    torch.manual_seed(0)
    holder = nn.ModuleDict({"attn2": Attention(128, cross_attention_dim=64, heads=2, dim_head=64)}).to(run.device)
    attn = holder["attn2"].requires_grad_(False)
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 16, 128, generator=generator).to(run.device, run.dtype)
    text = torch.randn(2, 77, 64, generator=generator).to(run.device, run.dtype)
    call = lambda: attn(hidden, encoder_hidden_states=text)  # noqa: E731
    rows = []
    for name, n_q, count, one_path in methods([LAYER_QUERIES]):
        vanilla_processor = attn.processor
        controller = install(holder, one_path=one_path)
        subjects = subjects_for(controller.layers, n_q, count, run.device, run.dtype)
        nested_processor = attn.processor
        per_round = {"vanilla": [], "nested": []}
        with torch.no_grad(), controller.bound(subjects):
            call()
            for _ in range(preset["rounds"]):
                for which, processor in (("vanilla", vanilla_processor), ("nested", nested_processor)):
                    attn.processor = processor
                    begin = time.perf_counter()
                    for _ in range(preset["calls"]):
                        call()
                    per_round[which].append((time.perf_counter() - begin) / preset["calls"] * 1e6)
            ops = {}
            for which, processor in (("vanilla", vanilla_processor), ("nested", nested_processor)):
                attn.processor = processor
                ops[which] = count_ops(call)["ops"]
        controller.uninstall()
        ratios = [n / v for n, v in zip(per_round["nested"], per_round["vanilla"])]
        rows.append({"method": name, "n_q": n_q, "subjects": count, "vanilla_us": statistics.median(per_round["vanilla"]),
                     "nested_us": statistics.median(per_round["nested"]), "time_vs_vanilla": statistics.median(ratios),
                     "ratio_min": min(ratios), "ratio_max": max(ratios), "layer_ops": ops["nested"],
                     "vanilla_layer_ops": ops["vanilla"]})
    return rows


def main(argv=None) -> dict:
    args = parser(SUITE, __doc__.splitlines()[0]).parse_args(argv)
    run = run_settings(SUITE, args)
    preset = PRESETS[run.preset]
    forward = forward_counts(run, preset)
    vanilla = forward[0]
    for row in forward:
        row["ops_vs_vanilla"] = row["ops"] / vanilla["ops"]
        row["kernel_ops_vs_vanilla"] = row["kernel_ops"] / vanilla["kernel_ops"]
        row["first_vs_vanilla"] = row.get("first_ops", vanilla["ops"]) / vanilla["ops"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        layers = layer_times(run, preset)
    finally:
        torch.set_num_threads(threads)
    payload = {"suite": SUITE, "environment": environment(run), "unet_config": TINY_SDXL, "batch": 2,
               "layers": vanilla["layers"], "forward": forward, "layer_calls": layers}
    table = markdown_table(forward, [
        ("method", "method", "s"), ("ops / forward", "ops", "d"), ("x vanilla (goal <= 1.25)", "ops_vs_vanilla", ".3f"),
        ("non-view ops", "kernel_ops", "d"), ("x vanilla", "kernel_ops_vs_vanilla", ".3f"),
        ("first step ops", "first_ops", "d"), ("x vanilla", "first_vs_vanilla", ".3f"), ("syncs", "syncs", "d"),
    ]) + "\n\n" + markdown_table(layers, [
        ("method", "method", "s"), ("ops / layer call", "layer_ops", "d"), ("vanilla", "vanilla_layer_ops", "d"),
        ("host us / call", "nested_us", ".1f"), ("vanilla us", "vanilla_us", ".1f"),
        ("x vanilla (goal <= 1.3)", "time_vs_vanilla", ".3f"), ("min", "ratio_min", ".3f"), ("max", "ratio_max", ".3f"),
    ])
    write_outputs(run, payload, table)
    return payload


if __name__ == "__main__":
    main()
