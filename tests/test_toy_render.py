"""Drawing the toy world: deterministic renders, every factor value and every attribute value visible, the masks
that the word-grounding loss reads, and the scenes with two subjects (numpy + PIL only)."""

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from nested_attention_toy.render import (
    SCENE_SIZE,
    SCENES,
    STYLES,
    render_example_grid,
    render_input,
    render_scene,
    render_target,
    split_scene,
)
from nested_attention_toy.world import (
    CONTEXT_FACTORS,
    DOMAINS,
    Context,
    Identity,
    attribute_names,
    attribute_values,
    identity_count,
    identity_from_index,
    sample_context,
)

BASE = Context.from_names(scene="forest", style="cartoon", expression="smiling", position="center")


def pixels(image):
    return np.asarray(image, dtype=np.int16)


def changed_fraction(a, b, threshold=12):
    """The fraction of pixels whose largest channel difference exceeds ``threshold``."""
    return float((np.abs(pixels(a) - pixels(b)).max(axis=2) > threshold).mean())


def some_identity(domain, k=0):
    return identity_from_index(domain, (7919 * (k + 1) + 13) % identity_count(domain))


def test_registries_cover_the_factors():
    assert set(SCENES) == set(CONTEXT_FACTORS["scene"]) and set(STYLES) == set(CONTEXT_FACTORS["style"])


@pytest.mark.parametrize("domain", DOMAINS)
def test_renders_are_deterministic_and_seeded(domain):
    identity = some_identity(domain)
    a = render_target(identity, BASE, 64, seed=3)
    assert a.image.size == (64, 64) and a.image.mode == "RGB"
    assert a.subject.shape == a.symbol.shape == (64, 64) and a.subject.dtype == np.float32
    again = render_target(identity, BASE, 64, seed=3)
    assert a.image.tobytes() == again.image.tobytes() and np.array_equal(a.subject, again.subject)
    assert a.image.tobytes() != render_target(identity, BASE, 64, seed=4).image.tobytes()
    i = render_input(identity, 64, seed=3)
    assert i.tobytes() == render_input(identity, 64, seed=3).tobytes()
    assert changed_fraction(i, render_input(identity, 64, seed=4)) > 0.01
    assert render_target(identity, BASE, 128, seed=3).image.size == (128, 128)
    assert render_input(identity, 128, seed=3).size == (128, 128)
    with pytest.raises(ValueError):
        render_input(identity, 50)


def test_renders_are_identical_in_another_process():
    code = (
        "import hashlib\n"
        "from nested_attention_toy.render import render_target, render_input, render_scene\n"
        "from nested_attention_toy.world import Context, identity_from_index\n"
        "c = Context((2, 3, 1, 0)); p = identity_from_index('person', 999); q = identity_from_index('pet', 432)\n"
        "images = [render_target(p, c, 64, 7).image, render_input(q, 64, 7), render_scene(p, q, c, 64, 7).image]\n"
        "print(hashlib.sha256(b''.join(im.tobytes() for im in images)).hexdigest())\n"
    )
    c = Context((2, 3, 1, 0))
    p, q = identity_from_index("person", 999), identity_from_index("pet", 432)
    images = [render_target(p, c, 64, 7).image, render_input(q, 64, 7), render_scene(p, q, c, 64, 7).image]
    here = hashlib.sha256(b"".join(im.tobytes() for im in images)).hexdigest()
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout.strip()
    assert here == there


@pytest.mark.parametrize("domain", DOMAINS)
def test_every_factor_value_changes_the_target(domain):
    identity = some_identity(domain, 1)
    for base_style in CONTEXT_FACTORS["style"]:
        base = BASE.replace(style=base_style)
        for factor, values in CONTEXT_FACTORS.items():
            renders = {v: render_target(identity, base.replace(**{factor: v}), 64, layout_seed=5).image for v in values}
            for k, v in enumerate(values):
                for w in values[k + 1:]:
                    # the expression changes the face and its symbol; every other factor much of the image
                    minimum = 0.02 if factor == "expression" else 0.08
                    assert changed_fraction(renders[v], renders[w]) > minimum, (base_style, factor, v, w)


@pytest.mark.parametrize("domain", DOMAINS)
def test_every_attribute_value_changes_a_large_area_in_every_style(domain):
    """Identity is drawn large: with the layout fixed (``layout_seed``), changing any one attribute changes at least
    2 % of the pixels (82 pixels of 64 x 64, about 5 latent pixels) of the input view and of the target in every
    style, and the subject covers a large part of the frame."""
    identity = some_identity(domain, 3)
    contexts = {style: BASE.replace(style=style) for style in CONTEXT_FACTORS["style"]}
    base = {style: render_target(identity, c, 64, layout_seed=9) for style, c in contexts.items()}
    assert all(r.subject.mean() > 0.15 for r in base.values())
    base_input = render_input(identity, 64, layout_seed=9)
    for a, name in enumerate(attribute_names(domain)):
        for value in range(len(attribute_values(domain, name))):
            if value == identity.attributes[a]:
                continue
            other = Identity(domain, identity.attributes[:a] + (value,) + identity.attributes[a + 1:])
            assert changed_fraction(base_input, render_input(other, 64, layout_seed=9), 8) > 0.02, (name, value)
            for style, context in contexts.items():
                changed = changed_fraction(base[style].image, render_target(other, context, 64, layout_seed=9).image, 8)
                assert changed > 0.02, (name, attribute_values(domain, name)[value], style)


def test_layout_seed_shares_the_layout_across_identities():
    a, b = some_identity("person", 1), some_identity("person", 2)
    context = BASE.replace(style="photo", scene="city street")
    shared = changed_fraction(render_target(a, context, layout_seed=1).image, render_target(b, context, layout_seed=1).image)
    free = changed_fraction(render_target(a, context, seed=1).image, render_target(b, context, seed=1).image)
    assert shared < free
    assert (render_target(a, context, seed=5, layout_seed=1).image.tobytes()
            == render_target(a, context, seed=6, layout_seed=1).image.tobytes())


@pytest.mark.parametrize("domain", DOMAINS)
def test_input_and_target_differ(domain):
    """The input view cannot be pasted into a target: another scale, pose and background."""
    for k in range(3):
        identity = some_identity(domain, k)
        view = render_input(identity, 64, seed=k)
        for style in ("cartoon", "photo"):
            target = render_target(identity, BASE.replace(style=style), 64, seed=k).image
            assert changed_fraction(view, target, 30) > 0.4


@pytest.mark.parametrize("position", CONTEXT_FACTORS["position"])
def test_masks_cover_the_subject_and_its_symbol(position):
    """The subject mask is where the subject is drawn (its centre of mass follows the position); the symbol mask is
    the emotion symbol alone, inside the frame and apart from most of the subject."""
    centres = []
    for k in range(6):
        identity = some_identity(DOMAINS[k % 2], k)
        rendered = render_target(identity, BASE.replace(position=position), 64, seed=k)
        subject, symbol = rendered.subject, rendered.symbol
        assert 0 <= subject.min() and subject.max() <= 1 and subject.mean() > 0.15
        assert 30 <= (symbol > 0.5).sum() <= 400 and (symbol * subject).sum() < 0.5 * symbol.sum()
        xs = np.arange(64)[None, :]
        centres.append(float((subject * xs).sum() / subject.sum()) / 64)
    expected = {"left": (0.2, 0.42), "center": (0.4, 0.6), "right": (0.58, 0.8)}[position]
    assert all(expected[0] < c < expected[1] for c in centres), centres


@pytest.mark.parametrize("position", ["left", "right"])
def test_a_scene_gives_each_subject_its_own_half_as_large_as_alone(position):
    person, pet = some_identity("person"), some_identity("pet")
    context = BASE.replace(position=position)
    scene = render_scene(person, pet, context, 64, seed=1)
    assert scene.image.size == SCENE_SIZE and scene.subject.shape == scene.pet.shape == (64, 128)
    assert scene.image.tobytes() == render_scene(person, pet, context, 64, seed=1).image.tobytes()
    assert changed_fraction(scene.image, render_scene(person, pet, context, 64, seed=1, pet_expression=2).image) > 0.001
    halves = {"left": slice(0, 64), "right": slice(64, 128)}
    other = "right" if position == "left" else "left"
    for coverage, side, alone in ((scene.subject, position, person), (scene.pet, other, pet)):
        own, elsewhere = coverage[:, halves[side]].sum(), coverage[:, halves["left" if side == "right" else "right"]].sum()
        assert elsewhere < 0.02 * own  # each subject stays in its half
        single = render_target(alone, BASE, 64, seed=1).subject.sum()  # the same subject alone, centred
        assert 0.85 < own / single < 1.15  # as large as alone
    cut = split_scene(scene.image, context)
    assert cut["person"].size == cut["pet"].size == (64, 64)
    left = "person" if position == "left" else "pet"
    assert cut[left].tobytes() == scene.image.crop((0, 0, 64, 64)).tobytes()
    with pytest.raises(ValueError, match="left or the right half"):
        render_scene(person, pet, BASE, 64)  # a scene has no centre
    with pytest.raises(ValueError):
        render_scene(pet, person, context)
    with pytest.raises(ValueError, match="twice as wide"):
        split_scene(render_target(person, BASE).image, context)


def test_scene_contexts_draw_the_person_half_evenly():
    rng = np.random.default_rng(0)
    drawn = [sample_context(rng, "scene").name("position") for _ in range(400)]
    assert set(drawn) == {"left", "right"} and 160 < drawn.count("left") < 240


def test_scenes_are_painted_across_the_whole_width():
    """A wide canvas gets the scene's objects over its whole width, as densely as a square one."""
    from PIL import Image

    from nested_attention_toy.render.scenes import SCENES

    for name, paint in SCENES.items():
        square, wide = Image.new("RGB", (128, 128)), Image.new("RGB", (256, 128))
        paint(square, np.random.default_rng(3), 0)
        paint(wide, np.random.default_rng(3), 0)
        a = np.asarray(wide, np.float32)
        left, right = a[:, :128], a[:, 128:]
        assert np.abs(left.std((0, 1)) - right.std((0, 1))).max() < 0.5 * left.std((0, 1)).max() + 8, name
        assert not (np.asarray(wide)[:, -1] == 0).all(), name  # nothing left unpainted at the right edge


def test_example_grid_shows_scenes_two_columns_wide():
    person, pet = some_identity("person"), some_identity("pet")
    grid = render_example_grid([person, pet], [BASE, BASE.replace(style="watercolor")], size=32, pad=1)
    assert grid.size[1] == 1 + 33 * 3


def test_bundled_examples_are_held_out_renders():
    from nested_attention_toy.examples import EXAMPLES, load_example, render_example

    assert len({e.name for e in EXAMPLES}) == len(EXAMPLES) and {e.identity.domain for e in EXAMPLES} == set(DOMAINS)
    for example in EXAMPLES:
        assert example.identity.held_out, example.name
        assert np.array_equal(pixels(load_example(example.name)), pixels(render_example(example))), example.name


def test_renders_do_not_depend_on_the_number_of_workers():
    """The CLI's --workers defaults to every core, so the same command must make the same corpus on any machine."""
    from nested_attention_toy.corpus import make_corpus

    alone = make_corpus(300, seed=5, workers=1, masks=True, symbols=True)  # 300 >= 256: the pool path below
    pooled = make_corpus(300, seed=5, workers=2, masks=True, symbols=True)
    assert np.array_equal(alone.images.numpy(), pooled.images.numpy()) and alone.captions == pooled.captions
    assert np.array_equal(alone.masks.numpy(), pooled.masks.numpy()) and np.array_equal(alone.symbols.numpy(), pooled.symbols.numpy())


def test_describe_rate_changes_captions_not_images():
    from nested_attention_toy.corpus import make_corpus
    from nested_attention_toy.world import prompt_factors

    plain = make_corpus(40, seed=3, workers=1, describe_rate=0.0)
    described = make_corpus(40, seed=3, workers=1, describe_rate=1.0)
    assert np.array_equal(plain.images.numpy(), described.images.numpy()) and plain.kinds == described.kinds
    for a, b in zip(plain.captions, described.captions):  # the same caption with attribute phrases before the word
        assert a != b and prompt_factors(a) == prompt_factors(b)
