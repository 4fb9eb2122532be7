"""`nested-attention toy ship`: a finished build becomes the package's named toy stack (here into a scratch folder)."""

import json

import torch
from safetensors.torch import load_file

from nested_attention import NestedAdapter
from nested_attention.card import CARD_NAME
from nested_attention_toy.ship import COPIED, metric_rows, ship
from test_cli import run_cli


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_ship_copies_the_build_and_exports_adapters_that_name_the_installed_clip(smoke_build, tmp_path):
    target = tmp_path / "weights"
    (target / "stale").mkdir(parents=True)  # what an earlier ship left goes
    evaluation = smoke_build / "adapter-eval"
    assert ship(smoke_build, [evaluation], target) == target
    assert sorted(p.name for p in target.iterdir()) == sorted([*COPIED, "adapters"])
    assert not (tmp_path / "weights.new").exists() and not (tmp_path / "weights.old").exists()
    for part in COPIED:  # byte for byte
        source = smoke_build / part
        assert (_files(source) == _files(target / part)) if source.is_dir() else source.read_bytes() == (target / part).read_bytes()
    record = json.loads((smoke_build / "build.json").read_text())
    measured = json.loads((evaluation / "metrics.json").read_text())
    for domain in ("person", "pet"):
        folder = target / "adapters" / domain
        assert sorted(p.name for p in folder.iterdir()) == sorted([CARD_NAME, "nested_adapter.safetensors",
                                                                   "nested_adapter_config.json"])  # no CLIP copy
        assert json.loads((folder / "nested_adapter_config.json").read_text())["image_encoder"] == "toy"
        built = load_file(smoke_build / "adapters" / domain / "nested_adapter.safetensors")
        shipped = load_file(folder / "nested_adapter.safetensors")
        assert built.keys() == shipped.keys() and all(torch.equal(built[k], shipped[k]) for k in built)
        # it loads back with the build's CLIP in place of the installed one (the smoke CLIP is narrower)
        adapter = NestedAdapter.from_pretrained(folder, image_encoder=str(smoke_build / "clip"))
        assert adapter.config.word == domain
        card = (folder / CARD_NAME).read_text()
        assert f"| optimizer steps | {record['size']['adapter_steps']} |" in card
        assert f"| records | {record['size']['adapter_triplets']} |" in card
        assert f"its {domain} triplets, train identities only" in card
        row = f"| held-out id_top1 among 2 ({domain}) at lambda 1, toy eval --seed 0 | {round(measured[domain]['id_top1'], 4)} |"
        assert row in card


def test_ship_refuses_an_unfinished_build_in_one_sentence(smoke_build, tmp_path, capsys):
    unfinished = tmp_path / "build"
    unfinished.mkdir()
    (unfinished / "build.partial.json").write_text("{}")
    assert run_cli("toy", "ship", str(unfinished)) == 2
    assert "not a finished toy build" in capsys.readouterr().err
    assert run_cli("toy", "ship", str(smoke_build), "--eval", str(tmp_path)) == 2
    assert "holds no metrics.json" in capsys.readouterr().err
    (tmp_path / "metrics.json").write_text(json.dumps({"config": {"seed": 0}, "person": {"id_top1": 1.0}}))
    assert run_cli("toy", "ship", str(smoke_build), "--eval", str(tmp_path)) == 2  # a person-only run
    assert "did not score both adapters" in capsys.readouterr().err


def test_the_card_gives_an_adapter_trained_at_another_lambda_its_scores_there_too():
    def scores(top1, prompt):
        return {"person": {"id_top1": top1, "prompt_accuracy": prompt, "baseline_id_top1": 0.05,
                           "baseline_prompt_accuracy": 0.99}}

    metrics = {"config": {"seed": 3, "identities": 20}, **scores(0.7, 0.98),
               "by_lambda": {"1": scores(0.7, 0.98), "2": scores(0.9, 0.97), "4": scores(0.85, 0.95)}}
    at_one = {"held-out id_top1 among 20 (person) at lambda 1, toy eval --seed 3": 0.7,
              "the base model alone, --seed 3": 0.05, "prompt_accuracy at lambda 1 (base model 0.990), --seed 3": 0.98}
    assert metric_rows(metrics, "person") == at_one
    assert metric_rows(metrics, "person", trained_lambda=2.0) == at_one | {
        "held-out id_top1 among 20 (person) at lambda 2, toy eval --seed 3": 0.9,
        "prompt_accuracy at lambda 2 (base model 0.990), --seed 3": 0.97}
    assert metric_rows(metrics, "person", trained_lambda=3.0) == at_one  # not scored there: nothing made up
