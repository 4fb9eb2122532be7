"""Nested Attention (Patashnik et al., arXiv 2501.01407): subject personalization for diffusers UNet models."""

from .adapter import NestedAdapter
from .attention import nested_values, personalized_attention
from .card import AdapterCard
from .config import NestedAdapterConfig
from .controller import NestedAttentionController, install
from .errors import NestedAttentionError
from .pipeline import NestedAttention
from .state import BoundSubject
from .subject import EncodedSubject, Subject

__all__ = [
    "AdapterCard",
    "BoundSubject",
    "EncodedSubject",
    "NestedAdapter",
    "NestedAdapterConfig",
    "NestedAttention",
    "NestedAttentionController",
    "NestedAttentionError",
    "Subject",
    "install",
    "nested_values",
    "personalized_attention",
]
__version__ = "0.1.0"
