"""Precomputed prompt embeddings with the subject's token positions given (prompt weighting, long prompts)."""

import pytest
import torch

from conftest import latents, make_adapter, subject_image
from nested_attention import NestedAttentionError, Subject

STEPS = 2
PROMPT = "a photo of a person at the beach"


def run(call, prompt=None, **kwargs):
    return latents(call, prompt, STEPS, **kwargs)


def embeddings(pipe, prompt):
    """What the pipeline itself would compute for `prompt` (and an empty negative prompt), as keyword arguments."""
    with torch.no_grad():
        if hasattr(pipe, "text_encoder_2"):
            embeds, negative, pooled, negative_pooled = pipe.encode_prompt(prompt, device="cpu")
            return dict(prompt_embeds=embeds, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
                        negative_pooled_prompt_embeds=negative_pooled)
        embeds, negative = pipe.encode_prompt(prompt, "cpu", 1, True)
        return dict(prompt_embeds=embeds, negative_prompt_embeds=negative)


def test_embeddings_with_positions_equal_the_prompt_string(pipe, na):
    na.load_adapter(make_adapter(pipe.unet))
    subjects = {"person": Subject(subject_image(0), lam=2.0)}
    from_string = run(na, PROMPT, subjects=subjects)
    positions = na.token_positions("person", PROMPT)
    mask = torch.zeros(1, 77, dtype=torch.bool)
    mask[0, positions] = True
    for given in (positions, positions[0], [positions], mask):  # an index list, an index, one list per prompt, a mask
        from_embeds = run(na, subjects=subjects, subject_positions={"person": given}, **embeddings(pipe, PROMPT))
        assert torch.equal(from_embeds, from_string)  # the same embeddings, the same token: the same computation


def test_a_long_embedding_binds_the_word_in_its_second_window(sd_pipe):
    """Long-prompt helpers encode 77-token windows and concatenate them: the word may sit past token 77."""
    from nested_attention import NestedAttention

    na = NestedAttention(sd_pipe)
    try:
        na.load_adapter(make_adapter(sd_pipe.unet))
        first, second = embeddings(sd_pipe, "a watercolor painting"), embeddings(sd_pipe, PROMPT)
        long = {key: torch.cat([first[key], second[key]], dim=1) for key in first}  # (1, 154, width)
        position = 77 + na.token_positions("person", PROMPT)[0]
        base = run(sd_pipe, **long)
        nested = run(na, subjects={"person": Subject(subject_image(0))}, subject_positions={"person": [position]},
                     **long)
        assert nested.isfinite().all() and (nested - base).abs().max() > 2e-3
    finally:
        na.uninstall()


def test_embedding_mistakes_are_one_sentence(pipe, na):
    na.load_adapter(make_adapter(pipe.unet))
    subjects = {"person": Subject(subject_image(0))}
    given = embeddings(pipe, PROMPT)
    with pytest.raises(NestedAttentionError, match="subject_positions=\\{'person'"):
        run(na, subjects=subjects, **given)
    with pytest.raises(NestedAttentionError, match="prompt=None with prompt_embeds"):
        run(na, subjects=subjects)
    with pytest.raises(NestedAttentionError, match="Both prompt and prompt_embeds"):
        run(na, PROMPT, subjects=subjects, subject_positions={"person": [5]}, **given)
    with pytest.raises(NestedAttentionError, match="go with prompt_embeds"):
        run(na, PROMPT, subjects=subjects, subject_positions={"person": [5]})
    with pytest.raises(NestedAttentionError, match="holds token 77"):
        run(na, subjects=subjects, subject_positions={"person": [77]}, **given)
    with pytest.raises(NestedAttentionError, match="one entry per adapter"):
        run(na, subjects=subjects, subject_positions={"pet": [5]}, **given)
    with pytest.raises(NestedAttentionError, match="expected a token index"):
        run(na, subjects=subjects, subject_positions={"person": "person"}, **given)
    with pytest.raises(NestedAttentionError, match="gives no token for prompt 0"):
        run(na, subjects=subjects, subject_positions={"person": torch.zeros(77, dtype=torch.bool)}, **given)
    if hasattr(pipe, "text_encoder_2"):
        without_pooled = {k: v for k, v in given.items() if "pooled" not in k}
        with pytest.raises(NestedAttentionError, match="pooled_prompt_embeds"):
            run(na, subjects=subjects, subject_positions={"person": [5]}, **without_pooled)
