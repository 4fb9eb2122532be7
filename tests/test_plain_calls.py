"""Subjects set once on the pipeline: plain `pipe(...)` calls, pipelines made with `from_pipe`, long-prompt windows."""

import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline

from conftest import differs, latents, make_adapter, subject_image
from nested_attention import NestedAttention, NestedAttentionError, Subject

STEPS = 2
PROMPTS = ["a photo of a person at the beach", "a dog in the snow"]


def test_a_plain_call_equals_na_with_the_same_subjects(pipe, na):
    """The same binding reached two ways (set once, or given per call) is the same computation: equal exactly."""
    na.load_adapter(make_adapter(pipe.unet))
    me = Subject(subject_image(0), lam=2.0)
    given = latents(na, PROMPTS, STEPS, subjects={"person": [me, None]}, num_images_per_prompt=2)
    na.set_subjects({"person": me})  # the second prompt has no "person": it runs without the subject
    plain = latents(pipe, PROMPTS, STEPS, num_images_per_prompt=2)
    assert torch.equal(plain, given)
    assert na.controller.subjects == []  # unbound when the call ended
    na.set_subjects(None)
    base = latents(pipe, PROMPTS, STEPS, num_images_per_prompt=2)
    assert differs(plain[:2], base[:2]) and torch.equal(plain[2:], base[2:])


def test_set_subjects_are_encoded_once_and_checked(sd_pipe):
    na = NestedAttention(sd_pipe)
    try:
        na.load_adapter(make_adapter(sd_pipe.unet))
        na.load_adapter(make_adapter(sd_pipe.unet, seed=1, word="pet"))
        na.set_subjects({"person": Subject(subject_image(0)), "pet": Subject(subject_image(3))})
        calls = []
        hook = na.adapters["person"].adapter.encoder.register_forward_hook(lambda *args: calls.append(1))
        latents(sd_pipe, "a person and a pet", STEPS)
        latents(sd_pipe, "a person alone", STEPS)
        hook.remove()
        assert calls == []  # encoded by set_subjects, not by the calls
        with pytest.raises(NestedAttentionError, match="one Subject \\(or EncodedSubject\\) per adapter"):
            na.set_subjects({"person": "me.jpg"})
        with pytest.raises(NestedAttentionError, match="encoded by adapter 'pet'"):
            na.set_subjects({"person": na.encode_subject("pet", Subject(subject_image(3)))})
        with pytest.raises(NestedAttentionError, match="prompt_embeds cannot find the subject words"):
            sd_pipe.encode_prompt(None, "cpu", 1, True, prompt_embeds=torch.zeros(1, 77, 32))
    finally:
        na.uninstall()


def test_a_derived_pipeline_is_refused_until_attached_then_matches_its_own_installation(pipe, tmp_path):
    derived_class = StableDiffusionXLImg2ImgPipeline if hasattr(pipe, "text_encoder_2") else StableDiffusionImg2ImgPipeline
    image = subject_image(7, size=32)
    me = Subject(subject_image(0))
    adapter = make_adapter(pipe.unet)

    def img2img(call, **kwargs):
        return latents(call, PROMPTS[0], 4, image=image, strength=1.0, **kwargs)

    na = NestedAttention(pipe)
    try:
        na.load_adapter(adapter)
        na.set_subjects({"person": me})
        derived = derived_class.from_pipe(pipe)
        with pytest.raises(NestedAttentionError, match="from_pipe"):
            img2img(derived)
        na.attach(derived)
        attached = img2img(derived)
        na.set_subjects(None)
        base = img2img(derived)  # the guard is off without subjects
    finally:
        na.uninstall()
    assert "encode_prompt" not in derived.__dict__ and not pipe.text_encoder._forward_pre_hooks
    own = NestedAttention(derived)  # the reference: nested attention installed on the derived pipeline itself
    try:
        own.load_adapter(adapter)
        reference = img2img(own, subjects={"person": me})
    finally:
        own.uninstall()
    assert torch.equal(attached, reference) and differs(attached, base)


def test_attach_refuses_a_pipeline_with_another_unet(sd_pipe, tmp_path):
    from nested_attention.tiny import tiny_sd_pipeline

    na = NestedAttention(sd_pipe)
    try:
        with pytest.raises(NestedAttentionError, match="another UNet"):
            na.attach(tiny_sd_pipeline(seed=1, tokenizer_dir=tmp_path))
    finally:
        na.uninstall()


def test_window_positions_index_the_word_in_the_long_prompt_layout(pipe, na):
    """Rebuild the windows as long-prompt helpers do (start token, 75 prompt tokens, end token, padding) and check
    that the positions hold exactly the word's occurrences, the later ones past token 77."""
    na.load_adapter(make_adapter(pipe.unet))
    prompt = "a person " + "with a red hat and a blue coat, " * 12 + "and the person smiles, person"
    positions = na.token_positions("person", prompt, windows=True)
    for tokenizer in na.tokenizers:
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        span = tokenizer.model_max_length - 2
        layout = []
        for start in range(0, len(ids), span):
            window = [tokenizer.bos_token_id, *ids[start : start + span], tokenizer.eos_token_id]
            layout += window + [tokenizer.pad_token_id] * (tokenizer.model_max_length - len(window))
        word = tokenizer("person", add_special_tokens=False).input_ids[0]
        assert positions == [i for i, t in enumerate(layout) if t == word]
    assert len(positions) == 3 and positions[0] < 77 < positions[-1]
    with pytest.raises(NestedAttentionError, match="does not contain the subject word"):
        na.token_positions("person", "a dog", windows=True)


def test_detach_restores_the_pipeline_and_one_handle_attaches_it_at_a_time(sd_pipe):
    """The trainer's validation builds a handle on its own controller at every validation: it must not stack."""
    na = NestedAttention(sd_pipe)
    try:
        with pytest.raises(NestedAttentionError, match="already attached to another NestedAttention"):
            NestedAttention(sd_pipe, controller=na.controller)
        na.detach()
        assert "encode_prompt" not in vars(sd_pipe) and not sd_pipe.text_encoder._forward_pre_hooks
        na.load_adapter(make_adapter(sd_pipe.unet))
        with pytest.raises(NestedAttentionError, match="No pipeline is attached"):
            na.set_subjects({"person": Subject(subject_image(0))})
        for _ in range(2):
            NestedAttention(sd_pipe, controller=na.controller).detach()
        na.attach(sd_pipe)
        na.set_subjects({"person": Subject(subject_image(0))})
        assert differs(latents(sd_pipe, PROMPTS[0], STEPS), latents(na, PROMPTS[0], STEPS, subjects={}))
    finally:
        na.uninstall()
    assert "encode_prompt" not in vars(sd_pipe) and not sd_pipe.text_encoder._forward_pre_hooks


def test_set_words_swaps_words_at_once_or_changes_nothing(sd_pipe):
    na = NestedAttention(sd_pipe)
    try:
        na.load_adapter(make_adapter(sd_pipe.unet, word="person"))
        na.load_adapter(make_adapter(sd_pipe.unet, seed=1, word="pet"))
        na.set_words({"person": "pet", "pet": "person"})  # one at a time, either order would clash
        assert (na.adapters["person"].word, na.adapters["pet"].word) == ("pet", "person")
        with pytest.raises(NestedAttentionError, match="would also be bound to 'person'"):
            na.set_words({"person": "person"})
        with pytest.raises(NestedAttentionError, match="split by the tokenizer"):
            na.set_words({"person": "dog", "pet": "dachshund"})
        assert (na.adapters["person"].word, na.adapters["pet"].word) == ("pet", "person")  # nothing changed
    finally:
        na.uninstall()
