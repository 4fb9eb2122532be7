"""The web UI's session (what every button does) on tiny models, and the app's construction; no browser here
(tests/test_ui_browser.py drives a real one)."""

import pytest
import torch

import nested_attention_ui.session as session_module
from conftest import subject_image
from nested_attention import NestedAttentionError, Subject
from nested_attention_cli.main import main
from nested_attention_ui.session import Settings, SubjectInput, UISession, parse_weights

PROMPT = "a photo of a person at the beach"
SETTINGS = Settings(steps=2, count=2, size={"height": 32, "width": 32})


@pytest.fixture(scope="module")
def session():
    return UISession("tiny-sd", ["random", "random"])


@pytest.fixture
def me(tmp_path):
    path = tmp_path / "me.png"
    subject_image(0).save(path)
    return str(path)


def inputs(me, word="", lam=1.0, pet=False, **person):
    return [SubjectInput(images=[me], word=word, lam=lam, **person), SubjectInput(images=[me], enabled=pet)]


def test_prompts_are_checked_with_the_cli_s_sentences(session, me):
    assert session.names == ["random-0", "random-1"] and list(session.trained_words.values()) == ["person", "pet"]
    assert session.check_prompt(PROMPT, inputs(me)) == ""
    assert "does not contain the subject word 'pet'" in session.check_prompt(PROMPT, inputs(me, pet=True))
    assert session.check_prompt("a photo of a dog", inputs(me, word="dog")) == ""  # semantic variation
    assert "Type a prompt" in session.check_prompt("  ", inputs(me))
    assert "split by the tokenizer" in session.check_prompt(PROMPT, inputs(me, word="dachshund"))


def test_generate_and_compare_are_the_library_s_own_generations(session, me):
    """The UI adds no arithmetic: its images equal the library's for the same subjects and seeds."""
    images = session.generate(PROMPT, inputs(me, lam=2.0), SETTINGS)
    direct = session.na(PROMPT, {"random-0": Subject(subject_image(0), lam=2.0)}, num_images_per_prompt=2,
                        num_inference_steps=2, guidance_scale=5.0, height=32, width=32,
                        generator=[torch.Generator().manual_seed(i) for i in range(2)]).images
    assert len(images) == 2 and all(a.tobytes() == b.tobytes() for a, b in zip(images, direct))
    steps = []
    compared = session.compare(PROMPT, inputs(me), SETTINGS, progress=steps.append)
    assert [caption for _, caption in compared] == ["base model (no adapter)", "lambda 1", "lambda 2", "lambda 3",
                                                    "lambda 4"]
    base = session.pipe(PROMPT, num_inference_steps=2, guidance_scale=5.0, height=32, width=32,
                        generator=torch.Generator().manual_seed(0)).images[0]
    assert compared[0][0].tobytes() == base.tobytes()
    single = session.generate(PROMPT, inputs(me, lam=2.0), Settings(steps=2, size={"height": 32, "width": 32}))
    assert compared[2][0].tobytes() == single[0].tobytes()  # lambda 2, first seed: as generated alone
    assert steps == sorted(steps) and steps[-1] == pytest.approx(1.0)


def test_the_wide_shape_is_twice_the_height_in_width(session, me):
    """The shape setting's "twice as wide" (a person and a pet side by side in the toy world) generates exactly what
    the library does at twice the width."""
    wide = session.generate(PROMPT, inputs(me), Settings(steps=2, count=1, size={"height": 32}, wide=True))[0]
    direct = session.na(PROMPT, {"random-0": Subject(subject_image(0))}, num_inference_steps=2, guidance_scale=5.0,
                        height=32, width=64, generator=[torch.Generator().manual_seed(0)]).images[0]
    assert wide.size == (64, 32) and wide.tobytes() == direct.tobytes()


def test_explain_gives_the_sheet_and_its_numbers(session, me):
    sheet, numbers = session.explain(PROMPT, inputs(me), Settings(steps=2, size={"height": 32, "width": 32}))
    assert sheet.size[0] > 100 and numbers["subject_tokens"] == 8


def test_bad_inputs_are_one_sentence(session, me, tmp_path, monkeypatch):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    cases = [
        (inputs(str(text)), "notes.txt"),
        (inputs(me, weights="2, x"), "must be numbers"),
        (inputs(me, weights="2, 1"), "2 image weights were given for 1 images"),
        ([SubjectInput(images=[]), SubjectInput(enabled=False)], "has no image"),
        ([SubjectInput(images=[me] * 9), SubjectInput(enabled=False)], "at most 8"),
        (inputs(me, word="pet", pet=True), "would also be bound to 'pet'"),
    ]
    for given, message in cases:
        with pytest.raises(NestedAttentionError, match=message):
            session.generate(PROMPT.replace("person", given[0].word or "person"), given, SETTINGS)
    with pytest.raises(NestedAttentionError, match="choose 1 to 8"):
        session.generate(PROMPT, inputs(me), Settings(count=9))
    monkeypatch.setattr(session_module, "MAX_UPLOAD_BYTES", 10)
    with pytest.raises(NestedAttentionError, match="images up to 0 MB"):
        session.generate(PROMPT, inputs(me), SETTINGS)
    assert parse_weights("", 3) is None and parse_weights("2; 1", 2) == [2.0, 1.0]


def test_the_app_builds_and_shows_errors_as_messages(session):
    import gradio as gr

    from nested_attention_ui.app import build_app, shown

    app = build_app(session, {"person-x": "x.png"}, toy=True, prompt=PROMPT)
    assert isinstance(app, gr.Blocks)

    def refuse():
        raise NestedAttentionError("One sentence.")

    with pytest.raises(gr.Error, match="One sentence."):
        shown(refuse)()


def test_using_two_subjects_switches_the_shape_to_wide():
    from nested_attention_ui.app import SQUARE, WIDE, shape_for

    assert shape_for(True, False) == SQUARE and shape_for(False, False) == SQUARE
    assert shape_for(True, True) == WIDE and shape_for(True, True, False) == WIDE


def test_the_ui_command_refuses_before_loading(capsys, tmp_path):
    assert main(["ui", "--model", "tiny-sd"]) == 2
    assert "needs at least one --adapter" in capsys.readouterr().err
    assert main(["ui", "--adapter", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err


def test_small_images_are_shown_sharp_and_larger():
    from PIL import Image

    from nested_attention_ui.app import for_display

    small = subject_image(0, size=64)
    shown = for_display(small)
    assert shown.size == (256, 256) and shown.resize((64, 64), Image.NEAREST).tobytes() == small.tobytes()
    large = subject_image(0, size=512)
    assert for_display(large) is large
