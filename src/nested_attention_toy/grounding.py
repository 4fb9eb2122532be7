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

Pulled all the way, the word takes nearly all of a subject pixel's attention in every head, and lambda
(``max(l, lambda l)`` on the word's logits, paper 5.1) has nothing left to raise. A ``target`` below 1
(``BuildSize.grounding_target``) pulls each head's attention inside the silhouette only up to the target, so the word
shares the subject's pixels with the rest of the prompt as in a large model; ``lambda_headroom`` measures what is left.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from nested_attention.attention import lambda_logits
from nested_attention.errors import NestedAttentionError, exits_on_error

from .assets import build_part, shipped_path
from .corpus import make_corpus
from .text_image import tokenize
from .world import DOMAINS

NAME = "grounding"  # nested-attention toy diagnose NAME
NAME_SEED = 8  # the held-out renders `main` measures on


class AttentionMapRecorder:
    """Cross-attention processor that also records, per sample, the attention on some token positions.

    Set ``positions`` ((B,) token index per sample, or (B, K) for K words) before a forward pass to record into
    ``maps`` (one (B, K, heads, pixels) tensor per layer, K = 1 for (B,) positions, in the graph); leave it None to
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
        picked = probs.gather(-1, words[:, None, None, :].expand(-1, heads, pixels, -1))  # (B, H, pixels, K)
        self.maps.append(picked.permute(0, 3, 1, 2))
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
                   weights: tuple[float, ...] | None = None, target: float = 1.0) -> torch.Tensor:
    """Mean over layers of (mean attention outside the word's mask - mean of min(attention, ``target``) inside it),
    averaged over heads and the ``keep`` rows of each word and summed over words, word k scaled by ``weights[k]``
    (default 1 each). With ``target`` 1 the inside term is the plain mean attention.

    Args:
        maps: per layer, the attention of each sample's K words: (B, K, heads, h * w), or averaged over heads
            (B, K, h * w), or (B, h * w) of one word; the layers have the masks' aspect ratio.
        masks: (B, 1, H, W) subject coverage in [0, 1] at image resolution, or (B, K, H, W) one per word.
        keep: (B,) bool, the samples that count (a caption that was dropped has no subject word), or (B, K).
        weights: K floats, one per word.
        target: the attention inside the mask that stops counting (per head and pixel of a map with heads).
    """
    if not maps or not bool(keep.any()):
        return masks.new_zeros(())
    keep = keep.view(keep.shape[0], -1)
    weights = (1.0,) * keep.shape[1] if weights is None else tuple(weights)
    if len(weights) != keep.shape[1]:
        raise ValueError(f"expected one grounding weight per word ({keep.shape[1]}), got {len(weights)}")
    total = masks.new_zeros(())
    for attention in maps:
        if attention.dim() < 4:  # no head dimension: one "head" holding the mean
            attention = attention.view(attention.shape[0], -1, 1, attention.shape[-1])
        h = int(round((attention.shape[-1] * masks.shape[-2] / masks.shape[-1]) ** 0.5))
        m = F.adaptive_avg_pool2d(masks.to(attention.dtype), (h, attention.shape[-1] // h)).flatten(2)[:, :, None]
        capped = attention if target >= 1 else attention.clamp(max=target)
        inside = ((capped * m).sum(-1) / m.sum(-1).clamp_min(1e-3)).mean(-1)  # (B, K)
        outside = ((attention * (1 - m)).sum(-1) / (1 - m).sum(-1).clamp_min(1e-3)).mean(-1)
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


class _ShareProbe:
    """Cross-attention processor that computes the plain output and records, per sample and head, the attention on
    the word at ``positions`` (B,) at lambda 1 and with the word's logits l raised to max(l, ``lam`` l) (paper 5.1)."""

    def __init__(self, positions: torch.Tensor, lam: float):
        self.positions, self.lam, self.records = positions, lam, []
        self._plain = AttnProcessor2_0()

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        batch, pixels, _ = hidden_states.shape
        query, key = attn.to_q(hidden_states), attn.to_k(encoder_hidden_states)
        query, key = (x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2) for x in (query, key))
        logits = query @ key.transpose(-1, -2) * attn.scale  # (B, H, pixels, T): toy sizes only
        positions = self.positions.to(logits.device)
        index = positions[:, None, None, None].expand(-1, attn.heads, pixels, 1)
        columns = torch.ones(batch, logits.shape[-1], dtype=logits.dtype, device=logits.device)
        columns[torch.arange(batch, device=logits.device), positions] = self.lam
        lifted = lambda_logits(logits, columns)  # the library's own lambda
        self.records.append((logits.softmax(-1).gather(-1, index)[..., 0], lifted.softmax(-1).gather(-1, index)[..., 0]))
        return self._plain(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)


@torch.no_grad()
def lambda_headroom(unet, latents: torch.Tensor, states: torch.Tensor, positions: torch.Tensor, masks: torch.Tensor,
                    scheduler, lam: float = 4.0, timesteps: tuple[int, ...] = (900, 500, 100),
                    seed: int = 0) -> dict[str, dict[str, float]]:
    """Per cross-attention layer of ``unet``: how much attention a word gets on its own pixels, and how much lambda
    can add. ``latents`` (B, C, h, w) of images whose word (token ``positions`` (B,) of ``states`` (B, T, D)) names
    the pixels ``masks`` (B, H, W) in [0, 1] are noised to each of ``timesteps``. Returns, averaged over samples,
    heads and timesteps: ``inside`` and ``outside``, the word's mean attention on its pixels and elsewhere, at
    lambda 1; ``inside_lam`` and ``outside_lam`` the same at ``lam``; ``saturated``, the fraction of the word's
    (pixel, head) pairs inside with attention above 0.9 at lambda 1. Restores the plain processors afterwards."""
    names = [name for name in unet.attn_processors if ".attn2." in name]
    probes = {name: _ShareProbe(positions, lam) for name in names}
    unet.set_attn_processor({n: probes.get(n, AttnProcessor2_0()) for n in unet.attn_processors})
    generator = torch.Generator().manual_seed(seed)
    try:
        for t in timesteps:
            step = torch.full((len(latents),), t, dtype=torch.long)
            noise = torch.randn(latents.shape, generator=generator)
            unet(scheduler.add_noise(latents, noise, step), step, states)
    finally:
        unet.set_attn_processor(AttnProcessor2_0())
    keys = ("inside", "inside_lam", "outside", "outside_lam", "saturated")
    result = {}
    for name, probe in probes.items():
        sums = dict.fromkeys(keys, 0.0)
        for plain, lifted in probe.records:  # (B, H, pixels) each
            h = int(round((plain.shape[-1] * masks.shape[-2] / masks.shape[-1]) ** 0.5))
            m = F.adaptive_avg_pool2d(masks[:, None].float(), (h, plain.shape[-1] // h)).flatten(1)[:, None]
            inside, outside = m.sum(-1).clamp_min(1e-3), (1 - m).sum(-1).clamp_min(1e-3)
            sums["inside"] += float(((plain * m).sum(-1) / inside).mean())
            sums["inside_lam"] += float(((lifted * m).sum(-1) / inside).mean())
            sums["outside"] += float(((plain * (1 - m)).sum(-1) / outside).mean())
            sums["outside_lam"] += float(((lifted * (1 - m)).sum(-1) / outside).mean())
            sums["saturated"] += float((((plain > 0.9).float() * m).sum(-1) / inside).mean())
        result[name.removesuffix(".processor")] = {k: v / len(probe.records) for k, v in sums.items()}
    return result


@exits_on_error
def main(argv: list[str] | None = None) -> int:
    """``nested-attention toy diagnose grounding [--model DIR]``: per cross-attention layer, the subject word's
    attention on the subject's pixels and elsewhere, on held-out renders noised to t = 900, 500 and 100, at lambda 1
    and at ``--lam``: how much room lambda has to raise it."""
    parser = argparse.ArgumentParser(prog=f"nested-attention toy diagnose {NAME}", description=main.__doc__)
    parser.add_argument("--model", default=str(shipped_path("pipeline")), help="pipeline folder (default: the shipped toy)")
    parser.add_argument("--domain", default="person", choices=("person", "pet"))
    parser.add_argument("--renders", type=int, default=16, help="held-out target renders (default: 16)")
    parser.add_argument("--lam", type=float, default=4.0, help="the lambda to compare with 1 (default: 4)")
    args = parser.parse_args(argv)
    if args.renders < 1 or args.lam < 1:
        raise NestedAttentionError(f"--renders is {args.renders} and --lam {args.lam:g}; expected at least 1 each.")
    pipe = StableDiffusionPipeline.from_pretrained(build_part(args.model, "pipeline", "model_index.json"))
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    corpus = make_corpus(4 * args.renders, seed=NAME_SEED, size=size, held_out=True, workers=1, masks=True, desc="render")
    rows = [i for i, (d, k) in enumerate(zip(corpus.domains.tolist(), corpus.kinds))
            if DOMAINS[d] == args.domain and k == "target"][: args.renders]
    captions = [corpus.captions[i] for i in rows]
    with torch.no_grad():
        images = corpus.images[rows].float() / 127.5 - 1
        latents = pipe.vae.encode(images).latent_dist.mean * pipe.vae.config.scaling_factor
        states = pipe.text_encoder(tokenize(pipe.tokenizer, captions)).last_hidden_state
    positions = word_positions(pipe.tokenizer, captions, [args.domain] * len(rows))
    shares = lambda_headroom(pipe.unet, latents, states, positions, corpus.masks[rows].float() / 255, pipe.scheduler,
                             lam=args.lam)
    print(f"the word '{args.domain}' on {len(rows)} held-out renders: its attention on the subject's pixels (inside) "
          f"and elsewhere, lambda 1 -> {args.lam:g}")
    for layer, v in [*shares.items(), ("mean over layers", {k: sum(s[k] for s in shares.values()) / len(shares)
                                                             for k in next(iter(shares.values()))})]:
        print(f"{layer:58s} inside {100 * v['inside']:5.1f} -> {100 * v['inside_lam']:5.1f} %  "
              f"(above 0.9: {100 * v['saturated']:5.1f} %)   outside {100 * v['outside']:4.1f} -> "
              f"{100 * v['outside_lam']:4.1f} %")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
