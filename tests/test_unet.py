"""UNet-level properties: vanilla equivalence, forced subject values, gradients, reversible installation."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from conftest import make_adapter
from nested_attention import BoundSubject, NestedAttentionError, install
from nested_attention.binding import prompt_ids, word_positions
from nested_attention.one_path import BoundRows


def unet_inputs(pipe, prompts, seed=0):
    """Latents, timestep, text context and extra conditioning for one UNet call, as the pipeline builds them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if hasattr(pipe, "text_encoder_2"):
            embeds, _, pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
            time_ids = torch.tensor([[32, 32, 0, 0, 32, 32]] * len(prompts), dtype=embeds.dtype)
            extra = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
        else:
            embeds, _ = pipe.encode_prompt(prompts, "cpu", 1, False)
            extra = {}
    latents = torch.randn(len(prompts), 4, 8, 8, generator=gen)
    return latents, torch.tensor(500), embeds, extra


def run_unet(unet, inputs):
    latents, t, embeds, extra = inputs
    with torch.no_grad():
        return unet(latents, t, encoder_hidden_states=embeds, **extra).sample


def bound_subject(pipe, adapter, controller, prompts, rows_with_word, images=1):
    mask = torch.zeros(len(prompts), 77, dtype=torch.bool)
    for row in rows_with_word:
        mask[row, word_positions([pipe.tokenizer], prompts[row], "person")] = True
    tokens = torch.randn(1, images * adapter.config.num_queries, adapter.config.qformer_hidden_size)
    return BoundSubject(
        token_mask=mask, slots=torch.zeros(len(prompts), dtype=torch.long),
        nested=adapter.nested_keys_values(tokens, controller.layers), alpha=adapter.config.alpha,
    )


def test_installed_without_subjects_is_bit_identical(pipe):
    inputs = unet_inputs(pipe, ["a photo of a person", "a dog in the snow"])
    before = run_unet(pipe.unet, inputs)
    controller = install(pipe.unet)
    try:
        adapter = make_adapter(pipe.unet)
        assert torch.equal(run_unet(pipe.unet, inputs), before)
        # a bound subject whose word is in no row: every row is vanilla
        subject = bound_subject(pipe, adapter, controller, ["a photo of a person", "a dog in the snow"], [])
        with controller.bound([subject]):
            assert torch.equal(run_unet(pipe.unet, inputs), before)
    finally:
        controller.uninstall()
    assert torch.equal(run_unet(pipe.unet, inputs), before)


def test_rows_without_the_word_stay_vanilla(pipe):
    """Guidance layout [negative, conditional]: the negative rows are computed exactly as without adapter."""
    prompts = ["a dog in the snow", "a photo of a person at the beach"]
    inputs = unet_inputs(pipe, prompts)
    before = run_unet(pipe.unet, inputs)
    controller = install(pipe.unet)
    try:
        adapter = make_adapter(pipe.unet)
        subject = bound_subject(pipe, adapter, controller, prompts[1:], [0])  # one conditional row
        with controller.bound([subject]):
            after = run_unet(pipe.unet, inputs)  # batch 2 = guidance layout for 1 conditional row
    finally:
        controller.uninstall()
    torch.testing.assert_close(after[0], before[0], atol=1e-6, rtol=1e-6)
    assert (after[1] - before[1]).abs().max() > 1e-4


@pytest.mark.parametrize("one_path", [True, False])
def test_sliced_and_gathered_rows_agree(pipe, one_path):
    """A contiguous run of bound rows is sliced (views), any other layout gathered (copies): same outputs,
    and a bound row comes out as it does alone in its own batch (on the one path and the wrapping path)."""
    prompts = ["a photo of a person at the beach", "a dog and a person in the snow", "a person in a park"]
    inputs = unet_inputs(pipe, prompts)
    double = lambda x: torch.cat([x] * 2) if torch.is_tensor(x) else {k: double(v) for k, v in x.items()}  # noqa: E731
    guided = (double(inputs[0]), inputs[1], double(inputs[2]), double(inputs[3]))
    before = run_unet(pipe.unet, guided)
    controller = install(pipe.unet, one_path=one_path)
    try:
        adapter = make_adapter(pipe.unet)
        subject = bound_subject(pipe, adapter, controller, prompts, [0, 2])  # bound rows 3 and 5 of the guided batch
        with controller.bound([subject]):
            assert controller.layout(6, torch.device("cpu")).span is None
            gathered = run_unet(pipe.unet, guided)
        def pick(x, row):
            return x[row:row + 1] if torch.is_tensor(x) else {k: pick(v, row) for k, v in x.items()}

        alone = []
        for row in (0, 2):
            single = (pick(inputs[0], row), inputs[1], pick(inputs[2], row), pick(inputs[3], row))
            one = bound_subject(pipe, adapter, controller, [prompts[row]], [0])
            one.nested = subject.nested
            with controller.bound([one]):
                assert controller.layout(1, torch.device("cpu")).span is None  # every row bound: no split
                alone.append(run_unet(pipe.unet, single)[0])
        contiguous = bound_subject(pipe, adapter, controller, prompts, [0, 1, 2])
        contiguous.nested = subject.nested
        with controller.bound([contiguous]):
            assert controller.layout(6, torch.device("cpu")).span == (3, 6)
            sliced = run_unet(pipe.unet, guided)
            if one_path:
                controller.plan.rows[6] = BoundRows(index=torch.arange(3, 6), vanilla_index=torch.arange(3))
            else:
                controller.layout(6, torch.device("cpu")).span = None
                controller.vanilla_rows(6, torch.device("cpu"))
            forced = run_unet(pipe.unet, guided)  # the gathering path on the same rows
    finally:
        controller.uninstall()
    torch.testing.assert_close(gathered[[0, 1, 2, 4]], before[[0, 1, 2, 4]], atol=1e-6, rtol=1e-6)
    for got, want in zip(gathered[[3, 5]], alone):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sliced, forced, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sliced[:3], before[:3], atol=1e-6, rtol=1e-6)
    assert (sliced[3:] - before[3:]).abs().amax(dim=(1, 2, 3)).min() > 1e-4


def test_subject_value_forced_to_vanilla_value_gives_vanilla(pipe):
    """Nested values all equal to V[s*] (so v* = V[s*]), alpha 1, lambda 1: the UNet is unchanged."""
    prompts = ["a photo of a person at the beach"]
    inputs = unet_inputs(pipe, prompts)
    before = run_unet(pipe.unet, inputs)
    controller = install(pipe.unet)
    position = word_positions([pipe.tokenizer], prompts[0], "person")[0]
    try:
        nested = {}
        for path, layer in controller.layers.items():
            attn = pipe.unet.get_submodule(path)
            with torch.no_grad():
                value = attn.to_v(inputs[2])[0, position].view(1, layer.heads, 1, layer.head_dim)
            nested[path] = (torch.randn(1, layer.heads, 5, layer.head_dim), value.expand(-1, -1, 5, -1))
        mask = torch.zeros(1, 77, dtype=torch.bool)
        mask[0, position] = True
        subject = BoundSubject(token_mask=mask, slots=torch.zeros(1, dtype=torch.long), nested=nested, alpha=1.0)
        with controller.bound([subject]):
            after = run_unet(pipe.unet, inputs)
    finally:
        controller.uninstall()
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_gradients_reach_only_the_adapter(pipe):
    prompts = ["a photo of a person at the beach", "a person in the snow"]
    inputs = unet_inputs(pipe, prompts)
    unet = pipe.unet.requires_grad_(False)
    unet_before = {k: v.clone() for k, v in unet.state_dict().items()}
    adapter = make_adapter(unet)
    clip = adapter.encoder.image_encoder
    clip_before = {k: v.clone() for k, v in clip.state_dict().items()}
    adapter_before = {k: v.clone() for k, v in adapter.adapter_state_dict().items()}
    controller = install(unet)
    try:
        pixels = torch.randn(2, 3, 32, 32)
        tokens = adapter.encoder(pixels)
        mask = torch.zeros(2, 77, dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            mask[row, word_positions([pipe.tokenizer], prompt, "person")] = True
        subject = BoundSubject(token_mask=mask, slots=torch.arange(2),
                               nested=adapter.nested_keys_values(tokens, controller.layers))
        latents, t, embeds, extra = inputs
        with controller.bound([subject]):
            loss = unet(latents, t, encoder_hidden_states=embeds, **extra).sample.square().mean()
        loss.backward()
        optimizer = torch.optim.SGD(adapter.trainable_parameters(), lr=1.0)
        optimizer.step()
    finally:
        controller.uninstall()
    trainable = adapter.trainable_parameters()
    assert trainable and all(p.grad is not None for p in trainable)
    assert all(p.grad is None for p in unet.parameters()) and all(p.grad is None for p in clip.parameters())
    assert all(torch.equal(v, unet_before[k]) for k, v in unet.state_dict().items())
    assert all(torch.equal(v, clip_before[k]) for k, v in clip.state_dict().items())
    changed = [k for k, v in adapter.adapter_state_dict().items() if not torch.equal(v, adapter_before[k])]
    assert any(k.startswith("layers.") for k in changed) and any(k.startswith("encoder.qformer.") for k in changed)
    assert "encoder.query_tokens" in changed


def test_only_cross_attention_changes_and_uninstall_restores_objects(pipe):
    processors = dict(pipe.unet.attn_processors)
    controller = install(pipe.unet)
    after = pipe.unet.attn_processors
    changed = {name for name in processors if after[name] is not processors[name]}
    assert changed == {f"{path}.processor" for path in controller.layers}
    assert all(name.endswith("attn2.processor") for name in changed)
    with pytest.raises(NestedAttentionError, match="already installed"):
        install(pipe.unet)
    controller.uninstall()
    assert all(pipe.unet.attn_processors[name] is proc for name, proc in processors.items())


def test_original_backend_serves_vanilla_rows_and_replacement_is_detected(sd_pipe):
    unet = sd_pipe.unet
    original = dict(unet.attn_processors)
    inputs = unet_inputs(sd_pipe, ["a photo of a person"])
    unet.set_attn_processor(AttnProcessor())  # a different backend, set before installation
    try:
        reference = run_unet(unet, inputs)
        controller = install(unet)
        assert torch.equal(run_unet(unet, inputs), reference)
        adapter = make_adapter(unet)
        subject = bound_subject(sd_pipe, adapter, controller, ["a photo of a person"], [0])
        with controller.bound([subject]):
            personalized = run_unet(unet, inputs)
        unet.set_attn_processor(AttnProcessor2_0())  # a backend switch after installation
        with pytest.raises(NestedAttentionError, match="replaced"):
            controller.check_installed()
        controller.reinstall()
        controller.check_installed()
        with controller.bound([subject]):
            torch.testing.assert_close(run_unet(unet, inputs), personalized, atol=1e-5, rtol=1e-5)
        controller.uninstall()
    finally:
        unet.set_attn_processor(original)


def test_lora_on_projections_keeps_working(sd_pipe):
    peft = pytest.importorskip("peft")
    unet = sd_pipe.unet
    inputs = unet_inputs(sd_pipe, ["a photo of a person"])
    plain = run_unet(unet, inputs)
    torch.manual_seed(0)
    unet.add_adapter(peft.LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False), adapter_name="style")
    try:
        with_lora = run_unet(unet, inputs)
        assert (with_lora - plain).abs().max() > 1e-4
        controller = install(unet)
        assert torch.equal(run_unet(unet, inputs), with_lora)
        adapter = make_adapter(unet)
        subject = bound_subject(sd_pipe, adapter, controller, ["a photo of a person"], [0])
        with controller.bound([subject]):
            nested_lora = run_unet(unet, inputs)
            unet.disable_adapters()
            nested_plain = run_unet(unet, inputs)
            unet.enable_adapters()
        assert (nested_lora - nested_plain).abs().max() > 1e-4  # the nested path runs through the LoRA layers
        controller.uninstall()
    finally:
        unet.delete_adapters("style")
    assert torch.equal(run_unet(unet, inputs), plain)


def test_tokenized_like_the_pipeline(sd_pipe):
    ids = prompt_ids(sd_pipe.tokenizer, "a person")
    assert len(ids) == 77 and ids[0] == sd_pipe.tokenizer.bos_token_id
