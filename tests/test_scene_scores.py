"""Person + pet scenes scored on their own: each subject's attributes, and the colour leakage between the two."""

import itertools

import numpy as np
import pytest

from nested_attention_eval.toy_eval import SCENE, ToyEvalConfig, ToyPlan, ToyScorer, summarize_toy
from nested_attention_eval.toy_scorers import colour_leaks
from nested_attention_toy.assets import shipped_path
from nested_attention_toy.metric_models import FactorClassifier
from nested_attention_toy.world import (
    COLOUR_COUNTERPARTS,
    DOMAINS,
    attribute_names,
    attribute_values,
    colour_of,
    identity_from_names,
    sample_identities,
)


def _read(subjects, **changed):
    """Each subject's true attribute indices, with ``changed`` ("pet.fur_color" -> value name) read instead."""
    read = {d: dict(zip(attribute_names(d), s.attributes)) for d, s in subjects.items()}
    for key, value in changed.items():
        domain, name = key.split("__")
        read[domain][name] = attribute_values(domain, name).index(value)
    return read


def test_a_leak_is_a_subject_read_in_the_other_subjects_colour():
    person = identity_from_names("person", hair_color="black", hair_style="short", skin_tone="tan",
                                 shirt_color="red", facial_hair="none")
    pet = identity_from_names("pet", species="cat", fur_color="white", markings="plain", neckwear="blue collar")
    subjects = {"person": person, "pet": pet}
    # black hair -> white fur, white fur -> black hair, red shirt -> blue collar, blue collar -> red shirt
    assert colour_leaks(subjects, _read(subjects)) == (4, 0)
    assert colour_leaks(subjects, _read(subjects, pet__fur_color="black")) == (4, 1)
    assert colour_leaks(subjects, _read(subjects, pet__neckwear="red bandana", person__hair_color="white")) == (4, 2)
    assert colour_leaks(subjects, _read(subjects, pet__fur_color="grey")) == (4, 0)  # wrong, but not the person's
    blonde = identity_from_names("person", hair_color="blonde", hair_style="short", skin_tone="tan",
                                 shirt_color="blue", facial_hair="none")
    # no fur is blonde; white fur can still leak onto the hair; a shared colour is no chance
    assert colour_leaks({"person": blonde, "pet": pet}, _read({"person": blonde, "pet": pet})) == (1, 0)


def test_reading_every_subject_in_its_partners_colour_leaks_at_every_chance():
    rng = np.random.default_rng(0)
    for person, pet in zip(sample_identities("person", 30, rng, held_out=False),
                           sample_identities("pet", 30, rng, held_out=False)):
        subjects = {"person": person, "pet": pet}
        chances, leaks = colour_leaks(subjects, _read(subjects))
        assert leaks == 0
        swapped = _read(subjects)
        for pair in COLOUR_COUNTERPARTS:
            for source, target in itertools.permutations(range(2)):
                (domain, name), (other, mine) = (DOMAINS[source], pair[source]), (DOMAINS[target], pair[target])
                colour = colour_of(domain, name, subjects[domain].attributes[attribute_names(domain).index(name)])
                matches = [i for i in range(len(attribute_values(other, mine))) if colour_of(other, mine, i) == colour]
                if matches:
                    swapped[other][mine] = matches[0]
        assert colour_leaks(subjects, swapped) == (chances, chances)


@pytest.fixture(scope="module")
def scene_plan():
    return ToyPlan(ToyEvalConfig(seed=1, identities=6, contexts=0, scenes=16), {"person": None, "pet": None})


def test_a_scenes_only_plan_holds_scenes_of_its_own_subjects(scene_plan):
    assert len(scene_plan.cases) == 16 and all(c[3]["domain"] == SCENE for c in scene_plan.cases)
    assert all(set(c[3]["owners"].values()) <= set(range(6)) for c in scene_plan.cases)


def test_real_scenes_show_each_subjects_attributes_and_no_leakage(scene_plan):
    """The identity networks read real person + pet renders (on 200 of them: attributes 0.98 / 0.93, the colours
    1.00 / 0.98, leakage 0.004): on them the leakage is a misreading rate. The bars leave room for a few misreads
    (the pets' markings and species are the hardest to read) in 16 scenes."""
    jobs = [j for s in scene_plan.settings if s.name == "oracle" for j in scene_plan.jobs(s)]
    images = [scene_plan.render(j) for j in jobs]
    classifier = FactorClassifier.from_pretrained(shipped_path("metrics/factor_classifier"))
    columns = ToyScorer(scene_plan, classifier).score(images, jobs, scene_plan)
    records = [{"labels": j.labels, "clip_t": 0.0} | {k: v[i] for k, v in columns.items()} for i, j in enumerate(jobs)]
    summary = summarize_toy({"oracle": records})
    assert summary["oracle_scene_person_attribute_accuracy"] >= 0.9
    assert summary["oracle_scene_pet_attribute_accuracy"] >= 0.8
    assert summary["scene_leak_chances"] >= 16 and summary["oracle_scene_leakage"] <= 0.1
    assert "oracle_id_top1" not in summary  # no subject alone in this plan
