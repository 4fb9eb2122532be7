"""`explain`: one layer of a real generation, recorded (paper Figs. 4-6), and its command."""

import json

import pytest
import torch

from conftest import make_adapter, subject_image
from nested_attention import NestedAttention, NestedAttentionError, Subject
from nested_attention.explain import explain_layer, query_attention_maps
from nested_attention_cli.main import main
from nested_attention_eval.explain_sheet import summary

PROMPT = "a photo of a person at the beach"


def record(na, lam=1.0, images=(0,), **kwargs):
    subject = Subject([subject_image(i) for i in images], lam=lam)
    return explain_layer(na, "person", subject, PROMPT, num_inference_steps=3, height=32, width=32,
                         generator=torch.Generator().manual_seed(0), **kwargs)


@pytest.fixture
def sd_na(sd_pipe):
    na = NestedAttention(sd_pipe)
    sd_pipe.set_progress_bar_config(disable=True)
    yield na
    na.uninstall()


def test_the_recorded_layer_keeps_the_method_s_invariants(pipe, na):
    """On SD and SDXL (two text encoders, added conditions) alike."""
    pipe.set_progress_bar_config(disable=True)
    na.load_adapter(make_adapter(pipe.unet))
    image, explained = record(na, images=(0, 1))
    h, w = explained.grid
    tokens = 2 * na.adapters["person"].adapter.config.num_queries  # two images: their tokens concatenated
    assert image.size == (32, 32) and explained.nested_maps.shape == (h * w, tokens)
    torch.testing.assert_close(explained.nested_maps.sum(-1), torch.ones(h * w))  # a softmax per pixel
    assert bool(((explained.share >= 0) & (explained.share <= 1 + 1e-6)).all())
    # the norm regularization: per head |v*_q| = alpha |V[s*]|, so over the concatenated heads too, at every pixel
    alpha = na.adapters["person"].adapter.config.alpha
    norms = explained.subject_values.norm(dim=-1)
    torch.testing.assert_close(norms, torch.full_like(norms, alpha * float(explained.vanilla_value.norm())))
    assert explained.step == 1 and explained.timestep == int(pipe.scheduler.timesteps[1])


def test_lambda_raises_the_word_s_share_where_nothing_else_changed(sd_na):
    """At step 0 the first cross-attention layer sees the same input whatever lambda: max(l, lam l) >= l can only
    raise the subject word's softmax share, at every pixel."""
    sd_na.load_adapter(make_adapter(sd_na.pipe.unet))
    first = next(iter(sd_na.controller.layers))
    _, plain = record(sd_na, layer=first, step=0)
    _, raised = record(sd_na, lam=3.0, layer=first, step=0)
    torch.testing.assert_close(raised.subject_values, plain.subject_values)  # the nested value ignores lambda
    assert bool((raised.share >= plain.share - 1e-6).all()) and bool((raised.share > plain.share + 1e-4).any())


def test_one_subject_token_gives_one_value_everywhere(sd_na):
    """With a single nested token there is nothing to choose: the Global V limit (no per-pixel value)."""
    sd_na.load_adapter(make_adapter(sd_na.pipe.unet, num_queries=1))
    _, explained = record(sd_na)
    numbers = summary(explained, [torch.ones(1, 2, 2) / 4], (0, 0))
    units = torch.nn.functional.normalize(explained.subject_values, dim=-1)
    torch.testing.assert_close(units, units[:1].expand_as(units))
    assert numbers["nested_entropy"] in (0.0, None) and numbers["probed_top_tokens"] == [[0, 1.0]]


def test_query_maps_cover_the_subject_image(sd_na):
    sd_na.load_adapter(make_adapter(sd_na.pipe.unet))
    adapter = sd_na.adapters["person"].adapter
    maps = query_attention_maps(adapter, subject_image(0))
    vision = adapter.encoder.image_encoder.config
    side = vision.image_size // vision.patch_size
    assert maps.shape == (adapter.config.num_queries, side, side)
    assert bool((maps >= 0).all()) and bool((maps.sum((1, 2)) <= 1 + 1e-5).all())
    assert adapter.encoder.qformer.config._attn_implementation != "eager"  # the fused kernels are back


def test_bad_requests_are_one_sentence(sd_na):
    sd_na.load_adapter(make_adapter(sd_na.pipe.unet))
    with pytest.raises(NestedAttentionError, match="no cross-attention layer 'nope'"):
        record(sd_na, layer="nope")
    with pytest.raises(NestedAttentionError, match="not one of the 3 denoising steps"):
        record(sd_na, step=3)
    sd_na.unload_adapter("person")
    sd_na.load_adapter(make_adapter(sd_na.pipe.unet, mechanism="decoupled"))
    with pytest.raises(NestedAttentionError, match="uses the decoupled mechanism"):
        record(sd_na)


def test_the_explain_command_writes_its_sheet_and_numbers(tmp_path, capsys):
    subject_image(0).save(tmp_path / "me.png")
    base = ["explain", "--model", "tiny-sd", "--adapter", "random", "--image", str(tmp_path / "me.png"),
            "--prompt", PROMPT, "--steps", "2", "--height", "32", "--width", "32"]
    assert main([*base, "--out", str(tmp_path / "out")]) == 0
    numbers = json.loads((tmp_path / "out" / "explain.json").read_text())
    assert numbers["prompt"] == PROMPT and numbers["step"] == 1 and len(numbers["probed_top_tokens"]) == 5
    assert (tmp_path / "out" / "explain.png").stat().st_size > 0
    capsys.readouterr()
    assert main([*base, "--pixel", "40", "3", "--out", str(tmp_path / "bad")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --pixel 40 3 is outside the 32x32 generated image; give X below 32 and Y below 32.")
    assert not (tmp_path / "bad").exists()  # refused before generating
