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
    """Train a tiny UNet; returns it, its losses and the text states it was fed at each step."""
    torch.manual_seed(1)
    unet = make_unet(D, widths=(16, 32), sample_size=8)
    fed = []
    forward = unet.forward

    def recording(sample, timestep, encoder_hidden_states, *args, **kwargs):
        fed.append(encoder_hidden_states.detach().clone())
        return forward(sample, timestep, encoder_hidden_states, *args, **kwargs)

    unet.forward = recording
    ema, losses = train_unet(unet, latents, torch.zeros_like(latents), 1.0, states, null_state, steps=6, batch_size=4,
                             lr=1e-3, caption_dropout=0.5, ema_decay=0.9, seed=0, text=text)
    return ema, losses, fed


def test_a_text_encoder_at_lr_zero_reproduces_the_precomputed_states_path():
    """Same seed, same data: running the (unchanging) encoder inside the loop, caption dropout through the empty
    prompt's ids, feeds the UNet the states that the precomputed path feeds it, step by step.

    The two paths run the encoder on different batches (all captions at once vs each step's), so the states agree
    to float32 rounding (about 1e-6 relative on some CPUs), not bit for bit; AdamW turns such differences into
    weight differences of up to its learning rate, so the weights are not compared. What is compared: the states
    (rtol 1e-4, atol 1e-5: a hundred times the rounding, a million times smaller than a wrong caption's states),
    and the mean loss of the six steps (rtol 1e-3: rounding-level weight differences move it by far less)."""
    encoder, ids, null_ids, latents = _setup()
    with torch.no_grad():
        states = encoder(ids).last_hidden_state
        null_state = encoder(null_ids[None]).last_hidden_state[0]
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    _, reference_losses, reference_fed = _train(latents, states, null_state)
    _, joint_losses, joint_fed = _train(latents, None, None, TextTraining(encoder, ids, null_ids, lr=0.0))
    assert len(reference_fed) == len(joint_fed) == 6
    for step, (a, b) in enumerate(zip(reference_fed, joint_fed)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=f"states fed at step {step}")
    torch.testing.assert_close(torch.tensor(joint_losses), torch.tensor(reference_losses), rtol=1e-3, atol=0)
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())


def test_a_trained_text_encoder_learns_and_is_left_with_its_ema_weights():
    encoder, ids, null_ids, latents = _setup()
    before = [p.clone() for p in encoder.parameters()]
    _train(latents, None, None, TextTraining(encoder, ids, null_ids, lr=1e-2))
    moved = [not torch.equal(a, b) for a, b in zip(before, encoder.parameters())]
    assert sum(moved) > len(moved) // 2  # the embeddings and layers it uses all move
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
