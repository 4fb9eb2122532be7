"""Saving and loading adapters: exact round trips, module-path keys, and clear refusals."""

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_adapter
from nested_attention import NestedAdapter, NestedAdapterConfig, NestedAttentionError
from nested_attention.adapter import WEIGHTS_NAME
from nested_attention.config import CONFIG_NAME
from nested_attention.layers import cross_attention_layers


def test_round_trip_is_exact(pipe, tmp_path):
    adapter = make_adapter(pipe.unet, seed=3).eval()
    adapter.save_pretrained(tmp_path, save_image_encoder=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, "image_encoder", "README.md"])
    loaded = NestedAdapter.from_pretrained(tmp_path)
    assert loaded.config == adapter.config
    ours, theirs = adapter.adapter_state_dict(), loaded.adapter_state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    layers = cross_attention_layers(pipe.unet)
    tokens = torch.randn(2, 8, adapter.config.qformer_hidden_size)
    for path, (key, value) in adapter.nested_keys_values(tokens, layers).items():
        key2, value2 = loaded.nested_keys_values(tokens, layers)[path]
        assert torch.equal(key, key2) and torch.equal(value, value2)
    pixels = torch.randn(1, 3, 32, 32)
    assert torch.equal(adapter.encoder(pixels), loaded.encoder(pixels))


def test_weights_are_keyed_by_module_path_and_hold_no_clip(sd_pipe, tmp_path):
    adapter = make_adapter(sd_pipe.unet)
    adapter.save_pretrained(tmp_path)
    keys = set(load_file(str(tmp_path / WEIGHTS_NAME)))
    for path in cross_attention_layers(sd_pipe.unet):
        assert f"layers.{path}.to_k.weight" in keys and f"layers.{path}.to_v.weight" in keys
    assert "encoder.query_tokens" in keys
    assert not any("image_encoder" in k for k in keys)
    expected_trainable = sum(p.numel() for p in adapter.trainable_parameters())
    assert sum(t.numel() for t in load_file(str(tmp_path / WEIGHTS_NAME)).values()) == expected_trainable


def test_image_encoder_override(sd_pipe, tmp_path):
    adapter = make_adapter(sd_pipe.unet).eval()
    adapter.save_pretrained(tmp_path / "adapter")
    with pytest.raises(NestedAttentionError, match="tiny-clip"):  # the config's name is not loadable here
        NestedAdapter.from_pretrained(tmp_path / "adapter")
    adapter.encoder.image_encoder.save_pretrained(tmp_path / "clip")
    loaded = NestedAdapter.from_pretrained(tmp_path / "adapter", image_encoder=str(tmp_path / "clip"))
    pixels = torch.randn(1, 3, 32, 32)
    assert torch.equal(adapter.encoder(pixels), loaded.encoder(pixels))
    assert not loaded.training
    loaded = NestedAdapter.from_pretrained(tmp_path / "adapter", image_encoder=adapter.encoder.image_encoder)
    assert torch.equal(adapter.encoder(pixels), loaded.encoder(pixels))


def test_an_image_encoder_loads_quietly_from_a_full_clip_and_never_with_weights_missing(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    from nested_attention.adapter import load_image_encoder

    torch.manual_seed(0)
    vision = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    full = CLIPModel(CLIPConfig(text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                 num_attention_heads=2), vision_config=vision, projection_dim=8))
    full.save_pretrained(tmp_path / "clip")
    reports = []  # transformers' own handler writes to the stderr it found at import, so listen on its logger
    listener = logging.Handler(logging.DEBUG)
    listener.emit = lambda record: reports.append(record.getMessage())
    transformers_logger = logging.getLogger("transformers")
    transformers_logger.addHandler(listener)
    try:
        encoder, _ = load_image_encoder(str(tmp_path / "clip"))  # the text tower is unused, and no news
    finally:
        transformers_logger.removeHandler(listener)
    assert not [report for report in reports if "UNEXPECTED" in report]
    loaded = encoder.state_dict()
    assert all(torch.equal(loaded[name], weight) for name, weight in full.vision_model.state_dict().items())
    # a checkpoint with a layer fewer than its config says: the missing layer would start random, so it is refused
    config = json.loads((tmp_path / "clip" / "config.json").read_text())
    config["vision_config"]["num_hidden_layers"] = 3
    (tmp_path / "clip" / "config.json").write_text(json.dumps(config))
    with pytest.raises(NestedAttentionError, match=r"lacks \d+ of a CLIP vision model's weights .*layers\.2\."):
        load_image_encoder(str(tmp_path / "clip"))
    config["vision_config"].update(num_hidden_layers=2, intermediate_size=40)  # weights of other shapes
    (tmp_path / "clip" / "config.json").write_text(json.dumps(config))
    with pytest.raises(NestedAttentionError, match="weights of other shapes than its config.json says"):
        load_image_encoder(str(tmp_path / "clip"))


def test_adapter_for_another_unet_is_refused(sd_pipe, sdxl_pipe):
    adapter = make_adapter(sd_pipe.unet)
    with pytest.raises(NestedAttentionError, match="different UNet.*no nested layer"):
        adapter.check_compatible(cross_attention_layers(sdxl_pipe.unet))
    resized = dict(adapter.config.layers)
    first = next(iter(resized))
    resized[first] *= 2
    config = NestedAdapterConfig(**{**adapter.config.__dict__, "layers": resized})
    other = NestedAdapter(config, adapter.encoder.image_encoder)
    with pytest.raises(NestedAttentionError, match="differ in size"):
        other.check_compatible(cross_attention_layers(sd_pipe.unet))


@pytest.mark.parametrize("damage", ["missing", "unexpected", "shape"])
def test_damaged_weights_are_named(sd_pipe, tmp_path, damage):
    adapter = make_adapter(sd_pipe.unet)
    adapter.save_pretrained(tmp_path, save_image_encoder=True)
    state = load_file(str(tmp_path / WEIGHTS_NAME))
    victim = sorted(k for k in state if k.startswith("layers."))[0]
    if damage == "missing":
        del state[victim]
    elif damage == "unexpected":
        state["layers.extra.to_k.weight"] = torch.zeros(1)
    else:
        state[victim] = torch.zeros(3, 3)
    save_file(state, str(tmp_path / WEIGHTS_NAME))
    expected = {"missing": f"missing keys.*{victim}", "unexpected": "unexpected keys.*layers.extra",
                "shape": f"wrong shape.*{victim}"}[damage]
    with pytest.raises(NestedAttentionError, match=expected):
        NestedAdapter.from_pretrained(tmp_path)


def test_wrong_directories_are_refused(sd_pipe, tmp_path):
    with pytest.raises(NestedAttentionError, match="does not exist"):
        NestedAdapter.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "pickle").mkdir()
    (tmp_path / "pickle" / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(NestedAttentionError, match="not a nested attention adapter"):
        NestedAdapter.from_pretrained(tmp_path / "pickle")
    adapter = make_adapter(sd_pipe.unet)
    adapter.save_pretrained(tmp_path / "bad", save_image_encoder=True)
    (tmp_path / "bad" / WEIGHTS_NAME).write_bytes(b"garbage")
    with pytest.raises(NestedAttentionError, match="not a readable safetensors"):
        NestedAdapter.from_pretrained(tmp_path / "bad")
    config = json.loads((tmp_path / "bad" / CONFIG_NAME).read_text())
    (tmp_path / "bad" / CONFIG_NAME).write_text(json.dumps({**config, "surprise": 1}))
    with pytest.raises(NestedAttentionError, match="unknown fields.*surprise"):
        NestedAdapter.from_pretrained(tmp_path / "bad")


def test_config_validation():
    with pytest.raises(NestedAttentionError, match="num_queries"):
        NestedAdapterConfig(layers={"a": 8}, image_encoder="x", image_encoder_hidden_size=4, num_queries=0)
    with pytest.raises(NestedAttentionError, match="single word"):
        NestedAdapterConfig(layers={"a": 8}, image_encoder="x", image_encoder_hidden_size=4, word="two words")
    with pytest.raises(NestedAttentionError, match="alpha"):
        NestedAdapterConfig(layers={"a": 8}, image_encoder="x", image_encoder_hidden_size=4, alpha=-1.0)
