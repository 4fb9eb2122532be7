"""Whole pipelines (tiny SD 1.5 and SDXL): every inference feature, and the batch property."""

import pytest
import torch

from conftest import assert_same, differs, make_adapter, subject_image
from nested_attention import NestedAttentionError, Subject
from nested_attention.config import MECHANISMS

STEPS = 2


def generate(na, prompt, subjects, seed=0, **kwargs):
    return na(
        prompt, subjects, num_inference_steps=STEPS, height=32, width=32, output_type="latent",
        generator=torch.Generator().manual_seed(seed), **kwargs,
    ).images


def vanilla(pipe, prompt, seed=0, **kwargs):
    return pipe(prompt, num_inference_steps=STEPS, height=32, width=32, output_type="latent",
                generator=torch.Generator().manual_seed(seed), **kwargs).images


def test_one_subject_and_lambda(pipe, na):
    na.load_adapter(make_adapter(pipe.unet))
    prompt = "a photo of a person at the beach"
    base = vanilla(pipe, prompt)
    one = generate(na, prompt, {"person": Subject(subject_image(0))})
    again = generate(na, prompt, {"person": Subject(subject_image(0))})
    other = generate(na, prompt, {"person": Subject(subject_image(1))})
    strong = generate(na, prompt, {"person": Subject(subject_image(0), lam=3.0)})
    assert one.shape == (1, 4, 16, 16) and one.isfinite().all()
    assert torch.equal(one, again)
    assert differs(one, base) and differs(one, other) and differs(one, strong)


def test_several_images_and_weights(pipe, na):
    na.load_adapter(make_adapter(pipe.unet))
    prompt = "a photo of a person"
    a, b = subject_image(0), subject_image(1)
    only_a = generate(na, prompt, {"person": Subject(a)})
    both = generate(na, prompt, {"person": Subject([a, b])})
    both_even = generate(na, prompt, {"person": Subject([a, b], weights=[2.0, 2.0])})
    a_via_weights = generate(na, prompt, {"person": Subject([a, b], weights=[1.0, 0.0])})
    mostly_b = generate(na, prompt, {"person": Subject([a, b], weights=[1.0, 4.0])})
    assert differs(both, only_a)
    assert_same(both_even, both)
    assert_same(a_via_weights, only_a)
    assert differs(mostly_b, both)


def test_person_and_pet(pipe, na):
    na.load_adapter(make_adapter(pipe.unet, seed=0, word="person"))
    na.load_adapter(make_adapter(pipe.unet, seed=1, word="pet"))
    prompt = "a person and a pet in the park"
    person, pet = Subject(subject_image(0)), Subject(subject_image(5))
    both = generate(na, prompt, {"person": person, "pet": pet})
    person_only = generate(na, prompt, {"person": person})
    pet_only = generate(na, prompt, {"pet": pet})
    assert differs(both, person_only) and differs(both, pet_only) and differs(person_only, pet_only)
    with pytest.raises(NestedAttentionError, match="already bound to 'pet'"):
        na.load_adapter(make_adapter(pipe.unet, seed=2), word="pet", name="second")


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_batch_of_different_subjects_matches_generating_each_alone(pipe, na, mechanism):
    """The diffusers IP-Adapter bug mixes identities across a batch; here each row is its own, with every mechanism
    (lambda 2 where the mechanism has one), and the unbound row is the base model's."""
    na.load_adapter(make_adapter(pipe.unet, mechanism=mechanism))
    prompts = ["a photo of a person at the beach", "a person in the snow", "a dog in the city"]
    lam = 2.0 if mechanism in ("nested", "global_v", "multi_token") else 1.0
    alice, bob = Subject(subject_image(0), lam=1.0), Subject([subject_image(1), subject_image(2)], lam=lam)
    latents = torch.randn(6, 4, 16, 16, generator=torch.Generator().manual_seed(0))  # shared with the solo runs
    batch = na(prompts, {"person": [alice, bob, None]}, num_images_per_prompt=2, num_inference_steps=STEPS,
               height=32, width=32, output_type="latent", latents=latents).images
    for p, (prompt, subject) in enumerate(zip(prompts, [alice, bob, None])):
        for i in range(2):
            row = 2 * p + i
            kwargs = dict(num_inference_steps=STEPS, height=32, width=32, output_type="latent",
                          latents=latents[row : row + 1])
            alone = (na(prompt, {"person": subject}, **kwargs) if subject else pipe(prompt, **kwargs)).images
            assert_same(batch[row], alone[0])
    base = pipe(prompts[0], num_inference_steps=STEPS, height=32, width=32, output_type="latent",
                latents=latents[:1]).images
    assert differs(batch[0], base) and differs(batch[0], batch[2])


def test_nested_keys_and_values_are_computed_once_per_generation(sd_pipe):
    from nested_attention import NestedAttention

    na = NestedAttention(sd_pipe)
    try:
        adapter = make_adapter(sd_pipe.unet)
        na.load_adapter(adapter)
        calls = []
        hooks = [p.to_k.register_forward_hook(lambda *a: calls.append(1)) for p in adapter.layers.values()]
        for steps in (2, 5):
            calls.clear()
            na("a photo of a person", {"person": Subject(subject_image(0))}, num_inference_steps=steps,
               height=32, width=32, output_type="latent")
            assert len(calls) == len(adapter.layers)
        for hook in hooks:
            hook.remove()
    finally:
        na.uninstall()


def test_semantic_variation_binds_another_word(pipe, na):
    name = na.load_adapter(make_adapter(pipe.unet))
    subject = Subject(subject_image(0))
    as_person = generate(na, "a photo of a person", {name: subject})
    na.set_word(name, "woman")
    as_woman = generate(na, "a photo of a woman", {name: subject})
    assert differs(as_woman, vanilla(pipe, "a photo of a woman")) and differs(as_woman, as_person)
    with pytest.raises(NestedAttentionError, match="does not contain the subject word 'woman'"):
        generate(na, "a photo of a person", {name: subject})


def test_uninstall_restores_bit_identical_outputs(pipe):
    from nested_attention import NestedAttention

    prompt = "a photo of a person at the beach"
    before = vanilla(pipe, prompt)
    na = NestedAttention(pipe)
    na.load_adapter(make_adapter(pipe.unet))
    generate(na, prompt, {"person": Subject(subject_image(0))})
    assert torch.equal(vanilla(pipe, prompt), before)  # installed, nothing bound
    na.uninstall()
    assert torch.equal(vanilla(pipe, prompt), before)


def test_negative_prompt_and_no_guidance(pipe, na):
    na.load_adapter(make_adapter(pipe.unet))
    subject = Subject(subject_image(0))
    guided = generate(na, "a photo of a person", {"person": subject}, negative_prompt="a person, blurry")
    unguided = generate(na, "a photo of a person", {"person": subject}, guidance_scale=1.0)
    assert guided.isfinite().all() and unguided.isfinite().all() and differs(guided, unguided)


def test_bad_calls_are_refused_clearly(pipe, na):
    na.load_adapter(make_adapter(pipe.unet))
    subject = Subject(subject_image(0))
    with pytest.raises(NestedAttentionError, match="does not contain the subject word 'person'"):
        generate(na, "a dog at the beach", {"person": subject})
    with pytest.raises(NestedAttentionError, match="No adapter is loaded under the name"):
        generate(na, "a person", {"pet": subject})
    with pytest.raises(NestedAttentionError, match="one per prompt"):
        generate(na, ["a person", "a person"], {"person": [subject]})
    with pytest.raises(NestedAttentionError, match="split by the tokenizer"):
        na.set_word("person", "dachshund")
    with pytest.raises(NestedAttentionError, match="lambda"):
        Subject(subject_image(0), lam=0)
    with pytest.raises(NestedAttentionError, match="weights"):
        Subject([subject_image(0)], weights=[1.0, 2.0])


def test_adapter_follows_the_pipeline_to_another_dtype(tmp_path):
    from nested_attention import NestedAttention
    from nested_attention.tiny import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(tokenizer_dir=tmp_path)
    na = NestedAttention(pipe)
    na.load_adapter(make_adapter(pipe.unet))
    pipe.to(dtype=torch.bfloat16)  # after loading: the adapter must follow
    latents = na("a photo of a person", {"person": Subject(subject_image(0))}, num_inference_steps=STEPS,
                 height=32, width=32, output_type="latent").images
    assert latents.dtype == torch.bfloat16 and latents.isfinite().all()
    assert next(na.adapters["person"].adapter.parameters()).dtype == torch.bfloat16


def test_bound_keys_and_values_carry_no_autograd_graph(sd_pipe):
    from nested_attention import NestedAttention

    na = NestedAttention(sd_pipe)
    try:
        na.load_adapter(make_adapter(sd_pipe.unet))
        [bound] = na.bind(["a photo of a person"], {"person": Subject(subject_image(0))})
        assert not any(k.requires_grad or v.requires_grad for k, v in bound.nested.values())
    finally:
        na.uninstall()


def test_torch_compile_traces_the_nested_processor_without_graph_breaks(sd_pipe):
    """Everything data-dependent (which rows carry a subject, lambda per row) is settled when the subjects are
    bound, so a compiled UNet's first traced call has no break in our code (rows 0-1 bound, row 2 vanilla)."""
    import torch._dynamo

    from nested_attention import NestedAttention

    na = NestedAttention(sd_pipe)
    try:
        na.load_adapter(make_adapter(sd_pipe.unet))
        prompts = ["a photo of a person at the beach", "a person in the snow", "a dog in the city"]
        subjects = {"person": [Subject(subject_image(0), lam=2.0), Subject(subject_image(1)), None]}
        bound = na.bind(prompts, subjects)
        text = sd_pipe.encode_prompt(prompts, "cpu", 1, True)
        context = torch.cat([text[1], text[0]])
        latents = torch.randn(6, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        torch._dynamo.reset()
        with torch.no_grad(), na.controller.bound(bound):
            explanation = torch._dynamo.explain(lambda: sd_pipe.unet(latents, 500, encoder_hidden_states=context).sample)()
        ours = [b.reason for b in explanation.break_reasons if any("nested_attention" in f.filename for f in b.user_stack)]
        assert ours == []
    finally:
        torch._dynamo.reset()
        na.uninstall()
