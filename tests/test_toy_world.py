"""The toy world: identities and their split, contexts, prompts, and deterministic renders (numpy + PIL only)."""

import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest

from nested_attention_toy.render import render_example_grid, render_input, render_scene, render_target
from nested_attention_toy.world import (
    COLOR_ATTRIBUTES,
    CONTEXT_FACTORS,
    DOMAINS,
    FACTOR_NAMES,
    MAX_DESCRIBED,
    SHAPE_ATTRIBUTES,
    SUBJECT_WORDS,
    Context,
    Identity,
    attribute_names,
    attribute_phrase,
    attribute_values,
    describe_attributes,
    described_caption,
    generic_caption,
    identity_count,
    identity_from_index,
    is_held_out,
    prompt,
    prompt_factors,
    sample_context,
    sample_identities,
    scene_prompt,
    vocabulary,
)


def pixels(image):
    return np.asarray(image, dtype=np.int16)


def changed_fraction(a, b, threshold=12):
    """The fraction of pixels whose largest channel difference exceeds ``threshold``."""
    return float((np.abs(pixels(a) - pixels(b)).max(axis=2) > threshold).mean())


def some_identity(domain, k=0):
    return identity_from_index(domain, (7919 * (k + 1) + 13) % identity_count(domain))


BASE = Context.from_names(scene="forest", style="cartoon", expression="smiling", position="center", size="large")

# ------------------------------------------------------------------------------------------------- identities


@pytest.mark.parametrize("domain", DOMAINS)
def test_identity_space(domain):
    names = attribute_names(domain)
    assert identity_count(domain) >= 10_000
    assert len(names) >= 6
    assert all(len(attribute_values(domain, name)) >= 2 for name in names)
    assert len(SHAPE_ATTRIBUTES[domain]) >= 3 and len(COLOR_ATTRIBUTES[domain]) >= 2
    assert set(SHAPE_ATTRIBUTES[domain]) | set(COLOR_ATTRIBUTES[domain]) == set(names)
    assert identity_count(domain) == int(np.prod([len(attribute_values(domain, n)) for n in names]))


@pytest.mark.parametrize("domain", DOMAINS)
def test_index_bijection(domain):
    count = identity_count(domain)
    indices = [0, 1, count - 1] + np.random.default_rng(0).integers(0, count, 500).tolist()
    for index in indices:
        identity = identity_from_index(domain, index)
        assert identity.index == index
        assert Identity(domain, identity.attributes) == identity
        assert identity_from_index(domain, Identity(domain, identity.attributes).index) == identity
    assert len({identity_from_index(domain, i).attributes for i in range(2000)}) == 2000
    with pytest.raises(ValueError):
        identity_from_index(domain, count)
    with pytest.raises(ValueError):
        Identity(domain, (0,) * (len(attribute_names(domain)) + 1))
    described = identity_from_index(domain, 5).describe()
    assert all(name in described for name in attribute_names(domain))


@pytest.mark.parametrize("domain", DOMAINS)
def test_split_is_about_a_fifth(domain):
    rng = np.random.default_rng(1)
    indices = rng.choice(identity_count(domain), 20_000, replace=False)
    held = np.mean([is_held_out(identity_from_index(domain, int(i))) for i in indices])
    assert 0.15 <= held <= 0.25


# Computed once from the rule (sha256 of "{domain}:{index}" < 0.2 * 2**64); a change here means the split moved.
FROZEN_SPLIT = {
    "person": {0: True, 1: True, 2: False, 3: False, 4: True, 5: True, 6: False, 7: False, 8: True, 9: False, 10: True, 11: False, 1000: True, 12345: False, 207359: False},
    "pet": {0: False, 1: False, 2: False, 3: False, 4: True, 5: False, 6: False, 7: False, 8: True, 9: False, 10: False, 11: False, 1000: False, 12345: False, 38399: False},
}


@pytest.mark.parametrize("domain", DOMAINS)
def test_split_is_frozen(domain):
    for index, held in FROZEN_SPLIT[domain].items():
        identity = identity_from_index(domain, index)
        assert is_held_out(identity) is held and identity.held_out is held


@pytest.mark.parametrize("domain", DOMAINS)
@pytest.mark.parametrize("held_out", [False, True])
def test_sample_identities_stays_on_its_side(domain, held_out):
    for n in (1, 300):
        chosen = sample_identities(domain, n, np.random.default_rng(n), held_out=held_out)
        assert len(chosen) == n and len(set(chosen)) == n
        assert all(i.domain == domain and i.held_out is held_out for i in chosen)
    again = sample_identities(domain, 300, np.random.default_rng(300), held_out=held_out)
    assert again == sample_identities(domain, 300, np.random.default_rng(300), held_out=held_out)


def test_sample_identities_dense_request():
    held = sample_identities("pet", 7000, np.random.default_rng(0), held_out=True)
    assert len(set(held)) == 7000 and all(i.held_out for i in held)
    with pytest.raises(ValueError):
        sample_identities("pet", identity_count("pet"), np.random.default_rng(0), held_out=True)


# --------------------------------------------------------------------------------------------------- prompts


def test_context_api():
    context = Context.from_names(scene="desert", style="neon", expression="angry", position="left", size="small")
    assert context["scene"] == CONTEXT_FACTORS["scene"].index("desert") == context.values["scene"]
    assert context.name("style") == "neon" and context.values.keys() == FACTOR_NAMES
    assert context == Context(tuple(context.values)) and hash(context) == hash(Context(tuple(context.values)))
    assert context.replace(style="photo").name("style") == "photo"
    restored = pickle.loads(pickle.dumps(context))  # contexts and identities travel to worker processes
    assert restored == context and restored["scene"] == context["scene"]
    assert pickle.loads(pickle.dumps(identity_from_index("pet", 5))) == identity_from_index("pet", 5)
    assert len(CONTEXT_FACTORS) >= 4 and len(CONTEXT_FACTORS["scene"]) >= 6 and len(CONTEXT_FACTORS["style"]) >= 4
    with pytest.raises(ValueError):
        Context((0, 0, 0))
    seen = {f: set() for f in FACTOR_NAMES}
    rng = np.random.default_rng(0)
    for _ in range(500):
        c = sample_context(rng, "pet")
        for f in FACTOR_NAMES:
            seen[f].add(c[f])
    assert all(seen[f] == set(range(len(CONTEXT_FACTORS[f]))) for f in FACTOR_NAMES)


def test_prompts_use_the_vocabulary_and_name_the_subject_once():
    vocab = set(vocabulary())
    assert len(vocab) == len(vocabulary()) and all(re.fullmatch("[a-z]+", w) for w in vocab)
    assert {"person", "pet", "woman", "man", "child", "dog", "cat", "animal"} <= vocab
    rng = np.random.default_rng(0)
    for k in range(400):
        domain = DOMAINS[k % 2]
        word = SUBJECT_WORDS[domain][k % len(SUBJECT_WORDS[domain])]
        context = sample_context(rng, domain)
        for text in (prompt(word, context, rng), prompt(word, context), generic_caption(domain, context, rng)):
            assert re.fullmatch("[a-z ,]+", text), text
            words = text.replace(",", " ").split()
            assert set(words) <= vocab, text
        assert prompt(word, context).replace(",", " ").split().count(word) == 1
        assert prompt(word, context, rng).replace(",", " ").split().count(word) == 1
        assert generic_caption(domain, context).replace(",", " ").split().count(domain) == 1
        both = scene_prompt("woman", "dog", context, rng).split()
        assert both.count("woman") == 1 and both.count("dog") == 1 and set(w.strip(",") for w in both) <= vocab
    assert generic_caption("person", BASE) == prompt("person", BASE)
    assert "an angry" in prompt("person", BASE.replace(expression="angry"))


def test_described_captions_name_true_attributes_before_the_subject_word(tmp_path):
    from nested_attention.tiny import write_clip_tokenizer

    vocab = set(vocabulary())
    rng = np.random.default_rng(0)
    for k in range(300):
        domain = DOMAINS[k % 2]
        identity = identity_from_index(domain, int(rng.integers(identity_count(domain))))
        context = sample_context(rng) if k % 3 else None
        text = described_caption(identity, context, rng)
        words = text.replace(",", " ").split()
        assert set(words) <= vocab and words.count(domain) == 1, text
        before = " " + text[: text.index(f" {domain}")].replace(",", " ") + " "
        true = [p for n, v in identity.as_dict().items() if (p := attribute_phrase(domain, n, v))]
        named = [p for p in true if f" {p} " in before]
        assert 1 <= len(named) <= MAX_DESCRIBED, text
        for name, values in zip(attribute_names(domain), (attribute_values(domain, n) for n in attribute_names(domain))):
            for value in values:  # no phrase of a value the identity does not have (except a word shared by both)
                phrase = attribute_phrase(domain, name, value)
                if phrase and phrase not in true and not any(phrase in t for t in true):
                    assert f" {phrase} " not in before, (text, phrase)
        if context is not None:  # the context is still read back exactly
            assert prompt_factors(text) == context.as_dict(), text
    assert describe_attributes(identity, rng, count=1).count(",") == 0
    # the longest possible described caption fits the toy text encoder with its subject word
    tokenizer = write_clip_tokenizer(tmp_path, vocabulary(), max_length=32)
    longest = max((described_caption(identity_from_index("person", i), sample_context(rng), rng) for i in range(0, 40000, 97)),
                  key=lambda t: len(tokenizer(t).input_ids))
    assert len(tokenizer(longest).input_ids) <= 32


def test_every_factor_value_is_in_the_prompts():
    rng = np.random.default_rng(0)
    for factor, values in CONTEXT_FACTORS.items():
        for value in values:
            context = sample_context(rng, "person").replace(**{factor: value})
            for _ in range(6):
                assert value in prompt("person", context, rng), (factor, value)
    all_contexts = [Context((s, 0, 0, 0, 0)) for s in range(len(CONTEXT_FACTORS["scene"]))]
    assert len({prompt("pet", c) for c in all_contexts}) == len(all_contexts)


# --------------------------------------------------------------------------------------------------- renders


@pytest.mark.parametrize("domain", DOMAINS)
def test_renders_are_deterministic_and_seeded(domain):
    identity = some_identity(domain)
    a = render_target(identity, BASE, 64, seed=3)
    assert a.size == (64, 64) and a.mode == "RGB"
    assert a.tobytes() == render_target(identity, BASE, 64, seed=3).tobytes()
    assert a.tobytes() != render_target(identity, BASE, 64, seed=4).tobytes()
    i = render_input(identity, 64, seed=3)
    assert i.tobytes() == render_input(identity, 64, seed=3).tobytes()
    assert changed_fraction(i, render_input(identity, 64, seed=4)) > 0.01
    assert render_target(identity, BASE, 128, seed=3).size == (128, 128)
    assert render_input(identity, 128, seed=3).size == (128, 128)


def test_renders_are_identical_in_another_process():
    code = (
        "import hashlib, sys\n"
        "from nested_attention_toy.render import render_target, render_input, render_scene\n"
        "from nested_attention_toy.world import Context, identity_from_index\n"
        "c = Context((2, 5, 1, 0, 1)); p = identity_from_index('person', 999); q = identity_from_index('pet', 4321)\n"
        "images = [render_target(p, c, 64, 7), render_input(q, 64, 7), render_scene(p, q, c, 64, 7)]\n"
        "print(hashlib.sha256(b''.join(im.tobytes() for im in images)).hexdigest())\n"
    )
    import hashlib

    from nested_attention_toy.world import Context

    c = Context((2, 5, 1, 0, 1))
    p, q = identity_from_index("person", 999), identity_from_index("pet", 4321)
    images = [render_target(p, c, 64, 7), render_input(q, 64, 7), render_scene(p, q, c, 64, 7)]
    here = hashlib.sha256(b"".join(im.tobytes() for im in images)).hexdigest()
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout.strip()
    assert here == there


@pytest.mark.parametrize("domain", DOMAINS)
def test_every_factor_value_changes_the_target(domain):
    identity = some_identity(domain, 1)
    for base_style in ("cartoon", "pencil sketch"):
        base = BASE.replace(style=base_style)
        for factor, values in CONTEXT_FACTORS.items():
            renders = {v: render_target(identity, base.replace(**{factor: v}), 64, layout_seed=5) for v in values}
            for v in values:
                for w in values:
                    if v < w:
                        # the expression changes the face only; every other factor changes much of the image
                        minimum = 0.008 if factor == "expression" else 0.05
                        assert changed_fraction(renders[v], renders[w]) > minimum, (base_style, factor, v, w)


def expression_region_changes(identity):
    """Expressions change the face only: compare with the same pose (same seed, same other factors)."""
    base = BASE.replace(size="large")
    renders = [render_target(identity, base.replace(expression=e), 64, layout_seed=8) for e in CONTEXT_FACTORS["expression"]]
    return [changed_fraction(a, b, 20) for k, a in enumerate(renders) for b in renders[k + 1 :]]


@pytest.mark.parametrize("domain", DOMAINS)
def test_expressions_are_distinct(domain):
    assert min(expression_region_changes(some_identity(domain, 2))) > 0.008


@pytest.mark.parametrize("domain", DOMAINS)
def test_every_attribute_value_changes_every_style(domain):
    """Identity is visible everywhere: with the layout fixed (``layout_seed``), changing any one attribute changes the
    input view and the target in every style, large and small (colours keep distinct grey levels for the pencil)."""
    identity = some_identity(domain, 3)
    styles = CONTEXT_FACTORS["style"]
    contexts = {(size, style): BASE.replace(size=size, style=style) for size in ("large", "small") for style in styles}
    base_renders = {key: render_target(identity, c, 64, layout_seed=9) for key, c in contexts.items()}
    base_input = render_input(identity, 64, layout_seed=9)
    for a, name in enumerate(attribute_names(domain)):
        for value in range(len(attribute_values(domain, name))):
            if value == identity.attributes[a]:
                continue
            other = Identity(domain, identity.attributes[:a] + (value,) + identity.attributes[a + 1 :])
            assert changed_fraction(base_input, render_input(other, 64, layout_seed=9), 8) > 0.008, (name, value)
            for (size, style), context in contexts.items():
                changed = changed_fraction(base_renders[size, style], render_target(other, context, 64, layout_seed=9), 8)
                assert changed > (0.003 if size == "large" else 0.0005), (name, attribute_values(domain, name)[value], size, style)


def test_layout_seed_shares_the_layout_across_identities():
    a, b = some_identity("person", 1), some_identity("person", 2)
    context = BASE.replace(style="photo", scene="city street")
    shared = changed_fraction(render_target(a, context, layout_seed=1), render_target(b, context, layout_seed=1))
    free = changed_fraction(render_target(a, context, seed=1), render_target(b, context, seed=1))
    assert shared < free
    assert render_target(a, context, seed=5, layout_seed=1).tobytes() == render_target(a, context, seed=6, layout_seed=1).tobytes()


@pytest.mark.parametrize("domain", DOMAINS)
def test_input_and_target_differ(domain):
    for k in range(3):
        identity = some_identity(domain, k)
        view = render_input(identity, 64, seed=k)
        for style in ("cartoon", "photo"):
            target = render_target(identity, BASE.replace(style=style), 64, seed=k)
            assert changed_fraction(view, target, 30) > 0.4
            assert np.abs(pixels(view) - pixels(target)).mean() > 25


def test_scene_and_grid():
    person, pet = some_identity("person"), some_identity("pet")
    image = render_scene(person, pet, BASE, 64, seed=1)
    assert image.size == (64, 64)
    assert image.tobytes() == render_scene(person, pet, BASE, 64, seed=1).tobytes()
    assert changed_fraction(image, render_target(person, BASE, 64, seed=1)) > 0.05
    assert changed_fraction(image, render_scene(person, pet, BASE, 64, seed=1, pet_expression=4)) > 0.001
    with pytest.raises(ValueError):
        render_scene(pet, person, BASE)
    grid = render_example_grid([person, pet], [BASE, BASE.replace(style="neon")], size=32, pad=1)
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

    plain = make_corpus(40, seed=3, workers=1, describe_rate=0.0)
    described = make_corpus(40, seed=3, workers=1, describe_rate=1.0)
    assert np.array_equal(plain.images.numpy(), described.images.numpy()) and plain.kinds == described.kinds
    for kind, a, b in zip(plain.kinds, plain.captions, described.captions):
        if kind == "scene":
            assert a == b
        else:  # the same caption with attribute phrases before the subject word
            assert a != b and prompt_factors(a) == prompt_factors(b)


@pytest.mark.parametrize("expression", CONTEXT_FACTORS["expression"])
def test_emotion_symbol_is_never_cut_by_the_frame(expression):
    """Wherever the head is (frame edges included), however it is scaled, tilted or mirrored, the emotion symbol lies
    wholly inside the frame, stays upright, and is at least 11.5 px across (height or width) at 64 px: nominally 12, less pixel rounding."""
    from PIL import Image, ImageDraw

    from nested_attention_toy.render import _emote, _Pen

    canvas = 128  # the renderer's 2x canvas of a 64 px image
    shapes = set()
    for ox in (0, 10, 64, 118, 128):
        for oy in (0, 64, 128):
            for scale in (40.0, 90.0, 160.0):  # canvas pixels per subject unit: small to large subjects
                for angle, flip in ((0.0, False), (0.12, True), (-0.12, False)):
                    image = Image.new("RGB", (canvas, canvas), (0, 0, 0))
                    pen = _Pen(ImageDraw.Draw(image), ox, oy, scale, angle=angle, flip=flip, ow=0)
                    _emote(pen, expression, 0.3, 0.2)
                    pixels = np.asarray(image).max(axis=2) > 0
                    ys, xs = np.nonzero(pixels)
                    assert len(xs), (ox, oy, scale)
                    assert xs.min() > 0 and ys.min() > 0 and xs.max() < canvas - 1 and ys.max() < canvas - 1, (ox, oy, scale, angle, flip)
                    if scale == 90.0:
                        shapes.add((ys.max() - ys.min(), xs.max() - xs.min()))
                    across = max(ys.max() - ys.min(), xs.max() - xs.min()) + 1
                    assert across >= 23, (expression, scale, across)  # 2x canvas: 11.5 px of the 64 px image
    heights, widths = zip(*shapes)  # upright: neither tilt nor mirroring changes its extent (beyond pixel rounding)
    assert max(heights) - min(heights) <= 1 and max(widths) - min(widths) <= 1, shapes
