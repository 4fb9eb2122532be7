"""The rival mechanisms through the `NestedAttention` wrapper on tiny pipelines: rows, images, knobs, subjects."""

import pytest
import torch

from conftest import assert_same, differs, make_adapter, subject_image
from nested_attention import NestedAttention, NestedAttentionError, Subject

RIVALS = ["decoupled", "simple", "global_v", "multi_token"]
STEPS = 2


def generate(call, prompt, subjects=None, seed=0, **kwargs):
    args = (prompt,) if subjects is None else (prompt, subjects)
    return call(*args, num_inference_steps=STEPS, height=32, width=32, output_type="latent",
                generator=torch.Generator().manual_seed(seed), **kwargs).images


@pytest.fixture
def sd_na(sd_pipe):
    handle = NestedAttention(sd_pipe)
    yield handle
    handle.uninstall()


@pytest.mark.parametrize("kind", RIVALS)
def test_image_weights(sd_pipe, sd_na, kind):
    """Weight 0 drops an image's tokens exactly (for global_v and multi_token, from the folded mean too)."""
    sd_na.load_adapter(make_adapter(sd_pipe.unet, mechanism=kind))
    prompt = "a photo of a person"
    a, b = subject_image(0), subject_image(1)
    only_a = generate(sd_na, prompt, {"person": Subject(a)})
    assert_same(generate(sd_na, prompt, {"person": Subject([a, b], weights=[1.0, 0.0])}), only_a)
    both = generate(sd_na, prompt, {"person": Subject([a, b])})
    assert_same(generate(sd_na, prompt, {"person": Subject([a, b], weights=[3.0, 3.0])}), both)
    assert differs(both, only_a) and differs(generate(sd_na, prompt, {"person": Subject([a, b], weights=[1, 4])}), both)


def test_decoupled_scale(sd_pipe, sd_na):
    """Scale 0 is the base model exactly; lambda is refused (decoupled attention has no subject logit)."""
    sd_na.load_adapter(make_adapter(sd_pipe.unet, mechanism="decoupled"))
    prompt, subject = "a photo of a person", {"person": Subject(subject_image(0))}
    full = generate(sd_na, prompt, subject)
    sd_na.set_scale("person", 0.0)
    assert torch.equal(generate(sd_na, prompt, subject), generate(sd_pipe, prompt))
    sd_na.set_scale("person", 0.5)
    half = generate(sd_na, prompt, subject)
    assert differs(half, full) and differs(half, generate(sd_pipe, prompt))
    with pytest.raises(NestedAttentionError, match="decoupled mechanism, which has no lambda .* use set_scale"):
        generate(sd_na, prompt, {"person": Subject(subject_image(0), lam=2.0)})


@pytest.mark.parametrize("kind", ["simple", "global_v", "multi_token"])
def test_knobs_other_mechanisms(sd_pipe, sd_na, kind):
    sd_na.load_adapter(make_adapter(sd_pipe.unet, mechanism=kind))
    prompt = "a photo of a person"
    with pytest.raises(NestedAttentionError, match=f"{kind} mechanism, which has no strength"):
        sd_na.set_scale("person", 0.5)
    sd_na.set_scale("person", 1.0)  # the adapter as trained: accepted
    one = generate(sd_na, prompt, {"person": Subject(subject_image(0))})
    if kind == "simple":
        with pytest.raises(NestedAttentionError, match="simple mechanism, which has no lambda"):
            generate(sd_na, prompt, {"person": Subject(subject_image(0), lam=2.0)})
    else:
        assert differs(generate(sd_na, prompt, {"person": Subject(subject_image(0), lam=3.0)}), one)


@pytest.mark.parametrize("kind", RIVALS)
def test_person_and_pet(sd_pipe, sd_na, kind):
    """Two adapters of one mechanism: a row without the pet is the person-only generation; with it, it differs."""
    sd_na.load_adapter(make_adapter(sd_pipe.unet, seed=0, word="person", mechanism=kind))
    sd_na.load_adapter(make_adapter(sd_pipe.unet, seed=1, word="pet", mechanism=kind))
    prompts = ["a person in the park", "a person and a pet in the park"]
    person, pet = Subject(subject_image(0)), Subject(subject_image(5))
    both = generate(sd_na, prompts, {"person": [person, person], "pet": [None, pet]})
    person_only = generate(sd_na, prompts, {"person": [person, person]})
    assert_same(both[0], person_only[0])
    assert differs(both[1], person_only[1])
    if kind == "decoupled":  # each subject adds its own term: the pet's at scale 0 adds nothing
        sd_na.set_scale("pet", 0.0)
        assert_same(generate(sd_na, prompts, {"person": [person, person], "pet": [None, pet]}), person_only)


def test_adapters_of_different_mechanisms_are_refused(sd_pipe, sd_na):
    sd_na.load_adapter(make_adapter(sd_pipe.unet, word="person"))
    with pytest.raises(NestedAttentionError, match="uses the nested mechanism and this one the decoupled"):
        sd_na.load_adapter(make_adapter(sd_pipe.unet, word="pet", mechanism="decoupled"))


@pytest.mark.parametrize("kind", RIVALS)
def test_layer_state_is_computed_once_per_generation(sd_pipe, sd_na, kind):
    adapter = make_adapter(sd_pipe.unet, mechanism=kind)
    sd_na.load_adapter(adapter)
    calls = []
    hooks = [p.to_v.register_forward_hook(lambda *a: calls.append(1)) for p in adapter.layers.values()]
    try:
        for steps in (2, 4):
            calls.clear()
            sd_na("a photo of a person", {"person": Subject(subject_image(0))}, num_inference_steps=steps,
                  height=32, width=32, output_type="latent")
            assert len(calls) == len(adapter.layers)
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("kind", RIVALS)
def test_attention_slicing_gives_the_unsliced_result(sd_pipe, kind):
    """Slices of 3 (row, head) pairs split the 4 heads unevenly: every layer state is cut by head correctly."""
    from diffusers.models.attention_processor import SlicedAttnProcessor

    processors = dict(sd_pipe.unet.attn_processors)
    na = NestedAttention(sd_pipe)
    try:
        na.load_adapter(make_adapter(sd_pipe.unet, mechanism=kind))
        na.load_adapter(make_adapter(sd_pipe.unet, seed=1, word="pet", mechanism=kind))
        prompts = ["a person and a pet", "a person in the snow", "a dog in the city"]
        subjects = {"person": [Subject(subject_image(0)), Subject(subject_image(1)), None],
                    "pet": [Subject(subject_image(4)), None, None]}
        unsliced = generate(na, prompts, subjects)
        sd_pipe.unet.set_attn_processor(SlicedAttnProcessor(3))
        na.reinstall()
        assert_same(generate(na, prompts, subjects), unsliced)
    finally:
        na.uninstall()
        sd_pipe.unet.set_attn_processor(processors)
