"""Binding a subject to a word of the prompt: the word's token positions, from the pipeline's tokenizer(s)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from .errors import NestedAttentionError

logger = logging.getLogger(__name__)


def word_token_id(tokenizer, word: str, prompt: str | None = None) -> int:
    """The single token id of `word`; a clear error (naming `prompt`, if given) if the tokenizer splits it."""
    word = word.strip()
    ids = tokenizer(word, add_special_tokens=False).input_ids
    if len(ids) != 1:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        where = f" (prompt {prompt!r})" if prompt is not None else ""
        raise NestedAttentionError(
            f"The subject word {word!r}{where} is split by the tokenizer into {len(ids)} tokens {pieces}; nested "
            f"attention binds one token. Choose a word the tokenizer keeps whole, such as 'person', 'pet', 'dog' "
            f"or 'woman'."
        )
    return ids[0]


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids exactly as diffusers' pipelines tokenize a prompt (padded and truncated to max length)."""
    return tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True
    ).input_ids


def warn_if_truncated(tokenizers: Sequence, prompt: str) -> None:
    """Warn once when `prompt` is longer than a tokenizer keeps: the pipeline cuts it, and the words past the cut."""
    for tokenizer in tokenizers:
        length, limit = len(tokenizer(prompt).input_ids), tokenizer.model_max_length
        if length > limit:
            kept = tokenizer.decode(tokenizer(prompt, max_length=limit, truncation=True).input_ids,
                                    skip_special_tokens=True)
            shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
            logger.warning("The prompt %r is %d tokens long; the text encoder reads only the first %d, so it ends "
                           "at %r. Shorten the prompt.", shown, length, limit, kept[-40:])
            return


def _missing(word: str, prompt: str) -> NestedAttentionError:
    return NestedAttentionError(
        f"The prompt {prompt!r} does not contain the subject word {word!r} as a whole word; add it where the "
        f"subject should appear (e.g. 'a photo of a {word} at the beach')."
    )


def _agreed(found: list[list[int]], word: str, prompt: str) -> list[int]:
    """The positions every tokenizer found (SDXL's two must agree)."""
    if any(p != found[0] for p in found[1:]):
        raise NestedAttentionError(
            f"The pipeline's tokenizers place {word!r} at different positions {found} in the prompt {prompt!r}; "
            f"the subject must be the same token for both text encoders (use the same prompt for both)."
        )
    return found[0]


def word_positions(tokenizers: Sequence, prompt: str, word: str) -> list[int]:
    """Positions of every occurrence of `word` in `prompt`, identical for all the pipeline's tokenizers.

    Raises a NestedAttentionError naming the word and the prompt if the word is missing, is cut off by the
    tokenizer's length limit, is split into several tokens, or sits at different positions for SDXL's two
    tokenizers.
    """
    found = []
    for tokenizer in tokenizers:
        token = word_token_id(tokenizer, word, prompt)
        ids = prompt_ids(tokenizer, prompt)
        positions = [i for i, t in enumerate(ids) if t == token]
        if not positions:
            full = tokenizer(prompt).input_ids
            if token in full:
                raise NestedAttentionError(
                    f"The subject word {word!r} appears in the prompt {prompt!r} only after the tokenizer's "
                    f"{tokenizer.model_max_length}-token limit; move it earlier or shorten the prompt."
                )
            raise _missing(word, prompt)
        found.append(positions)
    return _agreed(found, word, prompt)


def window_positions(tokenizers: Sequence, prompt: str, word: str) -> list[int]:
    """Positions of `word` in the long-prompt layout: windows of the prompt's tokens, each between its own start and
    end token (`model_max_length - 2` tokens per window, `model_max_length` embeddings), concatenated."""
    found = []
    for tokenizer in tokenizers:
        token = word_token_id(tokenizer, word, prompt)
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        span = tokenizer.model_max_length - 2
        found.append([(i // span) * (span + 2) + 1 + i % span for i, t in enumerate(ids) if t == token])
    if not found[0]:
        raise _missing(word, prompt)
    return _agreed(found, word, prompt)


def pipeline_tokenizers(pipe) -> list:
    """The tokenizers whose outputs feed the UNet's text context (one for SD 1.5, two for SDXL)."""
    tokenizers = [t for t in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)) if t is not None]
    if not tokenizers:
        raise NestedAttentionError(
            f"{type(pipe).__name__} has no tokenizer; nested attention binds subjects to words of the prompt."
        )
    return tokenizers
