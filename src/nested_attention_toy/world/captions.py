"""What toy images are called: prompts composed from a context, captions of training images, and the vocabulary.

Prompts name the context only, with the subject word passed in exactly once. Some of the base model's training
captions also name a few of the subject's attributes just before the subject word (``described_caption``), as real
captions do ("a red-haired woman"): that teaches the model to draw appearance from the subject word's embedding, the
pathway nested attention writes into.
"""

from __future__ import annotations

import re

import numpy as np

from .contexts import CONTEXT_FACTORS, Context
from .identities import _ATTRIBUTES, DOMAINS, Identity, _check_domain, attribute_phrase, describe_attributes

# Style: the noun phrase after "a ... of" and the trailing tag form.
_STYLE_NOUN = {"photo": "photo", "cartoon": "cartoon", "pixel art": "pixel art picture", "watercolor": "watercolor painting"}
_STYLE_TAG = {"photo": "photo", "cartoon": "cartoon", "pixel art": "pixel art", "watercolor": "watercolor painting"}
_SCENE_PHRASE = {
    "beach": "on the beach",
    "forest": "in the forest",
    "city street": "on a city street",
    "snow field": "in a snow field",
    "desert": "in the desert",
    "night sky": "under the night sky",
}
_POSITION_PHRASE = {"left": "on the left", "center": "in the center", "right": "on the right"}

# Templates over: {style} a style noun phrase, {tag} the style tag, {subject}, {expression}, {scene}, {position}.
# "{a}" becomes "a" or "an" according to the next word.
_TEMPLATES = (
    "{a} {style} of {a} {expression} {subject} {scene}, {position}",
    "{a} {expression} {subject} {scene}, {position}, {tag}",
    "{position}, {a} {expression} {subject} {scene}, {tag}",
    "{a} {style} of {a} {expression} {subject}, {position}, {scene}",
)
_SCENE_TEMPLATES = (
    "{a} {style} of {a} {expression} {subject} and {a} {pet_expression} {pet} {scene}, {position}",
    "{a} {expression} {subject} with {a} {pet_expression} {pet} {scene}, {position}, {tag}",
)
_INPUT_TEMPLATE = "a portrait of {a} {subject}, plain background"

# Words a caller may use as the subject word; all are in the vocabulary, none occurs in any template.
SUBJECT_WORDS = {
    "person": ("person", "woman", "man", "child", "boy", "girl", "human", "someone"),
    "pet": ("pet", "animal", "dog", "cat", "rabbit", "bear", "puppy", "kitten", "creature"),
}


def _articles(text: str) -> str:
    words = text.split(" ")
    for i, word in enumerate(words):
        if word == "{a}":
            following = words[i + 1] if i + 1 < len(words) else ""
            words[i] = "an" if following[:1] in "aeiou" and following else "a"
    return " ".join(words)


def _fill(template: str, subject: str, context: Context, pet: str = "", pet_expression: str = "",
          description: str | None = None) -> str:
    style = context.name("style")
    return _articles(template.format(
        a="{a}", style=_STYLE_NOUN[style], tag=_STYLE_TAG[style],
        subject=f"{description} {subject}" if description else subject, expression=context.name("expression"),
        scene=_SCENE_PHRASE[context.name("scene")], position=_POSITION_PHRASE[context.name("position")],
        pet=pet, pet_expression=pet_expression))


def _check_word(word: str) -> str:
    if not word or not word.isalpha() or not word.islower():
        raise ValueError(f"the subject word must be one lower-case word, got {word!r}")
    return word


def prompt(domain_word: str, context: Context, rng: np.random.Generator | None = None, description: str | None = None) -> str:
    """An English prompt for ``context`` with ``domain_word`` as the subject, exactly once.

    Without ``rng`` the canonical template is used (deterministic); with one, a template is drawn from it.
    ``description`` (attribute phrases such as ``"red hair"``) goes just before the subject word. Only lower-case
    words, spaces and commas; every word is in ``vocabulary()`` (the subject word too if it is a ``SUBJECT_WORDS``).
    """
    template = _TEMPLATES[0] if rng is None else _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    return _fill(template, _check_word(domain_word), context, description=description)


def generic_caption(domain: str, context: Context, rng: np.random.Generator | None = None) -> str:
    """The prompt with the domain word itself: the caption of a base-model training image. Never names attributes."""
    _check_domain(domain)
    return prompt(domain, context, rng)


def described_caption(identity: Identity, context: Context | None, rng: np.random.Generator) -> str:
    """A base-model training caption naming some of the subject's attributes just before the subject word:
    ``"a sad red hair, beard person on the beach, on the left"``; ``context`` None captions an input view."""
    description = describe_attributes(identity, rng)
    if context is None:
        return _articles(_INPUT_TEMPLATE.format(a="{a}", subject=f"{description} {identity.domain}"))
    template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    return _fill(template, identity.domain, context, description=description)


def scene_prompt(person_word: str, pet_word: str, context: Context, rng: np.random.Generator | None = None,
                 pet_expression: int | None = None) -> str:
    """The prompt of a ``render_scene`` image: both subjects, each once; position refers to the person."""
    expression = CONTEXT_FACTORS["expression"][context["expression"] if pet_expression is None else int(pet_expression)]
    template = _SCENE_TEMPLATES[0] if rng is None else _SCENE_TEMPLATES[int(rng.integers(len(_SCENE_TEMPLATES)))]
    return _fill(template, _check_word(person_word), context, pet=_check_word(pet_word), pet_expression=expression)


def input_caption(domain_word: str) -> str:
    """The caption of an input view (the subject centred on a plain background): ``"a portrait of a person, plain background"``."""
    return _articles(_INPUT_TEMPLATE.format(a="{a}", subject=_check_word(domain_word)))


def _factor_phrases() -> dict[str, dict[str, tuple[str, ...]]]:
    phrases = {f: {v: (v,) for v in values} for f, values in CONTEXT_FACTORS.items()}
    phrases["scene"] = {v: (_SCENE_PHRASE[v],) for v in CONTEXT_FACTORS["scene"]}
    phrases["style"] = {v: tuple({_STYLE_NOUN[v], _STYLE_TAG[v], v}) for v in CONTEXT_FACTORS["style"]}
    phrases["position"] = {v: (_POSITION_PHRASE[v],) for v in CONTEXT_FACTORS["position"]}
    return phrases


_FACTOR_PHRASES = _factor_phrases()


def prompt_factors(text: str) -> dict[str, str]:
    """The context factors a prompt names, read back from its words: ``{"scene": "beach", "style": "photo", ...}``.

    Works on any wording that uses the world's phrases (every prompt and caption here, and hand-written ones such as
    "a sad person in the forest, cartoon"). A factor is left out when the prompt names none of its values or several
    different ones (in a person + pet prompt, two different expressions).
    """
    words = " " + re.sub(r"[^a-z]+", " ", text.lower()).strip() + " "
    found: dict[str, str] = {}
    for factor, phrases in _FACTOR_PHRASES.items():
        named = {value for value, options in phrases.items() if any(f" {o} " in words for o in options)}
        if len(named) == 1:
            found[factor] = named.pop()
    return found


def vocabulary() -> list[str]:
    """Every word any prompt, scene prompt or caption (described ones too) can contain, plus the subject words;
    sorted, distinct."""
    words: set[str] = {"a", "an", "of", "and", "with"}
    for domain, attributes in _ATTRIBUTES.items():
        for name, values in attributes.items():
            for value in values:
                words.update((attribute_phrase(domain, name, value) or "").split())
    for template in _TEMPLATES + _SCENE_TEMPLATES + (_INPUT_TEMPLATE,):
        words.update(w for w in template.replace(",", " ").split() if not w.startswith("{"))
    for table in (_STYLE_NOUN, _STYLE_TAG, _SCENE_PHRASE, _POSITION_PHRASE):
        for phrase in table.values():
            words.update(phrase.split())
    words.update(CONTEXT_FACTORS["expression"])
    for subject_words in SUBJECT_WORDS.values():
        words.update(subject_words)
    words.update(DOMAINS)
    return sorted(words)
