"""Training data: triplets of subject image(s), a prompt containing the subject word, and a target image.

Two sources give the same sample dicts:

* a folder with ``metadata.jsonl`` (:func:`read_metadata`, then :class:`TripletDataset`), for data on one disk;
* WebDataset tar shards (:func:`webdataset_pipeline`, written by :func:`write_shards`), for data streamed from
  many disks or machines.

Each sample depends on (seed, epoch, index) for the folder or (seed, epoch, key) for shards and nothing else:
condition dropout and random crops draw from a generator seeded with those, never from the global RNG, so a
resumed run sees the same data.

Bad data raises a :class:`DataError` naming where it is (``metadata.jsonl:LINE`` or ``shard.tar:KEY``). With
``skip_bad=True`` it is logged and skipped instead: a bad sample becomes ``None``, which :func:`collate` drops
and counts in ``num_skipped``.
"""

from __future__ import annotations

import json
import logging
import random
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from nested_attention.binding import prompt_ids, word_positions
from nested_attention.errors import NestedAttentionError
from nested_attention.images import decode_image

logger = logging.getLogger(__name__)

METADATA_NAME = "metadata.jsonl"
EXAMPLE_LINE = (
    '{"subject": "faces/0001.png", "target": "images/0001.jpg", "prompt": "a photo of a person at the beach", '
    '"word": "person"}'
)
SHARD_KEY = "sample{:08d}"
SUBJECT_ENTRY = re.compile(r"subject(\d+)\.[^.]+")


class DataError(NestedAttentionError):
    """Unusable training data; the message names the file and line (or shard and key) and what to do."""


@dataclass
class Record:
    """One training triplet, checked cheaply (fields, word in prompt, files exist) but not yet decoded."""

    subject_images: list[str]  # absolute paths (for WebDataset: entry names inside the sample)
    target_image: str
    prompt: str
    word: str
    source: str  # "path/metadata.jsonl:LINE" or "shard.tar:KEY", for messages


# ---------------------------------------------------------------------------------------------- metadata.jsonl


def read_metadata(
    root: str | Path, default_word: str | None = None, skip_bad: bool = False
) -> tuple[list[Record], list[str]]:
    """Read and check `root/metadata.jsonl` (or `root` itself if it is a .jsonl file).

    Returns the records and the messages of the lines skipped (only with skip_bad=True; otherwise the first bad
    line raises a DataError). Raises a DataError if no valid record remains.
    """
    path = _metadata_path(Path(root))
    folder = path.parent.resolve()
    records, problems = [], []
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            source = f"{path}:{number}"
            try:
                text = raw.decode("utf-8").lstrip("\ufeff").strip()
                if text:
                    records.append(_parse_line(text, folder, default_word, source))
            except UnicodeDecodeError as error:
                problems.append(_bad(f"{source}: the line is not UTF-8 text ({error.reason}); save the file as UTF-8.",
                                     skip_bad))
            except DataError as error:
                problems.append(_bad(str(error), skip_bad))
    if not records:
        detail = f"all {len(problems)} lines are bad; the first: {problems[0]}" if problems else "it has no records"
        raise DataError(
            f"{path} gives no training records: {detail}. Each line must be one JSON object such as {EXAMPLE_LINE}."
        )
    return records, problems


def _metadata_path(root: Path) -> Path:
    """The metadata.jsonl file for a folder or a .jsonl path."""
    path = root / METADATA_NAME if root.is_dir() else root
    if not path.is_file():
        raise DataError(
            f"No training metadata at {path}: expected a folder containing {METADATA_NAME} or the path of a .jsonl "
            f"file, one JSON object per line such as {EXAMPLE_LINE}."
        )
    return path


def _bad(message: str, skip_bad: bool) -> str:
    """Raise a bad line's message as a DataError, or (skip_bad) return it to be reported."""
    if not skip_bad:
        raise DataError(message) from None
    return message


def _parse_line(text: str, folder: Path, default_word: str | None, source: str) -> Record:
    """One metadata line -> a Record whose image paths exist; a DataError naming `source` otherwise."""
    try:
        entry = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{source}: not valid JSON ({error.msg} at column {error.colno}); each line must be one JSON object "
            f"such as {EXAMPLE_LINE}."
        ) from None
    if not isinstance(entry, dict):
        raise DataError(f"{source}: expected a JSON object such as {EXAMPLE_LINE}, got {type(entry).__name__}.")
    for name in ("subject", "target", "prompt"):
        if name not in entry:
            raise DataError(
                f'{source}: the required field "{name}" is missing; each line needs "subject", "target" and '
                f'"prompt", e.g. {EXAMPLE_LINE}.'
            )
    subjects = entry["subject"]
    if isinstance(subjects, str):
        subjects = [subjects]
    if not (isinstance(subjects, list) and subjects and all(isinstance(s, str) for s in subjects)):
        raise DataError(
            f'{source}: "subject" must be an image path or a non-empty list of image paths, got {entry["subject"]!r}.'
        )
    if not isinstance(entry["target"], str):
        raise DataError(f'{source}: "target" must be an image path (a string), got {entry["target"]!r}.')
    prompt, word = _prompt_and_word(entry, default_word, source)
    return Record(
        subject_images=[_image_path(s, folder, "subject", source) for s in subjects],
        target_image=_image_path(entry["target"], folder, "target", source),
        prompt=prompt,
        word=word,
        source=source,
    )


def _prompt_and_word(entry: dict, default_word: str | None, source: str) -> tuple[str, str]:
    """The prompt and subject word of a metadata line or shard sample, checked to agree."""
    prompt = entry.get("prompt")
    if not isinstance(prompt, str):
        raise DataError(f'{source}: "prompt" must be a string, got {prompt!r}.')
    word = entry.get("word", default_word)
    if word is None:
        raise DataError(
            f'{source}: no subject word: give "word" on the line (e.g. "word": "person") or a default word for '
            f"the whole dataset."
        )
    if not isinstance(word, str) or not word.strip():
        raise DataError(f'{source}: "word" must be a non-empty string such as "person", got {word!r}.')
    word = word.strip()
    if not re.search(rf"\b{re.escape(word)}\b", prompt, flags=re.IGNORECASE):
        raise DataError(
            f"{source}: the prompt {prompt!r} does not contain the subject word {word!r} as a whole word; add it "
            f"where the subject appears (e.g. 'a photo of a {word} at the beach') or fix the word."
        )
    return prompt, word


def _image_path(value: str, folder: Path, field: str, source: str) -> str:
    """The absolute path of an image named on a metadata line (relative to the line's folder); it must exist."""
    path = Path(value).expanduser()
    resolved = path if path.is_absolute() else folder / path
    if not resolved.is_file():
        raise DataError(
            f'{source}: "{field}" image {value} does not exist (looked in {resolved}); fix the path (relative '
            f"paths start at {folder}) or remove the line."
        )
    return str(resolved)


# ---------------------------------------------------------------------------------------------- samples


def sample_rng(seed: int, epoch: int, ident: int | str) -> random.Random:
    """The generator of one sample's random choices: the same (seed, epoch, index or key) always draws the same."""
    return random.Random(f"{seed}/{epoch}/{ident}")


class SampleBuilder:
    """Turns a Record into a training sample dict (see TripletDataset); shared by both data sources."""

    def __init__(
        self,
        tokenizers: Sequence,
        image_processor,
        resolution: int,
        crop: str = "center",
        drop_text_rate: float = 0.0,
        drop_image_rate: float = 0.0,
        drop_both_rate: float = 0.0,
        max_subject_images: int = 4,
    ):
        if crop not in ("center", "random"):
            raise NestedAttentionError(f'crop must be "center" or "random", got {crop!r}.')
        rates = (drop_text_rate, drop_image_rate, drop_both_rate)
        if any(not 0.0 <= rate <= 1.0 for rate in rates) or sum(rates) > 1.0:
            raise NestedAttentionError(
                f"The dropout rates (text {drop_text_rate}, image {drop_image_rate}, both {drop_both_rate}) must each "
                f"lie in [0, 1] and sum to at most 1 (e.g. 0.1 each)."
            )
        if not tokenizers:
            raise NestedAttentionError("SampleBuilder needs the pipeline's tokenizer(s): one for SD 1.5, two for SDXL.")
        self.tokenizers = list(tokenizers)
        self.image_processor = image_processor
        self.resolution = resolution
        self.crop = crop
        self.drop_rates = rates
        self.max_subject_images = max_subject_images

    def check(self, record: Record) -> None:
        """What can be checked without the images: their count, and the word as the tokenizers see the prompt."""
        if len(record.subject_images) > self.max_subject_images:
            raise DataError(
                f"the record has {len(record.subject_images)} subject images; at most {self.max_subject_images} "
                f"are used (max_subject_images). Remove some or raise the limit."
            )
        word_positions(self.tokenizers, record.prompt, record.word)  # the exact check, before any dropout

    def build(self, record: Record, rng: random.Random, load: Callable[[str, str], Image.Image]) -> dict:
        """The sample of `record`; `load(reference, name)` opens its images. Raises NestedAttentionError if bad."""
        self.check(record)
        dropped = self._draw_dropout(rng)
        prompt = {"text": record.word, "both": ""}.get(dropped, record.prompt)
        target_pixels, original_size, crop_top_left = self._target(load(record.target_image, "Target image"), rng)
        subjects = [load(reference, "Subject image") for reference in record.subject_images]
        return {
            "target_pixels": target_pixels,
            "subject_pixels": self.image_processor(images=subjects, return_tensors="pt").pixel_values,
            "input_ids": [torch.tensor(prompt_ids(t, prompt), dtype=torch.long) for t in self.tokenizers],
            "token_mask": self._token_mask(prompt, record.word, bind=dropped in ("none", "text")),
            "original_size": torch.tensor(original_size, dtype=torch.long),
            "crop_top_left": torch.tensor(crop_top_left, dtype=torch.long),
            "target_size": torch.tensor((self.resolution, self.resolution), dtype=torch.long),
            "dropped": dropped,
            "source": record.source,
        }

    def _draw_dropout(self, rng: random.Random) -> str:
        """One of "none", "text", "image", "both", with the configured rates."""
        draw = rng.random()
        text_rate, image_rate, both_rate = self.drop_rates
        if draw < both_rate:
            return "both"
        if draw < both_rate + image_rate:
            return "image"
        if draw < both_rate + image_rate + text_rate:
            return "text"
        return "none"

    def _token_mask(self, prompt: str, word: str, bind: bool) -> torch.Tensor:
        """(T,) bool: the word's token positions in the prompt, or all False when the image is dropped."""
        mask = torch.zeros(self.tokenizers[0].model_max_length, dtype=torch.bool)
        if bind:
            mask[word_positions(self.tokenizers, prompt, word)] = True
        return mask

    def _target(self, image: Image.Image, rng: random.Random) -> tuple[torch.Tensor, tuple, tuple]:
        """Resize the short side to the resolution and crop a square (coordinates as diffusers' SDXL script has them).

        Returns the (3, R, R) pixels in [-1, 1], the (h, w) as loaded, and the crop's (top, left) in the resized
        image. The crop is resampled straight from the original (one resize of the cropped box), so a very
        elongated image never becomes a huge intermediate.
        """
        size = self.resolution
        width, height = image.size
        if width <= height:
            resized_w, resized_h = size, int(size * height / width)
        else:
            resized_w, resized_h = int(size * width / height), size
        if self.crop == "random":
            top, left = rng.randint(0, resized_h - size), rng.randint(0, resized_w - size)
        else:
            top, left = (resized_h - size) // 2, (resized_w - size) // 2
        scale_x, scale_y = width / resized_w, height / resized_h
        box = (left * scale_x, top * scale_y, (left + size) * scale_x, (top + size) * scale_y)
        cropped = image.resize((size, size), Image.Resampling.LANCZOS, box=box)
        pixels = torch.from_numpy(np.asarray(cropped, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        return pixels.contiguous(), (height, width), (top, left)

    def build_or_skip(
        self, record: Record, rng: random.Random, load: Callable[[str, str], Image.Image], skip_bad: bool
    ) -> dict | None:
        """build(), with any problem raised as a DataError naming the record's source, or (skip_bad) logged -> None."""
        try:
            return self.build(record, rng, load)
        except NestedAttentionError as error:
            return _skip(f"{record.source}: {error}", skip_bad)


def _skip(message: str, skip_bad: bool) -> None:
    """Raise a bad sample's message as a DataError, or (skip_bad) log it; returns None, the skipped sample."""
    if not skip_bad:
        raise DataError(message) from None
    logger.warning("Skipping bad training data: %s", message)


class TripletDataset(torch.utils.data.Dataset):
    """Map-style dataset of Records (from read_metadata) -> sample dicts, or None for a skipped bad sample.

    A sample has ``target_pixels`` (3, R, R) in [-1, 1]; ``subject_pixels`` (n, 3, S, S) from the image
    processor; ``input_ids`` (one (T,) LongTensor per tokenizer, padded as diffusers pipelines do);
    ``token_mask`` (T,) bool at the subject word (all False when the image is dropped); SDXL's
    ``original_size``, ``crop_top_left`` and ``target_size`` as (2,) LongTensors; ``dropped`` in
    {"none", "text", "image", "both"}; ``source`` ("metadata.jsonl:LINE").

    Condition dropout: "text" replaces the prompt by the word alone (the image-only condition), "image" keeps the
    prompt but leaves the word unbound (vanilla attention), "both" gives an empty prompt and no binding. The
    draw and the random crop come from sample_rng(seed, epoch, index). Call set_epoch before each epoch (the
    DataLoader's workers see it when they start, so use persistent_workers=False).
    """

    def __init__(
        self,
        records: Sequence[Record],
        tokenizers: Sequence,
        image_processor,
        resolution: int,
        crop: str = "center",
        drop_text_rate: float = 0.0,
        drop_image_rate: float = 0.0,
        drop_both_rate: float = 0.0,
        seed: int = 0,
        skip_bad: bool = False,
        max_subject_images: int = 4,
    ):
        self.records = list(records)
        self.builder = SampleBuilder(
            tokenizers, image_processor, resolution, crop, drop_text_rate, drop_image_rate, drop_both_rate,
            max_subject_images,
        )
        self.seed = seed
        self.skip_bad = skip_bad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose dropout and crops __getitem__ draws."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict | None:
        record = self.records[index]
        rng = sample_rng(self.seed, self.epoch, index)
        return self.builder.build_or_skip(record, rng, _load_file, self.skip_bad)


def _load_file(path: str, role: str) -> Image.Image:
    """Open a record's image file; `role` is "Target image" or "Subject image"."""
    return decode_image(path, f"{role} {path}")


def collate(samples: list[dict | None]) -> dict | None:
    """Batch sample dicts; None (skipped) samples are dropped and counted. Returns None if none remain.

    Subject images are padded with zeros to the batch's largest count: ``subject_pixels`` (B, n_max, 3, S, S)
    and ``subject_image_mask`` (B, n_max), True for real images. ``input_ids`` is a list with one (B, T) tensor
    per tokenizer; ``num_skipped`` the number of None samples; ``sources`` and ``dropped`` lists of strings.
    """
    kept = [sample for sample in samples if sample is not None]
    if not kept:
        return None
    n_max = max(sample["subject_pixels"].shape[0] for sample in kept)
    subject_pixels, subject_mask = [], torch.zeros(len(kept), n_max, dtype=torch.bool)
    for row, sample in enumerate(kept):
        pixels = sample["subject_pixels"]
        padding = pixels.new_zeros((n_max - pixels.shape[0], *pixels.shape[1:]))
        subject_pixels.append(torch.cat([pixels, padding]))
        subject_mask[row, : pixels.shape[0]] = True
    return {
        "target_pixels": torch.stack([sample["target_pixels"] for sample in kept]),
        "subject_pixels": torch.stack(subject_pixels),
        "subject_image_mask": subject_mask,
        "input_ids": [torch.stack(ids) for ids in zip(*(sample["input_ids"] for sample in kept))],
        "token_mask": torch.stack([sample["token_mask"] for sample in kept]),
        "original_size": torch.stack([sample["original_size"] for sample in kept]),
        "crop_top_left": torch.stack([sample["crop_top_left"] for sample in kept]),
        "target_size": torch.stack([sample["target_size"] for sample in kept]),
        "dropped": [sample["dropped"] for sample in kept],
        "sources": [sample["source"] for sample in kept],
        "num_skipped": len(samples) - len(kept),
    }


# ---------------------------------------------------------------------------------------------- WebDataset


def is_webdataset(data: str | Sequence[str]) -> bool:
    """Whether a `data` setting names WebDataset shards (a list, braces, or .tar files) rather than a jsonl folder."""
    if not isinstance(data, str):
        return True
    return "{" in data or "::" in data or data.endswith((".tar", ".tar.gz", ".tgz"))


def write_shards(records: Sequence[Record], pattern: str, max_count: int = 1000) -> list[str]:
    """Write records as WebDataset shards named `pattern % shard_number`; returns the shard paths.

    Each sample holds KEY.json ({"prompt", "word", "subjects": count}), KEY.target.EXT and KEY.subject0.EXT,
    KEY.subject1.EXT, ... with the image files' bytes as they are (EXT from the file name).
    """
    if not records:
        raise DataError(f"No records to write to {pattern}; read them with read_metadata first.")
    try:
        first = pattern % 0
    except TypeError:
        raise DataError(
            f"The shard pattern {pattern!r} needs one %d-style placeholder for the shard number, "
            f"e.g. 'shards/train-%06d.tar'."
        ) from None
    Path(first).parent.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    with wds.ShardWriter(pattern, maxcount=max_count, verbose=0, post=written.append, encoder=False, mtime=0) as sink:
        for index, record in enumerate(records):
            sink.write(_shard_sample(record, SHARD_KEY.format(index)))
    return written


def convert_jsonl_to_shards(
    root: str | Path, pattern: str, max_count: int = 1000, default_word: str | None = None
) -> list[str]:
    """Check a metadata.jsonl folder (read_metadata) and write it as shards (write_shards); returns their paths."""
    records, _ = read_metadata(root, default_word=default_word)
    return write_shards(records, pattern, max_count=max_count)


def _shard_sample(record: Record, key: str) -> dict:
    """The WebDataset sample (entry name -> bytes) of a record read from metadata.jsonl."""
    meta = {"prompt": record.prompt, "word": record.word, "subjects": len(record.subject_images)}
    sample = {"__key__": key, "json": json.dumps(meta).encode("utf-8")}
    sample["target" + _extension(record.target_image)] = Path(record.target_image).read_bytes()
    for index, path in enumerate(record.subject_images):
        sample[f"subject{index}{_extension(path)}"] = Path(path).read_bytes()
    return sample


def _extension(path: str) -> str:
    """The lower-case file extension, kept in the shard as a hint (images are decoded by content)."""
    return Path(path).suffix.lower() or ".img"


def _shard_record(sample: dict, source: str, default_word: str | None) -> Record:
    """The Record of a sample read from a shard; its image references are entry names of `sample`."""
    if "json" not in sample:
        raise DataError(
            f"{source}: the sample has no .json entry; each sample needs KEY.json with the prompt and word, "
            f"KEY.target.png and KEY.subject0.png (see write_shards)."
        )
    try:
        meta = json.loads(sample["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{source}: the .json entry is not valid JSON ({error}); write the shard again.") from None
    if not isinstance(meta, dict):
        raise DataError(f'{source}: the .json entry must be an object such as {{"prompt": ..., "word": ...}}.')
    prompt, word = _prompt_and_word(meta, default_word, source)
    targets = [name for name in sample if name.startswith("target.")]
    numbered = sorted((int(match[1]), name) for name in sample if (match := SUBJECT_ENTRY.fullmatch(name)))
    subjects, numbers = [name for _, name in numbered], [number for number, _ in numbered]
    expected = meta.get("subjects", len(subjects))
    if len(targets) != 1 or not subjects or numbers != list(range(len(subjects))) or expected != len(subjects):
        entries = sorted(name for name in sample if not name.startswith("__"))
        raise DataError(
            f"{source}: expected one target.EXT entry and the subject images subject0.EXT, subject1.EXT, ... "
            f"({expected!r} by its .json), found {entries}; the shard is incomplete or was not written by "
            f"write_shards. Write it again."
        )
    return Record(subject_images=subjects, target_image=targets[0], prompt=prompt, word=word, source=source)


class _StrictTarInfo(tarfile.TarInfo):
    """Reads tar headers like TarInfo, but a missing, cut or garbled header is an error, not the archive's end.

    tarfile ends an archive silently where a header is cut off, so a shard truncated at a member boundary would
    pass for a shorter one; a complete archive ends with zero blocks instead (which still end it).
    """

    @classmethod
    def fromtarfile(cls, tarfile_):
        """tarfile's hook for reading the next header."""
        try:
            return super().fromtarfile(tarfile_)
        except (tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError, tarfile.InvalidHeaderError) as error:
            raise tarfile.ReadError(f"the archive stops without its end-of-archive blocks ({error})") from None


def _tar_files(url: str) -> Iterator[dict]:
    """The files of one shard, in order, as webdataset's dict(fname, data, __url__)."""
    with closing(wds.gopen(url)) as stream, tarfile.open(fileobj=stream, mode="r|*", tarinfo=_StrictTarInfo) as tar:
        for member in tar:
            if member.isreg():
                yield {"fname": member.name, "data": tar.extractfile(member).read(), "__url__": url}
            tar.members = []  # streaming: keep no index of the members read


class _ShardStages:
    """The stages of a ShardPipeline, holding its settings and epoch.

    One object shared by the pipeline and its copies (webdataset's fluid methods such as .batched() copy the
    pipeline), so set_epoch on any of them reaches the stages.
    """

    def __init__(self, urls: list[str], builder: SampleBuilder, seed: int, skip_bad: bool,
                 default_word: str | None, shuffle_buffer: int):
        self.urls = urls
        self.builder = builder
        self.seed = seed
        self.skip_bad = skip_bad
        self.default_word = default_word
        self.shuffle_buffer = shuffle_buffer
        self.epoch = 0

    def shard_list(self) -> Iterator[dict]:
        """The shards as dict(url=...), in an order shuffled per (seed, epoch) when shuffling."""
        urls = list(self.urls)
        if self.shuffle_buffer > 0:
            sample_rng(self.seed, self.epoch, "shards").shuffle(urls)
        return iter([{"url": url} for url in urls])

    def read(self, shards: Iterable[dict]) -> Iterator[dict | None]:
        """Raw samples (entry name -> bytes) of each shard; a shard that fails to read raises, or (skip_bad) -> None."""
        for shard in shards:
            url, last_key = shard["url"], None
            try:
                for sample in wds.tariterators.group_by_keys(_tar_files(url)):
                    last_key = sample["__key__"]
                    yield sample
            except Exception as error:  # any failure to read the archive: tarfile, gzip, I/O, duplicate names
                where = f"somewhere after sample {last_key!r}" if last_key else "before its first sample"
                message = (
                    f"{url}: reading the shard failed {where} ({error.__class__.__name__}: {error}); the file is "
                    f"missing, truncated or corrupt. Copy or write it again (write_shards), or set skip_bad to skip "
                    f"the rest of it."
                )
                yield _skip(message, self.skip_bad)

    def shuffle(self, samples: Iterable[dict | None]) -> Iterator[dict | None]:
        """Shuffle raw samples in a buffer of shuffle_buffer, seeded per (seed, epoch); no-op for 0."""
        if self.shuffle_buffer <= 0:
            return iter(samples)
        rng = sample_rng(self.seed, self.epoch, "samples")
        return wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)

    def decode(self, samples: Iterable[dict | None]) -> Iterator[dict | None]:
        """Raw samples -> training sample dicts (None passes through, and replaces bad samples with skip_bad)."""
        for sample in samples:
            yield None if sample is None else self._decode_one(sample)

    def _decode_one(self, sample: dict) -> dict | None:
        """One raw sample -> a training sample dict, drawn from sample_rng(seed, epoch, key)."""
        source = f"{sample['__url__']}:{sample['__key__']}"
        try:
            record = _shard_record(sample, source, self.default_word)
        except DataError as error:
            return _skip(str(error), self.skip_bad)
        rng = sample_rng(self.seed, self.epoch, sample["__key__"])

        def load(name: str, role: str) -> Image.Image:
            return decode_image(sample[name], f"{role} {name}")

        return self.builder.build_or_skip(record, rng, load, self.skip_bad)


class ShardPipeline(wds.DataPipeline, wds.FluidInterface):
    """An iterable of training sample dicts read from WebDataset shards (see webdataset_pipeline)."""

    def __init__(self, stages: _ShardStages, split_by_node: bool):
        super().__init__(
            stages.shard_list,
            wds.split_by_node if split_by_node else None,
            wds.split_by_worker,
            stages.read,
            stages.shuffle,
            stages.decode,
        )
        self.stages = stages

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: the shard and sample order and each sample's dropout and crop depend on it."""
        self.stages.epoch = epoch


def webdataset_pipeline(
    urls: str | list[str],
    tokenizers: Sequence,
    image_processor,
    resolution: int,
    crop: str = "center",
    drop_text_rate: float = 0.0,
    drop_image_rate: float = 0.0,
    drop_both_rate: float = 0.0,
    seed: int = 0,
    skip_bad: bool = False,
    max_subject_images: int = 4,
    default_word: str | None = None,
    shuffle_buffer: int = 0,
    split_by_node: bool = False,
) -> ShardPipeline:
    """The samples of WebDataset shards (as written by write_shards), the same dicts as TripletDataset's.

    `urls`: a list, or a string with webdataset's brace notation ("data/train-{000000..000099}.tar"). Shards are
    split among DataLoader workers; with split_by_node=True also among distributed ranks (only when every rank
    reads its own data, not when one process dispatches batches). shuffle_buffer > 0 shuffles the shard order
    and the samples in a buffer of that size, per (seed, epoch); a sample's dropout and crop come from
    sample_rng(seed, epoch, key).

    Bad samples and shards that break off (truncated or corrupt tar files) raise a DataError naming
    "shard:key" or the shard. With skip_bad=True they are logged and yielded as None instead, which collate
    counts in num_skipped: one None per bad sample, and one per shard that breaks off (its remaining samples
    are lost uncounted).
    """
    url_list = wds.shardlists.expand_urls(urls) if isinstance(urls, str) else list(urls)
    if not url_list:
        raise DataError(f"No WebDataset shards in {urls!r}; give shard paths or a pattern like data/{{000..099}}.tar.")
    builder = SampleBuilder(
        tokenizers, image_processor, resolution, crop, drop_text_rate, drop_image_rate, drop_both_rate,
        max_subject_images,
    )
    stages = _ShardStages(url_list, builder, seed, skip_bad, default_word, shuffle_buffer)
    return ShardPipeline(stages, split_by_node)
