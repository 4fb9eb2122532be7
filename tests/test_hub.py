"""Adapters addressed by hub id ("owner/name"), read from a hub cache folder laid out as huggingface_hub lays it out.

The tests run offline (conftest sets HF_HUB_OFFLINE): the cache is written by hand, as a download would leave it.
"""

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
