"""The Gradio app of `nested-attention ui`: one panel per subject, the prompt checked as it is typed, and tabs to
generate, compare (base model and a lambda sweep) and explain (paper Figs. 4-6)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gradio as gr
from PIL import Image

from nested_attention.errors import NestedAttentionError

from .session import COMPARE_LAMBDAS, MAX_COUNT, MAX_STEPS, MAX_UPLOAD_BYTES, Settings, SubjectInput, UISession

DISPLAY_SIDE = 256
SQUARE, WIDE = "square", "twice as wide (a person and a pet side by side)"  # the shape setting's choices
FIELDS = 6  # per subject: enabled, uploads, example, weights, word, lambda
HEADER = """# Nested Attention
Put a subject from one or a few images into a generated scene, bound to one word of the prompt
([paper](https://arxiv.org/abs/2501.01407)). Each panel below is one subject (one adapter); write its word in the
prompt. Lambda trades the prompt for identity."""
TOY_NOTE = """*The toy model and its adapters run on a CPU. They are small, and measured: a held-out subject is
recognized (top-1 among 20) in 0.76-0.79 of the generations at lambda 1 and 0.88-0.89 at lambda 2 (0.03-0.08 without
adapter), both subjects of a person + pet image in 0.65 and 0.85-0.90, and colours carry over better than shapes
(docs/toyworld.md).*"""


def subject_inputs(values: list, examples: dict[str, str]) -> list[SubjectInput]:
    """The flat component values (FIELDS per subject) -> SubjectInputs; an example adds its bundled image."""
    inputs = []
    for start in range(0, len(values), FIELDS):
        enabled, uploads, example, weights, word, lam = values[start : start + FIELDS]
        images = [str(getattr(u, "name", u)) for u in (uploads or [])]
        if example:
            images.append(examples[example])
        inputs.append(SubjectInput(images=images, weights=weights or "", word=word or "", lam=float(lam),
                                   enabled=bool(enabled)))
    return inputs


def for_display(image: Image.Image, side: int = DISPLAY_SIDE) -> Image.Image:
    """Small images (the toy model's 64 px) scaled up by a whole factor, nearest neighbour: every pixel stays
    sharp, so the subject's features can be compared by eye."""
    factor = side // max(image.size)
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST) if factor > 1 else image


def settings_of(negative: str, seed, steps, guidance, count, shape: str = SQUARE) -> Settings:
    return Settings(negative_prompt=negative or "", seed=int(seed), steps=int(steps), guidance=float(guidance),
                    count=int(count), wide=shape == WIDE)


def shape_for(*enabled: bool) -> str:
    """The shape a change of the subjects in use picks: twice as wide for two or more (each gets its own half, as
    the toy world's scenes do), square for one; the setting stays the user's to change afterwards."""
    return WIDE if sum(map(bool, enabled)) >= 2 else SQUARE


def shown(call: Callable):
    """A handler whose NestedAttentionError becomes the one-sentence message Gradio shows (never a traceback)."""

    def handler(*args, **kwargs):
        try:
            return call(*args, **kwargs)
        except NestedAttentionError as error:
            raise gr.Error(str(error), print_exception=False) from None

    return handler


def build_app(session: UISession, examples: dict[str, str], toy: bool = False, prompt: str = "") -> gr.Blocks:
    """The app for `session`; `examples` maps a label to a bundled subject image offered in every panel."""
    with gr.Blocks(title="Nested Attention") as app:
        gr.Markdown(HEADER + ("\n\n" + TOY_NOTE if toy else ""))
        components = []
        with gr.Row():
            for index, name in enumerate(session.names):
                word = session.trained_words[name]
                with gr.Column(variant="panel"):
                    gr.Markdown(f"### Subject: adapter `{name}`")
                    components += [
                        gr.Checkbox(value=index == 0, label="use this subject"),
                        gr.File(file_count="multiple", file_types=["image"], label="images of the subject"),
                        gr.Dropdown(choices=[""] + sorted(k for k in examples if k.startswith(word)), value=None,
                                    label="or a bundled example", allow_custom_value=False),
                        gr.Textbox(label="image weights (optional, one per image, e.g. 2, 1)"),
                        gr.Textbox(value=word, label="the word it binds to"),
                        gr.Slider(1.0, 4.0, value=1.0, step=0.25, label="lambda (higher: more identity)"),
                    ]
        text = gr.Textbox(value=prompt, label="prompt", elem_id="prompt")
        status = gr.Markdown(elem_id="prompt-status")
        with gr.Accordion("settings", open=False):
            with gr.Row():
                negative = gr.Textbox(label="negative prompt")
                seed = gr.Number(value=0, precision=0, minimum=0, label="seed")
                steps = gr.Slider(1, MAX_STEPS, value=20, step=1, label="steps")
                guidance = gr.Slider(0.0, 15.0, value=5.0, step=0.5, label="guidance")
                count = gr.Slider(1, MAX_COUNT, value=2, step=1, label="images")
                shape = gr.Radio([SQUARE, WIDE], value=SQUARE, label="shape", elem_id="shape")
        settings = [negative, seed, steps, guidance, count, shape]
        enabled = components[::FIELDS]
        for box in enabled:
            box.input(shape_for, enabled, shape, queue=False, show_progress="hidden")

        def request(values):
            """The values after the prompt: FIELDS per subject, then the settings."""
            cut = len(values) - len(settings)
            return subject_inputs(list(values[:cut]), examples), settings_of(*values[cut:])

        def check(prompt_text, *values):
            message = session.check_prompt(prompt_text, subject_inputs(list(values), examples))
            return f"**Not yet:** {message}" if message else "Ready: every enabled subject's word is in the prompt."

        def generate(prompt_text, *values, progress=gr.Progress()):  # noqa: B008 (how Gradio injects progress)
            inputs, options = request(values)
            images = session.generate(prompt_text, inputs, options, progress=lambda f: progress(f, desc="generating"))
            return [for_display(image) for image in images]

        def compare(prompt_text, *values, progress=gr.Progress()):  # noqa: B008
            inputs, options = request(values)
            results = session.compare(prompt_text, inputs, options, progress=lambda f: progress(f, desc="comparing"))
            return [(for_display(image), caption) for image, caption in results]

        def explain(prompt_text, *values):
            inputs, options = request(values)
            return session.explain(prompt_text, inputs, options)

        for component in [text, *components]:
            component.change(check, [text, *components], status, queue=False, show_progress="hidden")
        app.load(check, [text, *components], status, queue=False)
        with gr.Tabs():
            with gr.Tab("Generate"):
                go = gr.Button("Generate", variant="primary", elem_id="generate")
                gallery = gr.Gallery(label="generated", columns=4, fit_columns=False, height=300, object_fit="contain",
                                     elem_id="gallery")
                go.click(shown(generate), [text, *components, *settings], gallery, concurrency_id="gpu")
            with gr.Tab("Compare"):
                gr.Markdown("The base model without adapters, then lambda " + ", ".join(f"{v:g}" for v in COMPARE_LAMBDAS)
                            + ", all with the first seed.")
                go = gr.Button("Compare", elem_id="compare")
                table = gr.Gallery(label="compare", columns=len(COMPARE_LAMBDAS) + 1, fit_columns=False, height=300,
                                   object_fit="contain", elem_id="compare-gallery")
                go.click(shown(compare), [text, *components, *settings], table, concurrency_id="gpu")
            with gr.Tab("Explain"):
                gr.Markdown("What nested attention does inside one layer, for the first enabled subject "
                            "(docs/explain.md).")
                go = gr.Button("Explain", elem_id="explain")
                sheet, numbers = gr.Image(label="explain sheet", elem_id="explain-sheet"), gr.JSON(label="numbers")
                go.click(shown(explain), [text, *components, *settings], [sheet, numbers], concurrency_id="gpu")
    return app


def bundled_examples(folder: Path) -> dict[str, str]:
    """name -> path of every PNG in `folder` (the toy world's held-out example subjects)."""
    return {path.stem: str(path) for path in sorted(folder.glob("*.png"))}


def launch(app: gr.Blocks, host: str, port: int, block: bool = True) -> gr.Blocks:
    """Serve `app` with one generation at a time (a queue), uploads bounded in size."""
    app.queue(default_concurrency_limit=1, max_size=32)
    app.launch(server_name=host, server_port=port, max_file_size=MAX_UPLOAD_BYTES, prevent_thread_lock=not block,
               show_error=True, quiet=True)
    return app
