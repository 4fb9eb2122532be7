"""Drawing the toy world: ``render_target`` (a subject in a context, with the coverage of what its words name),
``render_input`` (the subject alone, like an aligned crop), ``render_scene`` (a person and a pet side by side,
twice as wide) and the sample sheet. Registries: ``SCENES`` (scenes.py), ``STYLES`` (styles.py); subjects are drawn by subjects.py and faces.py."""

from .compose import SCENE_SIZE, Rendered, render_input, render_scene, render_target, scene_half, split_scene
from .scenes import SCENES
from .sheet import EXAMPLE_IDENTITIES, example_identities, render_example_grid
from .styles import STYLES

__all__ = ["EXAMPLE_IDENTITIES", "SCENES", "SCENE_SIZE", "STYLES", "Rendered", "example_identities", "render_example_grid",
           "render_input", "render_scene", "render_target", "scene_half", "split_scene"]
