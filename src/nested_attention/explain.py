"""What nested attention does inside one layer (paper Figs. 4-6), recorded during a real generation.

- the per-pixel subject value v*_q (after the norm regularization) beside the word's one ordinary value V[s*] (Fig. 4);
- the nested attention of every pixel over the subject tokens, softmax(q K̆ᵀ / sqrt(d)) (Fig. 5);
- where each subject token looks in the subject image: a Q-Former query's cross-attention over CLIP's patches
  (Fig. 6), or the patches a linear readout weighs;
- how much each pixel attends to the subject word at all (its share of the outer softmax, lambda applied).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from PIL import Image

from .attention import inverse_subject_norm, lambda_logits, nested_values
from .encoder import preprocess
from .errors import NestedAttentionError
from .subject import Subject


@dataclass
class LayerExplanation:
    """One cross-attention layer at one denoising step, for the conditional row of a one-prompt generation.

    Attributes:
        layer: the layer's module path; step: the denoising step (0-based); timestep: the scheduler's timestep.
        grid: (h, w), the layer's pixel grid; pixels are in row-major order below (N = h * w).
        share: (N,) the attention each pixel gives the subject word (mean over heads, lambda applied).
        subject_values: (N, D) the nested value v*_q of each pixel, heads concatenated.
        vanilla_value: (D,) the word's ordinary value V[s*], which every pixel would get without nesting.
        nested_maps: (N, M) each pixel's nested attention over the M subject tokens (mean over heads).
    """

    layer: str
    step: int
    timestep: int
    grid: tuple[int, int]
    share: torch.Tensor
    subject_values: torch.Tensor
    vanilla_value: torch.Tensor
    nested_maps: torch.Tensor


@torch.no_grad()
def query_attention_maps(adapter, image: Image.Image) -> torch.Tensor:
    """(M, gh, gw): where each subject token looks in the subject image, over CLIP's patch grid.

    Q-Former: each query's cross-attention in its last layer (mean over heads). Linear readout: each patch's share
    of the norms of what it adds to the token, |W[m, p] D x_p|. The class token's share is left out in both, so a
    map sums to at most 1."""
    encoder = adapter.encoder
    vision = encoder.image_encoder
    pixels = preprocess(adapter.image_processor, [image], encoder.query_tokens.device, vision.dtype)
    clip = encoder.clip_tokens(pixels).to(encoder.query_tokens.dtype)
    if adapter.config.subject_encoder == "linear":
        norms = encoder.contributions(clip)[0].float().norm(dim=-1)  # (M, positions)
        maps = (norms / norms.sum(-1, keepdim=True).clamp_min(1e-12))[:, 1:]
    else:
        previous = encoder.qformer.config._attn_implementation
        encoder.qformer.set_attn_implementation("eager")  # the fused kernels return no attention probabilities
        try:
            out = encoder.qformer(query_embeds=encoder.query_tokens, encoder_hidden_states=clip,
                                  output_attentions=True)
        finally:
            encoder.qformer.set_attn_implementation(previous)
        maps = out.cross_attentions[-1][0].float().mean(0)[:, 1:]  # (M, patches): the class token dropped
    side = vision.config.image_size // vision.config.patch_size
    return maps.reshape(maps.shape[0], side, side).cpu()


def layer_grid(pixels: int, latent_height: int, latent_width: int) -> tuple[int, int]:
    """The (h, w) of a layer with `pixels` positions in a UNet run on a latent_height x latent_width latent."""
    scale = math.sqrt(latent_height * latent_width / pixels)
    height, width = round(latent_height / scale), round(latent_width / scale)
    if height * width != pixels:
        raise NestedAttentionError(f"A layer with {pixels} pixels does not tile a {latent_height}x{latent_width} latent.")
    return height, width


class LayerRecorder:
    """A forward pre-hook on one cross-attention layer that computes its `LayerExplanation` at one step."""

    def __init__(self, na, name: str, encoded, positions: list[int], layer: str, step: int,
                 latent_size: tuple[int, int]):
        self.adapter = na.adapters[name].adapter
        self.layer, self.step, self.lam, self.latent_size = layer, step, encoded.lam, latent_size
        self.positions, self.bias = positions, encoded.bias
        self.state = self.adapter.nested_keys_values(encoded.tokens[None], {layer: na.controller.layers[layer]})[layer]
        self.calls = 0
        self.result: dict | None = None
        self.handle = na.pipe.unet.get_submodule(layer).register_forward_pre_hook(self._record, with_kwargs=True)

    def remove(self) -> None:
        self.handle.remove()

    @torch.no_grad()
    def _record(self, attn, args, kwargs) -> None:
        step, self.calls = self.calls, self.calls + 1
        if step != self.step:
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        row = hidden.shape[0] - 1  # one prompt: [negative, conditional] with guidance, [conditional] without
        hidden, context = hidden[row : row + 1], context[row : row + 1]
        if hidden.ndim == 4:
            hidden = hidden.flatten(2).transpose(1, 2)
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        heads = attn.heads
        query, key, value = attn.to_q(hidden), attn.to_k(context), attn.to_v(context)
        d = key.shape[-1] // heads
        query, key, value = (x.view(1, -1, heads, d).transpose(1, 2) for x in (query, key, value))  # (1, H, *, d)
        if attn.norm_q is not None:
            query, key = attn.norm_q(query), attn.norm_k(key)
        nested_key, nested_value = (x.to(query.dtype) for x in self.state)
        bias = None if self.bias is None else self.bias.to(query.dtype)  # log image weights
        logits = query @ nested_key.transpose(-1, -2) * d**-0.5
        nested_maps = torch.softmax(logits if bias is None else logits + bias, dim=-1)  # (1, H, N, M)
        subject = nested_values(query, nested_key, nested_value, bias)  # (1, H, N, d)
        word_value = value[:, :, self.positions[:1]]  # (1, H, 1, d): V[s*]
        alpha = self.adapter.config.alpha
        if alpha is not None:
            subject = subject * inverse_subject_norm(subject) * alpha * word_value.norm(dim=-1, keepdim=True)
        lam = torch.ones(1, key.shape[2], device=query.device, dtype=query.dtype)
        lam[:, self.positions] = self.lam
        outer = torch.softmax(lambda_logits(query @ key.transpose(-1, -2) * d**-0.5, lam), dim=-1)
        self.result = {
            "grid": layer_grid(query.shape[2], *self.latent_size),
            "share": outer[0, :, :, self.positions].sum(-1).mean(0).float().cpu(),
            "subject_values": subject[0].transpose(0, 1).reshape(query.shape[2], -1).float().cpu(),
            "vanilla_value": word_value[0, :, 0].reshape(-1).float().cpu(),
            "nested_maps": nested_maps[0].mean(0).float().cpu(),
        }


def explain_layer(na, name: str, subject: Subject, prompt: str, layer: str | None = None, step: int | None = None,
                  num_inference_steps: int = 20, height: int | None = None, width: int | None = None, **pipe_kwargs):
    """Generate `prompt` with `subject` through adapter `name` and record one layer at one step.

    Args:
        layer: a cross-attention layer path (default: the middle one of the UNet's up path); step: the denoising
            step (default: the middle one).
    Returns:
        (the generated image, its LayerExplanation).
    """
    if name not in na.adapters:
        raise NestedAttentionError(f"No adapter named {name!r} is loaded; loaded: {sorted(na.adapters)}.")
    adapter = na.adapters[name].adapter
    if adapter.config.mechanism != "nested":
        raise NestedAttentionError(
            f"Adapter {name!r} uses the {adapter.config.mechanism} mechanism; explain shows nested attention maps, "
            f"so give a nested adapter."
        )
    layers = list(na.controller.layers)
    up = [path for path in layers if path.startswith("up_blocks")] or layers
    layer = up[len(up) // 2] if layer is None else layer
    if layer not in na.controller.layers:
        raise NestedAttentionError(f"The UNet has no cross-attention layer {layer!r}; its layers are {layers}.")
    step = num_inference_steps // 2 if step is None else step
    if not 0 <= step < num_inference_steps:
        raise NestedAttentionError(f"--step {step} is not one of the {num_inference_steps} denoising steps (0 to "
                                   f"{num_inference_steps - 1}).")
    unet = na.pipe.unet
    scale = na.pipe.vae_scale_factor
    height = height or unet.config.sample_size * scale
    width = width or unet.config.sample_size * scale
    encoded = na.encode_subject(name, subject)
    recorder = LayerRecorder(na, name, encoded, na.token_positions(name, prompt), layer, step,
                             (height // scale, width // scale))
    try:
        image = na(prompt, {name: encoded}, num_inference_steps=num_inference_steps, height=height, width=width,
                   **pipe_kwargs).images[0]
    finally:
        recorder.remove()
    if recorder.result is None:
        raise NestedAttentionError(f"The generation ran fewer than {step + 1} denoising steps; choose an earlier --step.")
    timestep = int(na.pipe.scheduler.timesteps[step])
    return image, LayerExplanation(layer=layer, step=step, timestep=timestep, **recorder.result)
