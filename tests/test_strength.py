"""The strength dial `set_scale`: 0 is the base model, 1 the adapter as trained, per block like IP-Adapter."""

import pytest
import torch

from conftest import assert_same, differs, latents, make_adapter, subject_image
from nested_attention import NestedAttentionError, Subject, one_path_processor
from nested_attention.processor import NestedAttnProcessor

STEPS = 2
PROMPT = "a photo of a person at the beach"


def run(call, prompt=PROMPT, **kwargs):
    return latents(call, prompt, STEPS, **kwargs)


def test_strength_zero_is_the_base_model_and_one_the_adapter(pipe, na):
    na.load_adapter(make_adapter(pipe.unet))
    subject = {"person": Subject(subject_image(0), lam=2.0)}
    base, full = run(pipe), run(na, subjects=subject)
    na.set_scale("person", 0.0)
    assert torch.equal(run(na, subjects=subject), base)  # whatever lambda: every layer runs the original processor
    na.set_scale("person", 0.5)
    half = run(na, subjects=subject)
    assert differs(half, base) and differs(half, full)
    na.set_scale("person", 1.0)
    assert torch.equal(run(na, subjects=subject), full)


def test_strength_per_block_in_ip_adapter_format(pipe, na, monkeypatch):
    na.load_adapter(make_adapter(pipe.unet))
    subject = {"person": Subject(subject_image(0))}
    base, full = run(pipe), run(na, subjects=subject)
    na.set_scale("person", {"down": 1.0, "mid": 1.0, "up": 1.0})
    assert torch.equal(run(na, subjects=subject), full)
    na.set_scale("person", {"down": 0.0, "mid": 0.0, "up": 0.0})
    assert torch.equal(run(na, subjects=subject), base)

    nested_layers = set()  # the layers that compute nested attention, on the wrapping and on the one path
    nested, attend = NestedAttnProcessor._nested, one_path_processor.one_path_attention
    monkeypatch.setattr(NestedAttnProcessor, "_nested",
                        lambda self, *a: nested_layers.add(self.layer_path) or nested(self, *a))

    def spy(query, text, subjects, *rest):
        nested_layers.update(p for p, s in na.controller.plan.states.items() if s is subjects)
        return attend(query, text, subjects, *rest)

    monkeypatch.setattr(one_path_processor, "one_path_attention", spy)
    na.set_scale("person", {"up": 1.0})  # blocks left out get 0, as with set_ip_adapter_scale
    up_only = run(na, subjects=subject)
    assert differs(up_only, base) and differs(up_only, full)
    assert nested_layers == {path for path in na.controller.layers if path.startswith("up_blocks.")}


def test_a_subject_at_strength_zero_adds_nothing_next_to_another(pipe, na):
    na.load_adapter(make_adapter(pipe.unet, seed=0, word="person"))
    na.load_adapter(make_adapter(pipe.unet, seed=1, word="pet"))
    prompt = "a person and a pet in the park"
    person, pet = Subject(subject_image(0), lam=3.0), Subject(subject_image(5))
    pet_only = run(na, prompt, subjects={"pet": pet})
    na.set_scale("person", 0.0)
    assert_same(run(na, prompt, subjects={"person": person, "pet": pet}), pet_only)


@pytest.mark.parametrize("scale, match", [
    (1.5, "from 0"), (-0.1, "from 0"), (float("nan"), "from 0"), ("high", "from 0"), (True, "from 0"),
    ({"up": {"block_7": 1.0}}, "names 'block_7'"), ({"upper": 1.0}, "names 'upper'"), ({"up": "x"}, "from 0"),
    ({"up": {"block_0": [1.0, 0.0, 1.0, 0.0]}}, "does not fit this UNet"),
])
def test_bad_strength_is_one_sentence(sd_pipe, scale, match):
    from nested_attention import NestedAttention

    na = NestedAttention(sd_pipe)
    try:
        na.load_adapter(make_adapter(sd_pipe.unet))
        with pytest.raises(NestedAttentionError, match=match):
            na.set_scale("person", scale)
        with pytest.raises(NestedAttentionError, match="No adapter named"):
            na.set_scale("pet", 0.5)
    finally:
        na.uninstall()
