"""Toy-world metric models: storage round trip, retrieval arithmetic, the blur augmentation, and learning on a small
render set."""

import pytest
import torch

from nested_attention_toy.build_metrics import make_set
from nested_attention_toy.metric_models import (
    FactorClassifier,
    IdentityNet,
    MetricConfig,
    gaussian_blur,
    head_accuracy,
    random_blur,
    retrieval_top1,
    train_multihead,
)
from nested_attention_toy.world import CONTEXT_FACTORS, attribute_names, attribute_values


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = IdentityNet(MetricConfig({"a": 3, "b": 5}, image_size=32, width=8)).eval()
    model.save_pretrained(tmp_path / "m")
    loaded = IdentityNet.from_pretrained(tmp_path / "m")
    loaded.save_pretrained(tmp_path / "again")
    again = IdentityNet.from_pretrained(tmp_path / "again")
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert all(torch.equal(x, y) for x, y in zip(loaded.state_dict().values(), again.state_dict().values()))
    torch.testing.assert_close(loaded.embed(images), model.embed(images), atol=2e-2, rtol=0)  # fp16 storage
    # uint8 in, the training path's [-1, 1] floats inside, in chunks: the same as one plain forward
    roots = [logits.softmax(-1).sqrt() for logits in model(images.float() / 127.5 - 1).values()]
    torch.testing.assert_close(model.logits(images, batch_size=3)["a"], model(images.float() / 127.5 - 1)["a"])
    torch.testing.assert_close(model.embed(images), torch.nn.functional.normalize(torch.cat(roots, -1), dim=-1))
    with pytest.raises(TypeError, match="uint8"):
        model.embed(images.float())


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


def test_gaussian_blur_matches_a_direct_2d_convolution():
    """Per image its own sigma; the separable grouped convolution equals a full 2-D Gaussian kernel applied to the
    replicate-padded image, sigma 0 leaves an image unchanged, and a constant image stays constant."""
    torch.manual_seed(0)
    images = torch.rand(3, 3, 12, 12)
    sigma = torch.tensor([0.0, 0.8, 1.7])
    blurred = gaussian_blur(images, sigma)
    assert torch.equal(blurred[0], images[0])
    radius = 6  # ceil(3 * 1.7)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    for i in (1, 2):
        g = torch.exp(-0.5 * (offsets / sigma[i]) ** 2)
        kernel = torch.outer(g, g) / g.sum() ** 2
        padded = torch.nn.functional.pad(images[i : i + 1], (radius,) * 4, mode="replicate")
        reference = torch.nn.functional.conv2d(padded, kernel.expand(3, 1, -1, -1), groups=3)[0]
        torch.testing.assert_close(blurred[i], reference, atol=1e-5, rtol=0)
    flat = torch.full((2, 3, 8, 8), 0.3)
    torch.testing.assert_close(gaussian_blur(flat, torch.tensor([1.0, 2.5])), flat)


def test_random_blur_leaves_about_half_the_batch_sharp():
    images = torch.rand(400, 3, 8, 8)
    out = random_blur(images, 2.0, torch.Generator().manual_seed(0))
    unchanged = (out == images).flatten(1).all(1).float().mean()
    assert 0.4 < unchanged < 0.6
    assert torch.equal(out, random_blur(images, 2.0, torch.Generator().manual_seed(0)))


def test_training_with_blur_augmentation_learns_and_reads_blurred_renders():
    torch.manual_seed(0)
    train = make_set(("person",), 600, held_out=False, size=32, seed=0, workers=1)
    heads = {a: len(attribute_values("person", a)) for a in attribute_names("person")}
    model = IdentityNet(MetricConfig(heads, image_size=32, width=8))
    losses = train_multihead(model, train.images, train.attributes, epochs=8, batch_size=32, lr=5e-3, blur=2.0)
    assert losses[-1] < losses[0]
    blurred = ((gaussian_blur(train.images.float() / 127.5 - 1, torch.full((600,), 1.5)) + 1) * 127.5).round().to(torch.uint8)
    accuracy = head_accuracy(model, blurred, train.attributes)
    assert accuracy["shirt_color"] > 0.5, accuracy  # chance 1/6
