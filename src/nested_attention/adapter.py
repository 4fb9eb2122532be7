"""The adapter: subject encoder + one pair of nested key/value projections per cross-attention layer."""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPVisionModel
from transformers.utils import logging as transformers_logging

from .card import AdapterCard, write_card
from .config import CONFIG_NAME, NestedAdapterConfig
from .encoder import CLIPImageProcessor, default_image_processor, subject_encoder
from .errors import NestedAttentionError
from .layers import CrossAttentionLayer, cross_attention_layers
from .mechanisms import Mechanism, mechanism
from .paths import hub_or_local_folder, looks_like_local_path
from .sources import IMAGE_ENCODER, resolve
from .state import BoundSubject

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "nested_adapter.safetensors"
IMAGE_ENCODER_FOLDER = "image_encoder"
_LAYER_PREFIX = "layers."


def _module_key(path: str) -> str:
    # nn.ModuleDict keys may not contain "."; diffusers module paths never contain "__"
    return path.replace(".", "__")


class NestedProjection(nn.Module):
    """K̆ = W_K̆ t and V̆ = W_V̆ t for one layer (paper 3.2): encoder tokens -> the layer's inner dimension.

    Mechanisms that take their keys from the text (global_v, multi_token) have no `to_k`.
    """

    def __init__(self, token_dim: int, inner_dim: int, with_key: bool = True):
        super().__init__()
        if with_key:
            self.to_k = nn.Linear(token_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(token_dim, inner_dim, bias=False)


class NestedAdapter(nn.Module):
    """A trained (or fresh) Nested Attention adapter for one UNet architecture and one subject domain.

    Build a fresh one for training with `NestedAdapter.for_unet(unet, image_encoder, ...)`; load a trained
    one with `NestedAdapter.from_pretrained(path)`. Only the subject encoder (Q-Former or linear readout) and the
    per-layer projections are adapter weights; the CLIP image encoder is frozen and referenced by `config.image_encoder`.
    """

    def __init__(
        self,
        config: NestedAdapterConfig,
        image_encoder: CLIPVisionModel,
        image_processor: CLIPImageProcessor | None = None,
    ):
        super().__init__()
        if image_encoder.config.hidden_size != config.image_encoder_hidden_size:
            raise NestedAttentionError(
                f"The image encoder has width {image_encoder.config.hidden_size} but the adapter was built for "
                f"width {config.image_encoder_hidden_size}; pass the CLIP vision model the adapter was trained with."
            )
        self.config = config
        self.image_processor = image_processor or default_image_processor(image_encoder)
        self.encoder = subject_encoder(config, image_encoder)
        self.mechanism: Mechanism = mechanism(config.mechanism)
        self.layers = nn.ModuleDict({
            _module_key(path): NestedProjection(config.qformer_hidden_size, size, self.mechanism.has_key)
            for path, size in config.layers.items()
        })

    @classmethod
    def for_unet(
        cls,
        unet: nn.Module,
        image_encoder: CLIPVisionModel,
        image_encoder_name_or_path: str = "",
        image_processor: CLIPImageProcessor | None = None,
        **config_kwargs,
    ) -> NestedAdapter:
        """A fresh adapter with one nested layer per cross-attention layer of `unet`."""
        layers = {path: layer.inner_dim for path, layer in cross_attention_layers(unet).items()}
        config = NestedAdapterConfig(
            layers=layers,
            image_encoder=image_encoder_name_or_path or getattr(image_encoder, "name_or_path", "") or "",
            image_encoder_hidden_size=image_encoder.config.hidden_size,
            **config_kwargs,
        )
        return cls(config, image_encoder, image_processor)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The subject encoder (Q-Former or linear readout) and the nested projections (never the frozen CLIP)."""
        return [p for name, p in self.named_parameters() if not name.startswith("encoder.image_encoder.")]

    # ---- the nested keys and values --------------------------------------------------------------------

    def projection(self, layer_path: str) -> NestedProjection:
        return self.layers[_module_key(layer_path)]

    def nested_keys_values(
        self, tokens: torch.Tensor, layers: dict[str, CrossAttentionLayer]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer nested keys and values, split into heads (mechanisms with keys: nested, decoupled, simple).

        Args:
            tokens: (S, M, qformer_hidden_size) subject tokens (S subjects, M tokens each).
            layers: the UNet's cross-attention layers (for head counts).
        Returns:
            layer path -> (K̆, V̆), each (S, H, M, head_dim), contiguous.
        """
        if not self.mechanism.has_key:
            raise NestedAttentionError(
                f"A {self.mechanism.name} adapter has no nested keys; use layer_states(tokens, layers, bias)."
            )
        return self.layer_states(tokens, layers)

    def layer_states(
        self, tokens: torch.Tensor, layers: dict[str, CrossAttentionLayer], bias: torch.Tensor | None = None
    ) -> dict[str, tuple[torch.Tensor, ...]]:
        """What every layer's mechanism needs of the subject tokens (for nested: `nested_keys_values`). Once per
        generation, not per step.

        Args:
            tokens: (S, M, qformer_hidden_size) subject tokens (S subjects, M tokens each).
            layers: the UNet's cross-attention layers (for head counts).
            bias: (S, M) additive token bias (log image weights, -inf padding), or None; mechanisms that fold it
                in here (global_v, multi_token) use it now, the others at every step (`subject_state`).
        Returns:
            layer path -> tensors, each (S, H, ...).
        """
        return {path: self.mechanism.layer_state(self.projection(path), tokens, bias, layer.heads, layer.head_dim)
                for path, layer in layers.items()}

    def subject_state(
        self,
        tokens: torch.Tensor,
        layers: dict[str, CrossAttentionLayer],
        token_mask: torch.Tensor,
        slots: torch.Tensor,
        bias: torch.Tensor | None = None,
        lam: torch.Tensor | None = None,
        scale: dict[str, float] | None = None,
    ) -> BoundSubject:
        """The state a controller binds for this adapter: S subjects' tokens (S, M, width) on rows whose subject
        word sits at `token_mask` (R, T), row r using subject `slots[r]`; bias (S, M), lam (R,), strength per layer."""
        return BoundSubject(
            token_mask=token_mask, slots=slots, nested=self.layer_states(tokens, layers, bias),
            bias=bias if self.mechanism.per_step_bias else None, lam=lam, alpha=self.config.alpha, scale=scale,
            mechanism=self.mechanism.name,
        )

    def check_compatible(self, layers: dict[str, CrossAttentionLayer]) -> None:
        """Refuse, in one sentence, an adapter whose layer names or sizes differ from the UNet's."""
        ours, theirs = self.config.layers, {path: layer.inner_dim for path, layer in layers.items()}
        if ours == theirs:
            return
        missing = sorted(set(theirs) - set(ours))
        extra = sorted(set(ours) - set(theirs))
        resized = sorted(p for p in set(ours) & set(theirs) if ours[p] != theirs[p])
        details = []
        if missing:
            details.append(f"{len(missing)} UNet cross-attention layers have no nested layer (first: {missing[0]})")
        if extra:
            details.append(f"{len(extra)} nested layers match no UNet layer (first: {extra[0]})")
        if resized:
            p = resized[0]
            details.append(f"{len(resized)} layers differ in size (first: {p}, adapter {ours[p]} vs UNet {theirs[p]})")
        raise NestedAttentionError(
            "This adapter was trained for a different UNet: " + "; ".join(details)
            + ". Use an adapter trained for this base model (SD 1.5 and SDXL adapters are not interchangeable)."
        )

    # ---- saving and loading ------------------------------------------------------------------------------

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's own weights (no CLIP), keyed by module path: `layers.<unet path>.to_k.weight`."""
        state = {}
        for name, tensor in self.state_dict().items():
            if name.startswith("encoder.image_encoder."):
                continue
            if name.startswith(_LAYER_PREFIX):
                escaped, _, rest = name[len(_LAYER_PREFIX):].partition(".")
                name = _LAYER_PREFIX + escaped.replace("__", ".") + "." + rest
            state[name] = tensor.detach().contiguous()
        return state

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], source: str = "the state dict") -> None:
        """Load weights saved by `adapter_state_dict`; names missing, unexpected or mis-sized keys."""
        expected = {name: tensor for name, tensor in self.adapter_state_dict().items()}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        resized = sorted(n for n in set(expected) & set(state) if expected[n].shape != state[n].shape)
        if missing or unexpected or resized:
            details = []
            if missing:
                details.append(f"{len(missing)} missing keys (first: {missing[0]})")
            if unexpected:
                details.append(f"{len(unexpected)} unexpected keys (first: {unexpected[0]})")
            if resized:
                n = resized[0]
                details.append(f"{len(resized)} keys of the wrong shape (first: {n}, expected "
                               f"{tuple(expected[n].shape)}, found {tuple(state[n].shape)})")
            raise NestedAttentionError(
                f"The weights in {source} do not match the adapter config: " + "; ".join(details)
                + ". The config and weights files must come from the same save_pretrained call."
            )
        broken = sorted(name for name, tensor in state.items() if not bool(torch.isfinite(tensor).all()))
        if broken:
            raise NestedAttentionError(
                f"The weights in {source} hold NaN or infinite values in {len(broken)} tensors (first: {broken[0]}); "
                f"the file is damaged or training diverged. Use another checkpoint of the adapter."
            )
        own = {**dict(self.named_parameters()), **dict(self.named_buffers())}
        with torch.no_grad():
            for name, tensor in state.items():
                target = own[self._internal_name(name)]
                target.copy_(tensor.to(device=target.device, dtype=target.dtype))

    @staticmethod
    def _internal_name(name: str) -> str:
        if not name.startswith(_LAYER_PREFIX):
            return name
        body, _, leaf = name[len(_LAYER_PREFIX):].rpartition(".")
        path, _, which = body.rpartition(".")
        return f"{_LAYER_PREFIX}{_module_key(path)}.{which}.{leaf}"

    def save_pretrained(
        self, directory: str | os.PathLike, save_image_encoder: bool = False, card: AdapterCard | None = None
    ) -> Path:
        """Write `nested_adapter_config.json`, `nested_adapter.safetensors` (adapter weights only) and a model card
        (`README.md`: the adapter, its base model, training and metrics as far as `card` tells them, and usage).

        With `save_image_encoder`, the CLIP vision model and its processor go to `image_encoder/` so that the
        folder is self-contained.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.to_json_file(directory / CONFIG_NAME)
        write_card(directory, self.config, card)
        save_file(self.adapter_state_dict(), str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        if save_image_encoder:
            self.encoder.image_encoder.save_pretrained(directory / IMAGE_ENCODER_FOLDER)
            self.image_processor.save_pretrained(directory / IMAGE_ENCODER_FOLDER)
        return directory

    def push_to_hub(
        self, repo_id: str, card: AdapterCard | None = None, save_image_encoder: bool = False,
        private: bool | None = None, token: str | None = None, commit_message: str = "Upload nested attention adapter",
    ) -> str:
        """Upload the folder `save_pretrained` writes (config, weights, model card) to hub repository `repo_id`,
        creating it if needed; `from_pretrained(repo_id)` loads it back. Returns the commit's URL."""
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="nested-adapter-") as folder:
            self.save_pretrained(folder, save_image_encoder=save_image_encoder, card=card)
            commit = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message)
        return str(getattr(commit, "commit_url", commit))

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        image_encoder: CLIPVisionModel | str | None = None,
        torch_dtype: torch.dtype | None = None,
        cache_dir: str | os.PathLike | None = None,
        revision: str | None = None,
    ) -> NestedAdapter:
        """Load an adapter folder written by `save_pretrained`, or a hub repository holding one.

        Args:
            directory: the adapter folder, or a hub id ("owner/name"; downloaded once into the hub cache, or
                `cache_dir`, then read from there, also offline).
            image_encoder: a loaded CLIP vision model, or a local directory / hub id, overriding the one the
                config names (use when the adapter was trained on a machine whose paths you do not have).
            torch_dtype: dtype of the returned adapter (fp32 by default).
            cache_dir, revision: for a hub id, as in huggingface_hub's `snapshot_download`.

        Returns the adapter in eval mode.
        """
        files = [CONFIG_NAME, WEIGHTS_NAME, f"{IMAGE_ENCODER_FOLDER}/*"]
        directory = hub_or_local_folder(directory, "The adapter", files, cache_dir=cache_dir, revision=revision)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not directory.is_dir():
            raise NestedAttentionError(f"Adapter folder {directory} does not exist.")
        for path in (config_path, weights_path):
            if not path.is_file():
                raise NestedAttentionError(
                    f"{directory} is not a nested attention adapter: it has no {path.name}. Expected the folder "
                    f"written by NestedAdapter.save_pretrained (or the trainer's export)."
                )
        config = NestedAdapterConfig.from_json_file(config_path)
        if isinstance(image_encoder, nn.Module):
            source, model = "the given image encoder", image_encoder
            processor = default_image_processor(model)
        else:
            local = directory / IMAGE_ENCODER_FOLDER
            source = str(image_encoder or (local if local.is_dir() else config.image_encoder))
            model, processor = load_image_encoder(source)
        try:
            state = load_file(str(weights_path))
        except (SafetensorError, OSError) as error:
            raise NestedAttentionError(f"{weights_path} is not a readable safetensors file ({error}).") from None
        adapter = cls(config, model, processor)
        adapter.load_adapter_state_dict(state, source=str(weights_path))
        logger.info("Loaded adapter %s (image encoder: %s)", directory, source)
        adapter.eval()  # like transformers' from_pretrained: Q-Former dropout off until train() is called
        return adapter.to(dtype=torch_dtype) if torch_dtype is not None else adapter


def load_image_encoder(name_or_path: str) -> tuple[CLIPVisionModel, CLIPImageProcessor]:
    """A transformers CLIP vision model (any CLIP checkpoint) and its processor, from a folder, a hub id or the
    name of an installed one (``toy``: the toy world's CLIP, `sources.py`)."""
    if not name_or_path:
        raise NestedAttentionError(
            "The adapter config names no image encoder; pass image_encoder= (or --image-encoder on the command line)."
        )
    name_or_path = resolve(IMAGE_ENCODER, name_or_path)
    local = Path(name_or_path).expanduser()
    if looks_like_local_path(name_or_path) and not local.is_dir():
        raise NestedAttentionError(
            f"The CLIP image encoder {name_or_path} is no such folder; give the folder of a CLIP vision model "
            f"(config.json and model.safetensors) or a hub id such as openai/clip-vit-large-patch14."
        )
    if local.is_dir() and not list(local.glob("*.safetensors")):
        pickles = sorted(p.name for p in local.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        raise NestedAttentionError(
            f"The CLIP image encoder folder {name_or_path} holds no .safetensors weights"
            + (f", only pickled ones ({', '.join(pickles)}), which are never loaded (loading a pickle runs code)"
               if pickles else "")
            + "; convert them to model.safetensors (save_pretrained(..., safe_serialization=True)) or give another "
            "encoder."
        )
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # a full CLIP checkpoint's text tower is no news: not reported
    try:
        model, info = CLIPVisionModel.from_pretrained(name_or_path, use_safetensors=True, output_loading_info=True)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise NestedAttentionError(
            f"Could not load the CLIP image encoder {name_or_path!r} ({first_line}). Pass a local directory or "
            f"a reachable hub id with image_encoder= (or --image-encoder)."
        ) from None
    except RuntimeError as error:  # transformers' refusal of weights whose shapes differ from the config's
        if "mismatch" not in str(error):
            raise
        raise NestedAttentionError(
            f"The CLIP image encoder {name_or_path!r} holds weights of other shapes than its config.json says; give "
            f"a CLIP checkpoint whose config and weights were saved together."
        ) from None
    finally:
        transformers_logging.set_verbosity(verbosity)
    if info["missing_keys"]:
        absent = sorted(info["missing_keys"])
        raise NestedAttentionError(
            f"The CLIP image encoder {name_or_path!r} lacks {len(absent)} of a CLIP vision model's weights (e.g. "
            f"{absent[0]}), which would start random; give a CLIP checkpoint (a CLIPModel or a CLIPVisionModel)."
        )
    try:
        processor = CLIPImageProcessor.from_pretrained(name_or_path)
    except (OSError, ValueError):
        processor = default_image_processor(model)
    return model, processor
