"""The bad-input corpus: every mistake a user can make through the CLI, the Python API or training data ends in one
sentence (exit code 2 on the command line), never a traceback, never a silent wrong result, and writes nothing."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import make_adapter, subject_image
from nested_attention import NestedAdapter, NestedAttention, NestedAttentionError, Subject
from test_cli import assets, png_header_only, run_cli  # noqa: F401 (assets: the saved tiny model and adapters)
from test_train import TINY, make_triplets

LONG = "a photo " * 40  # 80 tokens: a word after it is past the tiny tokenizer's 77-token limit


@pytest.fixture(scope="module")
def bad(assets, tmp_path_factory):  # noqa: F811
    """Damaged adapters, odd images and bad training data, next to the good assets of test_cli."""
    root = tmp_path_factory.mktemp("bad")

    def adapter_copy(name: str) -> Path:
        folder = root / name
        NestedAdapter.from_pretrained(assets.person).save_pretrained(folder, save_image_encoder=True)
        return folder

    infinite_alpha = adapter_copy("alpha-infinity")
    config = json.loads((infinite_alpha / "nested_adapter_config.json").read_text())
    (infinite_alpha / "nested_adapter_config.json").write_text(json.dumps({**config, "alpha": math.inf}))
    nan_weights = adapter_copy("nan-weights")
    weights = load_file(str(nan_weights / "nested_adapter.safetensors"))
    first = sorted(weights)[0]
    weights[first] = torch.full_like(weights[first], math.nan)
    save_file(weights, str(nan_weights / "nested_adapter.safetensors"))
    pickled = adapter_copy("pickled-encoder")
    encoder = pickled / "image_encoder"
    torch.save(load_file(str(encoder / "model.safetensors")), encoder / "pytorch_model.bin")  # written, never loaded
    (encoder / "model.safetensors").unlink()

    Image.fromarray(np.linspace(0, 1000, 40 * 40, dtype=np.float32).reshape(40, 40), "F").save(root / "hdr.tif")
    (root / "a-file").write_text("")
    truncated = root / "truncated.png"
    subject_image(0, size=64).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:-60])

    (root / "subjects").mkdir()
    subject_image(0).save(root / "subjects" / "a.png")
    (root / "prompts.txt").write_text("a photo of a person\n")
    data = {}
    for name, change in {
        "tiny-image": lambda folder: subject_image(1, size=4).save(folder / "s1.png"),
        "truncated-image": lambda folder: (folder / "s1.png").write_bytes(truncated.read_bytes()),
        "split-word": lambda folder: _rewrite(folder, 1, prompt="a photo of a dachshund", word="dachshund"),
        "word-past-limit": lambda folder: _rewrite(folder, 1, prompt=LONG + "person"),
    }.items():
        folder = make_triplets(root / f"data-{name}", count=3)
        change(folder)
        data[name] = folder
    return SimpleNamespace(root=root, infinite_alpha=infinite_alpha, nan_weights=nan_weights, pickled=pickled,
                           hdr=root / "hdr.tif", file=root / "a-file", subjects=root / "subjects",
                           prompts=root / "prompts.txt", truncated=truncated, data=data,
                           good_data=make_triplets(root / "data-good", count=3))


def _rewrite(folder: Path, line: int, **fields) -> None:
    """Change fields of one metadata line (0-based)."""
    lines = (folder / "metadata.jsonl").read_text().splitlines()
    lines[line] = json.dumps({**json.loads(lines[line]), **fields})
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


# ---- the command line: (arguments with {placeholders}, expected exit code, a fragment of the one error line) ----

GENERATE = ["generate", "--model", "{model}", "--steps", "1", "--out", "{out}"]
PERSON = ["--adapter", "{person}", "--image", "{image}"]
TRAIN = ["train", "--config", TINY, "max_steps=1", "output_dir={out_dir}"]
EVALUATE = ["evaluate", "--model", "tiny-sd", "--baseline", "--subjects", "{subjects}", "--prompts", "{prompts}"]

CLI_CASES = {
    # generate: numbers
    "guidance inf": ([*GENERATE, *PERSON, "--prompt", "a person", "--guidance", "inf"], "--guidance"),
    "guidance nan": ([*GENERATE, *PERSON, "--prompt", "a person", "--guidance", "nan"], "--guidance"),
    "guidance negative": ([*GENERATE, *PERSON, "--prompt", "a person", "--guidance", "-5"], "at least 0"),
    "steps huge": ([*GENERATE, *PERSON, "--prompt", "a person", "--steps", "100000000"], "from 1 to 1000"),
    "steps zero": ([*GENERATE, *PERSON, "--prompt", "a person", "--steps", "0"], "from 1 to 1000"),
    "seed past 64 bits": ([*GENERATE, *PERSON, "--prompt", "a person", "--seed", str(2**64)], "2**64 - 1"),
    "seed negative": ([*GENERATE, *PERSON, "--prompt", "a person", "--seed", "-1"], "2**64 - 1"),
    "num images zero": ([*GENERATE, *PERSON, "--prompt", "a person", "--num-images", "0"], "positive integer"),
    "lambda nan": ([*GENERATE, *PERSON, "--lam", "nan", "--prompt", "a person"], "lambda"),
    "image weight negative": ([*GENERATE, *PERSON, "--image-weight", "-1", "--prompt", "a person"], "non-negative"),
    # generate: words and prompts
    "empty word": ([*GENERATE, *PERSON, "--word", "", "--prompt", "a person"], "empty string"),
    "word missing from prompt": ([*GENERATE, *PERSON, "--prompt", "a photo of a dog"],
                                 "does not contain the subject word 'person'"),
    "multi-token word": ([*GENERATE, *PERSON, "--word", "dachshund", "--prompt", "a dachshund"],
                         "split by the tokenizer"),
    "word past the token limit": ([*GENERATE, *PERSON, "--prompt", LONG + "person"], "77-token limit"),
    "same word twice": ([*GENERATE, *PERSON, *PERSON, "--prompt", "a person"], "both bound to the word 'person'"),
    # generate: outputs
    "out under /proc": ([*GENERATE[:-1], "/proc/nested-attention-test.png", *PERSON, "--prompt", "a person"],
                        "cannot be written"),
    "out under a file": ([*GENERATE[:-1], "{file}/x.png", *PERSON, "--prompt", "a person"], "is a file, not a folder"),
    "out without extension": ([*GENERATE[:-1], "{out_dir}/x", *PERSON, "--prompt", "a person"], "image extension"),
    # generate: images
    "corrupt image": ([*GENERATE, "--adapter", "{person}", "--image", "{corrupt}", "--prompt", "a person"],
                      "could not be read as an image"),
    "truncated image": ([*GENERATE, "--adapter", "{person}", "--image", "{truncated}", "--prompt", "a person"],
                        "could not be read as an image"),
    "missing image": ([*GENERATE, "--adapter", "{person}", "--image", "{root}/nope.png", "--prompt", "a person"],
                      "nope.png does not exist"),
    "tiny image": ([*GENERATE, "--adapter", "{person}", "--image", "{small}", "--prompt", "a person"], "8x8 pixels"),
    "huge image": ([*GENERATE, "--adapter", "{person}", "--image", "{huge}", "--prompt", "a person"], "huge.png"),
    "float image out of range": ([*GENERATE, "--adapter", "{person}", "--image", "{hdr}", "--prompt", "a person"],
                                 "float pixel values from 0 to 1000"),
    "no image": ([*GENERATE, "--adapter", "{person}", "--prompt", "a person"], "has no --image"),
    "option before adapter": ([*GENERATE, "--image", "{image}", "--adapter", "{person}", "--prompt", "a person"],
                              "before any --adapter"),
    # generate: models and adapters
    "missing model": ([*GENERATE[:2], "{root}/no-model", *GENERATE[3:], *PERSON, "--prompt", "a person"],
                      "no-model does not exist"),
    "empty adapter folder": ([*GENERATE, "--adapter", "{empty}", "--image", "{image}", "--prompt", "a person"],
                             "is not a nested attention adapter"),
    "missing adapter folder": ([*GENERATE, "--adapter", "{root}/nowhere", "--image", "{image}", "--prompt", "a person"],
                               "nowhere does not exist"),
    "adapter alpha infinity": ([*GENERATE, "--adapter", "{infinite_alpha}", "--image", "{image}", "--prompt",
                                "a person"], "`alpha` is inf"),
    "adapter NaN weights": ([*GENERATE, "--adapter", "{nan_weights}", "--image", "{image}", "--prompt", "a person"],
                            "NaN or infinite values"),
    "pickled image encoder": ([*GENERATE, "--adapter", "{pickled}", "--image", "{image}", "--prompt", "a person"],
                              "only pickled ones (pytorch_model.bin)"),
    "missing image encoder": ([*GENERATE, *PERSON, "--image-encoder", "/nonexistent/clip", "--prompt", "a person"],
                              "is no such folder"),
    # evaluate
    "evaluate out under /proc": ([*EVALUATE, "--out", "/proc/nested-attention-test"], "cannot be written"),
    "evaluate out under a file": ([*EVALUATE, "--out", "{file}/eval"], "is a file, not a folder"),
    "evaluate guidance inf": ([*EVALUATE, "--out", "{out_dir}", "--guidance", "inf"], "--guidance"),
    "evaluate lambda 0": ([*EVALUATE, "--out", "{out_dir}", "--lam", "1", "0"], "a positive number"),
    "evaluate seed negative": ([*EVALUATE, "--out", "{out_dir}", "--seeds", "-1"], "2**64 - 1"),
    "evaluate steps huge": ([*EVALUATE, "--out", "{out_dir}", "--steps", "5000"], "from 1 to 1000"),
    # train: the config, checked before the models load
    "learning rate negative": ([*TRAIN, "data={good_data}", "learning_rate=-1"], "`learning_rate` is -1.0"),
    "learning rate nan": ([*TRAIN, "data={good_data}", "learning_rate=.nan"], "`learning_rate` is nan"),
    "adam beta above 1": ([*TRAIN, "data={good_data}", "adam_beta1=2.0"], "`adam_beta1` is 2.0"),
    "unknown scheduler": ([*TRAIN, "data={good_data}", "lr_scheduler=cosin"], "did you mean cosine"),
    "unknown field": ([*TRAIN, "data={good_data}", "lerning_rate=1"], "Did you mean learning_rate"),
    "train lambda below 1": ([*TRAIN, "data={good_data}", "train_lambda=0.5"], "`train_lambda` is 0.5"),
    "train lambda without one": ([*TRAIN, "data={good_data}", "mechanism=decoupled", "train_lambda=2"],
                                 "the decoupled mechanism has no lambda"),
    "pipe data": ([*TRAIN, "data=pipe:cat {root}/x.tar", "max_steps=1"], "allow_shell_commands_in_data=true"),
    "output dir under /proc": ([*TRAIN[:-1], "output_dir=/proc/nested-attention-test", "data={good_data}"],
                               "cannot be written"),
    "output dir under a file": ([*TRAIN[:-1], "output_dir={file}/run", "data={good_data}"], "is a file"),
    # train: the data, checked before step 0
    "no metadata": ([*TRAIN, "data={root}/nowhere"], "No training metadata"),
    "data tiny image": ([*TRAIN, "data={data_tiny_image}"], "metadata.jsonl:2: Target image"),
    "data truncated image": ([*TRAIN, "data={data_truncated_image}"], "could not be read as an image"),
    "data split word": ([*TRAIN, "data={data_split_word}"], "metadata.jsonl:2: The subject word 'dachshund'"),
    "data word past the limit": ([*TRAIN, "data={data_word_past_limit}"], "77-token limit"),
}


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_cli_bad_input_is_one_error_line_and_writes_nothing(assets, bad, tmp_path, capsys, name):  # noqa: F811
    template, fragment = CLI_CASES[name]
    places = {**vars(assets), **vars(bad), **{f"data_{k.replace('-', '_')}": v for k, v in bad.data.items()},
              "out": tmp_path / "out" / "image.png", "out_dir": tmp_path / "out"}
    argv = [arg.format(**places) for arg in template]
    assert run_cli(*argv) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    errors = [line for line in err.splitlines() if "error: " in line]
    assert len(errors) == 1 and fragment in errors[0], err
    assert not (tmp_path / "out").exists()


def test_a_long_prompt_warns_where_it_is_cut(assets, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "long.png"
    assert run_cli(*[a.format(model=assets.model, out=out) for a in GENERATE], "--adapter", str(assets.person),
                   "--image", str(assets.image), "--prompt", "a person, " + LONG) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "85 tokens long" in warnings[0] and "first 77" in warnings[0]


def test_image_i_is_the_same_whatever_the_batch_size(assets, tmp_path):  # noqa: F811
    common = [*PERSON, "--prompt", "a person", "--num-images", "3", "--seed", "5"]
    for size in (1, 3):
        places = {**vars(assets), "out": tmp_path / f"b{size}" / "x.png"}
        argv = [a.format(**places) for a in [*GENERATE, *common, "--batch-size", str(size)]]
        assert run_cli(*argv) == 0
    for i in range(3):
        one, three = (np.asarray(Image.open(tmp_path / f"b{size}" / f"x-{i}.png"), dtype=int) for size in (1, 3))
        assert np.abs(one - three).max() <= 2  # other batch sizes: other float rounding, never other noise
    first, second = (np.asarray(Image.open(tmp_path / "b3" / f"x-{i}.png"), dtype=int) for i in (0, 1))
    assert np.abs(first - second).max() > 10


# ---- the Python API -------------------------------------------------------------------------------------------


@pytest.fixture
def na(sd_pipe):
    handle = NestedAttention(sd_pipe)
    handle.load_adapter(make_adapter(sd_pipe.unet))
    yield handle
    handle.uninstall()


def call(na, prompt="a photo of a person", **kwargs):
    return na(prompt, {"person": Subject(subject_image(0))}, num_inference_steps=1, height=32, width=32,
              output_type="latent", **kwargs)


def opened_truncated(bad):
    return Image.open(bad.truncated)  # lazily: the cut shows only when the pixels are read


API_CASES = {
    "Subject(None)": (lambda na, bad: Subject(None), "images are NoneType"),
    "weights as a string": (lambda na, bad: Subject(subject_image(0), weights="12"), "list of numbers"),
    "weights as booleans": (lambda na, bad: Subject(subject_image(0), weights=[True]), "list of numbers"),
    "a batch tensor": (lambda na, bad: Subject(torch.rand(2, 3, 32, 32)), "expected one image"),
    "channels-first array": (lambda na, bad: Subject(np.zeros((3, 32, 32), np.uint8)), "has shape (3, 32, 32)"),
    "int64 array": (lambda na, bad: Subject(np.zeros((32, 32, 3), np.int64)), "int64 pixel values"),
    "NaN tensor": (lambda na, bad: Subject(torch.full((3, 32, 32), math.nan)), "float pixel values from nan"),
    "a number as image": (lambda na, bad: Subject(3), "images are int"),
    "a number in the list": (lambda na, bad: Subject([subject_image(0), 3]), "subject image 1 is int"),
    "truncated opened image": (lambda na, bad: Subject(opened_truncated(bad)), "could not be read as an image"),
    "num_images_per_prompt 0": (lambda na, bad: call(na, num_images_per_prompt=0), "num_images_per_prompt is 0"),
    "num_images_per_prompt -1": (lambda na, bad: call(na, num_images_per_prompt=-1), "num_images_per_prompt is -1"),
    "empty prompt list": (lambda na, bad: call(na, prompt=[]), "prompt is []"),
    "prompt None": (lambda na, bad: call(na, prompt=None), "prompt is None"),
    "guidance_scale inf": (lambda na, bad: call(na, guidance_scale=math.inf), "guidance_scale is inf"),
    "guidance_scale nan": (lambda na, bad: call(na, guidance_scale=math.nan), "guidance_scale is nan"),
    "steps past the schedule": (lambda na, bad: na("a person", {"person": Subject(subject_image(0))},
                                                   num_inference_steps=100_000), "num_inference_steps is 100000"),
    "subjects as a list": (lambda na, bad: na("a person", [Subject(subject_image(0))]), "subjects is list"),
    "empty word": (lambda na, bad: na.load_adapter(make_adapter(na.pipe.unet), word=" ", name="x"), "is empty"),
    "alpha infinity": (lambda na, bad: NestedAdapter.from_pretrained(bad.infinite_alpha), "`alpha` is inf"),
    "NaN weights": (lambda na, bad: NestedAdapter.from_pretrained(bad.nan_weights), "NaN or infinite"),
    "pickled encoder": (lambda na, bad: NestedAdapter.from_pretrained(bad.pickled), "never loaded"),
}


@pytest.mark.parametrize("name", list(API_CASES))
def test_api_bad_input_is_one_sentence(na, bad, name):
    make, fragment = API_CASES[name]
    with pytest.raises(NestedAttentionError) as caught:
        make(na, bad)
    assert fragment in str(caught.value)


def test_arrays_tensors_and_float_images_give_the_same_subject_as_the_8_bit_image(tmp_path):
    image = subject_image(3)
    pixels = np.array(image)
    given = [
        pixels,  # (H, W, C) uint8, as Pillow and imageio give
        pixels.astype(np.float32) / 255,  # (H, W, C) floats in 0-1
        torch.from_numpy(pixels).permute(2, 0, 1).float() / 255,  # (C, H, W) floats, as torchvision gives
        torch.from_numpy(pixels).permute(2, 0, 1).contiguous(),  # (C, H, W) uint8
    ]
    for value in given:
        assert np.array_equal(np.asarray(Subject(value).images[0]), pixels)
    gray = np.asarray(image.convert("L"))
    Image.fromarray(gray.astype(np.float32) / 255, "F").save(tmp_path / "float.tif")  # 32-bit float, 0-1
    for float_image in (tmp_path / "float.tif", Image.open(tmp_path / "float.tif")):  # a path, or opened: mode F
        assert np.array_equal(np.asarray(Subject(float_image).images[0].convert("L")), gray)


def test_a_bad_shard_sample_names_the_shard_and_key(bad, tmp_path, capsys):
    from nested_attention_train import data

    records, _ = data.read_metadata(bad.data["tiny-image"], default_word="person")
    data.write_shards(records, str(tmp_path / "shards" / "%03d.tar"))
    argv = [a.format(out_dir=tmp_path / "out") for a in TRAIN]
    assert run_cli(*argv, f"data={tmp_path / 'shards' / '000.tar'}", "shuffle_buffer=0", "train_batch_size=1", "max_steps=3") == 2
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if "error: " in line]
    assert len(errors) == 1 and "000.tar:sample00000001: Target image target.png is 4x4 pixels" in errors[0], err
    assert "Traceback" not in out + err
