"""Where and how a toy subject is shown: the context factors that prompts control.

A context is one value per factor: the scene behind the subject, the style the whole image is drawn in, the subject's
expression (the factor that changes the subject itself) and its position in the frame. Both domains share the values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .identities import _check_domain

CONTEXT_FACTORS: dict[str, tuple[str, ...]] = {
    "scene": ("beach", "forest", "city street", "snow field", "desert", "night sky"),
    "style": ("photo", "cartoon", "pixel art", "watercolor"),
    "expression": ("smiling", "sad", "surprised", "angry"),
    "position": ("left", "center", "right"),
}
FACTOR_NAMES = tuple(CONTEXT_FACTORS)
SCENE = "scene"  # a person and a pet in one image, side by side
SCENE_POSITIONS = ("left", "right")  # a scene's position: the person's half (the pet takes the other)


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
        """``Context.from_names(scene="beach", style="photo", expression="sad", position="left")``."""
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
    """A uniformly random context (factors independent); both domains share the factors. ``domain`` "scene" draws a
    person + pet scene's: the position (the person's half) from `SCENE_POSITIONS` only."""
    if domain != SCENE:
        _check_domain(domain)
        return Context(tuple(int(rng.integers(len(CONTEXT_FACTORS[f]))) for f in FACTOR_NAMES))
    values = [int(rng.integers(len(CONTEXT_FACTORS[f]))) for f in FACTOR_NAMES[:-1]]
    position = SCENE_POSITIONS[int(rng.integers(len(SCENE_POSITIONS)))]
    return Context((*values, CONTEXT_FACTORS["position"].index(position)))


def example_context(row: int, column: int) -> Context:
    """The context of a sample sheet's cell: scene by column, the other factors rotating so that every value of every
    factor appears along a row of 8 and down the rows."""
    def pick(factor: str, k: int) -> int:
        return k % len(CONTEXT_FACTORS[factor])

    return Context((pick("scene", column), pick("style", column + row), pick("expression", column + 2 * row + row // 2),
                    pick("position", column // 2 + row)))
