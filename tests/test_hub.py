"""Adapters addressed by hub id ("owner/name"), read from a hub cache folder laid out as huggingface_hub lays it out.

The tests run offline (conftest sets HF_HUB_OFFLINE): the cache is written by hand, as a download would leave it.
"""

import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch

from conftest import make_adapter, subject_image
from nested_attention import NestedAdapter, NestedAttention, NestedAttentionError, Subject

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cached_repo(cache, repo_id, adapter):
    """Put `adapter` into `cache` as huggingface_hub stores a downloaded snapshot of `repo_id` (main -> COMMIT)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    adapter.save_pretrained(repo / "snapshots" / COMMIT, save_image_encoder=True)


def test_an_adapter_loads_by_hub_id_from_the_cache(sd_pipe, tmp_path):
    adapter = make_adapter(sd_pipe.unet, seed=3).eval()
    cached_repo(tmp_path, "someone/tiny-person", adapter)
    loaded = NestedAdapter.from_pretrained("someone/tiny-person", cache_dir=tmp_path)
    ours, theirs = adapter.adapter_state_dict(), loaded.adapter_state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)

    na = NestedAttention(sd_pipe)
    try:
        na.load_adapter(loaded)
        latents = na("a photo of a person", {"person": Subject(subject_image(0))}, num_inference_steps=2, height=32,
                     width=32, output_type="latent").images
        assert latents.isfinite().all()
    finally:
        na.uninstall()


@pytest.mark.parametrize("name, match", [
    ("someone/not-cached", "could not be fetched as a hub repository"),
    ("./missing-folder", "does not exist"),
])
def test_an_adapter_that_is_neither_folder_nor_hub_repository_is_one_sentence(tmp_path, name, match):
    with pytest.raises(NestedAttentionError, match=match):
        NestedAdapter.from_pretrained(name, cache_dir=tmp_path)


def test_push_to_hub_uploads_what_from_pretrained_loads(sd_pipe, tmp_path, monkeypatch):
    """The hub is replaced by a fake that files each upload into a cache folder as a download would lay it out."""
    created, uploads = [], []

    def upload_folder(self, *, repo_id, folder_path, commit_message, **kwargs):
        uploads.append(sorted(p.name for p in Path(folder_path).iterdir()))
        snapshot = tmp_path / ("models--" + repo_id.replace("/", "--")) / "snapshots" / COMMIT
        shutil.copytree(folder_path, snapshot)
        (snapshot.parent.parent / "refs").mkdir()
        (snapshot.parent.parent / "refs" / "main").write_text(COMMIT)
        return f"https://huggingface.co/{repo_id}/commit/{COMMIT}"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **k: created.append(repo_id))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    adapter = make_adapter(sd_pipe.unet, seed=5).eval()
    url = adapter.push_to_hub("someone/pushed", save_image_encoder=True)
    assert created == ["someone/pushed"] and url.endswith(COMMIT)
    assert uploads == [["README.md", "image_encoder", "nested_adapter.safetensors", "nested_adapter_config.json"]]
    loaded = NestedAdapter.from_pretrained("someone/pushed", cache_dir=tmp_path)
    ours, theirs = adapter.adapter_state_dict(), loaded.adapter_state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
