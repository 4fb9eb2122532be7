"""How much of everything a toy build trains: ``BuildSize``. ``FULL`` is what ships; ``SMOKE`` runs the same path at
tiny sizes in seconds. ``nested-attention toy build field=value`` changes any field (recorded in build.json)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BuildSize:
    corpus: int  # renders of train identities the CLIP, the VAE and the UNet train on
    metric_train: int  # renders the factor classifier trains on
    metric_epochs: int
    identity_train: int  # renders each domain's identity network trains on
    identity_epochs: int
    clip_steps: int
    vae_steps: int
    unet_steps: int
    eval_renders: int  # held-out renders that score the metric models and the VAE
    eval_generations: int  # base-model generations that score prompt following
    eval_identities: int  # held-out identities of the metric models' retrieval test
    unet_batch: int = 32
    vae_batch: int = 16
    unet_lr: float = 4e-4
    sample_steps: int = 20
    guidance_scale: float = 5.0
    unet_widths: tuple[int, ...] = (32, 64, 128)
    clip_width: int = 128
    clip_batch: int = 256
    vae_width: int = 32
    identity_width: int = 48
    # largest blur (pixels) of the identity networks' training augmentation (metric_models.random_blur); 0: none
    identity_blur: float = 0.0
    # weight of the word-grounding loss (grounding.py): the subject word's attention on the subject's pixels. Nested
    # attention writes into that word's value, which reaches only the pixels that attend to it
    grounding_weight: float = 0.1
    # the attention of a head inside the subject's pixels above which the grounding loss stops pulling: below 1 it
    # leaves lambda room to raise the word's attention (grounding.lambda_headroom); 1 pulls every head all the way
    grounding_target: float = 0.5
    # fraction of target and input captions that also name a few of the subject's attributes before the subject word
    # (world.described_caption), as real captions do
    describe_rate: float = 0.5
    # learning rate of the pipeline's text encoder (it starts as CLIP's text tower) trained with the UNet; 0 keeps it
    # frozen (CLIP's contrastive training keeps only the words its small vision tower could tell apart)
    text_lr: float = 1e-4
    # weight of the same grounding loss on the expression word and its emotion symbol's pixels (0: not grounded)
    expression_grounding_weight: float = 0.05
    # extra weight of the emotion symbol's and the subject's pixels in the VAE's reconstruction loss (0: plain L1 + MSE)
    vae_symbol_weight: float = 16.0
    vae_subject_weight: float = 1.0
    # person + pet scenes (twice as wide as tall) the UNet also trains on: every scene_every-th step is a batch of
    # unet_batch // 2 of them (as many pixels as a batch of the corpus) instead of one of the corpus; 0 scenes: none
    scenes: int = 6000
    scene_every: int = 4
    # the UNet stage saves its whole training state this often (steps) for `toy build --resume`; it does not change
    # what is trained
    unet_checkpoint_every: int = 400
    # the adapters (adapter_stages.py): triplets per domain, optimizer steps, and the batch (None: the recipe's)
    adapter_triplets: int = 40000
    adapter_steps: int = 2200
    adapter_batch: int | None = None
    # their evaluation (toy eval, seed 0): held-out subjects per domain and person + pet images
    adapter_eval_identities: int = 20
    adapter_eval_scenes: int = 20


FULL = BuildSize(corpus=30000, metric_train=12000, metric_epochs=4, identity_train=12000, identity_epochs=5,
                 clip_steps=160, vae_steps=4000, unet_steps=7000, eval_renders=500, eval_generations=100, eval_identities=50)
SMOKE = BuildSize(corpus=300, metric_train=200, metric_epochs=1, identity_train=100, identity_epochs=1,
                  clip_steps=10, clip_batch=32, vae_steps=10, unet_steps=10, eval_renders=32, eval_generations=8,
                  eval_identities=10, sample_steps=4, unet_batch=8, unet_checkpoint_every=4, unet_widths=(16, 32), scenes=32,
                  clip_width=64, vae_width=16, identity_width=16, adapter_triplets=8, adapter_steps=4, adapter_batch=4,
                  adapter_eval_identities=2, adapter_eval_scenes=2)
