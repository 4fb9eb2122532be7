"""The toy world's ground truth: identities, contexts, prompts and the train / held-out split.

An identity is one value per attribute of its domain; its index is the mixed-radix number of those values, so
identities and the integers ``[0, identity_count(domain))`` are in bijection. A context is one value per context
factor (scene, style, expression, position, size); prompts are composed from the context only, from a fixed
vocabulary, and never mention identity attributes. Some of the base model's training captions also describe a few of
the subject's attributes in words placed before the subject word (``described_caption``), as real captions do ("a
red-haired woman"): that is what teaches a text-to-image model to draw appearance from the subject word's
embedding, the pathway nested attention writes into. Nothing here draws: see ``render``.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from dataclasses import dataclass

import numpy as np

DOMAINS = ("person", "pet")

# Per domain: attribute name -> value names, in index order. The first attributes are the most significant digits of
# the index. Colours are named, shapes are drawn: every attribute is visible in every render (see docs/toyworld.md).
_ATTRIBUTES: dict[str, dict[str, tuple[str, ...]]] = {
    "person": {
        "face_shape": ("round", "long", "square", "pointed"),
        "skin_tone": ("pale", "light", "tan", "brown", "dark"),
        "hair_style": ("short", "long", "bob", "curly", "spiky", "ponytail", "bun", "mohawk"),
        "hair_color": ("black", "brown", "blonde", "red", "white", "blue"),
        "eyewear": ("none", "round glasses", "square glasses"),
        "facial_hair": ("none", "moustache", "beard"),
        "shirt_color": ("red", "yellow", "green", "blue", "purple", "black"),
        "shirt_pattern": ("plain", "stripes", "dots", "star"),
    },
    "pet": {
        "species": ("cat", "dog", "rabbit", "bear", "bird"),
        "ear_shape": ("pointed", "round", "floppy", "long"),
        "fur_color": ("white", "golden", "ginger", "brown", "grey", "black"),
        "markings": ("spots", "stripes", "eye patch", "belly patch", "socks"),
        "marking_color": ("black", "white", "brown", "ginger"),
        "tail": ("long", "bushy", "stub", "curly"),
        "accessory": ("none", "red collar", "blue bandana", "yellow bow tie"),
    },
}

# Which attributes are carried by geometry (they survive grayscale styles) and which by colour; documentation only.
SHAPE_ATTRIBUTES = {
    "person": ("face_shape", "hair_style", "eyewear", "facial_hair", "shirt_pattern"),
    "pet": ("species", "ear_shape", "markings", "tail", "accessory"),
}
COLOR_ATTRIBUTES = {
    "person": ("skin_tone", "hair_color", "shirt_color"),
    "pet": ("fur_color", "marking_color"),
}

# How a caption names an attribute value: a phrase template per attribute ("{v} hair"), or a phrase per value.
# "none" values (no glasses, no collar) are never named.
_DESCRIPTORS: dict[str, dict[str, str | dict[str, str]]] = {
    "person": {
        "face_shape": "{v} face",
        "skin_tone": "{v} skin",
        "hair_style": "{v} hair",
        "hair_color": "{v} hair",
        "eyewear": "{v}",
        "facial_hair": "{v}",
        "shirt_color": "{v} shirt",
        "shirt_pattern": {"plain": "plain shirt", "stripes": "striped shirt", "dots": "dotted shirt", "star": "star shirt"},
    },
    "pet": {
        "species": "{v}",
        "ear_shape": "{v} ears",
        "fur_color": "{v} fur",
        "markings": "{v}",
        "marking_color": "{v} markings",
        "tail": "{v} tail",
        "accessory": "{v}",
    },
}

# At most this many attributes per described caption: the longest caption then still fits the toy text encoder's 32
# tokens with the subject word in it.
MAX_DESCRIBED = 4

HELD_OUT_FRACTION = 0.2


def _check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; expected one of {DOMAINS}")


def attribute_names(domain: str) -> list[str]:
    """The attribute names of ``domain``, in index (most significant first) order."""
    _check_domain(domain)
    return list(_ATTRIBUTES[domain])


def attribute_values(domain: str, name: str) -> list[str]:
    """The value names of attribute ``name`` of ``domain``, in index order."""
    _check_domain(domain)
    try:
        return list(_ATTRIBUTES[domain][name])
    except KeyError:
        raise ValueError(f"unknown attribute {name!r} of domain {domain!r}") from None


def _radices(domain: str) -> tuple[int, ...]:
    return tuple(len(values) for values in _ATTRIBUTES[domain].values())


def identity_count(domain: str) -> int:
    """How many identities ``domain`` has: the product of its attributes' value counts."""
    _check_domain(domain)
    return math.prod(_radices(domain))


@dataclass(frozen=True)
class Identity:
    """One subject: a domain and one value index per attribute of that domain (in ``attribute_names`` order)."""

    domain: str
    attributes: tuple[int, ...]

    def __post_init__(self):
        _check_domain(self.domain)
        radices = _radices(self.domain)
        attributes = tuple(int(a) for a in self.attributes)
        if len(attributes) != len(radices) or any(not 0 <= a < r for a, r in zip(attributes, radices)):
            raise ValueError(f"bad {self.domain} attributes {self.attributes!r}; value counts are {radices}")
        object.__setattr__(self, "attributes", attributes)

    @property
    def index(self) -> int:
        index = 0
        for value, radix in zip(self.attributes, _radices(self.domain)):
            index = index * radix + value
        return index

    @property
    def held_out(self) -> bool:
        return is_held_out(self)

    def value(self, name: str) -> str:
        """The value name of attribute ``name``."""
        names = attribute_names(self.domain)
        if name not in names:
            raise ValueError(f"unknown attribute {name!r} of domain {self.domain!r}")
        return _ATTRIBUTES[self.domain][name][self.attributes[names.index(name)]]

    def as_dict(self) -> dict[str, str]:
        return {name: values[i] for (name, values), i in zip(_ATTRIBUTES[self.domain].items(), self.attributes)}

    def describe(self) -> str:
        """Human-readable: ``"person #123: face_shape=round, skin_tone=tan, ..."``."""
        parts = ", ".join(f"{name}={value}" for name, value in self.as_dict().items())
        split = "held out" if self.held_out else "train"
        return f"{self.domain} #{self.index} ({split}): {parts}"


def attribute_phrase(domain: str, name: str, value: str) -> str | None:
    """The words a caption uses for one attribute value (``"red hair"``); None for a "none" value."""
    if value == "none":
        return None
    form = _DESCRIPTORS[domain][name]
    return form[value] if isinstance(form, dict) else form.format(v=value)


def describe_attributes(identity: Identity, rng: np.random.Generator, count: int | None = None) -> str:
    """``count`` (default: a random number from 1 to ``MAX_DESCRIBED``) of the identity's named attributes, in random
    order, as comma-separated phrases: ``"red hair, beard, striped shirt"``."""
    phrases = [p for name, value in identity.as_dict().items() if (p := attribute_phrase(identity.domain, name, value))]
    most = min(MAX_DESCRIBED, len(phrases))
    k = int(rng.integers(1, most + 1)) if count is None else max(1, min(count, most))
    return ", ".join(phrases[i] for i in rng.permutation(len(phrases))[:k])


def identity_from_index(domain: str, index: int) -> Identity:
    """The identity with integer ``index`` in ``[0, identity_count(domain))``."""
    _check_domain(domain)
    index = int(index)
    if not 0 <= index < identity_count(domain):
        raise ValueError(f"{domain} index {index} out of range [0, {identity_count(domain)})")
    digits = []
    for radix in reversed(_radices(domain)):
        index, digit = divmod(index, radix)
        digits.append(digit)
    return Identity(domain, tuple(reversed(digits)))


def identity_from_names(domain: str, **values: str) -> Identity:
    """``identity_from_names("pet", species="cat", ear_shape="round", ...)``: every attribute, by value name."""
    names = attribute_names(domain)
    if set(values) != set(names):
        raise ValueError(f"need exactly the {domain} attributes {names}, got {sorted(values)}")
    return Identity(domain, tuple(_ATTRIBUTES[domain][n].index(values[n]) for n in names))


def _split_hash(domain: str, index: int) -> float:
    digest = hashlib.sha256(f"{domain}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def is_held_out(identity: Identity) -> bool:
    """The fixed split rule: sha256 of ``"{domain}:{index}"``, first 8 bytes big-endian, below 0.2 of 2**64.

    Stable forever: changing it silently mixes evaluation identities into training.
    """
    return _split_hash(identity.domain, identity.index) < HELD_OUT_FRACTION


@functools.cache
def side_size(domain: str, held_out: bool) -> int:
    """How many identities of ``domain`` lie on the held-out (or the training) side of the split."""
    _check_domain(domain)
    return sum((_split_hash(domain, i) < HELD_OUT_FRACTION) == held_out for i in range(identity_count(domain)))


def sample_identities(domain: str, n: int, rng: np.random.Generator, held_out: bool) -> list[Identity]:
    """``n`` distinct identities of ``domain``, uniformly from the held-out side of the split or from the training side."""
    _check_domain(domain)
    count = identity_count(domain)
    n = int(n)
    if n < 0:
        raise ValueError("n must be >= 0")
    chosen: list[Identity] = []
    seen: set[int] = set()
    if n > count // 8:  # dense request: enumerate the side of the split, then choose
        side = [i for i in range(count) if (_split_hash(domain, i) < HELD_OUT_FRACTION) == held_out]
        if n > len(side):
            raise ValueError(f"asked for {n} {domain} identities; the {'held-out' if held_out else 'training'} side has {len(side)}")
        return [identity_from_index(domain, int(side[i])) for i in rng.permutation(len(side))[:n]]
    while len(chosen) < n:
        for index in rng.integers(0, count, size=2 * (n - len(chosen)) + 8).tolist():
            if index in seen or (_split_hash(domain, index) < HELD_OUT_FRACTION) != held_out:
                continue
            seen.add(index)
            chosen.append(identity_from_index(domain, index))
            if len(chosen) == n:
                break
    return chosen


# ----------------------------------------------------------------------------------------------------- contexts

# Every factor has the same value set for both domains (expressions are drawn on person and pet faces alike).
CONTEXT_FACTORS: dict[str, tuple[str, ...]] = {
    "scene": ("beach", "forest", "city street", "snow field", "living room", "desert", "night sky", "underwater"),
    "style": ("photo", "cartoon", "pencil sketch", "watercolor", "pixel art", "neon"),
    "expression": ("smiling", "sad", "surprised", "angry", "sleepy"),
    "position": ("left", "center", "right"),
    "size": ("small", "large"),
}
FACTOR_NAMES = tuple(CONTEXT_FACTORS)


class FactorValues(tuple):
    """A tuple of value indices in ``FACTOR_NAMES`` order that can also be read by factor name: ``values["scene"]``."""

    __slots__ = ()

    def __getitem__(self, key):
        if isinstance(key, str):
            try:
                return tuple.__getitem__(self, FACTOR_NAMES.index(key))
            except ValueError:
                raise KeyError(key) from None
        return tuple.__getitem__(self, key)

    def keys(self):
        return FACTOR_NAMES

    def items(self):
        return tuple(zip(FACTOR_NAMES, self))


@dataclass(frozen=True)
class Context:
    """One value index per context factor. ``context["scene"]`` is an index, ``context.name("scene")`` its name."""

    values: FactorValues

    def __post_init__(self):
        values = tuple(int(v) for v in self.values)
        if len(values) != len(FACTOR_NAMES):
            raise ValueError(f"a context has {len(FACTOR_NAMES)} values ({', '.join(FACTOR_NAMES)}), got {self.values!r}")
        for factor, v in zip(FACTOR_NAMES, values):
            if not 0 <= v < len(CONTEXT_FACTORS[factor]):
                raise ValueError(f"{factor} index {v} out of range [0, {len(CONTEXT_FACTORS[factor])})")
        object.__setattr__(self, "values", FactorValues(values))

    @classmethod
    def from_names(cls, **names: str) -> Context:
        """``Context.from_names(scene="beach", style="photo", expression="sad", position="left", size="small")``."""
        missing = set(FACTOR_NAMES) - set(names)
        extra = set(names) - set(FACTOR_NAMES)
        if missing or extra:
            raise ValueError(f"need exactly the factors {FACTOR_NAMES}; missing {sorted(missing)}, unknown {sorted(extra)}")
        return cls(tuple(CONTEXT_FACTORS[f].index(names[f]) for f in FACTOR_NAMES))

    def __getitem__(self, factor: str) -> int:
        return self.values[factor]

    def name(self, factor: str) -> str:
        return CONTEXT_FACTORS[factor][self.values[factor]]

    def replace(self, **names: str) -> Context:
        """A copy with some factors changed, by value name."""
        current = {f: self.name(f) for f in FACTOR_NAMES}
        current.update(names)
        return Context.from_names(**current)

    def as_dict(self) -> dict[str, str]:
        return {f: self.name(f) for f in FACTOR_NAMES}

    def describe(self) -> str:
        return ", ".join(f"{f}={self.name(f)}" for f in FACTOR_NAMES)


def context_count() -> int:
    return math.prod(len(v) for v in CONTEXT_FACTORS.values())


def sample_context(rng: np.random.Generator, domain: str = "person") -> Context:
    """A uniformly random context (factors independent). ``domain`` is accepted for symmetry: both share the factors."""
    _check_domain(domain)
    return Context(tuple(int(rng.integers(len(CONTEXT_FACTORS[f]))) for f in FACTOR_NAMES))


# ------------------------------------------------------------------------------------------------------ prompts

# Words for each factor value. Style: the noun phrase after "a ... of" and the trailing tag form.
_STYLE_NOUN = {
    "photo": "photo",
    "cartoon": "cartoon",
    "pencil sketch": "pencil sketch",
    "watercolor": "watercolor painting",
    "pixel art": "pixel art picture",
    "neon": "neon drawing",
}
_STYLE_TAG = {
    "photo": "photo",
    "cartoon": "cartoon",
    "pencil sketch": "pencil sketch",
    "watercolor": "watercolor painting",
    "pixel art": "pixel art",
    "neon": "neon art",
}
_SCENE_PHRASE = {
    "beach": "on the beach",
    "forest": "in the forest",
    "city street": "on a city street",
    "snow field": "in a snow field",
    "living room": "in a living room",
    "desert": "in the desert",
    "night sky": "under the night sky",
    "underwater": "underwater",
}
_POSITION_PHRASE = {"left": "on the left", "center": "in the center", "right": "on the right"}

# Templates over: {style} a style noun phrase with article ("a photo"), {tag} the style tag, {subject}, {expression},
# {scene}, {size}, {position}. "{a}" is replaced by "a" or "an" according to the next word.
_TEMPLATES = (
    "{a} {style} of {a} {expression} {subject} {scene}, {size}, {position}",
    "{a} {style} of {a} {size} {expression} {subject} {scene}, {position}",
    "{a} {expression} {subject} {scene}, {size}, {position}, {tag}",
    "{position}, {a} {size} {expression} {subject} {scene}, {tag}",
)
_SCENE_TEMPLATES = (
    "{a} {style} of {a} {expression} {subject} and {a} {pet_expression} {pet} {scene}, {size}, {position}",
    "{a} {expression} {subject} with {a} {pet_expression} {pet} {scene}, {size}, {position}, {tag}",
)

# Words a caller may use as the subject word; all are in the vocabulary, none occurs in any template.
SUBJECT_WORDS = {
    "person": ("person", "woman", "man", "child", "boy", "girl", "human", "someone"),
    "pet": ("pet", "animal", "dog", "cat", "rabbit", "bear", "bird", "puppy", "kitten", "creature"),
}


def _articles(text: str) -> str:
    words = text.split(" ")
    for i, word in enumerate(words):
        if word == "{a}":
            following = words[i + 1] if i + 1 < len(words) else ""
            words[i] = "an" if following[:1] in "aeiou" and following else "a"
    return " ".join(words)


def _fill(template: str, subject: str, context: Context, pet: str | None = None, pet_expression: str | None = None,
          description: str | None = None) -> str:
    style = context.name("style")
    text = template.format(
        a="{a}",
        style=_STYLE_NOUN[style],
        tag=_STYLE_TAG[style],
        subject=f"{description} {subject}" if description else subject,
        expression=context.name("expression"),
        scene=_SCENE_PHRASE[context.name("scene")],
        size=context.name("size"),
        position=_POSITION_PHRASE[context.name("position")],
        pet=pet or "",
        pet_expression=pet_expression or "",
    )
    return _articles(text)


def _check_word(word: str) -> str:
    if not word or not word.isalpha() or not word.islower():
        raise ValueError(f"the subject word must be one lower-case word, got {word!r}")
    return word


def prompt(domain_word: str, context: Context, rng: np.random.Generator | None = None, description: str | None = None) -> str:
    """An English prompt for ``context`` with ``domain_word`` as the subject, exactly once.

    Without ``rng`` the canonical template is used (deterministic); with one, a template is drawn from it.
    ``description`` (attribute phrases such as ``"red hair"``) goes just before the subject word, as in
    ``described_caption``.
    Only lower-case words, spaces and commas; every word is in ``vocabulary()`` (the subject word too if it is one of
    ``SUBJECT_WORDS``).
    """
    template = _TEMPLATES[0] if rng is None else _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    return _fill(template, _check_word(domain_word), context, description=description)


def generic_caption(domain: str, context: Context, rng: np.random.Generator | None = None) -> str:
    """The prompt with the domain word itself: the caption of a base-model training image. Never names attributes."""
    _check_domain(domain)
    return prompt(domain, context, rng)


def described_caption(identity: Identity, context: Context | None, rng: np.random.Generator) -> str:
    """A base-model training caption naming some of the subject's attributes just before the subject word:
    ``"a sad red hair, beard person on the beach, small, on the left"``; ``context`` None captions an input view."""
    description = describe_attributes(identity, rng)
    if context is None:
        return _articles(_INPUT_TEMPLATE.format(a="{a}", subject=f"{description} {identity.domain}"))
    template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    return _fill(template, identity.domain, context, description=description)


def scene_prompt(
    person_word: str,
    pet_word: str,
    context: Context,
    rng: np.random.Generator | None = None,
    pet_expression: int | None = None,
) -> str:
    """The prompt of a ``render_scene`` image: both subjects, each once; position and size refer to the person."""
    expression = CONTEXT_FACTORS["expression"][context["expression"] if pet_expression is None else int(pet_expression)]
    template = _SCENE_TEMPLATES[0] if rng is None else _SCENE_TEMPLATES[int(rng.integers(len(_SCENE_TEMPLATES)))]
    return _fill(template, _check_word(person_word), context, pet=_check_word(pet_word), pet_expression=expression)


def prompt_factors(text: str) -> dict[str, str]:
    """The context factors a prompt names, read back from its words: ``{"scene": "beach", "style": "photo", ...}``.

    Works on any wording that uses the world's phrases (every prompt and caption here, and hand-written ones such as
    "a sad person in the forest, pencil sketch"). A factor is left out when the prompt names none of its values or
    several different ones (in a person + pet prompt, two different expressions).
    """
    words = " " + re.sub(r"[^a-z]+", " ", text.lower()).strip() + " "
    found: dict[str, str] = {}
    for factor, phrases in _FACTOR_PHRASES.items():
        named = {value for value, options in phrases.items() if any(f" {o} " in words for o in options)}
        if len(named) == 1:
            found[factor] = named.pop()
    return found


def _factor_phrases() -> dict[str, dict[str, tuple[str, ...]]]:
    phrases = {f: {v: (v,) for v in values} for f, values in CONTEXT_FACTORS.items()}
    phrases["scene"] = {v: (_SCENE_PHRASE[v],) for v in CONTEXT_FACTORS["scene"]}
    phrases["style"] = {v: tuple({_STYLE_NOUN[v], _STYLE_TAG[v], v}) for v in CONTEXT_FACTORS["style"]}
    phrases["position"] = {v: (_POSITION_PHRASE[v],) for v in CONTEXT_FACTORS["position"]}
    return phrases


_FACTOR_PHRASES = _factor_phrases()

_INPUT_TEMPLATE = "a portrait of {a} {subject}, plain background"


def input_caption(domain_word: str) -> str:
    """The caption of an input view (the subject centred on a plain background): ``"a portrait of a person, plain background"``."""
    return _articles(_INPUT_TEMPLATE.format(a="{a}", subject=_check_word(domain_word)))


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
    for factor in ("expression", "size"):
        words.update(CONTEXT_FACTORS[factor])
    for subject_words in SUBJECT_WORDS.values():
        words.update(subject_words)
    words.update(DOMAINS)
    return sorted(words)
