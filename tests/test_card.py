"""The model card written next to every saved adapter, read back with huggingface_hub's own parser."""

import pytest
from huggingface_hub import ModelCard

from conftest import make_adapter, subject_image
from nested_attention import AdapterCard, NestedAdapter
from nested_attention.card import CARD_NAME, add_metrics
from nested_attention.errors import NestedAttentionError


def test_save_pretrained_writes_a_card_the_hub_reads(sd_pipe, tmp_path):
    adapter = make_adapter(sd_pipe.unet, word="pet")
    card = AdapterCard(base_model="someone/base-model", training={"records": 40000, "optimizer steps": 1200},
                       metrics={"identity (cosine), lambda 1": 0.41})
    adapter.save_pretrained(tmp_path, save_image_encoder=True, card=card)
    parsed = ModelCard.load(tmp_path / CARD_NAME)
    assert parsed.data.library_name == "nested-attention" and parsed.data.base_model == "someone/base-model"
    assert "nested-attention" in parsed.data.tags
    for expected in ("'pet'", "| records | 40000 |", "| optimizer steps | 1200 |", "| identity (cosine), lambda 1 | 0.41 |",
                     'DiffusionPipeline.from_pretrained("someone/base-model")', 'subjects={"pet": Subject('):
        assert expected in parsed.text
    assert NestedAdapter.from_pretrained(tmp_path).config == adapter.config  # the card is no obstacle to loading


def test_a_card_without_details_and_a_local_base_model(sd_pipe, tmp_path):
    adapter = make_adapter(sd_pipe.unet)
    adapter.save_pretrained(tmp_path / "plain")
    plain = ModelCard.load(tmp_path / "plain" / CARD_NAME)
    assert plain.data.base_model is None and "Not measured" in plain.text and "## Training" not in plain.text
    adapter.save_pretrained(tmp_path / "local", card=AdapterCard(base_model=str(tmp_path / "my-base")))
    local = ModelCard.load(tmp_path / "local" / CARD_NAME)
    assert local.data.base_model is None and str(tmp_path / "my-base") in local.text  # a path is no hub metadata


def test_the_trainer_s_export_carries_its_training_summary(tmp_path):
    from test_train import make_triplets, run

    triplets = make_triplets(tmp_path / "data")
    assert run(f"data={triplets}", f"output_dir={tmp_path / 'out'}", "max_steps=1") == 0
    text = ModelCard.load(tmp_path / "out" / "adapter" / CARD_NAME).text
    for expected in ("| base model | tiny-sd |", "| records | 4 |", "| optimizer steps | 1 |", f"| data | {triplets} |",
                     "| final loss (mean of the last 1 steps) |"):
        assert expected in text


def test_measured_metrics_merge_into_a_saved_card(sd_pipe, tmp_path):
    adapter = make_adapter(sd_pipe.unet)
    adapter.save_pretrained(tmp_path, card=AdapterCard(training={"records": 4}, metrics={"a": 0.1, "b": 0.2}))
    add_metrics(tmp_path, {"b": 0.25, "c": 0.3})
    parsed = ModelCard.load(tmp_path / CARD_NAME)
    metrics = parsed.text.split("## Metrics")[1].split("## Usage")[0]
    assert [line for line in metrics.splitlines() if line.startswith("| ")] == [
        "| | |", "| --- | --- |", "| a | 0.1 |", "| b | 0.25 |", "| c | 0.3 |"]
    assert "| records | 4 |" in parsed.text and parsed.data.library_name == "nested-attention"
    (tmp_path / CARD_NAME).write_text("# someone else's card\n")
    with pytest.raises(NestedAttentionError, match="not a model card that save_pretrained wrote"):
        add_metrics(tmp_path, {"a": 1})


def test_the_usage_snippet_of_a_registered_base_model_runs(sd_pipe, tmp_path):
    # a name an installed package registers ("tiny-sd" here, "toy" for the toy world) is no hub id: plain diffusers
    # cannot load it, so the card's snippet must go through the library's loader, and run as written
    adapter = make_adapter(sd_pipe.unet, word="pet")
    adapter.save_pretrained(tmp_path / "adapter", save_image_encoder=True, card=AdapterCard(base_model="tiny-sd"))
    text = ModelCard.load(tmp_path / "adapter" / CARD_NAME).text
    code = text.split("```python\n")[1].split("```")[0]
    assert "DiffusionPipeline.from_pretrained" not in code and 'load_pipeline("tiny-sd")' in code
    subject_image(1).save(tmp_path / "subject.jpg")
    code = code.replace("THIS_FOLDER_OR_HUB_ID", str(tmp_path / "adapter")).replace(
        "subject.jpg", str(tmp_path / "subject.jpg")).replace("}).images[0]", "}, num_inference_steps=2).images[0]")
    scope = {}
    exec(compile(code, "card snippet", "exec"), scope)
    assert scope["image"].size == (sd_pipe.unet.config.sample_size * sd_pipe.vae_scale_factor,) * 2
