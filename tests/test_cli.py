"""The `nested-attention` command line, run in-process on tiny saved models (offline, seconds)."""

import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from nested_attention import NestedAdapter
from nested_attention.tiny import TINY_ADAPTER_CONFIG, tiny_image_encoder, tiny_sd_pipeline
from nested_attention_cli.main import main


def run_cli(*argv: str) -> int:
    """main(argv) as the console script sees it: argparse's exits become exit codes too."""
    try:
        return main(list(argv))
    except SystemExit as exit:
        return exit.code


def save_image(path: Path, mode: str = "RGB", size: int = 40, seed: int = 0) -> Path:
    pixels = np.random.RandomState(seed).randint(0, 255, (size, size, 4), dtype=np.uint8)
    Image.fromarray(pixels, "RGBA").convert(mode).save(path)
    return path


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR claims width x height pixels but holds no image data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A saved tiny SD pipeline, 'person' and 'pet' adapters saved with their image encoder, good and bad images."""
    root = tmp_path_factory.mktemp("cli")
    pipe = tiny_sd_pipeline(tokenizer_dir=root / "tokenizer")
    pipe.save_pretrained(root / "model")
    for word in ("person", "pet"):
        encoder, processor = tiny_image_encoder()
        adapter = NestedAdapter.for_unet(
            pipe.unet, encoder, image_processor=processor, word=word, **TINY_ADAPTER_CONFIG
        )
        adapter.save_pretrained(root / word, save_image_encoder=True)
    corrupt = root / "corrupt.png"
    corrupt.write_bytes(np.random.RandomState(0).bytes(500))
    (root / "empty").mkdir()
    return SimpleNamespace(
        root=root, model=root / "model", person=root / "person", pet=root / "pet", empty=root / "empty",
        image=save_image(root / "subject.png", seed=0), image_2=save_image(root / "subject-2.png", seed=1),
        small=save_image(root / "small.png", size=8), huge=png_header_only(root / "huge.png", 100_000, 100_000),
        corrupt=corrupt,
    )


def generate(assets, out: Path, *extra: str) -> int:
    return run_cli("generate", "--model", str(assets.model), "--steps", "1", "--out", str(out), *extra)


# ---- help -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], ["generate", "demo", "examples"]),
        (["generate"], ["--model", "--adapter", "--word", "--image", "--image-weight", "--lam", "--prompt", "--out"]),
        (["demo"], ["--out", "--steps", "--smoke", "held-out"]),
    ],
)
def test_help(capsys, argv, expected):
    assert run_cli(*argv, "--help") == 0
    out = capsys.readouterr().out
    for word in expected:
        assert word in out


# ---- generation ------------------------------------------------------------------------------------------------


def test_generate_one_subject(assets, tmp_path, capsys):
    out = tmp_path / "sub" / "one.png"
    code = generate(assets, out, "--adapter", str(assets.person), "--image", str(assets.image),
                    "--prompt", "a photo of a person at the beach", "--height", "32", "--width", "48")
    assert code == 0
    assert Image.open(out).size == (48, 32)
    assert str(out) in capsys.readouterr().out


def test_cuda_graphs_without_a_cuda_device_is_one_sentence(assets, tmp_path, capsys):
    code = generate(assets, tmp_path / "graphed.png", "--device", "cpu", "--cuda-graphs", "--adapter",
                    str(assets.person), "--image", str(assets.image), "--prompt", "a photo of a person")
    assert code == 2
    assert capsys.readouterr().err.strip() == ("error: --cuda-graphs needs a CUDA device, but this run uses cpu; add "
                                               "--device cuda or drop --cuda-graphs.")


def test_generate_two_images_with_weights(assets, tmp_path):
    out = tmp_path / "mix.png"
    code = generate(assets, out, "--adapter", str(assets.person), "--image", str(assets.image), "--image-weight", "2",
                    "--image", str(assets.image_2), "--image-weight", "1", "--lam", "2", "--prompt", "a person")
    assert code == 0
    assert Image.open(out).size == (32, 32)  # the tiny model's default size


def test_generate_several_images(assets, tmp_path, capsys):
    code = generate(assets, tmp_path / "many.png", "--num-images", "2", "--adapter", str(assets.person),
                    "--image", str(assets.image), "--prompt", "a person")
    assert code == 0
    written = [tmp_path / "many-0.png", tmp_path / "many-1.png"]
    assert all(path.is_file() for path in written)
    assert capsys.readouterr().out.split() == [str(path) for path in written]


def test_generate_two_subjects(assets, tmp_path):
    out = tmp_path / "two.png"
    code = generate(assets, out, "--adapter", str(assets.person), "--image", str(assets.image),
                    "--adapter", str(assets.pet), "--image", str(assets.image_2), "--prompt", "a person and a pet")
    assert code == 0
    assert out.is_file()


def test_generate_tiny_model_and_random_adapter(assets, tmp_path, capsys):
    out = tmp_path / "tiny.png"
    code = run_cli("generate", "--model", "tiny-sd", "--adapter", "random", "--image", str(assets.image),
                   "--prompt", "a person", "--steps", "1", "--out", str(out))
    assert code == 0
    assert out.is_file()
    err = capsys.readouterr().err
    assert "randomly initialized" in err and "untrained" in err


@pytest.mark.parametrize(
    "mode, note", [("L", "is L, not RGB"), ("RGBA", "is RGBA with transparency; composited onto white")]
)
def test_non_rgb_images_are_converted(assets, tmp_path, capsys, mode, note):
    image = save_image(tmp_path / f"{mode}.png", mode=mode)
    code = generate(assets, tmp_path / "out.png", "--adapter", str(assets.person), "--image", str(image),
                    "--prompt", "a person")
    assert code == 0
    assert f"note: {image} {note}" in capsys.readouterr().err


# ---- bad input: tests/test_bad_inputs.py holds the corpus ------------------------------------------------------


# ---- demo -------------------------------------------------------------------------------------------------------


def test_demo(tmp_path, capsys):
    from PIL import Image

    from nested_attention_cli.demo import CELL, COLUMNS

    assert run_cli("demo", "--out", str(tmp_path), "--smoke") == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "demo.png") in out
    with Image.open(tmp_path / "demo.png") as sheet:
        assert sheet.width == COLUMNS * CELL and sheet.height > 6 * CELL


def test_demo_cells_differ_only_by_what_their_labels_say():
    """The sheet's rows: same seed where the prompt is shared, every capability present, only held-out subjects."""
    from nested_attention_cli.demo import COLUMNS, demo_rows
    from nested_attention_toy.examples import EXAMPLES, load_example

    rows = demo_rows({e.name: load_example(e.name) for e in EXAMPLES})
    cells = [c for row in rows for c in row if c.image is None]
    labels = " ".join(c.label for c in cells)
    for needed in ("lambda 1 ", "lambda 4", "two photos", "mix", "as a 'pet'", "A + C", "no adapter"):
        assert needed in labels + " ", needed
    with_adapter = {(c.prompt, c.seed) for c in cells if c.subjects}
    assert all((c.prompt, c.seed) in with_adapter for c in cells if not c.subjects)  # each baseline has its twin
    sweep = [c for c in cells if "lambda" in c.label]
    assert len({(c.prompt, c.seed) for c in sweep}) == 1 and len({c.subjects["toy-person"].lam for c in sweep}) == len(sweep)
    assert all(len(row) <= COLUMNS for row in rows) and all(e.identity.held_out for e in EXAMPLES)
    # every row of a subject's prompts starts with that subject's input view
    import numpy as np

    for row in rows:
        singles = [np.asarray(s.images[0]) for c in row for s in c.subjects.values() if len(s.images) == 1]
        if row[0].image is not None and singles and all(c.words == () for c in row):
            assert any(np.array_equal(np.asarray(row[0].image), x) for x in singles), row[0].label


def test_shipped_adapters_load_by_name():
    """On any machine: their config names the installed toy CLIP (a name, never a path of the machine that trained
    them), and that is the vision tower they load."""
    import torch
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPVisionModel

    from nested_attention import NestedAdapter, NestedAttention
    from nested_attention.sources import IMAGE_ENCODER, resolve
    from nested_attention_cli.generate import adapter_source
    from nested_attention_toy.assets import model_path

    pipe = StableDiffusionPipeline.from_pretrained(model_path("toy"))
    na = NestedAttention(pipe)
    clip = CLIPVisionModel.from_pretrained(resolve(IMAGE_ENCODER, "toy")).state_dict()
    for name, word in (("toy-person", "person"), ("toy-pet", "pet")):
        adapter = NestedAdapter.from_pretrained(adapter_source(name))
        assert adapter.config.word == word and adapter.config.image_encoder == "toy"
        loaded = adapter.encoder.image_encoder.state_dict()
        assert loaded.keys() == clip.keys() and all(torch.equal(loaded[k], clip[k]) for k in clip)
        assert na.load_adapter(adapter, name=name) == name
    na.uninstall()
