"""Pluggable scores. Identity: an `IdentityEmbedder` maps images to unit vectors; the harness compares a generation
with the subject's reference images (cosine) and with every other subject's (retrieval top-1). Prompt alignment: a
`PromptScorer` scores an image against its prompt.

Named on the command line as ``KIND:PATH``: ``clip:DIR`` (any transformers CLIP), ``dino:DIR`` / ``hf:DIR`` (any
transformers vision model: its pooled output), ``onnx:FILE`` (a face-recognition ONNX model, run by onnxruntime),
and the toy world's ``toy`` / ``toy-person`` / ``toy-pet`` (see `toy_scorers`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from nested_attention.errors import NestedAttentionError


class IdentityEmbedder:
    """Images -> (N, D) unit-norm identity embeddings. ``name`` labels the score columns."""

    name = "identity"

    def embed(self, images: list[Image.Image]) -> torch.Tensor:
        raise NotImplementedError


class PromptScorer:
    """(image, prompt) -> a score per image, or None where the prompt gives this scorer nothing to judge. Returns
    a dict of columns (``{"clip_t": [...]}``; the toy factor scorer adds one column per factor)."""

    name = "prompt"

    def score(self, images: list[Image.Image], prompts: list[str]) -> dict[str, list[float | None]]:
        raise NotImplementedError


def _load(kind: str, loader, path: str):
    try:
        return loader(path)
    except (OSError, ValueError, KeyError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise NestedAttentionError(f"Could not load the {kind} model {path!r} ({first}). Give a local folder or hub id.") from None


def _pooled(output) -> torch.Tensor:
    for name in ("image_embeds", "pooler_output"):
        value = getattr(output, name, None)
        if value is not None:
            return value
    return output.last_hidden_state[:, 0]


class HFImageEmbedder(IdentityEmbedder):
    """Image similarity with any transformers vision model (CLIP's vision tower, DINOv2, ...): its projected or
    pooled image feature. Fine for pets and objects; for faces prefer a face-recognition model (`OnnxFaceEmbedder`)."""

    def __init__(self, path: str, name: str = "clip_i", device: str = "cpu", batch_size: int = 64):
        from transformers import AutoImageProcessor, AutoModel

        self.name, self.device, self.batch_size = name, device, batch_size
        model = _load("image", AutoModel.from_pretrained, path).eval().to(device)
        self.model = model
        self.processor = _load("image processor", AutoImageProcessor.from_pretrained, path)

    @torch.no_grad()
    def embed(self, images: list[Image.Image]) -> torch.Tensor:
        out = []
        for i in range(0, len(images), self.batch_size):
            pixels = self.processor(images=images[i : i + self.batch_size], return_tensors="pt")["pixel_values"]
            pixels = pixels.to(self.device, self.model.dtype)
            if hasattr(self.model, "get_image_features"):
                features = self.model.get_image_features(pixel_values=pixels)
                features = features if isinstance(features, torch.Tensor) else features.pooler_output
            else:
                features = _pooled(self.model(pixel_values=pixels))
            out.append(features.float().cpu())
        return F.normalize(torch.cat(out), dim=-1)


class OnnxFaceEmbedder(IdentityEmbedder):
    """A face-recognition network exported to ONNX (e.g. an ArcFace model, input N x 3 x 112 x 112, RGB scaled to
    [-1, 1]), run by onnxruntime. Images are centre-cropped to a square and resized to the model's input; there is
    no face detector, so give it face-centred generations (portrait prompts) or crop them first."""

    def __init__(self, path: str, name: str = "face", mean: float = 127.5, std: float = 127.5):
        try:
            import onnxruntime
        except ImportError:
            raise NestedAttentionError("Scoring with an ONNX face model needs onnxruntime: pip install onnxruntime.") from None
        if not Path(path).is_file():
            raise NestedAttentionError(f"The face-recognition model {path} does not exist; give an .onnx file.")
        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime raises its own exception types for unreadable files
            raise NestedAttentionError(f"onnxruntime could not open {path} ({str(error).splitlines()[0]}); give an ONNX model file.") from None
        spec = self.session.get_inputs()[0]
        shape = list(spec.shape)
        if len(shape) != 4:
            raise NestedAttentionError(f"{path} takes an input of shape {shape}; expected an image batch (N, 3, H, W) or (N, H, W, 3).")
        self.channels_last = shape[3] == 3 and shape[1] != 3
        h, w = (shape[1], shape[2]) if self.channels_last else (shape[2], shape[3])
        self.size = (int(w) if isinstance(w, int) else 112, int(h) if isinstance(h, int) else 112)
        self.input_name, self.name, self.mean, self.std = spec.name, name, mean, std

    def embed(self, images: list[Image.Image]) -> torch.Tensor:
        batch = np.stack([np.asarray(_square(image).resize(self.size, Image.BICUBIC), dtype=np.float32) for image in images])
        batch = (batch - self.mean) / self.std
        if not self.channels_last:
            batch = batch.transpose(0, 3, 1, 2)
        rows = [self.session.run(None, {self.input_name: batch[i : i + 1]})[0] for i in range(len(batch))]  # batch 1 always fits
        return F.normalize(torch.from_numpy(np.concatenate(rows)).float().flatten(1), dim=-1)


def _square(image: Image.Image) -> Image.Image:
    image = image.convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


class ClipTextScorer(PromptScorer):
    """CLIP-T: the cosine similarity of an image and its prompt under any transformers `CLIPModel`."""

    def __init__(self, path: str, name: str = "clip_t", device: str = "cpu", batch_size: int = 64):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.name, self.device, self.batch_size = name, device, batch_size
        self.model = _load("CLIP", CLIPModel.from_pretrained, path).eval().to(device)
        self.tokenizer = _load("CLIP tokenizer", AutoTokenizer.from_pretrained, path)
        self.processor = _load("CLIP image processor", AutoImageProcessor.from_pretrained, path)

    @torch.no_grad()
    def score(self, images: list[Image.Image], prompts: list[str]) -> dict[str, list[float | None]]:
        values: list[float | None] = []
        for i in range(0, len(images), self.batch_size):
            pixels = self.processor(images=images[i : i + self.batch_size], return_tensors="pt")["pixel_values"]
            text = self.tokenizer(prompts[i : i + self.batch_size], padding="max_length", truncation=True,
                                  max_length=self.tokenizer.model_max_length, return_tensors="pt")
            image_features = self.model.get_image_features(pixel_values=pixels.to(self.device, self.model.dtype))
            text_features = self.model.get_text_features(input_ids=text["input_ids"].to(self.device))
            image_features, text_features = (f if isinstance(f, torch.Tensor) else f.pooler_output
                                             for f in (image_features, text_features))
            cosine = (F.normalize(image_features.float(), dim=-1) * F.normalize(text_features.float(), dim=-1)).sum(-1)
            values.extend(float(v) for v in cosine.cpu())
        return {self.name: values}


IDENTITY_KINDS = ("clip", "dino", "hf", "onnx", "toy", "toy-person", "toy-pet")
PROMPT_KINDS = ("clip", "toy", "toy-clip")


def _split(spec: str, kinds: tuple[str, ...], option: str) -> tuple[str, str]:
    kind, _, path = spec.partition(":")
    if kind not in kinds or (kind.startswith("toy") == bool(path)):
        raise NestedAttentionError(
            f"{option} {spec!r} is not a scorer; expected one of "
            + ", ".join(k if k.startswith("toy") else f"{k}:PATH" for k in kinds) + "."
        )
    return kind, path


def identity_embedder(spec: str, word: str | None = None, device: str = "cpu") -> IdentityEmbedder:
    """An identity embedder from its command-line name (``onnx:arcface.onnx``, ``clip:DIR``, ``toy-pet``...)."""
    kind, path = _split(spec, IDENTITY_KINDS, "--identity")
    if kind.startswith("toy"):
        from .toy_scorers import ToyIdentityEmbedder, domain_of

        return ToyIdentityEmbedder(kind[4:] if kind != "toy" else domain_of(word))
    if kind == "onnx":
        return OnnxFaceEmbedder(path)
    return HFImageEmbedder(path, name={"clip": "clip_i", "dino": "dino", "hf": "image_similarity"}[kind], device=device)


def prompt_scorer(spec: str, device: str = "cpu") -> PromptScorer:
    """A prompt scorer from its command-line name (``clip:DIR``, ``toy`` factor accuracy, ``toy-clip``)."""
    kind, path = _split(spec, PROMPT_KINDS, "--prompt-score")
    if kind == "toy":
        from .toy_scorers import ToyFactorScorer

        return ToyFactorScorer()
    if kind == "toy-clip":
        from nested_attention_toy.assets import shipped_path

        return ClipTextScorer(str(shipped_path("clip")), device=device)
    return ClipTextScorer(path, device=device)
