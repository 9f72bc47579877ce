"""Per-session result history: unique never-reused file names, atomic writes to the outputs folder the moment a
result exists, and the history a browser (or an API client's key) gets back after a reload or a restart.

Serving settings (outputs folder, recipes without the input, time budget per request) are set once by app.py
with ``configure``; a tab built on its own (tests) keeps its results in a temp folder only.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from PIL import Image

from editing.images import save_png_with_recipe
from ui import gradio_compat

log = logging.getLogger(__name__)

HISTORY_KEY = re.compile(r"[A-Za-z0-9_-]{22,128}")  # at least 128 random bits, as made by new_history_key


# ---- serving settings (app.py) ----------------------------------------------------------------------
@dataclass
class Serving:
    outputs: Path | None = None  # every result + recipe lands here (dated subfolders); None: temp folder only
    input_in_recipe: bool = True  # False: recipes leave out the pictures sent in (they can be fetched by URL)
    time_budget_s: float = 0.0  # a run still going after this many seconds is stopped (0 = no limit)
    temp_root: Path | None = None  # parent of every session folder (app.py removes it on exit)
    model_names: object | None = None  # models.registry.ModelNames: what web requests may name (None: the default)


SERVING = Serving()


def configure(**settings) -> Serving:
    """Set serving options (``Serving`` fields) for every tab; returns the settings."""
    for k, v in settings.items():
        if not hasattr(SERVING, k):
            raise TypeError(f"unknown serving setting {k!r}")
        setattr(SERVING, k, Path(v) if k in ("outputs", "temp_root") and v is not None else v)
    return SERVING


# ---- result files: unique names, atomic writes, the outputs folder ----------------------------------------
_SEQUENCE = itertools.count(1)  # never repeats in a process; the time stamp and token keep restarts apart
_SEQUENCE_LOCK = threading.Lock()


def unique_name(kind: str) -> str:
    """``20261201-120501-000042-<token>-kind.png``: ordered, never reused, and not guessable from another name
    (the cache serves files by URL to anyone who knows it)."""
    with _SEQUENCE_LOCK:
        n = next(_SEQUENCE)
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{n:06d}-{secrets.token_urlsafe(9)}-{kind}.png"


def write_png_atomically(image: Image.Image, path: Path, recipe: dict | None) -> Path:
    """The PNG (with its recipe) appears whole or not at all (``save_png_with_recipe`` writes a temp file next to
    ``path`` and renames it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_png_with_recipe(image, path, recipe)


def shared_recipe(recipe: dict | None) -> dict | None:
    """The recipe as written to files: without the pictures that were sent in when the server says so
    (``--no-input-in-recipe``); replay then needs those pictures again."""
    if recipe is None or SERVING.input_in_recipe:
        return recipe
    kept = {k: v for k, v in recipe.items() if not k.endswith("_png")}
    kept["inputs_left_out"] = sorted(k for k in recipe if k.endswith("_png"))
    return kept


def _user_file(user: str) -> Path:
    """The history index of one history key (its hash: the key itself is never written)."""
    return SERVING.outputs / ".history" / f"{hashlib.sha256(user.encode()).hexdigest()[:40]}.jsonl"


def new_history_key() -> str:
    return secrets.token_urlsafe(24)


def valid_history_key(key) -> str | None:
    return key if isinstance(key, str) and HISTORY_KEY.fullmatch(key) else None


# ---- per-session history ----------------------------------------------------------------------------
class History:
    """One browser tab's results, kept in gr.State, newest last, one selected. Every picture is written to the
    outputs folder the moment it exists (``SERVING.outputs``) and copied to this session's temp folder, which the
    page shows; models live in the engine, never here.

    ``key`` names the gallery (set by ``wire_history``); ``user`` is the browser's (or API client's) history key:
    with both, entries are listed in ``outputs/.history/`` and come back after a page reload or a restart."""

    LIMIT = 24  # results kept per tab (older ones stay in the outputs folder)

    def __init__(self, prefix: str = ""):
        self.prefix = prefix
        self.history: list[dict] = []
        self.selected: int | None = None  # history index picked in the gallery
        self.cancel = threading.Event()  # set by Cancel; the engine polls it
        self.key = ""
        self.user: str | None = None
        self.count = 0  # results ever added (captions number from it, so they never repeat)
        self._dir: Path | None = None

    def __deepcopy__(self, memo):  # gr.State deep-copies its initial value for every new tab
        copy = type(self)(self.prefix)
        copy.key = self.key
        return copy

    @property
    def dir(self) -> Path:
        if self._dir is None:
            root = SERVING.temp_root
            if root is not None:
                root.mkdir(parents=True, exist_ok=True)
            name = f"dragcanvas-{self.prefix}-" if self.prefix else "dragcanvas-"
            self._dir = Path(tempfile.mkdtemp(prefix=name, dir=root))
        return self._dir

    def close(self) -> None:
        """Called by gr.State when the tab is gone: delete this session's files (the outputs folder keeps them)."""
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def save_png(self, image: Image.Image, name: str, recipe: dict | None = None) -> str:
        """A working file of this session (input, mask): temp folder only, not a result."""
        return str(write_png_atomically(image, self.dir / name, shared_recipe(recipe)))

    def keep(self, image: Image.Image, kind: str, recipe: dict | None = None) -> str:
        """A result: written (atomically, uniquely named) to the outputs folder, then shown from the temp folder."""
        name = unique_name(kind)
        recipe = shared_recipe(recipe)
        shown = self.dir / name
        if SERVING.outputs is None:
            return str(write_png_atomically(image, shown, recipe))
        kept = write_png_atomically(image, SERVING.outputs / _stored(name), recipe)
        _copy(kept, shown)
        return str(shown)

    def _remember(self, entry: dict, files: dict) -> None:
        """Append the entry to this user's history index (one JSON line, written in one call)."""
        if SERVING.outputs is None or not self.user or not self.key:
            return
        line = json.dumps({"key": self.key, "files": {k: _stored(Path(v).name) for k, v in files.items()},
                           "caption": entry["caption"], "details": entry.get("details")}, default=str)
        path = _user_file(self.user)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)

    def bind(self, user: str | None) -> bool:
        """Attach the history key (first time only) and bring back this gallery's saved entries.
        True when entries were restored."""
        user = valid_history_key(user)
        if user is None or self.user is not None:
            return False
        self.user = user
        if SERVING.outputs is None or not self.key or self.history:
            return False
        saved = []
        try:
            lines = _user_file(user).read_text().splitlines()
        except OSError:
            return False
        for line in lines:
            try:
                item = json.loads(line)
            except json.JSONDecodeError:  # a line torn by a crash: skip it
                continue
            if isinstance(item, dict) and item.get("key") == self.key:
                saved.append(item)
        for item in saved[-self.LIMIT:]:
            files = {}
            for role, rel in (item.get("files") or {}).items():
                src = SERVING.outputs / rel
                if ".." in Path(rel).parts or not src.is_file():
                    break
                dest = self.dir / Path(rel).name
                if not dest.exists():
                    _copy(src, dest)
                files[role] = str(dest)
            else:
                self._restore_entry(files, item.get("caption", ""), item.get("details"))
        self.count = max(self.count, len(saved))
        if self.history:
            self.selected = len(self.history) - 1
        return bool(self.history)

    def _restore_entry(self, files: dict, caption: str, details) -> None:
        raise NotImplementedError

    def _keep_newest(self) -> None:
        """Keep LIMIT entries; the shown copies of older ones are deleted (the outputs folder keeps them)."""
        dropped, self.history = self.history[:-self.LIMIT], self.history[-self.LIMIT:]
        still = {p for e in self.history for p in self._files(e).values()}
        for e in dropped:
            for p in self._files(e).values():
                if p not in still:
                    Path(p).unlink(missing_ok=True)
        self.selected = len(self.history) - 1

    def _files(self, entry: dict) -> dict:
        raise NotImplementedError


def _stored(name: str) -> str:
    """A result's place in the outputs folder, relative to it: the dated subfolder of its name's time stamp."""
    return f"{name[:4]}-{name[4:6]}-{name[6:8]}/{name}"


def _copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:  # another file system
        shutil.copyfile(src, dest)


class BeforeAfter(History):
    """Edits of a picture (Drag, Move, Paste, Appearance): each entry keeps its input for the before/after view."""

    def add_result(self, before: Image.Image | None, result, caption: str, details: dict) -> None:
        self.count += 1
        after = self.keep(result.image, "after", result.recipe)
        before_path = self.keep(before, "before") if before is not None else after
        entry = {"before": before_path, "after": after, "recipe": result.recipe,
                 "caption": f"{self.count}: {caption}", "details": details}
        self.history.append(entry)
        self._remember(entry, {"before": before_path, "after": after})
        self._keep_newest()

    def _restore_entry(self, files: dict, caption: str, details) -> None:
        if "after" in files:
            self.history.append({"before": files.get("before", files["after"]), "after": files["after"],
                                 "recipe": None, "caption": caption, "details": details})

    def _files(self, entry: dict) -> dict:
        return {"before": entry["before"], "after": entry["after"]}

    def gallery(self) -> list[tuple[str, str]]:
        return [(e["after"], e["caption"]) for e in self.history]

    def shown(self):
        """(before/after pair, download path, details) of the selected result."""
        if self.selected is None or not self.history:
            return None, None, None
        e = self.history[self.selected]
        return (e["before"], e["after"]), e["after"], e["details"]


class Results(History):
    """Generated pictures (Sketch, Generate): every image of a batch is one entry with its own recipe."""

    LIMIT = 32

    def __init__(self, prefix: str = "result"):
        super().__init__(prefix)

    def add(self, result, caption: str, details: dict) -> None:
        recipes = result.extra.get("recipes") or [result.recipe] * len(result.all_images)
        for i, img in enumerate(result.all_images):
            self.count += 1
            recipe = recipes[min(i, len(recipes) - 1)]
            path = self.keep(img, self.prefix, recipe)
            seed = recipe.get("params", {}).get("seed")
            entry = {"path": path, "caption": f"{self.count}: {caption}, seed {seed}", "details": details}
            self.history.append(entry)
            self._remember(entry, {"path": path})
        self._keep_newest()

    def _restore_entry(self, files: dict, caption: str, details) -> None:
        if "path" in files:
            self.history.append({"path": files["path"], "caption": caption, "details": details})

    def _files(self, entry: dict) -> dict:
        return {"path": entry["path"]}

    def gallery(self) -> list[tuple[str, str]]:
        return [(e["path"], e["caption"]) for e in self.history]

    def current(self) -> str | None:
        if not self.history:
            return None
        return self.history[-1 if self.selected is None else min(self.selected, len(self.history) - 1)]["path"]

    def shown(self):
        """(download path, details) of the selected image."""
        if not self.history:
            return None, None
        e = self.history[-1 if self.selected is None else min(self.selected, len(self.history) - 1)]
        return e["path"], e["details"]


def on_select(history: History, evt: gr.SelectData):
    """A gallery pick: show that entry (its ``shown()``)."""
    history.selected = evt.index if isinstance(evt.index, int) and 0 <= evt.index < len(history.history) else None
    return history.shown()


def wire_history(demo: gr.Blocks, secret: str | None = None) -> int:
    """Make every tab's history survive a page reload and a server restart; returns how many histories.

    Each history is the gr.State its gallery's ``select`` event reads (``on_select``); the first such gallery
    names it (``History.key``). The browser keeps one random history key in localStorage (a gr.BrowserState,
    encrypted with ``secret``, which must stay the same across restarts); on page load it is bound to the
    session's histories, which read their saved entries back from the outputs folder. Another browser has
    another key, so it never sees these results. API clients send their key in the ``x-dragcanvas-history``
    header instead (see ``_RunGuard``)."""
    histories: dict[int, tuple[gr.State, list]] = {}
    blocks = gradio_compat.blocks_by_id(demo)
    for fn in gradio_compat.listeners(demo):
        if fn.fn is not on_select or not fn.inputs:
            continue
        state = fn.inputs[0]
        galleries = [blocks[t[0]] for t in fn.targets if t[0] in blocks]
        if not isinstance(getattr(state, "value", None), History) or not galleries:
            continue
        histories.setdefault(gradio_compat.block_id(state), (state, []))[1].extend(galleries)
    if not histories:
        return 0
    with demo:
        browser = gr.BrowserState(None, storage_key="dragcanvas-history", secret=secret)
        for state, galleries in histories.values():
            if not state.value.key:
                state.value.key = galleries[0].elem_id or f"gallery-{gradio_compat.block_id(galleries[0])}"
            demo.load(_restorer(len(galleries)), [browser, state], [browser, *galleries], queue=False,
                      show_progress="hidden", api_visibility="private")
    return len(histories)


def _restorer(n_galleries: int):
    def restore_history(key, history: History):
        """Page load: this browser's history key (a new one the first time), and the galleries it brings back."""
        key = valid_history_key(key) or new_history_key()
        history.bind(key)
        return key, *([history.gallery()] * n_galleries)

    return restore_history
