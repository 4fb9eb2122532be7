"""The training data layer: metadata.jsonl records, samples, condition dropout, collation, WebDataset shards."""

import json
import logging
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import subject_image
from nested_attention.errors import NestedAttentionError
from nested_attention.tiny import tiny_image_encoder, write_clip_tokenizer
from nested_attention_train.data import (
    DataError,
    TripletDataset,
    collate,
    convert_jsonl_to_shards,
    read_metadata,
    webdataset_pipeline,
    write_shards,
)

R = 32  # target resolution; the tiny CLIP processor's input is 32x32 too


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return write_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def tokenizer_2(tmp_path_factory):
    return write_clip_tokenizer(tmp_path_factory.mktemp("tokenizer_2"))


@pytest.fixture(scope="module")
def processor():
    return tiny_image_encoder()[1]


def save_image(path, size=(40, 40), seed=0):
    """A seeded colour-block image of `size` (w, h) saved at `path`; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    subject_image(seed).resize(size, Image.NEAREST).save(path)
    return path


def write_metadata(folder, lines):
    """metadata.jsonl with one line per entry (dicts as JSON, strings verbatim); returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    path = folder / "metadata.jsonl"
    path.write_text(text + "\n")
    return path


def line(subject="faces/a.png", target="photos/a.png", prompt="a photo of a person at the beach", **extra):
    return {"subject": subject, "target": target, "prompt": prompt, **extra}


@pytest.fixture
def folder(tmp_path):
    """Images for the tests' metadata lines: faces/a.png, faces/b.png, faces/c.png, photos/a.png (100x60)."""
    root = tmp_path / "data"
    for index, name in enumerate(("a", "b", "c")):
        save_image(root / "faces" / f"{name}.png", seed=index)
    save_image(root / "photos" / "a.png", size=(100, 60), seed=7)
    return root


def dataset(records, tokenizers, processor, **options):
    return TripletDataset(records, tokenizers, processor, resolution=R, **options)


def ids(tokenizer, text):
    return torch.tensor(tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids)


# ------------------------------------------------------------------------------------------- records


def test_read_metadata_resolves_paths_and_subject_lists(folder):
    absolute = str(folder / "faces" / "c.png")
    path = write_metadata(folder, [
        line(word="person"),
        "",
        line(subject=["faces/b.png", absolute], prompt="A Person, smiling"),
    ])
    records, problems = read_metadata(folder, default_word="person")
    assert problems == []
    assert [r.source for r in records] == [f"{path}:1", f"{path}:3"]
    assert records[0].subject_images == [str(folder.resolve() / "faces" / "a.png")]
    assert records[0].target_image == str(folder.resolve() / "photos" / "a.png")
    assert records[1].subject_images == [str(folder.resolve() / "faces" / "b.png"), absolute]
    assert (records[1].prompt, records[1].word) == ("A Person, smiling", "person")
    assert read_metadata(path, default_word="person")[0] == records  # the .jsonl file itself


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"subject": "faces/a.png", "target": ', "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ({"subject": "faces/a.png", "prompt": "a person"}, '"target" is missing'),
        ({"subject": [], "target": "photos/a.png", "prompt": "a person"}, "non-empty list"),
        (line(prompt="a photo of a personal item"), "does not contain the subject word 'person'"),
        (line(target="photos/x.jpg"), r'"target" image photos/x.jpg does not exist \(looked in .*photos/x.jpg\)'),
        (line(subject=["faces/a.png", "faces/zz.png"]), '"subject" image faces/zz.png does not exist'),
        ({"subject": "faces/a.png", "target": "photos/a.png", "prompt": "a dog", "word": 3}, '"word" must be'),
    ],
)
def test_bad_lines_name_file_and_line(folder, bad, message):
    write_metadata(folder, [line(), bad])
    with pytest.raises(DataError, match=rf"metadata\.jsonl:2: .*{message}"):
        read_metadata(folder, default_word="person")


def test_missing_word_without_default(folder):
    write_metadata(folder, [line()])
    with pytest.raises(DataError, match=r"metadata\.jsonl:1: no subject word"):
        read_metadata(folder)


@pytest.mark.parametrize("lines", [[], ["", "  "]])
def test_empty_dataset(folder, lines):
    write_metadata(folder, lines)
    with pytest.raises(DataError, match="no training records"):
        read_metadata(folder, default_word="person")


def test_missing_metadata_file(tmp_path):
    with pytest.raises(DataError, match="No training metadata"):
        read_metadata(tmp_path)


def test_skip_bad_lines_are_returned(folder):
    write_metadata(folder, [line(), "{oops", line(target="photos/x.jpg"), line(subject="faces/b.png")])
    records, problems = read_metadata(folder, default_word="person", skip_bad=True)
    assert [r.source.rsplit(":", 1)[1] for r in records] == ["1", "4"]
    assert len(problems) == 2 and "metadata.jsonl:2" in problems[0] and "metadata.jsonl:3" in problems[1]


def test_all_lines_bad_with_skip_bad(folder):
    write_metadata(folder, ["{oops", line(target="photos/x.jpg")])
    with pytest.raises(DataError, match=r"all 2 lines are bad; the first: .*metadata\.jsonl:1"):
        read_metadata(folder, default_word="person", skip_bad=True)


# ------------------------------------------------------------------------------------------- samples


def test_sample_shapes_ranges_and_word_positions(folder, tokenizer, processor):
    write_metadata(folder, [line(prompt="a person with a dog and a person", subject=["faces/a.png", "faces/b.png"])])
    records, _ = read_metadata(folder, default_word="person")
    sample = dataset(records, [tokenizer], processor)[0]
    assert sample["target_pixels"].shape == (3, R, R) and sample["target_pixels"].dtype == torch.float32
    assert -1.0 <= sample["target_pixels"].min() < sample["target_pixels"].max() <= 1.0
    assert sample["subject_pixels"].shape == (2, 3, 32, 32) and sample["subject_pixels"].dtype == torch.float32
    (input_ids,) = sample["input_ids"]
    assert input_ids.dtype == torch.long and torch.equal(input_ids, ids(tokenizer, records[0].prompt))
    person = tokenizer.convert_tokens_to_ids("person</w>")
    assert sample["token_mask"].dtype == torch.bool
    assert torch.equal(sample["token_mask"], input_ids == person) and int(sample["token_mask"].sum()) == 2
    assert sample["target_size"].tolist() == [R, R] and sample["original_size"].dtype == torch.long
    assert sample["dropped"] == "none" and sample["source"] == records[0].source


def test_two_tokenizers_give_input_ids_for_both(folder, tokenizer, tokenizer_2, processor):
    write_metadata(folder, [line(word="person")])
    records, _ = read_metadata(folder)
    sample = dataset(records, [tokenizer, tokenizer_2], processor)[0]
    assert [tuple(t.shape) for t in sample["input_ids"]] == [(77,), (77,)]
    assert torch.equal(sample["input_ids"][1], ids(tokenizer_2, records[0].prompt))
    assert sample["token_mask"].nonzero().flatten().tolist() == [5]  # <bos> a photo of a person


def test_resize_and_center_crop(folder, tokenizer, processor):
    write_metadata(folder, [line(word="person")])
    records, _ = read_metadata(folder)
    sample = dataset(records, [tokenizer], processor)[0]
    resized_w = 100 * R // 60  # short side 60 -> 32: 53 wide
    assert sample["original_size"].tolist() == [60, 100]
    assert sample["crop_top_left"].tolist() == [0, (resized_w - R) // 2]
    reference = Image.open(folder / "photos" / "a.png").resize((resized_w, R), Image.LANCZOS)
    left = (resized_w - R) // 2
    expected = np.asarray(reference.crop((left, 0, left + R, R)), dtype=np.float32) / 127.5 - 1
    difference = np.abs(sample["target_pixels"].permute(1, 2, 0).numpy() - expected).mean()
    assert difference < 0.05  # resampled from the crop box, not pixel-identical to resize-then-crop


def test_tall_image_crops_vertically(folder, tokenizer, processor):
    save_image(folder / "photos" / "tall.png", size=(60, 100))
    write_metadata(folder, [line(target="photos/tall.png", word="person")])
    sample = dataset(read_metadata(folder)[0], [tokenizer], processor)[0]
    assert sample["original_size"].tolist() == [100, 60] and sample["crop_top_left"].tolist() == [10, 0]


def test_random_crop_is_deterministic_per_seed_epoch_index(folder, tokenizer, processor):
    write_metadata(folder, [line(word="person")] * 6)
    records, _ = read_metadata(folder)
    data = dataset(records, [tokenizer], processor, crop="random", seed=3)
    epoch0 = [data[i]["crop_top_left"].tolist() for i in range(6)]
    again = dataset(records, [tokenizer], processor, crop="random", seed=3)
    assert [again[i]["crop_top_left"].tolist() for i in range(6)] == epoch0
    assert torch.equal(again[2]["target_pixels"], data[2]["target_pixels"])
    assert all(top == 0 and 0 <= left <= 100 * R // 60 - R for top, left in epoch0)
    data.set_epoch(1)
    assert [data[i]["crop_top_left"].tolist() for i in range(6)] != epoch0
    data.set_epoch(0)
    assert [data[i]["crop_top_left"].tolist() for i in range(6)] == epoch0


def test_dropout_effects(folder, tokenizer, processor):
    write_metadata(folder, [line(word="person")])
    records, _ = read_metadata(folder)
    prompt_ids = ids(tokenizer, records[0].prompt)

    text = dataset(records, [tokenizer], processor, drop_text_rate=1.0)[0]
    assert text["dropped"] == "text" and torch.equal(text["input_ids"][0], ids(tokenizer, "person"))
    assert text["token_mask"].nonzero().flatten().tolist() == [1]

    image = dataset(records, [tokenizer], processor, drop_image_rate=1.0)[0]
    assert image["dropped"] == "image" and torch.equal(image["input_ids"][0], prompt_ids)
    assert not image["token_mask"].any()

    both = dataset(records, [tokenizer], processor, drop_both_rate=1.0)[0]
    assert both["dropped"] == "both" and torch.equal(both["input_ids"][0], ids(tokenizer, ""))
    assert not both["token_mask"].any()

    none = dataset(records, [tokenizer], processor)[0]
    assert none["dropped"] == "none" and torch.equal(none["input_ids"][0], prompt_ids)


def test_dropout_is_deterministic_and_mixed(folder, tokenizer, processor):
    write_metadata(folder, [line(word="person")] * 40)
    records, _ = read_metadata(folder)
    rates = dict(drop_text_rate=0.25, drop_image_rate=0.25, drop_both_rate=0.25, seed=1)
    first = [s["dropped"] for s in dataset(records, [tokenizer], processor, **rates)]
    assert [s["dropped"] for s in dataset(records, [tokenizer], processor, **rates)] == first
    assert set(first) == {"none", "text", "image", "both"}
    with pytest.raises(NestedAttentionError, match="sum to at most 1"):
        dataset(records, [tokenizer], processor, drop_text_rate=0.6, drop_image_rate=0.6)


def test_dropout_ignores_the_global_rng(folder, tokenizer, processor):
    write_metadata(folder, [line(word="person")] * 8)
    records, _ = read_metadata(folder)
    data = dataset(records, [tokenizer], processor, crop="random", drop_text_rate=0.5)
    torch.manual_seed(0)
    first = [(s["dropped"], s["crop_top_left"].tolist()) for s in data]
    torch.manual_seed(1)
    np.random.seed(1)
    assert [(s["dropped"], s["crop_top_left"].tolist()) for s in data] == first


def test_collate_pads_subject_images_and_counts_skipped(folder, tokenizer, processor):
    write_metadata(folder, [line(word="person"), line(subject=["faces/a.png", "faces/b.png", "faces/c.png"],
                                                      word="person")])
    data = dataset(read_metadata(folder)[0], [tokenizer], processor)
    batch = collate([data[0], None, data[1]])
    assert batch["num_skipped"] == 1
    assert batch["subject_pixels"].shape == (2, 3, 3, 32, 32)
    assert batch["subject_image_mask"].tolist() == [[True, False, False], [True, True, True]]
    assert torch.equal(batch["subject_pixels"][0, 0], data[0]["subject_pixels"][0])
    assert not batch["subject_pixels"][0, 1:].any()
    assert torch.equal(batch["subject_pixels"][1], data[1]["subject_pixels"])
    assert batch["target_pixels"].shape == (2, 3, R, R)
    assert [tuple(t.shape) for t in batch["input_ids"]] == [(2, 77)]
    assert batch["token_mask"].shape == (2, 77) and batch["token_mask"].dtype == torch.bool
    for key in ("original_size", "crop_top_left", "target_size"):
        assert batch[key].shape == (2, 2) and batch[key].dtype == torch.long
    assert batch["sources"] == [data[0]["source"], data[1]["source"]] and batch["dropped"] == ["none", "none"]
    assert collate([None, None]) is None


def test_bad_samples_name_the_line(folder, tokenizer, processor):
    (folder / "photos" / "corrupt.png").write_bytes(np.random.RandomState(0).bytes(500))
    save_image(folder / "photos" / "tiny.png", size=(10, 10))
    write_metadata(folder, [
        line(target="photos/corrupt.png"),
        line(prompt="a photo of a dachshund", word="dachshund"),
        line(subject=["faces/a.png", "faces/b.png", "faces/c.png"]),
        line(target="photos/tiny.png"),
    ])
    data = dataset(read_metadata(folder, default_word="person")[0], [tokenizer], processor, max_subject_images=2)
    expected = [
        r"metadata\.jsonl:1: Target image .*corrupt\.png could not be read as an image",
        r"metadata\.jsonl:2: The subject word 'dachshund' .* is split by the tokenizer",
        r"metadata\.jsonl:3: the record has 3 subject images; at most 2",
        r"metadata\.jsonl:4: Target image .*tiny\.png is 10x10 pixels",
    ]
    for index, message in enumerate(expected):
        with pytest.raises(DataError, match=message):
            data[index]


def test_skip_bad_sample_returns_none_and_collate_counts_it(folder, tokenizer, processor, caplog):
    (folder / "photos" / "corrupt.png").write_bytes(np.random.RandomState(0).bytes(500))
    write_metadata(folder, [line(target="photos/corrupt.png"), line()])
    data = dataset(read_metadata(folder, default_word="person")[0], [tokenizer], processor, skip_bad=True)
    with caplog.at_level(logging.WARNING):
        samples = [data[0], data[1]]
    assert samples[0] is None and "metadata.jsonl:1" in caplog.text
    assert collate(samples)["num_skipped"] == 1


# ------------------------------------------------------------------------------------------- WebDataset


@pytest.fixture
def shards(folder, tmp_path):
    """Four records (1, 2, 1, 3 subject images) written as two shards of two samples."""
    write_metadata(folder, [
        line(), line(subject=["faces/b.png", "faces/c.png"], prompt="a person in the snow"),
        line(subject="faces/c.png"), line(subject=["faces/a.png", "faces/b.png", "faces/c.png"]),
    ])
    records, _ = read_metadata(folder, default_word="person")
    paths = write_shards(records, str(tmp_path / "shards" / "train-%04d.tar"), max_count=2)
    return records, paths


def stream(urls, tokenizer, processor, **options):
    return webdataset_pipeline(urls, [tokenizer], processor, resolution=R, **options)


def test_shards_give_the_same_samples_as_the_folder(shards, tokenizer, processor):
    records, paths = shards
    assert [p.rsplit("/", 1)[1] for p in paths] == ["train-0000.tar", "train-0001.tar"]
    expected = dataset(records, [tokenizer], processor)
    samples = list(stream(paths, tokenizer, processor))
    assert [s["source"] for s in samples] == [f"{paths[i // 2]}:sample{i:08d}" for i in range(4)]
    for index, sample in enumerate(samples):
        reference = expected[index]
        for key in ("target_pixels", "subject_pixels", "token_mask", "original_size", "crop_top_left",
                    "target_size"):
            assert torch.equal(sample[key], reference[key]), key
        assert all(torch.equal(a, b) for a, b in zip(sample["input_ids"], reference["input_ids"]))
        assert sample["dropped"] == "none"
    braces = paths[0].replace("0000.tar", "{0000..0001}.tar")
    assert [s["source"] for s in stream(braces, tokenizer, processor)] == [s["source"] for s in samples]
    assert collate(samples)["subject_pixels"].shape == (4, 3, 3, 32, 32)


def test_convert_jsonl_to_shards(folder, tmp_path):
    write_metadata(folder, [line(), line(), line(), line()])
    paths = convert_jsonl_to_shards(folder, str(tmp_path / "converted" / "part-%02d.tar"), max_count=3,
                                    default_word="person")
    with tarfile.open(paths[0]) as tar:
        names = tar.getnames()
    assert len(paths) == 2 and names[:3] == ["sample00000000.json", "sample00000000.subject0.png",
                                             "sample00000000.target.png"]


def test_shard_pipeline_epochs_shuffle_and_pickle(shards, tokenizer, processor):
    _, paths = shards
    pipeline = stream(paths, tokenizer, processor, crop="random", drop_text_rate=0.5, shuffle_buffer=4, seed=5)
    first = [(s["source"], s["dropped"], s["crop_top_left"].tolist()) for s in pipeline]
    assert [(s["source"], s["dropped"], s["crop_top_left"].tolist()) for s in pipeline] == first
    copy = pickle.loads(pickle.dumps(pipeline))  # as DataLoader workers receive it
    assert [(s["source"], s["dropped"], s["crop_top_left"].tolist()) for s in copy] == first
    batched = pipeline.batched(2, collation_fn=collate)
    pipeline.set_epoch(1)
    epoch1 = [(s["source"], s["dropped"], s["crop_top_left"].tolist()) for s in pipeline]
    assert epoch1 != first and sorted(s for s, _, _ in epoch1) == sorted(s for s, _, _ in first)
    assert [source for batch in batched for source in batch["sources"]] == [s for s, _, _ in epoch1]


def cut(path, size):
    with open(path, "r+b") as file:
        file.truncate(size)


def member_offset(path, index):
    with tarfile.open(path) as tar:
        return tar.getmembers()[index].offset


@pytest.mark.parametrize("where", ["half", "member boundary"])
def test_truncated_shard_names_the_shard(shards, tokenizer, processor, where):
    _, paths = shards
    cut(paths[0], member_offset(paths[0], 3) if where == "member boundary" else os.path.getsize(paths[0]) // 2)
    with pytest.raises(DataError, match=r"train-0000\.tar: reading the shard failed .* truncated or corrupt"):
        list(stream(paths, tokenizer, processor))


def test_truncated_shard_with_skip_bad(shards, tokenizer, processor, caplog):
    _, paths = shards
    cut(paths[0], os.path.getsize(paths[0]) // 2)
    with caplog.at_level(logging.WARNING):
        samples = list(stream(paths, tokenizer, processor, skip_bad=True))
    assert "train-0000.tar" in caplog.text
    batch = collate(samples)
    assert batch["num_skipped"] >= 1
    assert [s for s in batch["sources"] if "train-0001.tar" in s] == [f"{paths[1]}:sample0000000{i}" for i in (2, 3)]


def test_bad_sample_in_shard(folder, tmp_path, tokenizer, processor):
    (folder / "photos" / "corrupt.png").write_bytes(np.random.RandomState(0).bytes(500))
    write_metadata(folder, [line(), line(target="photos/corrupt.png")])
    paths = write_shards(read_metadata(folder, default_word="person")[0], str(tmp_path / "s-%02d.tar"))
    with pytest.raises(DataError, match=r"s-00\.tar:sample00000001: Target image target\.png could not be read"):
        list(stream(paths, tokenizer, processor))
    samples = list(stream(paths, tokenizer, processor, skip_bad=True))
    assert samples[1] is None and collate(samples)["num_skipped"] == 1


def test_shard_sample_without_json(tmp_path, tokenizer, processor):
    path = tmp_path / "raw.tar"
    image = tmp_path / "x.png"
    save_image(image)
    with tarfile.open(path, "w") as tar:
        tar.add(image, arcname="k1.target.png")
        tar.add(image, arcname="k1.subject0.png")
    with pytest.raises(DataError, match=r"raw\.tar:k1: the sample has no \.json entry"):
        list(stream([str(path)], tokenizer, processor, default_word="person"))



# ------------------------------------------------------------------------------------------- subject masks


def test_target_mask_is_cropped_and_resized_like_its_target(folder, tokenizer, processor):
    """A mask drawn as the target's own colour blocks lands on the same pixels after any crop (up to the block
    edges, where the target's Lanczos and the mask's bilinear resampling differ); records without one have none,
    and collate gives them an empty mask beside the others."""
    target = Image.open(folder / "photos" / "a.png")
    blocks = (np.asarray(target)[..., 0] > 127).astype(np.uint8) * 255
    Image.fromarray(blocks, mode="L").save(folder / "photos" / "a-mask.png")
    write_metadata(folder, [line(word="person", target_mask="photos/a-mask.png"), line(word="person")] * 3)
    records, _ = read_metadata(folder)
    assert records[0].target_mask == str(folder / "photos" / "a-mask.png") and records[1].target_mask is None
    data = dataset(records, [tokenizer], processor, crop="random", seed=1)
    for index in (0, 2, 4):
        sample = data[index]
        mask = sample["target_mask"]
        assert mask.shape == (1, R, R) and 0 <= float(mask.min()) and float(mask.max()) <= 1
        red = sample["target_pixels"][0] > 0
        assert float(((mask[0] > 0.5) != red).float().mean()) < 0.1
    assert "target_mask" not in data[1]
    batch = collate([data[0], data[1]])
    assert torch.equal(batch["target_mask"][0], data[0]["target_mask"]) and not bool(batch["target_mask"][1].any())
    assert "target_mask" not in collate([data[1], data[3]])


def test_a_mask_of_another_size_is_refused_in_one_sentence(folder, tokenizer, processor):
    Image.new("L", (50, 30), 255).save(folder / "photos" / "small-mask.png")
    write_metadata(folder, [line(word="person", target_mask="photos/small-mask.png")])
    with pytest.raises(DataError, match="the target mask is 50x30 but its target image is 100x60"):
        dataset(read_metadata(folder)[0], [tokenizer], processor)[0]
    write_metadata(folder, [line(word="person", target_mask=3)])
    with pytest.raises(DataError, match='"target_mask" must be an image path'):
        read_metadata(folder)


def test_shards_carry_the_target_mask(folder, tmp_path, tokenizer, processor):
    Image.new("L", (100, 60), 200).save(folder / "photos" / "a-mask.png")
    write_metadata(folder, [line(target_mask="photos/a-mask.png"), line()])
    records, _ = read_metadata(folder, default_word="person")
    paths = write_shards(records, str(tmp_path / "masked" / "part-%02d.tar"), max_count=2)
    samples = list(stream(paths, tokenizer, processor))
    expected = dataset(records, [tokenizer], processor)
    assert torch.equal(samples[0]["target_mask"], expected[0]["target_mask"]) and "target_mask" not in samples[1]
