"""Attention slicing (`pipe.enable_attention_slicing`) with nested attention installed."""

import pytest
import torch
from diffusers.models.attention_processor import SlicedAttnProcessor

import nested_attention.mechanisms as mechanisms_module
from conftest import assert_same, make_adapter, subject_image
from nested_attention import NestedAttention, NestedAttentionError, Subject

STEPS = 2


def run(call, prompt, **kwargs):
    return call(prompt, num_inference_steps=STEPS, height=32, width=32, output_type="latent",
                generator=torch.Generator().manual_seed(0), **kwargs).images


@pytest.mark.parametrize("slice_size", [1, 3, 16])
def test_sliced_attention_gives_the_unsliced_result_in_slices(pipe, slice_size, monkeypatch):
    """Bound rows are computed `slice_size` (row, head) pairs at a time, as diffusers' SlicedAttnProcessor does; 1 is
    `enable_attention_slicing("max")`, 3 splits 4 heads unevenly, 16 takes several rows at once."""
    processors = dict(pipe.unet.attn_processors)
    na = NestedAttention(pipe)
    try:
        na.load_adapter(make_adapter(pipe.unet))
        prompts = ["a photo of a person at the beach", "a person in the snow", "a dog in the city"]  # row 2: no subject
        subjects = {"person": [Subject(subject_image(0), lam=2.0), Subject(subject_image(1)), None]}
        unsliced = run(na, prompts, subjects=subjects)
        base = run(pipe, prompts)

        if slice_size == 1:
            pipe.enable_attention_slicing("max")
        else:  # diffusers' processor itself: enable_attention_slicing allows at most the head count
            pipe.unet.set_attn_processor(SlicedAttnProcessor(slice_size))
        with pytest.raises(NestedAttentionError, match="attention slicing"):
            run(na, prompts, subjects=subjects)
        na.reinstall()
        assert torch.equal(run(pipe, prompts), run(pipe, prompts))
        assert_same(run(pipe, prompts), base)  # nothing bound: diffusers' sliced processor on every row

        pairs = []  # (rows, heads) of every nested attention call
        original = mechanisms_module.personalized_attention
        monkeypatch.setattr(mechanisms_module, "personalized_attention",
                            lambda query, *a, **k: pairs.append(query.shape[:2]) or original(query, *a, **k))
        sliced = run(na, prompts, subjects=subjects)
        assert_same(sliced, unsliced)
        assert pairs and all(rows * heads <= slice_size for rows, heads in pairs)
        assert {rows for rows, _ in pairs} == ({2} if slice_size == 16 else {1})  # both bound rows at once, or one
    finally:
        na.uninstall()
        pipe.unet.set_attn_processor(processors)
