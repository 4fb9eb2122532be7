"""The web UI of `nested-attention ui` (Gradio): every capability of the library without code. The session
(`session.py`) holds what the app does; `app.py` lays it out. The library never imports it."""
