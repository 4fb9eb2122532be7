"""The attention arithmetic against an independent, deliberately naive implementation."""

import math

import pytest
import torch

from nested_attention.attention import nested_values, personalized_attention


def naive_nested_value(q, nested_key, nested_value, bias):
    # q (d,), nested_key/value (M, d), bias (M,)
    logits = nested_key @ q / math.sqrt(q.shape[0]) + bias
    return torch.softmax(logits, dim=0) @ nested_value


def naive_attention(query, key, value, nested_keys, nested_vals, biases, masks, lam, alpha, scale=None,
                    attn_mask=None):
    """Loop over rows, heads and queries; build V_q with the subject rows replaced, then softmax.

    At strength s (`scale`) a subject row's value is (1 - s) V[s] + s v*_q and its lambda 1 + s (lambda - 1).
    `attn_mask` (B, T) is added to the logits after lambda."""
    B, H, N, d = query.shape
    out = torch.zeros_like(query)
    for b in range(B):
        for h in range(H):
            for n in range(N):
                q = query[b, h, n]
                logits = key[b, h] @ q / math.sqrt(d)
                values = value[b, h].clone()
                for k in range(len(nested_keys)):
                    v_star = naive_nested_value(q, nested_keys[k][b, h], nested_vals[k][b, h], biases[k][b])
                    strength = 1.0 if scale is None else scale[k]
                    for s in torch.nonzero(masks[k, b]).flatten().tolist():
                        logits[s] = max(logits[s], (1 + strength * (lam[k, b] - 1)) * logits[s])
                        a = alpha[k] if isinstance(alpha, tuple) else alpha
                        nested = v_star if a is None else a * value[b, h, s].norm() * v_star / v_star.norm()
                        values[s] = (1 - strength) * value[b, h, s] + strength * nested
                if attn_mask is not None:
                    logits = logits + attn_mask[b]
                out[b, h, n] = torch.softmax(logits, dim=0) @ values
    return out


@pytest.mark.parametrize("shape", [(2, 2, 5, 8, 7, 4), (3, 1, 9, 4, 11, 6), (1, 4, 3, 16, 6, 10)])
@pytest.mark.parametrize("lam_value", [1.0, 2.5])
@pytest.mark.parametrize("alpha", [None, 2.0, (3.0, None)])
@pytest.mark.parametrize("num_subjects", [1, 2])
def test_matches_naive_reference(shape, lam_value, alpha, num_subjects):
    if isinstance(alpha, tuple):
        alpha = alpha[:num_subjects]  # one alpha per subject (adapters trained differently)
    B, H, N, d, T, M = shape
    gen = torch.Generator().manual_seed(hash((shape, lam_value, alpha, num_subjects)) % 2**31)
    rand = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    query, key, value = rand(B, H, N, d), rand(B, H, T, d), rand(B, H, T, d)
    masks = torch.zeros(num_subjects, B, T, dtype=torch.bool)
    for k in range(num_subjects):
        for b in range(B - 1):  # the last row has no subject: it must come out vanilla
            positions = torch.randperm(T, generator=gen)[: 1 + (b % 2)]  # one or two occurrences
            masks[k, b, positions] = True
        masks[k] &= ~masks[:k].any(0)  # subjects never share a token
    nested_keys = [rand(B, H, M, d) for _ in range(num_subjects)]
    nested_vals = [rand(B, H, M, d) for _ in range(num_subjects)]
    biases = [torch.log(torch.rand(B, M, generator=gen) + 0.1) for _ in range(num_subjects)]
    lam = torch.full((num_subjects, B), lam_value)
    lam[:, 0] = 1.0 + (lam_value - 1.0) / 2  # lambda differs per row
    lam[-1, 1:] = 1.0 + (lam_value - 1.0) * 1.5  # and per subject

    subject_values = [
        nested_values(query, nested_keys[k], nested_vals[k], biases[k][:, None, None, :])
        for k in range(num_subjects)
    ]
    ours = personalized_attention(
        query, key, value, subject_values, masks, lam=None if lam_value == 1.0 else lam,
        alpha=list(alpha) if isinstance(alpha, tuple) else alpha,
    )
    reference = naive_attention(
        query, key, value, nested_keys, nested_vals, biases, masks,
        torch.ones_like(lam) if lam_value == 1.0 else lam, alpha,
    )
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    vanilla = torch.softmax(query[-1] @ key[-1].transpose(-1, -2) / math.sqrt(d), -1) @ value[-1]
    torch.testing.assert_close(ours[-1], vanilla, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("lam_value", [1.0, 2.5])
@pytest.mark.parametrize("alpha", [None, 2.0])
@pytest.mark.parametrize("scale", [(0.0, 0.0), (0.3, 1.0), (1.0, 0.6)])
def test_strength_matches_naive_reference(lam_value, alpha, scale):
    B, H, N, d, T, M = 2, 2, 5, 8, 7, 4
    gen = torch.Generator().manual_seed(7)
    rand = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    query, key, value = rand(B, H, N, d), rand(B, H, T, d), rand(B, H, T, d)
    masks = torch.zeros(2, B, T, dtype=torch.bool)
    masks[0, :, 1] = True
    masks[1, 0, 4] = True
    nested_keys, nested_vals = [rand(B, H, M, d) for _ in range(2)], [rand(B, H, M, d) for _ in range(2)]
    biases = [torch.zeros(B, M) for _ in range(2)]
    lam = torch.full((2, B), lam_value)
    subject_values = [nested_values(query, nested_keys[k], nested_vals[k]) for k in range(2)]
    ours = personalized_attention(query, key, value, subject_values, masks, lam=None if lam_value == 1.0 else lam,
                                  alpha=alpha, scale=list(scale))
    reference = naive_attention(query, key, value, nested_keys, nested_vals, biases, masks, lam, alpha, scale)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    if scale == (0.0, 0.0):  # strength 0: the base model's attention, whatever lambda
        vanilla = torch.nn.functional.scaled_dot_product_attention(query, key, value)
        torch.testing.assert_close(ours, vanilla, atol=1e-6, rtol=1e-6)


def test_lambda_path_equals_fused_path_at_one():
    gen = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, 3, 6, 8, generator=gen) for _ in range(3))
    masks = torch.zeros(1, 2, 6, dtype=torch.bool)
    masks[0, :, 2] = True
    v_star = [torch.randn(2, 3, 6, 8, generator=gen)]
    fused = personalized_attention(query, key, value, v_star, masks, lam=None)
    explicit = personalized_attention(query, key, value, v_star, masks, lam=torch.ones(1, 2))
    torch.testing.assert_close(fused, explicit, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("alpha", [None, 1.0])
def test_subject_value_equal_to_vanilla_value_gives_vanilla(alpha):
    """v* forced to V[s*] with lambda = 1 (and alpha 1 or off) is exactly the vanilla attention."""
    gen = torch.Generator().manual_seed(1)
    query, key, value = (torch.randn(2, 2, 5, 4, generator=gen) for _ in range(3))
    masks = torch.zeros(1, 2, 5, dtype=torch.bool)
    masks[0, 0, 1] = True
    masks[0, 1, 3] = True
    # every nested value is V[s*], so softmax(q K̆ᵀ) V̆ = V[s*] for any nested keys
    subject_rows = value[torch.arange(2), :, torch.tensor([1, 3])]  # (B, H, d)
    nested_value = subject_rows[:, :, None, :].expand(-1, -1, 7, -1)
    v_star = nested_values(query, torch.randn(2, 2, 7, 4, generator=gen), nested_value)
    ours = personalized_attention(query, key, value, [v_star], masks, alpha=alpha)
    vanilla = torch.nn.functional.scaled_dot_product_attention(query, key, value)
    torch.testing.assert_close(ours, vanilla, atol=1e-6, rtol=1e-6)


def test_lambda_raises_only_positive_logits():
    """max(l, lambda l): a negative subject logit is left alone, a positive one is scaled."""
    from nested_attention.attention import lambda_logits

    logits = torch.tensor([[[[-2.0, 3.0, 1.0]]]])
    lam_columns = torch.tensor([[4.0, 4.0, 1.0]])
    assert lambda_logits(logits, lam_columns).flatten().tolist() == [-2.0, 12.0, 1.0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lam", [None, 3.0])
def test_reduced_precision_stays_close_to_fp32(dtype, lam):
    gen = torch.Generator().manual_seed(2)
    query = torch.randn(2, 4, 64, 16, generator=gen)  # (B, H, N, d)
    key, value = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 4, 16, 16, generator=gen)  # T = 16
    nested_key, nested_value = torch.randn(2, 4, 32, 16, generator=gen), torch.randn(2, 4, 32, 16, generator=gen)
    masks = torch.zeros(1, 2, 16, dtype=torch.bool)
    masks[0, :, 5] = True
    lam_tensor = None if lam is None else torch.full((1, 2), lam)

    def run(dt):
        cast = [t.to(dt) for t in (query, key, value, nested_key, nested_value)]
        v_star = nested_values(cast[0], cast[3], cast[4])
        return personalized_attention(*cast[:3], [v_star], masks, lam=lam_tensor).float()

    reference, reduced = run(torch.float32), run(dtype)
    assert reduced.isfinite().all()
    torch.testing.assert_close(reduced, reference, atol=5e-2, rtol=5e-2)
