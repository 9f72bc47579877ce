"""Files per user: with a login (``--auth``), a result or an upload is served only to the user whose request made it.

Gradio serves every file of its cache to anyone logged in who knows the URL. This records the owner of each file
when it is made (an upload: the upload route's answer; a result: the outputs of the call, through
``ui.gradio_compat.guard_calls``) and refuses the file route with 403 for another logged-in user. A file no request
made (the example thumbnails) is served as before. Without a login nothing changes: the long random file names are
the protection, as in every Gradio app.
"""
from __future__ import annotations

import json
import logging
import threading

from ui import gradio_compat

log = logging.getLogger(__name__)

FORBIDDEN = b"This file belongs to another user of this server."
MAX_UPLOAD_ANSWER = 1 << 20  # the upload route answers with a short JSON list of paths; more is not that


class FileOwners:
    """server path -> the users whose requests made it (the same picture uploaded by two users is one file)."""

    def __init__(self):
        self._owners: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def record(self, user: str | None, paths) -> None:
        if not user:
            return
        with self._lock:
            for p in paths:
                self._owners.setdefault(gradio_compat.normal_path(p), set()).add(user)

    def allowed(self, user: str | None, path: str) -> bool:
        """True unless ``path`` was made by a request of someone else than ``user``."""
        with self._lock:
            owners = self._owners.get(gradio_compat.normal_path(path))
        return owners is None or (user is not None and user in owners)

    def record_outputs(self, request, result: dict) -> None:
        """``guard_calls``' outputs hook: the files a call returned belong to its user."""
        self.record(gradio_compat.request_username(request), gradio_compat.file_paths(result.get("data")))


OWNERS = FileOwners()  # one table per process: app.py records into it and its middleware reads it


class OwnerCheck:
    """ASGI middleware: records who uploaded what, and answers 403 when another user asks for a file."""

    def __init__(self, app, owners: FileOwners):
        self.app, self.owners = app, owners

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope.get("path", ""), scope.get("method", "GET")
        wanted = gradio_compat.requested_file(path) if method in ("GET", "HEAD") else None
        if wanted is not None:
            user = gradio_compat.scope_username(scope)
            if not self.owners.allowed(user, wanted):
                log.info("refused a file of another user to %r", user)
                return await _answer(send, 403, FORBIDDEN)
            return await self.app(scope, receive, send)
        if gradio_compat.is_upload(path, method):
            return await self._upload(scope, receive, send)
        return await self.app(scope, receive, send)

    async def _upload(self, scope, receive, send):
        status, body = [0], bytearray()

        async def watching_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            elif message["type"] == "http.response.body" and len(body) < MAX_UPLOAD_ANSWER:
                body.extend(message.get("body", b""))
            await send(message)

        await self.app(scope, receive, watching_send)
        if status[0] == 200:
            try:
                paths = json.loads(bytes(body))
            except ValueError:
                return
            if isinstance(paths, list):
                self.owners.record(gradio_compat.scope_username(scope), [p for p in paths if isinstance(p, str)])


async def _answer(send, status: int, text: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(text)).encode())]})
    await send({"type": "http.response.body", "body": text})
