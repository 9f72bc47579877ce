"""Every use of Gradio internals, one function each (as models/diffusers_private.py does for diffusers).

The app needs a few things Gradio has no public API for: the asyncio task of the job running a handler (to see
an API cancel), a component's raw-value reader (to answer a bad API value in one line), the data model Gradio
validates a value with before that, the step that refuses a file reference nobody uploaded (its message never
reaches the client), the outputs of every call (to record who owns a result file), the logged-in user of a raw
HTTP request (the file route) and the shape of the upload and file routes. ``tests/test_gradio_compat.py`` checks
each against the installed Gradio, so an upgrade that moves one fails there, by name, instead of quietly turning
a safety check off. Written against gradio 6.31.
"""
from __future__ import annotations

import functools
import logging
import os
import types
from collections.abc import Callable
from http.cookies import CookieError, SimpleCookie

import gradio as gr

log = logging.getLogger(__name__)

API_PREFIX = "/gradio_api"
FILE_ROUTE = f"{API_PREFIX}/file="
UPLOAD_ROUTE = f"{API_PREFIX}/upload"


# ---- the running job (ui/common.py's run guard) -----------------------------------------------------------
def queue_job():
    """(asyncio task, queue event) of the Gradio job running the calling handler; (None, None) outside a queued job.

    Gradio 6 names each job's task ``...<gradio-sep><event_id>`` and keeps them in ``Queue._asyncio_tasks``; a
    cancel (``/cancel``) cancels that task, and a vanished client marks the event not ``alive``."""
    ctx = gr.context.LocalContext
    blocks, event_id = ctx.blocks.get(None), ctx.event_id.get(None)
    queue = getattr(blocks, "_queue", None)
    if queue is None or event_id is None:
        return None, None
    event = queue.event_ids_to_events.get(event_id)
    suffix = f"<gradio-sep>{event_id}"
    for _ in range(3):  # the loop thread may change the set while this thread reads it
        try:
            tasks = list(queue._asyncio_tasks)
            break
        except RuntimeError:
            continue
    else:
        tasks = []
    task = next((t for t in tasks if t.get_name().endswith(suffix)), None)
    return task, event


# ---- raw values (ui/fields.py) -------------------------------------------------------------------------------
def replace_preprocess(component, reader: Callable) -> None:
    """Make ``reader(component, payload)`` the component's ``preprocess`` (Gradio calls ``block.preprocess`` on the
    instance, so an instance attribute wins); Gradio's own reader stays callable as ``original_preprocess``."""
    if not hasattr(component, "dragcanvas_preprocess"):
        component.dragcanvas_preprocess = component.preprocess
    component.preprocess = types.MethodType(reader, component)


def original_preprocess(component, payload):
    """Gradio's own ``preprocess`` of a component whose reader was replaced (or of any other component)."""
    return getattr(component, "dragcanvas_preprocess", component.preprocess)(payload)


def replace_data_model(component, on_invalid: Callable) -> bool:
    """Make the pydantic model Gradio validates the component's value with (``block.data_model.model_validate``,
    before ``preprocess``) call ``on_invalid(component, value)`` (which raises) instead of raising pydantic's
    ValidationError, which reaches the client as an empty error. Returns False when the component has none."""
    import pydantic

    model = getattr(component, "data_model", None)
    if not (isinstance(model, type) and hasattr(model, "model_validate")):
        return False

    def model_validate(cls, obj, *args, **kwargs):
        try:
            return super(checked_cls, cls).model_validate(obj, *args, **kwargs)
        except pydantic.ValidationError:
            on_invalid(component, obj)
            raise

    # same name and module: the API page and its JSON schema still say FileData
    checked_cls = type(model.__name__, (model,), {"model_validate": classmethod(model_validate),
                                                  "__module__": model.__module__})
    component.data_model = checked_cls
    return True


# ---- every call: refused files explained, stray errors named, outputs seen -----------------------------------
def refused_file_error() -> type[Exception]:
    """The exception Gradio raises while reading a call's inputs for a file reference it will not read (not
    uploaded here, outside its cache, a blocked path); its message stays in the server log."""
    from gradio.exceptions import InvalidPathError

    return InvalidPathError


async def _refused_input(demo, block_fn, inputs) -> tuple[object | None, str | None]:
    """(input component, its API parameter name) whose value holds the refused file reference (Gradio's own
    check, input by input); (None, None) when none is found."""
    from gradio import processing_utils

    fn = demo.fns[block_fn] if isinstance(block_fn, int) else block_fn
    for i, (block, value) in enumerate(zip(fn.inputs, inputs)):
        try:
            await processing_utils.async_move_files_to_cache(value, block, check_in_upload_folder=True)
        except refused_file_error():
            return block, api_parameter_name(fn, i)
        except Exception:  # not this check's failure (the call's own error was elsewhere): keep looking
            log.debug("input %s failed the cache check otherwise", getattr(block, "label", None), exc_info=True)
    return None, None


def api_parameter_name(fn, index: int) -> str | None:
    """The name the API page gives input ``index`` of an event (``BlockFunction.input_parameter_names``: the
    handler's parameters, ``inputs_kwargs`` keys included)."""
    names = fn.input_parameter_names or []
    return names[index] if index < len(names) else None


def guard_calls(demo, refused: Callable[[object, str | None], str], unexpected: Callable[[BaseException], str],
                outputs: Callable[[object, dict], None]) -> None:
    """Wrap ``demo.process_api`` (Gradio's one entry for every event, queued or not): a refused file reference
    becomes ``gr.Error(refused(component, api_name))``; any other exception that is not already a ``gr.Error`` becomes
    ``gr.Error(unexpected(e))`` (logged), so no error event has an empty message; ``outputs(request, result)``
    sees every successful result (``result["data"]``: the values as sent, file values with their ``path``)."""
    process_api = demo.process_api

    @functools.wraps(process_api)
    async def guarded(*args, **kwargs):
        try:
            result = await process_api(*args, **kwargs)
        except gr.Error:
            raise
        except refused_file_error():
            block, name = await _refused_input(demo, kwargs.get("block_fn"), kwargs.get("inputs") or [])
            raise gr.Error(refused(block, name)) from None
        except Exception as e:
            log.exception("a call failed outside the app's handlers")
            raise gr.Error(unexpected(e)) from None
        outputs(kwargs.get("request"), result)
        return result

    demo.process_api = guarded


def request_username(request) -> str | None:
    """The logged-in user of a ``gr.Request`` (or the first of a batch)."""
    if isinstance(request, list):
        request = request[0] if request else None
    return getattr(request, "username", None)


def file_paths(data) -> list[str]:
    """The server paths of every file value (FileData dicts) in a call's result data."""
    found = []

    def walk(v):
        if isinstance(v, dict):
            if isinstance(v.get("path"), str) and ("url" in v or "meta" in v):
                found.append(v["path"])
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)

    walk(data)
    return found


# ---- the HTTP side: who is asking, for which file -------------------------------------------------------------
def scope_username(scope) -> str | None:
    """The logged-in user of a raw ASGI request, as Gradio's own ``/user`` route finds it: the access-token cookie
    looked up in the app's token table (``App.tokens``, ``App.cookie_id``)."""
    app = scope.get("app")
    tokens, cookie_id = getattr(app, "tokens", None), getattr(app, "cookie_id", None)
    if tokens is None or cookie_id is None:
        return None
    cookies = SimpleCookie()
    for name, value in scope.get("headers", ()):
        if name == b"cookie":
            try:
                cookies.load(value.decode("latin-1"))
            except CookieError:  # a malformed cookie header: no user
                return None
    for name in (f"access-token-{cookie_id}", f"access-token-unsecure-{cookie_id}"):
        if name in cookies:
            return tokens.get(cookies[name].value)
    return None


def requested_file(path: str) -> str | None:
    """The server path a ``/gradio_api/file=<path>`` URL path asks for (normalised), or None for other routes."""
    i = path.find(FILE_ROUTE)
    if i < 0:
        return None
    target = path[i + len(FILE_ROUTE):]
    if "://" in target:  # Gradio also proxies http(s) URLs there: not a file of this server
        return None
    return normal_path(target)


def is_upload(path: str, method: str) -> bool:
    """A POST to Gradio's upload route, whose JSON answer lists the server paths of the stored files."""
    return method == "POST" and path.rstrip("/").endswith(UPLOAD_ROUTE)


def normal_path(path: str) -> str:
    return os.path.normpath(os.path.abspath(path))


# ---- the app's structure: listeners, blocks, the Blocks being built, the current request ------------------------
def listeners(demo) -> list:
    """Every event listener of ``demo`` (``Blocks.fns``: each has ``fn``, ``inputs``, ``outputs``, ``targets`` as
    (block id, event name) pairs)."""
    return list(demo.fns.values())


def blocks_by_id(demo) -> dict:
    """block id -> component, for every block of ``demo`` (``Blocks.blocks``)."""
    return demo.blocks


def block_id(block) -> int:
    """The id Gradio gives a block (``Block._id``; what listeners' ``targets`` name)."""
    return block._id


def building() -> object | None:
    """The Blocks being built (inside ``with gr.Blocks()``), or None (``gr.context.Context.root_block``)."""
    return gr.context.Context.root_block


def current_request():
    """The ``gr.Request`` of the call running this handler, or None (``gr.context.LocalContext.request``)."""
    return gr.context.LocalContext.request.get(None)


# ---- the queue: the bound on engine requests (app.py) ---------------------------------------------------------
def wrap_queue_push(demo, check: Callable) -> None:
    """Before Gradio queues an event (``Queue.push(body, request, username)``), ``check(fn, body)`` (``fn`` the
    listener the body names, or None for a body Gradio will refuse itself) may answer ``(False, message)`` to
    refuse it with that message; None lets it through."""
    from gradio import route_utils

    queue = demo._queue
    push = queue.push

    async def checked_push(body, request, username):
        try:
            fn = route_utils.get_fn(demo, None, body)
        except Exception:  # a malformed body: Gradio's own push answers it its own way
            log.debug("an event body names no listener", exc_info=True)
            fn = None
        refusal = check(fn, body) if fn is not None else None
        if refusal is not None:
            ok, message = refusal
            return ok, message, "queue_full"
        return await push(body, request, username)

    queue.push = checked_push


def queue_load(demo, concurrency_id: str) -> tuple[list[str], int]:
    """(session hash of each waiting event, number running) of one concurrency group of ``demo``'s queue."""
    group = demo._queue.event_queue_per_concurrency_id.get(concurrency_id)
    waiting = list(getattr(group, "queue", []))
    return [e.session_hash for e in waiting], int(getattr(group, "current_concurrency", 0))


def session_hash(body) -> str | None:
    """The session an event body belongs to (one page, or one gradio_client Client)."""
    return getattr(body, "session_hash", None)
