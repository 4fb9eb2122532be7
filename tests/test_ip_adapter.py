"""IP-Adapter in the same pipeline: IP-Adapter's image attention stays as diffusers computes it, next to nesting."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.embeddings import ImageProjection

from conftest import assert_same, differs, latents, make_adapter, subject_image
from nested_attention import NestedAttention, Subject
from nested_attention.tiny import tiny_sd_pipeline, tiny_sdxl_pipeline

IMAGE_EMBED_DIM = 16  # the width of the (absent) CLIP image encoder's embedding
STEPS = 2


def tiny_ip_adapter_state_dict(unet, seed=0):
    """A random IP-Adapter in the layout of the published checkpoints (what `load_ip_adapter` reads).

    "image_proj" is an `ImageProjection` (one embedding -> 4 text-width tokens) with its linear layer named
    "proj"; "ip_adapter" numbers the cross-attention processors 1, 3, 5, ... in `attn_processors` order.
    """
    torch.manual_seed(seed)
    cross_attention_dim = unet.config.cross_attention_dim
    projection = ImageProjection(cross_attention_dim=cross_attention_dim, image_embed_dim=IMAGE_EMBED_DIM,
                                 num_image_text_embeds=4)
    image_proj = {key.replace("image_embeds.", "proj."): value for key, value in projection.state_dict().items()}
    ip_layers = {}
    cross = [name for name in unet.attn_processors if name.endswith("attn2.processor")]
    for i, name in enumerate(cross):
        inner_dim = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
        for weight in ("to_k_ip", "to_v_ip"):
            ip_layers[f"{2 * i + 1}.{weight}.weight"] = 0.3 * torch.randn(inner_dim, cross_attention_dim)
    return {"image_proj": image_proj, "ip_adapter": ip_layers}


def load_tiny_ip_adapter(pipe, count=1):
    state_dicts = [tiny_ip_adapter_state_dict(pipe.unet, seed=i) for i in range(count)]
    pipe.load_ip_adapter(state_dicts, subfolder=[""] * count, weight_name=[""] * count, image_encoder_folder=None)


def image_embeds(seed=1):
    """`ip_adapter_image_embeds` for one prompt with guidance: (negative, positive) image embeddings."""
    positive = torch.randn(1, 1, IMAGE_EMBED_DIM, generator=torch.Generator().manual_seed(seed))
    return [torch.cat([torch.zeros_like(positive), positive])]


@pytest.fixture(params=["sd", "sdxl"])
def fresh_pipe(request, tmp_path):
    """A pipeline of its own: loading an IP-Adapter changes the UNet for good."""
    build = tiny_sd_pipeline if request.param == "sd" else tiny_sdxl_pipeline
    return build(seed=0, tokenizer_dir=tmp_path)


def run(call, prompt, **kwargs):
    return latents(call, prompt, STEPS, **kwargs)


@pytest.mark.parametrize("order", ["ip_adapter_first", "nested_first"])
def test_ip_adapter_and_nested_attention_in_one_pipeline(fresh_pipe, order):
    pipe = fresh_pipe
    prompt = "a photo of a person at the beach"
    subject = {"person": Subject(subject_image(0))}
    if order == "ip_adapter_first":
        load_tiny_ip_adapter(pipe)
        ip_only = run(pipe, prompt, ip_adapter_image_embeds=image_embeds())
        na = NestedAttention(pipe)
        na.load_adapter(make_adapter(pipe.unet))
        pipe.set_ip_adapter_scale(0.0)
        nested_ip_off = run(na, prompt, subjects=subject, ip_adapter_image_embeds=image_embeds())
        na.uninstall()
        pipe.unload_ip_adapter()
        na = NestedAttention(pipe)
        na.load_adapter(make_adapter(pipe.unet))
        nested_only = run(na, prompt, subjects=subject)
        load_tiny_ip_adapter(pipe)
        na.reinstall()  # load_ip_adapter replaced the nested processors: wrap its processors
    else:
        na = NestedAttention(pipe)
        na.load_adapter(make_adapter(pipe.unet))
        nested_only = run(na, prompt, subjects=subject)
        load_tiny_ip_adapter(pipe)
        keys = set(pipe.unet.state_dict())
        na.reinstall()
        assert set(pipe.unet.state_dict()) == keys  # IP-Adapter's weights stay in the UNet (pipe.to moves them)
        ip_only = run(pipe, prompt, ip_adapter_image_embeds=image_embeds())  # nothing bound: diffusers' processors
        pipe.set_ip_adapter_scale(0.0)
        nested_ip_off = run(na, prompt, subjects=subject, ip_adapter_image_embeds=image_embeds())
    pipe.set_ip_adapter_scale(1.0)
    both = run(na, prompt, subjects=subject, ip_adapter_image_embeds=image_embeds())
    again = run(na, prompt, subjects=subject, ip_adapter_image_embeds=image_embeds())
    other_image = run(na, prompt, subjects=subject, ip_adapter_image_embeds=image_embeds(seed=2))

    assert both.isfinite().all() and torch.equal(both, again)
    assert_same(nested_ip_off, nested_only)  # IP-Adapter at scale 0 adds nothing to the nested rows
    assert differs(both, nested_only) and differs(both, ip_only)
    assert differs(both, other_image)  # IP-Adapter's image reaches the nested rows
    assert torch.equal(run(pipe, prompt, ip_adapter_image_embeds=image_embeds()), ip_only)  # installed, nothing bound
    na.uninstall()
    assert torch.equal(run(pipe, prompt, ip_adapter_image_embeds=image_embeds()), ip_only)


@pytest.mark.parametrize("masked", [False, True])
def test_image_term_on_nested_rows_equals_diffusers_ip_adapter_term(tmp_path, masked):
    """At one layer, with two IP-Adapters at scales 0.5 and 1: what they add to a nested row is what diffusers'
    IP-Adapter processor adds to a vanilla one. Both sides are differences of two calls of one processor, so they
    agree to float32 rounding of the layer's outputs (1e-5 of their scale); the term itself is far larger."""
    pipe = tiny_sd_pipeline(seed=0, tokenizer_dir=tmp_path)
    load_tiny_ip_adapter(pipe, count=2)
    na = NestedAttention(pipe)
    na.load_adapter(make_adapter(pipe.unet))
    pipe.set_ip_adapter_scale([0.5, 1.0])  # set through the nested processors, read by both sides
    path = next(iter(na.controller.layers))
    attn = pipe.unet.get_submodule(path)
    ip_processor = attn.processor.original
    assert ip_processor.scale == [0.5, 1.0]
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 64, attn.to_q.in_features, generator=gen)  # 8 x 8 queries
    text = pipe.encode_prompt("a photo of a person", "cpu", 1, False)[0]
    image_states = pipe.unet.encoder_hid_proj([torch.randn(1, 1, IMAGE_EMBED_DIM, generator=gen) for _ in range(2)])
    masks = None
    if masked:
        mask = torch.zeros(1, 1, 8, 8)
        mask[..., :, :4] = 1.0  # the first IP-Adapter on the left half only, the second everywhere
        masks = [mask, None]
    kwargs = {} if masks is None else {"ip_adapter_masks": masks}
    with torch.no_grad(), na.controller.bound(na.bind(["a photo of a person"], {"person": Subject(subject_image(0))})):
        ours = attn.processor(attn, hidden, (text, image_states), **kwargs) - attn.processor(attn, hidden, text)
    with torch.no_grad():
        reference = ip_processor(attn, hidden, (text, image_states), **kwargs) - AttnProcessor2_0()(attn, hidden, text)
    torch.testing.assert_close(ours, reference, atol=1e-5 * reference.abs().max().item(), rtol=0)
    assert reference.abs().max() > 1e-3 * hidden.abs().max()
    if masked:  # the mask holds: on the right half (query columns 4-7) only the second adapter adds anything
        with torch.no_grad():
            second = ip_processor(attn, hidden, (text, image_states), ip_adapter_masks=[torch.zeros_like(mask), None])
            second = (second - AttnProcessor2_0()(attn, hidden, text)).view(8, 8, -1)
        grid = reference.view(8, 8, -1)
        torch.testing.assert_close(grid[:, 4:], second[:, 4:], atol=1e-5 * reference.abs().max().item(), rtol=0)
        assert (grid[:, :4] - second[:, :4]).abs().max() > 1e-3 * reference.abs().max()
    na.uninstall()


def test_a_batch_with_ip_adapter_matches_generating_each_row_alone(fresh_pipe):
    """Rows 1 and 3 carry a subject (gathered, not a contiguous span); every row also gets IP-Adapter's image."""
    pipe = fresh_pipe
    load_tiny_ip_adapter(pipe)
    na = NestedAttention(pipe)
    na.load_adapter(make_adapter(pipe.unet))
    prompts = ["a dog in the city", "a photo of a person", "a cat in the snow", "a person"]
    subjects = [None, Subject(subject_image(0)), None, Subject(subject_image(1))]
    latents = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    kwargs = dict(ip_adapter_image_embeds=image_embeds(), num_inference_steps=STEPS, height=32, width=32,
                  output_type="latent")
    batch = na(prompts, {"person": subjects}, latents=latents, **kwargs).images
    for row, (prompt, subject) in enumerate(zip(prompts, subjects)):
        one = dict(latents=latents[row : row + 1], **kwargs)
        alone = (na(prompt, {"person": subject}, **one) if subject else pipe(prompt, **one)).images
        assert_same(batch[row], alone[0])
    na.uninstall()
