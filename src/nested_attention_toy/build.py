"""`nested-attention toy build`: rebuild the toy world's whole model stack from scratch, stage by stage.

Stages (each logs one line and its wall time; a progress bar while it runs):

1. tokenizer: CLIP-format BPE for the world's vocabulary;
2. corpus: renders of train identities with their captions (targets, input views, person + pet scenes);
3. metrics: factor classifier and identity networks (own renders, train identities), measured on held-out ones;
4. clip: a tiny `CLIPModel`, trained contrastively on the corpus;
5. vae: a small `AutoencoderKL`;
6. unet: a `UNet2DConditionModel` trained text-to-image on the corpus latents, with the pipeline's text encoder
   (it starts as CLIP's text tower) trained along;
7. pipeline: the standard `StableDiffusionPipeline` folder (plus `image_encoder` / `feature_extractor`);
8. evaluate: VAE PSNR, CLIP zero-shot factor accuracy and base-model prompt-factor accuracy on held-out
   identities, and a sample sheet.

Output folder: ``pipeline/`` (loads with ``StableDiffusionPipeline.from_pretrained``), ``clip/`` (the whole CLIP),
``metrics/`` (metric models), ``build.json`` (command, seed, versions, sizes, timings, measurements) and
``samples.png``. Weights are fp16 safetensors.
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

BUILD_SEED = 0


@dataclass(frozen=True)
class BuildSize:
    """How much of everything a build trains; ``FULL`` is what ships, ``SMOKE`` runs the same path in a minute."""

    corpus: int
    metric_train: int
    metric_epochs: int
    identity_train: int
    identity_epochs: int
    clip_steps: int
    vae_steps: int
    unet_steps: int
    eval_renders: int
    eval_generations: int
    eval_identities: int
    unet_batch: int = 32
    vae_batch: int = 16
    unet_lr: float = 4e-4
    sample_steps: int = 20
    guidance_scale: float = 5.0
    unet_widths: tuple[int, ...] = (32, 64, 128)
    clip_width: int = 128
    vae_width: int = 32
    identity_width: int = 48
    # largest blur (pixels) of the identity networks' training augmentation (metric_models.random_blur); 0: none. At 3
    # they retrieve blurred renders and VAE round trips much better and crisp ones a little worse, and the shipped
    # adapters' `id_top1` barely moves (docs/toyworld.md, "Why identity stays low")
    identity_blur: float = 0.0
    # word grounding loss on the UNet (grounding.py); 0 trains without it. Without it the subject word gets 0.1-3.5 %
    # of a pixel's attention, too little for nested attention (docs/toyworld.md)
    grounding_weight: float = 0.1
    # fraction of target and input captions that also name a few of the subject's attributes before the subject word
    # (world.described_caption). Without them (the first build) the UNet cannot be steered toward an identity through
    # the subject word at all, not even by textual inversion (docs/toyworld.md)
    describe_rate: float = 0.5
    # learning rate of the pipeline's text encoder (it starts as CLIP's text tower) trained with the UNet; 0 keeps it
    # frozen. Frozen, CLIP's contrastive training has squashed the position and expression words (text_gain.py) and
    # the base model draws the prompted position in 45 % of generations (docs/toyworld.md)
    text_lr: float = 1e-4
    # weight of the same loss on the expression word and the emotion symbol's pixels (0: not grounded). Not grounded
    # the base model draws the prompted expression in 23 % of generations and style in 89 %; at 0.05, 55 % and 83 %;
    # at the subject word's 0.1, 53 % and 80 % (docs/toyworld.md)
    expression_grounding_weight: float = 0.05
    # extra weight of the emotion symbol's and the subject's pixels in the VAE's reconstruction loss (0: plain L1 +
    # MSE). Plain, the latents keep the symbol in 64 % of held-out renders (the factor classifier reads the expression
    # of their reconstructions); at 16 and 1, in 85-86 % with the thin anger vein, 96 % with the filled burst that
    # replaced it (docs/toyworld.md)
    vae_symbol_weight: float = 16.0
    vae_subject_weight: float = 1.0
    # the UNet stage saves its whole training state this often (steps) for `toy build --resume`; it does not change
    # what is trained
    unet_checkpoint_every: int = 400


FULL = BuildSize(corpus=60000, metric_train=40000, metric_epochs=8, identity_train=30000, identity_epochs=7,
                 clip_steps=320, vae_steps=6000, unet_steps=7600, eval_renders=2000, eval_generations=400, eval_identities=50)
SMOKE = BuildSize(corpus=600, metric_train=400, metric_epochs=1, identity_train=200, identity_epochs=1,
                  clip_steps=10, vae_steps=10, unet_steps=10, eval_renders=64, eval_generations=8, eval_identities=10, sample_steps=4, unet_checkpoint_every=4,
                  unet_widths=(16, 32), clip_width=64, vae_width=16, identity_width=16)


class _Log:
    def __init__(self, path: Path):
        self.file = path.open("a")

    def __call__(self, message: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {message}"
        tqdm.write(line)
        self.file.write(line + "\n")
        self.file.flush()


def _versions() -> dict:
    import diffusers
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__, "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}


def _bar(total: int, desc: str):
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


REUSABLE = ("metrics", "vae")


def missing_for_reuse(folder: Path, parts: tuple[str, ...] = REUSABLE) -> list[str]:
    """What ``build(reuse=folder, reuse_parts=parts)`` needs and ``folder`` lacks (empty: it can be reused)."""
    needed = ["build.json"] + [{"metrics": "metrics", "vae": "pipeline/vae"}[part] for part in parts]
    return [part for part in needed if not (folder / part).exists()]


PARTIAL = "build.partial.json"  # the record of a build that has not finished: what --resume continues
CHECKPOINT = "unet-checkpoint"  # the UNet stage's training state while it runs (resume.py)


def can_resume(folder: Path) -> str | None:
    """Why ``build(folder, resume=True)`` cannot go on (None: it can)."""
    if (folder / "build.json").is_file():
        return f"{folder} holds a finished build (build.json); there is nothing to resume."
    if not (folder / PARTIAL).is_file():
        return f"{folder} holds no interrupted build ({PARTIAL}); start one with --out {folder} (no --resume)."
    return None


def build(out: str | Path, size: BuildSize = FULL, seed: int = BUILD_SEED, device: str = "cpu", workers: int = 2,
          command: str | None = None, reuse: str | Path | None = None, reuse_parts: tuple[str, ...] = REUSABLE,
          resume: bool = False) -> dict:
    """Run every stage into ``out`` (created; must be empty or absent). Returns the build record (build.json).

    ``reuse``: an earlier build's folder whose metric models and VAE are copied instead of trained (they never see a
    caption, so a build that changes only the text side need not retrain them: about 28 minutes on 2 CPU cores);
    ``reuse_parts`` names which of the two (``REUSABLE``) it copies.

    ``resume``: go on with the interrupted build in ``out`` (its own size, seed and reuse; ``size``, ``seed``,
    ``reuse`` and ``reuse_parts`` are ignored). Finished stages are kept, an unfinished one runs again, and the UNet
    stage, which saves its whole training state every ``size.unet_checkpoint_every`` steps, goes on from the last
    save: the result is what the uninterrupted build gives (bit for bit on a CPU)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPModel, CLIPTextModel, CLIPVisionModelWithProjection

    from nested_attention.tiny import write_clip_tokenizer

    from .autoencoder import encode_latents, make_vae, train_vae
    from .build_metrics import build_metric_models
    from .corpus import make_corpus
    from .diffusion import Grounding, TextTraining, make_unet, sampling_scheduler, train_unet
    from .evaluate_base import evaluate_stack
    from .resume import saved_progress
    from .text_image import clip_config, clip_processor, tokenize, train_clip
    from .world import vocabulary

    out = Path(out)
    if resume:
        problem = can_resume(out)
        if problem:
            raise FileNotFoundError(problem)
        record = json.loads((out / PARTIAL).read_text())
        size = BuildSize(**{k: tuple(v) if isinstance(v, list) else v for k, v in record["size"].items()})
        seed = record["seed"]
        reuse = Path(record["reused"]["from"]) if "reused" in record else None
        reuse_parts = tuple(record["reused"]["parts"]) if reuse is not None else REUSABLE
    unknown = set(reuse_parts) - set(REUSABLE)
    if unknown:
        raise ValueError(f"reuse_parts can name {', '.join(REUSABLE)}; got {', '.join(sorted(unknown))}")
    if reuse is not None:
        reuse = Path(reuse)
    if reuse is not None and resume:  # a resumed build needs the folder only for what it has not copied yet
        reuse_parts = tuple(part for part in reuse_parts if part not in record["stages"])
    if reuse is not None and reuse_parts:
        missing = missing_for_reuse(reuse, reuse_parts)
        if missing:
            raise FileNotFoundError(f"--reuse needs an earlier build folder; {reuse} has no {', '.join(missing)}.")
    if not resume and out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty; give a new folder to --out (a build never overwrites files).")
    out.mkdir(parents=True, exist_ok=True)
    log = _Log(out / "build.log")
    if resume:
        finished = ", ".join(record["stages"]) or "none"
        record.setdefault("resumed", []).append({"command": command or " ".join(sys.argv), "device": device,
                                                 "versions": _versions(), "stages_done": list(record["stages"])})
        log(f"resuming the build in {out}; stages done: {finished}")
    else:
        record = {"command": command or " ".join(sys.argv), "seed": seed, "device": device, "size": asdict(size),
                  "versions": _versions(), "stages": {}, "measurements": {}}
        if reuse is not None:
            earlier = json.loads((reuse / "build.json").read_text())
            record["reused"] = {"from": str(reuse), "parts": list(reuse_parts),
                                "build": {k: earlier.get(k) for k in ("command", "seed", "versions", "size")}}
    started = time.perf_counter()
    # the seconds of finished work that earlier runs of an interrupted build did (stages, and UNet training saved)
    carried = sum(s["seconds"] for s in record["stages"].values())

    def done(name: str) -> bool:
        return name in record["stages"]

    def stage(name: str, seconds: float, **info) -> None:
        record["stages"][name] = {"seconds": round(seconds, 1), **info}
        log(f"{name}: {seconds:.1f} s {json.dumps(info) if info else ''}")
        (out / PARTIAL).write_text(json.dumps(record, indent=2) + "\n")

    t = time.perf_counter()
    tokenizer = write_clip_tokenizer(out / "pipeline" / "tokenizer", vocabulary(), max_length=32)
    if not done("tokenizer"):
        stage("tokenizer", time.perf_counter() - t, vocabulary=len(vocabulary()), tokens=len(tokenizer))

    corpus = None
    if not all(done(name) for name in ("clip", "vae", "unet")):
        t = time.perf_counter()
        symbols = (size.grounding_weight > 0 and size.expression_grounding_weight > 0) or size.vae_symbol_weight > 0
        corpus = make_corpus(size.corpus, seed=seed, held_out=False, workers=workers, desc="corpus",
                             masks=size.grounding_weight > 0 or size.vae_subject_weight > 0 or symbols,
                             describe_rate=size.describe_rate, symbols=symbols)
        if not done("corpus"):
            stage("corpus", time.perf_counter() - t, images=len(corpus),
                  kinds={k: corpus.kinds.count(k) for k in ("target", "input", "scene")})
        else:
            log(f"corpus: rendered again in {time.perf_counter() - t:.1f} s")

    if not done("metrics"):
        t = time.perf_counter()
        shutil.rmtree(out / "metrics", ignore_errors=True)  # what an interrupted run left
        if reuse is not None and "metrics" in reuse_parts:
            shutil.copytree(reuse / "metrics", out / "metrics")
            metrics = json.loads((reuse / "build.json").read_text())["measurements"]["metric_models"]
            log(f"metrics: copied from {reuse}")
        else:
            metrics = build_metric_models(out / "metrics", train_count=size.metric_train, epochs=size.metric_epochs,
                                          seed=seed + 100, workers=workers, eval_identities=size.eval_identities,
                                          identity_width=size.identity_width, device=device, test_count=size.eval_renders,
                                          queries_per_identity=10 if size.eval_renders >= 1000 else 2,
                                          identity_count=size.identity_train, identity_epochs=size.identity_epochs,
                                          identity_blur=size.identity_blur, log=log)
        record["measurements"]["metric_models"] = {k: v for k, v in metrics.items() if not k.endswith("losses")}
        stage("metrics", time.perf_counter() - t)

    if not done("clip"):
        t = time.perf_counter()
        torch.manual_seed(seed + 200)
        clip = CLIPModel(clip_config(tokenizer, width=size.clip_width))
        with _bar(size.clip_steps, "clip") as bar:
            clip_losses = train_clip(clip, tokenizer, corpus.images, corpus.captions, size.clip_steps, seed=seed + 200,
                                     device=device, progress=bar)
        clip.half().save_pretrained(out / "clip")
        tokenizer.save_pretrained(out / "clip")
        clip_processor().save_pretrained(out / "clip")
        stage("clip", time.perf_counter() - t, parameters=_count(clip), loss_first=clip_losses[0], loss_last=clip_losses[-1])
        del clip

    t = time.perf_counter()
    if done("vae") or (reuse is not None and "vae" in reuse_parts):
        source = out if done("vae") else reuse
        loaded = AutoencoderKL.from_pretrained(source / "pipeline" / "vae", torch_dtype=torch.float32)
        # a fresh config: the shipped one must not name this machine's path (from_pretrained adds _name_or_path)
        vae = AutoencoderKL.from_config({k: v for k, v in loaded.config.items() if not k.startswith("_")})
        vae.load_state_dict(loaded.state_dict())
        scaling_factor = float(vae.config.scaling_factor)
        if not done("unet"):
            means, stds = encode_latents(vae, corpus.images)
        if not done("vae"):
            vae.to(torch.float16).save_pretrained(out / "pipeline" / "vae")
            vae.float()
            stage("vae", time.perf_counter() - t, parameters=_count(vae), copied_from=str(reuse),
                  scaling_factor=scaling_factor)
    else:
        torch.manual_seed(seed + 300)
        vae = make_vae(size.vae_width)
        with _bar(size.vae_steps, "vae") as bar:
            weights = tuple((coverage, w) for coverage, w in ((corpus.symbols, size.vae_symbol_weight),
                                                               (corpus.masks, size.vae_subject_weight)) if w > 0)
            vae_losses = train_vae(vae, corpus.images, size.vae_steps, batch_size=size.vae_batch, seed=seed + 300,
                                   device=device, progress=bar, weights=weights)
        vae.half().float()  # the weights as shipped (fp16), so that a --reuse build's latents are these exactly
        means, stds = encode_latents(vae, corpus.images)
        scaling_factor = float(1.0 / means.flatten().std())
        vae.register_to_config(scaling_factor=scaling_factor)
        vae.to(torch.float16).save_pretrained(out / "pipeline" / "vae")
        vae.float()
        stage("vae", time.perf_counter() - t, parameters=_count(vae), loss_first=vae_losses[0], loss_last=vae_losses[-1],
              scaling_factor=scaling_factor)

    if done("unet"):
        # kept by the finished stage: the EMA UNet (fp16, as shipped) and the trained text encoder
        unet = UNet2DConditionModel.from_pretrained(out / "pipeline" / "unet", torch_dtype=torch.float32)
        text_encoder = CLIPTextModel.from_pretrained(out / "pipeline" / "text_encoder", torch_dtype=torch.float32).eval()
    else:
        t = time.perf_counter()
        step_before, seconds_before = saved_progress(out / CHECKPOINT)
        carried += seconds_before
        if step_before:
            log(f"unet: going on from the training state saved at step {step_before} of {size.unet_steps}")
        # the towers exactly as shipped (fp16 weights), loaded the way any CLIP checkpoint's towers load
        text_encoder = CLIPTextModel.from_pretrained(out / "clip", torch_dtype=torch.float32).eval()
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
                                               expression_weight=size.expression_grounding_weight)
        torch.manual_seed(seed + 400)
        unet = make_unet(text_encoder.config.hidden_size, size.unet_widths)
        with _bar(size.unet_steps, "unet") as bar:
            unet, unet_losses = train_unet(unet, means.half(), stds.half(), scaling_factor, states, null_state,
                                           size.unet_steps, batch_size=size.unet_batch, lr=size.unet_lr, seed=seed + 400,
                                           device=device, progress=bar, grounding=grounding, text=text,
                                           checkpoint=out / CHECKPOINT, checkpoint_every=size.unet_checkpoint_every)
        unet.to(torch.float16).save_pretrained(out / "pipeline" / "unet")
        unet.float()
        text_encoder.to(torch.float32).save_pretrained(out / "pipeline" / "text_encoder")
        info = {"parameters": _count(unet), "loss_first": unet_losses[0], "loss_last": unet_losses[-1]}
        if step_before:
            info["resumed_at_step"] = step_before
        stage("unet", seconds_before + time.perf_counter() - t, **info)
        shutil.rmtree(out / CHECKPOINT)
    del corpus

    if not done("pipeline"):
        t = time.perf_counter()
        image_encoder = CLIPVisionModelWithProjection.from_pretrained(out / "clip", torch_dtype=torch.float32)
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=sampling_scheduler(),
            safety_checker=None, feature_extractor=clip_processor(), image_encoder=image_encoder.eval(),
            requires_safety_checker=False,
        )
        pipe.to(torch.float16).save_pretrained(out / "pipeline")
        # diffusers upcasts its fp16 weights to fp32 on a plain from_pretrained(), transformers 5 keeps them fp16: the
        # text encoder (its values are fp16 already, so nothing changes) is stored in fp32 for a plain load to run
        text_encoder.to(torch.float32).save_pretrained(out / "pipeline" / "text_encoder")
        stage("pipeline", time.perf_counter() - t)
    del vae, unet, text_encoder

    t = time.perf_counter()
    record["measurements"]["stack"] = evaluate_stack(out, size, seed=seed + 500, workers=workers, device=device, log=log)
    stage("evaluate", time.perf_counter() - t)

    record["seconds"] = round(carried + time.perf_counter() - started, 1)
    record["bytes"] = {part: _bytes(out / part) for part in ("pipeline", "clip", "metrics")}
    record["bytes"]["total"] = sum(record["bytes"].values())
    (out / "build.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / PARTIAL).unlink()
    log(f"done in {record['seconds'] / 60:.1f} min; {record['bytes']['total'] / 2**20:.1f} MiB of weights in {out}")
    return record


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
