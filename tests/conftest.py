"""Tiny, seeded, offline models shared by the tests (built from configs; nothing is downloaded)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported: no test may reach a model hub

import numpy as np
import pytest
import torch
from PIL import Image

from nested_attention import NestedAdapter
from nested_attention.tiny import TINY_ADAPTER_CONFIG, tiny_image_encoder, tiny_sd_pipeline, tiny_sdxl_pipeline
from test_cli import run_cli


def make_adapter(unet, seed=0, word="person", **overrides):
    encoder, processor = tiny_image_encoder(seed=100)
    torch.manual_seed(seed)
    config = {**TINY_ADAPTER_CONFIG, **overrides}
    return NestedAdapter.for_unet(unet, encoder, "tiny-clip", image_processor=processor, word=word, **config)


def subject_image(seed, size=40, mode="RGB"):
    """A seeded 4x4 grid of colour blocks: subjects that differ at the scale of the encoder's patches."""
    blocks = np.random.RandomState(seed).randint(0, 255, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize((size, size), Image.NEAREST).convert(mode)


@pytest.fixture(scope="session")
def sd_pipe(tmp_path_factory):
    return tiny_sd_pipeline(seed=0, tokenizer_dir=tmp_path_factory.mktemp("sd-tokenizer"))


@pytest.fixture(scope="session")
def sdxl_pipe(tmp_path_factory):
    return tiny_sdxl_pipeline(seed=0, tokenizer_dir=tmp_path_factory.mktemp("sdxl-tokenizer"))


@pytest.fixture(params=["sd", "sdxl"])
def pipe(request, sd_pipe, sdxl_pipe):
    return sd_pipe if request.param == "sd" else sdxl_pipe


@pytest.fixture
def na(pipe):
    from nested_attention import NestedAttention

    handle = NestedAttention(pipe)
    yield handle
    handle.uninstall()


@pytest.fixture(scope="session")
def smoke_build(tmp_path_factory):
    """One smoke-size toy build, as the command line runs it (one worker: the adapters one after the other, as an
    interrupted build resumes them), shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("smoke") / "build"
    assert run_cli("toy", "build", "--out", str(out), "--smoke", "--workers", "1", "--device", "cpu") == 0
    return out


def latents(call, prompt, steps=2, **kwargs):
    """Two denoising steps at 32 x 32, seed 0, as latents: the cheap generation the equivalence tests compare."""
    return call(prompt, num_inference_steps=steps, height=32, width=32, output_type="latent",
                generator=torch.Generator().manual_seed(0), **kwargs).images


def assert_same(a, b):
    """Equal up to float reassociation (the same arithmetic in another order or processor class)."""
    torch.testing.assert_close(a, b, atol=2e-5 * b.abs().max().item(), rtol=0)


def differs(a, b):
    """Far above reassociation: the two generations really differ."""
    return (a - b).abs().max() > 2e-3

