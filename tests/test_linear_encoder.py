"""The linear subject encoder: the readout it claims to compute, its round trip, its maps, and clear refusals."""

import pytest
import torch

from conftest import make_adapter, subject_image
from nested_attention import NestedAdapter, NestedAdapterConfig, NestedAttentionError
from nested_attention.card import render_card
from nested_attention.explain import query_attention_maps
from nested_attention_cli.main import main as cli_main
from nested_attention_train.config import load_config
from nested_attention_train.models import load_adapter, load_base_model
from test_train import TINY, make_triplets

LINEAR = dict(subject_encoder="linear", linear_rank=5, num_queries=3)


def test_tokens_equal_a_naive_per_position_sum(sd_pipe):
    adapter = make_adapter(sd_pipe.unet, seed=1, **LINEAR).eval()
    encoder = adapter.encoder
    with torch.no_grad():
        encoder.query_tokens.normal_()
        pixels = torch.randn(2, 3, 32, 32)
        clip = encoder.clip_tokens(pixels)
        positions, rank = clip.shape[1], LINEAR["linear_rank"]
        weight = encoder.readout.weight  # (M * width, positions * rank)
        expected = []
        for b in range(2):
            tokens = []
            for m in range(LINEAR["num_queries"]):
                rows = weight[m * 32 : (m + 1) * 32]
                total = encoder.query_tokens[0, m].clone()
                for p in range(positions):
                    total += rows[:, p * rank : (p + 1) * rank] @ (encoder.down.weight @ clip[b, p])
                tokens.append(torch.nn.functional.layer_norm(total, (32,), encoder.norm.weight, encoder.norm.bias))
            expected.append(torch.stack(tokens))
        # float32 sums over 17 positions in another order: a few ulps of values of order 1
        torch.testing.assert_close(encoder(pixels), torch.stack(expected), rtol=1e-5, atol=1e-5)
        contributions = encoder.contributions(clip)  # (B, M, positions, width)
        assert contributions.shape == (2, 3, positions, 32)
        torch.testing.assert_close(
            encoder.norm(encoder.query_tokens + contributions.sum(2)), encoder(pixels), rtol=1e-5, atol=1e-5)


def test_only_the_readout_and_projections_are_trained_and_saved(sd_pipe, tmp_path):
    adapter = make_adapter(sd_pipe.unet, **LINEAR).eval()
    names = {n for n, p in adapter.named_parameters() if p.requires_grad}
    assert {"encoder.query_tokens", "encoder.down.weight", "encoder.readout.weight", "encoder.norm.weight"} <= names
    assert not any(n.startswith("encoder.image_encoder.") for n in names)
    assert not any("qformer" in n for n, _ in adapter.named_parameters())
    adapter.save_pretrained(tmp_path, save_image_encoder=True)
    loaded = NestedAdapter.from_pretrained(tmp_path)
    assert loaded.config == adapter.config and loaded.config.subject_encoder == "linear"
    pixels = torch.randn(1, 3, 32, 32)
    assert torch.equal(adapter.encoder(pixels), loaded.encoder(pixels))
    assert "linear readout of the CLIP tokens (rank 5)" in render_card(adapter.config)


def test_maps_are_the_patch_shares_of_each_token(sd_pipe):
    adapter = make_adapter(sd_pipe.unet, **LINEAR).eval()
    maps = query_attention_maps(adapter, subject_image(0))
    side = adapter.encoder.image_encoder.config.image_size // adapter.encoder.image_encoder.config.patch_size
    assert maps.shape == (3, side, side)
    assert bool((maps >= 0).all()) and bool((maps.sum((1, 2)) <= 1 + 1e-5).all())
    with torch.no_grad():  # a token that reads one patch only has all of its map there
        adapter.encoder.readout.weight.view(3, 32, side * side + 1, 5)[0].zero_()
        adapter.encoder.readout.weight.view(3, 32, side * side + 1, 5)[0, :, 1 + 6] = 1.0
    maps = query_attention_maps(adapter, subject_image(0))
    assert maps[0].flatten().argmax() == 6 and maps[0].sum() == pytest.approx(1.0)


def test_bad_encoder_names_and_ranks_are_refused():
    with pytest.raises(NestedAttentionError, match="`subject_encoder` is 'perceiver'; expected one of qformer, linear"):
        NestedAdapterConfig(layers={"a": 8}, image_encoder="x", image_encoder_hidden_size=8, subject_encoder="perceiver")
    with pytest.raises(NestedAttentionError, match="`linear_rank` is 0"):
        NestedAdapterConfig(layers={"a": 8}, image_encoder="x", image_encoder_hidden_size=8, linear_rank=0)
    sizes = dict(layers={"a": 8}, image_encoder="x", image_encoder_hidden_size=8, qformer_hidden_size=128,
                 qformer_heads=12)  # the Q-Former's heads must divide its width; the linear encoder has none
    with pytest.raises(NestedAttentionError, match="not divisible by `qformer_heads` 12"):
        NestedAdapterConfig(**sizes)
    assert NestedAdapterConfig(**sizes, subject_encoder="linear").qformer_hidden_size == 128


def test_the_trainer_trains_it_by_one_config_field(tmp_path, capsys):
    overrides = [f"data={make_triplets(tmp_path / 'data')}", "subject_encoder=linear", "linear_rank=4"]
    assert cli_main(["train", "--config", TINY, *overrides, f"output_dir={tmp_path / 'run'}", "max_steps=2"]) == 0
    exported = NestedAdapter.from_pretrained(tmp_path / "run" / "adapter")
    assert exported.config.subject_encoder == "linear" and exported.config.linear_rank == 4
    config = load_config(TINY, overrides)
    fresh = load_adapter(config, load_base_model(config).pipe.unet).adapter_state_dict()  # the run's start
    trained = exported.adapter_state_dict()
    assert fresh.keys() == trained.keys()
    assert all(not torch.equal(fresh[k], trained[k]) for k in ("encoder.readout.weight", "encoder.down.weight"))
    assert cli_main(["train", "--config", TINY, "data=x", "subject_encoder=resampler"]) == 2
    assert "`subject_encoder` is 'resampler'; expected one of qformer, linear" in capsys.readouterr().err
