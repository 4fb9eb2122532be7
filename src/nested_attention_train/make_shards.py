"""`python -m nested_attention_train.make_shards FOLDER PATTERN`: a metadata.jsonl folder as WebDataset shards."""

from __future__ import annotations

import argparse
import sys

from nested_attention.errors import NestedAttentionError

from .data import convert_jsonl_to_shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nested_attention_train.make_shards",
        description="Write the triplets of a metadata.jsonl folder as WebDataset tar shards (checked on the way).",
    )
    parser.add_argument("folder", help="folder with metadata.jsonl (or the .jsonl file)")
    parser.add_argument("pattern", help="output shard names with a %%d field, e.g. shards/train-%%05d.tar")
    parser.add_argument("--per-shard", type=int, default=1000, help="samples per shard (default: 1000)")
    parser.add_argument("--word", help="subject word for records that name none")
    args = parser.parse_args(argv)
    if "%" not in args.pattern:
        parser.error("the pattern needs a %d field for the shard number, e.g. shards/train-%05d.tar")
    try:
        shards = convert_jsonl_to_shards(args.folder, args.pattern, args.per_shard, default_word=args.word)
    except NestedAttentionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {len(shards)} shards: {shards[0]} ... {shards[-1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
