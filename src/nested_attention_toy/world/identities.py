"""Who a toy subject is: the two domains, their attributes, identities and the fixed train / held-out split.

An identity is one value per attribute of its domain; its index is the mixed-radix number of those values, so
identities and the integers ``[0, identity_count(domain))`` are in bijection. Every attribute is drawn large (a hair
mass, a skin, a shirt, a fur, a neckwear): something a small denoiser can draw and a VAE's 4x-downsampled latents keep.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass

import numpy as np

DOMAINS = ("person", "pet")

# Per domain: attribute name -> value names, in index order. The first attributes are the most significant digits of
# the index. Every attribute is visible in every render: no value hides another.
_ATTRIBUTES: dict[str, dict[str, tuple[str, ...]]] = {
    "person": {
        "hair_color": ("black", "brown", "blonde", "red", "white", "blue", "pink"),
        "hair_style": ("short", "long", "curly", "spiky"),
        "skin_tone": ("pale", "tan", "brown", "dark"),
        "shirt_color": ("red", "yellow", "green", "blue", "purple", "orange"),
        "facial_hair": ("none", "beard"),
    },
    "pet": {
        "species": ("cat", "dog", "rabbit", "bear"),
        "fur_color": ("white", "golden", "ginger", "brown", "grey", "black"),
        "markings": ("plain", "spots", "stripes", "belly patch"),
        "neckwear": tuple(f"{color} {kind}" for kind in ("collar", "bandana")
                          for color in ("red", "blue", "green", "yellow", "purple", "pink")),
    },
}

# Attributes of the two domains that colour the same part of the look (hair and fur, shirt and neckwear): where one
# subject's colour can leak onto the other in a person + pet image. Their values' first words are colour names.
COLOUR_COUNTERPARTS = (("hair_color", "fur_color"), ("shirt_color", "neckwear"))

# How a caption names an attribute value: a phrase template per attribute ("{v} hair"). "none" and "plain" values
# are never named.
_DESCRIPTORS: dict[str, dict[str, str]] = {
    "person": {"hair_color": "{v} hair", "hair_style": "{v} hair", "skin_tone": "{v} skin",
               "shirt_color": "{v} shirt", "facial_hair": "{v}"},
    "pet": {"species": "{v}", "fur_color": "{v} fur", "markings": "{v}", "neckwear": "{v}"},
}
_UNNAMED = ("none", "plain")

# At most this many attributes per described caption: the longest caption then still fits the toy text encoder's 32
# tokens with the subject word in it.
MAX_DESCRIBED = 3

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
        """Human-readable: ``"person #123 (train): hair_color=red, hair_style=curly, ..."``."""
        parts = ", ".join(f"{name}={value}" for name, value in self.as_dict().items())
        split = "held out" if self.held_out else "train"
        return f"{self.domain} #{self.index} ({split}): {parts}"


def colour_of(domain: str, name: str, index: int) -> str:
    """The colour word of value ``index`` of attribute ``name``: ``"red"`` for the neckwear ``"red collar"``."""
    return attribute_values(domain, name)[index].split()[0]


def attribute_phrase(domain: str, name: str, value: str) -> str | None:
    """The words a caption uses for one attribute value (``"red hair"``); None for a "none" value."""
    if value in _UNNAMED:
        return None
    return _DESCRIPTORS[domain][name].format(v=value)


def describe_attributes(identity: Identity, rng: np.random.Generator, count: int | None = None) -> str:
    """``count`` (default: a random number from 1 to ``MAX_DESCRIBED``) of the identity's named attributes, in random
    order, as comma-separated phrases: ``"red hair, beard, blue shirt"``."""
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
    """``identity_from_names("pet", species="cat", fur_color="ginger", ...)``: every attribute, by value name."""
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
