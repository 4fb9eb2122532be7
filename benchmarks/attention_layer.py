"""Suite 1: one cross-attention layer, side by side, at the shapes of SDXL and SD 1.5.

The batch is 2 as with classifier-free guidance: row 0 is the negative prompt (no subject word), row 1 the
prompt, with the subject word at one of its 77 tokens. Every method runs the layer's own projections (`to_q`,
`to_k`, `to_v`, `to_out`) of a diffusers `Attention` module with random weights, so each time is a whole layer:

- vanilla: diffusers' `AttnProcessor2_0` (one SDPA call), the layer without personalization.
- ours: the library's pure functions. Row 0 as vanilla; row 1 `nested_values` (one SDPA call over the n_q
  nested keys/values) and `personalized_attention` (one SDPA call over an augmented value matrix).
- ours-processor: the same through the library's `NestedAttnProcessor` (controller, `BoundSubject`, row split).
- ip-adapter-16, ip-adapter-nq: diffusers' `IPAdapterAttnProcessor2_0` with 16 or n_q image tokens; as in
  diffusers, the image tokens are projected in every call and attended by both rows.
- naive: builds the (B, H, N, T, d) tensor of per-query values, as the other public port does, and contracts it
  with the softmax over the text. The same math as ours: checked in fp32 before anything is timed.

Nested keys/values and image tokens are made before timing (once per image, not per call). Times are medians;
ratios are to vanilla in the same run. The FLOP floor of the nested part is 4 N n_q D for each bound row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, IPAdapterAttnProcessor2_0
from torch import nn

from nested_attention import BoundSubject, install
from nested_attention.attention import nested_values, personalized_attention

from .common import (
    MiB,
    Run,
    environment,
    markdown_table,
    matmul_rate,
    parser,
    peak_memory,
    run_settings,
    time_call,
    write_outputs,
)

SUITE = "attention_layer"
TEXT_TOKENS, SUBJECT_TOKEN, ALPHA, IP_TOKENS = 77, 5, 2.0, 16
TOLERANCE = 1e-4  # max |ours - naive| relative to max |naive|, in fp32


@dataclass(frozen=True)
class LayerShape:
    name: str
    queries: int  # N, latent pixels at this layer
    width: int  # D = heads x head size
    heads: int
    text_dim: int  # width of the 77 text tokens


SHAPES = {
    "cuda": [
        LayerShape("SDXL 1024px 64x64", 4096, 640, 10, 2048), LayerShape("SDXL 1024px 32x32", 1024, 1280, 20, 2048),
        LayerShape("SD1.5 512px 64x64", 4096, 320, 8, 768), LayerShape("SD1.5 512px 32x32", 1024, 640, 8, 768),
    ],
    "cpu": [  # the same layers at a quarter of the pixels (SDXL at 512 px, SD 1.5 at 256 px), and the memory
        # goal's own layer (SDXL 1024 px, 64x64 latents) at full size
        LayerShape("SDXL 512px 32x32", 1024, 640, 10, 2048), LayerShape("SDXL 512px 16x16", 256, 1280, 20, 2048),
        LayerShape("SD1.5 256px 32x32", 1024, 320, 8, 768), LayerShape("SDXL 1024px 64x64", 4096, 640, 10, 2048),
    ],
    "smoke": [LayerShape("smoke 8x8", 64, 64, 2, 32)],
}
NUM_QUERIES = {"cuda": (256, 1024), "cpu": (256, 1024), "smoke": (8,)}
WARMUP_ITERS = {"cuda": (5, 50), "cpu": (2, 10), "smoke": (1, 2)}


class Case:
    """One layer and its inputs: a guided batch of 2, nested keys/values of n_q tokens, IP-Adapter tokens."""

    def __init__(self, shape: LayerShape, n_q: int, device, dtype, seed: int = 0):
        torch.manual_seed(seed)
        d = shape.width // shape.heads
        self.attn = Attention(query_dim=shape.width, cross_attention_dim=shape.text_dim, heads=shape.heads,
                              dim_head=d, out_bias=True).to(device, dtype).eval()
        rand = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
        self.hidden = rand(2, shape.queries, shape.width)  # (B, N, D)
        self.text = rand(2, TEXT_TOKENS, shape.text_dim)  # (B, T, C)
        self.nested_key, self.nested_value = rand(1, shape.heads, n_q, d), rand(1, shape.heads, n_q, d)  # (S, H, M, d)
        self.token_mask = torch.zeros(2, TEXT_TOKENS, dtype=torch.bool, device=device)  # (B, T)
        self.token_mask[1, SUBJECT_TOKEN] = True
        self.ip_tokens = {k: rand(2, k, shape.text_dim) for k in {IP_TOKENS, n_q}}
        self.ip = {k: IPAdapterAttnProcessor2_0(shape.width, shape.text_dim, num_tokens=(k,)).to(device, dtype)
                   for k in self.ip_tokens}
        self.holder = nn.Module()
        self.holder.attn = self.attn
        self.controller = install(self.holder)  # the library's processor on this one layer
        self.controller.bind([BoundSubject(
            token_mask=self.token_mask[1:].cpu(), slots=torch.zeros(1, dtype=torch.long),
            nested={"attn": (self.nested_key, self.nested_value)}, alpha=ALPHA,
        )])

    def _heads(self, rows: slice = slice(None)):
        attn, hidden, text = self.attn, self.hidden[rows], self.text[rows]
        split = lambda x: x.view(x.shape[0], -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)  # noqa: E731
        return split(attn.to_q(hidden)), split(attn.to_k(text)), split(attn.to_v(text))  # (B, H, L, d)

    def _merge(self, out):
        return self.attn.to_out[1](self.attn.to_out[0](out.transpose(1, 2).flatten(2)))  # (B, N, D)

    def vanilla(self):
        return AttnProcessor2_0()(self.attn, self.hidden, self.text)

    def ours(self):
        """Row 0 (negative prompt) as vanilla, row 1 nested: the arithmetic of NestedAttnProcessor, without it."""
        c = 1  # rows 0..c-1 carry no subject
        vanilla = AttnProcessor2_0()(self.attn, self.hidden[:c], self.text[:c])
        query, key, value = self._heads(slice(c, None))
        nested_key = self.nested_key.expand(query.shape[0], -1, -1, -1)
        nested_value = self.nested_value.expand(query.shape[0], -1, -1, -1)
        subject_value = nested_values(query, nested_key, nested_value)  # (1, H, N, d)
        nested = personalized_attention(query, key, value, [subject_value], self.token_mask[None, c:], alpha=ALPHA)
        return torch.cat([vanilla, self._merge(nested)])

    def ours_processor(self):
        return self.attn.processor(self.attn, self.hidden, self.text)

    def ip_adapter(self, tokens: int):
        return self.ip[tokens](self.attn, self.hidden, (self.text, [self.ip_tokens[tokens]]))

    def naive(self):
        """Per-query values materialized as one (B, H, N, T, d) tensor; softmax over text; contraction."""
        query, key, value = self._heads()
        B, H, N, d = query.shape
        c = 1
        subject_value = F.scaled_dot_product_attention(  # v*_q of the bound row, (1, H, N, d)
            query[c:], self.nested_key.expand(B - c, -1, -1, -1), self.nested_value.expand(B - c, -1, -1, -1))
        unit = subject_value / subject_value.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        values = value[:, :, None].repeat(1, 1, N, 1, 1)  # (B, H, N, T, d)
        rows, positions = self.token_mask[c:].nonzero(as_tuple=True)
        norms = value[rows + c, :, positions].norm(dim=-1)  # (P, H)
        values[rows + c, :, :, positions] = ALPHA * norms[:, :, None, None] * unit[rows]
        probs = (query @ key.transpose(-1, -2) * d**-0.5).softmax(dim=-1)  # (B, H, N, T)
        return self._merge((probs[..., None, :] @ values).squeeze(-2))

    def methods(self, n_q: int) -> dict:
        return {"ours": self.ours, "ours-processor": self.ours_processor,
                f"ip-adapter-{n_q}": lambda: self.ip_adapter(n_q), "naive": self.naive}


def check_equal_math(shape: LayerShape, n_q: int, device) -> dict:
    """ours, ours-processor and naive on one fp32 case: the benchmark compares equal math."""
    case = Case(shape, n_q, device, torch.float32)
    with torch.no_grad():
        ours, processor, naive, vanilla = case.ours(), case.ours_processor(), case.naive(), case.vanilla()
    case.controller.uninstall()
    scale = naive.abs().max().item()
    result = {"shape": shape.name, "n_q": n_q, "max_abs_diff_vs_naive": (ours - naive).abs().max().item(),
              "processor_max_abs_diff": (processor - ours).abs().max().item(), "output_max_abs": scale,
              # not a vacuous check: the subject changes the prompt row, and only that row
              "subject_effect": (ours[1] - vanilla[1]).abs().max().item() / max(scale, 1e-12),
              "negative_row_diff": (ours[0] - vanilla[0]).abs().max().item()}
    result["relative_diff"] = max(result["max_abs_diff_vs_naive"], result["processor_max_abs_diff"]) / max(scale, 1e-12)
    if not (result["relative_diff"] <= TOLERANCE and result["negative_row_diff"] <= TOLERANCE * scale
            and result["subject_effect"] > 100 * TOLERANCE):
        raise AssertionError(f"ours and the naive reference differ at {shape.name}, n_q {n_q}: {result}")
    return result


def measure(fn, run: Run, warmup: int, iters: int) -> dict:
    with torch.no_grad():
        timing = time_call(fn, run.device, warmup, iters)
        return {"time": timing, "ms": timing["median_ms"], "peak_bytes": peak_memory(fn, run.device)}


def main(argv=None) -> dict:
    args = parser(SUITE, __doc__.splitlines()[0]).parse_args(argv)
    run = run_settings(SUITE, args)
    warmup, iters = WARMUP_ITERS[run.preset]
    rate = matmul_rate(run)
    rows, checks, floors = [], [], []
    for shape in SHAPES[run.preset]:
        base = None
        for n_q in NUM_QUERIES[run.preset]:
            checks.append(check_equal_math(shape, n_q, run.device))
            case = Case(shape, n_q, run.device, run.dtype)
            if base is None:  # independent of n_q: measured once per shape
                base = {"vanilla": measure(case.vanilla, run, warmup, iters),
                        f"ip-adapter-{IP_TOKENS}": measure(lambda c=case: c.ip_adapter(IP_TOKENS), run, warmup, iters)}
                vanilla = base["vanilla"]
                rows += [{"shape": shape.name, "method": m, "n_q": None, **r} for m, r in base.items()]
            measured = {m: measure(fn, run, warmup, iters) for m, fn in case.methods(n_q).items()}
            rows += [{"shape": shape.name, "method": m, "n_q": n_q, **r} for m, r in measured.items()]
            extra_flops = 4 * 1 * shape.queries * n_q * shape.width  # one bound row: q K̆ᵀ and P V̆
            floor_ms = extra_flops / rate["flops_per_s"] * 1e3
            extra_ms = measured["ours"]["ms"] - vanilla["ms"]
            processor_extra_ms = measured["ours-processor"]["ms"] - vanilla["ms"]
            naive_bytes = measured["naive"]["peak_bytes"]
            floors.append({
                "shape": shape.name, "n_q": n_q, "extra_gflops": extra_flops / 1e9, "extra_floor_ms": floor_ms,
                "extra_ms": extra_ms, "extra_vs_floor": extra_ms / floor_ms,
                "processor_extra_ms": processor_extra_ms, "processor_extra_vs_floor": processor_extra_ms / floor_ms,
                "materialized_mib": 2 * shape.queries * TEXT_TOKENS * shape.width * case.hidden.element_size() / MiB,
                "naive_memory_over_ours": naive_bytes / max(measured["ours"]["peak_bytes"], 1),
                "naive_memory_over_processor": naive_bytes / max(measured["ours-processor"]["peak_bytes"], 1),
            })
            case.controller.uninstall()
        for row in rows:
            if row["shape"] == shape.name:
                row["time_vs_vanilla"] = row["ms"] / vanilla["ms"]
                row["peak_mib"] = row["peak_bytes"] / MiB
                row["memory_vs_vanilla"] = row["peak_bytes"] / max(vanilla["peak_bytes"], 1)

    payload = {"suite": SUITE, "environment": environment(run), "matmul": rate, "batch": 2, "text_tokens": TEXT_TOKENS,
               "results": rows, "checks": checks, "floor": floors}
    table = markdown_table(rows, [
        ("layer", "shape", "s"), ("method", "method", "s"), ("n_q", "n_q", "d"), ("ms", "ms", ".3f"),
        ("x vanilla", "time_vs_vanilla", ".3f"), ("peak MiB", "peak_mib", ".1f"),
        ("mem x vanilla", "memory_vs_vanilla", ".2f"),
    ]) + "\n\n" + markdown_table(floors, [
        ("layer", "shape", "s"), ("n_q", "n_q", "d"), ("extra GFLOP", "extra_gflops", ".2f"),
        ("floor ms", "extra_floor_ms", ".3f"), ("measured extra ms", "extra_ms", ".3f"),
        ("extra / floor (goal <= 1.25)", "extra_vs_floor", ".2f"),
        ("processor extra / floor", "processor_extra_vs_floor", ".2f"),
        ("naive mem / ours (goal >= 20)", "naive_memory_over_ours", ".1f"),
        ("naive mem / processor", "naive_memory_over_processor", ".1f"),
    ]) + f"\n\nmatrix rate: {rate['flops_per_s'] / 1e9:.1f} GFLOP/s ({rate['dtype']}, {rate['size']}^3)"
    write_outputs(run, payload, table)
    return payload


if __name__ == "__main__":
    main()
