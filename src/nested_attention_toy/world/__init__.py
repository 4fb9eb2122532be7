"""The toy world's ground truth: identities and their split (``identities``), contexts (``contexts``) and the words
for them (``captions``). Nothing here draws: see ``nested_attention_toy.render``."""

from .captions import (
    SUBJECT_WORDS,
    described_caption,
    generic_caption,
    input_caption,
    prompt,
    prompt_factors,
    scene_prompt,
    vocabulary,
)
from .contexts import (
    CONTEXT_FACTORS,
    FACTOR_NAMES,
    SCENE,
    SCENE_POSITIONS,
    Context,
    context_count,
    example_context,
    sample_context,
)
from .identities import (
    COLOUR_COUNTERPARTS,
    DOMAINS,
    HELD_OUT_FRACTION,
    MAX_DESCRIBED,
    Identity,
    attribute_names,
    attribute_phrase,
    attribute_values,
    colour_of,
    describe_attributes,
    identity_count,
    identity_from_index,
    identity_from_names,
    is_held_out,
    sample_identities,
    side_size,
)

__all__ = [
    "COLOUR_COUNTERPARTS", "CONTEXT_FACTORS", "DOMAINS", "FACTOR_NAMES", "HELD_OUT_FRACTION", "MAX_DESCRIBED", "SCENE", "SCENE_POSITIONS", "SUBJECT_WORDS",
    "Context",
    "Identity", "attribute_names", "attribute_phrase", "attribute_values", "colour_of", "context_count", "describe_attributes",
    "described_caption", "example_context", "generic_caption", "identity_count", "identity_from_index",
    "identity_from_names", "input_caption", "is_held_out", "prompt", "prompt_factors", "sample_context",
    "sample_identities", "scene_prompt", "side_size", "vocabulary",
]
