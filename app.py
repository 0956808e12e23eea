"""Hugging Face Space entry point: the ``ppap ui`` page on the Space's host and port."""

import os

from ppap.ui import launch

if __name__ == "__main__":
    # a Space serves on 0.0.0.0:7860 (GRADIO_SERVER_NAME / GRADIO_SERVER_PORT); locally: loopback
    launch(os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
