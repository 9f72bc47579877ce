"""DragCanvas engine: typed requests in, EditResult out. Pure torch + diffusers; never imports gradio."""
