"""Word grounding for the toy denoiser: the subject word's cross-attention is pulled onto the subject's pixels.

Nested attention works through the subject word's cross-attention: it replaces that token's value, weighted by the
attention the word already gets at each pixel (paper 3.2). A large text-to-image model attends to its subject words
where the subject is drawn (the maps Prompt-to-Prompt edits); a miniature model trained on templated captions need
not, because a causal text encoder's end-of-text and padding states summarize the whole caption and the denoiser can
read everything there. Measured on the toy UNet trained without this loss: the subject word receives 1-8 % of a
pixel's attention, about what every one of the 32 tokens gets, so an adapter has almost nothing to act through.

``grounding_loss`` is FastComposer's localization loss (Xiao et al. 2023, eq. 4): per cross-attention layer, the
subject word's mean attention outside the subject's silhouette minus its mean attention inside it. It is added to the
denoising loss while the base model is trained; the model is still an ordinary ``UNet2DConditionModel`` afterwards.
The same loss grounds any other word on the pixels it names (the build can also ground the expression word on the
emotion symbol, ``BuildSize.expression_grounding_weight``): give several token positions and masks per sample, and
a weight per word.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from nested_attention.errors import NestedAttentionError, exits_on_error

from .text_image import tokenize

NAME = "grounding"  # nested-attention toy diagnose NAME


class AttentionMapRecorder:
    """Cross-attention processor that also records, per sample, the attention on some token positions.

    Set ``positions`` ((B,) token index per sample, or (B, K) for K words) before a forward pass to record into
    ``maps`` (one (B, pixels) tensor, or (B, K, pixels), per layer, mean over heads, in the graph); leave it None to
    run as a plain attention processor.
    """

    def __init__(self):
        self.positions: torch.Tensor | None = None
        self.maps: list[torch.Tensor] = []
        self._plain = AttnProcessor2_0()

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if self.positions is None or encoder_hidden_states is None or attention_mask is not None or attn.norm_cross:
            return self._plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        batch, pixels, _ = hidden_states.shape
        heads = attn.heads
        query, key, value = attn.to_q(hidden_states), attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        query, key, value = (x.view(batch, -1, heads, x.shape[-1] // heads).transpose(1, 2) for x in (query, key, value))
        probs = (query @ key.transpose(-1, -2) * attn.scale).softmax(-1)  # (B, H, pixels, T): toy sizes only
        words = self.positions.to(probs.device).view(batch, -1)  # (B, K)
        picked = probs.gather(-1, words[:, None, None, :].expand(-1, heads, pixels, -1)).mean(1)  # (B, pixels, K)
        self.maps.append(picked[..., 0] if self.positions.dim() == 1 else picked.transpose(1, 2))
        out = (probs @ value).transpose(1, 2).reshape(batch, pixels, -1)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


def install_recorder(unet) -> AttentionMapRecorder:
    """Route every cross-attention layer (``attn2``) of ``unet`` through one shared recorder; self-attention stays
    on the plain processor. Undo with ``unet.set_attn_processor(AttnProcessor2_0())``."""
    recorder = AttentionMapRecorder()
    unet.set_attn_processor({name: recorder if ".attn2." in name else AttnProcessor2_0() for name in unet.attn_processors})
    return recorder


def grounding_loss(maps: list[torch.Tensor], masks: torch.Tensor, keep: torch.Tensor,
                   weights: tuple[float, ...] | None = None) -> torch.Tensor:
    """Mean over layers of (mean attention outside the word's mask - mean attention inside it), averaged over the
    ``keep`` rows of each word and summed over words, word k scaled by ``weights[k]`` (default 1 each).

    Args:
        maps: per layer, (B, h * w) attention of each sample's subject word, or (B, K, h * w) of K words; the
            layers have the masks' aspect ratio.
        masks: (B, 1, H, W) subject coverage in [0, 1] at image resolution, or (B, K, H, W) one per word.
        keep: (B,) bool, the samples that count (a caption that was dropped has no subject word), or (B, K).
        weights: K floats, one per word.
    """
    if not maps or not bool(keep.any()):
        return masks.new_zeros(())
    keep = keep.view(keep.shape[0], -1)
    weights = (1.0,) * keep.shape[1] if weights is None else tuple(weights)
    if len(weights) != keep.shape[1]:
        raise ValueError(f"expected one grounding weight per word ({keep.shape[1]}), got {len(weights)}")
    total = masks.new_zeros(())
    for attention in maps:
        attention = attention.view(attention.shape[0], -1, attention.shape[-1])  # (B, K, pixels)
        h = int(round((attention.shape[-1] * masks.shape[-2] / masks.shape[-1]) ** 0.5))
        m = F.adaptive_avg_pool2d(masks.to(attention.dtype), (h, attention.shape[-1] // h)).flatten(2)
        inside = (attention * m).sum(-1) / m.sum(-1).clamp_min(1e-3)
        outside = (attention * (1 - m)).sum(-1) / (1 - m).sum(-1).clamp_min(1e-3)
        gap = outside - inside  # (B, K)
        for k in range(gap.shape[1]):
            if weights[k] and bool(keep[:, k].any()):
                total = total + weights[k] * gap[keep[:, k], k].mean()
    return total / len(maps)


def word_positions(tokenizer, captions: list[str], words: list[str]) -> torch.Tensor:
    """(N,) the token index of ``words[i]`` in ``captions[i]`` as the tokenizer pads them (first occurrence)."""
    ids = tokenize(tokenizer, captions)
    word_ids = torch.tensor([tokenizer.convert_tokens_to_ids(tokenizer.tokenize(w))[0] for w in words])
    hits = ids == word_ids[:, None]
    if not bool(hits.any(1).all()):
        raise ValueError("a caption does not contain its subject word")
    return hits.int().argmax(1)


def word_attention(pipe, prompts: list[str], word: str, steps: int = 10, seed: int = 0) -> dict[str, dict[str, float]]:
    """Per cross-attention layer of ``pipe.unet``: how much attention ``word`` gets while ``pipe`` generates
    ``prompts`` (no guidance): ``mean`` over pixels, and ``peak``, the pixel where it gets most; both averaged over
    samples, heads and steps. Restores the plain processors afterwards."""
    positions = word_positions(pipe.tokenizer, prompts, [word] * len(prompts))
    names = [name for name in pipe.unet.attn_processors if ".attn2." in name]
    sums: dict[str, list[float]] = {name: [0.0, 0.0, 0] for name in names}

    class _PerLayer(AttentionMapRecorder):
        def __init__(self, name: str):
            super().__init__()
            self.name, self.positions = name, positions

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
            out = super().__call__(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
            if self.maps:
                maps = self.maps.pop()
                sums[self.name][0] += float(maps.mean())
                sums[self.name][1] += float(maps.amax(1).mean())
                sums[self.name][2] += 1
            return out

    pipe.unet.set_attn_processor({n: _PerLayer(n) if n in names else AttnProcessor2_0() for n in pipe.unet.attn_processors})
    try:
        pipe(prompts, num_inference_steps=steps, guidance_scale=1.0, generator=torch.Generator().manual_seed(seed))
    finally:
        pipe.unet.set_attn_processor(AttnProcessor2_0())
    return {name.removesuffix(".processor"): {"mean": s[0] / s[2], "peak": s[1] / s[2]} for name, s in sums.items()}


@exits_on_error
def main(argv: list[str] | None = None) -> int:
    """``python -m nested_attention_toy.grounding [--model DIR]``: the subject word's attention per layer."""
    import argparse

    import numpy as np
    from diffusers import StableDiffusionPipeline

    from .assets import build_part, shipped_path
    from .world import generic_caption, sample_context

    parser = argparse.ArgumentParser(prog=f"nested-attention toy diagnose {NAME}", description=main.__doc__)
    parser.add_argument("--model", default=str(shipped_path("pipeline")), help="pipeline folder (default: the shipped toy)")
    parser.add_argument("--domain", default="person", choices=("person", "pet"))
    parser.add_argument("--prompts", type=int, default=8)
    args = parser.parse_args(argv)
    if args.prompts < 1:
        raise NestedAttentionError(f"--prompts is {args.prompts}; expected at least 1.")
    pipe = StableDiffusionPipeline.from_pretrained(build_part(args.model, "pipeline", "model_index.json"))
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    prompts = [generic_caption(args.domain, sample_context(rng), rng) for _ in range(args.prompts)]
    for layer, value in word_attention(pipe, prompts, args.domain).items():
        print(f"{layer:60s} mean {100 * value['mean']:5.1f} %   peak {100 * value['peak']:5.1f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
