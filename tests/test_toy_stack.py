"""The toy world's model stack: tokenizer, build path, and the shipped models (plain diffusers / transformers loads,
metric models at their bars on fresh held-out renders)."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from transformers import CLIPModel, CLIPTokenizer, CLIPVisionModel

import nested_attention_toy.stages as stages_module
from nested_attention import NestedAdapter
from nested_attention.adapter import IMAGE_ENCODER_FOLDER
from nested_attention.tiny import write_clip_tokenizer
from nested_attention_toy.assets import is_shipped, model_path, shipped_path
from nested_attention_toy.autoencoder import make_vae, reconstruction_psnr, reconstructions, train_vae
from nested_attention_toy.build import PARTIAL, SMOKE, build
from nested_attention_toy.build_metrics import retrieval_sets
from nested_attention_toy.corpus import make_corpus
from nested_attention_toy.metric_models import FactorClassifier, IdentityNet, head_accuracy, retrieval_top1
from nested_attention_toy.text_image import clip_processor, pixel_values, tokenize, train_clip
from nested_attention_toy.world import (
    DOMAINS,
    SUBJECT_WORDS,
    identity_count,
    input_caption,
    prompt,
    sample_context,
    sample_identities,
    scene_prompt,
    vocabulary,
)
from test_cli import run_cli


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return write_clip_tokenizer(tmp_path_factory.mktemp("toy-tok"), vocabulary(), max_length=32)


def test_tokenizer_round_trip_through_clip_tokenizer(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert loaded.model_max_length == 32
    for word in vocabulary():  # every word of the world is a single token
        assert len(loaded(word, add_special_tokens=False).input_ids) == 1, word
    rng = np.random.default_rng(0)
    texts = [input_caption("pet")] + [
        f(sample_context(rng), rng) for _ in range(100)
        for f in (lambda c, r: prompt("person", c, r), lambda c, r: scene_prompt("woman", "dog", c, r))
    ]
    for text in texts:
        ids = loaded(text).input_ids
        assert len(ids) <= 32
        assert loaded.decode(ids, skip_special_tokens=True).replace(" ,", ",") == text
    # words outside the vocabulary still tokenize, into pieces, like with a real CLIP tokenizer
    assert len(loaded("zebra", add_special_tokens=False).input_ids) > 1


def test_clip_preprocessing_matches_its_image_processor():
    images = make_corpus(4, seed=3, workers=1).images
    processor = clip_processor()
    expected = processor([im.permute(1, 2, 0).numpy() for im in images], return_tensors="pt").pixel_values
    torch.testing.assert_close(pixel_values(images), expected, atol=1e-4, rtol=0)


def test_corpus_is_deterministic_and_respects_the_split():
    a = make_corpus(40, seed=5, workers=1)
    b = make_corpus(40, seed=5, workers=1)
    assert torch.equal(a.images, b.images) and a.captions == b.captions
    assert set(a.kinds) <= {"target", "input", "scene"}
    held = make_corpus(20, seed=5, held_out=True, workers=1, input_fraction=0)
    assert (held.factors >= 0).all() and held.kinds == ["target"] * 20


def test_clip_and_vae_learn_on_a_small_corpus(tokenizer):
    from nested_attention_toy.text_image import clip_config

    corpus = make_corpus(128, seed=1, workers=1)
    torch.manual_seed(0)
    clip = CLIPModel(clip_config(tokenizer, width=32, layers=1))
    losses = train_clip(clip, tokenizer, corpus.images, corpus.captions, steps=100, batch_size=32, lr=3e-3)
    assert losses[-1] < losses[0] - 0.3, losses
    vae = make_vae(width=16)
    before = reconstruction_psnr(vae, corpus.images[:32])
    train_vae(vae, corpus.images, steps=100, batch_size=16, lr=3e-3)
    assert reconstruction_psnr(vae, corpus.images[:32]) > before + 3


def _patch_error(vae, images, y0=8, x0=8, side=8) -> float:
    x, y = next(reconstructions(vae, images, batch_size=len(images)))
    return float((y - x)[:, :, y0 : y0 + side, x0 : x0 + side].abs().mean())


def test_vae_loss_weights_are_normalized_and_focus_on_covered_pixels():
    corpus = make_corpus(64, seed=3, workers=1)
    images = corpus.images[:, :, :32, :32].contiguous()

    def trained(weights, steps=3):
        torch.manual_seed(0)
        vae = make_vae(width=16)
        losses = train_vae(vae, images, steps=steps, batch_size=8, lr=3e-3, seed=1, weights=weights)
        return vae, losses

    # uniform coverage (none, or all) scales every pixel alike: after normalization, exactly the unweighted training
    plain, plain_losses = trained(())
    for fill in (0, 255):
        coverage = torch.full((64, 32, 32), fill, dtype=torch.uint8)
        vae, losses = trained(((coverage, 5.0),))
        assert losses == plain_losses
        for a, b in zip(vae.parameters(), plain.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # a heavily weighted 8 x 8 patch is reconstructed better than without the weight, the same seed otherwise
    patch = torch.zeros((64, 32, 32), dtype=torch.uint8)
    patch[:, 8:16, 8:16] = 255
    plain, _ = trained((), steps=80)
    focused, _ = trained(((patch, 30.0),), steps=80)
    assert _patch_error(focused, images) < 0.9 * _patch_error(plain, images)  # measured: 0.29 against 0.33
    with pytest.raises(ValueError, match=r"\(N, S, S\)"):
        train_vae(make_vae(width=16), images, steps=1, weights=((patch[:3], 1.0),))


def test_smoke_build_runs_end_to_end_and_loads_with_plain_diffusers(smoke_build):
    out = smoke_build
    record = json.loads((out / "build.json").read_text())
    assert list(record["stages"]) == ["tokenizer", "corpus", "metrics", "clip", "vae", "unet", "pipeline", "evaluate",
                                      "person_triplets", "pet_triplets", "adapters", "adapter_evaluate"]
    adapters = record["measurements"]["adapters"]  # toy eval's metrics.json, scored by the build's own metric models
    assert adapters == json.loads((out / "adapter-eval" / "metrics.json").read_text())
    assert {"id_top1", "baseline_id_top1", "prompt_accuracy", "scene_both_top1"} <= set(adapters)
    for domain in ("person", "pet"):  # self-contained: the build's CLIP vision tower travels inside
        adapter = NestedAdapter.from_pretrained(out / "adapters" / domain)
        assert adapter.config.word == domain and (out / "adapters" / domain / "image_encoder").is_dir()
        clip = CLIPVisionModel.from_pretrained(out / "clip")
        assert all(torch.equal(a.float(), b.float()) for a, b in zip(adapter.encoder.image_encoder.state_dict().values(),
                                                                     clip.state_dict().values()))
    assert not (out / "adapter-data").exists() and not (out / "adapter-runs").exists()  # training leftovers go
    stack = record["measurements"]["stack"]
    for key in ("vae_psnr_db", "clip_zero_shot_accuracy", "base_prompt_factor_accuracy", "base_clip_t", "oracle_clip_t"):
        assert key in stack
    assert (out / "samples.png").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline")  # exactly as a user loads SD 1.5
    image = pipe("a photo of a pet on the beach", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3)
    # a second build never overwrites
    before = (out / "build.json").read_bytes()
    assert run_cli("toy", "build", "--out", str(out), "--smoke") == 2
    assert (out / "build.json").read_bytes() == before


def test_reuse_copies_the_caption_free_parts_of_an_earlier_build(smoke_build, tmp_path, monkeypatch):
    out = smoke_build
    # --reuse with a changed recipe: the metric models and the VAE are copied (not retrained: the log says so), byte
    # for byte, and the recipe's changes apply to the rest; with two workers the two adapters train side by side
    again = tmp_path / "again"
    assert run_cli("toy", "build", "--out", str(again), "clip_steps=4", "unet_widths=[16, 16]", "unet_steps=4",
                   "sample_steps=2", "eval_generations=2", "adapter_steps=2", "adapter_eval_scenes=1",
                   "--smoke", "--workers", "2", "--reuse", str(out)) == 0
    for part in ("metrics/identity_person/model.safetensors", "metrics/factor_classifier/model.safetensors",
                 "pipeline/vae/diffusion_pytorch_model.safetensors"):
        assert (again / part).read_bytes() == (out / part).read_bytes(), part
    assert (again / "pipeline/vae/config.json").read_text() == (out / "pipeline/vae/config.json").read_text()  # no path
    record = json.loads((again / "build.json").read_text())
    assert record["reused"]["from"] == str(out) and record["stages"]["vae"]["copied_from"] == str(out)
    adapters = record["stages"]["adapters"]
    assert adapters["side_by_side"] and adapters["threads_each"] == 1 and adapters["loader_workers"] == 0
    assert record["size"]["clip_steps"] == 4 and record["size"]["unet_widths"] == [16, 16]
    assert json.loads((again / "pipeline/unet/config.json").read_text())["block_out_channels"] == [16, 16]
    assert f"metrics: copied from {out}" in (again / "build.log").read_text()
    assert run_cli("toy", "build", "--out", str(tmp_path / "x"), "--smoke", "--reuse", str(tmp_path)) == 2
    assert not (tmp_path / "x").exists()

    # --reuse-parts metrics: the VAE is trained again, the metric models still copied (stopped once the VAE is done)
    class Stop(Exception):
        pass

    def bar(total, desc):
        if desc == "unet":
            raise Stop
        return real_bar(total, desc)

    real_bar = stages_module._bar
    monkeypatch.setattr(stages_module, "_bar", bar)
    third = tmp_path / "third"
    with pytest.raises(Stop):
        build(third, dataclasses.replace(SMOKE, corpus=200, scenes=16, clip_steps=2, vae_steps=2), workers=1, reuse=out,
              reuse_parts=("metrics",))
    record = json.loads((third / PARTIAL).read_text())
    assert record["reused"]["parts"] == ["metrics"] and "loss_first" in record["stages"]["vae"]
    assert "copied_from" not in record["stages"]["vae"]
    assert (third / "metrics/factor_classifier/model.safetensors").read_bytes() == (out / "metrics/factor_classifier/model.safetensors").read_bytes()
    assert run_cli("toy", "build", "--out", str(tmp_path / "y"), "--smoke", "--reuse-parts", "vae") == 2  # no --reuse
    assert not (tmp_path / "y").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for machines without CUDA")
def test_build_on_cuda_without_a_gpu_is_refused(tmp_path, capsys):
    assert run_cli("toy", "build", "--out", str(tmp_path / "x"), "--smoke", "--device", "cuda") == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------ the shipped stack

def test_the_toy_model_is_shipped_and_small():
    assert is_shipped(), "the toy stack is missing from src/nested_attention_toy/weights"
    assert model_path("toy") == shipped_path("pipeline")
    files = [f for f in shipped_path().rglob("*") if f.is_file()]
    adapters = shipped_path("adapters")
    stack = [f for f in files if adapters not in f.parents]
    assert sum(f.stat().st_size for f in stack) < 30 * 2**20  # the model stack's budget
    assert sum(f.stat().st_size for f in files) < 40e6  # everything shipped, adapters included
    for adapter in ("person", "pet"):  # they name the shipped CLIP ("toy") instead of carrying a copy of it
        assert NestedAdapter.from_pretrained(adapters / adapter).config.image_encoder == "toy"
        assert not (adapters / adapter / IMAGE_ENCODER_FOLDER).exists()
    assert not any(f.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt") for f in files)  # safetensors only


@pytest.fixture(scope="module")
def shipped_pipe():
    pipe = StableDiffusionPipeline.from_pretrained(model_path("toy"))  # no project code, no dtype: plain diffusers
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_pipeline_loads_with_plain_diffusers_and_generates(shipped_pipe):
    assert type(shipped_pipe.unet).__name__ == "UNet2DConditionModel"
    assert type(shipped_pipe.vae).__name__ == "AutoencoderKL"
    generator = torch.Generator().manual_seed(0)
    images = shipped_pipe(["a photo of a person on the beach, in the center"] * 2, num_inference_steps=8,
                          generator=generator, output_type="np").images
    assert images.shape == (2, 64, 64, 3) and np.isfinite(images).all()
    assert images.std() > 0.05 and np.abs(images[0] - images[1]).mean() > 0.01  # not blank, seeds differ
    # the adapter's backbone: the same CLIP vision tower, loadable as a plain CLIPVisionModel
    vision = CLIPVisionModel.from_pretrained(shipped_path("clip"))
    assert vision.config.image_size == 64


def test_shipped_metric_models_reach_their_bars_on_fresh_held_out_renders():
    """Fresh held-out identities and contexts (seed 2026, never used by the build): factor accuracy >= 0.95 per
    factor on 1,000 renders; identity retrieval top-1 among 50 held-out identities >= 0.9 (4 queries each)."""
    classifier = FactorClassifier.from_pretrained(shipped_path("metrics/factor_classifier"))
    renders = make_corpus(1000, seed=2026, held_out=True, workers=1, input_fraction=0)
    accuracy = head_accuracy(classifier, renders.images, renders.factor_labels())
    assert min(accuracy.values()) >= 0.95, accuracy
    for d, domain in enumerate(DOMAINS):
        net = IdentityNet.from_pretrained(shipped_path(f"metrics/identity_{domain}"))
        identities = sample_identities(domain, 50, np.random.default_rng(2026 + d), held_out=True)
        gallery, queries, ids = retrieval_sets(domain, identities, 4, 64, 2027 + d, workers=1)
        assert retrieval_top1(net, gallery, queries, ids) >= 0.9, domain


def test_both_subjects_of_real_person_and_pet_scenes_are_identified():
    """The person + pet bar of the adapters is measurable only if ground truth passes it: in real scene renders of
    held-out pairs (seed 2028) the shipped identity networks retrieve the person and the pet among 20 each, each in
    its own half of the scene, from one input view per identity, in nearly every scene."""
    from nested_attention_toy.render import render_input, render_scene, split_scene

    rng = np.random.default_rng(2028)
    identities = {d: sample_identities(d, 20, rng, held_out=True) for d in DOMAINS}
    pairs = [(int(rng.integers(20)), int(rng.integers(20))) for _ in range(120)]
    contexts = [sample_context(rng, "scene") for _ in pairs]
    scenes = [split_scene(render_scene(identities["person"][a], identities["pet"][b], context, 64,
                                       int(rng.integers(2**31))).image, context) for (a, b), context in zip(pairs, contexts)]
    found = {}
    for d, domain in enumerate(DOMAINS):
        net = IdentityNet.from_pretrained(shipped_path(f"metrics/identity_{domain}"))
        gallery = [torch.from_numpy(np.array(render_input(i, 64, 5))).permute(2, 0, 1) for i in identities[domain]]
        queries = torch.stack([torch.from_numpy(np.array(x[domain])).permute(2, 0, 1) for x in scenes])
        found[domain] = retrieval_top1(net, torch.stack(gallery), queries, torch.tensor([p[d] for p in pairs]))
    assert found["person"] >= 0.9 and found["pet"] >= 0.9, found


def test_shipped_tokenizer_knows_every_subject_word():
    tokenizer = CLIPTokenizer.from_pretrained(shipped_path("pipeline/tokenizer"))
    for words in SUBJECT_WORDS.values():
        for word in words:
            assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1
    assert tokenize(tokenizer, ["a pet"]).shape == (1, 32)


def test_generate_command_runs_the_shipped_model_by_name(tmp_path):
    out = tmp_path / "base.png"
    assert run_cli("generate", "--model", "toy", "--prompt", "a cartoon of a sad pet in the desert, on the left",
                   "--steps", "4", "--guidance", "5", "--out", str(out), "--device", "cpu") == 0
    assert Image.open(out).size == (64, 64)


def test_triplets_are_read_by_the_trainer_and_use_train_identities_only(tmp_path):
    from nested_attention_toy.triplets import write_triplets
    from nested_attention_toy.world import identity_from_index
    from nested_attention_train.data import read_metadata

    path = write_triplets(tmp_path / "a", "pet", 12, seed=3, subject_images=2, workers=1)
    records, problems = read_metadata(path.parent)
    assert len(records) == 12 and not problems
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(not identity_from_index("pet", line["identity"]).held_out for line in lines)
    assert all(r.word == "pet" and len(r.subject_images) == 2 for r in records)
    assert Image.open(records[0].target_image).size == (64, 64)
    masks = [np.asarray(Image.open(r.target_mask)) / 255 for r in records]  # the subject's silhouette
    assert all(m.shape == (64, 64) and 0.05 < m.mean() < 0.9 for m in masks)
    again = write_triplets(tmp_path / "b", "pet", 12, seed=3, subject_images=2, workers=1)
    assert again.read_text() == path.read_text()
    assert (tmp_path / "a/targets/0000005.png").read_bytes() == (tmp_path / "b/targets/0000005.png").read_bytes()
    assert run_cli("toy", "data", "--out", str(tmp_path / "c"), "--domain", "person", "--count", "3", "--workers", "1") == 0
    assert len(read_metadata(tmp_path / "c")[0]) == 3
    assert run_cli("toy", "data", "--out", str(tmp_path / "c"), "--domain", "person", "--count", "3") == 2  # not empty


def test_more_triplets_than_training_identities_reuse_them(tmp_path, monkeypatch, capsys):
    """Asking for more triplets than the training side has identities uses every identity, some more than once;
    asking for more distinct identities than exist is refused in one sentence."""
    from nested_attention_toy import triplets
    from nested_attention_toy.world import side_size

    assert side_size("pet", True) + side_size("pet", False) == identity_count("pet")
    monkeypatch.setattr(triplets, "side_size", lambda domain, held_out: 5)
    path = triplets.write_triplets(tmp_path / "a", "pet", 12, seed=1, workers=1)
    identities = [json.loads(line)["identity"] for line in path.read_text().splitlines()]
    assert len(identities) == 12 and len(set(identities)) == 5
    with pytest.raises(ValueError, match="training side has 5"):
        triplets.write_triplets(tmp_path / "b", "pet", 12, identities=6, workers=1)
    capsys.readouterr()
    assert run_cli("toy", "data", "--out", str(tmp_path / "c"), "--domain", "pet", "--count", "3",
                   "--identities", str(side_size("pet", False) + 1)) == 2
    assert "--identities must be between 1 and" in capsys.readouterr().err


@pytest.mark.parametrize("domain", ["person", "pet"])
def test_toy_config_trains_a_self_contained_adapter(tmp_path, domain):
    """The installed training config `toy-<domain>` on the shipped toy model: two steps, then the exported adapter loads
    with no name to resolve (its image encoder travels in image_encoder/) and equals the toy CLIP's vision tower."""
    from nested_attention import NestedAdapter

    config = f"toy-{domain}"
    assert run_cli("toy", "data", "--out", str(tmp_path / "data"), "--domain", domain, "--count", "8", "--workers", "1") == 0
    from nested_attention_train.trainer import main as train_main

    assert train_main(["--config", config, f"data={tmp_path / 'data'}", f"output_dir={tmp_path / 'run'}", "max_steps=2",
                       "train_batch_size=4", "num_workers=0", "lr_warmup_steps=1", "checkpoint_every=2"]) == 0
    adapter = NestedAdapter.from_pretrained(tmp_path / "run" / "adapter")
    assert adapter.config.word == domain and adapter.config.image_encoder == "toy"
    reference = CLIPVisionModel.from_pretrained(shipped_path("clip"))
    for (name, a), (_, b) in zip(adapter.encoder.image_encoder.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a.float(), b.float()), name


def test_report_reads_a_build_folder_and_refuses_a_missing_one(tmp_path, capsys):
    from nested_attention_toy.assets import shipped_path
    from nested_attention_toy.report import main as report_main

    record = json.loads(shipped_path("build.json").read_text())
    record["resumed"] = [{"command": "nested-attention toy build --out b --resume", "versions": record["versions"],
                          "stages_done": ["tokenizer", "corpus"]}]
    (tmp_path / "build.json").write_text(json.dumps(record))
    report_main([str(tmp_path)])
    out, processor = capsys.readouterr().out, record["versions"]["processor"]
    assert "| stage | wall time |" in out and f"torch threads on {processor}." in out
    assert f"Resumed: `nested-attention toy build --out b --resume` on {processor}, after tokenizer, corpus;" in out
    assert report_main([str(tmp_path / "missing")]) == 2
    assert "expected a build folder or its build.json" in capsys.readouterr().err
