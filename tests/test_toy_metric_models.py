"""Toy-world metric models: storage round trip, retrieval arithmetic, and learning on a small render set."""

import torch

from nested_attention_toy.build_metrics import make_set
from nested_attention_toy.metric_models import (
    FactorClassifier,
    IdentityNet,
    MetricConfig,
    head_accuracy,
    retrieval_top1,
    train_multihead,
)
from nested_attention_toy.world import CONTEXT_FACTORS


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = IdentityNet(MetricConfig({"a": 3, "b": 5}, image_size=32, width=8)).eval()
    model.save_pretrained(tmp_path / "m")
    loaded = IdentityNet.from_pretrained(tmp_path / "m")
    loaded.save_pretrained(tmp_path / "again")
    again = IdentityNet.from_pretrained(tmp_path / "again")
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    assert all(torch.equal(x, y) for x, y in zip(loaded.state_dict().values(), again.state_dict().values()))
    torch.testing.assert_close(loaded.embed(images), model.embed(images), atol=2e-2, rtol=0)  # fp16 storage


def test_retrieval_top1_counts_nearest_gallery_match():
    class Fixed(IdentityNet):
        def embed(self, images):
            return torch.nn.functional.normalize(images.flatten(1).float(), dim=-1)

    model = Fixed(MetricConfig({"a": 2}, image_size=1, width=1))
    gallery = torch.eye(3, dtype=torch.uint8).view(3, 3, 1, 1) * 200
    queries = gallery[torch.tensor([0, 1, 2, 2])]
    assert retrieval_top1(model, gallery, queries, torch.tensor([0, 1, 2, 0])) == 0.75


def test_factor_classifier_learns_from_renders():
    train = make_set(("person", "pet"), 600, held_out=False, size=32, seed=0, workers=1)
    model = FactorClassifier(MetricConfig({f: len(v) for f, v in CONTEXT_FACTORS.items()}, image_size=32, width=8))
    losses = train_multihead(model, train.images, train.factors, epochs=3, batch_size=64, lr=3e-3)
    assert losses[-1] < losses[0]
    accuracy = head_accuracy(model, train.images, train.factors)
    chance = {f: 1 / len(v) for f, v in CONTEXT_FACTORS.items()}
    assert sum(accuracy[f] > chance[f] + 0.1 for f in accuracy) >= 3, accuracy
