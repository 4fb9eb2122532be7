"""`python -m nested_attention_eval.toy_upper_bound`: the DreamBooth bound of what a frozen toy UNet can draw."""

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from nested_attention import install
from nested_attention_eval.toy_upper_bound import KINDS, UpperBound, tune_tokens, upper_bound
from nested_attention_toy.assets import model_path
from nested_attention_toy.grounding import word_positions
from nested_attention_toy.text_image import tokenize
from nested_attention_toy.world import Context, attribute_names, scene_prompt


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
    for kind in KINDS:
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
    (tmp_path / "file").write_text("")
    assert main(["--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a toy build's pipeline folder" in err and len(err.splitlines()) == 1


def test_scene_bound_tunes_one_token_set_per_word_and_scores_both_subjects(tmp_path):
    """``--domain scene`` at a tiny size: one set of nested tokens per subject word, each subject scored among its
    own domain's gallery in its own half of the scene; ``<kind>_top1`` is both at once, so it never exceeds either
    subject's. The real renders of the fresh scenes are retrieved (each half holds its subject as large as alone; the
    build's check scores the identity networks on such halves among 50, here among 3), and the pipeline comes back
    as it was. The sample sheet holds a row of both input views and a row per kind, two scenes twice as wide each."""
    pipe = StableDiffusionPipeline.from_pretrained(model_path("toy"), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    processors = dict(pipe.unet.attn_processors)
    config = UpperBound(domain="scene", tune="tokens", identities=3, subjects=1, renders=8, steps=3, batch_size=4,
                        generations=2, sample_steps=2, tokens=4)
    (result,) = upper_bound(pipe, config, log=lambda line: None, out=tmp_path)
    assert all(type(p) is type(processors[name]) for name, p in pipe.unet.attn_processors.items())
    assert Image.open(tmp_path / "subject-0.png").size == (2 + 130 * 2, 2 + 66 * (1 + len(KINDS)))
    for kind in KINDS:
        assert result[f"{kind}_top1"] <= min(result[f"{kind}_person_top1"], result[f"{kind}_pet_top1"])
        assert set(result[f"{kind}_attributes"]) == set(attribute_names("person")) | set(attribute_names("pet"))
    assert result["real_top1"] == 1.0


def test_scene_tokens_start_at_their_own_words_and_both_learn():
    """`tune_tokens` with two words keeps a token set per word: each starts at its own word's value (a layer's
    value projection of that word's state, plus noise of sd 0.01, so within 0.06 of it) and the diffusion loss
    moves both sets, since both words are bound in every caption."""
    pipe = StableDiffusionPipeline.from_pretrained(model_path("toy"), torch_dtype=torch.float32)
    unet = pipe.unet.requires_grad_(False)
    controller = install(unet)
    try:
        captions = [scene_prompt("person", "pet", Context((0, 0, 0, 0)))] * 2
        states = pipe.text_encoder(tokenize(pipe.tokenizer, captions)).last_hidden_state.detach()
        positions = [word_positions(pipe.tokenizer, captions, [w] * 2) for w in ("person", "pet")]
        latents = torch.zeros(2, 4, 16, 16)
        learned = {}
        for lr in (0.0, 1e-2):
            config = UpperBound(domain="scene", tune="tokens", steps=2, batch_size=2, tokens=3, token_lr=lr)
            learned[lr], _ = tune_tokens(unet, controller, latents, torch.ones_like(latents), 1.0, states, positions,
                                         config, seed=0)
    finally:
        controller.uninstall()
    for path, layer in controller.layers.items():
        attention = unet.get_submodule(path)
        for w, where in enumerate(positions):
            own = attention.to_v(states[0, where[0]]).view(1, layer.heads, 1, layer.head_dim)
            start, after = learned[0.0][w][path][1], learned[1e-2][w][path][1]
            assert start.shape[2] == 3 and (start - own).abs().max() < 0.06
            assert not torch.equal(start, after)
