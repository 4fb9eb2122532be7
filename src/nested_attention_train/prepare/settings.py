"""The settings of one prepared folder, checked on creation and saved in it (``prepare.json``) so that a second
run into the same folder goes on with the same ones."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

from nested_attention.errors import NestedAttentionError

from .words import SUBJECT_WORDS

DOMAINS = ("person", "pet")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class PrepareSettings:
    """What decides the prepared files; see docs/data.md.

    domain: "person" (faces: aligned crop -> caption -> photo) or "pet" (the pet -> caption -> the same image).
    word: the domain word the captions are rewritten to (default: the domain's name).
    resolution: side of the square targets (the training resolution).
    subject_size: side of the aligned face crops (persons).
    min_face: faces narrower than this many pixels of the photo are dropped.
    min_side: photos whose short side is below this many pixels are skipped.
    keep_largest_face: with several faces, keep the largest instead of skipping the photo.
    keep_faces_without_eyes: keep a face whose eyes are not found, cropped upright (default: skip the photo).
    caption_template: the caption of photos without one, with {word} for the domain word (default: skip them).
    subject_words: the words rewritten to `word` (default: SUBJECT_WORDS of the domain).
    masks: a folder of masks named like the photos (pets: white is the pet; composited onto white).
    caption_model: a local transformers captioning model folder, for photos without a caption (before the template).
    caption_prompt: the text its captions continue, for conditional captioning models (BLIP: "a photo of").
    """

    domain: str
    word: str | None = None
    resolution: int = 1024
    subject_size: int = 512
    min_face: int = 64
    min_side: int = 256
    keep_largest_face: bool = False
    keep_faces_without_eyes: bool = False
    caption_template: str | None = None
    subject_words: tuple[str, ...] | None = None
    masks: str | None = None
    caption_model: str | None = None
    caption_prompt: str | None = None

    def __post_init__(self):
        if self.domain not in DOMAINS:
            raise NestedAttentionError(f"The domain must be one of {', '.join(DOMAINS)}, got {self.domain!r}.")
        if self.word is None:
            object.__setattr__(self, "word", self.domain)
        if self.subject_words is None:
            object.__setattr__(self, "subject_words", SUBJECT_WORDS[self.domain])
        object.__setattr__(self, "subject_words", tuple(self.subject_words))
        for name, least in (("resolution", 16), ("subject_size", 16), ("min_face", 1), ("min_side", 16)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < least:
                raise NestedAttentionError(f"{name} must be an integer of at least {least}, got {value!r}.")
        if self.caption_template is not None and "{word}" not in self.caption_template:
            raise NestedAttentionError(
                f"The caption template must contain {{word}} where the subject goes, e.g. 'a photo of a {{word}}', "
                f"got {self.caption_template!r}."
            )
        if self.masks is not None:
            if self.domain != "pet":
                raise NestedAttentionError(
                    f"Masks put pets onto white; the {self.domain} domain finds faces instead. Leave out the masks or "
                    f"prepare the pet domain."
                )
            if not Path(self.masks).is_dir():
                raise NestedAttentionError(
                    f"The masks folder {self.masks} does not exist; give a folder of masks named like the photos "
                    f"(white is the subject)."
                )
            object.__setattr__(self, "masks", str(Path(self.masks).resolve()))

        if self.caption_model is not None:
            if not Path(self.caption_model).is_dir() or not any(Path(self.caption_model).glob("*.safetensors")):
                raise NestedAttentionError(
                    f"The caption model {self.caption_model} is not a folder with safetensors weights; give a local "
                    f"transformers captioning model saved with save_pretrained (pickled .bin weights are not loaded)."
                )
            object.__setattr__(self, "caption_model", str(Path(self.caption_model).resolve()))

    def as_json(self) -> dict:
        values = asdict(self)
        values["subject_words"] = list(self.subject_words)
        return values

    @classmethod
    def from_json(cls, values: dict) -> PrepareSettings:
        names = {field.name for field in fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in names})
