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

from .records import EXAMPLE_LINE, METADATA_NAME, DataError, Record, read_metadata
from .samples import SampleBuilder, TripletDataset, collate, sample_rng
from .shards import convert_jsonl_to_shards, is_webdataset, webdataset_pipeline, write_shards

__all__ = [
    "EXAMPLE_LINE", "METADATA_NAME", "DataError", "Record", "SampleBuilder", "TripletDataset", "collate",
    "convert_jsonl_to_shards", "is_webdataset", "read_metadata", "sample_rng", "webdataset_pipeline", "write_shards",
]
