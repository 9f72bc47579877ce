"""Starting a test server: a free local port, and ``demo.launch`` that survives a slow first answer."""
from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(demo, attempts: int = 3) -> str:
    """``demo.launch`` on a free local port; its URL. Gradio gives up on a server that does not answer its first
    HEAD within 3 s ("localhost is not accessible"), which a loaded 2-core machine can take: then start again."""
    for attempt in range(1, attempts + 1):
        try:
            _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                                    quiet=True)
            return url
        except ValueError as e:
            if "localhost is not accessible" not in str(e) or attempt == attempts:
                raise
            demo.close()
