"""Suite 3: one adapter training step on the SDXL architecture, with gradient checkpointing.

A step is what `nested_attention_train` does per batch (`NestedTrainingModule.forward` and the trainer's update),
without data loading, the VAE encoder and the text encoders (their outputs are random tensors here): the frozen
CLIP image encoder and the trainable Q-Former encode the subject image; the nested keys/values of every
cross-attention layer are projected; the frozen UNet (gradient checkpointing on) predicts the noise with the subject
bound to the subject word of every row; MSE loss; backward into the adapter; gradient clipping; AdamW. Precision as
in the trainer with `mixed_precision: bf16`: frozen models in bf16, the adapter in fp32 under bf16 autocast
(`--device cpu`: everything fp32, no autocast).

Measured: samples/s (median step), peak memory of a step (all tensors: weights, optimizer state, activations),
model FLOPs per step (forward and backward, counted on a meta-device copy without checkpointing's recomputation)
and hardware FLOPs (with it), MFU and HFU: those FLOPs per second over the measured dense bf16 matrix rate.
"""

from __future__ import annotations

import gc
from contextlib import nullcontext
from functools import partial

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from transformers import CLIPVisionConfig, CLIPVisionModel

from nested_attention import BoundSubject, NestedAdapter, install
from nested_attention.tiny import TINY_ADAPTER_CONFIG

from .common import (
    UNET_CONFIGS,
    Run,
    count_flops,
    environment,
    markdown_table,
    matmul_rate,
    parser,
    peak_memory,
    run_settings,
    sync,
    time_call,
    unet_inputs,
    write_outputs,
)
from .unet_step import SUBJECT_TOKEN, build_unet

SUITE = "train_step"
GiB = 2**30
VIT_H_14 = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                image_size=224, patch_size=14, projection_dim=1024)  # the recipes' laion/CLIP-ViT-H-14 vision tower
PAPER_QFORMER = dict(qformer_hidden_size=768, qformer_layers=4, qformer_heads=12, qformer_intermediate_size=3072)
PRESETS = {  # (resolution, per-device batch) pairs: the recipes' phase 1 and phase 2 batches on cuda
    "cuda": dict(runs=((512, 8), (1024, 2)), num_queries=1024, clip=VIT_H_14, adapter=PAPER_QFORMER, warmup=2, iters=5),
    "cpu": dict(runs=((256, 1), (512, 1)), num_queries=256, warmup=1, iters=2,
                clip=dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                          image_size=224, patch_size=14, projection_dim=256),
                adapter=dict(qformer_hidden_size=256, qformer_layers=2, qformer_heads=4, qformer_intermediate_size=1024)),
    "smoke": dict(runs=((64, 1),), num_queries=8, warmup=1, iters=1, adapter=TINY_ADAPTER_CONFIG,
                  clip=dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                            image_size=32, patch_size=8, projection_dim=16)),
}


class Trainee:
    """Frozen UNet + CLIP, a fresh trainable adapter, the library's processors, AdamW: one training setup."""

    def __init__(self, preset: str, device, weight_dtype, checkpointing: bool = True):
        settings = PRESETS[preset]
        self.config = UNET_CONFIGS[preset]
        self.unet = build_unet(self.config, device, weight_dtype)
        if checkpointing:
            self.unet.enable_gradient_checkpointing()
        with torch.device(device):
            torch.manual_seed(1)
            clip = CLIPVisionModel(CLIPVisionConfig(**settings["clip"]))
            self.adapter = NestedAdapter.for_unet(
                self.unet, clip, "random", **{**settings["adapter"], "num_queries": settings["num_queries"]})
        self.adapter.float().train()
        self.adapter.encoder.image_encoder.to(weight_dtype)  # frozen; the trainable part stays fp32
        self.controller = install(self.unet)
        self.parameters = self.adapter.trainable_parameters()
        self.optimizer = torch.optim.AdamW(self.parameters, lr=1e-4, weight_decay=0.01)
        self.scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        self.device, self.weight_dtype = torch.device(device), weight_dtype

    def batch(self, resolution: int, batch: int) -> dict:
        latents, context, added = unet_inputs(self.config, batch, resolution, self.device, self.weight_dtype)
        size = self.adapter.encoder.image_encoder.config.image_size
        token_mask = torch.zeros(batch, 77, dtype=torch.bool)
        token_mask[:, SUBJECT_TOKEN] = True
        return dict(latents=latents, context=context, added=added, token_mask=token_mask,
                    pixels=torch.randn(batch, 3, size, size, device=self.device, dtype=self.weight_dtype),
                    noise=torch.randn_like(latents),
                    timesteps=torch.randint(0, 1000, (batch,), device=self.device))

    def loss(self, b: dict) -> torch.Tensor:
        """Forward of `NestedTrainingModule`: subject tokens, nested keys/values, bound UNet call, MSE."""
        tokens = self.adapter.encoder(b["pixels"])  # (B, n_q, width)
        nested = self.adapter.nested_keys_values(tokens, self.controller.layers)
        self.controller.bind([BoundSubject(token_mask=b["token_mask"], slots=torch.arange(len(b["token_mask"])),
                                           nested=nested, alpha=self.adapter.config.alpha)])
        noisy = self.scheduler.add_noise(b["latents"], b["noise"], b["timesteps"])
        prediction = self.unet(noisy.to(self.unet.dtype), b["timesteps"], encoder_hidden_states=b["context"],
                               added_cond_kwargs=b["added"]).sample
        return F.mse_loss(prediction.float(), b["noise"].float())

    def step(self, b: dict) -> None:
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) \
            if self.weight_dtype == torch.bfloat16 else nullcontext()
        with autocast:
            loss = self.loss(b)
        loss.backward()
        self.controller.clear()  # bound through backward: checkpointing re-runs the UNet forward there
        torch.nn.utils.clip_grad_norm_(self.parameters, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_bytes(self) -> int:
        tensors = {id(t): t for m in (self.unet, self.adapter) for t in [*m.parameters(), *m.buffers()]}
        tensors.update({id(t): t for s in self.optimizer.state.values() for t in s.values() if torch.is_tensor(t)})
        return sum(t.numel() * t.element_size() for t in tensors.values())


def count_step_flops(preset: str, resolution: int, batch: int, checkpointing: bool) -> int:
    """Forward + backward FLOPs of one step on a meta-device copy (fp32, no autocast: the same count)."""
    trainee = Trainee(preset, "meta", torch.float32, checkpointing)

    def forward_backward():
        trainee.loss(trainee.batch(resolution, batch)).backward()
        trainee.controller.clear()

    return count_flops(forward_backward)


def main(argv=None) -> dict:
    p = parser(SUITE, __doc__.splitlines()[0])
    p.add_argument("--batch", type=int, help="per-device batch for every resolution (default: the preset's)")
    args = p.parse_args(argv)
    run: Run = run_settings(SUITE, args)
    preset = PRESETS[run.preset]
    rate = matmul_rate(run)
    trainee = Trainee(run.preset, run.device, run.dtype)
    rows = []
    for resolution, batch in preset["runs"]:
        batch = args.batch or batch
        step = partial(trainee.step, trainee.batch(resolution, batch))
        timing = time_call(step, run.device, preset["warmup"], preset["iters"])
        gc.collect()
        sync(run.device)
        start = torch.cuda.memory_allocated(run.device) if run.device.type == "cuda" else trainee.state_bytes()
        peak = start + peak_memory(step, run.device)
        model = count_step_flops(run.preset, resolution, batch, checkpointing=False)
        hardware = count_step_flops(run.preset, resolution, batch, checkpointing=True)
        seconds = timing["median_ms"] / 1e3
        rows.append({
            "resolution": resolution, "batch": batch, "gradient_checkpointing": True, "step_ms": timing["median_ms"],
            "step_time": timing, "samples_per_s": batch / seconds, "peak_bytes": peak, "peak_gib": peak / GiB,
            "state_gib": trainee.state_bytes() / GiB, "model_tflops_per_step": model / 1e12,
            "hardware_tflops_per_step": hardware / 1e12, "mfu": model / seconds / rate["flops_per_s"],
            "hfu": hardware / seconds / rate["flops_per_s"],
        })
        del step
        if run.device.type == "cuda":
            torch.cuda.empty_cache()

    payload = {"suite": SUITE, "environment": environment(run), "matmul": rate, "unet_config": trainee.config,
               "num_queries": preset["num_queries"], "image_encoder": preset["clip"], "adapter": preset["adapter"],
               "results": rows}
    table = markdown_table(rows, [
        ("resolution", "resolution", "d"), ("batch", "batch", "d"), ("ms / step", "step_ms", ".1f"),
        ("samples / s", "samples_per_s", ".3f"), ("peak GiB", "peak_gib", ".2f"),
        ("model TFLOP / step", "model_tflops_per_step", ".3f"), ("MFU", "mfu", ".3f"), ("HFU", "hfu", ".3f"),
    ]) + f"\n\nmatrix rate: {rate['flops_per_s'] / 1e12:.3f} TFLOP/s ({rate['dtype']}, {rate['size']}^3); " \
         f"n_q {preset['num_queries']}; gradient checkpointing on"
    write_outputs(run, payload, table)
    return payload


if __name__ == "__main__":
    main()
