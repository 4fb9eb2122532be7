"""Training at a lambda above 1 (`train_lambda`): the subject word's logits get it on every row, nothing else does."""

import torch

from nested_attention_train.step import NestedTrainingModule
from test_train import make_triplets, training_parts


def _loss(parts, lam, batch):
    base, adapter, controller, _ = parts
    bound = []
    bind = controller.bind
    controller.bind = lambda subjects: (bound.extend(subjects), bind(subjects))
    torch.manual_seed(0)
    try:
        with torch.no_grad():
            loss = NestedTrainingModule(adapter, base, controller, train_lambda=lam)(batch).item()
    finally:
        controller.bind = bind
        controller.clear()
    return loss, bound[0].lam


def test_train_lambda_reaches_the_bound_word_and_only_it(tmp_path):
    parts = training_parts([f"data={make_triplets(tmp_path / 'data')}"])
    batch = parts[3]
    rows = batch["token_mask"].shape[0]
    plain, lam = _loss(parts, 1.0, batch)
    assert lam is None  # lambda 1 takes the paper's path, untouched
    again, _ = _loss(parts, 1.0, batch)
    assert again == plain
    raised, lam = _loss(parts, 3.0, batch)
    assert torch.equal(lam, torch.full((rows,), 3.0)) and raised != plain
    # with the word bound on no row, lambda has no logit to raise: max(l, 3 l) on no column is the plain attention,
    # computed through the explicit-logits path instead of the fused one (1e-5 relative is their float32 rounding)
    unbound = dict(batch, token_mask=torch.zeros_like(batch["token_mask"]))
    reference, _ = _loss(parts, 1.0, unbound)
    ours, _ = _loss(parts, 3.0, unbound)
    assert abs(ours - reference) <= 1e-5 * abs(reference)
