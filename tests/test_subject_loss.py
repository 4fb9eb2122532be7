"""Subject-weighted loss: the weighting against its literal formula, the loss it changes, the trainer's checks."""

import json

import torch
from PIL import Image

from nested_attention_train.step import NestedTrainingModule, subject_weighted_mean
from test_train import make_triplets, run, training_parts


def test_weighted_mean_matches_the_literal_formula():
    """At the latent grid's own size the pooling is the identity: sum(w * e) / sum(w) over channels and pixels,
    w = 1 + (weight - 1) m, pixel by pixel; weight 1 and an empty mask give the plain mean."""
    gen = torch.Generator().manual_seed(0)
    squared = torch.rand(3, 4, 5, 6, generator=gen)
    mask = (torch.rand(3, 1, 5, 6, generator=gen) > 0.6).float()
    ours = subject_weighted_mean(squared, mask, 5.0)
    for b in range(3):
        total = weights = 0.0
        for c in range(4):
            for y in range(5):
                for x in range(6):
                    w = 1 + 4 * float(mask[b, 0, y, x])
                    total += w * float(squared[b, c, y, x])
                    weights += w
        # float32 sums in another order: 1e-6 relative is their rounding
        torch.testing.assert_close(ours[b], torch.tensor(total / weights), rtol=1e-6, atol=0)
    plain = squared.flatten(1).mean(1)
    torch.testing.assert_close(subject_weighted_mean(squared, mask, 1.0), plain, rtol=1e-6, atol=0)
    torch.testing.assert_close(subject_weighted_mean(squared, torch.zeros_like(mask), 9.0), plain, rtol=1e-6, atol=0)
    # a pixel mask 4x the latent size is averaged down: a block covering one latent pixel's 4x4 footprint
    big = torch.zeros(1, 1, 20, 24)
    big[0, 0, 4:8, 8:12] = 1
    one = torch.zeros(1, 1, 5, 6)
    one[0, 0, 1, 2] = 1
    torch.testing.assert_close(subject_weighted_mean(squared[:1], big, 3.0), subject_weighted_mean(squared[:1], one, 3.0))


def masked_triplets(folder, count=4):
    """make_triplets with a mask per target: its left half."""
    make_triplets(folder, count)
    lines = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    for i, line in enumerate(lines):
        size = Image.open(folder / line["target"]).size
        mask = Image.new("L", size, 0)
        mask.paste(255, (0, 0, size[0] // 2, size[1]))
        mask.save(folder / f"m{i}.png")
        line["target_mask"] = f"m{i}.png"
    (folder / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


def test_the_weight_changes_the_loss_only_where_masks_are(tmp_path):
    base, adapter, controller, batch = training_parts([f"data={masked_triplets(tmp_path / 'data')}"])
    losses = {}
    for weight in (None, 1.0, 5.0):
        torch.manual_seed(0)
        with torch.no_grad():
            losses[weight] = NestedTrainingModule(adapter, base, controller, subject_loss_weight=weight)(batch).item()
        controller.clear()
    assert abs(losses[1.0] - losses[None]) <= 1e-5 * losses[None]  # the same numbers summed in another order
    assert losses[5.0] != losses[None]
    unmasked = {k: v for k, v in batch.items() if k != "target_mask"}
    torch.manual_seed(0)
    with torch.no_grad():
        same = NestedTrainingModule(adapter, base, controller, subject_loss_weight=5.0)(unmasked).item()
    assert same == losses[None]  # no mask in the batch: the plain loss, computed the same way


def test_training_with_masks_runs_and_without_them_is_refused(tmp_path, capsys):
    masked = masked_triplets(tmp_path / "masked")
    assert run(f"data={masked}", f"output_dir={tmp_path / 'out'}", "max_steps=2", "subject_loss_weight=5") == 0
    capsys.readouterr()
    plain = make_triplets(tmp_path / "plain")
    assert run(f"data={plain}", f"output_dir={tmp_path / 'out2'}", "max_steps=2", "subject_loss_weight=5") == 2
    err = capsys.readouterr().err
    assert 'no record of' in err and '"target_mask"' in err and "Traceback" not in err
    assert run(f"data={plain}", "subject_loss_weight=0") == 2
    assert "`subject_loss_weight` is 0" in capsys.readouterr().err
