"""A subject given at inference: one or several images, optional per-image weights, and lambda; or it encoded once."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .errors import NestedAttentionError
from .images import as_image


@dataclass
class Subject:
    """The images of one subject and how to use them.

    Args:
        images: one image or several images of the subject: file paths, PIL images, numpy arrays (H, W) or
            (H, W, 3 or 4) and torch tensors (3 or 4, H, W), uint8 (0-255) or float (0-1). Several images are
            encoded separately and their tokens concatenated (paper Fig. 13); images of different people give
            identity mixing (Fig. 14).
        weights: optional per-image weights for mixing; image i's tokens get log(weights[i]) added to their
            nested logits, so (1, 1) is plain concatenation and (1, 0) uses the first image only.
        lam: identity-vs-prompt control (paper 5.1): the subject word's logit l becomes max(l, lam * l).
            1 is the trained model; larger values favour identity over the prompt (the paper sweeps 1 to 4).
    """

    images: Sequence[Image.Image | str | Path] | Image.Image | str | Path
    weights: Sequence[float] | None = None
    lam: float = 1.0

    def __post_init__(self):
        if isinstance(self.images, (Image.Image, str, Path)) or hasattr(self.images, "shape"):
            self.images = [self.images]  # one image (an array or tensor is one image, never a list of rows)
        if self.images is None or not isinstance(self.images, Sequence):
            raise NestedAttentionError(
                f"A subject's images are {type(self.images).__name__}; give an image (path, PIL image, array, "
                f"tensor) or a list of them."
            )
        self.images = [as_image(image, f"subject image {i}") for i, image in enumerate(self.images)]
        if not self.images:
            raise NestedAttentionError("A subject needs at least one image.")
        if self.weights is not None:
            if isinstance(self.weights, (str, bytes)) or not isinstance(self.weights, Sequence) or not all(
                isinstance(w, numbers.Real) and not isinstance(w, bool) for w in self.weights
            ):
                raise NestedAttentionError(
                    f"Image weights {self.weights!r} must be a list of numbers, one per image (e.g. [2, 1])."
                )
            self.weights = [float(w) for w in self.weights]
            if len(self.weights) != len(self.images):
                raise NestedAttentionError(
                    f"A subject has {len(self.images)} images but {len(self.weights)} weights; give one weight per image."
                )
            if any(not (w >= 0 and math.isfinite(w)) for w in self.weights) or not any(w > 0 for w in self.weights):
                raise NestedAttentionError(
                    f"Image weights {self.weights} must be finite, non-negative and not all zero."
                )
        _check_lam(self.lam)


@dataclass
class EncodedSubject:
    """A subject encoded once by an adapter (`NestedAttention.encode_subject`), reusable in any number of calls.

    It goes wherever a `Subject` goes, for the adapter that encoded it; the images are not encoded again.
    `dataclasses.replace(encoded, lam=2.0)` changes lambda; the tensors can be stored (`torch.save`, safetensors)
    and the EncodedSubject rebuilt from them.

    Attributes:
        adapter: the name of the adapter that encoded it (it is refused for another).
        tokens: (M, width) the subject encoder's tokens, every image's concatenated.
        bias: (M,) additive nested-logit bias (log image weights, -inf for weight 0), or None for equal weights.
        lam: lambda, as in `Subject`.
    """

    adapter: str
    tokens: torch.Tensor
    bias: torch.Tensor | None = None
    lam: float = 1.0

    def __post_init__(self):
        if not (isinstance(self.tokens, torch.Tensor) and self.tokens.ndim == 2):
            raise NestedAttentionError(
                f"An encoded subject's tokens are {_shape(self.tokens)}; expected a (tokens, width) tensor from "
                f"NestedAttention.encode_subject."
            )
        if self.bias is not None and not (isinstance(self.bias, torch.Tensor) and self.bias.shape == self.tokens.shape[:1]):
            raise NestedAttentionError(
                f"An encoded subject's bias is {_shape(self.bias)}; expected None or one value per token "
                f"({self.tokens.shape[0]})."
            )
        _check_lam(self.lam)


def _shape(value) -> str:
    return f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


def _check_lam(lam) -> None:
    if not (isinstance(lam, numbers.Real) and not isinstance(lam, bool) and math.isfinite(lam) and lam > 0):
        raise NestedAttentionError(f"lambda is {lam!r}; expected a positive number (1 = the trained model).")
