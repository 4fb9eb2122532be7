"""Strengths in evaluations, one-domain toy evaluations, and `toy experiment`: its arms, reuse and report."""

import json
import os

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import make_adapter, subject_image
from nested_attention.adapter import WEIGHTS_NAME
from nested_attention.errors import NestedAttentionError
from nested_attention_cli.main import main
from nested_attention_eval.experiment_report import METRICS, SCENE_METRICS, arm_points, write_results
from nested_attention_eval.harness import Evaluator, Job, Plan, Setting, read_records, summarize
from nested_attention_eval.toy_eval import ToyEvalConfig, ToyPlan, check_config
from nested_attention_eval.toy_experiments import EXPERIMENTS, RunConfig, arm_config, knob, trained


def test_a_job_without_strength_keeps_its_key_and_image_name():
    """Folders evaluated before strengths existed resume: a job at no set strength keys as it always has."""
    job = Job("adapter", "s0", "a person", 1.0, 3)
    assert job.key == "adapter|s0|a person|1.0|3"
    scaled = Job("adapter", "s0", "a person", 1.0, 3, scale=0.5)
    assert scaled.key == "adapter|s0|a person|1.0|3|scale 0.5"
    assert scaled.image_name(False) != job.image_name(False)


def test_strength_zero_is_the_base_model_and_one_is_the_adapter_as_trained(sd_pipe, tmp_path):
    sd_pipe.set_progress_bar_config(disable=True)
    adapter = make_adapter(sd_pipe.unet, seed=1, mechanism="decoupled")
    subjects = {"s0": [subject_image(10)]}
    prompts = ["a photo of a {word} on the beach"]

    def run(out, scales):
        plan = Plan([Setting("adapter", "person", adapter), Setting("base", "person")], subjects, prompts,
                    seeds=[0, 1], scales=scales)
        return {(r["setting"], r.get("scale"), r["seed"]): r for r in Evaluator(sd_pipe, out, steps=2, progress=False).run(plan)}

    scaled, plain = run(tmp_path / "scaled", [0.0, 1.0]), run(tmp_path / "plain", None)
    assert {k for k in scaled if k[0] == "adapter"} == {("adapter", s, seed) for s in (0.0, 1.0) for seed in (0, 1)}
    pixels = lambda root, record: np.asarray(Image.open(root / record["image"]), dtype=np.int16)  # noqa: E731
    for seed in (0, 1):
        # strength 1 sets no strength at all: the same computation as the unscaled run, so the same image
        assert np.array_equal(pixels(tmp_path / "scaled", scaled["adapter", 1.0, seed]),
                              pixels(tmp_path / "plain", plain["adapter", None, seed]))
        # strength 0 runs the base processors; the batch is the same, so at most a rounding step of 8-bit pixels
        at_zero = pixels(tmp_path / "scaled", scaled["adapter", 0.0, seed])
        base = pixels(tmp_path / "scaled", scaled["base", None, seed])
        assert np.abs(at_zero - base).max() <= 1
        assert not np.array_equal(pixels(tmp_path / "plain", plain["adapter", None, seed]), base)  # the adapter acts
    rows = summarize(list(scaled.values()))
    assert {(r["setting"], r.get("scale")) for r in rows} == {("adapter", 0.0), ("adapter", 1.0), ("base", None)}
    with pytest.raises(NestedAttentionError, match=r"Strengths must lie in \[0, 1\]"):
        Plan([Setting("adapter", "person", adapter)], subjects, prompts, scales=[1.5])


def test_evaluate_command_over_strengths(tmp_path, sd_pipe, capsys):
    (tmp_path / "subjects" / "a").mkdir(parents=True)
    subject_image(3).save(tmp_path / "subjects" / "a" / "0.png")
    (tmp_path / "prompts.txt").write_text("a photo of a person on the beach\n")
    make_adapter(sd_pipe.unet, mechanism="decoupled").save_pretrained(tmp_path / "ip", save_image_encoder=True)
    argv = ["evaluate", "--model", "tiny-sd", "--adapter", f"ip={tmp_path / 'ip'}", "--subjects", str(tmp_path / "subjects"),
            "--prompts", str(tmp_path / "prompts.txt"), "--steps", "1", "--prompt-score", "toy", "--out", str(tmp_path / "o")]
    assert main([*argv, "--scale", "0.5", "1"]) == 0
    records = read_records(tmp_path / "o" / "records.jsonl")
    assert sorted(r["scale"] for r in records) == [0.5, 1.0] and len({r["image"] for r in records}) == 2
    summary = (tmp_path / "o" / "summary.csv").read_text()
    assert summary.splitlines()[0].startswith("setting,lam,scale,images") and "ip,1.0,0.5,1" in summary
    assert "scale 0.5" in (tmp_path / "o" / "index.html").read_text()
    capsys.readouterr()
    assert main([*argv, "--scale", "2"]) == 2
    assert "Strengths must lie in [0, 1]" in capsys.readouterr().err


def test_a_one_domain_toy_plan_holds_the_same_subjects_and_prompts_as_both():
    both = ToyPlan(ToyEvalConfig(seed=3, identities=3, contexts=2, scenes=2), {"person": None, "pet": None})
    person = ToyPlan(ToyEvalConfig(seed=3, identities=3, contexts=2, scenes=0, domains=("person",)), {"person": None})
    assert person.cases == [c for c in both.cases if c[3]["domain"] == "person"]
    assert list(person.identities) == ["person"] and person.identities["person"] == both.identities["person"]
    assert set(person.subjects) == {k for k in both.subjects if k.startswith("person:")}
    pet = ToyPlan(ToyEvalConfig(seed=3, identities=3, contexts=2, scenes=0, domains=("pet",)), {"pet": None})
    assert pet.cases == [c for c in both.cases if c[3]["domain"] == "pet"]


@pytest.mark.parametrize("fields, message", [
    ({"domains": ("person",)}, "scenes need both"),
    ({"domains": ("person", "person"), "scenes": 0}, "expected distinct names"),
    ({"domains": ("dog",), "scenes": 0}, "expected distinct names"),
    ({"lams": (1.0, 2.0), "scales": (0.5, 1.0)}, "vary one of them"),
    ({"contexts": 0, "scenes": 0}, "expected at least one image"),
])
def test_toy_eval_configs_it_cannot_make_are_refused(fields, message):
    with pytest.raises(NestedAttentionError, match=message):
        check_config(ToyEvalConfig(**fields))


def test_toy_eval_one_domain_over_strengths(tmp_path, capsys):
    argv = ["toy", "eval", "--identities", "2", "--contexts", "1", "--scenes", "0", "--steps", "1", "--domains",
            "person", "--adapter-person", "random", "--out", str(tmp_path)]
    assert main([*argv, "--scale", "0", "1"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert "pet" not in metrics and metrics["by_scale"].keys() == {"0", "1"}
    assert metrics["by_scale"]["0"]["id_top1"] == metrics["id_top1"]  # the headline is the first strength's
    records = read_records(tmp_path / "records.jsonl")
    assert sorted(r["scale"] for r in records if r["setting"] == "adapter") == [0.0, 0.0, 1.0, 1.0]
    assert all(r["labels"]["domain"] == "person" for r in records)
    assert (tmp_path / "tradeoff.png").is_file() and "scale    0: id_top1" in capsys.readouterr().out
    assert main([*argv, "--scale", "0", "1.5"]) == 2
    assert "--scale is 0 1.5" in capsys.readouterr().err


def test_arms_differ_only_in_their_own_fields(tmp_path):
    run = RunConfig(tmp_path, steps=10)
    for experiment in EXPERIMENTS.values():
        configs = [arm_config(experiment, arm, run) for arm in experiment.arms]
        for arm, config in zip(experiment.arms, configs):
            assert config.max_steps == 10 and config.output_dir == str(tmp_path / arm.folder)
        fields = lambda c: {k: v for k, v in vars(c).items() if k != "output_dir"}  # noqa: E731
        changed = {k for c in configs for k in fields(c) if fields(c)[k] != fields(configs[0])[k]}
        named = {o.split("=")[0] for arm in experiment.arms for o in arm.overrides}
        assert changed <= named, experiment.name
    mechanisms = {arm.name: arm_config(EXPERIMENTS["mechanisms"], arm, run) for arm in EXPERIMENTS["mechanisms"].arms}
    assert knob(mechanisms["nested"])[0] == knob(mechanisms["global_v"])[0] == (1.0, 1.5, 2.0, 2.5, 3.0, 4.0)
    assert knob(mechanisms["decoupled"]) == ((1.0,), (0.5, 0.6, 0.7, 0.8, 0.9, 1.0))
    assert knob(mechanisms["simple"]) == ((1.0,), None)
    # arms that share a training run (across experiments too) are trained by one config
    by_run = {}
    for experiment in EXPERIMENTS.values():
        for arm in experiment.arms:
            for domain in experiment.domains:
                config = vars(arm_config(experiment, arm, run, domain))
                assert config["word"] == domain and config["output_dir"] == str(tmp_path / arm.folder_of(experiment, domain))
                by_run.setdefault(arm.folder_of(experiment, domain), []).append(config)
    assert all(c == configs[0] for configs in by_run.values() for c in configs)
    assert {c["train_lambda"] for configs in by_run.values() for c in configs} == {1.0}  # as the paper trains
    assert len(by_run["nested"]) == 7 and len(by_run["decoupled"]) == 2  # the scenes reuse the mechanisms' runs
    assert sorted(name for name, configs in by_run.items() if len(configs) == 1) == [
        "16-tokens", "64-tokens", "alpha-1", "alpha-3", "alpha-none", "decoupled-pet", "global_v", "multi_token",
        "nested-pet", "simple"]


def test_more_views_add_views_after_the_same_first_one():
    one = ToyPlan(ToyEvalConfig(seed=2, identities=2, contexts=1, scenes=0, domains=("pet",)), {"pet": None})
    four = ToyPlan(ToyEvalConfig(seed=2, identities=2, contexts=1, scenes=0, domains=("pet",), views=4), {"pet": None})
    assert one.cases == four.cases and one.subjects.keys() == four.subjects.keys()
    for name, views in four.subjects.items():
        assert len(views) == 4 and np.array_equal(np.asarray(views[0]), np.asarray(one.subjects[name][0]))
        assert len({np.asarray(v).tobytes() for v in views}) == 4  # four different views of the subject
    with pytest.raises(NestedAttentionError, match="expected at least 1"):
        check_config(ToyEvalConfig(views=0))


def test_a_finished_arm_is_reused_only_with_its_own_config(tmp_path):
    experiment = EXPERIMENTS["mechanisms"]
    config = arm_config(experiment, experiment.arms[0], RunConfig(tmp_path, steps=10))
    folder = tmp_path / "nested"
    (folder / "adapter").mkdir(parents=True)
    (folder / "adapter" / WEIGHTS_NAME).write_bytes(b"")
    (folder / "config.yaml").write_text(yaml.safe_dump(vars(config) | {"resume": "latest"}))
    assert trained(config) == folder / "adapter"  # the resume field does not change what was trained
    other = arm_config(experiment, experiment.arms[0], RunConfig(tmp_path, steps=20))
    with pytest.raises(NestedAttentionError, match="max_steps differ"):
        trained(other)


def test_one_process_trains_a_run(tmp_path, monkeypatch):
    from nested_attention_eval import toy_experiments

    experiment = EXPERIMENTS["mechanisms"]
    config = arm_config(experiment, experiment.arms[0], RunConfig(tmp_path, steps=10))
    lock = tmp_path / "nested" / "training.lock"
    lock.parent.mkdir()
    lock.write_text(str(os.getppid()))  # a process that runs: this arm is being trained elsewhere
    with pytest.raises(NestedAttentionError, match=f"being trained by another process \\(pid {os.getppid()}\\)"):
        trained(config)
    seen = []
    monkeypatch.setattr(toy_experiments, "train", lambda c: seen.append(lock.read_text()) or tmp_path / "exported")
    gone = next(pid for pid in range(4_000_000, 4_100_000) if not toy_experiments._running(pid))
    lock.write_text(str(gone))  # a process that no longer runs: its lock is taken over
    assert trained(config) == tmp_path / "exported"
    assert seen == [str(os.getpid())] and not lock.exists()  # held while training, released after
    assert json.loads((tmp_path / "nested" / "timing.json").read_text())["threads"] >= 1


def _metrics(domain, knob, values, offset):
    scored = lambda v: {domain: {m: v / 10 + offset for m in METRICS} | {f"baseline_{m}": offset for m in METRICS}}  # noqa: E731
    metrics = {"config": {"lams": [1.0], "scales": None}} | scored(values[0])
    if len(values) > 1:
        metrics[knob] = {f"{v:g}": scored(v) for v in values}
    return metrics


def test_the_report_is_the_mean_and_spread_over_seeds(tmp_path):
    experiment = EXPERIMENTS["mechanisms"]
    done = {"nested": {0: _metrics("person", "by_lambda", [1, 2], 0.0), 1: _metrics("person", "by_lambda", [1, 2], 0.2)},
            "decoupled": {0: _metrics("person", "by_scale", [0.5, 1], 0.0), 1: _metrics("person", "by_scale", [0.5, 1], 0.0)},
            "simple": {0: _metrics("person", None, [1], 0.1), 1: _metrics("person", None, [1], 0.3)}}
    budgets = {name: {"steps": 10, "batch_size": 32} for name in done}  # one training run per arm here
    knobs = {"nested": "lam", "decoupled": "scale", "simple": None}
    results = write_results(experiment, RunConfig(tmp_path, seeds=(0, 1)), done, budgets, knobs)
    nested = results["arms"]["nested"]["points"]
    assert [(p["knob"], p["value"]) for p in nested] == [("lam", 1.0), ("lam", 2.0)]
    assert nested[1]["id_top1"] == {"mean": pytest.approx(0.3), "std": pytest.approx(0.1), "values": [0.2, 0.4]}
    assert [p["value"] for p in results["arms"]["decoupled"]["points"]] == [0.5, 1.0]
    simple = results["arms"]["simple"]["points"]
    assert len(simple) == 1 and simple[0]["knob"] is None and simple[0]["clip_t"]["mean"] == pytest.approx(0.3)
    assert results["base_model"]["id_top1"]["values"] == [0.0, 0.2]  # per seed, from the first finished arm
    assert results["missing"] == ["global_v", "multi_token"]
    text = (tmp_path / "mechanisms.md").read_text()
    assert "| nested | λ 2 | 0.300 ± 0.100 |" in text and "| simple | as trained |" in text
    assert "| nested | nested | 10 | 32 | not timed by the runner |" in text  # a row per training run
    assert "| decoupled | scale 0.5 | +0.050 / +0.250 |" in text  # nested at λ 1 minus it, seed by seed
    assert "Not finished yet: global_v, multi_token." in text and (tmp_path / "mechanisms.png").stat().st_size > 1000
    assert json.loads((tmp_path / "mechanisms.json").read_text()) == results
    assert arm_points("person", done["nested"], "lam") == nested
    one = arm_points("person", {0: _metrics("person", None, [1], 0.0)}, "lam")  # one lambda is still a lambda
    assert [(p["knob"], p["value"]) for p in one] == [("lam", 1.0)]


def test_a_scenes_report_scores_both_subjects_and_the_leakage_of_both_runs(tmp_path):
    experiment = EXPERIMENTS["scenes"]
    scored = lambda v, leak: {m: v for m in SCENE_METRICS} | {"scene_leakage": leak} | {  # noqa: E731
        f"baseline_{m}": 0.0 for m in SCENE_METRICS}
    seed = lambda offset, leak: {"config": {"lams": [1.0, 2.0], "scales": None}} | scored(0.5 + offset, leak) | {  # noqa: E731
        "by_lambda": {"1": scored(0.5 + offset, leak), "2": scored(0.6 + offset, leak)}}
    done = {"nested": {0: seed(0.0, 0.1), 1: seed(0.2, None)}}  # no chance to leak at seed 1
    run = RunConfig(tmp_path, seeds=(0, 1), scenes=12)
    budgets = {"nested": {"steps": 10, "batch_size": 32}, "nested-pet": {"steps": 10, "batch_size": 32}}
    results = write_results(experiment, run, done, budgets, {"nested": "lam"})
    nested = results["arms"]["nested"]
    assert nested["runs"] == ["nested", "nested-pet"] and results["domains"] == ["person", "pet"]
    assert nested["points"][1]["scene_pet_top1"]["mean"] == pytest.approx(0.7)
    assert nested["points"][0]["scene_leakage"] == {"mean": pytest.approx(0.1), "std": 0.0, "values": [0.1, None]}
    assert results["evaluation"]["images_per_point_and_seed"] == 12 and results["missing"] == ["decoupled"]
    text = (tmp_path / "scenes.md").read_text()
    assert "(person + pet images)" in text and "| nested | λ 2 | 0.700 ± 0.100 |" in text
    assert "| nested-pet | nested | 10 | 32 |" in text and (tmp_path / "scenes.png").stat().st_size > 1000


def test_experiment_command_bad_input(tmp_path, capsys):
    for argv, message in (
        (["mechanisms", "--out", str(tmp_path), "--arms", "ipadapter"], "--arms ipadapter: the mechanisms experiment has the arms"),
        (["mechanisms", "--out", str(tmp_path), "--steps", "0"], "--steps is 0; expected at least 1"),
        (["mechanisms", "--out", str(tmp_path), "--seeds", "1", "1"], "repeats a seed"),
        (["mechanisms", "--out", str(tmp_path), "--data", str(tmp_path / "none")], "holds no metadata.jsonl"),
        (["scenes", "--out", str(tmp_path), "--data", str(tmp_path)], "trains adapters of person and pet"),
        (["scenes", "--out", str(tmp_path), "--scenes", "0"], "--scenes is 0; expected at least 1"),
    ):
        assert main(["toy", "experiment", *argv]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["toy", "experiment", "--help"])
    assert "mechanisms  Fig. 10" in capsys.readouterr().out


@pytest.mark.slow
def test_experiment_end_to_end_and_resumed(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["toy", "data", "--out", str(data), "--domain", "person", "--count", "8", "--workers", "1"]) == 0
    argv = ["toy", "experiment", "mechanisms", "--out", str(tmp_path / "run"), "--steps", "1", "--identities", "2",
            "--contexts", "1", "--seeds", "0", "1", "--data", str(data), "--arms", "nested", "simple"]
    assert main(argv) == 0
    results = json.loads((tmp_path / "run" / "mechanisms.json").read_text())
    assert set(results["arms"]) == {"nested", "simple"} and len(results["arms"]["nested"]["points"]) == 6
    timing = (tmp_path / "run" / "nested" / "timing.json").read_text()
    assert main(argv) == 0  # everything is reused: nothing retrained, the same numbers
    assert (tmp_path / "run" / "nested" / "timing.json").read_text() == timing
    assert json.loads((tmp_path / "run" / "mechanisms.json").read_text()) == results
    # the views experiment shares the nested arm's training run: it only evaluates, with 2 and 4 views
    assert main(["toy", "experiment", "views", *argv[3:-3], "--arms", "1-view", "2-views"]) == 0
    assert (tmp_path / "run" / "nested" / "timing.json").read_text() == timing
    views = json.loads((tmp_path / "run" / "views.json").read_text())
    assert views["arms"]["1-view"]["points"][0]["id_top1"] == results["arms"]["nested"]["points"][0]["id_top1"]
    assert (tmp_path / "run" / "nested" / "eval-1-2-views" / "metrics.json").is_file()
    # the views experiment scored the shared run at lambda 1 only; the mechanisms experiment keeps its six lambdas
    assert main(argv) == 0
    assert json.loads((tmp_path / "run" / "mechanisms.json").read_text()) == results


@pytest.mark.slow
def test_scenes_experiment_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the scenes experiment reads each recipe's data, data/toy-<domain>
    for domain in ("person", "pet"):
        assert main(["toy", "data", "--out", f"data/toy-{domain}", "--domain", domain, "--count", "8",
                     "--workers", "1"]) == 0
    argv = ["toy", "experiment", "scenes", "--out", "run", "--steps", "1", "--identities", "2", "--scenes", "3",
            "--seeds", "0", "--arms", "nested"]
    assert main(argv) == 0
    results = json.loads((tmp_path / "run" / "scenes.json").read_text())
    assert results["arms"]["nested"]["runs"] == ["nested", "nested-pet"]
    assert len(results["arms"]["nested"]["points"]) == 6 and results["missing"] == ["decoupled"]
    pet = yaml.safe_load((tmp_path / "run" / "nested-pet" / "config.yaml").read_text())
    assert pet["word"] == "pet" and pet["data"] == "data/toy-pet"
    records = read_records(tmp_path / "run" / "nested" / "scenes-eval-0" / "records.jsonl")
    assert {r["labels"]["domain"] for r in records} == {"scene"} and len(records) == 3 * 6 + 3 + 3
    assert "nested, seed 0: scene_person_top1" in capsys.readouterr().out
