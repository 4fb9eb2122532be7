"""`python -m nested_attention_eval.toy_upper_bound`: the DreamBooth bound of what a frozen toy UNet can draw."""

import torch
from diffusers import StableDiffusionPipeline

from nested_attention_eval.toy_upper_bound import UpperBound, upper_bound
from nested_attention_toy.assets import model_path
from nested_attention_toy.world import attribute_names


def test_upper_bound_tunes_a_copy_and_scores_it():
    """The DreamBooth bound on the shipped toy model at a tiny size: every score is there and in range, and the
    pipeline's own UNet comes back untouched."""
    pipe = StableDiffusionPipeline.from_pretrained(model_path("toy"), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    unet = pipe.unet
    config = UpperBound(identities=3, subjects=1, renders=8, steps=3, batch_size=4, generations=2, sample_steps=2)
    (result,) = upper_bound(pipe, config, log=lambda line: None)
    assert pipe.unet is unet and all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    for kind in ("base", "tuned"):
        assert result[f"{kind}_top1"] in (0.0, 0.5, 1.0)
        assert set(result[f"{kind}_attributes"]) == set(attribute_names("person"))


def test_token_bound_learns_only_tokens_and_restores_the_pipeline():
    """The nested-attention bound (free nested keys and values on a frozen UNet) at a tiny size: the UNet's weights,
    their trainability and its attention processors are as before, and the scores are there."""
    pipe = StableDiffusionPipeline.from_pretrained(model_path("toy"), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    processors = dict(pipe.unet.attn_processors)
    config = UpperBound(tune="tokens", identities=3, subjects=1, renders=8, steps=3, batch_size=4, generations=2,
                        sample_steps=2, tokens=4)
    (result,) = upper_bound(pipe, config, log=lambda line: None)
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())
    assert all(p.requires_grad for p in pipe.unet.parameters())
    assert all(type(p) is type(processors[name]) for name, p in pipe.unet.attn_processors.items())
    assert result["tuned_top1"] in (0.0, 0.5, 1.0) and result["loss_first"] > 0


def test_bad_input_gets_one_sentence_and_exit_2(tmp_path, capsys):
    from nested_attention_eval.toy_upper_bound import main

    assert main(["--steps", "0"]) == 2
    assert "--steps is 0" in capsys.readouterr().err
    assert main(["--tokens", "0"]) == 2
    assert "--tokens is 0" in capsys.readouterr().err
    assert main(["--subjects", "21"]) == 2
    assert "--subjects is 21" in capsys.readouterr().err
    assert main(["--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a toy build's pipeline folder" in err and len(err.splitlines()) == 1
