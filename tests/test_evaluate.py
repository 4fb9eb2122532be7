"""The evaluation harness: every output, resuming, the scores against naive references, and its command line."""

import csv
import json

import numpy as np
import pytest
import torch

from conftest import make_adapter, subject_image
from nested_attention import NestedAttention
from nested_attention.errors import NestedAttentionError
from nested_attention_cli.main import main
from nested_attention_eval.harness import Evaluator, Job, Plan, Setting, read_records, summarize
from nested_attention_eval.report import write_reports
from nested_attention_eval.scorers import (
    HFImageEmbedder,
    IdentityEmbedder,
    OnnxFaceEmbedder,
    identity_embedder,
    prompt_scorer,
)
from nested_attention_toy.render import render_input
from nested_attention_toy.world import (
    DOMAINS,
    FACTOR_NAMES,
    attribute_names,
    generic_caption,
    prompt_factors,
    sample_context,
    sample_identities,
)

PROMPTS = ["a photo of a {word} on the beach, on the left", "a sad {word} in the forest, watercolor painting"]


class MeanColour(IdentityEmbedder):
    """A transparent embedder: the mean RGB of an image (unit norm)."""

    name = "colour"

    def embed(self, images):
        x = torch.tensor(np.stack([np.asarray(i.convert("RGB"), dtype=np.float32).mean((0, 1)) for i in images]))
        return torch.nn.functional.normalize(x + 1, dim=-1)


class CountingPipe:
    """Counts the images the wrapped pipeline generates."""

    def __init__(self, pipe):
        self.pipe, self.generated = pipe, 0

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, prompt, **kwargs):
        self.generated += len(prompt) if isinstance(prompt, list) else 1
        return self.pipe(prompt, **kwargs)


def _plan(sd_pipe, subjects=3):
    settings = [Setting("adapter", "person", make_adapter(sd_pipe.unet, seed=1)), Setting("base", "person")]
    images = {f"s{i}": [subject_image(10 + i), subject_image(20 + i)] for i in range(subjects)}
    return Plan(settings, images, PROMPTS, lams=[1.0, 2.0], seeds=[0, 1])


def test_outputs_and_resume(sd_pipe, tmp_path):
    sd_pipe.set_progress_bar_config(disable=True)
    counting = CountingPipe(sd_pipe)
    plan = _plan(sd_pipe)
    run = lambda: Evaluator(counting, tmp_path, identity=MeanColour(), prompt_scorers=[prompt_scorer("toy")],  # noqa: E731
                            steps=2, batch_size=4, progress=False).run(plan)
    records = run()
    # adapter: 3 subjects x 2 lambdas x 2 prompts x 2 seeds; base: every subject, but images only per (prompt, seed)
    assert len(records) == 24 + 12
    assert counting.generated == 24 + 4
    assert len(list((tmp_path / "images").iterdir())) == 24 + 4
    base = [r for r in records if r["setting"] == "base"]
    assert {r["lam"] for r in base} == {None} and len({r["image"] for r in base}) == 4
    for record in records:
        assert record["prompt"].count("person") == 1 and "{word}" not in record["prompt"]
        assert 0 <= record["prompt_accuracy"] <= 1 and -1 <= record["colour_similarity"] <= 1
    assert records[0]["factor_expression"] is None and records[0]["factor_position"] in (0.0, 1.0)

    # run again: nothing generated; an interrupted run (its last records missing, the last one cut short, the
    # last image not written): only those records return, and only the missing image is generated
    counting.generated = 0
    assert len(run()) == 36 and counting.generated == 0
    path = tmp_path / "records.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-3]) + "\n" + lines[-3][:20])
    (tmp_path / json.loads(lines[-1])["image"]).unlink()
    again = run()
    assert len(again) == 36 and counting.generated == 1
    assert len(read_records(path)) == 36
    assert {r["key"] for r in again} == {r["key"] for r in records}

    written = write_reports(again, tmp_path)
    assert set(written) == {"records", "summary", "plot", "html"}
    rows = list(csv.DictReader(open(written["summary"])))
    assert {(r["setting"], r["lam"]) for r in rows} == {("adapter", "1.0"), ("adapter", "2.0"), ("base", "")}
    html = written["html"].read_text()
    assert all(r["image"] in html for r in again) and "tradeoff.png" in html
    assert written["plot"].stat().st_size > 1000


def test_a_batch_of_several_subjects_gives_each_prompt_its_own_subject(sd_pipe, tmp_path, monkeypatch):
    """Batches mix subjects: every prompt must be generated with its own job's subject and lambda, and one Subject
    object per (subject, lambda), which the pipeline encodes once."""
    sd_pipe.set_progress_bar_config(disable=True)
    calls = []
    original = NestedAttention.__call__

    def recording(self, prompts, subjects, **kwargs):
        calls.append((list(prompts), {name: list(s) for name, s in subjects.items()}, kwargs["generator"]))
        return original(self, prompts, subjects, **kwargs)

    monkeypatch.setattr(NestedAttention, "__call__", recording)
    grid = _plan(sd_pipe)

    class OwnSeeds:  # any plan will do; here each job's (prompt, seed) names its subject
        settings, subjects = grid.settings[:1], grid.subjects

        def jobs(self, setting):
            return [Job(setting.name, j.identity, j.prompt, j.lam, 1000 * int(j.identity[1:]) + j.seed, {setting.name: j.identity})
                    for j in grid.jobs(setting)]

    plan = OwnSeeds()
    Evaluator(sd_pipe, tmp_path, steps=1, batch_size=8, progress=False).run(plan)
    jobs = plan.jobs(plan.settings[0])
    owner = {images[0].convert("RGB").tobytes(): label for label, images in plan.subjects.items()}
    assert len(owner) == 3 and sum(len(prompts) for prompts, _, _ in calls) == len(jobs) == 24
    seen, mixed = [], False
    for prompts, subjects, generators in calls:
        (name, per_prompt), = subjects.items()
        assert name == "adapter" and len(per_prompt) == len(prompts) == len(generators)
        mixed |= len({id(s) for s in per_prompt}) > 1
        for prompt, subject, generator in zip(prompts, per_prompt, generators):
            seen.append((prompt, generator.initial_seed(), subject.lam, owner[subject.images[0].tobytes()], id(subject)))
    assert mixed  # batches do mix subjects
    expected = sorted((j.prompt, j.seed, j.lam, j.identity) for j in jobs)
    assert sorted(s[:4] for s in seen) == expected
    assert len({s[4] for s in seen}) == len({(s[2], s[3]) for s in seen})  # one Subject per (subject, lambda)


def test_identity_scores_match_a_naive_reference(sd_pipe, tmp_path):
    plan = _plan(sd_pipe, subjects=4)
    evaluator = Evaluator(sd_pipe, tmp_path, identity=MeanColour(), progress=False)
    references = evaluator._references(plan)
    images = [plan.subjects[label][0] for label in plan.subjects]  # each subject's own first image
    scores = evaluator._identity_scores(images, list(plan.subjects), references)
    embedder = MeanColour()
    for row, label in enumerate(plan.subjects):
        own = embedder.embed(plan.subjects[label])
        expected = float(np.mean([float(own[k] @ embedder.embed([images[row]])[0]) for k in range(len(own))]))
        assert scores["colour_similarity"][row] == pytest.approx(expected, abs=1e-6)
        gallery = {other: embedder.embed(plan.subjects[other]).mean(0) for other in plan.subjects}
        best = max(gallery, key=lambda o: float(torch.nn.functional.normalize(gallery[o], dim=0) @ embedder.embed([images[row]])[0]))
        assert scores["colour_top1"][row] == float(best == label)


def test_summary_is_the_mean_per_setting_and_lambda():
    records = [{"key": str(i), "setting": "a" if i < 4 else "b", "identity": "x", "prompt": "p", "lam": float(i % 2) + 1,
                "seed": i, "image": "i.png", "score": float(i), "maybe": None if i == 0 else 1.0} for i in range(6)]
    rows = {(r["setting"], r["lam"]): r for r in summarize(records)}
    assert rows[("a", 1.0)]["score"] == 1.0 and rows[("a", 2.0)]["score"] == 2.0 and rows[("b", 1.0)]["score"] == 4.0
    assert rows[("a", 1.0)]["maybe"] == 1.0 and rows[("a", 1.0)]["images"] == 2  # None left out of the mean


def test_prompt_factors_read_back_every_caption():
    rng = np.random.default_rng(0)
    for i in range(500):
        context = sample_context(rng)
        assert prompt_factors(generic_caption(DOMAINS[i % 2], context, rng)) == context.as_dict()
    assert prompt_factors("a sad person in the forest, watercolor painting") == {"scene": "forest", "style": "watercolor", "expression": "sad"}
    assert prompt_factors("a sad person with an angry pet") == {}  # two expressions: neither is the person's for sure


def test_toy_identity_scorer_retrieves_held_out_renders():
    identities = sample_identities("pet", 5, np.random.default_rng(3), held_out=True)
    embedder = identity_embedder("toy", word="puppy")
    a = embedder.embed([render_input(i, 64, 0) for i in identities])
    b = embedder.embed([render_input(i, 64, 1) for i in identities])
    assert a.shape[0] == 5 and torch.allclose(a.norm(dim=-1), torch.ones(5))
    assert float(((b @ a.T).argmax(-1) == torch.arange(5)).float().mean()) >= 0.8


def test_onnx_face_embedder_matches_numpy(tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.RandomState(0).randn(8, 3, 3, 3).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("GlobalAveragePool", ["c"], ["p"]),
         helper.make_node("Flatten", ["p"], ["y"])],
        "face", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])], [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "face.onnx"
    onnx.save(model, str(path))
    embedder = OnnxFaceEmbedder(str(path))
    assert embedder.size == (16, 16) and not embedder.channels_last
    images = [subject_image(1, size=16), subject_image(2, size=24)]
    got = embedder.embed(images)
    x = np.stack([np.asarray(i.resize((16, 16))) if i.size != (16, 16) else np.asarray(i) for i in images]).astype(np.float32)
    x = torch.from_numpy((x - 127.5) / 127.5).permute(0, 3, 1, 2)
    expected = torch.nn.functional.conv2d(x, torch.from_numpy(weight), padding=1).mean((2, 3))
    assert torch.allclose(got[0], torch.nn.functional.normalize(expected, dim=-1)[0], atol=1e-5)
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(NestedAttentionError, match="onnxruntime could not open"):
        OnnxFaceEmbedder(str(tmp_path / "bad.onnx"))


def test_hf_image_embedder(tmp_path):
    from nested_attention.tiny import tiny_image_encoder

    model, processor = tiny_image_encoder(seed=0)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    embedder = identity_embedder(f"dino:{tmp_path}")
    assert isinstance(embedder, HFImageEmbedder) and embedder.name == "dino"
    e = embedder.embed([subject_image(1), subject_image(1), subject_image(2)])
    assert float(e[0] @ e[1]) == pytest.approx(1.0, abs=1e-5) and float(e[0] @ e[2]) < 0.9999


@pytest.mark.parametrize("spec", ["onnx", "clip", "toy:x", "nope:x"])
def test_bad_scorer_names(spec):
    with pytest.raises(NestedAttentionError, match="is not a scorer"):
        identity_embedder(spec)


def test_evaluate_command(tmp_path, capsys):
    subjects = tmp_path / "subjects"
    for i, identity in enumerate(sample_identities("person", 2, np.random.default_rng(0), held_out=True)):
        (subjects / f"p{i}").mkdir(parents=True)
        render_input(identity, 64, 0).save(subjects / f"p{i}" / "0.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\n" + "\n".join(PROMPTS) + "\n")
    argv = ["evaluate", "--model", "tiny-sd", "--adapter", "random", "--baseline", "--subjects", str(subjects),
            "--prompts", str(prompts), "--lam", "1", "3", "--steps", "2", "--identity", "toy-person",
            "--prompt-score", "toy", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    records = read_records(tmp_path / "out" / "records.jsonl")
    assert len(records) == 2 * 2 * 2 + 2 * 2
    assert {"id_similarity", "id_top1", "prompt_accuracy"} <= set(records[0])
    out = capsys.readouterr().out
    for name in ("records.jsonl", "summary.csv", "tradeoff.png", "index.html"):
        assert name in out and (tmp_path / "out" / name).is_file()
    assert json.loads((tmp_path / "out" / "records.jsonl").read_text().splitlines()[0])["setting"] == "random"


def test_evaluate_adds_its_summary_to_the_adapter_s_card(tmp_path, sd_pipe, capsys):
    from huggingface_hub import ModelCard

    from nested_attention.card import CARD_NAME

    subjects = tmp_path / "subjects"
    for i, identity in enumerate(sample_identities("person", 2, np.random.default_rng(0), held_out=True)):
        (subjects / f"p{i}").mkdir(parents=True)
        render_input(identity, 64, 0).save(subjects / f"p{i}" / "0.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS[0] + "\n")
    make_adapter(sd_pipe.unet).save_pretrained(tmp_path / "mine", save_image_encoder=True)
    argv = ["evaluate", "--model", "tiny-sd", "--adapter", f"mine={tmp_path / 'mine'}", "--baseline", "--subjects",
            str(subjects), "--prompts", str(prompts), "--lam", "1", "2", "--steps", "1", "--identity", "toy-person",
            "--out", str(tmp_path / "out"), "--card"]
    assert main(argv) == 0 and main(argv) == 0  # the second run resumes and replaces the same rows
    rows = summarize(read_records(tmp_path / "out" / "records.jsonl"))
    text = ModelCard.load(tmp_path / "mine" / CARD_NAME).text
    mine = {row["lam"]: row for row in rows if row["setting"] == "mine"}
    base = next(row for row in rows if row["setting"] == "base model")
    assert f"| id_top1 (lambda 2, 2 images of subjects) | {round(mine[2.0]['id_top1'], 4)} |" in text
    assert f"| id_similarity (base model, 2 images of subjects) | {round(base['id_similarity'], 4)} |" in text
    assert text.count("id_top1 (lambda 1,") == 1 and "Not measured" not in text
    capsys.readouterr()
    assert main(["evaluate", "--model", "tiny-sd", "--adapter", "random", "--subjects", str(subjects), "--prompts",
                 str(prompts), "--out", str(tmp_path / "o2"), "--card"]) == 2
    assert "--card writes into adapter folders" in capsys.readouterr().err


def test_evaluate_bad_input(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n")
    (tmp_path / "s").mkdir()
    subject_image(0).save(tmp_path / "s" / "a.png")
    base = ["evaluate", "--model", "tiny-sd", "--subjects", str(tmp_path / "s"), "--prompts", str(prompts), "--out", str(tmp_path / "o")]
    assert main(base) == 2
    assert "Nothing to evaluate" in capsys.readouterr().err
    assert main(base + ["--adapter", "random", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "error: The prompt 'a photo of a cat' does not contain the subject word 'person'" in err
    assert "tiny-sd is a tiny" not in err  # refused before any model is loaded
    assert main([*base[:4], str(tmp_path / "missing"), *base[5:], "--baseline"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_toy_eval_writes_every_key(tmp_path, capsys):
    argv = ["toy", "eval", "--identities", "2", "--contexts", "1", "--scenes", "1", "--steps", "1",
            "--adapter-person", "random", "--adapter-pet", "random", "--out", str(tmp_path)]
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for prefix in ("", "baseline_", "oracle_"):
        for key in ("id_top1", "id_similarity", "prompt_accuracy", "clip_t", "scene_person_top1", "scene_pet_top1", "scene_both_top1"):
            assert 0 <= metrics[prefix + key] <= 1 or key in ("id_similarity", "clip_t"), prefix + key
        assert metrics["person"][prefix + "id_top1"] in (0.0, 0.5, 1.0)
        for domain in ("person", "pet"):
            attributes = [metrics[domain][prefix + "attribute_" + a] for a in attribute_names(domain)]
            assert all(a in (0.0, 0.5, 1.0) for a in attributes)  # 2 subjects x 1 context, 0/1 each
            assert metrics[domain][prefix + "attribute_accuracy"] == pytest.approx(np.mean(attributes))
    for domain in ("person", "pet"):
        assert metrics[domain]["oracle_attribute_accuracy"] >= 0.5  # real renders: most attributes read right
    assert metrics["oracle_id_top1"] == 1.0  # real renders of 2 subjects: the identity networks tell them apart
    for factor in FACTOR_NAMES:  # per context value: the images add up
        counts = metrics[f"count_by_{factor}"]
        assert sum(counts.values()) == 2 * 2 * 1  # 2 domains x 2 subjects x 1 context
        for prefix in ("", "baseline_", "oracle_"):
            by_value = metrics[f"{prefix}id_top1_by_{factor}"]
            assert by_value.keys() == counts.keys()
            mean = sum(by_value[v] * counts[v] for v in counts) / sum(counts.values())
            assert mean == pytest.approx(metrics[prefix + "id_top1"])
    assert (tmp_path / "samples.png").is_file() and "metrics.json" in capsys.readouterr().out
    records = read_records(tmp_path / "records.jsonl")  # 3 kinds x (2 domains x 2 subjects + 1 scene)
    assert len(records) == 15 and {r["setting"] for r in records} == {"adapter", "baseline", "oracle"}

    # the same command again resumes: every image is read back, nothing is made, the metrics are the same
    images = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "images").iterdir()}
    assert main(argv) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "images").iterdir()} == images
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    # other sampler settings would mix images of two runs in one folder: refused in one sentence
    capsys.readouterr()
    assert main([*argv[:-2], "--steps", "2", "--out", str(tmp_path)]) == 2
    assert "steps 1 -> 2" in capsys.readouterr().err


def test_toy_eval_with_more_lambdas_adds_a_curve_and_keeps_the_first(tmp_path, capsys):
    argv = ["toy", "eval", "--identities", "2", "--contexts", "1", "--scenes", "1", "--steps", "1",
            "--adapter-person", "random", "--adapter-pet", "random", "--out", str(tmp_path)]
    assert main([*argv, "--lam", "1"]) == 0
    first = json.loads((tmp_path / "metrics.json").read_text())
    assert "by_lambda" not in first and not (tmp_path / "tradeoff.png").exists()
    assert main([*argv, "--lam", "1", "3"]) == 0  # resumes: the lambda-1 images are read back, lambda 3 is made
    both = json.loads((tmp_path / "metrics.json").read_text())
    assert {k: v for k, v in both.items() if k not in ("config", "by_lambda")} == \
        {k: v for k, v in first.items() if k != "config"}
    assert both["by_lambda"].keys() == {"1", "3"}
    assert all(both["by_lambda"]["1"][k] == first[k] for k in ("id_top1", "prompt_accuracy", "scene_both_top1"))
    assert (tmp_path / "tradeoff.png").is_file() and "lambda    3: id_top1" in capsys.readouterr().out
    records = read_records(tmp_path / "records.jsonl")
    assert sorted(r["lam"] for r in records if r["setting"] == "adapter") == [1.0] * 5 + [3.0] * 5
    assert main([*argv, "--lam", "1"]) == 0  # back to one lambda: the first run's metrics, no curve
    assert json.loads((tmp_path / "metrics.json").read_text()) == first and not (tmp_path / "tradeoff.png").exists()
    for bad in (["0"], ["2", "2"]):
        assert main([*argv, "--lam", *bad]) == 2
        assert "expected distinct positive numbers" in capsys.readouterr().err
