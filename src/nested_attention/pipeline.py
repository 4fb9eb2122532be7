"""Nested Attention on a diffusers pipeline: load adapters, bind them to words, generate."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .adapter import NestedAdapter
from .attach import PlainCalls
from .binding import pipeline_tokenizers, warn_if_truncated, window_positions, word_positions, word_token_id
from .call_checks import check_call
from .controller import NestedAttentionController, install
from .embeds import positions_for_embeds
from .encoder import preprocess
from .errors import NestedAttentionError
from .state import BoundSubject
from .strength import layer_strengths
from .subject import EncodedSubject, Subject


@dataclass
class LoadedAdapter:
    adapter: NestedAdapter
    word: str
    follow_pipeline: bool = True  # moved to the UNet's device and dtype at every call
    scale: dict[str, float] | None = None  # strength per layer (None: 1 everywhere)


class NestedAttention(PlainCalls):
    """Nested Attention personalization installed on an unmodified diffusers pipeline.

    Works with `StableDiffusionPipeline`, `StableDiffusionXLPipeline` and any pipeline whose `unet` is a
    `UNet2DConditionModel` and whose prompts are tokenized by CLIP tokenizers. Installation only swaps the
    processors of cross-attention layers and is undone by `uninstall()`.

    Example:
        >>> na = NestedAttention(pipe)
        >>> na.load_adapter("my-person-adapter", word="person")
        >>> image = na("a person surfing, watercolor", subjects={"person": Subject("me.jpg", lam=1.5)}).images[0]
        >>> na.set_subjects({"person": Subject("me.jpg")})   # or set them once: plain pipe(...) calls use them
        >>> image = pipe("a person reading").images[0]
        >>> na.uninstall()
    """

    def __init__(self, pipe, controller: NestedAttentionController | None = None, cuda_graphs: bool = False):
        """Install on `pipe.unet`, or reuse `controller` already installed there (e.g. a trainer's).

        `cuda_graphs=True` (the UNet on a CUDA device) keeps the bound subjects in static buffers and compiles the
        UNet with `torch.compile(mode="reduce-overhead")`: its calls replay CUDA graphs, with no host work per
        operation, for every subject of the same shapes. The first generation (and any new shape) compiles.
        """
        unet = getattr(pipe, "unet", None)
        if unet is None:
            raise NestedAttentionError(
                f"{type(pipe).__name__} has no `unet`; nested attention supports UNet pipelines such as "
                f"StableDiffusionPipeline and StableDiffusionXLPipeline."
            )
        self.pipe = pipe
        self.tokenizers = pipeline_tokenizers(pipe)
        if controller is not None and controller.unet is not unet:
            raise NestedAttentionError("The given controller is installed on another UNet than this pipeline's.")
        if cuda_graphs:
            if controller is not None or unet.device.type != "cuda":
                raise NestedAttentionError(
                    f"cuda_graphs=True needs the UNet on a CUDA device (it is on {unet.device.type}) and a controller "
                    f"of its own; move the pipeline with pipe.to('cuda') first and pass no controller."
                )
            controller = install(unet, static_buffers=True)
            unet.compile(mode="reduce-overhead")  # in place: pipe.unet stays the same module
        self.controller: NestedAttentionController = controller or install(unet)
        self.adapters: dict[str, LoadedAdapter] = {}
        self._init_plain_calls(pipe)

    # ---- adapters ------------------------------------------------------------------------------------------

    def load_adapter(
        self,
        adapter: NestedAdapter | str | os.PathLike,
        word: str | None = None,
        name: str | None = None,
        image_encoder=None,
        follow_pipeline: bool = True,
    ) -> str:
        """Add an adapter bound to `word` (default: the word it was trained with). Returns its name.

        Several adapters can be loaded at once, each bound to its own word (person + pet, paper Fig. 12).
        Binding an adapter to another word is the paper's semantic variation (Fig. 15). With
        `follow_pipeline=False` the adapter keeps its own device and dtype (a trainer's fp32 weights).
        """
        if word is not None and not (isinstance(word, str) and word.strip()):
            raise NestedAttentionError(
                f"The word {word!r} is empty; give the prompt word the subject replaces (e.g. 'person'), or None "
                f"for the word the adapter was trained with."
            )
        if not isinstance(adapter, NestedAdapter):
            adapter = NestedAdapter.from_pretrained(adapter, image_encoder=image_encoder)
        adapter.check_compatible(self.controller.layers)
        word = (word or adapter.config.word).strip()
        self._check_word(word, exclude=None)
        for other, loaded in self.adapters.items():
            if loaded.adapter.config.mechanism != adapter.config.mechanism:
                raise NestedAttentionError(
                    f"Adapter {other!r} uses the {loaded.adapter.config.mechanism} mechanism and this one the "
                    f"{adapter.config.mechanism} mechanism; one pipeline combines adapters of one mechanism only, "
                    f"so unload {other!r} first."
                )
        name = name or word
        if name in self.adapters:
            raise NestedAttentionError(f"An adapter named {name!r} is already loaded; load this one under another name.")
        if follow_pipeline:
            adapter.to(device=self.pipe.unet.device, dtype=self.pipe.unet.dtype).eval()
        self.adapters[name] = LoadedAdapter(adapter, word, follow_pipeline)
        return name

    def set_word(self, name: str, word: str) -> None:
        """Bind a loaded adapter to another word (semantic variation: "woman", "child" for a person adapter)."""
        self.set_words({name: word})

    def set_words(self, words: Mapping[str, str]) -> None:
        """Bind several adapters to new words at once (all or none), e.g. swapping two adapters' words."""
        words = {name: word.strip() for name, word in words.items()}
        for name in words:
            self._get(name)
        final = {name: words.get(name, loaded.word) for name, loaded in self.adapters.items()}
        for name, word in words.items():
            for tokenizer in self.tokenizers:
                word_token_id(tokenizer, word)
            clash = next((other for other in final if other != name and final[other].lower() == word.lower()), None)
            if clash is not None:
                raise NestedAttentionError(
                    f"Adapter {clash!r} would also be bound to {word!r}; bind each subject to its own word."
                )
        for name, word in words.items():
            self.adapters[name].word = word

    def token_positions(self, name: str, prompt: str, windows: bool = False) -> list[int]:
        """The positions of adapter `name`'s word in `prompt` as the pipeline tokenizes it (for `subject_positions`).

        With `windows=True`, in the layout of long-prompt helpers (compel with `truncate_long_prompts=False`,
        `lpw` pipelines): the prompt's tokens in windows of `model_max_length - 2`, each window with its own
        start and end token, concatenated (77 embeddings per window for CLIP); nothing is cut.
        """
        word = self._get(name).word
        find = window_positions if windows else word_positions
        return find(self.tokenizers, prompt, word)

    def set_scale(self, name: str, scale: float | dict) -> None:
        """The strength of adapter `name`, from 0 (exactly the base model) to 1 (the adapter as trained, the default).

        At strength s the subject word's value is (1 - s) V + s v* (its base value blended with the nested one)
        and its lambda acts as 1 + s (lambda - 1), so 0 is the base model whatever the subject's `lam`. The
        strength dials the adapter in; lambda (from 1 up) then trades identity against the prompt within it.
        Per block, `scale` takes the format of diffusers' `set_ip_adapter_scale`, e.g.
        `{"down": 0.0, "mid": 0.5, "up": {"block_0": [0.0, 1.0, 0.0]}}` (blocks left out get 0). Layers where
        every bound subject has strength 0 run the processor nested attention wrapped, unchanged. For a
        `decoupled` adapter the strength is IP-Adapter's scale on its image attention; `simple`, `global_v` and
        `multi_token` adapters have no strength (their knob is the subject's `lam`, where it applies).
        """
        loaded = self._get(name)
        strengths = layer_strengths(self.pipe.unet, self.controller.layers, scale)
        loaded.adapter.mechanism.check_knobs(None, strengths, loaded.word)
        loaded.scale = strengths

    def unload_adapter(self, name: str) -> None:
        self._get(name)
        del self.adapters[name]
        self.subjects.pop(name, None)

    def uninstall(self) -> None:
        """Restore the UNet's original processors (and, after `cuda_graphs=True`, its uncompiled call) and the
        pipelines' own methods, and drop the adapters."""
        if self.controller.store is not None:  # compiled by cuda_graphs=True: `nn.Module.compile` sets this field
            self.pipe.unet._compiled_call_impl = None
        self.controller.uninstall()
        self.adapters.clear()
        self.detach()

    def reinstall(self) -> None:
        """After `set_attn_processor` / xformers replaced processors: wrap the new ones and keep nesting."""
        self.controller.reinstall()

    def _get(self, name: str) -> LoadedAdapter:
        if name not in self.adapters:
            raise NestedAttentionError(f"No adapter named {name!r} is loaded; loaded: {sorted(self.adapters)}.")
        return self.adapters[name]

    def _check_word(self, word: str, exclude: str | None) -> None:
        for tokenizer in self.tokenizers:
            word_token_id(tokenizer, word)
        for other, loaded in self.adapters.items():
            if other != exclude and loaded.word.lower() == word.lower():
                raise NestedAttentionError(
                    f"Adapter {other!r} is already bound to {word!r}; bind each subject to its own word."
                )

    # ---- binding subjects for one call ---------------------------------------------------------------------

    @torch.no_grad()
    def encode_subject(self, name: str, subject: Subject) -> EncodedSubject:
        """Encode `subject`'s images once with adapter `name`, for reuse in any number of calls.

        The result goes wherever a Subject goes for this adapter (`subjects={name: encoded}`, or in a per-prompt
        list), and the images are not encoded again; the analogue of diffusers' `ip_adapter_image_embeds`.

        Example:
            >>> me = na.encode_subject("person", Subject(["me-1.jpg", "me-2.jpg"]))
            >>> na("a person surfing", subjects={"person": me})
            >>> na("a person reading", subjects={"person": dataclasses.replace(me, lam=2.0)})
        """
        if not isinstance(subject, Subject):
            raise NestedAttentionError(f"encode_subject takes a Subject; got {type(subject).__name__}.")
        return self._encode_each(name, [subject])[0]

    def _encode_each(self, name: str, subjects: Sequence[Subject]) -> list[EncodedSubject]:
        """All images of `subjects` through the adapter's encoder in one batch, split back per subject."""
        adapter = self._get(name).adapter
        images = [image for subject in subjects for image in subject.images]
        pixels = preprocess(adapter.image_processor, images, adapter.encoder.query_tokens.device,
                            adapter.encoder.image_encoder.dtype)
        per_image = adapter.encoder(pixels)  # (total images, n_q, width)
        n_q = per_image.shape[1]
        encoded, start = [], 0
        for subject in subjects:
            count = len(subject.images)
            bias = None
            # equal weights shift every logit by the same constant: no bias, and the fused attention kernel
            if subject.weights and len(set(subject.weights)) > 1:
                bias = torch.tensor([math.log(w) if w > 0 else -math.inf for w in subject.weights],
                                    device=per_image.device).repeat_interleave(n_q)
            encoded.append(EncodedSubject(name, per_image[start : start + count].flatten(0, 1), bias, subject.lam))
            start += count
        return encoded

    @torch.no_grad()
    def encode(
        self, name: str, subjects: Sequence[Subject | EncodedSubject]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Subject tokens of several subjects for one adapter, padded to a common length.

        Returns:
            tokens (S, M, width) and an additive bias (S, M) (log image weights, -inf on padding) or None.
        """
        adapter = self._get(name).adapter
        width = adapter.config.qformer_hidden_size
        for subject in subjects:
            if isinstance(subject, EncodedSubject) and (subject.adapter != name or subject.tokens.shape[-1] != width):
                raise NestedAttentionError(
                    f"A subject encoded by adapter {subject.adapter!r} (width {subject.tokens.shape[-1]}) was given "
                    f"for adapter {name!r} (width {width}); encode it with na.encode_subject({name!r}, ...)."
                )
        raw = [s for s in subjects if isinstance(s, Subject)]
        fresh = iter(self._encode_each(name, raw) if raw else [])
        encoded = [next(fresh) if isinstance(s, Subject) else s for s in subjects]
        device, dtype = adapter.encoder.query_tokens.device, adapter.encoder.query_tokens.dtype
        length = max(e.tokens.shape[0] for e in encoded)
        tokens = torch.zeros(len(encoded), length, width, device=device, dtype=dtype)
        bias = torch.zeros(len(encoded), length, device=device)
        for i, e in enumerate(encoded):
            tokens[i, : e.tokens.shape[0]] = e.tokens
            if e.bias is not None:
                bias[i, : e.tokens.shape[0]] = e.bias
            bias[i, e.tokens.shape[0] :] = -math.inf
        needs_bias = any(e.bias is not None or e.tokens.shape[0] != length for e in encoded)
        return tokens, (bias if needs_bias else None)

    @torch.no_grad()  # inference only: the trainer builds its BoundSubject with gradients itself
    def bind(
        self,
        prompts: Sequence[str | None],
        subjects: Mapping[str, Subject | EncodedSubject | Sequence[Subject | EncodedSubject | None]],
        num_images_per_prompt: int = 1,
        positions: Mapping[str, Sequence[Sequence[int]]] | None = None,
        text_length: int | None = None,
    ) -> list[BoundSubject]:
        """Encode the subjects once and find their words in the prompts: the state for one generation.

        Args:
            prompts: the batch of prompts (None each when `positions` are given).
            subjects: adapter name -> a Subject (or an EncodedSubject from `encode_subject`) for every prompt, or
                a list with one of them (or None: that prompt does not use this adapter) per prompt.
            num_images_per_prompt: rows per prompt, as the pipeline repeats them.
            positions: adapter name -> the token positions of its word in each prompt (prompt embeddings), or
                None to find each adapter's word in `prompts`.
            text_length: the text tokens the UNet attends to (default: the tokenizer's length).
        """
        if not isinstance(subjects, Mapping):
            raise NestedAttentionError(
                f"subjects is {type(subjects).__name__}; expected a dict from adapter name to Subject, e.g. "
                f"{{'person': Subject('me.jpg')}}."
            )
        unknown = sorted(set(subjects) - set(self.adapters))
        if unknown:
            raise NestedAttentionError(
                f"No adapter is loaded under the name(s) {unknown}; loaded: {sorted(self.adapters)}."
            )
        unet = self.pipe.unet
        # follow the pipeline if it moved (pipe.to) since loading; under model CPU offload the UNet sits on the CPU
        # between calls, so encode where it will run (diffusers' execution device), not per layer at every step
        device = getattr(self.pipe, "_execution_device", unet.device)
        for loaded in self.adapters.values():
            if loaded.follow_pipeline:
                loaded.adapter.to(device=device, dtype=unet.dtype)
        rows = len(prompts) * num_images_per_prompt
        text_length = text_length or self.tokenizers[0].model_max_length
        bound = []
        for name, given in subjects.items():
            one = isinstance(given, (Subject, EncodedSubject))
            per_prompt = [given] * len(prompts) if one else list(given) if isinstance(given, Sequence) else []
            if len(per_prompt) != len(prompts) or not all(
                s is None or isinstance(s, (Subject, EncodedSubject)) for s in per_prompt
            ):
                got = f"a {type(given).__name__}" + (f" of {len(given)}" if isinstance(given, Sequence) else "")
                raise NestedAttentionError(
                    f"Subjects for {name!r} must be one Subject (or EncodedSubject) or a list of {len(prompts)} (one "
                    f"per prompt, None to skip a prompt); got {got}."
                )
            distinct = list({id(s): s for s in per_prompt if s is not None}.values())
            if not distinct:
                continue
            slot_of = {id(s): i for i, s in enumerate(distinct)}
            loaded = self._get(name)
            mask = torch.zeros(rows, text_length, dtype=torch.bool)
            slots = torch.zeros(rows, dtype=torch.long)
            lam = torch.ones(rows)
            for p, (prompt, subject) in enumerate(zip(prompts, per_prompt)):
                if subject is None:
                    continue
                span = slice(p * num_images_per_prompt, (p + 1) * num_images_per_prompt)
                where = word_positions(self.tokenizers, prompt, loaded.word) if positions is None else positions[name][p]
                if not where:
                    raise NestedAttentionError(
                        f"subject_positions[{name!r}] gives no token for prompt {p}, which has a subject; give the "
                        f"position of its word, or None as that prompt's subject."
                    )
                mask[span, where] = True
                slots[span] = slot_of[id(subject)]
                lam[span] = subject.lam
            lam = None if bool((lam == 1).all()) else lam
            loaded.adapter.mechanism.check_knobs(lam, loaded.scale, loaded.word)
            tokens, bias = self.encode(name, distinct)
            bound.append(loaded.adapter.subject_state(tokens, self.controller.layers, mask, slots, bias, lam,
                                                      loaded.scale))
        return bound

    # ---- generation ----------------------------------------------------------------------------------------

    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        subjects: Mapping[str, Subject | EncodedSubject | Sequence[Subject | EncodedSubject | None]] | None = None,
        num_images_per_prompt: int = 1,
        subject_positions: Mapping[str, int | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor] | None = None,
        **pipe_kwargs,
    ):
        """Run the pipeline with the subjects bound; other keyword arguments go to the pipeline unchanged.

        The nested keys and values are computed once here, before the denoising loop. Rows of the negative
        prompt (the unconditional half of guidance) get exactly the vanilla attention.

        With precomputed `prompt_embeds` (P, T, width) (prompt weighting, long-prompt helpers; SDXL also needs
        `pooled_prompt_embeds`), leave `prompt` None and give `subject_positions`: adapter name -> the subject
        word's token positions, as one index, a list of them for every prompt, a list of P lists (one per prompt)
        or a bool mask (P, T). `token_positions` finds them in a prompt string.
        """
        self.controller.check_installed()
        prompts = check_call(self.pipe, prompt, num_images_per_prompt, pipe_kwargs)
        self._in_call = True
        try:
            return self._generate(prompt, prompts, subjects, num_images_per_prompt, subject_positions, pipe_kwargs)
        finally:
            self._in_call = False

    def _generate(self, prompt, prompts, subjects, num_images_per_prompt, subject_positions, pipe_kwargs):
        if prompts is None:
            names = list(subjects) if isinstance(subjects, Mapping) else []
            count, length, positions = positions_for_embeds(self.pipe, subject_positions, names, pipe_kwargs)
            bound = self.bind([None] * count, subjects, num_images_per_prompt, positions, length)
            with self.controller.bound(bound):
                return self.pipe(num_images_per_prompt=num_images_per_prompt, **pipe_kwargs)
        if subject_positions is not None:
            raise NestedAttentionError(
                "subject_positions go with prompt_embeds; with prompt strings the subject word is found by tokenizing."
            )
        for text in prompts:
            warn_if_truncated(self.tokenizers, text)
        prompt_2 = pipe_kwargs.get("prompt_2")
        if prompt_2 is not None and ([prompt_2] if isinstance(prompt_2, str) else list(prompt_2)) != prompts:
            raise NestedAttentionError("prompt_2 must equal prompt: the subject word must be the same token for both SDXL text encoders.")
        bound = self.bind(prompts, subjects, num_images_per_prompt)
        with self.controller.bound(bound):
            return self.pipe(
                prompt=prompt if isinstance(prompt, str) else prompts,  # diffusers wants negative_prompt's type
                num_images_per_prompt=num_images_per_prompt,
                **pipe_kwargs,
            )
