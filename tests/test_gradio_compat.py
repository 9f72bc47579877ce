"""Each Gradio internal the app relies on (ui/gradio_compat.py), checked against the installed Gradio on a small
launched app: if an upgrade moves one, the test naming it fails here, instead of a safety check silently going off."""
from __future__ import annotations

import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from tests.serving import free_port
from ui import gradio_compat as compat

USER = ("ann", "ann-pw")
SEEN: dict = {}


class _WhoAsks:
    """Records what ``scope_username`` / ``requested_file`` make of each raw request."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            SEEN.setdefault("users", []).append(compat.scope_username(scope))
            if (wanted := compat.requested_file(scope["path"])) is not None:
                SEEN.setdefault("files", []).append(wanted)
        return await self.app(scope, receive, send)


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    import gradio as gr
    from PIL import Image
    from starlette.middleware import Middleware

    picture = tmp_path_factory.mktemp("compat") / "p.png"
    Image.new("RGB", (8, 8), "red").save(picture)

    def job():
        task, event = compat.queue_job()
        return f"{task is not None and not task.done()} {event is not None and event.alive}"

    def echo(f, n):
        return f, n

    def boom():
        raise ValueError("raised by a handler that nobody wrapped")

    def who():
        request = compat.current_request()
        return f"{request.username} {compat.queue_load(demo, 'counted')[1]}"

    with gr.Blocks() as demo:
        f, n, out = gr.File(label="Picture"), gr.Number(label="Count"), gr.Textbox()
        gr.Button().click(job, None, out, api_name="job")
        gr.Button().click(echo, [f, n], [f, n], api_name="echo")
        gr.Button().click(boom, None, out, api_name="boom")
        gr.Button().click(who, None, out, api_name="who", concurrency_id="counted")
        gr.Button().click(who, None, out, api_name="refused", concurrency_id="refused")
        SEEN["building"] = compat.building()

    def count_reader(component, payload):
        if payload is None:
            return None
        raise gr.Error(f"read by the replaced reader: {payload!r}")

    compat.wrap_queue_push(demo, lambda fn, body: (False, f"refused for {compat.session_hash(body) is not None}")
                           if fn.concurrency_id == "refused" else None)
    compat.replace_preprocess(n, count_reader)
    compat.replace_data_model(f, lambda c, v: (_ for _ in ()).throw(gr.Error(f"{c.label}: wrong shape {v!r}")))
    compat.guard_calls(demo, lambda c, name: f"refused {name} ({c.label})", lambda e: f"unexpected {type(e).__name__}",
                       lambda request, result: SEEN.setdefault("outputs", []).append(
                           (compat.request_username(request), compat.file_paths(result.get("data")))))
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True,
                            auth=[USER], app_kwargs={"middleware": [Middleware(_WhoAsks)]})
    try:
        yield url, str(picture), demo
    finally:
        demo.close()


def test_queue_job_finds_the_running_task_and_event(app_url):
    """Queue._asyncio_tasks (named ...<gradio-sep><event_id>) and Queue.event_ids_to_events."""
    url, _, _ = app_url
    assert Client(url, auth=USER, verbose=False).predict(api_name="/job") == "True True"


def test_a_replaced_reader_and_data_model_are_what_gradio_calls(app_url):
    """Blocks.preprocess_data calls the instance's ``preprocess`` and ``data_model.model_validate``."""
    url, picture, _ = app_url
    client = Client(url, auth=USER, verbose=False)
    with pytest.raises(AppError, match="read by the replaced reader: 3"):
        client.predict(handle_file(picture), 3, api_name="/echo")
    with pytest.raises(AppError, match="Picture: wrong shape False"):
        client.predict(False, 3, api_name="/echo")


def test_guard_calls_names_a_refused_file_and_every_stray_error(app_url):
    """InvalidPathError from the cache check, BlockFunction.input_parameter_names, Blocks.process_api's keywords."""
    url, _, _ = app_url
    http = httpx.Client(base_url=url, timeout=30)
    assert http.post("login", data={"username": USER[0], "password": USER[1]}).status_code == 200
    for api, data, expected in (("echo", [{"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}, 1],
                                 "refused f (Picture)"), ("boom", [], "unexpected ValueError")):
        event_id = http.post(f"gradio_api/call/{api}", json={"data": data}).json()["event_id"]
        text = http.get(f"gradio_api/call/{api}/{event_id}").text
        assert "event: error" in text and expected in text, text


def test_outputs_users_and_file_routes_are_seen(app_url):
    """process_api's result data (FileData with path), gr.Request.username, App.tokens / cookie_id, the upload
    route's answer (a JSON list of paths) and the file route's URL shape."""
    url, picture, _ = app_url
    http = httpx.Client(base_url=url, timeout=30)
    assert http.post("login", data={"username": USER[0], "password": USER[1]}).status_code == 200
    with open(picture, "rb") as fh:
        r = http.post(compat.UPLOAD_ROUTE.lstrip("/"), files=[("files", ("p.png", fh, "image/png"))])
    assert compat.is_upload("/" + compat.UPLOAD_ROUTE.lstrip("/"), "POST")
    (path,) = r.json()
    assert http.get(f"{compat.FILE_ROUTE.lstrip('/')}{path}").status_code == 200
    assert compat.normal_path(path) in SEEN["files"] and USER[0] in SEEN["users"]
    client = Client(url, auth=USER, verbose=False, download_files=False)
    client.predict(handle_file(picture), None, api_name="/echo")
    user, paths = SEEN["outputs"][-1]
    assert user == USER[0] and len(paths) == 1 and paths[0].endswith("p.png")


def test_the_app_structure_and_the_queue_as_the_app_reads_them(app_url):
    """Blocks.fns (fn, inputs, targets), Blocks.blocks, Block._id, Context.root_block, LocalContext.request,
    Queue.push's signature and answer, Queue.event_queue_per_concurrency_id."""
    url, _, demo = app_url
    assert SEEN["building"] is demo
    blocks = compat.blocks_by_id(demo)
    for fn in compat.listeners(demo):
        assert callable(fn.fn) and all(blocks[compat.block_id(c)] is c for c in fn.inputs)
        assert all(t[0] in blocks for t in fn.targets)
    client = Client(url, auth=USER, verbose=False)
    assert client.predict(api_name="/who") == f"{USER[0]} 1"  # the call itself is the one running in its group
    endpoint = next(e for e in client.endpoints.values() if getattr(e, "api_name", None) == "/refused")
    http = httpx.Client(base_url=url, timeout=30)
    assert http.post("login", data={"username": USER[0], "password": USER[1]}).status_code == 200
    r = http.post("gradio_api/queue/join", json={"data": [], "fn_index": endpoint.fn_index,
                                                 "session_hash": client.session_hash})
    assert r.status_code == 503 and "refused for True" in r.json()["detail"]
