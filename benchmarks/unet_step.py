"""Suite 2: the whole guided UNet step and the whole generation: vanilla, nested (n_q 256 and 1024), IP-Adapter.

The UNet is SDXL's architecture built from its published config with random weights (`common.SDXL_UNET`, no
download), at 1024x1024 in bf16 on `--device cuda`; `--device cpu` uses an SDXL-shaped UNet at 2/5 of the width
(all 70 cross-attention layers) at 512x512 in fp32. Classifier-free guidance: batch 2, the negative prompt and
the prompt with the subject word.

- vanilla: diffusers' default processors (`AttnProcessor2_0`).
- nested-<n_q>: the library's own path: `install(unet)`, one `BoundSubject` whose nested keys/values come from
  `NestedAdapter.nested_keys_values` (random adapter weights and subject tokens), bound with
  `controller.bound(...)`. The negative-prompt row goes to the original processor, as in the pipeline.
- ip-adapter-16: diffusers' `IPAdapterAttnProcessor2_0` on every cross-attention layer with 16 image tokens,
  passed down as `encoder_hidden_states=(text, [image tokens])`, the form diffusers' IP-Adapter uses.

Per method: ms per UNet step (one guided call, median); s per image (`steps` Euler steps with guidance; for
nested this includes computing the nested keys/values once, before the loop); peak tensor memory of one step
above the weights; FLOPs of one step (FlopCounterMode on one more step) and their ratio to vanilla, the floor
of the time ratio (counted on an image's first step, which also computes the text's keys and values that the
nested processor reuses at later steps); for nested, the time, FLOPs and size of the nested keys/values. With `--compile`: the
torch.compile'd step and the graph breaks, those raised in nested_attention code listed.
Not included (the same for every method): text encoders, VAE decode, the subject image encoder.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch
from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

from nested_attention import BoundSubject, NestedAdapter, install
from nested_attention.tiny import TINY_ADAPTER_CONFIG, tiny_image_encoder

from .common import (
    UNET_CONFIGS,
    MiB,
    Run,
    count_flops,
    environment,
    markdown_table,
    parser,
    peak_memory,
    run_settings,
    sync,
    time_call,
    unet_inputs,
    write_outputs,
)

SUITE = "unet_step"
SUBJECT_TOKEN, IP_TOKENS, GUIDANCE = 5, 16, 5.0
PRESETS = {
    "cuda": dict(resolution=1024, steps=30, num_queries=(256, 1024), warmup=3, iters=10, image_warmup=1, image_iters=3),
    "cpu": dict(resolution=512, steps=10, num_queries=(256, 1024), warmup=1, iters=3, image_warmup=0, image_iters=1),
    "smoke": dict(resolution=64, steps=2, num_queries=(8,), warmup=1, iters=2, image_warmup=0, image_iters=1),
}
# the Q-Former is not run here (subject tokens are random); its width sets the nested projections' input size
ADAPTERS = {
    "cuda": dict(qformer_hidden_size=768, qformer_layers=1, qformer_heads=12, qformer_intermediate_size=3072),
    "smoke": TINY_ADAPTER_CONFIG,
}
ADAPTERS["cpu"] = ADAPTERS["cuda"]


def build_unet(config: dict, device, dtype) -> UNet2DConditionModel:
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(**config)
    return unet.to(dtype).eval().requires_grad_(False)


class Vanilla:
    """diffusers' default processors. The interface of every method: per-image state, the UNet's text input."""

    name, n_q = "vanilla", None

    def __init__(self, unet, device, dtype, preset):
        self.unet = unet

    @contextmanager
    def image(self):
        """Per-image state (none here), set up once before the denoising loop."""
        yield

    def context(self, text):
        return text

    def remove(self):
        pass


class Nested(Vanilla):
    """The library's processors; nested keys/values from a (random) NestedAdapter, once per image."""

    def __init__(self, unet, device, dtype, preset, n_q):
        super().__init__(unet, device, dtype, preset)
        self.name, self.n_q = f"nested-{n_q}", n_q
        with torch.device(device):
            encoder, _ = tiny_image_encoder()  # unused: the subject tokens below stand in for its output
            torch.manual_seed(1)
            self.adapter = NestedAdapter.for_unet(unet, encoder, "random", **{**ADAPTERS[preset], "num_queries": n_q})
            self.tokens = torch.randn(1, n_q, self.adapter.config.qformer_hidden_size)  # (S, M, width)
        self.adapter.to(dtype).eval()
        self.tokens = self.tokens.to(dtype)
        self.controller = install(unet)
        self.token_mask = torch.zeros(1, 77, dtype=torch.bool)
        self.token_mask[0, SUBJECT_TOKEN] = True

    def subject(self) -> BoundSubject:
        with torch.no_grad():
            nested = self.adapter.nested_keys_values(self.tokens, self.controller.layers)
        return BoundSubject(token_mask=self.token_mask, slots=torch.zeros(1, dtype=torch.long), nested=nested,
                            alpha=self.adapter.config.alpha)

    @contextmanager
    def image(self):
        with self.controller.bound([self.subject()]):
            yield

    def remove(self):
        self.controller.uninstall()


class IPAdapter(Vanilla):
    """diffusers' IP-Adapter processors on the cross-attention layers, 16 image tokens (already projected)."""

    name = f"ip-adapter-{IP_TOKENS}"

    def __init__(self, unet, device, dtype, preset):
        super().__init__(unet, device, dtype, preset)
        self.original = unet.attn_processors
        width = unet.config.cross_attention_dim
        processors = {}
        for name, processor in self.original.items():
            module = unet.get_submodule(name.removesuffix(".processor"))
            if module.is_cross_attention:
                processor = IPAdapterAttnProcessor2_0(module.to_q.out_features, width, num_tokens=(IP_TOKENS,))
                processor.to(device, dtype)
            processors[name] = processor
        unet.set_attn_processor(processors)
        self.tokens = torch.randn(2, IP_TOKENS, width, device=device, dtype=dtype)

    def context(self, text):
        return (text, [self.tokens])

    def remove(self):
        self.unet.set_attn_processor(self.original)


def methods(preset: str):
    """Factories (unet, device, dtype, preset) -> method, vanilla first."""
    nested = [lambda *a, n=n: Nested(*a, n_q=n) for n in PRESETS[preset]["num_queries"]]
    return [Vanilla, *nested, IPAdapter]


def generate(unet, method, latents, text, added, steps: int):
    """One guided image: per-image state once, then `steps` Euler steps (no VAE decode)."""
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    scheduler.set_timesteps(steps, device=latents.device)
    x = latents * scheduler.init_noise_sigma
    with torch.no_grad(), method.image():
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(torch.cat([x, x]), t)
            noise = unet(model_input, t, encoder_hidden_states=method.context(text), added_cond_kwargs=added).sample
            negative, positive = noise.chunk(2)
            x = scheduler.step(negative + GUIDANCE * (positive - negative), t, x).prev_sample
    return x


def step_fn(unet, method, latents, text, added):
    model_input, t = torch.cat([latents, latents]), torch.tensor(500.0, device=latents.device)
    return lambda: unet(model_input, t, encoder_hidden_states=method.context(text), added_cond_kwargs=added).sample


def compiled_step(unet, method, step_args, run: Run, warmup: int, iters: int) -> dict:
    """torch.compile'd step: graph breaks (torch._dynamo.explain), time of the first (compiling) call, ms per step.

    One eager step runs first, so that what is traced is a steady-state step (per-call layouts already cached).
    """
    import torch._dynamo

    torch._dynamo.reset()
    with torch.no_grad(), method.image():
        step_fn(unet, method, *step_args)()
        explanation = torch._dynamo.explain(step_fn(unet, method, *step_args))()
        ours = []
        for b in explanation.break_reasons:
            frames = [f for f in b.user_stack if "nested_attention" in f.filename]
            if frames:
                where = f"{frames[-1].filename.split('src/')[-1]}:{frames[-1].lineno}"
                ours.append(f"{b.reason.strip().splitlines()[0]} ({where})")
        torch._dynamo.reset()
        compiled = step_fn(torch.compile(unet), method, *step_args)
        sync(run.device)
        begin = time.perf_counter()
        compiled()
        sync(run.device)
        compile_s = time.perf_counter() - begin
        timing = time_call(compiled, run.device, warmup, iters)
    return {"compiled_step_ms": timing["median_ms"], "compile_s": compile_s,
            "graph_count": explanation.graph_count, "graph_breaks": explanation.graph_break_count,
            "graph_breaks_in_nested_attention": len(ours), "nested_attention_break_reasons": sorted(set(ours))}


def main(argv=None) -> dict:
    p = parser(SUITE, __doc__.splitlines()[0])
    p.add_argument("--compile", action="store_true", help="also time the torch.compile'd step, report graph breaks")
    args = p.parse_args(argv)
    run = run_settings(SUITE, args)
    preset = PRESETS[run.preset]
    config = UNET_CONFIGS[run.preset]
    unet = build_unet(config, run.device, run.dtype)
    latents, text, added = unet_inputs(config, 1, preset["resolution"], run.device, run.dtype)
    text = torch.cat([torch.zeros_like(text), text])  # negative prompt, prompt
    added = {k: torch.cat([v, v]) for k, v in added.items()}

    rows = []
    for factory in methods(run.preset):
        method = factory(unet, run.device, run.dtype, run.preset)
        step = step_fn(unet, method, latents, text, added)
        with torch.no_grad(), method.image():
            timing = time_call(step, run.device, preset["warmup"], preset["iters"])
            peak = peak_memory(step, run.device)
        with torch.no_grad(), method.image():  # an image's first step: it also computes what later steps reuse
            flops = count_flops(step)
        image = time_call(lambda m=method: generate(unet, m, latents, text, added, preset["steps"]), run.device,
                          preset["image_warmup"], preset["image_iters"])
        row = {"method": method.name, "n_q": method.n_q, "step_ms": timing["median_ms"], "step_time": timing,
               "image_s": image["median_ms"] / 1e3, "peak_bytes": peak, "peak_mib": peak / MiB, "step_flops": flops}
        if isinstance(method, Nested):
            kv = time_call(method.subject, run.device, warmup=1, iters=preset["iters"])
            cache = sum(t.numel() * t.element_size() for pair in method.subject().nested.values() for t in pair)
            row.update(kv_ms=kv["median_ms"], kv_gflops=count_flops(method.subject) / 1e9, kv_cache_mib=cache / MiB,
                       kv_every_step_s=preset["steps"] * kv["median_ms"] / 1e3)
        if args.compile:
            row.update(compiled_step(unet, method, (latents, text, added), run, preset["warmup"], preset["iters"]))
        method.remove()
        rows.append(row)

    vanilla = rows[0]
    for row in rows:
        row["step_vs_vanilla"] = row["step_ms"] / vanilla["step_ms"]
        row["image_vs_vanilla"] = row["image_s"] / vanilla["image_s"]
        row["memory_vs_vanilla"] = row["peak_bytes"] / max(vanilla["peak_bytes"], 1)
        row["step_gflops"] = row["step_flops"] / 1e9
        row["flops_vs_vanilla"] = row["step_flops"] / vanilla["step_flops"]
        if args.compile:
            row["compiled_vs_vanilla"] = row["compiled_step_ms"] / vanilla["compiled_step_ms"]
    payload = {"suite": SUITE, "environment": environment(run), "unet_config": config, "batch": 2,
               "guidance": GUIDANCE, **{k: preset[k] for k in ("resolution", "steps")}, "results": rows}
    columns = [
        ("method", "method", "s"), ("ms / step", "step_ms", ".1f"), ("x vanilla", "step_vs_vanilla", ".3f"),
        ("FLOPs x vanilla (floor)", "flops_vs_vanilla", ".4f"), ("s / image", "image_s", ".3f"),
        ("x vanilla", "image_vs_vanilla", ".3f"), ("step peak MiB", "peak_mib", ".1f"),
        ("nested K/V ms (once)", "kv_ms", ".3f"), ("K/V cache MiB", "kv_cache_mib", ".1f"),
    ]
    if args.compile:
        columns += [("compiled ms / step", "compiled_step_ms", ".1f"), ("x vanilla", "compiled_vs_vanilla", ".3f"),
                    ("graph breaks", "graph_breaks", "d"),
                    ("in nested_attention", "graph_breaks_in_nested_attention", "d")]
    write_outputs(run, payload, markdown_table(rows, columns)
                  + f"\n\n{preset['resolution']}x{preset['resolution']}, {preset['steps']} steps, guidance batch 2")
    return payload


if __name__ == "__main__":
    main()
