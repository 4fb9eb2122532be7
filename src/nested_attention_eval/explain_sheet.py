"""The sheet and the numbers `nested-attention explain` writes for one recorded layer."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

SUBJECT_SHARE = 0.1  # pixels giving the subject word at least this share of their attention count as the subject's
SHOWN_QUERIES = 16
QUERY_COLUMNS = 8


def value_colours(subject_values: torch.Tensor, vanilla_value: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The per-pixel values' first three principal components as RGB in [0, 1], and the vanilla value's colour in
    the same projection (missing components are 0.5)."""
    mean = subject_values.mean(0)
    _, _, basis = torch.linalg.svd(subject_values - mean, full_matrices=False)
    projected = (torch.cat([subject_values, vanilla_value[None]]) - mean) @ basis[:3].T
    low, high = projected.min(0).values, projected.max(0).values
    colours = torch.full((projected.shape[0], 3), 0.5)
    colours[:, : projected.shape[1]] = (projected - low) / (high - low).clamp_min(1e-8)
    return colours[:-1].numpy(), colours[-1].numpy()


def token_heat(weights: torch.Tensor, query_maps: list[torch.Tensor]) -> list[np.ndarray]:
    """Per subject image: its tokens' query maps weighted by `weights` (the probed pixel's nested attention)."""
    heat, start = [], 0
    for maps in query_maps:
        count = maps.shape[0]
        heat.append(torch.einsum("m,mhw->hw", weights[start : start + count], maps).numpy())
        start += count
    return heat


def summary(explanation, query_maps: list[torch.Tensor], cell: tuple[int, int]) -> dict:
    """How query-dependent the layer is, over the subject's pixels, and what the probed pixel attends to."""
    height, width = explanation.grid
    maps, share = explanation.nested_maps, explanation.share
    subject = share >= SUBJECT_SHARE
    tokens = maps.shape[1]
    entropy = -(maps * maps.clamp_min(1e-12).log()).sum(-1) / max(np.log(tokens), 1e-12)
    top = maps.sort(dim=-1, descending=True).values
    units = torch.nn.functional.normalize(explanation.subject_values, dim=-1)
    probe = cell[0] * width + cell[1]
    order = maps[probe].argsort(descending=True)[:5]

    def over_subject(values: torch.Tensor) -> float | None:
        return round(float(values[subject].mean()), 4) if bool(subject.any()) else None

    return {
        "layer": explanation.layer, "step": explanation.step, "timestep": explanation.timestep,
        "grid": list(explanation.grid), "subject_tokens": tokens,
        "subject_pixels": int(subject.sum()),
        "subject_pixels_rule": f"share of the subject word >= {SUBJECT_SHARE}",
        "nested_entropy": over_subject(entropy),  # 1: uniform over the tokens (one global value), 0: one token
        "top1_mass": over_subject(top[:, 0]),
        "top2_mass": over_subject(top[:, :2].sum(-1)),
        "value_spread": round(float(1 - units[subject].mean(0).norm()), 4) if bool(subject.any()) else None,
        "cosine_to_vanilla_value": round(float(torch.nn.functional.cosine_similarity(
            explanation.subject_values[subject].mean(0) if bool(subject.any()) else explanation.subject_values.mean(0),
            explanation.vanilla_value, dim=0)), 4),
        "probed_cell": list(cell), "probed_share": round(float(share[probe]), 4),
        "probed_top_tokens": [[int(i), round(float(maps[probe, i]), 4)] for i in order],
    }


def draw_sheet(inputs: list[Image.Image], image: Image.Image, explanation, query_maps: list[torch.Tensor],
               cell: tuple[int, int], prompt: str) -> Image.Image:
    """Row 1: the subject, the generated image, the subject word's share, v*_q and V[s*] as colours. Row 2: the
    probed pixel, its nested attention over the tokens, where those tokens look in each subject image. Then the
    first subject image's token maps (Q-Former queries or the linear readout), the probed pixel's strongest tokens
    first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height, width = explanation.grid
    colours, vanilla = value_colours(explanation.subject_values, explanation.vanilla_value)
    probe = cell[0] * width + cell[1]
    weights = explanation.nested_maps[probe]
    heat = token_heat(weights, query_maps)
    shown = weights[: query_maps[0].shape[0]].argsort(descending=True)[:SHOWN_QUERIES].tolist()
    columns = max(QUERY_COLUMNS, 2 + len(inputs))
    query_rows = -(-len(shown) // QUERY_COLUMNS)
    figure = plt.figure(figsize=(1.5 * columns, 3.2 + 1.5 * query_rows))
    grid = figure.add_gridspec(2 + query_rows, columns)

    def panel(row, column, picture, title, **kwargs):
        ax = figure.add_subplot(grid[row, column])
        ax.imshow(picture, interpolation="nearest", **kwargs)
        ax.set_title(title, fontsize=7)
        ax.axis("off")
        return ax

    panel(0, 0, inputs[0], "subject")
    panel(0, 1, image, "generated")
    panel(0, 2, explanation.share.reshape(height, width).numpy(), "share of the word", cmap="magma", vmin=0, vmax=1)
    panel(0, 3, colours.reshape(height, width, 3), "v*_q (PCA)")
    panel(0, 4, np.broadcast_to(vanilla, (height, width, 3)), "V[s*]")
    ax = panel(1, 0, image, "probed pixel")
    scale_y, scale_x = image.size[1] / height, image.size[0] / width
    ax.add_patch(plt.Rectangle((cell[1] * scale_x - 0.5, cell[0] * scale_y - 0.5), scale_x, scale_y, fill=False,
                               edgecolor="cyan", linewidth=1.5))
    bars = figure.add_subplot(grid[1, 1])
    bars.bar(range(len(weights)), weights.numpy(), color="tab:blue")
    bars.set_title("its nested attention", fontsize=7)
    bars.tick_params(labelsize=6)
    for i, (view, hot) in enumerate(zip(inputs, heat)):
        ax = panel(1, 2 + i, view, "where it looks" + ("" if len(inputs) == 1 else f" ({i + 1})"))
        ax.imshow(hot, cmap="jet", alpha=0.5, extent=(-0.5, view.size[0] - 0.5, view.size[1] - 0.5, -0.5),
                  interpolation="bilinear")
    for index, token in enumerate(shown):
        row, column = divmod(index, QUERY_COLUMNS)
        ax = panel(2 + row, column, inputs[0], f"token {token}: {float(weights[token]):.2f}")
        ax.imshow(query_maps[0][token].numpy(), cmap="jet", alpha=0.55, interpolation="bilinear",
                  extent=(-0.5, inputs[0].size[0] - 0.5, inputs[0].size[1] - 0.5, -0.5))
    figure.suptitle(f"{prompt!r}: {explanation.layer}, step {explanation.step} (t = {explanation.timestep})",
                    fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")
