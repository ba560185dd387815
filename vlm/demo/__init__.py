"""``python -m vlm.demo MODEL_DIR``: a web page to chat with a model about images (Gradio), offline.

:mod:`vlm.demo.turns`: page <-> conversation and drawn boxes (plain functions); :mod:`vlm.demo.app`: ``build_app``
and ``launch``. Gradio is imported only when a page is built.
"""
from vlm.demo.app import build_app, launch

__all__ = ["build_app", "launch"]
