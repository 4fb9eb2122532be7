"""Plain pipeline calls with nested attention: subjects set once are bound at every call's prompt encoding.

Every diffusers UNet pipeline (text-to-image, img2img, inpainting, ControlNet; SD and SDXL) encodes its prompts
with `self.encode_prompt(...)` before the denoising loop and ends its call with `self.maybe_free_model_hooks()`.
An attached pipeline's two methods are wrapped on the instance: the first binds the set subjects to the prompts
being encoded (which fixes the rows, `num_images_per_prompt` and the guidance layout exactly), the second
unbinds them. Pipelines made with `from_pipe` share the UNet and text encoders but not these methods, so the
text encoders carry a hook that refuses a prompt encoded by a pipeline that is not attached while subjects
are set, instead of letting it generate without them.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager

from torch import nn

from .binding import warn_if_truncated, word_token_id
from .errors import NestedAttentionError
from .subject import EncodedSubject, Subject

WRAPPED = ("encode_prompt", "maybe_free_model_hooks")


def call_arguments(method: Callable, args: tuple, kwargs: dict) -> dict:
    """The arguments of a call by name, defaults filled in (positional and keyword calls alike)."""
    bound = inspect.signature(method).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


class Attachment:
    """The wrapped methods of one pipeline; `detach()` restores the class's own."""

    def __init__(self, pipe, on_encode: Callable[[dict], None], on_end: Callable[[], None],
                 allowed: Callable[[], AbstractContextManager]):
        missing = [name for name in WRAPPED if not callable(getattr(pipe, name, None))]
        if missing:
            raise NestedAttentionError(
                f"{type(pipe).__name__} has no {missing[0]}(); plain calls with set subjects need a diffusers "
                f"UNet pipeline (StableDiffusion..., StableDiffusionXL...): call na(...) with subjects= instead."
            )
        if any(name in vars(pipe) for name in WRAPPED):
            raise NestedAttentionError(
                f"This {type(pipe).__name__} is already attached to another NestedAttention; call detach() or "
                f"uninstall() on that one first."
            )
        self.pipe = pipe
        encode, end = pipe.encode_prompt, pipe.maybe_free_model_hooks

        @functools.wraps(encode)
        def encode_prompt(*args, **kwargs):
            on_encode(call_arguments(encode, args, kwargs))
            with allowed():
                return encode(*args, **kwargs)

        @functools.wraps(end)
        def maybe_free_model_hooks(*args, **kwargs):
            try:
                return end(*args, **kwargs)
            finally:
                on_end()

        pipe.encode_prompt, pipe.maybe_free_model_hooks = encode_prompt, maybe_free_model_hooks

    def detach(self) -> None:
        for name in WRAPPED:
            self.pipe.__dict__.pop(name, None)


class EncodingGuard:
    """Forward pre-hooks on the text encoders: while `armed()` is true, only attached pipelines may encode."""

    def __init__(self, encoders: list[nn.Module], armed: Callable[[], bool]):
        self._armed, self._open = armed, 0
        self._handles = [encoder.register_forward_pre_hook(self._check) for encoder in encoders]

    def _check(self, module, args) -> None:
        if self._open == 0 and self._armed():
            raise NestedAttentionError(
                "A prompt was encoded by a pipeline that nested attention is not attached to while subjects are "
                "set (a pipeline made with from_pipe?): call na.attach(that_pipeline) first, or na.set_subjects(None) "
                "to use the text encoder without subjects."
            )

    @contextmanager
    def allowed(self) -> Iterator[None]:
        """A block in which the text encoders may run (an attached pipeline's own prompt encoding)."""
        self._open += 1
        try:
            yield
        finally:
            self._open -= 1

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class PlainCalls:
    """`NestedAttention`'s plain-call half: subjects set once, bound by every attached pipeline's own calls."""

    def _init_plain_calls(self, pipe) -> None:
        self.subjects: dict[str, EncodedSubject] = {}  # set_subjects: bound at every attached pipeline's call
        self._in_call = False  # inside na(...), whose own subjects are bound
        self._guard: EncodingGuard | None = None  # on the shared text encoders while any pipeline is attached
        self._attachments: list[Attachment] = []
        self.attach(pipe)

    def detach(self) -> None:
        """Undo `attach` for every pipeline: their plain calls no longer bind subjects (`uninstall` does this too)."""
        self.subjects.clear()
        for attachment in self._attachments:
            attachment.detach()
        self._attachments.clear()
        if self._guard is not None:
            self._guard.remove()
            self._guard = None

    def attach(self, pipe) -> None:
        """Make plain `pipe(...)` calls use the subjects of `set_subjects` (done for the constructor's pipeline).

        For pipelines that share this UNet, typically made with `from_pipe` (img2img, inpainting, ControlNet).
        """
        if getattr(pipe, "unet", None) is not self.pipe.unet:
            raise NestedAttentionError(
                f"This {type(pipe).__name__} has another UNet than the pipeline nested attention is installed on; "
                f"derive it with from_pipe (which shares the UNet), or install NestedAttention on it."
            )
        if any(attachment.pipe is pipe for attachment in self._attachments):
            return
        self._attachments.append(Attachment(pipe, self._on_encode, self._on_end, lambda: self._guard.allowed()))
        if self._guard is None:
            encoders = [getattr(self.pipe, name, None) for name in ("text_encoder", "text_encoder_2")]
            self._guard = EncodingGuard([e for e in encoders if e is not None],
                                        armed=lambda: bool(self.subjects) and not self._in_call)

    def set_subjects(self, subjects: Mapping[str, Subject | EncodedSubject] | None) -> None:
        """Subjects for plain pipeline calls: `pipe(prompt, ...)` then binds each to its word in every prompt.

        Subjects are encoded here, once. A prompt without an adapter's word runs without that subject. `None` (or
        {}) makes plain calls the base model again; `na(...)` calls always use their own `subjects`.
        """
        given = dict(subjects or {})
        if given and not self._attachments:
            raise NestedAttentionError(
                "No pipeline is attached (detach() was called), so no plain call would use these subjects; call "
                "na.attach(pipe) first."
            )
        for name, subject in given.items():
            if not isinstance(subject, (Subject, EncodedSubject)):
                raise NestedAttentionError(
                    f"set_subjects takes one Subject (or EncodedSubject) per adapter name; got "
                    f"{type(subject).__name__} for {name!r}."
                )
            if isinstance(subject, Subject):
                given[name] = self.encode_subject(name, subject)
            else:
                self.encode(name, [subject])  # refuses a subject that another adapter encoded
        self.subjects = given

    def _on_encode(self, arguments: dict) -> None:
        """An attached pipeline is encoding its prompts: bind the set subjects for this call."""
        if self._in_call or not self.subjects:
            return
        self.controller.check_installed()
        prompt = arguments.get("prompt")
        if prompt is None:
            raise NestedAttentionError(
                "A plain pipeline call with prompt_embeds cannot find the subject words; call na(prompt_embeds=..., "
                "subjects=..., subject_positions=...) instead."
            )
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompt_2 = arguments.get("prompt_2")
        if prompt_2 is not None and ([prompt_2] if isinstance(prompt_2, str) else list(prompt_2)) != prompts:
            raise NestedAttentionError(
                "prompt_2 must equal prompt: the subject word must be the same token for both SDXL text encoders."
            )
        for text in prompts:
            warn_if_truncated(self.tokenizers, text)
        per_prompt = {
            name: [subject if self._mentions(name, text) else None for text in prompts]
            for name, subject in self.subjects.items()
        }
        self.controller.bind(self.bind(prompts, per_prompt, arguments.get("num_images_per_prompt") or 1))

    def _mentions(self, name: str, prompt: str) -> bool:
        """Whether `prompt` holds the adapter's word anywhere (past the tokenizer's cut too: then bind refuses it)."""
        token = word_token_id(self.tokenizers[0], self._get(name).word, prompt)
        return token in self.tokenizers[0](prompt).input_ids

    def _on_end(self) -> None:
        if not self._in_call:
            self.controller.clear()
