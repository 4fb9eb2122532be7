"""WebDataset tar shards: :func:`write_shards` writes records as shards, :func:`webdataset_pipeline` streams them
back as the same sample dicts as the folder source."""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import closing
from pathlib import Path

import webdataset as wds
from PIL import Image

from nested_attention.images import decode_image

from .records import DataError, Record, prompt_and_word, read_metadata
from .samples import SampleBuilder, sample_rng, skip_sample

SHARD_KEY = "sample{:08d}"
SUBJECT_ENTRY = re.compile(r"subject(\d+)\.[^.]+")


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
    if record.target_mask is not None:
        sample["target_mask" + _extension(record.target_mask)] = Path(record.target_mask).read_bytes()
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
    prompt, word = prompt_and_word(meta, default_word, source)
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
    masks = [name for name in sample if name.startswith("target_mask.")]
    return Record(subject_images=subjects, target_image=targets[0], prompt=prompt, word=word, source=source,
                  target_mask=masks[0] if masks else None)


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
                yield skip_sample(message, self.skip_bad)

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
            return skip_sample(str(error), self.skip_bad)
        rng = sample_rng(self.seed, self.epoch, sample["__key__"])

        def load(name: str, role: str) -> Image.Image:
            return decode_image(sample[name], f"{role} {name}")

        return self.builder.build_orskip_sample(record, rng, load, self.skip_bad)


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
