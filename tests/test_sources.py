"""Named sources: one registry of names for models, adapters and image encoders, which the toy world plugs into."""

from pathlib import Path

import pytest

from nested_attention import sources
from nested_attention.errors import NestedAttentionError
from nested_attention.sources import ADAPTER, IMAGE_ENCODER, MODEL, Source


def test_built_in_and_plugged_in_names_resolve(monkeypatch):
    monkeypatch.setattr(sources, "_registry", {})
    monkeypatch.setattr(sources, "_discovered", False)
    sources.register(Source("mine", MODEL, folder=lambda: Path("/somewhere")))  # registered before the first lookup
    assert {"tiny-sd", "tiny-sdxl", "toy", "mine"} <= set(sources.names(MODEL))
    assert {"toy-person", "toy-pet"} <= set(sources.names(ADAPTER)) and {"tiny", "toy"} <= set(sources.names(IMAGE_ENCODER))
    assert sources.resolve(MODEL, "mine") == "/somewhere"
    assert sources.resolve(MODEL, "tiny-sd") == "tiny-sd"  # made on the fly: the name stays
    assert sources.resolve(MODEL, "org/some-model") == "org/some-model"  # a hub id or a folder: unchanged
    assert Path(sources.resolve(MODEL, "toy"), "model_index.json").is_file()


def test_a_missing_installed_folder_gets_one_sentence(tmp_path):
    source = Source("gone", ADAPTER, folder=lambda: tmp_path / "gone", marker="config.json", missing="train it first")
    with pytest.raises(NestedAttentionError, match=r"the adapter 'gone' is missing from this installation .*train it first"):
        source.path()
