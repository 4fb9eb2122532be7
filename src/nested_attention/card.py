"""The model card (README.md) written next to a saved adapter: what it is, where it comes from, how to use it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from .config import NestedAdapterConfig
from .errors import NestedAttentionError
from .paths import looks_like_local_path
from .sources import MODEL, find

CARD_NAME = "README.md"


@dataclass
class AdapterCard:
    """What a model card says beyond the adapter config; every field is optional.

    Attributes:
        base_model: the pipeline the adapter was trained on (a hub id goes into the card's metadata too).
        training: a short summary, e.g. {"data": "faces/", "records": 40000, "steps": 1200, "batch size": 32}.
        metrics: measured results, e.g. {"identity (ArcFace cosine), lambda 1": 0.41}.
    """

    base_model: str | None = None
    training: dict[str, object] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


def _is_hub_id(name: str | None) -> bool:
    return bool(name) and name.count("/") == 1 and not looks_like_local_path(name) and not Path(name).exists()


def _table(rows: dict) -> str:
    return "| | |\n| --- | --- |\n" + "\n".join(f"| {key} | {value} |" for key, value in rows.items())


def _load_base_lines(base_model: str | None) -> list[str]:
    """The usage snippet's imports and the line that loads the base pipeline: a name registered by an installed
    package (``toy``) is not something plain diffusers resolves, so it goes through the library's loader."""
    if base_model and find(MODEL, base_model) is not None:
        return ["from nested_attention import NestedAttention, Subject",
                "from nested_attention.sources import load_pipeline", "",
                f'pipe = load_pipeline("{base_model}")  # a model that an installed package registers by name']
    return ["from diffusers import DiffusionPipeline", "from nested_attention import NestedAttention, Subject", "",
            f'pipe = DiffusionPipeline.from_pretrained("{base_model or "BASE_MODEL"}")']


def render_card(config: NestedAdapterConfig, card: AdapterCard | None = None) -> str:
    """The README.md text: metadata (library, base model, tags), the adapter, its training, metrics and usage."""
    card = card or AdapterCard()
    metadata = ModelCardData(
        library_name="nested-attention", pipeline_tag="text-to-image",
        base_model=card.base_model if _is_hub_id(card.base_model) else None,
        tags=["nested-attention", "subject-personalization", "diffusers"],
    )
    base = card.base_model or "the base pipeline the adapter was trained for"
    sections = [
        f"# Nested Attention adapter for '{config.word}'",
        "An encoder-based subject personalization adapter for diffusers (Nested Attention, Patashnik et al., "
        "arXiv 2501.01407): given images of a subject, every cross-attention layer gives the prompt word "
        f"'{config.word}' a per-pixel value computed from the subject's images." if config.mechanism == "nested" else
        f"A baseline of Nested Attention (arXiv 2501.01407, Fig. 10): the same subject encoder, injected into the "
        f"cross-attention layers with the '{config.mechanism}' mechanism instead of nested attention.",
        _table({
            **({} if config.mechanism == "nested" else {"mechanism": config.mechanism}),
            "base model": base,
            "subject word": config.word,
            "image encoder": config.image_encoder or "(not named: pass image_encoder= when loading)",
            "nested layers": len(config.layers),
            "subject encoder": "Q-Former" if config.subject_encoder == "qformer" else
            f"linear readout of the CLIP tokens (rank {config.linear_rank})",
            "subject tokens per image": config.num_queries,
            "alpha (value norm regularization)": config.alpha,
        }),
    ]
    if card.training:
        sections += ["## Training", _table(card.training)]
    sections += ["## Metrics", _table(card.metrics) if card.metrics else
                 "Not measured yet (`nested-attention evaluate ... --card` adds what it measures)."]
    sections += ["## Usage", "\n".join([
        "```python",
        *_load_base_lines(card.base_model),
        "na = NestedAttention(pipe)",
        'na.load_adapter("THIS_FOLDER_OR_HUB_ID")',
        f'image = na("a photo of a {config.word} at the beach", subjects={{"{config.word}": Subject("subject.jpg")}})'
        ".images[0]",
        "```",
    ])]
    return f"---\n{metadata.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"


def _rows(section: str) -> dict[str, str]:
    """The `| key | value |` rows of a table `_table` wrote (its header rows left out)."""
    rows = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 2 and cells[0] and not set(cells[1]) <= set("-: "):
            rows[cells[0]] = cells[1]
    return rows


def add_metrics(directory: str | Path, metrics: dict[str, object]) -> Path:
    """Add measured `metrics` to the model card in `directory` (rows with the same name are replaced).

    The card must be one `save_pretrained` wrote; its Metrics section becomes the merged table.
    """
    path = Path(directory) / CARD_NAME
    text = path.read_text() if path.is_file() else ""
    head, found, rest = text.partition("\n## Metrics\n")
    body, usage, tail = rest.partition("\n## Usage\n")
    if not (found and usage):
        raise NestedAttentionError(
            f"{path} is not a model card that save_pretrained wrote (no Metrics and Usage sections); save the adapter "
            f"with save_pretrained first."
        )
    merged = {**_rows(body), **{str(k): v for k, v in metrics.items()}}
    ModelCard(f"{head}\n## Metrics\n\n{_table(merged)}\n{usage}{tail}").save(path)
    return path


def write_card(directory: str | Path, config: NestedAdapterConfig, card: AdapterCard | None = None) -> Path:
    """Write `directory/README.md` with huggingface_hub's ModelCard (what the hub shows for the repository)."""
    path = Path(directory) / CARD_NAME
    ModelCard(render_card(config, card)).save(path)
    return path
