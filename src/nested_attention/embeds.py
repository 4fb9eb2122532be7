"""Precomputed prompt embeddings (`prompt_embeds`): the caller says where each subject word sits.

Prompt-weighting libraries (compel) and long-prompt helpers hand the pipeline embeddings, not strings, so the
subject word cannot be found by tokenizing. `subject_positions` gives, per adapter, the token positions of its
word in the embeddings (`NestedAttention.token_positions` finds them in a prompt string).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence

import torch

from .errors import NestedAttentionError

_EXAMPLE = "e.g. subject_positions={'person': [5]}, with na.token_positions('person', prompt) giving the positions"


def _is_index(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _per_prompt(given, name: str, prompts: int, length: int) -> list[list[int]]:
    """One list of token positions per prompt from an index, a list of them, a list per prompt, or a bool mask."""
    if isinstance(given, torch.Tensor):
        if given.dtype != torch.bool or tuple(given.shape) not in ((length,), (prompts, length)):
            raise NestedAttentionError(
                f"subject_positions[{name!r}] is a {given.dtype} tensor of shape {tuple(given.shape)}; a mask must be "
                f"bool, ({length},) or ({prompts}, {length}) like the prompt embeddings."
            )
        return [torch.nonzero(row).flatten().tolist() for row in given.cpu().expand(prompts, length)]
    if _is_index(given):
        per_prompt = [[int(given)]] * prompts
    elif isinstance(given, Sequence) and given and all(_is_index(i) for i in given):
        per_prompt = [[int(i) for i in given]] * prompts
    elif (isinstance(given, Sequence) and len(given) == prompts
          and all(isinstance(p, Sequence) and all(_is_index(i) for i in p) for p in given)):
        per_prompt = [[int(i) for i in p] for p in given]
    else:
        raise NestedAttentionError(
            f"subject_positions[{name!r}] is {given!r}; expected a token index, a list of them for every prompt, a "
            f"list of {prompts} such lists (one per prompt) or a bool mask ({prompts}, {length})."
        )
    outside = [i for p in per_prompt for i in p if not 0 <= i < length]
    if outside:
        raise NestedAttentionError(
            f"subject_positions[{name!r}] holds token {outside[0]}, but the prompt embeddings have {length} tokens "
            f"(0 to {length - 1})."
        )
    return per_prompt


def positions_for_embeds(pipe, subject_positions, names, pipe_kwargs: dict) -> tuple[int, int, dict[str, list]]:
    """(prompts, tokens, adapter name -> token positions per prompt) for a call with `prompt_embeds`."""
    embeds = pipe_kwargs["prompt_embeds"]
    if not (isinstance(embeds, torch.Tensor) and embeds.ndim == 3):
        raise NestedAttentionError(
            f"prompt_embeds is {type(embeds).__name__}; expected a (prompts, tokens, width) tensor such as "
            f"pipe.encode_prompt returns."
        )
    prompts, length = embeds.shape[:2]
    if getattr(pipe, "text_encoder_2", None) is not None and pipe_kwargs.get("pooled_prompt_embeds") is None:
        raise NestedAttentionError(
            "SDXL needs pooled_prompt_embeds next to prompt_embeds; pass both, as pipe.encode_prompt returns them."
        )
    if subject_positions is None:
        raise NestedAttentionError(
            f"prompt_embeds carry no words, so the subject's token cannot be found; give its position, {_EXAMPLE}."
        )
    if not isinstance(subject_positions, Mapping):
        raise NestedAttentionError(
            f"subject_positions is {type(subject_positions).__name__}; expected a dict from adapter name to token "
            f"positions, {_EXAMPLE}."
        )
    missing = [name for name in names if name not in subject_positions]
    unknown = [name for name in subject_positions if name not in names]
    if missing or unknown:
        raise NestedAttentionError(
            f"subject_positions names {sorted(subject_positions)} but subjects are given for {sorted(names)}; give "
            f"one entry per adapter in subjects."
        )
    return prompts, length, {name: _per_prompt(subject_positions[name], name, prompts, length) for name in names}
