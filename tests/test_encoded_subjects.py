"""Encoding a subject once (`encode_subject`) and reusing it: the same images as encoding at every call."""

import dataclasses

import pytest
import torch

from conftest import assert_same, make_adapter, subject_image
from nested_attention import EncodedSubject, NestedAttentionError, Subject

STEPS = 2


def run(na, prompt, subjects, **kwargs):
    return na(prompt, subjects, num_inference_steps=STEPS, height=32, width=32, output_type="latent",
              generator=torch.Generator().manual_seed(0), **kwargs).images


def test_an_encoded_subject_gives_the_subject_s_images_without_encoding_them_again(pipe, na):
    adapter = make_adapter(pipe.unet)
    na.load_adapter(adapter)
    prompt = "a photo of a person at the beach"
    subject = Subject([subject_image(0), subject_image(1)], weights=[1.0, 3.0], lam=2.0)
    calls = []
    hook = adapter.encoder.register_forward_hook(lambda *a: calls.append(1))
    encoded = na.encode_subject("person", subject)
    assert len(calls) == 1 and encoded.tokens.shape == (2 * adapter.config.num_queries, 32)
    first = run(na, prompt, {"person": encoded})
    second = run(na, prompt, {"person": encoded})
    assert len(calls) == 1  # the two generations encoded nothing
    hook.remove()
    assert torch.equal(first, second)
    assert torch.equal(first, run(na, prompt, {"person": subject}))  # the same encoder call on the same images
    stronger = run(na, prompt, {"person": dataclasses.replace(encoded, lam=3.0)})
    assert torch.equal(stronger, run(na, prompt, {"person": dataclasses.replace(subject, lam=3.0)}))


def test_encoded_and_raw_subjects_mix_in_one_batch(sd_pipe):
    from nested_attention import NestedAttention

    na = NestedAttention(sd_pipe)
    try:
        na.load_adapter(make_adapter(sd_pipe.unet))
        prompts = ["a photo of a person", "a person in the snow", "a dog in the city"]
        alice, bob = Subject(subject_image(0)), Subject([subject_image(1), subject_image(2)], weights=[1.0, 0.0])
        latents = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        kwargs = dict(num_inference_steps=STEPS, height=32, width=32, output_type="latent", latents=latents)
        raw = na(prompts, {"person": [alice, bob, None]}, **kwargs).images
        mixed = na(prompts, {"person": [na.encode_subject("person", alice), bob, None]}, **kwargs).images
        assert_same(mixed, raw)
    finally:
        na.uninstall()


def test_encoded_subject_mistakes_are_one_sentence(sd_pipe):
    from nested_attention import NestedAttention

    na = NestedAttention(sd_pipe)
    try:
        na.load_adapter(make_adapter(sd_pipe.unet, word="person"))
        na.load_adapter(make_adapter(sd_pipe.unet, seed=1, word="pet"))
        encoded = na.encode_subject("person", Subject(subject_image(0)))
        with pytest.raises(NestedAttentionError, match="encoded by adapter 'person'.*for adapter 'pet'"):
            run(na, "a photo of a pet", {"pet": encoded})
        with pytest.raises(NestedAttentionError, match="lambda"):
            dataclasses.replace(encoded, lam=0.0)
        with pytest.raises(NestedAttentionError, match="takes a Subject"):
            na.encode_subject("person", encoded)
        with pytest.raises(NestedAttentionError, match="tokens, width"):
            EncodedSubject("person", torch.zeros(3))
        with pytest.raises(NestedAttentionError, match="one value per token"):
            EncodedSubject("person", torch.zeros(8, 32), bias=torch.zeros(3))
    finally:
        na.uninstall()
