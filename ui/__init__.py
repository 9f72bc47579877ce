"""Gradio UI of DragCanvas. Talks to the engine (editing/) only; never imports torch kernels."""
from ui.app import build_demo

__all__ = ["build_demo"]
