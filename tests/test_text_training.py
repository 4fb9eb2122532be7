"""The toy build's text encoder trained with the UNet (diffusion.TextTraining)."""

from __future__ import annotations

import torch
from transformers import CLIPTextConfig, CLIPTextModel

from nested_attention_toy.diffusion import TextTraining, make_unet, train_unet

N, L, D = 12, 6, 32


def _setup():
    torch.manual_seed(0)
    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=50, hidden_size=D, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, max_position_embeddings=L)).eval()
    ids = torch.randint(0, 50, (N, L))
    null_ids = torch.randint(0, 50, (L,))
    latents = torch.randn(N, 4, 8, 8)
    return encoder, ids, null_ids, latents


def _train(latents, states, null_state, text=None):
    torch.manual_seed(1)
    unet = make_unet(D, widths=(16, 32), sample_size=8)
    ema, losses = train_unet(unet, latents, torch.zeros_like(latents), 1.0, states, null_state, steps=6, batch_size=4,
                             lr=1e-3, caption_dropout=0.5, ema_decay=0.9, seed=0, text=text)
    return ema, losses


def test_a_text_encoder_at_lr_zero_reproduces_the_precomputed_states_path():
    """Same seed, same data: running the (unchanging) encoder inside the loop, caption dropout through the empty
    prompt's ids, gives the UNet that precomputed states give."""
    encoder, ids, null_ids, latents = _setup()
    with torch.no_grad():
        states = encoder(ids).last_hidden_state
        null_state = encoder(null_ids[None]).last_hidden_state[0]
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    reference, reference_losses = _train(latents, states, null_state)
    joint, joint_losses = _train(latents, None, None, TextTraining(encoder, ids, null_ids, lr=0.0))
    for (name, a), b in zip(reference.state_dict().items(), joint.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(torch.tensor(reference_losses), torch.tensor(joint_losses))
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())


def test_a_trained_text_encoder_learns_and_is_left_with_its_ema_weights():
    encoder, ids, null_ids, latents = _setup()
    before = [p.clone() for p in encoder.parameters()]
    _train(latents, None, None, TextTraining(encoder, ids, null_ids, lr=1e-2))
    moved = [not torch.equal(a, b) for a, b in zip(before, encoder.parameters())]
    assert sum(moved) > len(moved) // 2  # the embeddings and layers it uses all move
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
