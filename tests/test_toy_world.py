"""The toy world's ground truth: identities and their split, contexts, prompts and captions."""

import pickle
import re

import numpy as np
import pytest

from nested_attention_toy.world import (
    CONTEXT_FACTORS,
    DOMAINS,
    FACTOR_NAMES,
    MAX_DESCRIBED,
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

BASE = Context.from_names(scene="forest", style="cartoon", expression="smiling", position="center")

# ------------------------------------------------------------------------------------------------- identities


@pytest.mark.parametrize("domain", DOMAINS)
def test_identity_space(domain):
    names = attribute_names(domain)
    assert identity_count(domain) >= 1_000
    assert len(names) >= 4
    assert all(len(attribute_values(domain, name)) >= 2 for name in names)
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
    assert len({identity_from_index(domain, i).attributes for i in range(count)}) == count
    with pytest.raises(ValueError):
        identity_from_index(domain, count)
    with pytest.raises(ValueError):
        Identity(domain, (0,) * (len(attribute_names(domain)) + 1))
    described = identity_from_index(domain, 5).describe()
    assert all(name in described for name in attribute_names(domain))


@pytest.mark.parametrize("domain", DOMAINS)
def test_split_is_about_a_fifth(domain):
    count = identity_count(domain)
    indices = range(count)
    held = np.mean([is_held_out(identity_from_index(domain, int(i))) for i in indices])
    assert 0.17 <= held <= 0.23
    # held-out identities are new combinations: every value of every attribute also occurs in training
    for a, name in enumerate(attribute_names(domain)):
        trained = {identity_from_index(domain, i).attributes[a] for i in range(count) if not is_held_out(identity_from_index(domain, i))}
        assert trained == set(range(len(attribute_values(domain, name)))), name


# Computed once from the rule (sha256 of "{domain}:{index}" < 0.2 * 2**64); a change here means the split moved.
FROZEN_SPLIT = {
    "person": {0: True, 1: True, 2: False, 3: False, 4: True, 5: True, 6: False, 7: False, 8: True, 9: False, 10: True, 11: False, 1000: True, 1343: False},
    "pet": {0: False, 1: False, 2: False, 3: False, 4: True, 5: False, 6: False, 7: False, 8: True, 9: False, 10: False, 11: False, 1000: False, 1151: False},
}


@pytest.mark.parametrize("domain", DOMAINS)
def test_split_is_frozen(domain):
    for index, held in FROZEN_SPLIT[domain].items():
        identity = identity_from_index(domain, index)
        assert is_held_out(identity) is held and identity.held_out is held


@pytest.mark.parametrize("domain", DOMAINS)
@pytest.mark.parametrize("held_out", [False, True])
def test_sample_identities_stays_on_its_side(domain, held_out):
    for n in (1, 150):
        chosen = sample_identities(domain, n, np.random.default_rng(n), held_out=held_out)
        assert len(chosen) == n and len(set(chosen)) == n
        assert all(i.domain == domain and i.held_out is held_out for i in chosen)
    again = sample_identities(domain, 150, np.random.default_rng(150), held_out=held_out)
    assert again == sample_identities(domain, 150, np.random.default_rng(150), held_out=held_out)


def test_sample_identities_dense_request():
    held = sample_identities("pet", 200, np.random.default_rng(0), held_out=True)
    assert len(set(held)) == 200 and all(i.held_out for i in held)
    with pytest.raises(ValueError):
        sample_identities("pet", identity_count("pet"), np.random.default_rng(0), held_out=True)


# --------------------------------------------------------------------------------------------------- prompts


def test_context_api():
    context = Context.from_names(scene="desert", style="watercolor", expression="angry", position="left")
    assert context["scene"] == CONTEXT_FACTORS["scene"].index("desert") == context.values["scene"]
    assert context.name("style") == "watercolor" and context.values.keys() == FACTOR_NAMES
    assert context == Context(tuple(context.values)) and hash(context) == hash(Context(tuple(context.values)))
    assert context.replace(style="photo").name("style") == "photo"
    restored = pickle.loads(pickle.dumps(context))  # contexts and identities travel to worker processes
    assert restored == context and restored["scene"] == context["scene"]
    assert pickle.loads(pickle.dumps(identity_from_index("pet", 5))) == identity_from_index("pet", 5)
    assert len(CONTEXT_FACTORS) >= 3 and "expression" in CONTEXT_FACTORS  # one factor changes the subject itself
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
    longest = max((described_caption(identity_from_index(d, i), sample_context(rng), rng) for d in DOMAINS
                   for i in range(0, identity_count(d), 7)),
                  key=lambda t: len(tokenizer(t).input_ids))
    assert len(tokenizer(longest).input_ids) <= 32


def test_every_factor_value_is_in_the_prompts():
    rng = np.random.default_rng(0)
    for factor, values in CONTEXT_FACTORS.items():
        for value in values:
            context = sample_context(rng, "person").replace(**{factor: value})
            for _ in range(6):
                assert value in prompt("person", context, rng), (factor, value)
    all_contexts = [Context((s, 0, 0, 0)) for s in range(len(CONTEXT_FACTORS["scene"]))]
    assert len({prompt("pet", c) for c in all_contexts}) == len(all_contexts)


def test_example_contexts_show_every_value():
    from nested_attention_toy.world import example_context

    for factor, values in CONTEXT_FACTORS.items():
        seen = {example_context(r, c)[factor] for r in range(8) for c in range(8)}
        assert seen == set(range(len(values))), factor
    assert len({example_context(0, c) for c in range(8)}) == 8
