"""The stages of a toy build, each a function of the build's ``Parts`` that writes its files and returns what the
record keeps of it. ``Parts`` gives every stage what earlier stages made, from memory or, after an interruption,
from their files (the corpus is rendered again when a later stage needs it), so any stage can run after any
interruption and gives what it gives in one go."""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from tqdm.auto import tqdm
from transformers import CLIPTextModel

from nested_attention.tiny import write_clip_tokenizer

from .autoencoder import encode_latents, make_vae, train_vae
from .build_metrics import build_metric_models
from .corpus import Corpus, make_corpus, make_scenes
from .diffusion import Grounding, SceneBatches, TextTraining, make_unet, sampling_scheduler, train_unet
from .evaluate_base import evaluate_stack
from .recipe import BuildSize
from .resume import saved_progress
from .text_image import clip_config, clip_processor, tokenize, train_clip
from .world import vocabulary

CHECKPOINT = "unet-checkpoint"  # the UNet stage's training state while it runs (resume.py)
REUSABLE = ("metrics", "vae")  # what a build can copy from an earlier one: neither ever sees a caption


def _bar(total: int, desc: str):
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _fresh(cls, folder: Path):
    """A diffusers model loaded in fp32 with a fresh config: what it saves must not name this machine's path
    (``from_pretrained`` adds ``_name_or_path``)."""
    loaded = cls.from_pretrained(folder, torch_dtype=torch.float32)
    model = cls.from_config({k: v for k, v in loaded.config.items() if not k.startswith("_")})
    model.load_state_dict(loaded.state_dict())
    return model


@dataclass
class Parts:
    """One build's settings and, lazily, what its stages made."""

    out: Path
    size: BuildSize
    seed: int
    device: str
    workers: int
    log: Callable[[str], None]
    reuse: Path | None = None
    reuse_parts: tuple[str, ...] = ()

    @functools.cached_property
    def tokenizer(self):
        return write_clip_tokenizer(self.out / "pipeline" / "tokenizer", vocabulary(), max_length=32)

    @functools.cached_property
    def corpus(self) -> Corpus:
        size = self.size
        symbols = (size.grounding_weight > 0 and size.expression_grounding_weight > 0) or size.vae_symbol_weight > 0
        return make_corpus(size.corpus, seed=self.seed, held_out=False, workers=self.workers, desc="corpus",
                           masks=size.grounding_weight > 0 or size.vae_subject_weight > 0 or symbols,
                           describe_rate=size.describe_rate, symbols=symbols)

    @functools.cached_property
    def scenes(self) -> Corpus:
        """The person + pet scenes the UNet also trains on (twice as wide), with both subjects' coverage."""
        return make_scenes(self.size.scenes, seed=self.seed, held_out=False, workers=self.workers, desc="scenes",
                           masks=self.size.grounding_weight > 0)

    def vae(self):
        """The VAE as shipped (fp16 weights), in fp32."""
        return _fresh(AutoencoderKL, self.out / "pipeline" / "vae")

    @functools.cached_property
    def latents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The corpus's posterior means and standard deviations under the shipped VAE."""
        return encode_latents(self.vae(), self.corpus.images)

    @functools.cached_property
    def scene_latents(self) -> tuple[torch.Tensor, torch.Tensor]:
        return encode_latents(self.vae(), self.scenes.images)


def tokenizer_stage(parts: Parts) -> dict:
    return {"vocabulary": len(vocabulary()), "tokens": len(parts.tokenizer)}


def corpus_stage(parts: Parts) -> dict:
    corpus = parts.corpus
    return {"images": len(corpus), "kinds": {k: corpus.kinds.count(k) for k in ("target", "input")},
            "scenes": len(parts.scenes)}


def metrics_stage(parts: Parts) -> dict:
    size, out = parts.size, parts.out
    shutil.rmtree(out / "metrics", ignore_errors=True)  # what an interrupted run left
    if "metrics" in parts.reuse_parts:
        shutil.copytree(parts.reuse / "metrics", out / "metrics")
        parts.log(f"metrics: copied from {parts.reuse}")
        return {"measured": json.loads((parts.reuse / "build.json").read_text())["measurements"]["metric_models"]}
    metrics = build_metric_models(out / "metrics", train_count=size.metric_train, epochs=size.metric_epochs,
                                  seed=parts.seed + 100, workers=parts.workers, eval_identities=size.eval_identities,
                                  identity_width=size.identity_width, device=parts.device, test_count=size.eval_renders,
                                  queries_per_identity=10 if size.eval_renders >= 1000 else 2,
                                  identity_count=size.identity_train, identity_epochs=size.identity_epochs,
                                  identity_blur=size.identity_blur, log=parts.log)
    return {"measured": {k: v for k, v in metrics.items() if not k.endswith("losses")}}


def clip_stage(parts: Parts) -> dict:
    from transformers import CLIPModel

    size, out = parts.size, parts.out
    torch.manual_seed(parts.seed + 200)
    clip = CLIPModel(clip_config(parts.tokenizer, width=size.clip_width))
    with _bar(size.clip_steps, "clip") as bar:
        losses = train_clip(clip, parts.tokenizer, parts.corpus.images, parts.corpus.captions, size.clip_steps,
                            batch_size=size.clip_batch, seed=parts.seed + 200, device=parts.device, progress=bar)
    clip.half().save_pretrained(out / "clip")
    parts.tokenizer.save_pretrained(out / "clip")
    clip_processor().save_pretrained(out / "clip")
    return {"parameters": _count(clip), "loss_first": losses[0], "loss_last": losses[-1]}


def vae_stage(parts: Parts) -> dict:
    size, folder = parts.size, parts.out / "pipeline" / "vae"
    if "vae" in parts.reuse_parts:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(parts.reuse / "pipeline" / "vae", folder)
        vae = parts.vae()
        vae.to(torch.float16).save_pretrained(folder)  # written again without the earlier build's provenance
        return {"parameters": _count(vae), "copied_from": str(parts.reuse), "scaling_factor": float(vae.config.scaling_factor)}
    torch.manual_seed(parts.seed + 300)
    vae = make_vae(size.vae_width)
    corpus = parts.corpus
    weights = tuple((coverage, w) for coverage, w in ((corpus.symbols, size.vae_symbol_weight),
                                                       (corpus.masks, size.vae_subject_weight)) if w > 0)
    with _bar(size.vae_steps, "vae") as bar:
        losses = train_vae(vae, corpus.images, size.vae_steps, batch_size=size.vae_batch, seed=parts.seed + 300,
                           device=parts.device, progress=bar, weights=weights)
    vae.half().float()  # the weights as shipped (fp16): the latents the UNet trains on are the shipped VAE's
    means, stds = encode_latents(vae, corpus.images)
    scaling_factor = float(1.0 / means.flatten().std())
    vae.register_to_config(scaling_factor=scaling_factor)
    vae.to(torch.float16).save_pretrained(folder)
    parts.latents = (means, stds)
    return {"parameters": _count(vae), "loss_first": losses[0], "loss_last": losses[-1], "scaling_factor": scaling_factor}


def unet_stage(parts: Parts) -> dict:
    size, out = parts.size, parts.out
    step_before, seconds_before = saved_progress(out / CHECKPOINT)
    if step_before:
        parts.log(f"unet: going on from the training state saved at step {step_before} of {size.unet_steps}")
    # the text tower exactly as shipped (fp16 weights), loaded the way any CLIP checkpoint's towers load
    text_encoder = CLIPTextModel.from_pretrained(out / "clip", torch_dtype=torch.float32).eval()
    corpus, tokenizer = parts.corpus, parts.tokenizer
    ids, null_ids = tokenize(tokenizer, corpus.captions), tokenize(tokenizer, [""])
    text, states, null_state = None, None, None
    if size.text_lr > 0:
        text = TextTraining(text_encoder, ids, null_ids[0], size.text_lr)
    else:
        with torch.no_grad():
            states = torch.cat([text_encoder(ids[i : i + 512]).last_hidden_state.half() for i in range(0, len(ids), 512)])
            null_state = text_encoder(null_ids).last_hidden_state[0]
    grounding = None
    if size.grounding_weight > 0:
        grounding = Grounding.from_corpus(tokenizer, corpus, size.grounding_weight,
                                          expression_weight=size.expression_grounding_weight, target=size.grounding_target)
    scenes = None
    if size.scenes > 0:
        scene_ids = tokenize(tokenizer, parts.scenes.captions)
        if text is None:
            with torch.no_grad():
                scene_ids = torch.cat([text_encoder(scene_ids[i : i + 512]).last_hidden_state.half()
                                       for i in range(0, len(scene_ids), 512)])
        scene_means, scene_stds = parts.scene_latents
        scenes = SceneBatches(scene_means.half(), scene_stds.half(), scene_ids,
                              Grounding.from_scenes(tokenizer, parts.scenes, size.grounding_weight, size.grounding_target)
                              if size.grounding_weight > 0 else None, max(1, size.unet_batch // 2), size.scene_every)
    means, stds = parts.latents
    scaling_factor = float(parts.vae().config.scaling_factor)
    torch.manual_seed(parts.seed + 400)
    unet = make_unet(text_encoder.config.hidden_size, size.unet_widths)
    with _bar(size.unet_steps, "unet") as bar:
        unet, losses = train_unet(unet, means.half(), stds.half(), scaling_factor, states, null_state, size.unet_steps,
                                  batch_size=size.unet_batch, lr=size.unet_lr, seed=parts.seed + 400,
                                  device=parts.device, progress=bar, grounding=grounding, text=text,
                                  checkpoint=out / CHECKPOINT, checkpoint_every=size.unet_checkpoint_every,
                                  scenes=scenes)
    unet.to(torch.float16).save_pretrained(out / "pipeline" / "unet")
    text_encoder.to(torch.float32).save_pretrained(out / "pipeline" / "text_encoder")
    shutil.rmtree(out / CHECKPOINT)
    for name in ("corpus", "latents", "scenes", "scene_latents"):  # no later stage needs them: free their memory for the evaluation
        parts.__dict__.pop(name, None)
    info = {"parameters": _count(unet), "loss_first": losses[0], "loss_last": losses[-1]}
    if step_before:
        info["resumed_at_step"] = step_before
    return info | {"seconds_before": seconds_before}


def pipeline_stage(parts: Parts) -> dict:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPVisionModelWithProjection

    out = parts.out
    unet = _fresh(UNet2DConditionModel, out / "pipeline" / "unet")
    text_encoder = CLIPTextModel.from_pretrained(out / "pipeline" / "text_encoder", torch_dtype=torch.float32).eval()
    image_encoder = CLIPVisionModelWithProjection.from_pretrained(out / "clip", torch_dtype=torch.float32).eval()
    pipe = StableDiffusionPipeline(
        vae=parts.vae(), text_encoder=text_encoder, tokenizer=parts.tokenizer, unet=unet, scheduler=sampling_scheduler(),
        safety_checker=None, feature_extractor=clip_processor(), image_encoder=image_encoder, requires_safety_checker=False,
    )
    pipe.to(torch.float16).save_pretrained(out / "pipeline")
    # diffusers upcasts fp16 weights to fp32 on a plain from_pretrained(), transformers 5 keeps them fp16: the text
    # encoder (its values are fp16 already, so nothing changes) is stored in fp32 for a plain load to run
    text_encoder.to(torch.float32).save_pretrained(out / "pipeline" / "text_encoder")
    return {}


def evaluate_stage(parts: Parts) -> dict:
    return {"measured": evaluate_stack(parts.out, parts.size, seed=parts.seed + 500, workers=parts.workers,
                                       device=parts.device, log=parts.log)}


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Parts], dict]
    measurement: str | None = None  # where build.json's "measurements" keeps the stage's "measured" result


STAGES = (
    Stage("tokenizer", tokenizer_stage),
    Stage("corpus", corpus_stage),
    Stage("metrics", metrics_stage, "metric_models"),
    Stage("clip", clip_stage),
    Stage("vae", vae_stage),
    Stage("unet", unet_stage),
    Stage("pipeline", pipeline_stage),
    Stage("evaluate", evaluate_stage, "stack"),
)
