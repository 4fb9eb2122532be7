"""`nested-attention data prepare`: real photos (scikit-image's samples) and synthetic ones into training folders."""

import json
import math
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

pytest.importorskip("cv2", reason="data prepare needs opencv-python-headless (the [prepare] extra)")
skimage_data = pytest.importorskip("skimage.data", reason="the sample photos come from scikit-image")

import nested_attention_train.prepare.runner as runner  # noqa: E402
from nested_attention.errors import NestedAttentionError  # noqa: E402
from nested_attention_cli.main import main as cli_main  # noqa: E402
from nested_attention_train.data import read_metadata  # noqa: E402
from nested_attention_train.prepare import PrepareSettings, WordReplacer, prepare, read_word_list  # noqa: E402
from nested_attention_train.prepare.faces import FaceDetector  # noqa: E402

SMALL = {"resolution": 128, "subject_size": 128, "min_side": 64}  # small outputs: fast tests
CANONICAL_EYES = ((0.375, 0.475), (0.625, 0.475))  # where the FFHQ-style crop puts the eyes (fractions of its side)


@pytest.fixture(scope="module")
def photos():
    """The sample photos: a person (the astronaut), a cat, and a photo with no face (coffee)."""
    return {
        "astronaut": Image.fromarray(skimage_data.astronaut()),
        "cat": Image.fromarray(skimage_data.chelsea()),
        "coffee": Image.fromarray(skimage_data.coffee()),
    }


@pytest.fixture(scope="module")
def detector():
    return FaceDetector()


def folder(root: Path, items: dict) -> Path:
    """Write photos (PIL images or bytes) and their sidecar captions: {name: (image, caption or None)}."""
    root.mkdir(parents=True, exist_ok=True)
    for name, (image, caption) in items.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(image, bytes):
            path.write_bytes(image)
        else:
            image.save(path)
        if caption is not None:
            path.with_suffix(".txt").write_text(caption)
    return root


def run(source: Path, out: Path, domain: str = "person", **options) -> dict:
    settings = {key: options.pop(key) for key in list(options) if key in PrepareSettings.__dataclass_fields__}
    return prepare(source, out, PrepareSettings(domain=domain, **{**SMALL, **settings}), progress=False, **options)


def metadata(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]


def the_face(detector, image: Image.Image):
    faces = detector(np.asarray(image.convert("RGB")))
    assert len(faces) == 1, f"expected one face, found {len(faces)}"
    return faces[0]


# ------------------------------------------------------------------------------------------------------- persons


def test_the_astronaut_becomes_an_aligned_face_a_target_and_a_rewritten_prompt(photos, detector, tmp_path):
    source = folder(tmp_path / "in", {"astronaut.png": (photos["astronaut"], "a woman in a space suit")})
    report = run(source, tmp_path / "out")
    (line,) = metadata(tmp_path / "out")
    assert line["prompt"] == "a person in a space suit" and line["word"] == "person"
    assert report["kept"] == 1 and report["skipped"] == {}
    subject = Image.open(tmp_path / "out" / line["subject"])
    target = Image.open(tmp_path / "out" / line["target"])
    assert subject.size == (128, 128) and target.size == (128, 128)
    # the crop holds the face, large and centred, with the eyes where FFHQ's crop puts them
    face = the_face(detector, subject)
    assert face.size > 0.4 * 128 and abs(face.box[0] + face.box[2] / 2 - 64) < 0.1 * 128
    for found, (x, y) in zip((face.left_eye, face.right_eye), CANONICAL_EYES):
        assert abs(found[0] / 128 - x) < 0.04 and abs(found[1] / 128 - y) < 0.04
    the_face(detector, target.resize((512, 512)))  # the target keeps the whole face


@pytest.mark.parametrize("angle", [12, -12])
def test_a_tilted_face_comes_out_with_its_eyes_level(photos, detector, tmp_path, angle):
    tilted = photos["astronaut"].rotate(angle, resample=Image.Resampling.BICUBIC)
    before = the_face(detector, tilted)
    assert abs(math.degrees(math.atan2(before.right_eye[1] - before.left_eye[1],
                                       before.right_eye[0] - before.left_eye[0]))) > 6
    source = folder(tmp_path / "in", {"tilted.png": (tilted, "a woman")})
    run(source, tmp_path / "out")
    face = the_face(detector, Image.open(tmp_path / "out" / metadata(tmp_path / "out")[0]["subject"]))
    assert face.eyes_found
    tilt = math.degrees(math.atan2(face.right_eye[1] - face.left_eye[1], face.right_eye[0] - face.left_eye[0]))
    assert abs(tilt) < 3


def test_photos_without_one_usable_face_are_skipped_with_their_reasons(photos, tmp_path):
    astronaut = photos["astronaut"]
    two = Image.new("RGB", (1024, 512))
    two.paste(astronaut, (0, 0))
    two.paste(astronaut.resize((400, 400)), (560, 56))  # a second, smaller person
    tiny_face = astronaut.resize((200, 200))  # its face is about 36 pixels wide
    blurred_eyes = astronaut.copy()
    blurred_eyes.paste(astronaut.crop((185, 85, 265, 120)).filter(ImageFilter.GaussianBlur(6)), (185, 85))
    source = folder(tmp_path / "in", {
        "coffee.png": (photos["coffee"], "a man's coffee"),
        "cat.png": (photos["cat"], "a man's cat"),
        "two.png": (two, "a woman"),
        "small.png": (tiny_face, "a woman"),
        "blurred.png": (blurred_eyes, "a woman"),
    })
    with pytest.raises(NestedAttentionError, match="None of the 5 photos"):
        run(source, tmp_path / "out", min_face=48)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    reasons = {entry["file"]: entry["reason"] for entry in report["skipped_photos"]}
    assert reasons == {"coffee.png": "no_face", "cat.png": "no_face", "two.png": "several_faces",
                       "small.png": "small_face", "blurred.png": "no_eyes"}
    messages = [entry["message"] for entry in report["skipped_photos"]]
    assert all(message.count(". ") == 0 and message.endswith(".") for message in messages)  # one sentence each
    # asked to, the photo with two people keeps the larger one (the target is the square around its face), and
    # the face without eyes is kept upright
    report = run(source, tmp_path / "largest", min_face=48, keep_largest_face=True, keep_faces_without_eyes=True)
    assert report["kept"] == 2 and report["notes"] == {"eyes_from_box": 1}
    line = metadata(tmp_path / "largest")[1]  # the lines follow the photos' names: blurred.png, two.png
    target = np.asarray(Image.open(tmp_path / "largest" / line["target"]), dtype=np.float32)
    expected = np.asarray(astronaut.resize((128, 128), Image.Resampling.LANCZOS), dtype=np.float32)
    assert np.abs(target - expected).mean() < 4


def test_false_hits_on_a_large_photo_do_not_make_it_one_of_several_faces(photos, detector, tmp_path):
    large = photos["astronaut"].resize((2048, 2048), Image.Resampling.LANCZOS)  # the cascade also fires on the suit
    source = folder(tmp_path / "in", {"large.jpg": (large, "a woman")})
    report = run(source, tmp_path / "out")
    assert report["kept"] == 1 and report["notes"] == {}
    face = the_face(detector, Image.open(tmp_path / "out" / metadata(tmp_path / "out")[0]["subject"]))
    for found, (x, y) in zip((face.left_eye, face.right_eye), CANONICAL_EYES):  # the crop of a shrunken photo
        assert abs(found[0] / 128 - x) < 0.04 and abs(found[1] / 128 - y) < 0.04



def test_a_photo_stored_sideways_is_turned_by_its_exif_orientation(photos, detector, tmp_path):
    sideways = photos["astronaut"].rotate(90, expand=True)  # stored turned left; EXIF 6 says: turn right to view
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "in").mkdir()
    sideways.save(tmp_path / "in" / "phone.jpg", exif=exif, quality=95)
    (tmp_path / "in" / "phone.txt").write_text("a woman")
    run(tmp_path / "in", tmp_path / "out")
    face = the_face(detector, Image.open(tmp_path / "out" / metadata(tmp_path / "out")[0]["subject"]))
    assert face.eyes_found and abs(face.left_eye[1] - face.right_eye[1]) < 4


# ---------------------------------------------------------------------------------------------------- captions


@pytest.mark.parametrize(("caption", "domain", "prompt"), [
    ("a woman smiling on a beach", "person", "a person smiling on a beach"),
    ("An old man reading", "person", "An old person reading"),
    ("Girl with a kite", "person", "Person with a kite"),
    ("an individual in a red coat", "person", "a person in a red coat"),
    ("the lady's   hat", "person", "the person's hat"),
    ("a golden retriever on the grass", "pet", "a pet on the grass"),
    ("An animal asleep", "pet", "A pet asleep"),
    ("a kitten and a ball of wool", "pet", "a pet and a ball of wool"),
    ("a tabby cat asleep", "pet", "a pet asleep"),
    ("a baby girl laughing", "person", "a person laughing"),
    ("a photo of a person", "person", "a photo of a person"),
])
def test_the_subject_word_becomes_the_domain_word(caption, domain, prompt):
    settings = PrepareSettings(domain=domain)
    assert WordReplacer(settings.word, settings.subject_words)(caption).prompt == prompt


@pytest.mark.parametrize("caption", ["two women at a table", "a man and a woman", "a superman costume", "a red car",
                                     "a man-made lake", "   "])
def test_captions_without_one_subject_are_refused(caption):
    rewrite = WordReplacer("person", PrepareSettings(domain="person").subject_words)(caption)
    assert rewrite.prompt is None and rewrite.reason


def test_a_word_list_file_replaces_the_default_list(tmp_path):
    (tmp_path / "words.txt").write_text("# astronauts count as persons\nastronaut\nspace explorer  # a phrase\n")
    words = read_word_list(tmp_path / "words.txt")
    assert words == ["astronaut", "space explorer"]
    replace = WordReplacer("person", words)
    assert replace("a Space Explorer on the moon").prompt == "a person on the moon"
    assert replace("an astronaut").prompt == "a person"
    assert replace("a woman").prompt is None  # not in this list


def test_captions_come_from_sidecars_then_captions_jsonl_then_the_template(photos, tmp_path):
    cat = photos["cat"]
    source = folder(tmp_path / "in", {"a.png": (cat, "a cat on a chair"), "b/c.png": (cat.rotate(180), None),
                                      "d.png": (cat.transpose(Image.Transpose.FLIP_LEFT_RIGHT), None)})
    (source / "captions.jsonl").write_text(json.dumps({"file_name": "b/c.png", "caption": "a sleepy kitty"}) + "\n"
                                           + json.dumps({"file_name": "a.png", "caption": "ignored: sidecar wins"}))
    run(source, tmp_path / "out", domain="pet", caption_template="a photo of a {word}")
    assert [line["prompt"] for line in metadata(tmp_path / "out")] == [
        "a pet on a chair", "a sleepy pet", "a photo of a pet"]


@pytest.fixture(scope="module")
def caption_model(tmp_path_factory):
    """A tiny random BLIP captioning model saved as a local folder, its word head biased to say "woman"."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder = tmp_path_factory.mktemp("blip")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "photo", "of", "woman", "cat"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]", model_max_length=32)  # the path: any version
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    text = dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                bos_token_id=5, eos_token_id=3, pad_token_id=0, sep_token_id=3, max_position_embeddings=64)
    vision = dict(hidden_size=32, image_size=32, patch_size=8, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=37)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision))
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[vocab.index("woman")] = 50.0
    model.save_pretrained(folder / "model")
    processor.save_pretrained(folder / "model")
    return folder / "model"


def test_a_captioning_model_captions_the_photos_without_one_once(photos, caption_model, tmp_path, monkeypatch):
    from nested_attention_train.prepare import captioner

    made = []
    original = captioner.Captioner.__call__
    monkeypatch.setattr(captioner.Captioner, "__call__", lambda self, images: made.append(len(images))
                        or original(self, images))
    cat = photos["cat"]
    source = folder(tmp_path / "in", {"a.png": (cat, "a cat on a chair"), "b.png": (cat.rotate(180), None),
                                      "c.png": (cat.rotate(90, expand=True), None)})
    options = dict(domain="pet", word="person", caption_model=str(caption_model), caption_prompt="a photo of")
    run(source, tmp_path / "out", subject_words=("woman", "cat"), caption_batch=8, **options)
    assert made == [2]  # one batch: the two photos without a caption
    generated = [json.loads(line) for line in (tmp_path / "out" / "generated-captions.jsonl").read_text().splitlines()]
    assert [entry["file_name"] for entry in generated] == ["b.png", "c.png"]
    assert all(entry["caption"].startswith("a photo of woman") for entry in generated)
    assert [line["prompt"] for line in metadata(tmp_path / "out")] == [
        "a person on a chair", "a photo of person", "a photo of person"]
    # a second run captions only the new photo; the others' captions are kept
    made.clear()
    folder(source, {"d.png": (cat.transpose(Image.Transpose.FLIP_LEFT_RIGHT), None)})
    (tmp_path / "out" / "prepare-log.jsonl").write_text("")  # forget what was prepared: captions still come cached
    report = run(source, tmp_path / "out", subject_words=("woman", "cat"), **options)
    assert made == [1] and report["kept"] == 4


def test_a_caption_model_folder_without_safetensors_weights_is_refused(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "in" / "x.png")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "pytorch_model.bin").write_bytes(b"pickle")
    code, err = cli(capsys, "--domain", "pet", "--caption-model", str(tmp_path / "model"), str(tmp_path / "in"),
                    str(tmp_path / "out"))
    assert code == 2 and "pickled .bin weights are not loaded" in one_error_line(err)


# ------------------------------------------------------------------------------------------------------ pets


def pet_with_mask(size=(320, 240)):
    """A noisy photo with a red disc (the 'pet'), its mask, and the disc's box."""
    rng = np.random.RandomState(0)
    photo = Image.fromarray(rng.randint(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    mask = Image.new("L", size, 0)
    box = (40, 60, 140, 160)
    ImageDraw.Draw(photo).ellipse(box, fill=(200, 30, 30))
    ImageDraw.Draw(mask).ellipse(box, fill=255)
    return photo, mask


def test_a_masked_pet_is_cropped_around_its_mask_onto_white(tmp_path):
    photo, mask = pet_with_mask()
    source = folder(tmp_path / "in", {"pet.png": (photo, "a dog")})
    masks = folder(tmp_path / "masks", {"pet.png": (mask, None)})
    run(source, tmp_path / "out", domain="pet", masks=str(masks))
    (line,) = metadata(tmp_path / "out")
    assert line["subject"] == line["target"] and line["prompt"] == "a pet"
    crop = np.asarray(Image.open(tmp_path / "out" / line["subject"]), dtype=np.int32)
    red = (crop[..., 0] > 150) & (crop[..., 1] < 80)
    white = (crop > 245).all(axis=-1)
    assert (red | white).mean() > 0.97  # the pet on white: no background noise is left
    rows, cols = np.flatnonzero(red.any(axis=1)), np.flatnonzero(red.any(axis=0))
    assert rows[0] > 5 and cols[0] > 5 and rows[-1] < 122 and cols[-1] < 122  # the whole pet, with a margin
    assert abs((rows[0] + rows[-1]) / 2 - 64) < 3 and abs((cols[0] + cols[-1]) / 2 - 64) < 3  # centred


def test_a_transparent_pet_uses_its_alpha_and_an_opaque_one_the_whole_photo(photos, tmp_path):
    photo, mask = pet_with_mask()
    rgba = photo.copy()
    rgba.putalpha(mask)
    source = folder(tmp_path / "in", {"cut-out.png": (rgba, "a puppy"), "chelsea.png": (photos["cat"], "a tabby cat on a rug")})
    report = run(source, tmp_path / "out", domain="pet")
    assert report["kept"] == 2 and report["notes"] == {"whole_image": 1}
    crops = {line["prompt"]: np.asarray(Image.open(tmp_path / "out" / line["subject"])) for line in
             metadata(tmp_path / "out")}
    assert (crops["a pet"][:4] > 245).all()  # above the disc: white, not the photo's noise
    assert set(crops) == {"a pet", "a pet on a rug"}
    assert crops["a pet on a rug"].shape == (128, 128, 3)


# ------------------------------------------------------------------------------------- resume, dedup, parallel


def test_identical_files_are_prepared_once(photos, tmp_path):
    cat = photos["cat"]
    source = folder(tmp_path / "in", {"a.png": (cat, "a cat"), "copy/b.png": (cat, "a cat again")})
    report = run(source, tmp_path / "out", domain="pet")
    assert report["kept"] == 1 and report["skipped"] == {"duplicate": 1}
    assert report["skipped_photos"][0]["message"] == "copy/b.png is the same file as a.png."


def test_a_second_run_skips_what_is_done_and_an_interrupted_run_ends_like_a_whole_one(photos, tmp_path, monkeypatch):
    cat = photos["cat"]
    items = {f"{i}.png": (cat.rotate(90 * i, expand=True), "a cat") for i in range(4)}
    source = folder(tmp_path / "in", items)
    run(source, tmp_path / "whole", domain="pet")

    calls = []
    original = runner.prepare_one

    def interrupted(task, **kwargs):
        calls.append(task.relative)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(task, **kwargs)

    monkeypatch.setattr(runner, "prepare_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(source, tmp_path / "split", domain="pet")
    calls.clear()
    run(source, tmp_path / "split", domain="pet")
    assert calls == ["2.png", "3.png"]  # the two done before the interruption are not prepared again
    assert metadata(tmp_path / "split") == metadata(tmp_path / "whole")
    for line in metadata(tmp_path / "whole"):
        assert (tmp_path / "split" / line["subject"]).read_bytes() == (tmp_path / "whole" / line["subject"]).read_bytes()
    calls.clear()
    folder(source, {"new.png": (cat.transpose(Image.Transpose.FLIP_LEFT_RIGHT), "a cat")})
    os.utime(source / "0.png")  # touched, same content: done
    folder(source, {"1.png": (cat.transpose(Image.Transpose.FLIP_TOP_BOTTOM), "a cat")})  # new content: again
    report = run(source, tmp_path / "split", domain="pet")
    assert sorted(calls) == ["1.png", "new.png"] and report["kept"] == 5
    assert metadata(tmp_path / "split")[1] != metadata(tmp_path / "whole")[1]  # 1.png's record is the new one
    with pytest.raises(NestedAttentionError, match="other settings"):
        run(source, tmp_path / "split", domain="pet", resolution=64)


def test_an_output_folder_inside_the_input_folder_is_not_read_as_photos(photos, tmp_path):
    source = folder(tmp_path / "in", {"cat.png": (photos["cat"], "a cat")})
    first = run(source, source / "prepared", domain="pet")
    second = run(source, source / "prepared", domain="pet")
    assert first["photos_found"] == second["photos_found"] == 1 and second["kept"] == 1


def test_several_workers_give_the_same_folder(photos, tmp_path):
    cat = photos["cat"]
    source = folder(tmp_path / "in", {f"{i}.png": (cat.rotate(90 * i, expand=True), "a cat") for i in range(3)})
    run(source, tmp_path / "one", domain="pet", workers=1)
    run(source, tmp_path / "two", domain="pet", workers=2)
    assert metadata(tmp_path / "one") == metadata(tmp_path / "two")


# ------------------------------------------------------------------------------------ outputs the trainer reads


def test_the_prepared_folder_trains_and_its_shards_and_contact_sheet_are_written(photos, tmp_path):
    from nested_attention_train.trainer import main as train_main

    astronaut = photos["astronaut"]
    source = folder(tmp_path / "in", {
        "a.png": (astronaut, "a woman in a space suit"),
        "b.png": (astronaut.rotate(8, resample=Image.Resampling.BICUBIC), "a lady smiling"),
        "c.png": (astronaut.transpose(Image.Transpose.FLIP_LEFT_RIGHT), "a woman, mirrored"),
    })
    out = tmp_path / "out"
    report = run(source, out, shards=True, shard_size=2)
    records, problems = read_metadata(out)
    assert len(records) == 3 and not problems and {r.word for r in records} == {"person"}
    with tarfile.open(out / report["shards"][0]) as tar:
        assert len({Path(name).name.split(".")[0] for name in tar.getnames()}) == 2  # two samples per shard
    assert len(report["shards"]) == 2 and json.loads((out / "report.json").read_text())["shards"] == report["shards"]
    sheet = Image.open(out / report["contact_sheet"])
    assert sheet.width > sheet.height > 0
    config = str(Path(__file__).parent.parent / "configs" / "tiny-cpu.yaml")
    assert train_main(["--config", config, f"data={out}", f"output_dir={tmp_path / 'run'}", "max_steps=2",
                       "train_batch_size=2", "checkpoint_every=1000"]) == 0
    assert (tmp_path / "run" / "adapter" / "nested_adapter.safetensors").is_file()


# -------------------------------------------------------------------------------------------------- bad input


def cli(capsys, *args) -> tuple[int, str]:
    code = cli_main(["data", "prepare", *args, "--no-progress", "--workers", "1", "--resolution", "128",
                     "--subject-size", "128", "--min-side", "64"])
    return code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_an_empty_or_missing_input_folder_is_one_sentence_and_exit_code_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no photos here")
    code, err = cli(capsys, "--domain", "person", str(tmp_path / "empty"), str(tmp_path / "out"))
    assert code == 2 and "holds no photos" in one_error_line(err)
    code, err = cli(capsys, "--domain", "person", str(tmp_path / "missing"), str(tmp_path / "out"))
    assert code == 2 and "is not a folder" in one_error_line(err)


def test_unreadable_photos_and_captions_without_a_subject_are_counted_or_stop_a_strict_run(photos, tmp_path, capsys):
    source = folder(tmp_path / "in", {"broken.jpg": (b"not a JPEG", "a cat"), "car.png": (photos["coffee"], "a car"),
                                      "cat.png": (photos["cat"], "a cat")})
    code, err = cli(capsys, "--domain", "pet", str(source), str(tmp_path / "out"))
    assert code == 0 and err.startswith("warning: 2 photos were unusable inputs (") and err.count("\n") == 1
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["kept"] == 1 and report["skipped"] == {"unreadable": 1, "no_subject_word": 1}
    code, err = cli(capsys, "--domain", "pet", "--strict", str(source), str(tmp_path / "strict"))
    assert code == 2 and "car.png: the caption 'a car' names no subject word" in one_error_line(err)
    (source / "car.png").unlink()
    code, err = cli(capsys, "--domain", "pet", "--strict", str(source), str(tmp_path / "strict2"))
    assert code == 2 and "broken.jpg could not be read as an image" in one_error_line(err)
    (source / "cat.png").unlink()
    (source / "car.png").write_bytes(b"")
    code, err = cli(capsys, "--domain", "pet", str(source), str(tmp_path / "none"))
    assert code == 2 and "None of the 2 photos" in one_error_line(err)


@pytest.mark.parametrize("case", ["bad-jsonl", "template", "occupied-out", "masks", "words", "masks-for-persons"])
def test_bad_options_and_caption_files_are_one_sentence_and_exit_code_2(photos, tmp_path, capsys, case):
    source = folder(tmp_path / "in", {"cat.png": (photos["cat"], None)})
    out, extra = tmp_path / "out", []
    if case == "bad-jsonl":
        (source / "captions.jsonl").write_text('{"file_name": "cat.png"}\n')
    elif case == "template":
        extra = ["--caption-template", "a photo of a cat"]
    elif case == "occupied-out":
        out.mkdir()
        (out / "mine.txt").write_text("someone else's file")
    elif case == "masks":
        extra = ["--masks", str(tmp_path / "no-masks")]
    elif case == "masks-for-persons":
        (tmp_path / "masks").mkdir()
        extra = ["--masks", str(tmp_path / "masks")]
    elif case == "words":
        (tmp_path / "words.txt").write_text("# nothing\n")
        extra = ["--words", str(tmp_path / "words.txt")]
    domain = "person" if case == "masks-for-persons" else "pet"
    code, err = cli(capsys, "--domain", domain, *extra, str(source), str(out))
    line = one_error_line(err)
    assert code == 2
    expected = {"bad-jsonl": "captions.jsonl:1", "template": "{word}", "occupied-out": "not a folder made by data",
                "masks": "masks folder", "words": "has no words", "masks-for-persons": "Leave out the masks"}[case]
    assert expected in line


def test_help_names_the_outputs_and_the_docs(capsys):
    with pytest.raises(SystemExit) as stop:
        cli_main(["data", "prepare", "--help"])
    text = capsys.readouterr().out
    assert stop.value.code == 0 and "metadata.jsonl" in text and "docs/data.md" in text and "--workers" in text
