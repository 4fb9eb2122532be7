"""Evaluation of personalized generation: generate a grid of (setting, subject, prompt, lambda, seed), score every
image for identity and prompt alignment with pluggable scorers, and write JSONL, CSV, a trade-off plot and an HTML
page. Used by ``nested-attention evaluate`` and ``nested-attention toy eval``; the library never imports it."""

from .scorers import IdentityEmbedder, PromptScorer

__all__ = ["IdentityEmbedder", "PromptScorer"]
