"""The adapter's configuration: one dataclass, saved as JSON next to the weights."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import NestedAttentionError

CONFIG_NAME = "nested_adapter_config.json"
FORMAT_VERSION = 1
MECHANISMS = ("nested", "decoupled", "simple", "global_v", "multi_token")  # mechanisms.py holds one class each
SUBJECT_ENCODERS = ("qformer", "linear")  # encoder.py holds one class each


@dataclass
class NestedAdapterConfig:
    """Everything needed to rebuild an adapter before its weights are loaded.

    Args:
        layers: cross-attention module path in the UNet -> that layer's inner dimension (heads x head size),
            the output size of the nested key and value projections. Read from the UNet, never parsed
            from names (see `cross_attention_layers`).
        image_encoder: where the frozen CLIP vision model comes from: a local directory or a hub id.
            Adapters saved with their image encoder keep it in an `image_encoder/` subfolder instead.
        image_encoder_hidden_size: width of the CLIP tokens the Q-Former reads.
        word: the subject word the adapter was trained with ("person", "pet"); the default binding.
        num_queries: learned Q-Former queries = number of nested keys and values per image
            (the paper: 1024 for faces, 256 for pets).
        qformer_hidden_size, qformer_layers, qformer_heads, qformer_intermediate_size: Q-Former size
            (BLIP-2 layout: self-attention, cross-attention to the CLIP tokens, feed-forward per layer);
            `qformer_hidden_size` is the subject tokens' width whichever encoder makes them.
        subject_encoder: what turns the CLIP tokens into subject tokens: `qformer` (the paper's) or `linear`, a
            linear readout in which each subject token weighs every CLIP position with its own matrix (for
            small CLIP models whose attributes sit in particular patches; see `encoder.py`).
        linear_rank: the `linear` encoder's width per CLIP token before the readout (unused by `qformer`).
        alpha: subject values are rescaled to alpha x the vanilla value norm (paper 3.2, default 2);
            None turns the regularization off. Used by the `nested` and `global_v` mechanisms.
        mechanism: how the encoder tokens enter the UNet's cross-attention (paper Fig. 10): `nested` (the
            paper's method), or one of its rivals `decoupled`, `simple`, `global_v`, `multi_token`
            (see `mechanisms.py`). Each keeps its own per-layer projections under the same module paths.
    """

    layers: dict[str, int]
    image_encoder: str
    image_encoder_hidden_size: int
    word: str = "person"
    num_queries: int = 1024
    qformer_hidden_size: int = 768
    qformer_layers: int = 4
    qformer_heads: int = 12
    qformer_intermediate_size: int = 3072
    alpha: float | None = 2.0
    mechanism: str = "nested"
    subject_encoder: str = "qformer"
    linear_rank: int = 32
    format_version: int = field(default=FORMAT_VERSION)

    def __post_init__(self):
        problems = []
        if not self.layers:
            problems.append("`layers` is empty: an adapter needs at least one cross-attention layer")
        for name, size in self.layers.items():
            if not isinstance(size, int) or size <= 0:
                problems.append(f"layer {name!r} has inner dimension {size!r}; expected a positive integer")
        for name in ("image_encoder_hidden_size", "num_queries", "qformer_hidden_size", "qformer_layers",
                     "qformer_heads", "qformer_intermediate_size", "linear_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                problems.append(f"`{name}` is {value!r}; expected a positive integer")
        if not problems and self.subject_encoder == "qformer" and self.qformer_hidden_size % self.qformer_heads:
            problems.append(f"`qformer_hidden_size` {self.qformer_hidden_size} is not divisible by "
                            f"`qformer_heads` {self.qformer_heads}")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and 0 < self.alpha < math.inf):
            problems.append(f"`alpha` is {self.alpha!r}; expected a positive finite number or null")
        if not isinstance(self.word, str) or not self.word.strip() or " " in self.word.strip():
            problems.append(f"`word` is {self.word!r}; expected a single word such as 'person'")
        if self.mechanism not in MECHANISMS:
            problems.append(f"`mechanism` is {self.mechanism!r}; expected one of {', '.join(MECHANISMS)}")
        if self.subject_encoder not in SUBJECT_ENCODERS:
            problems.append(f"`subject_encoder` is {self.subject_encoder!r}; expected one of "
                            f"{', '.join(SUBJECT_ENCODERS)}")
        if self.format_version != FORMAT_VERSION:
            problems.append(f"`format_version` is {self.format_version!r}; this version of nested_attention "
                            f"reads format {FORMAT_VERSION}")
        if problems:
            raise NestedAttentionError("Invalid adapter config: " + "; ".join(problems) + ".")

    def to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_json_file(cls, path: str | Path) -> NestedAdapterConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise NestedAttentionError(
                f"Could not read the adapter config {path}: {error}. Expected the JSON file written by "
                f"NestedAdapter.save_pretrained."
            ) from None
        if not isinstance(data, dict):
            raise NestedAttentionError(f"The adapter config {path} holds {type(data).__name__}, not a JSON object.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise NestedAttentionError(
                f"The adapter config {path} has unknown fields {unknown}; it was written by another tool or "
                f"a newer nested_attention. Known fields: {sorted(known)}."
            )
        try:
            return cls(**data)
        except TypeError as error:
            raise NestedAttentionError(f"The adapter config {path} is incomplete: {error}.") from None
