"""The four rival mechanisms (paper Fig. 10) against literal, naive references of their equations; their configs,
weights and round trips."""

import json
import math

import pytest
import torch

from conftest import make_adapter
from nested_attention import NestedAdapter, NestedAdapterConfig, NestedAttentionError
from nested_attention.adapter import WEIGHTS_NAME, NestedProjection
from nested_attention.config import CONFIG_NAME, MECHANISMS
from nested_attention.layers import cross_attention_layers
from nested_attention.mechanisms import SubjectRows, mechanism

RIVALS = ["decoupled", "simple", "global_v", "multi_token"]
TOL = dict(atol=2e-5, rtol=2e-5)  # float32, the same sums in another order


def project(weight, token, h, heads):
    """(W t) split into heads, head h: one encoder token through one projection, by hand."""
    return (weight @ token).view(heads, -1)[h]


def naive(kind, query, key, value, subjects, masks, lam, alpha, scales):
    """Loop over rows, heads and queries; build every logit and value of the mechanism's equation explicitly.

    subjects: K dicts with tokens (B, M, width), bias (B, M), wk / wv (H*d, width) projection weights."""
    B, H, N, d = query.shape
    out = torch.zeros_like(query)
    present = masks.any(-1)  # (K, B)
    for b in range(B):
        for h in range(H):
            for n in range(N):
                q = query[b, h, n]
                logits = list(key[b, h] @ q / math.sqrt(d))
                values = list(value[b, h].clone())
                extra = torch.zeros(d)
                for k, s in enumerate(subjects):
                    tokens, bias = s["tokens"][b], s["bias"][b]
                    bound = torch.nonzero(masks[k, b]).flatten().tolist()
                    if kind in ("global_v", "multi_token"):
                        for t in bound:
                            logits[t] = max(logits[t], lam[k, b] * logits[t])
                    if kind == "decoupled" and present[k, b]:
                        keys = [project(s["wk"], tokens[m], h, H) for m in range(len(tokens))]
                        weights = torch.softmax(torch.stack([kk @ q / math.sqrt(d) for kk in keys]) + bias, 0)
                        term = sum(weights[m] * project(s["wv"], tokens[m], h, H) for m in range(len(tokens)))
                        extra = extra + scales[k] * term
                    if kind == "simple" and present[k, b]:
                        for m in range(len(tokens)):
                            logits.append(project(s["wk"], tokens[m], h, H) @ q / math.sqrt(d) + bias[m])
                            values.append(project(s["wv"], tokens[m], h, H))
                    if kind == "global_v":
                        weights = torch.softmax(bias, 0)
                        mean_token = sum(weights[m] * tokens[m] for m in range(len(tokens)))
                        v_bar = project(s["wv"], mean_token, h, H)
                        for t in bound:
                            a = alpha[k]
                            values[t] = v_bar if a is None else a * value[b, h, t].norm() * v_bar / v_bar.norm()
                    if kind == "multi_token":
                        for t in bound:  # M extra tokens, each with the key (and lambda-changed logit) of token t
                            for m in range(len(tokens)):
                                logits.append(logits[t] + bias[m])
                                values.append(project(s["wv"], tokens[m], h, H))
                probs = torch.softmax(torch.stack(logits), 0)
                out[b, h, n] = sum(p * v for p, v in zip(probs, values)) + extra
    return out


@pytest.mark.parametrize(("kind", "lam_value"), [(k, 1.0) for k in RIVALS] + [("global_v", 2.5), ("multi_token", 2.5)])
@pytest.mark.parametrize("num_subjects", [1, 2])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_naive_reference(kind, num_subjects, lam_value, with_bias):
    """Lambda only where it applies: decoupled and simple refuse it (test_mechanism_pipelines.py)."""
    chosen = mechanism(kind)
    B, H, N, d, T, M, width = 3, 2, 5, 4, 7, 3, 6
    gen = torch.Generator().manual_seed(hash((kind, num_subjects, lam_value, with_bias)) % 2**31)
    rand = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    query, key, value = rand(B, H, N, d), rand(B, H, T, d), rand(B, H, T, d)
    masks = torch.zeros(num_subjects, B, T, dtype=torch.bool)
    for k in range(num_subjects):
        for b in range(B):
            if (b + k) % 3 != 2:  # every row misses one of two subjects somewhere
                masks[k, b, torch.randperm(T, generator=gen)[: 1 + b % 2]] = True
        masks[k] &= ~masks[:k].any(0)
    masks[:, 0, :] = False
    masks[0, 0, 1] = True  # row 0 carries subject 0 only
    if num_subjects == 1:  # rows without any subject never reach a mechanism (the processor serves them vanilla)
        masks[0, ~masks[0].any(-1), 2] = True
    lam = torch.full((num_subjects, B), lam_value)
    lam[:, 1] = 1.0 + (lam_value - 1.0) / 2
    alpha = [2.0, None][:num_subjects]
    scales = [1.0, 0.6][:num_subjects] if chosen.uses_scale else None
    subjects, rows = [], []
    for k in range(num_subjects):
        torch.manual_seed(k)
        projection = NestedProjection(width, H * d, with_key=chosen.has_key)
        tokens = rand(B, M, width)
        bias = torch.log(torch.rand(B, M, generator=gen) + 0.1) if with_bias else torch.zeros(B, M)
        given = bias if with_bias else None
        with torch.no_grad():
            state = chosen.layer_state(projection, tokens, given, H, d)
        step_bias = given[:, None, None, :] if (chosen.per_step_bias and given is not None) else None
        rows.append(SubjectRows(state, step_bias, alpha[k]))
        subjects.append({"tokens": tokens, "bias": bias, "wv": projection.to_v.weight.detach(),
                         "wk": projection.to_k.weight.detach() if chosen.has_key else None})
    with torch.no_grad():
        ours = chosen.attend(query, key, value, rows, masks, None if lam_value == 1.0 else lam, None, scales)
    reference = naive(kind, query, key, value, subjects, masks, lam if lam_value != 1.0 else torch.ones_like(lam),
                      alpha, scales or [1.0] * num_subjects)
    torch.testing.assert_close(ours, reference, **TOL)


@pytest.mark.parametrize("kind", ["simple", "multi_token"])
def test_text_attention_mask_is_kept(kind):
    """A text token masked out (-inf) gets no weight, whatever tokens the mechanism adds."""
    chosen = mechanism(kind)
    B, H, N, d, T, M, width = 2, 2, 3, 4, 5, 3, 6
    torch.manual_seed(0)
    query, key, value = torch.randn(B, H, N, d), torch.randn(B, H, T, d), torch.randn(B, H, T, d)
    masks = torch.zeros(1, B, T, dtype=torch.bool)
    masks[0, :, 1] = True
    projection = NestedProjection(width, H * d, with_key=chosen.has_key)
    with torch.no_grad():
        rows = [SubjectRows(chosen.layer_state(projection, torch.randn(B, M, width), None, H, d), None, None)]
        attn_mask = torch.zeros(B, 1, 1, T)
        attn_mask[:, :, :, 3] = -torch.inf
        masked = chosen.attend(query, key, value, rows, masks, None, attn_mask, None)
        changed = value.clone()
        changed[:, :, 3] += 100.0  # the masked token's value cannot matter
        again = chosen.attend(query, key, changed, rows, masks, None, attn_mask, None)
    torch.testing.assert_close(masked, again, **TOL)


def test_config_names_match_the_classes():
    from nested_attention.mechanisms import MECHANISMS as CLASSES

    assert tuple(CLASSES) == MECHANISMS and all(CLASSES[n].name == n for n in MECHANISMS)


def test_unknown_mechanism_is_one_sentence(sd_pipe):
    with pytest.raises(NestedAttentionError, match="`mechanism` is 'ip_adapter'; expected one of nested, decoupled"):
        make_adapter(sd_pipe.unet, mechanism="ip_adapter")


def test_adapter_saved_without_the_field_loads_as_nested(sd_pipe, tmp_path):
    adapter = make_adapter(sd_pipe.unet, seed=2).eval()
    adapter.save_pretrained(tmp_path, save_image_encoder=True)
    data = json.loads((tmp_path / CONFIG_NAME).read_text())
    del data["mechanism"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(data))
    loaded = NestedAdapter.from_pretrained(tmp_path)
    assert loaded.config.mechanism == "nested" and loaded.config == adapter.config


@pytest.mark.parametrize("kind", RIVALS)
def test_round_trip_is_exact(sd_pipe, tmp_path, kind):
    adapter = make_adapter(sd_pipe.unet, seed=3, mechanism=kind).eval()
    adapter.save_pretrained(tmp_path, save_image_encoder=True)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["mechanism"] == kind
    assert f"| mechanism | {kind} |" in (tmp_path / "README.md").read_text()  # the model card names it
    loaded = NestedAdapter.from_pretrained(tmp_path)
    assert loaded.config == adapter.config and loaded.mechanism is adapter.mechanism
    ours, theirs = adapter.adapter_state_dict(), loaded.adapter_state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    layers = cross_attention_layers(sd_pipe.unet)
    tokens, bias = torch.randn(2, 8, adapter.config.qformer_hidden_size), torch.randn(2, 8)
    with torch.no_grad():
        before, after = adapter.layer_states(tokens, layers, bias), loaded.layer_states(tokens, layers, bias)
    assert before.keys() == after.keys()
    assert all(torch.equal(a, b) for path in before for a, b in zip(before[path], after[path]))


@pytest.mark.parametrize("kind", MECHANISMS)
def test_weights_hold_exactly_the_projections_the_mechanism_uses(sd_pipe, tmp_path, kind):
    from safetensors.torch import load_file

    adapter = make_adapter(sd_pipe.unet, mechanism=kind)
    adapter.save_pretrained(tmp_path)
    keys = set(load_file(str(tmp_path / WEIGHTS_NAME)))
    for path in cross_attention_layers(sd_pipe.unet):
        assert f"layers.{path}.to_v.weight" in keys
        assert (f"layers.{path}.to_k.weight" in keys) == (kind in ("nested", "decoupled", "simple"))


def test_nested_keys_of_a_keyless_mechanism_are_refused(sd_pipe):
    adapter = make_adapter(sd_pipe.unet, mechanism="global_v")
    with pytest.raises(NestedAttentionError, match="A global_v adapter has no nested keys; use layer_states"):
        adapter.nested_keys_values(torch.randn(1, 8, 32), cross_attention_layers(sd_pipe.unet))


def test_weights_of_another_mechanism_are_refused(sd_pipe, tmp_path):
    make_adapter(sd_pipe.unet, mechanism="decoupled").save_pretrained(tmp_path, save_image_encoder=True)
    data = json.loads((tmp_path / CONFIG_NAME).read_text())
    data["mechanism"] = "global_v"
    (tmp_path / CONFIG_NAME).write_text(json.dumps(data))
    with pytest.raises(NestedAttentionError, match="unexpected keys"):
        NestedAdapter.from_pretrained(tmp_path)


def test_config_json_round_trip(tmp_path):
    config = NestedAdapterConfig(layers={"a.attn2": 8}, image_encoder="x", image_encoder_hidden_size=4,
                                 mechanism="multi_token")
    config.to_json_file(tmp_path / "c.json")
    assert NestedAdapterConfig.from_json_file(tmp_path / "c.json") == config
